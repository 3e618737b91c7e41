//! Running the system `ssh` for `skygate machines ssh`: the command line that makes ssh check
//! the machine's pinned host keys (and nothing else), and one clear line when it fails.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::session::{fail, CliError, CliResult};

/// Where and how to connect.
#[derive(Debug)]
pub struct Target<'a> {
    /// `skygate-<machine id>`: what ssh looks the host key up by, instead of `[ip]:port`.
    pub alias: &'a str,
    pub known_hosts: &'a Path,
    pub host_ip: &'a str,
    pub port: u16,
    pub user: &'a str,
    pub identity: Option<&'a Path>,
}

/// `ssh`'s arguments: ours first (ssh keeps the first value it sees for an option, so the
/// user's extra arguments cannot turn host-key checking off by accident), then the
/// destination, then the user's arguments (more options, then the remote command).
///
/// - `HostKeyAlias` + `UserKnownHostsFile`: the key is looked up by machine, in the CLI's
///   file, so a port reused by a later machine never matches an old entry.
/// - `StrictHostKeyChecking=yes`: never prompt (works without a terminal) and never add keys.
/// - `GlobalKnownHostsFile=/dev/null`, `CheckHostIP=no`, `UpdateHostKeys=no`: nothing but the
///   pinned entry is consulted, and ssh never edits the CLI's file.
pub fn args(target: &Target<'_>, extra: &[String]) -> CliResult<Vec<OsString>> {
    let mut out: Vec<OsString> = Vec::new();
    let mut opt = |value: String| {
        out.push("-o".into());
        out.push(value.into());
    };
    opt(format!("HostKeyAlias={}", target.alias));
    opt(format!(
        "UserKnownHostsFile={}",
        option_path(target.known_hosts)?
    ));
    opt("StrictHostKeyChecking=yes".into());
    opt("GlobalKnownHostsFile=/dev/null".into());
    opt("CheckHostIP=no".into());
    opt("UpdateHostKeys=no".into());
    out.push("-p".into());
    out.push(target.port.to_string().into());
    if let Some(identity) = target.identity {
        out.push("-i".into());
        out.push(identity.as_os_str().to_owned());
    }
    out.push(format!("{}@{}", target.user, target.host_ip).into());
    out.extend(extra.iter().map(OsString::from));
    Ok(out)
}

/// A path as the value of an ssh `-o` option: double-quoted (ssh splits values on spaces) with
/// `%` doubled (ssh expands `%` tokens in file names). Paths ssh could not be told about
/// faithfully are refused rather than passed on mangled.
fn option_path(path: &Path) -> CliResult<String> {
    let Some(text) = path.to_str() else {
        return fail(format!(
            "{}: not UTF-8, ssh cannot be given it",
            path.display()
        ));
    };
    if text.contains(['"', '\n', '\r']) || text.contains("${") {
        return fail(format!(
            "{text}: ssh cannot be given a path with quotes, newlines or ${{ (set SKYGATE_CONFIG_DIR)"
        ));
    }
    Ok(format!("\"{}\"", text.replace('%', "%%")))
}

/// How much of ssh's stderr is kept to explain a failure (it is all shown as it comes).
const STDERR_KEPT: usize = 64 << 10;

/// Runs ssh with the terminal (stdin, stdout) handed over, copying its stderr through to ours
/// as it comes and keeping the tail to tell a host-key refusal from other failures.
pub fn run(args: &[OsString]) -> CliResult<(ExitStatus, String)> {
    let mut child = Command::new("ssh")
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CliError(format!("cannot run ssh: {e}")))?;
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(mut pipe) = child.stderr.take() {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut buf = [0u8; 4096];
            let mut stderr = std::io::stderr();
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let _ = stderr.write_all(&buf[..n]);
                        kept.extend_from_slice(&buf[..n]);
                        if kept.len() > STDERR_KEPT {
                            kept.drain(..kept.len() - STDERR_KEPT);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = tx.send(kept);
        });
    }
    let status = child
        .wait()
        .map_err(|e| CliError(format!("waiting for ssh: {e}")))?;
    // The pipe ends when ssh does, unless something it left in the background (`ssh -f`)
    // still holds it: do not wait for that.
    let kept = rx.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
    Ok((status, String::from_utf8_lossy(&kept).into_owned()))
}

/// The one line for an ssh that failed: a host-key refusal names the machine and the pinned
/// entry; anything else just says how ssh ended (its own messages are already on stderr).
pub fn failure_line(
    status: ExitStatus,
    stderr: &str,
    machine: &str,
    alias: &str,
    known_hosts: &Path,
) -> String {
    let host_key_refused = stderr.contains("Host key verification failed")
        || stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED");
    match status.code() {
        Some(255) if host_key_refused => format!(
            "the SSH host key of machine {machine} did not match the one pinned for it \
             ({alias} in {}); if the machine has new keys (an image that makes new ones at \
             every boot, a rebuilt disk), `skygate machines ssh {machine} --repin-host-keys` \
             pins the ones it last printed on its console",
            known_hosts.display()
        ),
        Some(255) => format!(
            "ssh exited with 255 (it could not connect or log in; its messages are above; the \
             pinned host keys are under {alias} in {})",
            known_hosts.display()
        ),
        _ => format!("ssh exited with {status}"),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn target<'a>(known_hosts: &'a Path, identity: Option<&'a Path>) -> Target<'a> {
        Target {
            alias: "skygate-m1",
            known_hosts,
            host_ip: "127.0.0.1",
            port: 21000,
            user: "root",
            identity,
        }
    }

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    #[test]
    fn ssh_checks_the_pinned_alias_first_then_takes_the_users_arguments() {
        let kh = Path::new("/home/ann/.config/skygate/known_hosts");
        let key = Path::new("/home/ann/.ssh/id");
        let extra = [
            "-o".to_owned(),
            "LogLevel=ERROR".to_owned(),
            "hostname".to_owned(),
        ];
        assert_eq!(
            strings(args(&target(kh, Some(key)), &extra).unwrap()),
            [
                "-o",
                "HostKeyAlias=skygate-m1",
                "-o",
                "UserKnownHostsFile=\"/home/ann/.config/skygate/known_hosts\"",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "CheckHostIP=no",
                "-o",
                "UpdateHostKeys=no",
                "-p",
                "21000",
                "-i",
                "/home/ann/.ssh/id",
                "root@127.0.0.1",
                "-o",
                "LogLevel=ERROR",
                "hostname",
            ]
        );
        let no_key = strings(args(&target(kh, None), &[]).unwrap());
        assert!(!no_key.contains(&"-i".to_owned()));
        assert_eq!(no_key.last().unwrap(), "root@127.0.0.1");
    }

    #[test]
    fn the_known_hosts_path_survives_ssh_option_parsing() {
        let arg = |p: &str| strings(args(&target(Path::new(p), None), &[]).unwrap())[3].clone();
        assert_eq!(
            arg("/home/a b/100%/known_hosts"),
            "UserKnownHostsFile=\"/home/a b/100%%/known_hosts\""
        );
        for bad in ["/x\"y/known_hosts", "/${HOME}/known_hosts", "/a\nb"] {
            assert!(args(&target(Path::new(bad), None), &[]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_host_key_refusal_names_the_machine_and_its_pin() {
        let kh = Path::new("/c/known_hosts");
        let refused =
            "@@@@@@@@@@@\r\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\r\n\
                       ...\r\nHost key verification failed.\r\n";
        let line = failure_line(
            ExitStatus::from_raw(255 << 8),
            refused,
            "web-1",
            "skygate-m1",
            kh,
        );
        assert!(
            line.starts_with(
                "the SSH host key of machine web-1 did not match the one pinned for it \
                 (skygate-m1 in /c/known_hosts)"
            ),
            "{line}"
        );
        assert!(!line.contains('\n'));

        let refused_elsewhere = failure_line(
            ExitStatus::from_raw(255 << 8),
            "ssh: connect to host 127.0.0.1 port 21000: Connection refused\r\n",
            "web-1",
            "skygate-m1",
            kh,
        );
        assert!(
            refused_elsewhere.starts_with("ssh exited with 255 (it could not connect"),
            "{refused_elsewhere}"
        );
        // The remote command's own failure is not ssh's.
        assert_eq!(
            failure_line(
                ExitStatus::from_raw(1 << 8),
                "Host key verification failed.",
                "web-1",
                "skygate-m1",
                kh
            ),
            "ssh exited with exit status: 1"
        );
    }
}
