//! Machines: create, read, lifecycle requests, delete, validation, hostname uniqueness,
//! tenant isolation, idempotency keys and quotas.

use crate::both_stores;
use crate::common::{idempotency_hash, machine_body, problem, Backend, TestApp, ED25519};
use control_plane::api::HttpSettings;
use control_plane::app::Settings;
use control_plane::model::Quota;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

both_stores!(
    creates_written_together_are_each_judged_alone,
    create_read_list_and_delete_a_machine,
    machine_input_is_validated,
    duplicate_hostname_names_the_existing_machine_and_frees_after_delete,
    tenants_never_see_each_others_machines,
    lifecycle_requests_follow_the_state_machine,
    idempotency_key_replays_refuses_mismatch_and_in_flight,
    quotas_limit_what_a_tenant_holds,
    concurrent_creates_never_exceed_the_quota,
    concurrent_stop_and_delete_never_undo_a_delete,
    hostile_strings_are_refused_not_500,
    labels_are_set_changed_and_filter_the_list_a_page_at_a_time,
);

/// Issue 15, labels: set at create, changed with PATCH as a merge patch (a string sets, null
/// removes, the rest stay), and `?label=KEY=VALUE` keeps only the machines carrying it, a page
/// at a time like any list; another tenant's labels never match.
async fn labels_are_set_changed_and_filter_the_list_a_page_at_a_time(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    let bob = t.user("bob").await;
    let mut prod = Vec::new();
    for i in 0..5 {
        let env = if i % 2 == 0 { "prod" } else { "dev" };
        let mut body = machine_body(&format!("m{i}"));
        body["labels"] = json!({"env": env, "team.io/owner": "ann"});
        let res = t
            .as_user(&ann, Method::POST, "/machines")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        let m: Value = res.json().await.unwrap();
        assert_eq!(m["labels"]["env"], env);
        if env == "prod" {
            prod.push(m["id"].as_str().unwrap().to_owned());
        }
    }
    let mut body = machine_body("bobs");
    body["labels"] = json!({"env": "prod"});
    let res = t
        .as_user(&bob, Method::POST, "/machines")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);

    // Ann's prod machines, two a page, newest first.
    let mut seen = Vec::new();
    let mut path = "/machines?label=env%3Dprod&limit=2".to_owned();
    loop {
        let page = t.get_json(&ann, &path).await;
        for m in page["items"].as_array().unwrap() {
            assert_eq!(m["labels"]["env"], "prod", "{m}");
            seen.push(m["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/machines?label=env%3Dprod&limit=2&cursor={c}"),
            None => break,
        }
    }
    prod.reverse();
    assert_eq!(seen, prod);

    // PATCH changes what it names; the filter follows at once.
    let first = &prod[0];
    let patch = |body: Value| {
        t.as_user(&ann, Method::PATCH, &format!("/machines/{first}"))
            .json(&body)
            .send()
    };
    let res = patch(json!({"labels": {"env": "staging", "tier": "web"}}))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let m: Value = res.json().await.unwrap();
    assert_eq!(
        m["labels"],
        json!({"env": "staging", "team.io/owner": "ann", "tier": "web"})
    );
    let page = t.get_json(&ann, "/machines?label=env%3Dprod").await;
    assert_eq!(page["items"].as_array().unwrap().len(), prod.len() - 1);
    let page = t.get_json(&ann, "/machines?label=env%3Dstaging").await;
    assert_eq!(page["items"][0]["id"], first.as_str());
    let owned = "/machines?label=team.io%2Fowner%3Dann";
    assert_eq!(
        t.get_json(&ann, owned).await["items"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    let res = patch(json!({"labels": {"team.io/owner": null}}))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let m: Value = res.json().await.unwrap();
    assert_eq!(m["labels"], json!({"env": "staging", "tier": "web"}));
    assert_eq!(
        t.get_json(&ann, owned).await["items"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    // Bob's prod machine is never in Ann's lists, and Ann's never in his.
    let bobs = t.get_json(&bob, "/machines?label=env%3Dprod").await;
    assert_eq!(bobs["items"].as_array().unwrap().len(), 1);

    // Bad labels and filters are refused with what is wrong.
    let many: serde_json::Map<String, Value> =
        (0..64).map(|i| (format!("k{i}"), json!("v"))).collect();
    for bad in [
        json!({"labels": {"Env": "x"}}),
        json!({"labels": {"env": "a b"}}),
        json!({"labels": {"env": 3}}),
        json!({"labels": {"Bad": null}}),
        // 64 more on top of the two it has: past the limit once merged.
        json!({ "labels": many }),
    ] {
        let res = t
            .as_user(&ann, Method::PATCH, &format!("/machines/{first}"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    let mut body = machine_body("badlabel");
    body["labels"] = json!({"-x": "y"});
    let res = t
        .as_user(&ann, Method::POST, "/machines")
        .json(&body)
        .send()
        .await
        .unwrap();
    let p = problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(p["detail"].as_str().unwrap().contains("label key"), "{p}");
    for filter in ["env", "Env%3Dx", "%3Dprod"] {
        let res = t
            .as_user(&ann, Method::GET, &format!("/machines?label={filter}"))
            .send()
            .await
            .unwrap();
        problem(res, StatusCode::BAD_REQUEST).await;
    }
    t.stop().await;
}

async fn concurrent_stop_and_delete_never_undo_a_delete(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    for round in 0..5 {
        let m: Value = t
            .create_machine(&ann, &format!("race{round}"))
            .await
            .json()
            .await
            .unwrap();
        let id = m["id"].as_str().unwrap();
        let stop = t
            .as_user(&ann, Method::POST, &format!("/machines/{id}/stop"))
            .send();
        let delete = t
            .as_user(&ann, Method::DELETE, &format!("/machines/{id}"))
            .send();
        let (stop, delete) = tokio::join!(stop, delete);
        let (stop, delete) = (stop.unwrap().status(), delete.unwrap().status());
        assert!(
            matches!(
                stop,
                StatusCode::ACCEPTED | StatusCode::CONFLICT | StatusCode::NOT_FOUND
            ),
            "{stop}"
        );
        if delete == StatusCode::ACCEPTED {
            let res = t
                .as_user(&ann, Method::GET, &format!("/machines/{id}"))
                .send()
                .await
                .unwrap();
            assert_eq!(
                res.status(),
                StatusCode::NOT_FOUND,
                "an accepted delete was undone"
            );
        } else {
            assert_eq!(delete, StatusCode::CONFLICT);
        }
    }
    t.stop().await;
}

async fn hostile_strings_are_refused_not_500(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    for username in ["ann\u{0}", &"x".repeat(10_000)] {
        problem(
            t.login(username, "whatever it is").await,
            StatusCode::UNAUTHORIZED,
        )
        .await;
    }
    for (field, value) in [
        ("image", json!("tiny\u{0}")),
        ("image", json!("t".repeat(5000))),
        ("ssh_keys", json!(["laptop\u{0}"])),
        ("user_data", json!("#cloud-config\u{0}")),
        ("hostname", json!("web\u{0}")),
    ] {
        let mut body = machine_body("web");
        body[field] = value;
        let res = t
            .as_user(&ann, Method::POST, "/machines")
            .json(&body)
            .send()
            .await
            .unwrap();
        problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    let res = t
        .as_user(&ann, Method::POST, "/ssh-keys")
        .json(&json!({"name": "k\u{0}", "public_key": ED25519}))
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    // A client's request id that is too long or odd is replaced, not echoed.
    let res = t
        .as_user(&ann, Method::GET, "/machines")
        .header("x-request-id", "x".repeat(500))
        .send()
        .await
        .unwrap();
    let id = res.headers()["x-request-id"].to_str().unwrap();
    assert!(id.parse::<uuid::Uuid>().is_ok(), "{id}");
    t.stop().await;
}

async fn create_read_list_and_delete_a_machine(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    let res = t
        .as_user(&ann, Method::POST, "/machines")
        .json(
            &json!({"hostname": "web-1", "image": "tiny", "vcpus": 2, "memory_mib": 512,
                      "disk_gib": 10, "ssh_keys": [ED25519], "user_data": "#cloud-config\n"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    let m: Value = res.json().await.unwrap();
    let id = m["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/api/v1/machines/{id}"));
    assert_eq!(m["status"], "pending");
    assert_eq!(m["desired_state"], "running");
    assert_eq!(m["hostname"], "web-1");
    assert_eq!(m["image"], "tiny");
    assert_eq!(
        (
            m["vcpus"].as_i64(),
            m["memory_mib"].as_i64(),
            m["disk_gib"].as_i64()
        ),
        (Some(2), Some(512), Some(10))
    );
    assert_eq!(m["host"], Value::Null);
    assert_eq!(m["network"], json!({"addresses": [], "ports": []}));
    assert_eq!(m["failure_reason"], Value::Null);

    let got: Value = t.get_json(&ann, &location).await;
    assert_eq!(got, m);
    let list: Value = t.get_json(&ann, "/machines").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(list["items"][0]["id"], id.as_str());
    assert_eq!(list["next_cursor"], Value::Null);

    let res = t
        .as_user(&ann, Method::DELETE, &location)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let deleting: Value = res.json().await.unwrap();
    assert_eq!(deleting["status"], "deleting");
    assert_eq!(deleting["desired_state"], "deleted");
    problem(
        t.as_user(&ann, Method::GET, &location)
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
    )
    .await;
    let list: Value = t.get_json(&ann, "/machines").await;
    assert_eq!(list["items"], json!([]));

    // The log survives in the database: create, delete requested, deleted.
    let events = t
        .store
        .machine_events(id.parse().unwrap(), None, 10)
        .await
        .unwrap();
    let trail: Vec<_> = events
        .iter()
        .map(|e| (e.action.as_str(), e.status.as_str()))
        .collect();
    assert_eq!(
        trail,
        [
            ("create", "pending"),
            ("delete", "deleting"),
            ("delete", "deleted")
        ]
    );
    t.stop().await;
}

async fn machine_input_is_validated(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    let huge_user_data = "x".repeat(64 * 1024 + 1);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"hostname": "Web_1"}), "hostname"),
        (json!({"hostname": "-web"}), "hostname"),
        (json!({"hostname": "a".repeat(64)}), "hostname"),
        (json!({"vcpus": 0}), "vcpus"),
        (json!({"vcpus": 1000}), "vcpus"),
        (json!({"memory_mib": 1}), "memory_mib"),
        (json!({"disk_gib": 0}), "disk_gib"),
        (json!({"disk_gib": 1_000_000}), "disk_gib"),
        (json!({"image": "nope"}), "image"),
        (json!({"user_data": huge_user_data}), "user_data"),
        (json!({"ssh_keys": ["ssh-rsa not-a-key"]}), "ssh_keys"),
        (json!({"ssh_keys": ["no-such-saved-key"]}), "ssh_keys"),
        (json!({"memory_mb": 256}), "memory_mb"),
        (json!({"vcpus": "two"}), "vcpus"),
    ];
    for (patch, mentions) in cases {
        let mut body = machine_body("web");
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let res = t
            .as_user(&ann, Method::POST, "/machines")
            .json(&body)
            .send()
            .await
            .unwrap();
        let p = problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert!(
            p["detail"].as_str().unwrap().contains(mentions),
            "{mentions}: {p}"
        );
    }
    // Malformed JSON, wrong media type, oversized body: problems too, never 500.
    let res = t
        .as_user(&ann, Method::POST, "/machines")
        .header("content-type", "application/json")
        .body("{\"hostname\": ")
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::BAD_REQUEST).await;
    let res = t
        .as_user(&ann, Method::POST, "/machines")
        .header("content-type", "text/plain")
        .body("hostname=web")
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    // Refused from the announced length alone, before the body is read.
    let (status, content_type, body) = t
        .announce_oversized_post(&ann, "/api/v1/machines", 2 << 20)
        .await;
    assert_eq!(
        (status, content_type.as_str()),
        (413, "application/problem+json")
    );
    assert_eq!(body["status"], 413);
    assert!(!body["request_id"].as_str().unwrap().is_empty());

    // A saved key may be referenced by name.
    let res = t
        .as_user(&ann, Method::POST, "/ssh-keys")
        .json(&json!({"name": "laptop", "public_key": ED25519}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let mut body = machine_body("web");
    body["ssh_keys"] = json!(["laptop"]);
    let res = t
        .as_user(&ann, Method::POST, "/machines")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let m: Value = res.json().await.unwrap();
    // What the machine's agent will be sent.
    let rec = t
        .store
        .machine_for_task(m["id"].as_str().unwrap().parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.ssh_keys, vec![ED25519.to_owned()]);
    t.stop().await;
}

async fn duplicate_hostname_names_the_existing_machine_and_frees_after_delete(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    let bob = t.user("bob").await;
    let first: Value = t.create_machine(&ann, "web").await.json().await.unwrap();
    let p = problem(t.create_machine(&ann, "web").await, StatusCode::CONFLICT).await;
    assert_eq!(p["existing_machine_id"], first["id"]);
    assert!(p["detail"].as_str().unwrap().contains("'web'"));
    // Another tenant may use the same name.
    assert_eq!(
        t.create_machine(&bob, "web").await.status(),
        StatusCode::ACCEPTED
    );
    let path = format!("/machines/{}", first["id"].as_str().unwrap());
    assert_eq!(
        t.as_user(&ann, Method::DELETE, &path)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::ACCEPTED
    );
    let again: Value = t.create_machine(&ann, "web").await.json().await.unwrap();
    assert_ne!(again["id"], first["id"]);
    t.stop().await;
}

/// Creates that arrive together are written together (one transaction for many); each is
/// still judged alone: of two with one name, one is made and the other names it; other
/// tenants' creates in the same batch are not affected; what the answer shows is what a read
/// shows.
async fn creates_written_together_are_each_judged_alone(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    let bob = t.user("bob").await;
    let asks: Vec<(&crate::common::Session, String)> = (0..48)
        .map(|i| match i % 3 {
            0 | 1 => (&ann, format!("a{}", i / 3)),
            _ => (&bob, format!("a{}", i / 3)),
        })
        .collect();
    let creates = asks.iter().map(|(who, name)| t.create_machine(who, name));
    let results = futures::future::join_all(creates).await;
    let mut made: std::collections::HashMap<(bool, String), String> = Default::default();
    let mut refused = Vec::new();
    for (i, res) in results.into_iter().enumerate() {
        let is_ann = i % 3 != 2;
        match res.status() {
            StatusCode::ACCEPTED => {
                let m: Value = res.json().await.unwrap();
                let shown = t
                    .get_json(
                        if is_ann { &ann } else { &bob },
                        &format!("/machines/{}", m["id"].as_str().unwrap()),
                    )
                    .await;
                assert_eq!(shown["hostname"], m["hostname"]);
                assert_eq!(shown["status"], "pending");
                assert_eq!(shown["image"], m["image"]);
                assert_eq!(shown["created_at"], m["created_at"], "{shown} vs {m}");
                let previous = made.insert(
                    (is_ann, m["hostname"].as_str().unwrap().to_owned()),
                    m["id"].as_str().unwrap().to_owned(),
                );
                assert!(previous.is_none(), "two machines named {}", m["hostname"]);
            }
            StatusCode::CONFLICT => {
                assert!(is_ann, "bob's names are all distinct");
                refused.push(problem(res, StatusCode::CONFLICT).await);
            }
            other => panic!("create {i}: {other}"),
        }
    }
    // 16 names each for ann (asked twice) and bob (once).
    assert_eq!(made.len(), 32);
    assert_eq!(refused.len(), 16);
    for p in refused {
        let name = p["detail"]
            .as_str()
            .unwrap()
            .split('\'')
            .nth(1)
            .unwrap()
            .to_owned();
        assert_eq!(
            p["existing_machine_id"].as_str(),
            made.get(&(true, name)).map(String::as_str)
        );
    }
    t.stop().await;
}

async fn tenants_never_see_each_others_machines(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    let bob = t.user("bob").await;
    let root = t.admin("root").await;
    let m: Value = t.create_machine(&ann, "secret").await.json().await.unwrap();
    let id = m["id"].as_str().unwrap();
    for (method, path) in [
        (Method::GET, format!("/machines/{id}")),
        (Method::GET, format!("/machines/{id}/events")),
        (Method::GET, format!("/machines/{id}/console")),
        (Method::POST, format!("/machines/{id}/start")),
        (Method::POST, format!("/machines/{id}/stop")),
        (Method::POST, format!("/machines/{id}/reboot")),
        (Method::DELETE, format!("/machines/{id}")),
    ] {
        let res = t.as_user(&bob, method.clone(), &path).send().await.unwrap();
        problem(res, StatusCode::NOT_FOUND).await;
    }
    let untouched: Value = t.get_json(&ann, &format!("/machines/{id}")).await;
    assert_eq!(
        (
            untouched["status"].as_str(),
            untouched["desired_state"].as_str()
        ),
        (Some("pending"), Some("running"))
    );
    let events: Value = t.get_json(&ann, &format!("/machines/{id}/events")).await;
    assert_eq!(events["items"].as_array().unwrap().len(), 1, "{events}");
    let bobs: Value = t.get_json(&bob, "/machines").await;
    assert_eq!(bobs["items"], json!([]));
    // Administrators see every tenant's machines.
    let all: Value = t.get_json(&root, "/machines").await;
    assert_eq!(all["items"][0]["id"], id);
    let res = t
        .as_user(&root, Method::GET, &format!("/machines/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // Still there for its owner.
    let res = t
        .as_user(&ann, Method::GET, &format!("/machines/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    t.stop().await;
}

async fn lifecycle_requests_follow_the_state_machine(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    let m: Value = t.create_machine(&ann, "web").await.json().await.unwrap();
    let id = m["id"].as_str().unwrap();
    let act = |action: &str| {
        t.as_user(&ann, Method::POST, &format!("/machines/{id}/{action}"))
            .send()
    };

    // Pending: a stop changes what will be built, a second stop makes no sense.
    let res = act("stop").await.unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let v: Value = res.json().await.unwrap();
    assert_eq!(
        (v["status"].as_str(), v["desired_state"].as_str()),
        (Some("pending"), Some("stopped"))
    );
    let p = problem(act("stop").await.unwrap(), StatusCode::CONFLICT).await;
    assert!(p["detail"]
        .as_str()
        .unwrap()
        .contains("cannot stop a machine that is pending"));
    problem(act("reboot").await.unwrap(), StatusCode::CONFLICT).await;
    let v: Value = act("start").await.unwrap().json().await.unwrap();
    assert_eq!(v["desired_state"], "running");
    problem(act("start").await.unwrap(), StatusCode::CONFLICT).await;
    problem(act("hibernate").await.unwrap(), StatusCode::NOT_FOUND).await;

    let events: Value = t.get_json(&ann, &format!("/machines/{id}/events")).await;
    let actions: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["create", "stop", "start"]);
    assert!(events["items"][0]["message"]
        .as_str()
        .unwrap()
        .contains("waiting for a host"));
    // Not on a host: no console yet, and it says so.
    let p = problem(
        t.as_user(&ann, Method::GET, &format!("/machines/{id}/console"))
            .send()
            .await
            .unwrap(),
        StatusCode::CONFLICT,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("not on a host"));
    t.stop().await;
}

async fn idempotency_key_replays_refuses_mismatch_and_in_flight(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    let bob = t.user("bob").await;
    let post = |who, key: &str, body: Value| {
        t.as_user(who, Method::POST, "/machines")
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };
    let first = post(&ann, "key-1", machine_body("web")).await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let location = first.headers()["location"].clone();
    let first: Value = first.json().await.unwrap();
    // Same key, same body (keys in another order): the first answer again, no second machine.
    let reordered =
        json!({"disk_gib": 1, "memory_mib": 256, "vcpus": 1, "image": "tiny", "hostname": "web"});
    let again = post(&ann, "key-1", reordered).await.unwrap();
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(again.headers()["location"], location);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    let list: Value = t.get_json(&ann, "/machines").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    // Same key, other body: refused.
    problem(
        post(&ann, "key-1", machine_body("db")).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    // Keys are per user.
    assert_eq!(
        post(&bob, "key-1", machine_body("web"))
            .await
            .unwrap()
            .status(),
        StatusCode::ACCEPTED
    );
    // A failed first attempt does not burn the key.
    problem(
        post(&ann, "key-2", machine_body("web")).await.unwrap(),
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(
        post(&ann, "key-2", machine_body("api"))
            .await
            .unwrap()
            .status(),
        StatusCode::ACCEPTED
    );
    // A key whose first request is still running: 409.
    let ann_id: Value = t.get_json(&ann, "/auth/profile").await;
    let in_flight_hash = idempotency_hash(&machine_body("x"));
    let claim = t
        .store
        .idempotency_claim(
            ann_id["id"].as_str().unwrap().parse().unwrap(),
            "key-3",
            &in_flight_hash,
            chrono::Utc::now(),
            chrono::Duration::seconds(60),
            chrono::Duration::hours(24),
        )
        .await
        .unwrap();
    assert!(matches!(
        claim,
        control_plane::store::idempotency::Claim::Claimed { .. }
    ));
    problem(
        post(&ann, "key-3", machine_body("x")).await.unwrap(),
        StatusCode::CONFLICT,
    )
    .await;
    // Malformed keys are refused.
    problem(
        post(&ann, "", machine_body("y")).await.unwrap(),
        StatusCode::BAD_REQUEST,
    )
    .await;
    problem(
        post(&ann, &"k".repeat(300), machine_body("y"))
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
    )
    .await;
    t.stop().await;
}

async fn quotas_limit_what_a_tenant_holds(backend: Backend) {
    let settings = Settings {
        quota: Quota {
            max_machines: 2,
            max_vcpus: 3,
            max_memory_mib: 4096,
        },
        ..Settings::default()
    };
    let t = TestApp::spawn_with(backend, settings, HttpSettings::default()).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    let mut big = machine_body("big");
    big["vcpus"] = json!(3);
    assert_eq!(
        t.as_user(&ann, Method::POST, "/machines")
            .json(&big)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::ACCEPTED
    );
    let p = problem(
        t.create_machine(&ann, "one-more").await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert!(
        p["detail"].as_str().unwrap().contains("vCPUs limit is 3"),
        "{p}"
    );
    assert_eq!(p["type"], "urn:skygate:problem:quota-exceeded");
    // Freeing capacity frees quota.
    let list: Value = t.get_json(&ann, "/machines").await;
    let id = list["items"][0]["id"].as_str().unwrap();
    t.as_user(&ann, Method::DELETE, &format!("/machines/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        t.create_machine(&ann, "a").await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        t.create_machine(&ann, "b").await.status(),
        StatusCode::ACCEPTED
    );
    let p = problem(t.create_machine(&ann, "c").await, StatusCode::FORBIDDEN).await;
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("machines limit is 2"),
        "{p}"
    );
    t.stop().await;
}

async fn concurrent_creates_never_exceed_the_quota(backend: Backend) {
    let settings = Settings {
        quota: Quota {
            max_machines: 5,
            ..Quota::default()
        },
        ..Settings::default()
    };
    let t = TestApp::spawn_with(backend, settings, HttpSettings::default()).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    // 32 at once, twice: the second round after two deletions frees exactly two places.
    let mut accepted_ids = Vec::new();
    for (round, expected) in [(0, 5), (1, 2)] {
        let names: Vec<String> = (0..32).map(|i| format!("r{round}m{i}")).collect();
        let results =
            futures::future::join_all(names.iter().map(|n| t.create_machine(&ann, n))).await;
        assert!(results
            .iter()
            .all(|r| r.status() == StatusCode::ACCEPTED || r.status() == StatusCode::FORBIDDEN));
        let mut accepted = Vec::new();
        for r in results {
            if r.status() == StatusCode::ACCEPTED {
                accepted.push(
                    r.json::<Value>().await.unwrap()["id"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                );
            }
        }
        assert_eq!(accepted.len(), expected, "round {round}");
        accepted_ids.extend(accepted);
        if round == 0 {
            for id in accepted_ids.drain(..2) {
                let res = t
                    .as_user(&ann, Method::DELETE, &format!("/machines/{id}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), StatusCode::ACCEPTED);
            }
        }
    }
    // The kept total is what a fresh count of the live machines says.
    let me = t.get_json(&ann, "/auth/profile").await;
    let owner = me["id"].as_str().unwrap().parse().unwrap();
    let kept = t.store.tenant_usage(owner).await.unwrap();
    let listed = t.get_json(&ann, "/machines?limit=100").await["items"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(kept.machines, 5);
    assert_eq!(listed, 5);
    assert_eq!(
        kept.memory_mib,
        5 * machine_body("x")["memory_mib"].as_i64().unwrap()
    );
    t.stop().await;
}
