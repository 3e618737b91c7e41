//! Keyset pagination of GET /machines: opaque signed cursors, bounds on limit, newest first,
//! and a walk that neither skips nor repeats while machines come and go.

use crate::both_stores;
use crate::common::{problem, Backend, Session, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::collections::HashSet;

both_stores!(
    pages_walk_newest_first_without_skips_or_doubles_during_churn,
    bad_limits_cursors_and_filters_are_400,
);

async fn page(t: &TestApp, who: &Session, query: &str) -> Value {
    t.get_json(who, &format!("/machines?{query}")).await
}

async fn pages_walk_newest_first_without_skips_or_doubles_during_churn(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    let mut ids = Vec::new();
    for i in 0..23 {
        let m: Value = t
            .create_machine(&ann, &format!("m{i:02}"))
            .await
            .json()
            .await
            .unwrap();
        ids.push(m["id"].as_str().unwrap().to_owned());
    }
    // Default page size is 50: one page, newest first.
    let all = page(&t, &ann, "").await;
    let listed: Vec<&str> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    assert_eq!(listed, newest_first);
    assert_eq!(all["next_cursor"], Value::Null);

    // Walk 5 at a time while creating new machines and deleting some not yet seen.
    let doomed: HashSet<String> = [3usize, 4, 11].iter().map(|&i| ids[i].clone()).collect();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut churn = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("limit=5&cursor={c}"),
            None => "limit=5".to_owned(),
        };
        let p = page(&t, &ann, &q).await;
        let items = p["items"].as_array().unwrap();
        assert!(items.len() <= 5);
        seen.extend(items.iter().map(|m| m["id"].as_str().unwrap().to_owned()));
        if churn == 0 {
            for id in &doomed {
                let res = t
                    .as_user(&ann, Method::DELETE, &format!("/machines/{id}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), StatusCode::ACCEPTED);
            }
        }
        t.create_machine(&ann, &format!("new{churn}")).await;
        churn += 1;
        match p["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a machine was listed twice");
    // Every machine that lived through the walk was seen; machines created during it are newer
    // than the cursor and belong to a new walk.
    for id in &ids {
        if !doomed.contains(id) {
            assert!(unique.contains(id), "machine {id} was skipped");
        }
    }
    assert!(seen.iter().all(|id| ids.contains(id)));

    // The status filter.
    let pending = page(&t, &ann, "status=pending&limit=200").await;
    assert_eq!(pending["items"].as_array().unwrap().len(), 23 - 3 + churn);
    let running = page(&t, &ann, "status=running").await;
    assert_eq!(running["items"], serde_json::json!([]));
    t.stop().await;
}

async fn bad_limits_cursors_and_filters_are_400(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    for i in 0..3 {
        t.create_machine(&ann, &format!("m{i}")).await;
    }
    let first = page(&t, &ann, "limit=1").await;
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    assert_eq!(
        page(&t, &ann, &format!("limit=1&cursor={cursor}")).await["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let mut tampered = cursor.clone().into_bytes();
    tampered[2] = if tampered[2] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    for q in [
        "limit=0".to_owned(),
        "limit=201".to_owned(),
        "limit=ten".to_owned(),
        format!("cursor={tampered}"),
        "cursor=bm90LWEtY3Vyc29y".to_owned(),
        "status=sleeping".to_owned(),
    ] {
        let res = t
            .as_user(&ann, Method::GET, &format!("/machines?{q}"))
            .send()
            .await
            .unwrap();
        problem(res, StatusCode::BAD_REQUEST).await;
    }
    t.stop().await;
}
