//! Account administration (issue 14): listing accounts, disabling and enabling them, roles,
//! and per-tenant limits shown in the profile.

use crate::both_stores;
use crate::common::{problem, Backend, Session, TestApp, PASSWORD};
use control_plane::api::HttpSettings;
use control_plane::app::Settings;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

both_stores!(
    administrators_list_accounts_a_page_at_a_time_by_name_email_and_role,
    a_disabled_account_loses_its_sessions_at_once_and_keeps_its_machines,
    a_role_change_takes_effect_on_the_next_request,
    a_tenants_own_limits_bound_its_creates_and_show_in_its_profile,
    two_administrators_demoting_each_other_at_once_leave_one,
);

/// The id of the account `username`, as the profile tells its owner.
async fn id_of(t: &TestApp, who: &Session) -> String {
    let me = t.get_json(who, "/auth/profile").await;
    me["id"].as_str().unwrap().to_owned()
}

/// Accounts made directly (the HTTP register route is rate-limited per address).
async fn accounts(t: &TestApp, names: &[&str]) {
    for name in names {
        t.app
            .register(
                name,
                &format!("{}@Example.COM", name.replace('_', ".")),
                PASSWORD,
                auth::Role::User,
            )
            .await
            .unwrap();
    }
}

fn usernames(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap().to_owned())
        .collect()
}

async fn administrators_list_accounts_a_page_at_a_time_by_name_email_and_role(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    let root = t.admin("root").await;
    accounts(&t, &["carol", "ann", "bob_smith", "dave", "percent_x"]).await;

    // Every account, two at a time, in username order; the cursor leads to the next page.
    let mut seen = Vec::new();
    let mut path = "/users?limit=2".to_owned();
    loop {
        let page = t.get_json(&root, &path).await;
        let names = usernames(&page);
        assert!(names.len() <= 2, "{page}");
        seen.extend(names);
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/users?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(
        seen,
        ["ann", "bob_smith", "carol", "dave", "percent_x", "root"]
    );

    // By part of the e-mail address, in any case ("bob.smith@Example.COM").
    let found = t.get_json(&root, "/users?search=SMITH%40example").await;
    assert_eq!(usernames(&found), ["bob_smith"]);
    // A wildcard is taken literally: '_' matches only an underscore.
    let found = t.get_json(&root, "/users?search=t_x").await;
    assert_eq!(usernames(&found), ["percent_x"]);
    let found = t.get_json(&root, "/users?search=%25").await;
    assert_eq!(usernames(&found), Vec::<String>::new());
    let admins = t.get_json(&root, "/users?role=admin").await;
    assert_eq!(usernames(&admins), ["root"]);
    assert_eq!(admins["items"][0]["disabled_at"], Value::Null);

    // One account by id.
    let ann_id = found_id(&t, &root, "ann").await;
    let ann = t.get_json(&root, &format!("/users/{ann_id}")).await;
    assert_eq!(ann["email"], "ann@Example.COM");
    assert!(ann.get("password_hash").is_none(), "{ann}");

    // Bad input: a clear problem, never a 500.
    let res = t
        .as_user(&root, Method::GET, "/users?role=owner")
        .send()
        .await
        .unwrap();
    let body = problem(res, StatusCode::BAD_REQUEST).await;
    assert!(body["detail"].as_str().unwrap().contains("role"), "{body}");
    let res = t
        .as_user(&root, Method::GET, "/users?cursor=forged")
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::BAD_REQUEST).await;
    let res = t
        .as_user(&root, Method::GET, "/users?limit=0")
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::BAD_REQUEST).await;
    let res = t
        .as_user(
            &root,
            Method::GET,
            &format!("/users/{}", uuid::Uuid::new_v4()),
        )
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::NOT_FOUND).await;

    // Tenants may not list accounts, nor read one.
    let eve = t.user("eve").await;
    for path in ["/users".to_owned(), format!("/users/{ann_id}")] {
        let res = t.as_user(&eve, Method::GET, &path).send().await.unwrap();
        problem(res, StatusCode::FORBIDDEN).await;
    }
    let res = t.req(Method::GET, "/users").send().await.unwrap();
    problem(res, StatusCode::UNAUTHORIZED).await;
    t.stop().await;
}

/// The id of `username` as an administrator finds it.
async fn found_id(t: &TestApp, admin: &Session, username: &str) -> String {
    let page = t
        .get_json(admin, &format!("/users?search={username}"))
        .await;
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["username"] == username)
        .unwrap_or_else(|| panic!("no {username} in {page}"))["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn a_disabled_account_loses_its_sessions_at_once_and_keeps_its_machines(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let root = t.admin("root").await;
    let ann = t.user("ann").await;
    let ann_id = id_of(&t, &ann).await;
    let res = t.create_machine(&ann, "web").await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let machine: Value = res.json().await.unwrap();
    let machine_path = format!("/machines/{}", machine["id"].as_str().unwrap());

    // A tenant cannot disable anyone; an administrator cannot disable themselves.
    let res = t
        .as_user(&ann, Method::POST, &format!("/users/{ann_id}/disable"))
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::FORBIDDEN).await;
    let root_id = id_of(&t, &root).await;
    let res = t
        .as_user(&root, Method::POST, &format!("/users/{root_id}/disable"))
        .send()
        .await
        .unwrap();
    let body = problem(res, StatusCode::CONFLICT).await;
    assert!(
        body["detail"].as_str().unwrap().contains("your own"),
        "{body}"
    );

    let res = t
        .as_user(&root, Method::POST, &format!("/users/{ann_id}/disable"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let disabled: Value = res.json().await.unwrap();
    assert!(disabled["disabled_at"].is_string(), "{disabled}");

    // Her access token stops working with the next request, her refresh token too.
    let res = t
        .as_user(&ann, Method::GET, "/auth/profile")
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::UNAUTHORIZED).await;
    let res = t
        .req(Method::POST, "/auth/refresh")
        .json(&json!({"refresh_token": ann.refresh}))
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::UNAUTHORIZED).await;
    // The right password hears that the account is disabled; a wrong one hears nothing new.
    let body = problem(t.login("ann", PASSWORD).await, StatusCode::FORBIDDEN).await;
    assert!(
        body["detail"].as_str().unwrap().contains("disabled"),
        "{body}"
    );
    problem(
        t.login("ann", "not her password at all").await,
        StatusCode::UNAUTHORIZED,
    )
    .await;

    // Her machine is untouched.
    let m = t.get_json(&root, &machine_path).await;
    assert_eq!(m["desired_state"], "running", "{m}");
    assert_ne!(m["status"], "deleting", "{m}");

    // Enabled again, she logs in anew and finds her machine.
    let res = t
        .as_user(&root, Method::POST, &format!("/users/{ann_id}/enable"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let enabled: Value = res.json().await.unwrap();
    assert_eq!(enabled["disabled_at"], Value::Null);
    let res = t.login("ann", PASSWORD).await;
    assert_eq!(res.status(), StatusCode::OK);
    let tokens: Value = res.json().await.unwrap();
    let ann = Session {
        access: tokens["access_token"].as_str().unwrap().to_owned(),
        refresh: tokens["refresh_token"].as_str().unwrap().to_owned(),
    };
    assert_eq!(t.get_json(&ann, &machine_path).await["id"], machine["id"]);

    let res = t
        .as_user(
            &root,
            Method::POST,
            &format!("/users/{}/disable", uuid::Uuid::new_v4()),
        )
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::NOT_FOUND).await;
    t.stop().await;
}

async fn a_role_change_takes_effect_on_the_next_request(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    let root = t.admin("root").await;
    let bob = t.user("bob").await;
    let bob_id = id_of(&t, &bob).await;
    let patch = |role: &str| json!({ "role": role });

    let res = t.as_user(&bob, Method::GET, "/users").send().await.unwrap();
    problem(res, StatusCode::FORBIDDEN).await;
    let res = t
        .as_user(&root, Method::PATCH, &format!("/users/{bob_id}"))
        .json(&patch("admin"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.json::<Value>().await.unwrap()["role"], "admin");
    // The token he already holds carries the new role.
    t.get_json(&bob, "/users").await;

    // Administrators cannot demote themselves, but may demote each other.
    let root_id = id_of(&t, &root).await;
    let res = t
        .as_user(&root, Method::PATCH, &format!("/users/{root_id}"))
        .json(&patch("user"))
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::CONFLICT).await;
    let res = t
        .as_user(&bob, Method::PATCH, &format!("/users/{bob_id}"))
        .json(&patch("user"))
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::CONFLICT).await;
    let res = t
        .as_user(&root, Method::PATCH, &format!("/users/{bob_id}"))
        .json(&patch("user"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let res = t.as_user(&bob, Method::GET, "/users").send().await.unwrap();
    problem(res, StatusCode::FORBIDDEN).await;

    for bad in [
        patch("owner"),
        json!({"role": "user", "admin": true}),
        json!({}),
    ] {
        let res = t
            .as_user(&root, Method::PATCH, &format!("/users/{bob_id}"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    t.stop().await;
}

async fn a_tenants_own_limits_bound_its_creates_and_show_in_its_profile(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let root = t.admin("root").await;
    let ann = t.user("ann").await;
    let ann_id = id_of(&t, &ann).await;
    let defaults = Settings::default().quota;

    // At first the server's defaults, nothing held.
    let me = t.get_json(&ann, "/auth/profile").await;
    assert_eq!(me["username"], "ann");
    assert_eq!(me["quota"]["max_machines"], defaults.max_machines);
    assert_eq!(me["quota"]["max_vcpus"], defaults.max_vcpus);
    assert_eq!(me["quota"]["overrides"]["max_machines"], Value::Null);
    assert_eq!(
        me["quota"]["usage"],
        json!({"machines": 0, "vcpus": 0, "memory_mib": 0})
    );

    // One machine and 2 vCPUs at most, memory left to the default.
    let quota_path = format!("/users/{ann_id}/quota");
    let res = t
        .as_user(&root, Method::PUT, &quota_path)
        .json(&json!({"max_machines": 1, "max_vcpus": 2, "max_memory_mib": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let q: Value = res.json().await.unwrap();
    assert_eq!(q["max_machines"], 1);
    assert_eq!(q["max_memory_mib"], defaults.max_memory_mib);
    assert_eq!(
        q["overrides"],
        json!({"max_machines": 1, "max_vcpus": 2, "max_memory_mib": null})
    );

    assert_eq!(
        t.create_machine(&ann, "one").await.status(),
        StatusCode::ACCEPTED
    );
    let body = problem(t.create_machine(&ann, "two").await, StatusCode::FORBIDDEN).await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("machines limit is 1"),
        "{body}"
    );
    let me = t.get_json(&ann, "/auth/profile").await;
    assert_eq!(me["quota"]["max_machines"], 1);
    assert_eq!(
        me["quota"]["usage"],
        json!({"machines": 1, "vcpus": 1, "memory_mib": 256})
    );
    // The tenant reads its own limits by id too, not another's.
    assert_eq!(t.get_json(&ann, &quota_path).await["max_machines"], 1);
    let root_id = id_of(&t, &root).await;
    let res = t
        .as_user(&ann, Method::GET, &format!("/users/{root_id}/quota"))
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::FORBIDDEN).await;
    // Nor sets its own.
    let res = t
        .as_user(&ann, Method::PUT, &quota_path)
        .json(&json!({"max_machines": 100, "max_vcpus": null, "max_memory_mib": null}))
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::FORBIDDEN).await;

    // Back to the defaults: the second machine fits.
    let res = t
        .as_user(&root, Method::PUT, &quota_path)
        .json(&json!({"max_machines": null, "max_vcpus": null, "max_memory_mib": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        t.create_machine(&ann, "two").await.status(),
        StatusCode::ACCEPTED
    );

    // Bad limits are refused with what is wrong; the limits in force stay.
    for bad in [
        json!({"max_machines": -1, "max_vcpus": null, "max_memory_mib": null}),
        json!({"max_machines": "many", "max_vcpus": null, "max_memory_mib": null}),
        json!({"max_machines": 1, "max_cpus": 2}),
    ] {
        let res = t
            .as_user(&root, Method::PUT, &quota_path)
            .json(&bad)
            .send()
            .await
            .unwrap();
        problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    let q = t.get_json(&root, &quota_path).await;
    assert_eq!(q["max_machines"], defaults.max_machines);
    assert_eq!(q["usage"]["machines"], 2);
    let res = t
        .as_user(
            &root,
            Method::GET,
            &format!("/users/{}/quota", uuid::Uuid::new_v4()),
        )
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::NOT_FOUND).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_an_account_ends_its_sessions_on_every_replica_at_once() {
    let a = TestApp::spawn(Backend::Postgres).await;
    let b = TestApp::spawn_on(a.db.clone(), Settings::default(), HttpSettings::default()).await;
    let root = a.admin("root").await;
    let mut ann = a.user("ann").await;
    let ann_id = id_of(&a, &ann).await;
    for round in 0..5 {
        // Both replicas have served (and kept) the account.
        for t in [&a, &b] {
            assert_eq!(t.get_json(&ann, "/auth/profile").await["username"], "ann");
        }
        let res = a
            .as_user(&root, Method::POST, &format!("/users/{ann_id}/disable"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "round {round}");
        let res = b
            .as_user(&ann, Method::GET, "/auth/profile")
            .send()
            .await
            .unwrap();
        problem(res, StatusCode::UNAUTHORIZED).await;
        let res = a
            .as_user(&root, Method::POST, &format!("/users/{ann_id}/enable"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        // The old token stays dead after enabling: a new login is needed.
        let res = b
            .as_user(&ann, Method::GET, "/auth/profile")
            .send()
            .await
            .unwrap();
        problem(res, StatusCode::UNAUTHORIZED).await;
        let fresh: Value = b.login("ann", PASSWORD).await.json().await.unwrap();
        ann = Session {
            access: fresh["access_token"].as_str().unwrap().to_owned(),
            refresh: fresh["refresh_token"].as_str().unwrap().to_owned(),
        };
        assert_eq!(
            b.get_json(&ann, "/auth/profile").await["id"],
            ann_id.as_str()
        );
    }
    b.stop().await;
    a.stop().await;
}

/// The last enabled administrator cannot be demoted or disabled, even by two administrators
/// demoting each other at the same moment (each request alone sees the other still there).
async fn two_administrators_demoting_each_other_at_once_leave_one(backend: Backend) {
    for round in 0..3 {
        let t = TestApp::spawn(backend).await;
        let (a, b) = (t.admin("first").await, t.admin("second").await);
        let (a_id, b_id) = (id_of(&t, &a).await, id_of(&t, &b).await);
        let demote = |who: &Session, id: &str| {
            t.as_user(who, Method::PATCH, &format!("/users/{id}"))
                .json(&json!({"role": "user"}))
                .send()
        };
        let (first, second) = tokio::join!(demote(&a, &b_id), demote(&b, &a_id));
        let (first, second) = (first.unwrap(), second.unwrap());
        let statuses = [first.status(), second.status()];
        // The loser is refused: 409 when the two overlapped (the count saw the other's
        // demotion), 403 when the first had finished before the second was authorised.
        assert!(
            statuses.contains(&StatusCode::OK)
                && statuses
                    .iter()
                    .any(|s| *s == StatusCode::CONFLICT || *s == StatusCode::FORBIDDEN),
            "round {round}: {statuses:?}"
        );
        let refused = if first.status() == StatusCode::OK {
            second
        } else {
            first
        };
        if refused.status() == StatusCode::CONFLICT {
            let body = problem(refused, StatusCode::CONFLICT).await;
            assert!(
                body["detail"]
                    .as_str()
                    .unwrap()
                    .contains("last enabled administrator"),
                "{body}"
            );
        }
        let left = if statuses[0] == StatusCode::OK {
            &a
        } else {
            &b
        };
        let admins = t.get_json(left, "/users?role=admin").await;
        assert_eq!(admins["items"].as_array().unwrap().len(), 1, "{admins:#}");
        t.stop().await;
    }
}
