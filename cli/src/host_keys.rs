//! Pinning a machine's SSH host keys for `skygate machines ssh`: the keys the guest printed on
//! its serial console (read through the authenticated API, the one channel that is known to
//! come from that machine), and the CLI's own known_hosts file where they are pinned under the
//! alias `skygate-<machine id>`.
//!
//! Why not the user's `~/.ssh/known_hosts` keyed by `[127.0.0.1]:PORT`: forwarded ports are
//! reused by later machines, so an entry by address either blocks the next machine on that port
//! or, once "fixed" by hand, vouches for the wrong one. An alias per machine id never collides
//! (ids are never reused), and a file of the CLI's own is never edited by anything else.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::session::{config_dir, CliError, CliResult};

/// First line of the block the guest prints (the shape cloud-init uses).
pub const BEGIN_MARKER: &str = "-----BEGIN SSH HOST KEY KEYS-----";
/// Last line of that block.
pub const END_MARKER: &str = "-----END SSH HOST KEY KEYS-----";

/// One SSH host public key, without its comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKey {
    algorithm: String,
    base64: String,
}

impl HostKey {
    /// Parses `TYPE BASE64 [comment]`. Only the types an OpenSSH client verifies host keys
    /// with are accepted (ssh-ed25519, ecdsa-sha2-*, ssh-rsa), and the blob must decode to a key
    /// of that very type: a console line mangled by interleaved output is dropped, not pinned.
    pub fn parse(line: &str) -> Option<HostKey> {
        let mut fields = line.split_whitespace();
        let algorithm = fields.next()?;
        let base64 = fields.next()?;
        let known = algorithm == "ssh-ed25519"
            || algorithm == "ssh-rsa"
            || algorithm.starts_with("ecdsa-sha2-");
        if !known {
            return None;
        }
        let key = ssh_key::PublicKey::from_openssh(&format!("{algorithm} {base64}")).ok()?;
        if key.algorithm().as_str() != algorithm {
            return None;
        }
        Some(HostKey {
            algorithm: algorithm.to_owned(),
            base64: base64.to_owned(),
        })
    }
}

impl std::fmt::Display for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.algorithm, self.base64)
    }
}

/// The keys of the last complete BEGIN/END block on the console, or `None` when there is no
/// complete block (the guest has not got that far, or the block is still being written).
///
/// The last block wins because the console log spans boots and each boot prints its own. Lines
/// that are not a valid key (kernel messages interleaved with the block, a line cut by the
/// tail) are skipped, so a complete block may come back empty; a BEGIN without an END before
/// the next BEGIN is abandoned.
pub fn last_key_block(console: &str) -> Option<Vec<HostKey>> {
    let mut open: Option<Vec<HostKey>> = None;
    let mut last = None;
    for line in console.lines() {
        // Serial consoles end lines with \r\n, and a marker may follow stray output.
        let line = line.trim();
        if line.ends_with(BEGIN_MARKER) {
            open = Some(Vec::new());
        } else if line.ends_with(END_MARKER) {
            if let Some(keys) = open.take() {
                last = Some(keys);
            }
        } else if let Some(keys) = open.as_mut() {
            if let Some(key) = HostKey::parse(line) {
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
        }
    }
    last
}

/// The name a machine's keys are pinned under (ssh's `HostKeyAlias`).
pub fn alias(machine_id: &str) -> String {
    format!("skygate-{machine_id}")
}

/// The host patterns of a known_hosts line and the rest of it, for plain entries only
/// (comments, blank lines and `@cert-authority` / `@revoked` lines are not entries we own).
fn entry(line: &str) -> Option<(&str, &str)> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') || line.starts_with('@') {
        return None;
    }
    line.split_once(char::is_whitespace)
}

/// The keys pinned for `alias` in known_hosts text: `None` when nothing names the alias (first
/// use). An entry whose key does not parse still counts as pinned, so a damaged entry makes ssh
/// refuse rather than being silently replaced by whatever the console says now.
pub fn pinned_keys(known_hosts: &str, alias: &str) -> Option<Vec<HostKey>> {
    let mut found = None;
    for (hosts, rest) in known_hosts.lines().filter_map(entry) {
        if hosts.split(',').any(|h| h == alias) {
            let keys = found.get_or_insert_with(Vec::new);
            if let Some(key) = HostKey::parse(rest) {
                keys.push(key);
            }
        }
    }
    found
}

/// known_hosts text without `alias`: it is dropped from every entry's host list, and entries
/// left with no host go. Every other line is kept as it was.
pub fn without_alias(known_hosts: &str, alias: &str) -> String {
    let mut out = String::new();
    for line in known_hosts.lines() {
        match entry(line) {
            Some((hosts, rest)) if hosts.split(',').any(|h| h == alias) => {
                let others: Vec<&str> = hosts.split(',').filter(|h| *h != alias).collect();
                if !others.is_empty() {
                    out.push_str(&others.join(","));
                    out.push(' ');
                    out.push_str(rest.trim_start());
                    out.push('\n');
                }
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// known_hosts text with `keys` as the only ones pinned for `alias`.
pub fn with_pinned(known_hosts: &str, alias: &str, keys: &[HostKey]) -> String {
    let mut out = without_alias(known_hosts, alias);
    for key in keys {
        out.push_str(&format!("{alias} {key}\n"));
    }
    out
}

/// What [`KnownHosts::pin_if_absent`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinned {
    /// First use: the keys were written.
    Added,
    /// The alias already had an entry, which was kept as it was.
    Kept,
}

/// The CLI's known_hosts file (`known_hosts` in the config dir, next to credentials.json).
#[derive(Debug, Clone)]
pub struct KnownHosts {
    path: PathBuf,
}

impl KnownHosts {
    /// The file in the CLI's config dir, as an absolute path (ssh resolves it on its own).
    pub fn in_config_dir() -> CliResult<KnownHosts> {
        let path = config_dir()?.join("known_hosts");
        let path =
            std::path::absolute(&path).map_err(|e| CliError(format!("{}: {e}", path.display())))?;
        Ok(KnownHosts::at(path))
    }

    pub fn at(path: PathBuf) -> KnownHosts {
        KnownHosts { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> CliResult<String> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(CliError(format!("reading {}: {e}", self.path.display()))),
        }
    }

    /// The keys pinned for `alias`, `None` on first use (see [`pinned_keys`]).
    pub fn pinned(&self, alias: &str) -> CliResult<Option<Vec<HostKey>>> {
        Ok(pinned_keys(&self.read()?, alias))
    }

    /// Pins `keys` for `alias` unless it already has an entry (trust on first use; a later
    /// console reading never replaces a pin behind the user's back).
    pub fn pin_if_absent(&self, alias: &str, keys: &[HostKey]) -> CliResult<Pinned> {
        let mut outcome = Pinned::Kept;
        self.update(|text| {
            if pinned_keys(text, alias).is_some() {
                return None;
            }
            outcome = Pinned::Added;
            Some(with_pinned(text, alias, keys))
        })?;
        Ok(outcome)
    }

    /// Replaces whatever is pinned for `alias` with `keys` (the user asked to re-pin).
    pub fn replace(&self, alias: &str, keys: &[HostKey]) -> CliResult<()> {
        self.update(|text| Some(with_pinned(text, alias, keys)))
    }

    /// Drops `alias` (its machine was deleted); whether it had an entry.
    pub fn forget(&self, alias: &str) -> CliResult<bool> {
        // Most deleted machines were never ssh'd into: leave no lock file behind for them.
        if self.pinned(alias)?.is_none() {
            return Ok(false);
        }
        let mut removed = false;
        self.update(|text| {
            pinned_keys(text, alias)?;
            removed = true;
            Some(without_alias(text, alias))
        })?;
        Ok(removed)
    }

    /// Read-modify-write under an exclusive lock on `known_hosts.lock` (two CLIs pinning two
    /// machines at once must not lose one of them); `change` returns the new text, or `None`
    /// to leave the file alone. The file is written 0600 through a temporary file renamed into
    /// place, in a 0700 directory, like the credentials.
    fn update(&self, change: impl FnOnce(&str) -> Option<String>) -> CliResult<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| CliError(format!("creating {}: {e}", dir.display())))?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        let _lock = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.path.with_extension("lock"))
            .and_then(|f| f.lock().map(|()| f))
            .map_err(|e| CliError(format!("locking {}: {e}", self.path.display())))?;
        let Some(text) = change(&self.read()?) else {
            return Ok(());
        };
        crate::session::write_private(&self.path, text.as_bytes())
            .map_err(|e| CliError(format!("writing {}: {e}", self.path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJwIznpwYqWaRweYUIPiYYX01dOgwYMlwENYMkUf7F3E";
    const ED25519_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK2XCGmU3i2x3fz+3u8R2njL0/A9A3SReA9/bhg0M8tp";
    const ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBNXhac9D5Rk1Qoqwr7Z+Xq5bSPU/fc/+c+gvbrPSdmn488iQ3HML0/0KG1gh5LcO11r/BabbcgzoANpuBeubjN0=";
    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDBiqo9PVZVv6KAIpcHIerFTBEw5tgM+BJrR0Sek7s6xL8Ba0ZaOo4Npq/5bs1vY0p0J5COcXiAeyTB0tId2/6qV8jGk7J0u96Xdv3FtcOJmhrfk3zeeAC0v58w9PqxEOpoOLAb18PWhAxAno2utgo7P64M04x2MBa0oi5zwJY9Tw==";
    const DSA: &str = "ssh-dss AAAAB3NzaC1kc3MAAACBAJNq3LLfBHbdpPadzX9uMNLSX3DJEIAp8tH8gjbbQHBHTsv58t2vBF9QtGi+vuKguWQvy1Ig2pkqv/fqQ+69ZAPCa5VkGI3Pf49XRtMJjY6xoA7WgS6Ilw/sJFlA06wrWPJTBla6VU9u7dkpSNGUr9DFTSYaoK/41S5rqUwqtcWJAAAAFQD+CS+yDqahfRvfgMPappBCQgsJ1wAAAIEAjidSSefCG0yq0V54NW4gnUnb1DZ36rV9t2pCc7RXS9+SyUHrFu+GqwXEZROM3enskD1HPx+LJvj+OFMibeiyD115l0j6ZlPd6nmxdlTu4rKNAST9Oy9AU71OLhsWL12WkSZEJsKvjI47pKKw3rAN52heak3dte6T/L6OjygIINsAAACAPAsx1F9ued1D2gSi7bA02C+w9RnCKrk4JY1HkIlL2uN1Y0ypuEbOU7HWhKo2K78PsUGldTkCdyQun3XPGZs/eMV0PKVWO3rGAL1l3Kx25dnzDC3b9If8i7Q8WzP8vm0TFBgLo/J4JjmKqdIawmqkD2srV/6lzQ6ee243ZqQqyaY=";

    fn key(line: &str) -> HostKey {
        HostKey::parse(line).unwrap()
    }

    fn block(lines: &[&str]) -> String {
        let mut s = format!("{BEGIN_MARKER}\r\n");
        for l in lines {
            s.push_str(l);
            s.push_str("\r\n");
        }
        s.push_str(END_MARKER);
        s.push_str("\r\n");
        s
    }

    #[test]
    fn key_lines_of_known_types_parse_and_drop_their_comment() {
        for line in [ED25519, ECDSA, RSA] {
            assert_eq!(key(&format!("{line} root@tiny")).to_string(), line);
            assert_eq!(key(line).to_string(), line);
        }
    }

    #[test]
    fn unknown_types_and_mangled_keys_are_not_keys() {
        assert_eq!(HostKey::parse(DSA), None);
        assert_eq!(HostKey::parse("ssh-ed25519"), None);
        assert_eq!(HostKey::parse("ssh-ed25519 AAAA"), None);
        assert_eq!(HostKey::parse(""), None);
        assert_eq!(HostKey::parse("Fingerprint: sha256:abc"), None);
        // A truncated blob, and an ed25519 blob under another type name.
        assert_eq!(HostKey::parse(&ED25519[..ED25519.len() - 6]), None);
        let relabelled = ED25519.replace("ssh-ed25519", "ssh-rsa");
        assert_eq!(HostKey::parse(&relabelled), None);
    }

    #[test]
    fn no_block_means_no_keys() {
        assert_eq!(last_key_block(""), None);
        assert_eq!(
            last_key_block("skygate-init: [2.1] started\nSKYGATE-READY hostname=x\n"),
            None
        );
        // An END without a BEGIN is not a block either.
        assert_eq!(last_key_block(&format!("{ED25519}\n{END_MARKER}\n")), None);
    }

    #[test]
    fn a_partial_block_is_not_read() {
        let partial = format!("{BEGIN_MARKER}\r\n{ED25519} root@tiny\r\n");
        assert_eq!(last_key_block(&partial), None);
        // ...and while a later block is being printed, the earlier complete one still counts.
        let earlier = block(&[ED25519]);
        assert_eq!(
            last_key_block(&format!("{earlier}{BEGIN_MARKER}\n{ED25519_B}\n")),
            Some(vec![key(ED25519)])
        );
    }

    #[test]
    fn the_last_of_several_blocks_wins() {
        let console = format!(
            "boot 1\n{}boot 2\n{}skygate-init: ready\n",
            block(&[ED25519, RSA]),
            block(&[&format!("{ED25519_B} root@tiny"), ECDSA])
        );
        assert_eq!(
            last_key_block(&console),
            Some(vec![key(ED25519_B), key(ECDSA)])
        );
        // A BEGIN that never ended is abandoned at the next BEGIN.
        let restarted = format!("{BEGIN_MARKER}\n{RSA}\n{}", block(&[ED25519]));
        assert_eq!(last_key_block(&restarted), Some(vec![key(ED25519)]));
    }

    #[test]
    fn garbage_inside_a_block_is_skipped() {
        let console = block(&[
            "[    3.141] random: crng init done",
            "Public key portion is:",
            &format!("{ED25519} root@tiny"),
            "Fingerprint: sha256:Jqn9ZO8d0Yk",
            DSA,
            &ED25519[..40],
            &format!("  {ED25519}  "),
            "",
        ]);
        assert_eq!(last_key_block(&console), Some(vec![key(ED25519)]));
        // A complete block with nothing usable is a block with no keys.
        assert_eq!(last_key_block(&block(&["garbage"])), Some(vec![]));
        // Markers after stray output on the same line still count.
        let prefixed = format!("x{BEGIN_MARKER}\n{ED25519}\nec2: {END_MARKER}\n");
        assert_eq!(last_key_block(&prefixed), Some(vec![key(ED25519)]));
    }

    #[test]
    fn pinning_adds_replaces_and_forgets_only_its_alias() {
        let a = alias("11111111-1111-1111-1111-111111111111");
        let b = alias("22222222-2222-2222-2222-222222222222");
        assert_eq!(a, "skygate-11111111-1111-1111-1111-111111111111");
        let start = format!("# pinned by skygate\n{b} {ED25519_B}\n");
        assert_eq!(pinned_keys(&start, &a), None);
        assert_eq!(pinned_keys(&start, &b), Some(vec![key(ED25519_B)]));

        let added = with_pinned(&start, &a, &[key(ED25519), key(ECDSA)]);
        assert_eq!(
            added,
            format!("# pinned by skygate\n{b} {ED25519_B}\n{a} {ED25519}\n{a} {ECDSA}\n")
        );
        assert_eq!(
            pinned_keys(&added, &a),
            Some(vec![key(ED25519), key(ECDSA)])
        );

        let replaced = with_pinned(&added, &a, &[key(RSA)]);
        assert_eq!(pinned_keys(&replaced, &a), Some(vec![key(RSA)]));
        assert_eq!(pinned_keys(&replaced, &b), Some(vec![key(ED25519_B)]));

        assert_eq!(without_alias(&replaced, &a), start);
        // An alias is a whole host pattern, never a prefix of another.
        assert_eq!(pinned_keys(&added, "skygate-1111"), None);
    }

    #[test]
    fn a_damaged_entry_still_counts_as_pinned() {
        let a = alias("m");
        assert_eq!(
            pinned_keys(&format!("{a} ssh-ed25519 AAAAbroken\n"), &a),
            Some(vec![])
        );
        // Lines we do not own are neither read nor removed.
        let foreign = format!("@revoked {a} {ED25519}\n{a},other {ED25519_B}\n");
        assert_eq!(pinned_keys(&foreign, &a), Some(vec![key(ED25519_B)]));
        assert_eq!(
            without_alias(&foreign, &a),
            format!("@revoked {a} {ED25519}\nother {ED25519_B}\n")
        );
    }

    #[test]
    fn the_file_is_pinned_on_first_use_only_and_kept_private() {
        let dir = tempfile::tempdir().unwrap();
        let known = KnownHosts::at(dir.path().join("skygate").join("known_hosts"));
        let a = alias("a");
        let b = alias("b");
        assert_eq!(known.pinned(&a).unwrap(), None);
        assert!(!known.forget(&a).unwrap());
        assert!(
            !known.path().parent().unwrap().exists(),
            "forgetting nothing writes nothing"
        );

        assert_eq!(
            known.pin_if_absent(&a, &[key(ED25519)]).unwrap(),
            Pinned::Added
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(known.path()), 0o600);
        assert_eq!(mode(known.path().parent().unwrap()), 0o700);

        // A later reading of the console does not replace the pin.
        assert_eq!(
            known.pin_if_absent(&a, &[key(ED25519_B)]).unwrap(),
            Pinned::Kept
        );
        assert_eq!(known.pinned(&a).unwrap(), Some(vec![key(ED25519)]));
        assert_eq!(known.pin_if_absent(&b, &[key(RSA)]).unwrap(), Pinned::Added);

        known.replace(&a, &[key(ED25519_B)]).unwrap();
        assert_eq!(known.pinned(&a).unwrap(), Some(vec![key(ED25519_B)]));
        assert!(known.forget(&a).unwrap());
        assert_eq!(known.pinned(&a).unwrap(), None);
        assert_eq!(
            std::fs::read_to_string(known.path()).unwrap(),
            format!("{b} {RSA}\n")
        );
        assert_eq!(mode(known.path()), 0o600);
    }
}
