//! The NoCloud seed of one machine: `meta-data` and `user-data` rendered by pure functions,
//! packed into an ISO 9660 image labelled `cidata` by `genisoimage`.
//!
//! Readers this must satisfy:
//! - cloud-init's NoCloud datasource (real cloud images).
//! - The tiny image's `/init` (images/tiny/init), a shell + awk parser: `meta-data` lines
//!   `key: value` with the value optionally wrapped in one pair of quotes (no escape
//!   processing); `user-data` lines `ssh_authorized_keys:` followed by `- item` lines,
//!   anywhere in the file, items optionally quoted. The tests run that parser itself.
//!
//! Every value is a YAML double-quoted scalar produced by [`yaml_quote`], so no hostname,
//! instance id or key can end its line or open new YAML structure. Hostnames must also be
//! valid RFC 1123 host names and keys one line of printable text (anything else is refused,
//! not escaped), so for every accepted value the quoting is a no-op apart from the quotes
//! themselves except for `"` and `\` inside a key's comment: those reach the tiny init as `\"`
//! and `\\` (it does not unescape); cloud-init reads them correctly.
//!
//! With tenant user data, `user-data` is a MIME multipart message (what cloud-init accepts for
//! combining parts, the format of `cloud-init devel make-mime`):
//! 1. the tenant's data, as `text/plain` so that cloud-init picks the handler from its first
//!    line (`#cloud-config`, `#!` script, `#include`, ...), base64-encoded (cloud-init decodes
//!    it). The encoding keeps the tenant's lines away from the tiny init's line scanner: a
//!    tenant `ssh_authorized_keys:` list directly followed by the MIME boundary line
//!    (`--boundary` looks like a `- item`) would otherwise add a bogus key line, and a script
//!    could contain anything. If the tenant's data is itself a MIME message (starts with a
//!    `Content-Type:` header) it is embedded verbatim as a nested part (MIME forbids base64
//!    on multiparts), its own headers becoming the part's headers;
//! 2. SkyGate's `#cloud-config` (hostname, keys) as `text/cloud-config` with
//!    `merge_how: list(append) + dict(no_replace, recurse_list)`, so our keys are appended to
//!    any `ssh_authorized_keys` the tenant listed instead of replacing them, and a tenant's own
//!    `hostname` wins. (cloud-init's merge rules are from its documentation; no cloud-init
//!    runs on this machine to check them.)
//!
//! The tiny init still finds our keys in the multipart form, since it scans every line and our
//! list is followed by `merge_how:` (never directly by a boundary). Limitations there: it does
//! not see keys the tenant put in their own (base64) cloud-config, only SkyGate's; with nested
//! MIME tenant data it scans the tenant's plain-text parts and may read a boundary line that
//! follows a tenant key list as one more (invalid, hence ignored by dropbear) key line.

use std::fmt::Write as _;
use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use tokio::process::Command;

use crate::model::is_valid_hostname;

/// Volume label NoCloud looks for.
pub const VOLUME_ID: &str = "cidata";
/// Mode of the seed ISO and the files in it: the tenant's user data (scripts, passwords,
/// tokens) is for the owner alone. QEMU, running as `libvirt-qemu`, still reads the ISO:
/// libvirt's dynamic ownership (qemu.conf `dynamic_ownership`, on by default) makes a
/// domain's disk files, this read-only CD-ROM included, owned by the QEMU user when the domain
/// starts (measured here: a root-owned 0600 seed became libvirt-qemu's at start and stayed so
/// after destroy). The overlays rely on the same thing: they are 0600 too (disks.rs), and QEMU
/// must write them. 0640 with a group would instead hard-code a user database detail
/// (`libvirt-qemu`'s group is `kvm` on Debian) for no gain.
const FILE_MODE: u32 = 0o600;
/// Wall-clock limit of one genisoimage run (it takes milliseconds for two small files).
const GENISOIMAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// What goes into a machine's seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedSpec {
    /// NoCloud `instance-id`; cloud-init reruns its per-instance modules when it changes.
    pub instance_id: String,
    /// Guest host name (RFC 1123).
    pub hostname: String,
    /// OpenSSH public keys (`ssh-ed25519 AAAA... comment`), one line each.
    pub ssh_keys: Vec<String>,
    /// The tenant's own user data, if any.
    pub user_data: Option<String>,
}

/// Errors building a seed.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The host name is not a valid RFC 1123 host name.
    #[error("invalid hostname {0:?}: letters, digits and '-' in dot-separated labels of 1-63 characters, 253 at most")]
    BadHostname(String),
    /// The instance id is empty or contains control characters.
    #[error("invalid instance id {0:?}")]
    BadInstanceId(String),
    /// A key breaks the key-line rule the API applies too ([`proto::ssh_key::check_key_line`]).
    #[error("ssh key #{index}: {rule}")]
    BadKey {
        /// Position in [`SeedSpec::ssh_keys`].
        index: usize,
        /// The rule it breaks.
        rule: proto::ssh_key::KeyLineError,
    },
    /// Writing the input files or the ISO failed.
    #[error("{path:?}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// genisoimage could not be started.
    #[error("cannot run genisoimage")]
    Spawn(#[source] std::io::Error),
    /// genisoimage failed.
    #[error("genisoimage failed ({status}): {stderr}")]
    Failed {
        /// Exit status.
        status: std::process::ExitStatus,
        /// Its stderr.
        stderr: String,
    },
    /// genisoimage ran too long and was killed.
    #[error("genisoimage timed out after {0:?}")]
    Timeout(Duration),
}

/// The two files of a rendered seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedSeed {
    /// Content of `meta-data`.
    pub meta_data: String,
    /// Content of `user-data`.
    pub user_data: String,
}

/// `s` as a YAML double-quoted scalar: `"` and `\` escaped, and every character that YAML
/// would not keep literally inside quotes (C0/C1 controls, DEL, line and paragraph separators
/// U+0085/U+2028/U+2029 that YAML 1.1 folds as line breaks, the BOM, non-characters) written
/// as an escape. The result is one line and parses back to exactly `s`.
pub fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{20}'..='\u{7e}' => out.push(ch),
            '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..
                if !matches!(ch, '\u{2028}' | '\u{2029}' | '\u{feff}') =>
            {
                out.push(ch)
            }
            _ if (ch as u32) <= 0xffff => {
                let _ = write!(out, "\\u{:04x}", ch as u32);
            }
            _ => {
                let _ = write!(out, "\\U{:08x}", ch as u32);
            }
        }
    }
    out.push('"');
    out
}

fn is_one_printable_line(s: &str) -> bool {
    !s.trim().is_empty() && !s.chars().any(char::is_control)
}

impl SeedSpec {
    fn validate(&self) -> Result<(), SeedError> {
        if !is_valid_hostname(&self.hostname) {
            return Err(SeedError::BadHostname(self.hostname.clone()));
        }
        if !is_one_printable_line(&self.instance_id) {
            return Err(SeedError::BadInstanceId(self.instance_id.clone()));
        }
        // The API checks keys with the same rule, so a key that fails here was never accepted
        // from a tenant: this is the last line of defence, not the first.
        if let Some((index, rule)) = self
            .ssh_keys
            .iter()
            .enumerate()
            .find_map(|(i, k)| proto::ssh_key::check_key_line(k).err().map(|r| (i, r)))
        {
            return Err(SeedError::BadKey { index, rule });
        }
        Ok(())
    }

    /// Renders `meta-data` and `user-data` (pure).
    pub fn render(&self) -> Result<RenderedSeed, SeedError> {
        self.validate()?;
        Ok(RenderedSeed {
            meta_data: self.render_meta_data(),
            user_data: self.render_user_data(),
        })
    }

    fn render_meta_data(&self) -> String {
        format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            yaml_quote(&self.instance_id),
            yaml_quote(&self.hostname)
        )
    }

    /// SkyGate's own `#cloud-config` document.
    fn cloud_config(&self, merge_how: bool) -> String {
        let mut out = String::from("#cloud-config\n");
        let _ = writeln!(out, "hostname: {}", yaml_quote(&self.hostname));
        if self.ssh_keys.is_empty() {
            out.push_str("ssh_authorized_keys: []\n");
        } else {
            out.push_str("ssh_authorized_keys:\n");
            for key in &self.ssh_keys {
                let _ = writeln!(out, "  - {}", yaml_quote(key.trim()));
            }
        }
        if merge_how {
            out.push_str(
                "merge_how:\n  - name: list\n    settings: [append]\n  \
                 - name: dict\n    settings: [no_replace, recurse_list]\n",
            );
        }
        out
    }

    fn render_user_data(&self) -> String {
        let Some(tenant) = &self.user_data else {
            return self.cloud_config(false);
        };
        let boundary = boundary_for(tenant);
        let mut out = format!(
            "Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n"
        );
        let _ = writeln!(out, "--{boundary}");
        if is_mime(tenant) {
            // A nested MIME message: its headers become this part's headers.
            out.push_str(tenant);
        } else {
            out.push_str(
                "Content-Type: text/plain; charset=\"utf-8\"\nMIME-Version: 1.0\n\
                 Content-Transfer-Encoding: base64\n\
                 Content-Disposition: attachment; filename=\"tenant-user-data\"\n\n",
            );
            let encoded = BASE64.encode(tenant.as_bytes());
            // RFC 2045: encoded lines of at most 76 characters.
            for line in encoded.as_bytes().chunks(76) {
                out.push_str(std::str::from_utf8(line).unwrap_or_default());
                out.push('\n');
            }
        }
        if !out.ends_with('\n') {
            out.push('\n');
        }
        let _ = writeln!(out, "--{boundary}");
        out.push_str(
            "Content-Type: text/cloud-config; charset=\"utf-8\"\nMIME-Version: 1.0\n\
             Content-Transfer-Encoding: 8bit\n\
             Content-Disposition: attachment; filename=\"skygate.cfg\"\n\n",
        );
        out.push_str(&self.cloud_config(true));
        let _ = writeln!(out, "--{boundary}--");
        out
    }
}

/// Whether the tenant's user data is itself a MIME message.
fn is_mime(data: &str) -> bool {
    data.get(..13)
        .is_some_and(|p| p.eq_ignore_ascii_case("content-type:"))
}

/// A MIME boundary that does not occur in `data`: derived from its hash (deterministic
/// output), re-derived in the practically impossible case that it does occur.
fn boundary_for(data: &str) -> String {
    let mut counter = 0u64;
    loop {
        let mut hasher = Sha256::new();
        hasher.update(data.as_bytes());
        hasher.update(counter.to_le_bytes());
        let boundary = format!("==skygate-{}==", &hex::encode(hasher.finalize())[..32]);
        if !data.contains(&boundary) {
            return boundary;
        }
        counter += 1;
    }
}

/// Writes a machine's seed: the manager's one way to make it, so the simulator can swap in
/// [`crate::fake_tools::FakeSeedWriter`] where genisoimage is not wanted. The real agent uses
/// [`GenIsoImage`].
#[async_trait::async_trait]
pub trait SeedWriter: Send + Sync + std::fmt::Debug {
    /// Renders `spec` (refusing what [`SeedSpec::render`] refuses) and writes the seed to
    /// `path`, whose parent exists.
    async fn write(&self, spec: &SeedSpec, path: &Path) -> Result<(), SeedError>;
}

/// [`SeedWriter`] building the NoCloud ISO with genisoimage ([`write_seed_iso`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct GenIsoImage;

#[async_trait::async_trait]
impl SeedWriter for GenIsoImage {
    async fn write(&self, spec: &SeedSpec, path: &Path) -> Result<(), SeedError> {
        write_seed_iso(spec, path).await
    }
}

/// Renders `spec` and writes the seed ISO to `path` (`genisoimage -volid cidata -joliet
/// -rock`), atomically: built as a temporary file next to `path`, made 0600, then renamed.
/// The parent of `path` must exist (see `DataDir::prepare_machine`).
pub async fn write_seed_iso(spec: &SeedSpec, path: &Path) -> Result<(), SeedError> {
    let rendered = spec.render()?;
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SeedError::Io { path, source }
    };
    // The inputs only need to be readable by genisoimage (us), so a private temp dir is fine.
    let inputs = tempfile::tempdir().map_err(io_err(Path::new("<temp dir>")))?;
    for (name, content) in [
        ("meta-data", &rendered.meta_data),
        ("user-data", &rendered.user_data),
    ] {
        let file = inputs.path().join(name);
        tokio::fs::write(&file, content)
            .await
            .map_err(io_err(&file))?;
        tokio::fs::set_permissions(&file, Permissions::from_mode(FILE_MODE))
            .await
            .map_err(io_err(&file))?;
    }

    let dir = path.parent().unwrap_or(Path::new("/"));
    let output = tempfile::Builder::new()
        .prefix(".seed-")
        .suffix(".partial")
        .tempfile_in(dir)
        .map_err(io_err(path))?;
    let child = Command::new("genisoimage")
        .arg("-quiet")
        .args(["-input-charset", "utf-8"])
        .arg("-output")
        .arg(output.path())
        .args([
            "-volid",
            VOLUME_ID,
            "-joliet",
            "-rock",
            "user-data",
            "meta-data",
        ])
        .current_dir(inputs.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(SeedError::Spawn)?;
    let result = tokio::time::timeout(GENISOIMAGE_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| SeedError::Timeout(GENISOIMAGE_TIMEOUT))?
        .map_err(SeedError::Spawn)?;
    if !result.status.success() {
        return Err(SeedError::Failed {
            status: result.status,
            stderr: String::from_utf8_lossy(&result.stderr).trim().to_owned(),
        });
    }
    tokio::fs::set_permissions(output.path(), Permissions::from_mode(FILE_MODE))
        .await
        .map_err(io_err(output.path()))?;
    output.persist(path).map_err(|e| SeedError::Io {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::process::Command as StdCommand;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGv6yQ1kq0yWcNSrBPzhTfV7u8V3Y3m alice@laptop";
    const KEY2: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 bob";

    fn spec() -> SeedSpec {
        SeedSpec {
            instance_id: "01890a5d-ac96-774b-bcce-b302099a8057".into(),
            hostname: "web-1".into(),
            ssh_keys: vec![KEY.into(), KEY2.into()],
            user_data: None,
        }
    }

    fn yaml(s: &str) -> serde_yaml::Value {
        serde_yaml::from_str(s).unwrap()
    }

    /// The tiny image's init script (images/tiny/init).
    fn tiny_init() -> String {
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/tiny/init"))
            .unwrap()
    }

    /// Runs the tiny init's own user-data awk program over `user_data`; returns the keys it
    /// would write to authorized_keys. Uses busybox awk (what the guest runs) when present.
    fn tiny_init_keys(user_data: &str) -> Vec<String> {
        let init = tiny_init();
        let start_marker = "awk -v q=\"'\" '\n";
        let start = init.find(start_marker).unwrap() + start_marker.len();
        let end = start + init[start..].find("\n    ' \"$SEED/user-data\"").unwrap();
        let program = &init[start..end];
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("user-data");
        std::fs::write(&file, user_data).unwrap();
        let busybox = StdCommand::new("busybox").arg("true").status().is_ok();
        let mut cmd = if busybox {
            let mut c = StdCommand::new("busybox");
            c.arg("awk");
            c
        } else {
            StdCommand::new("awk")
        };
        let out = cmd
            .args(["-v", "q='", program])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Runs the tiny init's `yaml_value` shell function on `meta_data`.
    fn tiny_init_meta(meta_data: &str, key: &str) -> String {
        let init = tiny_init();
        let start = init.find("yaml_value() {").unwrap();
        let end = start + init[start..].find("\n}\n").unwrap() + 3;
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("meta-data");
        std::fs::write(&file, meta_data).unwrap();
        let script = format!("{}\nyaml_value \"$1\" \"$2\"", &init[start..end]);
        let out = StdCommand::new("sh")
            .args(["-c", &script, "sh", key])
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim_end().to_owned()
    }

    #[test]
    fn meta_data_and_cloud_config_render() {
        let r = spec().render().unwrap();
        assert_eq!(
            r.meta_data,
            "instance-id: \"01890a5d-ac96-774b-bcce-b302099a8057\"\nlocal-hostname: \"web-1\"\n"
        );
        assert_eq!(
            r.user_data,
            format!(
                "#cloud-config\nhostname: \"web-1\"\nssh_authorized_keys:\n  - \"{KEY}\"\n  - \"{KEY2}\"\n"
            )
        );
        let meta = yaml(&r.meta_data);
        assert_eq!(meta["instance-id"], "01890a5d-ac96-774b-bcce-b302099a8057");
        assert_eq!(meta["local-hostname"], "web-1");
        let user = yaml(&r.user_data);
        assert_eq!(user["ssh_authorized_keys"][1], KEY2);
    }

    #[test]
    fn no_keys_is_an_empty_list() {
        let mut s = spec();
        s.ssh_keys.clear();
        let r = s.render().unwrap();
        assert_eq!(
            yaml(&r.user_data)["ssh_authorized_keys"],
            serde_yaml::Value::Sequence(vec![])
        );
        assert!(tiny_init_keys(&r.user_data).is_empty());
    }

    #[test]
    fn the_tiny_init_reads_what_we_write() {
        let r = spec().render().unwrap();
        assert_eq!(tiny_init_keys(&r.user_data), vec![KEY, KEY2]);
        assert_eq!(tiny_init_meta(&r.meta_data, "local-hostname"), "web-1");
        assert_eq!(
            tiny_init_meta(&r.meta_data, "instance-id"),
            "01890a5d-ac96-774b-bcce-b302099a8057"
        );
    }

    #[test]
    fn tenant_user_data_becomes_a_multipart_message() {
        let mut s = spec();
        s.user_data =
            Some("#!/bin/sh\necho 'ssh_authorized_keys: not yaml here'\ntouch /hello".into());
        let r = s.render().unwrap();
        let boundary = boundary_for(s.user_data.as_deref().unwrap());
        assert!(r.user_data.starts_with(&format!(
            "Content-Type: multipart/mixed; boundary=\"{boundary}\"\n"
        )));
        assert!(r.user_data.ends_with(&format!("--{boundary}--\n")));
        assert_eq!(r.user_data.matches(&format!("--{boundary}\n")).count(), 2);
        assert!(r.user_data.contains("Content-Type: text/cloud-config"));
        // The tenant's part decodes back to exactly their data.
        let theirs = r
            .user_data
            .split(&format!("--{boundary}"))
            .nth(1)
            .unwrap()
            .split_once("\n\n")
            .unwrap()
            .1;
        assert!(theirs.lines().all(|l| l.len() <= 76));
        let decoded = BASE64.decode(theirs.replace('\n', "")).unwrap();
        assert_eq!(Some(String::from_utf8(decoded).unwrap()), s.user_data);

        // Our part, cut out by its boundaries, is valid cloud-config with merge_how.
        let ours = r
            .user_data
            .split(&format!("--{boundary}"))
            .nth(2)
            .unwrap()
            .split_once("\n\n")
            .unwrap()
            .1;
        let cfg = yaml(ours);
        assert_eq!(cfg["ssh_authorized_keys"][0], KEY);
        assert_eq!(cfg["merge_how"][0]["settings"][0], "append");

        // The tiny init still finds exactly our keys (the script line is not a list start).
        assert_eq!(tiny_init_keys(&r.user_data), vec![KEY, KEY2]);
    }

    #[test]
    fn tenant_cloud_config_is_opaque_to_the_tiny_init_and_nested_mime_is_embedded() {
        let mut s = spec();
        s.ssh_keys = vec![KEY.into()];
        // A tenant key list right before a boundary: in plain text the tiny init would read
        // the boundary line as a key. Base64 keeps the tenant's part out of its sight.
        s.user_data =
            Some("#cloud-config\nssh_authorized_keys:\n  - ssh-ed25519 TENANT t\n".into());
        let r = s.render().unwrap();
        assert_eq!(tiny_init_keys(&r.user_data), vec![KEY]);

        let inner = "Content-Type: multipart/mixed; boundary=\"inner\"\nMIME-Version: 1.0\n\n\
                     --inner\nContent-Type: text/x-shellscript\n\n#!/bin/sh\ntrue\n--inner--\n";
        s.user_data = Some(inner.into());
        let r = s.render().unwrap();
        let boundary = boundary_for(inner);
        assert!(r
            .user_data
            .contains(&format!("--{boundary}\n{inner}--{boundary}\n")));
        assert_eq!(tiny_init_keys(&r.user_data), vec![KEY]);
    }

    #[test]
    fn hostile_values_are_refused_or_quoted() {
        // Hostnames: anything but RFC 1123 is refused outright.
        for bad in [
            "",
            "a\nlocal-hostname: evil",
            "x\"y",
            "-lead",
            "trail-",
            "a..b",
            "a b",
            "ünï",
            &"a".repeat(64),
            &format!("{}.a", "a.".repeat(126)),
        ] {
            let mut s = spec();
            s.hostname = bad.into();
            assert!(
                matches!(s.render(), Err(SeedError::BadHostname(_))),
                "{bad:?} accepted"
            );
        }
        // Keys and instance ids: control characters are refused.
        for bad in [
            "",
            "  ",
            "ssh-ed25519 AAA\nssh_authorized_keys: [x]",
            "a\rb",
            "a\u{85}b",
        ] {
            let mut s = spec();
            s.ssh_keys = vec![KEY.into(), bad.into()];
            assert!(
                matches!(s.render(), Err(SeedError::BadKey { index: 1, .. })),
                "{bad:?}"
            );
            let mut s = spec();
            s.instance_id = bad.into();
            assert!(
                matches!(s.render(), Err(SeedError::BadInstanceId(_))),
                "{bad:?}"
            );
        }
        // Printable but YAML-significant text stays a single string value.
        for tricky in [
            "\" ]  hostname: evil",
            "x\" , \"y",
            "'; - evil",
            "key # not a comment",
            "&anchor *alias !!binary",
            "{a: b}",
            "[x, y]",
            "- item",
            "back\\slash \\\" end",
            "\u{2028}sep\u{2029}\u{feff}",
        ] {
            let mut s = spec();
            s.instance_id = tricky.into();
            s.ssh_keys = vec![tricky.into()];
            if tricky.contains('\u{2028}') {
                // Quoting would keep it, but in authorized_keys a line separator splits the
                // line: the shared key rule refuses it, here as in the API.
                assert!(matches!(
                    s.render(),
                    Err(SeedError::BadKey { index: 0, .. })
                ));
                s.ssh_keys = vec![KEY.into()];
            }
            let r = s.render().unwrap();
            let meta = yaml(&r.meta_data);
            assert_eq!(meta["instance-id"], tricky, "{tricky:?}");
            assert_eq!(meta.as_mapping().unwrap().len(), 2);
            let user = yaml(&r.user_data);
            let key = if tricky.contains('\u{2028}') {
                KEY
            } else {
                tricky.trim()
            };
            assert_eq!(user["ssh_authorized_keys"][0], key);
            assert_eq!(user["hostname"], "web-1");
            assert_eq!(user.as_mapping().unwrap().len(), 2);
        }
    }

    proptest! {
        /// Any string, quoted, is one line and parses back to itself.
        #[test]
        fn yaml_quote_round_trips(s in any::<String>()) {
            let quoted = yaml_quote(&s);
            prop_assert!(!quoted.contains('\n') && !quoted.contains('\r'));
            let doc = format!("k: {quoted}\nother: 1\n");
            let v: serde_yaml::Value = serde_yaml::from_str(&doc).unwrap();
            prop_assert_eq!(v["k"].as_str(), Some(s.as_str()));
            prop_assert_eq!(v.as_mapping().unwrap().len(), 2);
        }

        /// Whatever the instance id, meta-data has exactly the two keys with our values.
        #[test]
        fn meta_data_cannot_be_injected(id in "\\PC{1,40}") {
            let mut s = spec();
            s.instance_id = id.clone();
            if let Ok(r) = s.render() {
                let meta: serde_yaml::Value = serde_yaml::from_str(&r.meta_data).unwrap();
                prop_assert_eq!(meta.as_mapping().unwrap().len(), 2);
                prop_assert_eq!(meta["instance-id"].as_str(), Some(id.as_str()));
                prop_assert_eq!(meta["local-hostname"].as_str(), Some("web-1"));
            }
        }
    }

    #[tokio::test]
    async fn seed_iso_has_label_files_and_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let iso = tmp.path().join("seed.iso");
        let mut s = spec();
        s.user_data = Some("#cloud-config\nruncmd: [true]\n".into());
        write_seed_iso(&s, &iso).await.unwrap();
        let rendered = s.render().unwrap();

        let bytes = std::fs::read(&iso).unwrap();
        // Primary volume descriptor at sector 16; volume identifier at offset 40, 32 bytes.
        assert_eq!(&bytes[32769..32774], b"CD001");
        assert_eq!(
            std::str::from_utf8(&bytes[32808..32840])
                .unwrap()
                .trim_end(),
            "cidata"
        );
        // Tenant user data: for root (and, once libvirt chowns it, QEMU) alone.
        let mode = std::fs::metadata(&iso).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let list = StdCommand::new("isoinfo")
            .args(["-R", "-f", "-i"])
            .arg(&iso)
            .output()
            .unwrap();
        let mut names: Vec<_> = String::from_utf8(list.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        names.sort();
        assert_eq!(names, vec!["/meta-data", "/user-data"]);
        for (name, want) in [
            ("/meta-data", &rendered.meta_data),
            ("/user-data", &rendered.user_data),
        ] {
            let out = StdCommand::new("isoinfo")
                .args(["-R", "-x", name, "-i"])
                .arg(&iso)
                .output()
                .unwrap();
            assert_eq!(&String::from_utf8(out.stdout).unwrap(), want, "{name}");
        }
        // Only the ISO is left in the directory (no temp files).
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);

        // Rewriting replaces it atomically.
        s.hostname = "web-2".into();
        write_seed_iso(&s, &iso).await.unwrap();
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
        let mode = std::fs::metadata(&iso).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "a rewritten seed is as private");
    }

    #[tokio::test]
    async fn invalid_spec_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let iso = tmp.path().join("seed.iso");
        let mut s = spec();
        s.hostname = "bad host".into();
        assert!(write_seed_iso(&s, &iso).await.is_err());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
