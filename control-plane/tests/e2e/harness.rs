//! A real SkyGate cluster on this machine for end-to-end tests: the control-plane binary
//! (SQLite in a temporary directory) and host-agent binaries registered with it, each agent
//! with its own data dir, port range and domain prefix, all on 127.0.0.1. Processes are
//! stopped by pid and every domain with the cluster's prefix is destroyed and undefined when
//! the cluster is dropped, also after a failure.

// A harness step that fails is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use skygate_test_support::libvirt::virsh;
pub use skygate_test_support::libvirt::{ensure_libvirtd, kill_libvirtd};
use skygate_test_support::process::LoggedChild;
pub use skygate_test_support::ssh::{ssh_hostname, ssh_key, ssh_run};
use skygate_test_support::{tiny_image_json, workspace_bin};

pub const ADMIN_PASSWORD: &str = "an e2e admin passphrase";

/// One cluster at a time per process (they boot TCG guests); nextest runs these tests one at a
/// time through the `libvirt` test group.
static SERIAL: Mutex<()> = Mutex::new(());

/// A child process and the lines it wrote to stderr.
pub struct Proc(LoggedChild);

impl Proc {
    fn spawn(cmd: Command) -> Proc {
        Proc(LoggedChild::spawn(cmd))
    }

    /// The first JSON log line whose message contains `needle`.
    fn wait_for_log(&self, needle: &str, timeout: Duration) -> Value {
        let line = self.0.wait_for_log(needle, timeout);
        serde_json::from_str(&line).unwrap_or_else(|_| json!({ "raw": line }))
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        self.0.kill9();
    }
}

/// Capacity an agent offers (no overcommit, so the numbers are what the scheduler sees).
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

/// A control plane, its agents and an HTTP client.
pub struct Cluster {
    _serial: MutexGuard<'static, ()>,
    pub tmp: tempfile::TempDir,
    pub prefix: String,
    token: String,
    pub control_plane: Option<Proc>,
    pub http: String,
    pub grpc: String,
    pub agents: Vec<(String, Option<Proc>)>,
    client: reqwest::Client,
    pub admin: String,
}

impl Cluster {
    /// Starts a control plane; agents are added with [`Cluster::add_agent`].
    pub async fn start() -> Cluster {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        ensure_libvirtd();
        let tmp = tempfile::Builder::new()
            .prefix("skygate-e2e-")
            .tempdir_in("/var/tmp")
            .expect("temp dir");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let mut cluster = Cluster {
            _serial: serial,
            prefix: format!("skygate-e2e-{}-", &tag[..8]),
            token: format!("agent-token-{tag}"),
            tmp,
            control_plane: None,
            http: String::new(),
            grpc: "127.0.0.1:0".into(),
            agents: Vec::new(),
            client: reqwest::Client::new(),
            admin: String::new(),
        };
        let status = Command::new(env!("CARGO_BIN_EXE_skygate-control-plane"))
            .args([
                "admin",
                "create",
                "--username",
                "root",
                "--email",
                "root@example.com",
            ])
            .arg("--password-stdin")
            .arg("--data-dir")
            .arg(cluster.cp_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin
                    .take()
                    .expect("stdin")
                    .write_all(ADMIN_PASSWORD.as_bytes())?;
                c.wait()
            })
            .expect("admin create");
        assert!(status.success());
        cluster.start_control_plane("127.0.0.1:0");
        cluster.admin = cluster.login("root", ADMIN_PASSWORD).await;
        cluster
    }

    fn cp_dir(&self) -> PathBuf {
        self.tmp.path().join("control-plane")
    }

    /// (Re)starts the control plane; after a kill it comes back on the same addresses.
    pub fn start_control_plane(&mut self, http: &str) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_skygate-control-plane"));
        cmd.arg("serve")
            .args(["--http-addr", http, "--grpc-addr", &self.grpc])
            .arg("--data-dir")
            .arg(self.cp_dir())
            .args(["--log-format", "json", "--heartbeat-interval-secs", "1"])
            .args([
                "--host-unreachable-after-secs",
                "4",
                "--task-lease-secs",
                "5",
            ])
            .args([
                "--stop-timeout-secs",
                "10",
                "--reconcile-interval-secs",
                "2",
            ])
            .args(["--orphan-grace-secs", "4"])
            // Restart policy on-failure: two restarts a window, the first after 1 s.
            .args(["--restart-max", "2", "--restart-backoff-secs", "1"])
            .env("SKYGATE_AGENT_TOKEN", &self.token);
        let proc = Proc::spawn(cmd);
        let grpc = proc.wait_for_log("agent registry listening", Duration::from_secs(30));
        let http = proc.wait_for_log("control plane listening", Duration::from_secs(30));
        self.grpc = grpc["grpc"].as_str().expect("grpc addr").to_owned();
        self.http = format!("http://{}", http["addr"].as_str().expect("http addr"));
        self.control_plane = Some(proc);
    }

    /// kill -9 of the control plane.
    pub fn kill_control_plane(&mut self) {
        if let Some(mut p) = self.control_plane.take() {
            p.kill9();
        }
    }

    /// The HTTP address without the scheme (to restart on it).
    pub fn http_addr(&self) -> String {
        self.http.trim_start_matches("http://").to_owned()
    }

    /// Starts agent `name` (its own data dir, ports and prefix) and waits until it is ready.
    pub async fn add_agent(&mut self, name: &str, cap: Capacity) {
        let index = self.agents.len();
        self.agents.push((name.to_owned(), None));
        self.start_agent(index, cap).await;
    }

    /// (Re)starts agent number `index`.
    pub async fn start_agent(&mut self, index: usize, cap: Capacity) {
        let name = self.agents[index].0.clone();
        let first_port = 21000 + 100 * index;
        let mut cmd = Command::new(workspace_bin("skygate-host-agent", "host-agent"));
        cmd.args(["--listen", "127.0.0.1:0", "--log-json", "--name", &name])
            .args(["--control-plane", &format!("http://{}", self.grpc)])
            .arg("--data-dir")
            .arg(self.tmp.path().join(format!("agent-{name}")))
            .args(["--domain-prefix", &self.agent_prefix(&name)])
            // The tiny image's file:// sources are read from its directory.
            .arg("--image-dir")
            .arg(
                Path::new(&tiny_image_json())
                    .parent()
                    .expect("image.json has a directory"),
            )
            .args([
                "--forward-ports",
                &format!("{first_port}-{}", first_port + 99),
            ])
            .args(["--capacity-vcpus", &cap.vcpus.to_string()])
            .args(["--capacity-memory-mib", &cap.memory_mib.to_string()])
            .args(["--capacity-disk-gib", &cap.disk_gib.to_string()])
            .args(["--cpu-overcommit", "1", "--graceful-timeout-secs", "10"])
            .env("SKYGATE_AGENT_TOKEN", &self.token);
        let proc = Proc::spawn(cmd);
        proc.wait_for_log("registered with the control plane", Duration::from_secs(60));
        self.agents[index].1 = Some(proc);
        self.wait_for_host(&name, "ready", Duration::from_secs(30))
            .await;
    }

    /// kill -9 of agent `index`.
    pub fn kill_agent(&mut self, index: usize) {
        if let Some(mut p) = self.agents[index].1.take() {
            p.kill9();
        }
    }

    /// A HostAgent client for agent `name`, as the control plane itself would call it.
    pub async fn agent_client(
        &self,
        name: &str,
    ) -> proto::agent::v1::host_agent_client::HostAgentClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            proto::bearer::BearerToken,
        >,
    > {
        let address = self.host(name).await["address"]
            .as_str()
            .expect("address")
            .to_owned();
        let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect to agent");
        // A joined agent admits its host's credential only (the join token no longer drives
        // it); the test reads it where the agent keeps it.
        let credential = std::fs::read_to_string(
            self.tmp
                .path()
                .join(format!("agent-{name}"))
                .join("host-credential"),
        )
        .expect("the agent keeps its host credential");
        proto::agent::v1::host_agent_client::HostAgentClient::with_interceptor(
            channel,
            proto::bearer::BearerToken::new(credential.trim()).expect("token"),
        )
    }

    pub fn agent_prefix(&self, name: &str) -> String {
        format!("{}{name}-", self.prefix)
    }

    /// Domains of agent `name` as libvirt lists them.
    pub fn domains_of(&self, name: &str) -> Vec<String> {
        let prefix = self.agent_prefix(name);
        self.all_domains()
            .into_iter()
            .filter(|d| d.starts_with(&prefix))
            .collect()
    }

    /// Every domain of this cluster.
    pub fn all_domains(&self) -> Vec<String> {
        let out = virsh(&["list", "--all", "--name"]).expect("virsh");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|n| n.starts_with(&self.prefix))
            .map(str::to_owned)
            .collect()
    }

    /// Machine directories left in agent `name`'s data dir.
    pub fn machine_dirs_of(&self, name: &str) -> Vec<PathBuf> {
        let dir = self
            .tmp
            .path()
            .join(format!("agent-{name}"))
            .join("machines");
        std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    }

    pub async fn login(&self, username: &str, password: &str) -> String {
        let (status, body) = self
            .call(
                "POST",
                "/auth/login",
                None,
                Some(json!({"username": username, "password": password})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["access_token"].as_str().expect("token").to_owned()
    }

    /// A new tenant's access token.
    pub async fn tenant(&self, username: &str) -> String {
        let password = "correct horse battery staple";
        let (status, body) = self
            .call(
                "POST",
                "/auth/register",
                None,
                Some(json!({"username": username, "email": format!("{username}@example.com"), "password": password})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        self.login(username, password).await
    }

    /// Registers the tiny image built by images/tiny/build.sh.
    pub async fn register_tiny_image(&self) {
        let path = tiny_image_json();
        let body: Value = serde_json::from_str(
            &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}")),
        )
        .expect("image.json");
        let (status, answer) = self
            .call("POST", "/images", Some(&self.admin.clone()), Some(body))
            .await;
        assert_eq!(status, 201, "{answer}");
    }

    /// One API call: (status, JSON body or `null`).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("{}/api/v1{path}", self.http);
        let mut req = self
            .client
            .request(method.parse().expect("method"), url)
            .timeout(Duration::from_secs(30));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Creates a machine; returns its id.
    pub async fn create_machine(
        &self,
        token: &str,
        hostname: &str,
        vcpus: u32,
        key: Option<&str>,
    ) -> String {
        let mut body = json!({"hostname": hostname, "image": "tiny", "vcpus": vcpus,
            "memory_mib": 256, "disk_gib": 1});
        if let Some(k) = key {
            body["ssh_keys"] = json!([k]);
        }
        let (status, answer) = self
            .call("POST", "/machines", Some(token), Some(body))
            .await;
        assert_eq!(status, 202, "{answer}");
        answer["id"].as_str().expect("id").to_owned()
    }

    /// Polls a machine until `pred` holds; returns it. Panics at the timeout, or as soon as the
    /// machine is `failed` without satisfying `pred`, with the machine and its events.
    pub async fn wait_machine(
        &self,
        token: &str,
        id: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, m) = self
                .call("GET", &format!("/machines/{id}"), Some(token), None)
                .await;
            if pred(&m) {
                return m;
            }
            // `failed` is terminal: waiting on would only run into the deadline.
            let stuck = m["status"] == "failed";
            assert!(
                !stuck && Instant::now() < deadline,
                "machine {id} never became {what} (HTTP {status}; {}): {m}\nevents: {}",
                if stuck { "it failed" } else { "timed out" },
                self.call("GET", &format!("/machines/{id}/events"), Some(token), None)
                    .await
                    .1
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn wait_status(
        &self,
        token: &str,
        id: &str,
        status: &str,
        timeout: Duration,
    ) -> Value {
        self.wait_machine(token, id, status, timeout, |m| m["status"] == status)
            .await
    }

    pub async fn host(&self, name: &str) -> Value {
        let (status, hosts) = self.call("GET", "/hosts", Some(&self.admin), None).await;
        assert_eq!(status, 200, "{hosts}");
        hosts["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|h| h["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    }

    pub async fn wait_for_host(&self, name: &str, state: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let h = self.host(name).await;
            if h["state"] == state {
                return h;
            }
            assert!(
                Instant::now() < deadline,
                "host {name} never became {state}: {h}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, agent) in &mut self.agents {
            if let Some(mut p) = agent.take() {
                p.kill9();
            }
        }
        self.kill_control_plane();
        // Only ever this cluster's own domains.
        let listing = virsh(&["list", "--all", "--name"])
            .map(|o| o.stdout)
            .unwrap_or_default();
        for name in String::from_utf8_lossy(&listing).lines().map(str::trim) {
            if name.starts_with(&self.prefix) {
                let _ = virsh(&["destroy", name]);
                let _ = virsh(&["undefine", name]);
            }
        }
    }
}

/// The forwarded SSH port of a machine as the API shows it.
pub fn ssh_port(machine: &Value) -> u16 {
    let ports = machine["network"]["ports"].as_array().expect("ports");
    let p = ports
        .iter()
        .find(|p| p["guest"] == 22)
        .expect("port 22 forwarded");
    assert_eq!(p["host_ip"], "127.0.0.1");
    p["host_port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .expect("host port")
}
