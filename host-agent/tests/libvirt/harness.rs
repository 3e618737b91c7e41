//! The harness of the real-libvirt tests: libvirtd started when it is not running, the agent
//! binary run as a child process on a port it picks, a domain prefix and data directory per
//! test, and cleanup (agent killed by pid, our domains destroyed and undefined, files
//! removed) even when the test fails.

// A harness step that fails is the test failing: panicking with the reason is the point.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use proto::agent::v1 as pb;
use proto::agent::v1::host_agent_client::HostAgentClient;
use proto::bearer::BearerToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub use skygate_test_support::libvirt::{ensure_libvirtd, start_libvirtd, virsh, URI};
use skygate_test_support::process::LoggedChild;
pub use skygate_test_support::ssh::{ssh_hostname, ssh_key, ssh_run};
use skygate_test_support::tiny_image_dir;

/// One libvirt test at a time in this process: they share libvirtd (one restarts it) and
/// two TCG guests at once would starve the 2-core CI machine. nextest (one process per test)
/// serialises them through the `libvirt` test group in .config/nextest.toml.
static SERIAL: Mutex<()> = Mutex::new(());

/// The tiny image built by images/tiny/build.sh (scripts/test.sh builds it).
pub fn tiny_image() -> pb::ImageSource {
    skygate_test_support::tiny_image_source()
}

pub type Client = HostAgentClient<InterceptedService<Channel, BearerToken>>;

/// A running agent process and what it logged.
pub struct Agent {
    process: LoggedChild,
    pub addr: SocketAddr,
}

impl Agent {
    /// Waits for a log line containing `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        self.process.wait_for_log(needle, timeout)
    }

    /// kill -9, then reap.
    pub fn kill9(mut self) {
        self.process.kill9();
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
        .env_remove("SKYGATE_AGENT_TEST_PAUSE_BEFORE");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut agent = Agent {
            process: LoggedChild::spawn(cmd),
            addr: "127.0.0.1:0".parse().expect("addr"),
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
            disk_generation: 0,
            disk_must_exist: false,
        }
    }
}

impl Drop for Fixture {
    /// Never panics (a panic while unwinding aborts the test binary): every step is best
    /// effort. A test that failed with libvirtd down gets it back first, so its domains can be
    /// found and the next test has a daemon.
    fn drop(&mut self) {
        let _ = start_libvirtd();
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

/// The pid of a running domain's QEMU, from libvirt's pid file.
pub fn qemu_pid(domain: &str) -> i32 {
    let path = format!("/run/libvirt/qemu/{domain}.pid");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .parse()
        .expect("pid")
}
