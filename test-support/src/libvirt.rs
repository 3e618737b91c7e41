//! The system libvirtd the tests' domains live in: asking it, starting it without systemd
//! (HOST-NOTES.md), and killing it for fault tests.

pub use nix::sys::signal::Signal;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The libvirt connection every test uses.
pub const URI: &str = "qemu:///system";

/// `virsh -c qemu:///system ARGS`.
pub fn virsh(args: &[&str]) -> std::io::Result<Output> {
    Command::new("virsh").arg("-c").arg(URI).args(args).output()
}

/// Whether libvirtd answers a version query.
pub fn libvirtd_answers() -> bool {
    virsh(&["version"]).is_ok_and(|o| o.status.success())
}

/// Starts virtlogd and libvirtd unless libvirtd already answers, then waits for it.
pub fn ensure_libvirtd() {
    if let Err(why) = start_libvirtd() {
        panic!("{why}");
    }
}

/// [`ensure_libvirtd`] without panicking (for cleanup in `Drop`): why libvirtd does not
/// answer after 30 s, if it does not.
pub fn start_libvirtd() -> Result<(), String> {
    if libvirtd_answers() {
        return Ok(());
    }
    for dir in ["/var/log/libvirt", "/run/libvirt"] {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {dir}: {e}"))?;
    }
    // `-d` daemonises; an already-running virtlogd makes the first fail harmlessly.
    let _ = Command::new("virtlogd")
        .arg("-d")
        .stderr(Stdio::null())
        .status();
    let status = Command::new("libvirtd")
        .arg("-d")
        .status()
        .map_err(|e| format!("libvirtd: {e} (run scripts/install-deps.sh --host)"))?;
    if !status.success() {
        return Err(format!("libvirtd -d failed: {status}"));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !libvirtd_answers() {
        if Instant::now() >= deadline {
            return Err("libvirtd did not answer within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// kill -9 of the system libvirtd, waiting until it is gone (its domains' QEMU processes live
/// on). [`ensure_libvirtd`] brings it back.
pub fn kill_libvirtd() {
    stop_libvirtd(Signal::SIGKILL);
}

/// Sends `signal` to the system libvirtd and waits (30 s at most: a graceful stop closes its
/// connections first) until it has exited.
pub fn stop_libvirtd(signal: Signal) {
    let libvirtd = nix::unistd::Pid::from_raw(libvirtd_pid().expect("libvirtd is not running"));
    nix::sys::signal::kill(libvirtd, signal).expect("signal libvirtd");
    let deadline = Instant::now() + Duration::from_secs(30);
    while nix::sys::signal::kill(libvirtd, None).is_ok() {
        assert!(Instant::now() < deadline, "libvirtd survived {signal}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A killed libvirtd leaves its pid file behind; the next one refuses to start over it.
    let _ = std::fs::remove_file("/run/libvirtd.pid");
}

/// libvirtd's pid: its pid file, else the process named libvirtd (a pid file can be missing,
/// e.g. removed by a test that killed an earlier libvirtd).
pub fn libvirtd_pid() -> Option<i32> {
    let from_file = std::fs::read_to_string("/run/libvirtd.pid")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .filter(|pid| nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), None).is_ok());
    from_file.or_else(|| {
        std::fs::read_dir("/proc")
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim() == "libvirtd")
            })
    })
}
