//! The binary as an operator runs it: `serve` with nothing but a data dir, and
//! `admin create --password-stdin` against the same database.

use crate::common::process::{ServerProcess, BIN};
use crate::common::PASSWORD;
use serde_json::{json, Value};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

/// `admin create --username root --password-stdin`, fed PASSWORD on standard input.
fn admin_create(data_dir: &std::path::Path, email: &str) -> std::process::Output {
    let mut admin = Command::new(BIN)
        .args([
            "admin",
            "create",
            "--username",
            "root",
            "--email",
            email,
            "--password-stdin",
        ])
        .env("SKYGATE_DATA_DIR", data_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(admin.stdin.take().unwrap(), "{PASSWORD}").unwrap();
    admin.wait_with_output().unwrap()
}

#[tokio::test]
async fn serve_and_admin_create_work_on_a_bare_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("state");
    // The first administrator, created before the server ever ran.
    let out = admin_create(&data_dir, "root@example.com");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains(PASSWORD));

    let server = ServerProcess::start(&data_dir, &[], &[]).await;
    let base = server.base.clone();
    let secret = std::fs::metadata(data_dir.join("jwt-secret")).unwrap();
    assert_eq!(secret.permissions().mode() & 0o777, 0o600);
    // The database (password hashes) and the directory it made are the owner's alone, under
    // the usual umask (issue 10: the database was 0644).
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data_dir.join("skygate.db")), 0o600);
    assert_eq!(mode(&data_dir), 0o700);

    let client = reqwest::Client::new();
    let wrong = client
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({"username": "root", "password": "not the password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), reqwest::StatusCode::UNAUTHORIZED);
    let login: Value = client
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({"username": "root", "password": PASSWORD}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["access_token"].as_str().unwrap();
    let me: Value = client
        .get(format!("{base}/api/v1/auth/profile"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["role"], "admin");
    // A refresh token spent twice: the second use is reuse, and revokes the family.
    let refresh_token = login["refresh_token"].as_str().unwrap();
    for _ in 0..2 {
        client
            .post(format!("{base}/api/v1/auth/refresh"))
            .json(&json!({"refresh_token": refresh_token}))
            .send()
            .await
            .unwrap();
    }

    // Stop it by pid with SIGTERM: a clean exit, and no secret in the access log.
    let pid = server.pid();
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut server = server;
    let exit = server.child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    let log = server.log_text();
    assert!(
        log.contains("\"status\":200")
            || log.contains("status=200")
            || log.contains("\"status\":\"200\""),
        "{log}"
    );
    assert!(
        !log.contains(PASSWORD) && !log.contains(token),
        "secrets in the log"
    );
    // The access log names the route template, the client and the authenticated user.
    let profile_line = log
        .lines()
        .find(|l| l.contains("\"route\":\"/api/v1/auth/profile\"") && l.contains("answered"))
        .unwrap_or_else(|| panic!("no access log line for the profile route: {log}"));
    assert!(
        profile_line.contains(me["id"].as_str().unwrap()),
        "{profile_line}"
    );
    assert!(
        profile_line.contains("\"client\":\"127.0.0.1\""),
        "{profile_line}"
    );

    // Authentication events name the user (by id) and the session family, never a secret.
    let user_id = me["id"].as_str().unwrap();
    let event = |name: &str| {
        log.lines()
            .find(|l| l.contains(&format!("\"event\":\"{name}\"")))
            .unwrap_or_else(|| panic!("no {name} event in {log}"))
            .to_owned()
    };
    let failed = event("login-failed");
    assert!(
        failed.contains(user_id) && failed.contains("\"client\":\"127.0.0.1\""),
        "{failed}"
    );
    let success = event("login");
    assert!(
        success.contains(user_id) && success.contains("family_id"),
        "{success}"
    );
    let reuse = event("refresh-reuse");
    assert!(
        reuse.contains(user_id) && reuse.contains("family_id"),
        "{reuse}"
    );
    assert!(!log.contains(refresh_token), "a refresh token in the log");

    // A second admin with a taken username fails cleanly.
    let out = admin_create(&data_dir, "other@example.com");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("taken"));
}
