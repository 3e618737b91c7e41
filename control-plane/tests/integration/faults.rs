//! Faults on real parts (issue 10): PostgreSQL becoming unreachable under a storm of creates.
//! Clients get 503 with Retry-After (never 500), nothing accepted is lost or doubled, and the
//! control plane recovers when the database does, without a restart.

use crate::common::faults::CuttableLink;
use crate::common::{machine_body, Backend, Session, TestApp, TestDb};
use control_plane::api::HttpSettings;
use control_plane::app::Settings;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the storm has seen so far.
#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    refused: AtomicUsize,
}

/// Creates `count` machines as `who`, each under its own Idempotency-Key, retrying a 503 with
/// the same key after its Retry-After. Returns the hostnames accepted.
async fn create_storm(
    t: Arc<TestApp>,
    who: Arc<Session>,
    worker: usize,
    count: usize,
    counts: Arc<Counts>,
) -> Vec<String> {
    let mut accepted = Vec::new();
    for n in 0..count {
        let hostname = format!("storm-{worker}-{n}");
        let key = uuid::Uuid::new_v4().to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let res = t
                .as_user(&who, Method::POST, "/machines")
                .header("idempotency-key", &key)
                .json(&machine_body(&hostname))
                .send()
                .await
                .unwrap();
            match res.status() {
                StatusCode::ACCEPTED | StatusCode::CREATED => {
                    counts.accepted.fetch_add(1, Ordering::SeqCst);
                    accepted.push(hostname);
                    break;
                }
                // 503 while the database is away; 409 "in progress" while the claim of a
                // request the outage broke is being released. Both say when to come back.
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::CONFLICT => {
                    if res.status() == StatusCode::SERVICE_UNAVAILABLE {
                        counts.refused.fetch_add(1, Ordering::SeqCst);
                    }
                    let retry: u64 = res.headers()["retry-after"]
                        .to_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    let problem: Value = res.json().await.unwrap();
                    if problem["status"] == 409 {
                        assert_eq!(
                            problem["type"],
                            "urn:skygate:problem:idempotency-key-in-flight"
                        );
                    }
                    assert!(Instant::now() < deadline, "still refused after a minute");
                    tokio::time::sleep(Duration::from_secs(retry)).await;
                }
                other => panic!(
                    "create {hostname}: unexpected {other}: {}",
                    res.text().await.unwrap_or_default()
                ),
            }
        }
    }
    accepted
}

#[tokio::test]
async fn a_database_outage_answers_503_and_loses_or_doubles_nothing() {
    let db = TestDb::new(Backend::Postgres).await;
    let link = CuttableLink::new(db.postgres_addr()).await;
    let t = Arc::new(
        TestApp::spawn_on(
            Arc::new(db.rerouted(link.addr)),
            Settings::default(),
            HttpSettings::default(),
        )
        .await,
    );
    t.tiny_image().await;
    let ann = Arc::new(t.user("ann").await);
    let counts = Arc::new(Counts::default());
    let storm: Vec<_> = (0..4)
        .map(|w| {
            tokio::spawn(create_storm(
                Arc::clone(&t),
                Arc::clone(&ann),
                w,
                10,
                Arc::clone(&counts),
            ))
        })
        .collect();
    // Cut in the middle of the storm.
    while counts.accepted.load(Ordering::SeqCst) < 6 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    link.cut();
    // Reads fail the same way while it lasts: 503 with Retry-After, not 500.
    let res = t
        .as_user(&ann, Method::GET, "/machines")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().contains_key("retry-after"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    link.restore().await;

    let mut accepted = BTreeSet::new();
    for worker in storm {
        for hostname in worker.await.unwrap() {
            assert!(
                accepted.insert(hostname.clone()),
                "{hostname} accepted twice"
            );
        }
    }
    assert_eq!(accepted.len(), 40);
    assert!(
        counts.refused.load(Ordering::SeqCst) > 0,
        "the outage refused nothing"
    );
    // Every accepted machine exists exactly once, and nothing else does.
    let page: Value = t.get_json(&ann, "/machines?limit=200").await;
    let listed: Vec<String> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["hostname"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed.len(), 40, "{listed:?}");
    assert_eq!(listed.into_iter().collect::<BTreeSet<_>>(), accepted);
    // Ready again without a restart.
    let ready = t.req(Method::GET, "/readyz").send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    match Arc::try_unwrap(t) {
        Ok(t) => t.stop().await,
        Err(_) => panic!("the app is still shared"),
    }
}
