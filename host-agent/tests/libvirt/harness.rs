//! The harness of the real-libvirt tests: libvirtd started when it is not running, the agent
//! binary run as a child process on a port it picks, a domain prefix and data directory per
//! test, and cleanup (agent killed by pid, our domains destroyed and undefined, files
//! removed) even when the test fails.

// A harness step that fails is the test failing: panicking with the reason is the point.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use proto::agent::v1 as pb;
use proto::agent::v1::host_agent_client::HostAgentClient;
use proto::bearer::BearerToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const URI: &str = "qemu:///system";

/// One libvirt test at a time in this process: they share libvirtd (one restarts it) and
/// two TCG guests at once would starve the 2-core CI machine. nextest (one process per test)
/// serialises them through the `libvirt` test group in .config/nextest.toml.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn virsh(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("virsh").arg("-c").arg(URI).args(args).output()
}

fn libvirtd_answers() -> bool {
    virsh(&["version"]).is_ok_and(|o| o.status.success())
}

/// Starts virtlogd and libvirtd (without systemd, as HOST-NOTES.md describes) unless
/// libvirtd already answers, then waits for it.
pub fn ensure_libvirtd() {
    if libvirtd_answers() {
        return;
    }
    std::fs::create_dir_all("/var/log/libvirt").expect("create /var/log/libvirt");
    std::fs::create_dir_all("/run/libvirt").expect("create /run/libvirt");
    // `-d` daemonises; an already-running virtlogd makes the first fail harmlessly.
    let _ = Command::new("virtlogd")
        .arg("-d")
        .stderr(Stdio::null())
        .status();
    let status = Command::new("libvirtd")
        .arg("-d")
        .status()
        .expect("libvirtd is not installed: run scripts/install-host-deps.sh");
    assert!(status.success(), "libvirtd -d failed: {status}");
    wait_until(
        Duration::from_secs(30),
        "libvirtd to answer",
        libvirtd_answers,
    );
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

/// Where the tiny image's image.json is (`SKYGATE_TINY_IMAGE_JSON`).
pub fn tiny_image_json() -> String {
    std::env::var("SKYGATE_TINY_IMAGE_JSON")
        .unwrap_or_else(|_| "/var/lib/skygate-images/tiny/image.json".into())
}

/// The directory of the tiny image's files: the agent's `--image-dir`.
pub fn tiny_image_dir() -> PathBuf {
    Path::new(&tiny_image_json())
        .parent()
        .expect("image.json has a directory")
        .to_path_buf()
}

/// The tiny image built by images/tiny/build.sh (scripts/test.sh builds it).
pub fn tiny_image() -> pb::ImageSource {
    let path = tiny_image_json();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("{path}: {e}; build it with images/tiny/build.sh (scripts/test.sh does)")
    });
    let json: serde_json::Value = serde_json::from_str(&text).expect("image.json is JSON");
    let boot = &json["boot"];
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    pb::ImageSource {
        name: "tiny".into(),
        url: String::new(),
        format: pb::DiskFormat::Kernel as i32,
        sha256: String::new(),
        kernel_boot: Some(pb::KernelBoot {
            kernel_url: s(&boot["kernel"]),
            kernel_sha256: s(&boot["kernel_sha256"]),
            initrd_url: s(&boot["initrd"]),
            initrd_sha256: s(&boot["initrd_sha256"]),
            cmdline: s(&boot["cmdline"]),
        }),
    }
}

pub type Client = HostAgentClient<InterceptedService<Channel, BearerToken>>;

/// A running agent process and what it logged.
pub struct Agent {
    child: Child,
    pub addr: SocketAddr,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl Agent {
    /// Waits for a log line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let (lock, cvar) = &*self.lines;
        let deadline = Instant::now() + timeout;
        let mut lines = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(l) = lines.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "agent never logged {needle:?}; it logged:\n{}",
                lines.join("\n")
            );
            lines = cvar
                .wait_timeout(lines, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// kill -9, then reap.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test's agent setup: data dir, prefix, token; cleans up everything with its prefix.
pub struct Fixture {
    _serial: MutexGuard<'static, ()>,
    pub tmp: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub prefix: String,
    token: String,
}

impl Fixture {
    pub fn new() -> Self {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        ensure_libvirtd();
        // Under /var/tmp, not /tmp: QEMU (user libvirt-qemu) must traverse every ancestor.
        let tmp = tempfile::Builder::new()
            .prefix("skygate-agent-test-")
            .tempdir_in("/var/tmp")
            .expect("temp dir");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod temp dir");
        let tag = uuid::Uuid::new_v4().simple().to_string();
        Fixture {
            _serial: serial,
            data_dir: tmp.path().join("data"),
            tmp,
            prefix: format!("skygate-test-{}-", &tag[..8]),
            token: format!("token-{tag}"),
        }
    }

    /// Starts the agent with extra environment variables; waits until it listens.
    pub fn start_agent(&self, env: &[(&str, &str)]) -> Agent {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_skygate-host-agent"));
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--log-json",
            "--hypervisor",
            "auto",
        ])
        .arg("--data-dir")
        .arg(&self.data_dir)
        .args(["--domain-prefix", &self.prefix, "--libvirt-uri", URI])
        .arg("--image-dir")
        .arg(tiny_image_dir())
        .args(["--graceful-timeout-secs", "3", "--poll-interval-ms", "1000"])
        .env("SKYGATE_AGENT_TOKEN", &self.token)
        .env_remove("SKYGATE_AGENT_TEST_PAUSE_BEFORE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn skygate-host-agent");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new((Mutex::new(Vec::<String>::new()), Condvar::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let (lock, cvar) = &*sink;
                lock.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                cvar.notify_all();
            }
        });
        let mut agent = Agent {
            child,
            addr: "127.0.0.1:0".parse().expect("addr"),
            lines,
        };
        let line = agent.wait_for_log("skygate-host-agent listening", Duration::from_secs(60));
        let json: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
        agent.addr = json["fields"]["listen"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no listen address in {line}"));
        agent
    }

    pub async fn client(&self, agent: &Agent) -> Client {
        let channel = Channel::from_shared(format!("http://{}", agent.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect to agent");
        HostAgentClient::with_interceptor(channel, BearerToken::new(&self.token).expect("token"))
    }

    /// Names of the libvirt domains with this test's prefix.
    pub fn domains(&self) -> Vec<String> {
        let out = virsh(&["list", "--all", "--name"]).expect("virsh list");
        assert!(
            out.status.success(),
            "virsh list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.ours(&out.stdout)
    }

    fn ours(&self, listing: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(listing)
            .lines()
            .map(str::trim)
            .filter(|n| n.starts_with(&self.prefix))
            .map(str::to_owned)
            .collect()
    }

    pub fn machine_dir(&self, id: uuid::Uuid) -> PathBuf {
        self.data_dir.join("machines").join(id.to_string())
    }

    pub fn spec(
        &self,
        id: uuid::Uuid,
        generation: u64,
        hostname: &str,
        key: Option<&str>,
        power: pb::PowerState,
    ) -> pb::MachineSpec {
        pb::MachineSpec {
            machine_id: id.to_string(),
            generation,
            hostname: hostname.into(),
            vcpus: 1,
            memory_mib: 256,
            disk_gib: 1,
            image: Some(tiny_image()),
            ssh_authorized_keys: key.map(|k| vec![k.to_owned()]).unwrap_or_default(),
            user_data: None,
            desired_power: power as i32,
        }
    }
}

impl Drop for Fixture {
    /// Never panics (a panic while unwinding aborts the test binary): every step is best
    /// effort. A test that failed with libvirtd down gets it back first, so its domains can be
    /// found and the next test has a daemon.
    fn drop(&mut self) {
        if !libvirtd_answers() {
            let _ = Command::new("virtlogd")
                .arg("-d")
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("libvirtd").arg("-d").status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while !libvirtd_answers() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let listing = virsh(&["list", "--all", "--name"])
            .map(|o| o.stdout)
            .unwrap_or_default();
        // Only ever domains with this test's own prefix.
        for name in self.ours(&listing) {
            let _ = virsh(&["destroy", &name]);
            let _ = virsh(&["undefine", &name]);
        }
    }
}

/// An ed25519 key pair in `dir`: (private key path, public key line).
pub fn ssh_key(dir: &Path) -> (PathBuf, String) {
    let key = dir.join("id_ed25519");
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "agent-test", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen");
    assert!(status.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
    (key, public.trim().to_owned())
}

/// Runs `hostname` over ssh through the forwarded port until it answers; returns the answer.
pub fn ssh_hostname(key: &Path, port: u32, timeout: Duration) -> String {
    ssh_run(key, port, "hostname", timeout)
}

/// Runs `command` as root over ssh through the forwarded port, retrying until it succeeds;
/// returns its output.
pub fn ssh_run(key: &Path, port: u32, command: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut last_err = String::new();
    while Instant::now() < deadline {
        let out = Command::new("ssh")
            .arg("-i")
            .arg(key)
            .args(["-p", &port.to_string()])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=5",
                "-o",
                "LogLevel=ERROR",
            ])
            .args(["root@127.0.0.1", command])
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

/// The pid of a running domain's QEMU, from libvirt's pid file.
pub fn qemu_pid(domain: &str) -> i32 {
    let path = format!("/run/libvirt/qemu/{domain}.pid");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .parse()
        .expect("pid")
}
