//! Images (admins register, everyone lists), saved SSH keys, and the admin-only host list.

use crate::both_stores;
use crate::common::{problem, Backend, TestApp, ED25519};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

both_stores!(
    admins_register_images_and_everyone_lists_them,
    ssh_keys_are_per_user,
    ssh_keys_are_bounded_checked_like_the_agent_and_paged,
    hosts_are_for_admins,
    a_deprecated_image_refuses_new_machines_and_keeps_the_old_ones,
);

/// Issue 14, images: once deprecated, an image refuses new machines with a 422 naming it, and
/// machines made from it keep working and showing it; restoring it lets creates through.
async fn a_deprecated_image_refuses_new_machines_and_keeps_the_old_ones(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let root = t.admin("root").await;
    let ann = t.user("ann").await;
    let res = t.create_machine(&ann, "old").await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let old: Value = res.json().await.unwrap();
    let images = t.get_json(&ann, "/images").await;
    let tiny = images["items"][0].clone();
    assert_eq!(tiny["deprecated_at"], Value::Null);
    let id = tiny["id"].as_str().unwrap();

    let res = t
        .as_user(&ann, Method::POST, &format!("/images/{id}/deprecate"))
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::FORBIDDEN).await;
    let res = t
        .as_user(&root, Method::POST, &format!("/images/{id}/deprecate"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let deprecated: Value = res.json().await.unwrap();
    let when = deprecated["deprecated_at"].clone();
    assert!(when.is_string(), "{deprecated}");
    // Again: nothing changes, the first time stays.
    let again: Value = t
        .as_user(&root, Method::POST, &format!("/images/{id}/deprecate"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["deprecated_at"], when);
    // Tenants see it marked.
    assert_eq!(
        t.get_json(&ann, "/images").await["items"][0]["deprecated_at"],
        when
    );

    let body = problem(
        t.create_machine(&ann, "new").await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("'tiny' is deprecated"), "{detail}");
    let kept = t
        .get_json(&ann, &format!("/machines/{}", old["id"].as_str().unwrap()))
        .await;
    assert_eq!(kept["image"], "tiny");
    assert_eq!(kept["status"], old["status"]);

    let res = t
        .as_user(&root, Method::POST, &format!("/images/{id}/undeprecate"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.json::<Value>().await.unwrap()["deprecated_at"],
        Value::Null
    );
    assert_eq!(
        t.create_machine(&ann, "new").await.status(),
        StatusCode::ACCEPTED
    );
    let res = t
        .as_user(
            &root,
            Method::POST,
            &format!("/images/{}/deprecate", uuid::Uuid::new_v4()),
        )
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::NOT_FOUND).await;
    t.stop().await;
}

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
    // Boot details of the wrong shape are refused before anything is stored: no kernel, a
    // field that does not exist, a string instead of the object, a bad digest.
    for boot in [
        json!({"initrd": "file:///i"}),
        json!({"kernel": "file:///k", "extra": "1"}),
        json!("file:///k"),
        json!({"kernel": "file:///k", "kernel_sha256": "XYZ"}),
    ] {
        let bad = json!({"name": "k", "source": "file:///k/", "format": "kernel", "boot": boot});
        problem(
            t.as_user(&root, Method::POST, "/images")
                .json(&bad)
                .send()
                .await
                .unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    }
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
    // A tenant's malformed body is still "forbidden" (issue 10: it was 422, telling a tenant
    // what an administrator's request must look like).
    for junk in [json!({"nonsense": true}), json!([])] {
        problem(
            t.as_user(&ann, Method::POST, "/images")
                .json(&junk)
                .send()
                .await
                .unwrap(),
            StatusCode::FORBIDDEN,
        )
        .await;
    }
    // Tenants see what they can boot, not where it comes from.
    let list: Value = t.get_json(&ann, "/images").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let tiny = &list["items"][0];
    assert_eq!(tiny["name"], "tiny");
    assert_eq!(tiny["direct_kernel_boot"], true);
    assert!(
        tiny.get("source").is_none() && tiny.get("boot").is_none(),
        "{tiny}"
    );
    let list: Value = t.get_json(&root, "/images").await;
    assert_eq!(
        list["items"][0]["source"],
        "file:///var/lib/skygate/images/tiny/"
    );
    assert_eq!(list["items"][0]["boot"]["cmdline"], "console=ttyS0");
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

/// Before (issue 10): no cap on count or comment, CR/BEL accepted by the API and then refused
/// by the agent (failing the machine), and an unpaged list (88 MiB for 100 keys).
async fn ssh_keys_are_bounded_checked_like_the_agent_and_paged(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    let ann = t.user("ann").await;
    let add = |name: String, key: String| {
        t.as_user(&ann, Method::POST, "/ssh-keys")
            .json(&json!({"name": name, "public_key": key}))
            .send()
    };
    let base = ED25519
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    for (comment, why) in [
        ("ann\r\u{7}".to_owned(), "control character"),
        ("c".repeat(2000), "comment is longer"),
    ] {
        let res = add("bad".into(), format!("{base} {comment}"))
            .await
            .unwrap();
        let p = problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert!(p["detail"].as_str().unwrap().contains(why), "{p}");
        // Given inline to a machine, the same rule answers before anything is created.
        let res = t
            .as_user(&ann, Method::POST, "/machines")
            .json(
                &json!({"hostname": "k1", "image": "none", "vcpus": 1, "memory_mib": 128,
                "disk_gib": 1, "ssh_keys": [format!("{base} {comment}")]}),
            )
            .send()
            .await
            .unwrap();
        let p = problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert!(p["detail"].as_str().unwrap().contains(why), "{p}");
    }
    let max = control_plane::app::ssh_keys::MAX_SAVED_KEYS;
    for n in 0..max {
        let res = add(format!("k{n:03}"), format!("{base} key-{n}"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
    }
    let res = add("one-more".into(), format!("{base} more"))
        .await
        .unwrap();
    let p = problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(
        p["detail"].as_str().unwrap().contains("delete one first"),
        "{p}"
    );
    // Paged in name order, every key once.
    let mut names = Vec::new();
    let mut path = "/ssh-keys?limit=30".to_owned();
    loop {
        let page: Value = t.get_json(&ann, &path).await;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 30);
        names.extend(items.iter().map(|k| k["name"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/ssh-keys?limit=30&cursor={c}"),
            None => break,
        }
    }
    let expected: Vec<String> = (0..max).map(|n| format!("k{n:03}")).collect();
    assert_eq!(names, expected);
    let first: Value = t.get_json(&ann, "/ssh-keys").await;
    assert_eq!(first["items"].as_array().unwrap().len(), 50);
    problem(
        t.as_user(&ann, Method::GET, "/ssh-keys?limit=500")
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
    )
    .await;
    problem(
        t.as_user(&ann, Method::GET, "/ssh-keys?cursor=forged")
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
    )
    .await;
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
