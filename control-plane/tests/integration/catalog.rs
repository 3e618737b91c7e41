//! Images (admins register, everyone lists), saved SSH keys, and the admin-only host list.

use crate::both_stores;
use crate::common::{problem, Backend, TestApp, ED25519};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

both_stores!(
    admins_register_images_and_everyone_lists_them,
    ssh_keys_are_per_user,
    hosts_are_for_admins,
);

async fn admins_register_images_and_everyone_lists_them(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    let ann = t.user("ann").await;
    let root = t.admin("root").await;
    let body = json!({
        "name": "tiny", "source": "file:///var/lib/skygate/images/tiny/", "format": "kernel",
        "boot": {"kernel": "file:///var/lib/skygate/images/tiny/vmlinuz",
                 "initrd": "file:///var/lib/skygate/images/tiny/initrd.img",
                 "cmdline": "console=ttyS0", "kernel_sha256": "a".repeat(64)}
    });
    problem(
        t.as_user(&ann, Method::POST, "/images")
            .json(&body)
            .send()
            .await
            .unwrap(),
        StatusCode::FORBIDDEN,
    )
    .await;
    let res = t
        .as_user(&root, Method::POST, "/images")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let image: Value = res.json().await.unwrap();
    assert_eq!(image["name"], "tiny");
    assert_eq!(image["boot"]["cmdline"], "console=ttyS0");
    problem(
        t.as_user(&root, Method::POST, "/images")
            .json(&body)
            .send()
            .await
            .unwrap(),
        StatusCode::CONFLICT,
    )
    .await;
    let bad = json!({"name": "x", "source": "ftp://example/x", "format": "qcow2"});
    problem(
        t.as_user(&root, Method::POST, "/images")
            .json(&bad)
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let list: Value = t.get_json(&ann, "/images").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(list["items"][0]["name"], "tiny");
    t.stop().await;
}

async fn ssh_keys_are_per_user(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    let ann = t.user("ann").await;
    let bob = t.user("bob").await;
    let res = t
        .as_user(&ann, Method::POST, "/ssh-keys")
        .json(&json!({"name": "laptop", "public_key": ED25519}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let key: Value = res.json().await.unwrap();
    assert!(key["fingerprint"].as_str().unwrap().starts_with("SHA256:"));
    problem(
        t.as_user(&ann, Method::POST, "/ssh-keys")
            .json(&json!({"name": "laptop", "public_key": ED25519}))
            .send()
            .await
            .unwrap(),
        StatusCode::CONFLICT,
    )
    .await;
    problem(
        t.as_user(&ann, Method::POST, "/ssh-keys")
            .json(&json!({"name": "bad", "public_key": "ssh-ed25519 AAAA"}))
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let bobs: Value = t.get_json(&bob, "/ssh-keys").await;
    assert_eq!(bobs["items"], json!([]));
    let path = format!("/ssh-keys/{}", key["id"].as_str().unwrap());
    problem(
        t.as_user(&bob, Method::DELETE, &path).send().await.unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_eq!(
        t.as_user(&ann, Method::DELETE, &path)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    let anns: Value = t.get_json(&ann, "/ssh-keys").await;
    assert_eq!(anns["items"], json!([]));
    t.stop().await;
}

async fn hosts_are_for_admins(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    let ann = t.user("ann").await;
    let root = t.admin("root").await;
    problem(
        t.as_user(&ann, Method::GET, "/hosts").send().await.unwrap(),
        StatusCode::FORBIDDEN,
    )
    .await;
    let res = t
        .as_user(&root, Method::GET, "/hosts")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"items": []}));
    t.stop().await;
}
