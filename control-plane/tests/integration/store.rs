//! The store on both back ends, below the API: migrations, retention of idempotency keys,
//! observed transitions with their events.

use crate::both_stores;
use crate::common::{machine_body, Backend, TestApp};
use chrono::{Duration, Utc};
use control_plane::model::MachineStatus;
use control_plane::store::idempotency::{Claim, StoredResponse};
use serde_json::Value;

both_stores!(
    migrations_apply_once_and_are_idempotent,
    idempotency_keys_are_kept_a_day_and_stale_claims_are_taken_over,
    observed_transitions_are_checked_and_logged,
);

async fn migrations_apply_once_and_are_idempotent(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.store.migrate().await.unwrap();
    t.store.migrate().await.unwrap();
    t.store.ping().await.unwrap();
    if backend == Backend::Sqlite {
        // WAL is a property of the file: a fresh connection sees it.
        use sqlx::{Connection, Row};
        let mut conn = sqlx::SqliteConnection::connect(&t.db.url).await.unwrap();
        let mode: String = sqlx::query("PRAGMA journal_mode")
            .fetch_one(&mut conn)
            .await
            .unwrap()
            .get(0);
        assert_eq!(mode, "wal");
    }
    t.stop().await;
}

async fn idempotency_keys_are_kept_a_day_and_stale_claims_are_taken_over(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    let ann = t.user("ann").await;
    let me: Value = t.get_json(&ann, "/auth/profile").await;
    let user = me["id"].as_str().unwrap().parse().unwrap();
    let (lock, keep) = (Duration::seconds(60), Duration::hours(24));
    let t0 = Utc::now();
    let s = &t.store;
    assert_eq!(
        s.idempotency_claim(user, "k", "h1", t0, lock, keep)
            .await
            .unwrap(),
        Claim::Claimed
    );
    assert_eq!(
        s.idempotency_claim(user, "k", "h1", t0, lock, keep)
            .await
            .unwrap(),
        Claim::InFlight
    );
    // Its holder died: after the lock runs out, a retry takes the key over.
    let later = t0 + Duration::seconds(61);
    assert_eq!(
        s.idempotency_claim(user, "k", "h1", later, lock, keep)
            .await
            .unwrap(),
        Claim::Claimed
    );
    let answer = StoredResponse {
        status: 202,
        body: "{\"id\":1}".into(),
        location: Some("/x".into()),
    };
    s.idempotency_complete(user, "k", &answer).await.unwrap();
    let day = later + Duration::hours(23);
    assert_eq!(
        s.idempotency_claim(user, "k", "h1", day, lock, keep)
            .await
            .unwrap(),
        Claim::Replay(answer)
    );
    assert_eq!(
        s.idempotency_claim(user, "k", "h2", day, lock, keep)
            .await
            .unwrap(),
        Claim::Mismatch
    );
    // After 24 h the key is forgotten: usable again, with any body.
    let next_day = later + Duration::hours(24) + Duration::seconds(1);
    assert_eq!(
        s.idempotency_claim(user, "k", "h2", next_day, lock, keep)
            .await
            .unwrap(),
        Claim::Claimed
    );
    assert_eq!(
        s.idempotency_purge(next_day + Duration::hours(25), keep)
            .await
            .unwrap(),
        1
    );
    t.stop().await;
}

async fn observed_transitions_are_checked_and_logged(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    let m: Value = t
        .as_user(&ann, reqwest::Method::POST, "/machines")
        .json(&machine_body("web"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = m["id"].as_str().unwrap().parse().unwrap();
    let s = &t.store;
    use MachineStatus as S;
    assert!(
        s.machine_observe(id, S::Pending, S::Running, "test", "observed in a test")
            .await
            .is_err(),
        "illegal"
    );
    assert!(s
        .machine_observe(
            id,
            S::Pending,
            S::Provisioning,
            "test",
            "observed in a test"
        )
        .await
        .unwrap());
    // A stale writer that still believes the machine is pending changes nothing.
    assert!(!s
        .machine_observe(
            id,
            S::Pending,
            S::Provisioning,
            "test",
            "observed in a test"
        )
        .await
        .unwrap());
    assert!(s
        .machine_observe(
            id,
            S::Provisioning,
            S::Running,
            "test",
            "observed in a test"
        )
        .await
        .unwrap());
    let events = s.machine_events(id, None, 10).await.unwrap();
    let statuses: Vec<_> = events.iter().map(|e| e.status).collect();
    assert_eq!(statuses, [S::Pending, S::Provisioning, S::Running]);
    t.stop().await;
}
