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
    admin_create_in(data_dir, &[], email)
}

/// [`admin_create`] with more flags (a database URL).
fn admin_create_in(
    data_dir: &std::path::Path,
    extra: &[&str],
    email: &str,
) -> std::process::Output {
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
        .args(extra)
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

crate::both_stores!(an_accepted_create_survives_kill_9_of_the_control_plane);

/// Creates from 16 clients at once, then `kill -9` of the control plane in the middle of them:
/// after a restart every create that was answered 202 is there (the answer is sent only after
/// the transaction holding it, shared with other creates, committed).
async fn an_accepted_create_survives_kill_9_of_the_control_plane(backend: crate::common::Backend) {
    let db = crate::common::TestDb::new(backend).await;
    let data_dir = db.dir.path().join("state");
    let extra: Vec<&str> = match backend {
        crate::common::Backend::Postgres => vec!["--database-url", &db.url],
        crate::common::Backend::Sqlite => vec![],
    };
    let out = admin_create_in(&data_dir, &extra, "root@example.com");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let serve: Vec<&str> = extra
        .iter()
        .copied()
        .chain([
            "--quota-machines",
            "100000",
            "--quota-vcpus",
            "100000",
            "--quota-memory-mib",
            "100000000",
        ])
        .collect();
    let server = ServerProcess::start(&data_dir, &[], &serve).await;
    let base = format!("{}/api/v1", server.base);
    let client = reqwest::Client::new();
    let root = login_at(&client, &base, "root").await;
    let res = client
        .post(format!("{base}/images"))
        .bearer_auth(&root)
        .json(&json!({"name": "tiny", "source": "file:///var/lib/skygate/images/tiny.qcow2", "format": "qcow2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), reqwest::StatusCode::CREATED);
    let res = client
        .post(format!("{base}/auth/register"))
        .json(&json!({"username": "ann", "email": "ann@example.com", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), reqwest::StatusCode::CREATED);
    let ann = login_at(&client, &base, "ann").await;
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let clients: Vec<_> = (0..16)
        .map(|c| {
            let (client, base, ann, accepted) =
                (client.clone(), base.clone(), ann.clone(), accepted.clone());
            tokio::spawn(async move {
                // Bounded: the kill ends it long before.
                for n in 0..5_000 {
                    let sent = client
                        .post(format!("{base}/machines"))
                        .bearer_auth(&ann)
                        .json(&crate::common::machine_body(&format!("k{c}-{n}")))
                        .send()
                        .await;
                    let Ok(res) = sent else { return None };
                    if res.status() != reqwest::StatusCode::ACCEPTED {
                        return Some(format!(
                            "{}: {}",
                            res.status(),
                            res.text().await.unwrap_or_default()
                        ));
                    }
                    let Ok(body) = res.json::<Value>().await else {
                        return None;
                    };
                    accepted
                        .lock()
                        .unwrap()
                        .push(body["id"].as_str().unwrap().to_owned());
                }
                None
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while accepted.lock().unwrap().len() < 300 {
        assert!(
            std::time::Instant::now() < deadline && !clients.iter().all(|c| c.is_finished()),
            "creates stopped before the kill: {:?}",
            server.log_text().lines().rev().take(5).collect::<Vec<_>>()
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let killed = Command::new("kill")
        .args(["-KILL", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    for c in clients {
        // Whatever a client saw as the server died (a refused connection, a reset) is fine;
        // an answer other than 202 before it is not.
        if let Some(answer) = c.await.unwrap() {
            panic!("a create was answered {answer}");
        }
    }
    drop(server);
    let accepted = accepted.lock().unwrap().clone();
    let server = ServerProcess::start(&data_dir, &[], &serve).await;
    let base = format!("{}/api/v1", server.base);
    let ann = login_at(&client, &base, "ann").await;
    let mut missing = Vec::new();
    for id in &accepted {
        let res = client
            .get(format!("{base}/machines/{id}"))
            .bearer_auth(&ann)
            .send()
            .await
            .unwrap();
        if res.status() != reqwest::StatusCode::OK {
            missing.push(id.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} accepted creates lost: {missing:?}",
        missing.len(),
        accepted.len()
    );
}

async fn login_at(client: &reqwest::Client, base: &str, username: &str) -> String {
    let res: Value = client
        .post(format!("{base}/auth/login"))
        .json(&json!({"username": username, "password": PASSWORD}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    res["access_token"].as_str().unwrap().to_owned()
}
