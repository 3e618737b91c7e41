//! What SkyGate's process-level test harnesses share (the control plane's e2e suite, the
//! agent's libvirt suite, the CLI tests): the workspace's binaries, the system libvirtd,
//! child processes whose logs a test waits on, SSH into guests through forwarded ports, and
//! bounded waits that say what they waited for.

// A test harness reports by panicking.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod libvirt;
pub mod process;
pub mod ssh;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A binary of the workspace, built beside the running test (`target/<profile>/NAME`);
/// `package` names what builds it when it is missing.
pub fn workspace_bin(name: &str, package: &str) -> PathBuf {
    // target/<profile>/deps/<test>-<hash> → target/<profile>
    let exe = std::env::current_exe().expect("test exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        bin.is_file(),
        "{bin:?} is missing: build it first (cargo build -p {package}; scripts/test.sh and \
         `cargo nextest run --workspace` do)"
    );
    bin
}

/// Polls `f` every 100 ms until it holds or `timeout` passes (then panics naming `what`).
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where the tiny image's image.json is (`SKYGATE_TINY_IMAGE_JSON`; images/tiny/build.sh
/// writes it, scripts/test.sh runs that).
pub fn tiny_image_json() -> String {
    std::env::var("SKYGATE_TINY_IMAGE_JSON")
        .unwrap_or_else(|_| "/var/lib/skygate-images/tiny/image.json".into())
}

/// The directory of the tiny image's files: an agent's `--image-dir`.
pub fn tiny_image_dir() -> PathBuf {
    Path::new(&tiny_image_json())
        .parent()
        .expect("image.json has a directory")
        .to_path_buf()
}

/// The tiny image as an agent's `ImageSource` (direct kernel boot from its `file://` files),
/// for tests that talk to an agent without a control plane.
pub fn tiny_image_source() -> proto::agent::v1::ImageSource {
    use proto::agent::v1 as pb;
    let path = tiny_image_json();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("{path}: {e}; build it with images/tiny/build.sh (scripts/test.sh does)")
    });
    let image: serde_json::Value = serde_json::from_str(&text).expect("image.json is JSON");
    let field = |k: &str| image["boot"][k].as_str().unwrap_or_default().to_owned();
    pb::ImageSource {
        name: "tiny".into(),
        url: String::new(),
        format: pb::DiskFormat::Kernel as i32,
        sha256: String::new(),
        kernel_boot: Some(pb::KernelBoot {
            kernel_url: field("kernel"),
            kernel_sha256: field("kernel_sha256"),
            initrd_url: field("initrd"),
            initrd_sha256: field("initrd_sha256"),
            cmdline: field("cmdline"),
        }),
    }
}
