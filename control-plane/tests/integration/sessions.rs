//! Accounts and sessions: register, login, refresh rotation and reuse, logout, profile,
//! login throttling per address and per account.

use crate::both_stores;
use crate::common::{problem, Backend, TestApp, PASSWORD};
use control_plane::api::HttpSettings;
use control_plane::app::{LoginLimits, Settings};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;

both_stores!(
    register_creates_accounts_and_refuses_bad_input,
    login_gives_tokens_and_hides_which_credential_was_wrong,
    refresh_rotates_and_a_spent_token_revokes_the_family,
    concurrent_refreshes_with_one_token_give_exactly_one_success,
    logout_revokes_the_family,
    password_change_ends_every_session,
    failed_logins_pause_the_guesser_not_the_owner,
    an_account_budget_bounds_a_crowd_of_guessers,
    login_is_throttled_per_client_address,
    bad_bearer_tokens_are_refused,
    login_upgrades_a_hash_made_with_older_parameters,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_change_ends_sessions_on_every_replica_at_once() {
    let a = TestApp::spawn(Backend::Postgres).await;
    let b = TestApp::spawn_on(a.db.clone(), Settings::default(), HttpSettings::default()).await;
    let mut s = a.user("ann").await;
    let mut password = PASSWORD.to_owned();
    // Several rounds: a change must reach the other replica before the answer to it does,
    // every time, not just usually.
    for round in 0..10 {
        // Both replicas have served (and kept) the account.
        for t in [&a, &b] {
            let me = t.get_json(&s, "/auth/profile").await;
            assert_eq!(me["username"], "ann", "{me}");
        }
        let new_password = format!("a brand new passphrase {round}");
        let email = format!("ann{round}@new.example.com");
        let res = a
            .as_user(&s, Method::PATCH, "/auth/profile")
            .json(&json!({"password": new_password, "email": email, "current_password": password}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let old = b
            .as_user(&s, Method::GET, "/auth/profile")
            .send()
            .await
            .unwrap();
        problem(old, StatusCode::UNAUTHORIZED).await;
        password = new_password;
        let fresh: Value = b.login("ann", &password).await.json().await.unwrap();
        s = crate::common::Session {
            access: fresh["access_token"].as_str().unwrap().to_owned(),
            refresh: fresh["refresh_token"].as_str().unwrap().to_owned(),
        };
        assert_eq!(b.get_json(&s, "/auth/profile").await["email"], email);
    }
    b.stop().await;
    a.stop().await;
}

async fn login_upgrades_a_hash_made_with_older_parameters(backend: Backend) {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let t = TestApp::spawn(backend).await;
    t.register("ann").await;
    let user = t.store.user_by_username("ann").await.unwrap().unwrap();
    let weak = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(8192, 1, 1, None).unwrap(),
    )
    .hash_password(PASSWORD.as_bytes(), &SaltString::generate(&mut OsRng))
    .unwrap()
    .to_string();
    t.store
        .user_rehash_password(user.id, &user.password_hash, &weak)
        .await
        .unwrap();
    assert_eq!(t.login("ann", PASSWORD).await.status(), StatusCode::OK);
    let upgraded = t
        .store
        .user_by_username("ann")
        .await
        .unwrap()
        .unwrap()
        .password_hash
        .clone();
    assert!(
        upgraded.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{upgraded}"
    );
    assert_eq!(t.login("ann", PASSWORD).await.status(), StatusCode::OK);
    t.stop().await;
}

async fn register_creates_accounts_and_refuses_bad_input(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    let res = t.register("ann").await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let user: Value = res.json().await.unwrap();
    assert_eq!(user["username"], "ann");
    assert_eq!(user["email"], "ann@example.com");
    assert_eq!(user["role"], "user");
    assert!(user["id"].as_str().unwrap().parse::<uuid::Uuid>().is_ok());
    assert!(user.get("password_hash").is_none() && user.get("password").is_none());

    let body = problem(t.register("ann").await, StatusCode::CONFLICT).await;
    assert!(body["detail"].as_str().unwrap().contains("username"));
    let dup_email = t
        .req(Method::POST, "/auth/register")
        .json(&json!({"username": "ann2", "email": "ann@example.com", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    let body = problem(dup_email, StatusCode::CONFLICT).await;
    assert!(body["detail"].as_str().unwrap().contains("email"));

    let long = "p".repeat(129);
    for (username, email, password, mentions) in [
        ("AB", "x@example.com", PASSWORD, "username"),
        ("bad name", "x@example.com", PASSWORD, "username"),
        ("bob", "not-an-email", PASSWORD, "email"),
        ("bob", "bob@example.com", "short", "at least 8"),
        ("bob", "bob@example.com", long.as_str(), "at most 128"),
        ("bob", "bob@example.com", "password123", "common"),
    ] {
        let res = t
            .req(Method::POST, "/auth/register")
            .json(&json!({"username": username, "email": email, "password": password}))
            .send()
            .await
            .unwrap();
        let body = problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert!(
            body["detail"].as_str().unwrap().contains(mentions),
            "{username}/{email}: {body}"
        );
    }
    t.stop().await;
}

async fn login_gives_tokens_and_hides_which_credential_was_wrong(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.register("ann").await;
    let res = t.login("ann", PASSWORD).await;
    assert_eq!(res.status(), StatusCode::OK);
    let pair: Value = res.json().await.unwrap();
    assert_eq!(pair["token_type"], "Bearer");
    assert_eq!(pair["expires_in"], 900);
    assert!(pair["refresh_token"].as_str().unwrap().len() >= 43);
    let access = pair["access_token"].as_str().unwrap();
    let me: Value = t
        .req(Method::GET, "/auth/profile")
        .bearer_auth(access)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["username"], "ann");

    let wrong_password = problem(
        t.login("ann", "wrong password!").await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    let unknown_user = problem(t.login("nobody", PASSWORD).await, StatusCode::UNAUTHORIZED).await;
    assert_eq!(wrong_password["detail"], unknown_user["detail"]);
    assert_eq!(wrong_password["type"], unknown_user["type"]);
    t.stop().await;
}

async fn refresh(t: &TestApp, token: &str) -> reqwest::Response {
    t.req(Method::POST, "/auth/refresh")
        .json(&json!({"refresh_token": token}))
        .send()
        .await
        .unwrap()
}

async fn refresh_rotates_and_a_spent_token_revokes_the_family(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    let s = t.user("ann").await;
    let res = refresh(&t, &s.refresh).await;
    assert_eq!(res.status(), StatusCode::OK);
    let second: Value = res.json().await.unwrap();
    let second_refresh = second["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(second_refresh, s.refresh);
    let new_access = second["access_token"].as_str().unwrap();
    let ok = t
        .req(Method::GET, "/auth/profile")
        .bearer_auth(new_access)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);

    // The first token is spent: presenting it again is reuse, which kills the whole family.
    problem(refresh(&t, &s.refresh).await, StatusCode::UNAUTHORIZED).await;
    problem(refresh(&t, &second_refresh).await, StatusCode::UNAUTHORIZED).await;
    problem(refresh(&t, "made-up-token").await, StatusCode::UNAUTHORIZED).await;

    // Another login is another family, unaffected.
    let other = t
        .login("ann", PASSWORD)
        .await
        .json::<Value>()
        .await
        .unwrap();
    let res = refresh(&t, other["refresh_token"].as_str().unwrap()).await;
    assert_eq!(res.status(), StatusCode::OK);
    t.stop().await;
}

async fn concurrent_refreshes_with_one_token_give_exactly_one_success(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    let s = t.user("ann").await;
    let attempts = (0..8).map(|_| refresh(&t, &s.refresh));
    let responses = futures::future::join_all(attempts).await;
    let statuses: Vec<StatusCode> = responses.iter().map(|r| r.status()).collect();
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(ok, 1, "{statuses:?}");
    assert!(statuses
        .iter()
        .all(|s| *s == StatusCode::OK || *s == StatusCode::UNAUTHORIZED));
    // The losers presented a spent token: reuse, so the winner's new token is dead too.
    let winner = responses
        .into_iter()
        .find(|r| r.status() == StatusCode::OK)
        .unwrap();
    let pair: Value = winner.json().await.unwrap();
    let new_refresh = pair["refresh_token"].as_str().unwrap();
    problem(refresh(&t, new_refresh).await, StatusCode::UNAUTHORIZED).await;
    t.stop().await;
}

async fn logout_revokes_the_family(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    let s = t.user("ann").await;
    let res = t
        .as_user(&s, Method::POST, "/auth/logout")
        .json(&json!({"refresh_token": s.refresh}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    problem(refresh(&t, &s.refresh).await, StatusCode::UNAUTHORIZED).await;
    t.stop().await;
}

async fn password_change_ends_every_session(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    let s = t.user("ann").await;
    let other_device = t
        .login("ann", PASSWORD)
        .await
        .json::<Value>()
        .await
        .unwrap();

    let wrong = t
        .as_user(&s, Method::PATCH, "/auth/profile")
        .json(&json!({"password": "a brand new passphrase", "current_password": "not it at all"}))
        .send()
        .await
        .unwrap();
    problem(wrong, StatusCode::FORBIDDEN).await;

    let res = t
        .as_user(&s, Method::PATCH, "/auth/profile")
        .json(&json!({"password": "a brand new passphrase", "email": "ann@new.example.com", "current_password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let me: Value = res.json().await.unwrap();
    assert_eq!(me["email"], "ann@new.example.com");

    // The access token that made the change, and every refresh token, are dead now.
    let old = t
        .as_user(&s, Method::GET, "/auth/profile")
        .send()
        .await
        .unwrap();
    problem(old, StatusCode::UNAUTHORIZED).await;
    problem(refresh(&t, &s.refresh).await, StatusCode::UNAUTHORIZED).await;
    problem(
        refresh(&t, other_device["refresh_token"].as_str().unwrap()).await,
        StatusCode::UNAUTHORIZED,
    )
    .await;
    problem(t.login("ann", PASSWORD).await, StatusCode::UNAUTHORIZED).await;
    assert_eq!(
        t.login("ann", "a brand new passphrase").await.status(),
        StatusCode::OK
    );
    t.stop().await;
}

/// A login from a given loopback address (127.0.0.0/8 is all ours).
async fn login_from(t: &TestApp, from: &str, username: &str, password: &str) -> reqwest::Response {
    let client = reqwest::Client::builder()
        .local_address(from.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    client
        .post(format!("{}/api/v1/auth/login", t.base))
        .json(&serde_json::json!({"username": username, "password": password}))
        .send()
        .await
        .unwrap()
}

/// Before (issue 10): eleven wrong passwords from anywhere made the owner's right password
/// answer 429 from everywhere. Now the guesser is paused, on every replica; the owner is not.
async fn failed_logins_pause_the_guesser_not_the_owner(backend: Backend) {
    let settings = Settings {
        login: LoginLimits {
            per_ip_per_minute: 1000,
            max_failures: 3,
            ..LoginLimits::default()
        },
        ..Settings::default()
    };
    let a = TestApp::spawn_with(backend, settings, HttpSettings::default()).await;
    let b = TestApp::spawn_on(Arc::clone(&a.db), settings, HttpSettings::default()).await;
    a.register("ann").await;
    a.register("bob").await;
    for _ in 0..3 {
        let res = login_from(&a, "127.0.0.2", "ann", "wrong password!").await;
        problem(res, StatusCode::UNAUTHORIZED).await;
    }
    // The other replica knows: the guesser is refused even the right password until its
    // window ends...
    let res = login_from(&b, "127.0.0.2", "ann", PASSWORD).await;
    let retry_after: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after > 0 && retry_after <= 900, "{retry_after}");
    problem(res, StatusCode::TOO_MANY_REQUESTS).await;
    // ...but the owner, elsewhere, signs in, and other accounts are untouched.
    assert_eq!(
        login_from(&b, "127.0.0.3", "ann", PASSWORD).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        login_from(&b, "127.0.0.2", "bob", PASSWORD).await.status(),
        StatusCode::OK
    );
    // The owner's success does not clear the guesser's pause.
    let res = login_from(&a, "127.0.0.2", "ann", PASSWORD).await;
    problem(res, StatusCode::TOO_MANY_REQUESTS).await;
    b.stop().await;
    a.stop().await;
}

/// A crowd of addresses shares one budget per account: past it, each address that has tried
/// already waits, while an address new to the account is still checked.
async fn an_account_budget_bounds_a_crowd_of_guessers(backend: Backend) {
    let settings = Settings {
        login: LoginLimits {
            per_ip_per_minute: 1000,
            max_failures: 10,
            account_budget: 4,
            ..LoginLimits::default()
        },
        ..Settings::default()
    };
    let t = TestApp::spawn_with(backend, settings, HttpSettings::default()).await;
    t.register("ann").await;
    for n in 10..15 {
        let res = login_from(&t, &format!("127.0.0.{n}"), "ann", "wrong password!").await;
        problem(res, StatusCode::UNAUTHORIZED).await;
    }
    // Five failures, budget four: the guessers' second tries wait.
    for n in 10..15 {
        let res = login_from(&t, &format!("127.0.0.{n}"), "ann", "another guess!").await;
        problem(res, StatusCode::TOO_MANY_REQUESTS).await;
    }
    // The owner from an address new to the account gets in.
    assert_eq!(
        login_from(&t, "127.0.0.20", "ann", PASSWORD).await.status(),
        StatusCode::OK
    );
    t.stop().await;
}

async fn login_is_throttled_per_client_address(backend: Backend) {
    let settings = Settings {
        login: LoginLimits {
            per_ip_per_minute: 4,
            ..LoginLimits::default()
        },
        ..Settings::default()
    };
    let t = TestApp::spawn_with(backend, settings, HttpSettings::default()).await;
    // Registering checks a password too: it takes one of the four attempts.
    t.register("ann").await;
    for _ in 0..3 {
        assert_eq!(t.login("ann", PASSWORD).await.status(), StatusCode::OK);
    }
    let res = t.login("ann", PASSWORD).await;
    assert!(res.headers().contains_key("retry-after"));
    problem(res, StatusCode::TOO_MANY_REQUESTS).await;
    t.stop().await;
}

async fn bad_bearer_tokens_are_refused(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    let res = t.req(Method::GET, "/auth/profile").send().await.unwrap();
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    problem(res, StatusCode::UNAUTHORIZED).await;
    for header in [
        "Bearer",
        "Bearer not.a.jwt",
        "Basic YWxhZGRpbjpvcGVuc2VzYW1l",
    ] {
        let res = t
            .req(Method::GET, "/auth/profile")
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        problem(res, StatusCode::UNAUTHORIZED).await;
    }
    // A well-formed token signed with another secret.
    let other = auth::token::AccessTokenIssuer::new(
        b"another secret, also long enough for HS256",
        control_plane::app::TOKEN_ISSUER,
        control_plane::app::TOKEN_AUDIENCE,
    )
    .unwrap();
    let (forged, _) = other
        .issue(
            uuid::Uuid::new_v4(),
            auth::Role::Admin,
            0,
            chrono::Utc::now(),
        )
        .unwrap();
    let res = t
        .req(Method::GET, "/machines")
        .bearer_auth(forged)
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::UNAUTHORIZED).await;
    t.stop().await;
}
