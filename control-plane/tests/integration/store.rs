//! The store on both back ends, below the API: migrations, retention of idempotency keys,
//! observed transitions with their events.

use crate::both_stores;
use crate::common::{idempotency_hash, machine_body, Backend, TestApp};
use chrono::{Duration, Utc};
use control_plane::model::MachineStatus;
use control_plane::store::idempotency::Claim;
use serde_json::Value;

both_stores!(
    migrations_apply_once_and_are_idempotent,
    idempotency_keys_are_kept_a_day_and_stale_claims_are_taken_over,
    observed_transitions_are_checked_and_logged,
    tasks_are_leased_to_one_owner_and_purged_once_finished,
);

async fn tasks_are_leased_to_one_owner_and_purged_once_finished(backend: Backend) {
    use control_plane::store::tasks::{TaskKind, TaskOutcome};
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    let m: Value = t.create_machine(&ann, "web").await.json().await.unwrap();
    let id = m["id"].as_str().unwrap().parse().unwrap();
    let s = &t.store;
    // The creation queued its provision task in the same transaction.
    assert_eq!(s.task_pending_count(id).await.unwrap(), 1);
    let lease = Duration::seconds(30);
    let task = s
        .task_claim("one", lease)
        .await
        .unwrap()
        .expect("a due task");
    assert_eq!(
        (task.machine_id, task.kind, task.attempts),
        (id, TaskKind::Provision, 1)
    );
    // Leased: nobody else gets it, nor another task of the same machine.
    s.task_enqueue(id, TaskKind::Delete).await.unwrap();
    assert!(s.task_claim("two", lease).await.unwrap().is_none());
    // Only the holder may finish or extend it.
    assert!(!s
        .task_finish(&task.id, "two", 1, &TaskOutcome::Done)
        .await
        .unwrap());
    assert!(s.task_extend(&task.id, "one", 1, lease).await.unwrap());
    assert!(s
        .task_finish(&task.id, "one", 1, &TaskOutcome::Done)
        .await
        .unwrap());
    // An expired lease is taken over, even by the same owner (another worker loop of the
    // same process): the attempt number fences the first one off.
    let next = s
        .task_claim("same", Duration::milliseconds(1))
        .await
        .unwrap()
        .expect("delete");
    assert_eq!(next.kind, TaskKind::Delete);
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let again = s
        .task_claim("same", lease)
        .await
        .unwrap()
        .expect("taken over");
    assert_eq!((again.id.as_str(), again.attempts), (next.id.as_str(), 2));
    assert!(!s.task_extend(&next.id, "same", 1, lease).await.unwrap());
    assert!(!s
        .task_finish(&next.id, "same", 1, &TaskOutcome::Done)
        .await
        .unwrap());
    assert!(s
        .task_finish(&again.id, "same", 2, &TaskOutcome::Failed("gave up".into()))
        .await
        .unwrap());
    // Finished tasks go with housekeeping; queued ones never do.
    s.task_enqueue(id, TaskKind::Stop).await.unwrap();
    assert_eq!(
        s.task_purge_finished(Utc::now() + Duration::seconds(1))
            .await
            .unwrap(),
        2
    );
    assert_eq!(s.task_pending_count(id).await.unwrap(), 1);
    t.stop().await;
}

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
    t.tiny_image().await;
    let ann = t.user("ann").await;
    let me: Value = t.get_json(&ann, "/auth/profile").await;
    let user = me["id"].as_str().unwrap().parse().unwrap();
    let (lock, keep) = (Duration::seconds(60), Duration::hours(24));
    let t0 = Utc::now();
    let s = &t.store;
    let claim = |key: &'static str, hash: &'static str, at| {
        s.idempotency_claim(user, key, hash, at, lock, keep)
    };
    let Claim::Claimed { claim_id: first } = claim("k", "h1", t0).await.unwrap() else {
        panic!("a fresh key is claimed");
    };
    assert_eq!(claim("k", "h1", t0).await.unwrap(), Claim::InFlight);
    // Its holder died: after the lock runs out, one retry takes the key over.
    let later = t0 + Duration::seconds(61);
    let Claim::Claimed { claim_id: second } = claim("k", "h1", later).await.unwrap() else {
        panic!("a stale claim is taken over");
    };
    assert_ne!(first, second);
    // The dead holder coming back cannot release the new holder's claim.
    s.idempotency_release(user, "k", &first).await.unwrap();
    assert_eq!(claim("k", "h1", later).await.unwrap(), Claim::InFlight);
    s.idempotency_release(user, "k", &second).await.unwrap();
    assert!(matches!(
        claim("k", "h1", later).await.unwrap(),
        Claim::Claimed { .. }
    ));

    // A finished request is replayed for 24 hours, then forgotten.
    let res = t
        .as_user(&ann, reqwest::Method::POST, "/machines")
        .header("idempotency-key", "day")
        .json(&machine_body("web"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), reqwest::StatusCode::ACCEPTED);
    let hash = idempotency_hash(&machine_body("web"));
    let now = Utc::now();
    let at = |d| s.idempotency_claim(user, "day", &hash, now + d, lock, keep);
    assert!(matches!(at(Duration::hours(23)).await.unwrap(), Claim::Replay(r) if r.status == 202));
    assert!(matches!(
        at(Duration::hours(24) + Duration::seconds(1))
            .await
            .unwrap(),
        Claim::Claimed { .. }
    ));
    assert!(
        s.idempotency_purge(now + Duration::hours(49), keep)
            .await
            .unwrap()
            >= 1
    );
    t.stop().await;
}

async fn observed_transitions_are_checked_and_logged(backend: Backend) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    let m: Value = t.create_machine(&ann, "web").await.json().await.unwrap();
    let id = m["id"].as_str().unwrap().parse().unwrap();
    let s = &t.store;
    use MachineStatus as S;
    let generation =
        |m: Option<control_plane::store::provisioning::TaskMachine>| m.unwrap().generation;
    let g = generation(s.machine_for_task(id).await.unwrap());
    assert!(
        s.machine_settle(
            id,
            S::Pending,
            g,
            S::Running,
            None,
            "test",
            "observed in a test"
        )
        .await
        .is_err(),
        "illegal"
    );
    assert!(s
        .machine_settle(
            id,
            S::Pending,
            g,
            S::Provisioning,
            None,
            "test",
            "observed in a test"
        )
        .await
        .unwrap());
    // A stale writer that still believes the machine is pending changes nothing.
    assert!(!s
        .machine_settle(
            id,
            S::Pending,
            g,
            S::Provisioning,
            None,
            "test",
            "observed in a test"
        )
        .await
        .unwrap());
    let g = generation(s.machine_for_task(id).await.unwrap());
    assert!(s
        .machine_settle(
            id,
            S::Provisioning,
            g,
            S::Running,
            None,
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
