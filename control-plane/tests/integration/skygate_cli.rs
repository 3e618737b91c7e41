//! The `skygate` client against a real control plane: login keeps a 0600 session and refreshes
//! it, machines are created, listed, shown and deleted by hostname, `--output json` is JSON,
//! and failures are one line with the request id and a non-zero exit status.

use crate::both_stores;
use crate::common::{Backend, TestApp, PASSWORD};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};

struct Cli {
    config: tempfile::TempDir,
    api: String,
}

impl Cli {
    fn new(app: &TestApp) -> Cli {
        Cli {
            config: tempfile::tempdir().unwrap(),
            api: app.base.clone(),
        }
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(skygate_test_support::workspace_bin(
            "skygate",
            "skygate-cli",
        ))
        .args(args)
        .env("SKYGATE_API", &self.api)
        .env("SKYGATE_CONFIG_DIR", self.config.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args, None);
        assert!(
            out.status.success(),
            "skygate {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn credentials(&self) -> std::path::PathBuf {
        self.config.path().join("credentials.json")
    }
}

async fn the_cli_logs_in_manages_machines_and_reports_failures_in_one_line(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.tiny_image().await;
    let cli = Cli::new(&app);
    let out = cli.run(
        &[
            "register",
            "-u",
            "cli-user",
            "--email",
            "cli@example.com",
            "--password-stdin",
        ],
        Some(PASSWORD),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("cli-user"));

    // Not logged in yet: a clear line, a failure status.
    let out = cli.run(&["machines", "list"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not logged in"));

    let bad = cli.run(
        &["login", "-u", "cli-user", "--password-stdin"],
        Some("wrong password"),
    );
    assert!(!bad.status.success());
    let line = String::from_utf8_lossy(&bad.stderr).into_owned();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(
        line.contains("HTTP 401") && line.contains("request id"),
        "{line}"
    );

    let out = cli.run(
        &["login", "-u", "cli-user", "--password-stdin"],
        Some(PASSWORD),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(cli.credentials())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let created = cli.ok(&[
        "-o",
        "json",
        "machines",
        "create",
        "cli-1",
        "--image",
        "tiny",
        "--memory-mib",
        "256",
        "--disk-gib",
        "1",
    ]);
    let machine: serde_json::Value = serde_json::from_str(&created).unwrap();
    assert_eq!(machine["hostname"], "cli-1");
    assert_eq!(machine["status"], "pending");

    let table = cli.ok(&["machines", "list"]);
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table.contains("cli-1") && table.contains("pending"),
        "{table}"
    );
    let shown = cli.ok(&["machines", "show", "cli-1"]);
    assert!(shown.contains(machine["id"].as_str().unwrap()), "{shown}");
    let events = cli.ok(&["-o", "json", "machines", "events", "cli-1"]);
    assert!(events.contains("machine requested"), "{events}");

    // A request that makes no sense now: the server's reason, one line.
    let out = cli.run(&["machines", "reboot", "cli-1"], None);
    assert!(!out.status.success());
    let line = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        line.contains("HTTP 409") && line.contains("request id"),
        "{line}"
    );
    assert!(!cli
        .run(&["machines", "show", "no-such-machine"], None)
        .status
        .success());
    // No host here, so it stays pending: a resize is refused by the server, a wait gives up
    // at its timeout saying where the machine is, and a rebuild needs --yes before anything.
    let out = cli.run(&["machines", "resize", "cli-1", "--vcpus", "2"], None);
    let line = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        line.contains("HTTP 409") && line.contains("stopped"),
        "{line}"
    );
    let out = cli.run(
        &[
            "machines",
            "wait",
            "cli-1",
            "--status",
            "running",
            "--timeout",
            "1",
        ],
        None,
    );
    let line = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        line.contains("did not become running within 1 s (it is pending)"),
        "{line}"
    );
    let out = cli.run(&["machines", "rebuild", "cli-1"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    let out = cli.run(&["machines", "wait", "cli-1", "--status", "asleep"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--status"));

    // An access token that no longer works is refreshed on the way (and saved).
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cli.credentials()).unwrap()).unwrap();
    let mut broken = saved.clone();
    broken["access_token"] = "expired.or.tampered".into();
    std::fs::write(cli.credentials(), broken.to_string()).unwrap();
    cli.ok(&["machines", "list"]);
    let after: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cli.credentials()).unwrap()).unwrap();
    assert_ne!(after["access_token"], broken["access_token"]);
    assert_ne!(after["refresh_token"], saved["refresh_token"], "rotated");

    cli.ok(&["machines", "delete", "cli-1", "--wait"]);
    assert!(!cli.ok(&["machines", "list"]).contains("cli-1"));

    // Administrators' commands are refused to a tenant, in one line.
    let out = cli.run(&["hosts", "list"], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 403"));

    cli.ok(&["logout"]);
    assert!(!cli.credentials().exists());
    app.stop().await;
}

/// An administrator finds an account by name, gives it limits, disables and enables it; the
/// tenant sees its limits and usage in `skygate profile`.
async fn the_cli_administers_accounts_and_shows_a_tenant_its_limits(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.admin("root").await;
    app.user("ann").await;
    let admin = Cli::new(&app);
    let login = admin.run(&["login", "-u", "root", "--password-stdin"], Some(PASSWORD));
    assert!(login.status.success());
    let tenant = Cli::new(&app);
    let login = tenant.run(&["login", "-u", "ann", "--password-stdin"], Some(PASSWORD));
    assert!(login.status.success());

    let listed = admin.ok(&["users", "list", "--role", "user"]);
    assert!(
        listed.contains("ann") && !listed.contains("root"),
        "{listed}"
    );
    let set = admin.ok(&[
        "users",
        "set-quota",
        "ann",
        "--machines",
        "3",
        "--vcpus",
        "6",
    ]);
    assert!(set.contains("0 of 3 (own)"), "{set}");
    // A limit left out keeps its value; `default` returns one to the server's.
    let set = admin.ok(&[
        "users",
        "set-quota",
        "ann",
        "--vcpus",
        "default",
        "-o",
        "json",
    ]);
    let q: serde_json::Value = serde_json::from_str(&set).unwrap();
    assert_eq!(q["overrides"]["max_machines"], 3);
    assert_eq!(q["overrides"]["max_vcpus"], serde_json::Value::Null);
    // A tenant mints an API token (shown once) and finds it listed without its secret.
    let minted = tenant.ok(&["tokens", "create", "ci", "--scope", "read", "-o", "json"]);
    let minted: serde_json::Value = serde_json::from_str(&minted).unwrap();
    let secret = minted["token"].as_str().unwrap();
    assert!(secret.starts_with("sgt_"), "{minted}");
    let listed = tenant.ok(&["tokens", "list"]);
    assert!(
        listed.contains("ci") && !listed.contains(secret),
        "{listed}"
    );
    tenant.ok(&["tokens", "delete", "ci"]);
    assert!(!tenant.ok(&["tokens", "list"]).contains("ci"));
    let me = tenant.ok(&["profile"]);
    assert!(me.contains("ann") && me.contains("0 of 3 (own)"), "{me}");

    let disabled = admin.ok(&["users", "disable", "ann"]);
    assert!(!disabled.contains("disabled: -"), "{disabled}");
    let refused = tenant.run(&["profile"], None);
    assert!(!refused.status.success());
    admin.ok(&["users", "enable", "ann"]);
    // The administrator's calls are in the audit log (written a moment after the answers).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let audit = admin.ok(&["audit", "--limit", "200"]);
        if audit.contains("POST /users/{id}/disable") && audit.contains("PUT /users/{id}/quota") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{audit}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let bad = admin.run(&["users", "disable", "nobody"], None);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("no account named"), "{stderr}");
    let bad = admin.run(&["users", "set-quota", "ann", "--machines", "lots"], None);
    assert!(!bad.status.success());
    app.stop().await;
}

both_stores!(
    the_cli_logs_in_manages_machines_and_reports_failures_in_one_line,
    the_cli_administers_accounts_and_shows_a_tenant_its_limits,
);
