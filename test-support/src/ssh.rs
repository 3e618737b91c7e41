//! SSH into a guest through its port forwarded to 127.0.0.1, with a throwaway key and no
//! host-key bookkeeping (the CLI tests check pinning themselves).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A new ed25519 key pair in `dir`: the private key's path and the public key line.
pub fn ssh_key(dir: &Path) -> (PathBuf, String) {
    let key = dir.join("id_ed25519");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "skygate-test", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen");
    assert!(made.success(), "ssh-keygen failed: {made}");
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
    (key, public.trim().to_owned())
}

/// Runs `command` as root over ssh to 127.0.0.1:`port`, retried until it succeeds within
/// `timeout` (a guest still booting refuses); returns its trimmed output.
pub fn ssh_run(key: &Path, port: u16, command: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut last_err = String::new();
    while Instant::now() < deadline {
        let out = Command::new("ssh")
            .arg("-i")
            .arg(key)
            .args(["-p", &port.to_string()])
            .args(["-o", "StrictHostKeyChecking=no"])
            .args(["-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=5"])
            .args(["-o", "LogLevel=ERROR", "root@127.0.0.1", command])
            .stdin(Stdio::null())
            .output()
            .expect("run ssh");
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).trim().to_owned();
        }
        last_err = String::from_utf8_lossy(&out.stderr).into_owned();
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("ssh to 127.0.0.1:{port} did not answer within {timeout:?}: {last_err}");
}

/// The guest's `hostname`, over ssh as [`ssh_run`].
pub fn ssh_hostname(key: &Path, port: u16, timeout: Duration) -> String {
    ssh_run(key, port, "hostname", timeout)
}
