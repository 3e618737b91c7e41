//! The real `skygate-host-agent` binary at start-up: bad flags and an unfit environment stop it
//! at once with exit code 2 and one line on stderr naming the problem; `--advertise` in URL
//! form is accepted and registered as `host:port`.
//!
//! The refusals need neither libvirt nor QEMU (the checks before them fail first). The
//! acceptance test starts a real agent, so it needs libvirtd at qemu:///system (HOST-NOTES.md),
//! like tests/libvirt; it touches only domains with its own random prefix (none).
// Helpers outside #[test] functions unwrap too: a panic there is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use proto::controlplane::v1 as pb;
use proto::controlplane::v1::agent_registry_server::{AgentRegistry, AgentRegistryServer};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

const BIN: &str = env!("CARGO_BIN_EXE_skygate-host-agent");
const TOKEN: &str = "startup-test-token-0123456789";
/// How long a refused start may take: the refusals tested here come before libvirt's wait.
const EXIT_WITHIN: Duration = Duration::from_secs(10);

/// A temp dir other users can traverse, under /var/tmp (tempfile makes 0700 dirs).
fn open_tempdir() -> tempfile::TempDir {
    let tmp = tempfile::Builder::new()
        .prefix("skygate-startup-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    tmp
}

/// The agent with only the environment given (no SKYGATE_* leaking in from the caller).
fn agent(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Runs the agent, which must exit within [`EXIT_WITHIN`] (else it is killed and the test
/// fails saying so); returns its status and stderr.
fn run_to_exit(mut cmd: Command) -> (ExitStatus, String) {
    let mut child = cmd.spawn().expect("spawn skygate-host-agent");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > EXIT_WITHIN {
            let _ = child.kill();
            let _ = child.wait();
            let mut stderr = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
            panic!("skygate-host-agent still running after {EXIT_WITHIN:?}; stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stderr)
}

/// The agent must refuse to start: exit code 2, stderr exactly one line
/// `skygate-host-agent: ...` containing every piece of `expected`; returns the line.
fn assert_refused(cmd: Command, expected: &[&str]) -> String {
    let (status, stderr) = run_to_exit(cmd);
    assert_eq!(status.code(), Some(2), "{status}; stderr:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not one line on stderr:\n{stderr}");
    let line = lines[0];
    assert!(line.starts_with("skygate-host-agent: "), "{line}");
    for piece in expected {
        assert!(line.contains(piece), "{line:?} does not contain {piece:?}");
    }
    line.to_owned()
}

#[test]
fn advertise_with_another_scheme_is_refused_at_once() {
    let tmp = open_tempdir();
    let data = tmp.path().join("data");
    let line = assert_refused(
        agent(
            &[
                "--advertise",
                "ftp://x",
                "--data-dir",
                data.to_str().unwrap(),
            ],
            &[("SKYGATE_AGENT_TOKEN", TOKEN)],
        ),
        &["--advertise \"ftp://x\"", "\"ftp\" is not http or https"],
    );
    assert!(
        !data.exists(),
        "{line}: the data dir was created before the flags were checked"
    );
}

#[test]
fn an_image_dir_that_is_not_a_directory_is_refused_at_once() {
    let tmp = open_tempdir();
    let data = tmp.path().join("data");
    let file = tmp.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let missing = tmp.path().join("missing");
    let data_arg = data.to_str().unwrap();
    let token = [("SKYGATE_AGENT_TOKEN", TOKEN)];
    assert_refused(
        agent(
            &[
                "--data-dir",
                data_arg,
                "--image-dir",
                missing.to_str().unwrap(),
            ],
            &token,
        ),
        &[
            "--image-dir (SKYGATE_AGENT_IMAGE_DIRS): ",
            "missing",
            "No such file",
        ],
    );
    assert_refused(
        agent(
            &["--data-dir", data_arg, "--image-dir", "relative/dir"],
            &token,
        ),
        &["\"relative/dir\" is not an absolute path"],
    );
    // The variable takes a comma-separated list; each entry is checked.
    let both = format!("{},{}", tmp.path().display(), file.display());
    assert_refused(
        agent(
            &["--data-dir", data_arg],
            &[token[0], ("SKYGATE_AGENT_IMAGE_DIRS", both.as_str())],
        ),
        &[
            "--image-dir (SKYGATE_AGENT_IMAGE_DIRS): ",
            "is not a directory",
        ],
    );
}

#[test]
fn an_empty_or_missing_or_short_token_is_refused() {
    assert_refused(
        agent(&["--agent-token", ""], &[]),
        &["--agent-token (SKYGATE_AGENT_TOKEN): is empty"],
    );
    assert_refused(
        agent(&[], &[("SKYGATE_AGENT_TOKEN", "")]),
        &["--agent-token (SKYGATE_AGENT_TOKEN): is empty"],
    );
    assert_refused(
        agent(&[], &[]),
        &["--agent-token (SKYGATE_AGENT_TOKEN): is not set"],
    );
    assert_refused(
        agent(&[], &[("SKYGATE_AGENT_TOKEN", "change-me")]),
        &["--agent-token", "is 9 bytes; at least 16"],
    );
}

#[test]
fn a_data_dir_below_a_0700_directory_is_refused_naming_that_directory() {
    let tmp = open_tempdir();
    let private = tmp.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let data = private.join("data");
    assert_refused(
        agent(
            &["--data-dir", data.to_str().unwrap()],
            &[("SKYGATE_AGENT_TOKEN", TOKEN)],
        ),
        &[
            &format!("data directory {}", data.display()),
            &format!("{} (mode 0700) is not traversable", private.display()),
        ],
    );
    assert!(!data.exists());
}

#[test]
fn a_missing_qemu_img_is_refused_naming_it() {
    let tmp = open_tempdir();
    let empty_path = tmp.path().join("bin");
    std::fs::create_dir(&empty_path).unwrap();
    let data = tmp.path().join("data");
    let mut cmd = agent(
        &["--data-dir", data.to_str().unwrap()],
        &[("SKYGATE_AGENT_TOKEN", TOKEN)],
    );
    cmd.env("PATH", &empty_path);
    assert_refused(
        cmd,
        &["qemu-img (Debian package qemu-utils): not found in PATH"],
    );
}

#[test]
fn a_bad_command_line_is_one_line_too() {
    assert_refused(
        agent(
            &["--forward-ports", "22-80"],
            &[("SKYGATE_AGENT_TOKEN", TOKEN)],
        ),
        &["--forward-ports", "privileged"],
    );
    assert_refused(agent(&["--no-such-flag"], &[]), &["--no-such-flag"]);
    assert_refused(
        agent(
            &["--listen", "localhost:9091"],
            &[("SKYGATE_AGENT_TOKEN", TOKEN)],
        ),
        &["--listen \"localhost:9091\" is not IP:PORT"],
    );
    assert_refused(
        agent(
            &["--control-plane", "127.0.0.1:9090"],
            &[("SKYGATE_AGENT_TOKEN", TOKEN)],
        ),
        &["--control-plane \"127.0.0.1:9090\"", "no scheme"],
    );
}

/// A control plane that only records what agents register.
struct Registry(tokio::sync::mpsc::UnboundedSender<(pb::RegisterRequest, Option<String>)>);

#[tonic::async_trait]
impl AgentRegistry for Registry {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let _ = self.0.send((request.into_inner(), auth));
        Ok(Response::new(pb::RegisterResponse {
            host_id: "host-1".into(),
            heartbeat_interval_secs: 60,
            host_credential: String::new(),
        }))
    }

    async fn heartbeat(
        &self,
        _: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        Ok(Response::new(pb::HeartbeatResponse {}))
    }
}

/// Kills the agent when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advertise_as_an_http_url_is_accepted_and_registered_as_host_port() {
    let (tx, mut registered) = tokio::sync::mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentRegistryServer::new(Registry(tx)))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let tmp = open_tempdir();
    let data = tmp.path().join("data");
    let prefix = format!(
        "skygate-startup-{}-",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut cmd = agent(
        &[
            "--listen",
            "127.0.0.1:0",
            "--advertise",
            "http://127.0.0.1:9101",
            "--control-plane",
            &format!("http://{grpc}"),
            "--name",
            "startup-test",
            "--data-dir",
            data.to_str().unwrap(),
            "--domain-prefix",
            &prefix,
            "--log-json",
        ],
        &[("SKYGATE_AGENT_TOKEN", TOKEN)],
    );
    let mut child = cmd.spawn().expect("spawn skygate-host-agent");
    let stderr = child.stderr.take().unwrap();
    let _agent = Running(child);
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });

    let (request, auth) = tokio::time::timeout(Duration::from_secs(60), registered.recv())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no registration within 60 s; agent stderr:\n{}",
                lines.try_iter().collect::<Vec<_>>().join("\n")
            )
        })
        .expect("registry channel");
    assert_eq!(request.address, "127.0.0.1:9101");
    assert_eq!(request.name, "startup-test");
    assert_eq!(request.domain_prefix, prefix);
    assert_eq!(auth.as_deref(), Some(&*format!("Bearer {TOKEN}")));

    // The line was logged before registering; bounded all the same, so a missing line fails
    // here naming it rather than waiting for the agent (kept running by `_agent`) to exit.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let listening = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) if l.contains("skygate-host-agent listening") => break l,
            Ok(l) => seen.push(l),
            Err(_) => panic!(
                "no \"skygate-host-agent listening\" line within 10 s; stderr so far:\n{}",
                seen.join("\n")
            ),
        }
    };
    let json: serde_json::Value = serde_json::from_str(&listening).unwrap();
    assert_eq!(json["fields"]["advertise"], "127.0.0.1:9101", "{listening}");
    assert!(Path::new(&data).join("machines").is_dir());
}
