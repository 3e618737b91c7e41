//! The control-plane binary as its own process (what operators run), for tests that need to see
//! the process from outside: its memory, its descriptors, its exit.

use reqwest::StatusCode;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_skygate-control-plane");

/// A port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `skygate-control-plane serve` on a free port; killed by pid when dropped, however the test
/// ends. Its log goes to `server.log` in the data dir's parent.
pub struct ServerProcess {
    pub child: Child,
    pub base: String,
    pub addr: std::net::SocketAddr,
    pub log: PathBuf,
}

impl ServerProcess {
    /// Starts `serve` over `data_dir` with `extra` flags, through `wrapper` (e.g. `prlimit`)
    /// when given, and waits until it is ready.
    pub async fn start(data_dir: &Path, wrapper: &[&str], extra: &[&str]) -> Self {
        let port = free_port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        std::fs::create_dir_all(data_dir).unwrap();
        let log = data_dir.parent().unwrap_or(data_dir).join("server.log");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = command
            .args([
                "serve",
                "--http-addr",
                &addr.to_string(),
                "--log-format",
                "json",
            ])
            .args(extra)
            .env("SKYGATE_DATA_DIR", data_dir)
            // The full access log, as an operator enables it (successful answers are debug).
            .env("RUST_LOG", "info,skygate::access=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let server = Self {
            child,
            base: format!("http://{addr}"),
            addr,
            log,
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        for _ in 0..100 {
            if let Ok(r) = client.get(format!("{}/readyz", self.base)).send().await {
                if r.status() == StatusCode::OK {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "control plane did not become ready: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory now, in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// Open descriptors now.
    pub fn open_descriptors(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
