//! API tokens (issue 15): minted by a logged-in tenant, listed without their secret, accepted
//! as bearer tokens within their scope, never for the password or more tokens, revoked at once.

use crate::both_stores;
use crate::common::{machine_body, problem, Backend, Session, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

both_stores!(api_tokens_act_within_their_scope_until_revoked_expired_or_disabled);

/// A session whose bearer is `token` (no refresh token).
fn bearer(token: &str) -> Session {
    Session {
        access: token.to_owned(),
        refresh: String::new(),
    }
}

async fn mint(t: &TestApp, who: &Session, name: &str, scope: &str) -> Value {
    let res = t
        .as_user(who, Method::POST, "/tokens")
        .json(&json!({"name": name, "scope": scope, "expires_in_days": 30}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    res.json().await.unwrap()
}

async fn api_tokens_act_within_their_scope_until_revoked_expired_or_disabled(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let root = t.admin("root").await;
    let ann = t.user("ann").await;
    let read = mint(&t, &ann, "dashboard", "read").await;
    let full = mint(&t, &ann, "ci", "full").await;
    let secret = read["token"].as_str().unwrap();
    assert!(secret.starts_with("sgt_"), "{read}");
    assert_eq!(read["scope"], "read");
    let reader = bearer(secret);
    let writer = bearer(full["token"].as_str().unwrap());

    // Listed without secrets; only the hash is stored.
    let list = t.get_json(&ann, "/tokens").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    assert!(!list.to_string().contains("sgt_"), "{list}");
    assert_eq!(list["items"][0]["last_used_at"], Value::Null);
    assert!(t.store.api_token_by_hash(secret).await.unwrap().is_none());

    // A read token reads, and nothing else.
    t.get_json(&reader, "/machines").await;
    let res = t.create_machine(&reader, "nope").await;
    let body = problem(res, StatusCode::FORBIDDEN).await;
    assert!(
        body["detail"].as_str().unwrap().contains("read-only"),
        "{body}"
    );
    // A full token acts as its owner...
    assert_eq!(
        t.create_machine(&writer, "web").await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        t.get_json(&writer, "/auth/profile").await["username"],
        "ann"
    );
    // ... but never changes the password or mints tokens.
    let res = t
        .as_user(&writer, Method::PATCH, "/auth/profile")
        .json(&json!({"password": "an entirely new one", "current_password": crate::common::PASSWORD}))
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::FORBIDDEN).await;
    let res = t
        .as_user(&writer, Method::POST, "/tokens")
        .json(&json!({"name": "more", "scope": "full", "expires_in_days": 1}))
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::FORBIDDEN).await;
    // Use shows in the list.
    let list = t.get_json(&ann, "/tokens").await;
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|tok| tok["last_used_at"].is_string()),
        "{list}"
    );

    // Bad requests say what is wrong.
    for (body, status) in [
        (
            json!({"name": "ci", "scope": "full", "expires_in_days": 1}),
            StatusCode::CONFLICT,
        ),
        (
            json!({"name": "x", "scope": "full", "expires_in_days": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"name": "a b", "scope": "read", "expires_in_days": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            json!({"name": "x", "scope": "admin", "expires_in_days": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let res = t
            .as_user(&ann, Method::POST, "/tokens")
            .json(&body)
            .send()
            .await
            .unwrap();
        problem(res, status).await;
    }

    // Revoked: refused with the next request. Nobody else can revoke it.
    let bob = t.user("bob").await;
    let read_id = read["id"].as_str().unwrap();
    let res = t
        .as_user(&bob, Method::DELETE, &format!("/tokens/{read_id}"))
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::NOT_FOUND).await;
    let res = t
        .as_user(&ann, Method::DELETE, &format!("/tokens/{read_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let res = t
        .as_user(&reader, Method::GET, "/machines")
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::UNAUTHORIZED).await;

    // Expired: refused.
    let ann_id: control_plane::model::UserId = t.get_json(&ann, "/auth/profile").await["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let old = auth::api_token::ApiToken::generate();
    t.store
        .api_token_create(
            control_plane::store::api_tokens::NewApiToken {
                user_id: ann_id,
                name: "old",
                token_hash: &old.hash(),
                scope: skygate_api_types::TokenScope::Full,
                expires_at: chrono::Utc::now() - chrono::Duration::seconds(1),
            },
            50,
        )
        .await
        .unwrap();
    let res = t
        .as_user(&bearer(old.as_str()), Method::GET, "/machines")
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::UNAUTHORIZED).await;

    // Its owner disabled: refused at once.
    let res = t
        .as_user(&root, Method::POST, &format!("/users/{ann_id}/disable"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let res = t
        .as_user(&writer, Method::GET, "/machines")
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::UNAUTHORIZED).await;
    let _ = machine_body;
    t.stop().await;
}
