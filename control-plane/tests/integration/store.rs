//! The store on both back ends, below the API: migrations, retention of idempotency keys,
//! observed transitions with their events.

use crate::both_stores;
use crate::common::{idempotency_hash, machine_body, Backend, TestApp, TestDb};
use chrono::{Duration, Utc};
use control_plane::model::MachineStatus;
use control_plane::store::idempotency::Claim;
use control_plane::store::machines::{MachineTransition, NewEvent, TaskMachine};
use serde_json::Value;

both_stores!(
    migrations_apply_once_and_are_idempotent,
    a_database_of_earlier_migrations_upgrades_with_its_machines_intact,
    idempotency_keys_are_kept_a_day_and_stale_claims_are_taken_over,
    observed_transitions_are_checked_and_logged,
    tasks_are_leased_to_one_owner_and_purged_once_finished,
    placements_racing_on_two_replicas_spend_each_room_once,
    one_placement_places_the_machines_waiting_with_it,
    writes_abandoned_at_any_point_leave_the_store_writable,
    gathered_heartbeats_record_when_heard_not_when_written,
);

/// A steady heartbeat written late (the flush waited on a slow database, or failed and was
/// retried) records when it was heard: a host silent since is marked unreachable on time.
/// Recording the write's time had kept a silenced host `ready` past the monitor's window in
/// CI. An older heartbeat never moves a newer one back.
async fn gathered_heartbeats_record_when_heard_not_when_written(backend: Backend) {
    use std::time::{Duration as StdDuration, Instant};
    let t = TestApp::spawn(backend).await;
    let s = &t.store;
    register_host(&t, "h1", 4).await;
    let id = s.host_by_name("h1").await.unwrap().unwrap().id;
    let last_heartbeat = async || {
        let host = s.host_by_name("h1").await.unwrap().unwrap();
        host.last_heartbeat_at.unwrap()
    };
    let heard = Instant::now();
    let heard_clock = s.clock().await.unwrap();
    tokio::time::sleep(StdDuration::from_millis(1500)).await;
    assert_eq!(
        s.host_heartbeats_record(&[(id.clone(), heard)])
            .await
            .unwrap(),
        1
    );
    let last = last_heartbeat().await;
    let late = last - heard_clock;
    assert!(
        late < Duration::milliseconds(500),
        "recorded {late} after it was heard"
    );
    // Older than the last heartbeat: kept as it was.
    let older = heard
        .checked_sub(StdDuration::from_secs(60))
        .unwrap_or(heard);
    s.host_heartbeats_record(&[(id.clone(), older)])
        .await
        .unwrap();
    let kept = last_heartbeat().await;
    assert_eq!(kept, last);
    // Silent for a second now: the monitor's query finds it.
    let before = s.clock().await.unwrap() - Duration::seconds(1);
    assert_eq!(
        s.host_mark_unreachable(before, |_| String::new())
            .await
            .unwrap(),
        ["h1"]
    );
    t.stop().await;
}

/// A write dropped mid-flight (a worker abandoning its step when it loses its lease) at
/// every point from before its BEGIN to after its COMMIT: the store's writes work afterwards.
/// sqlx's BEGIN is not cancel-safe; dropped inside it, a connection went back to the pool
/// inside a transaction, and on SQLite (one writer connection) every later write failed
/// with `InvalidSavePointStatement`.
async fn writes_abandoned_at_any_point_leave_the_store_writable(backend: Backend) {
    use control_plane::store::tasks::TaskKind;
    let (t, id) = with_one_machine(backend).await;
    let s = &t.store;
    for i in 0..400u64 {
        // Dropped after 0–399 µs: before, inside and after the BEGIN's round trip.
        let _ = tokio::time::timeout(
            std::time::Duration::from_micros(i),
            s.task_enqueue(id, TaskKind::Provision),
        )
        .await;
    }
    // A COMMIT already sent when its write was dropped still lands: let those settle.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let before = s.task_pending_count(id).await.unwrap();
    s.task_enqueue(id, TaskKind::Provision).await.unwrap();
    assert_eq!(s.task_pending_count(id).await.unwrap(), before + 1);
    t.stop().await;
}

/// Registers host `name` with room for `vcpus` one-vCPU machines (memory and disk to spare).
async fn register_host(t: &TestApp, name: &str, vcpus: i64) {
    use control_plane::model::scheduler::Resources;
    use control_plane::store::hosts::{HostRegistration, RegisterDecision};
    let reg = HostRegistration {
        name: name.into(),
        grpc_address: "http://127.0.0.1:1".into(),
        hypervisor: "fake".into(),
        agent_version: "test".into(),
        domain_prefix: "sg-".into(),
        capacity: Resources {
            vcpus,
            memory_mib: 1 << 20,
            disk_gib: 1 << 10,
        },
    };
    t.store
        .host_register(&reg, |_| RegisterDecision::Join)
        .await
        .unwrap();
}

/// Placing one machine places the oldest others waiting for placement in the same
/// transaction, as far as there is room (issue 13: the hosts are read once per batch), and
/// each placed machine's log says where.
async fn one_placement_places_the_machines_waiting_with_it(backend: Backend) {
    use control_plane::store::machines::Visibility;
    use control_plane::store::placement::Placement;
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let m: Value = t
            .create_machine(&ann, &format!("m{i}"))
            .await
            .json()
            .await
            .unwrap();
        ids.push(m["id"].as_str().unwrap().parse().unwrap());
    }
    register_host(&t, "h1", 3).await;
    // The newest asks; it and the two oldest fit.
    assert_eq!(
        t.store.machine_place(ids[4]).await.unwrap(),
        Placement::Placed {
            host_name: "h1".into()
        }
    );
    let mut hosts = Vec::new();
    for id in &ids {
        let m = t
            .store
            .machine_get(*id, Visibility::All)
            .await
            .unwrap()
            .unwrap();
        hosts.push(m.host_name);
    }
    let h1 = Some("h1".to_owned());
    assert_eq!(hosts, [h1.clone(), h1.clone(), None, None, h1]);
    let log = t.store.machine_events(ids[0], None, 10).await.unwrap();
    assert!(
        log.iter().any(|e| e.message == "placed on host h1"),
        "{log:?}"
    );
    assert_eq!(t.store.allocation_drift().await.unwrap(), vec![]);
    // A machine placed by another's batch is no longer pending for its own call.
    assert_eq!(
        t.store.machine_place(ids[0]).await.unwrap(),
        Placement::NotPending
    );
}

/// Two stores (two replicas) place the same 30 pending machines at once, every machine from
/// both, on three hosts with room for four each: twelve are placed, each once, no host holds
/// more than it offers, and every host's kept allocation is the sum of what was placed there
/// (issue 13: the claim locks only the hosts it spends, and each call places a batch of the
/// waiting machines, so this is what keeps it exact).
async fn placements_racing_on_two_replicas_spend_each_room_once(backend: Backend) {
    use control_plane::store::machines::Visibility;
    use control_plane::store::placement::Placement;
    use control_plane::store::Store;
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    let mut ids = Vec::new();
    for i in 0..30 {
        let m: Value = t
            .create_machine(&ann, &format!("m{i}"))
            .await
            .json()
            .await
            .unwrap();
        ids.push(m["id"].as_str().unwrap().parse().unwrap());
    }
    for h in ["h1", "h2", "h3"] {
        register_host(&t, h, 4).await;
    }
    let other = Store::connect(&t.db.url, 4).await.unwrap();
    let stores = [&t.store, &other];
    let places = ids
        .iter()
        .flat_map(|id| stores.map(|s| s.machine_place(*id)));
    let outcomes = futures::future::join_all(places).await;
    for o in &outcomes {
        // A machine is placed by its own call or by another's batch, and refused only for
        // want of room.
        assert!(
            matches!(
                o.as_ref().unwrap(),
                Placement::Placed { .. } | Placement::NotPending | Placement::NoRoom(_)
            ),
            "{o:?}"
        );
    }
    let mut placed = 0;
    for id in &ids {
        let m = t
            .store
            .machine_get(*id, Visibility::All)
            .await
            .unwrap()
            .unwrap();
        placed += usize::from(m.host_name.is_some());
    }
    assert_eq!(placed, 12, "{outcomes:?}");
    let hosts = t.store.host_list().await.unwrap();
    for h in &hosts {
        assert_eq!((h.machines, h.allocated.vcpus), (4, 4), "{}", h.name);
    }
    assert_eq!(t.store.allocation_drift().await.unwrap(), vec![]);
}

/// A control plane with one machine, created through the API (its provision task queued).
async fn with_one_machine(backend: Backend) -> (TestApp, control_plane::model::MachineId) {
    let t = TestApp::spawn(backend).await;
    t.tiny_image().await;
    let ann = t.user("ann").await;
    let m: Value = t.create_machine(&ann, "web").await.json().await.unwrap();
    let id = m["id"].as_str().unwrap().parse().unwrap();
    (t, id)
}

async fn tasks_are_leased_to_one_owner_and_purged_once_finished(backend: Backend) {
    use control_plane::store::tasks::{TaskKind, TaskOutcome};
    let (t, id) = with_one_machine(backend).await;
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
    let created: Value = res.json().await.unwrap();
    let created = created["id"].as_str().unwrap().parse().unwrap();
    let hash = idempotency_hash(&machine_body("web"));
    let now = Utc::now();
    let at = |d| s.idempotency_claim(user, "day", &hash, now + d, lock, keep);
    assert!(
        matches!(at(Duration::hours(23)).await.unwrap(), Claim::Replay { machine_id } if machine_id == created)
    );
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
    let version = |m: Option<TaskMachine>| m.unwrap().version;
    let observed = |from, version, to| {
        let event = NewEvent {
            action: "test",
            message: "observed in a test",
        };
        MachineTransition::new(id, from, version, to, event)
    };
    let g = version(s.machine_for_task(id).await.unwrap());
    assert!(
        s.machine_transition(&observed(S::Pending, g, S::Running))
            .await
            .is_err(),
        "illegal"
    );
    assert!(s
        .machine_transition(&observed(S::Pending, g, S::Provisioning))
        .await
        .unwrap()
        .applied());
    // A stale writer that still believes the machine is pending changes nothing.
    assert!(!s
        .machine_transition(&observed(S::Pending, g, S::Provisioning))
        .await
        .unwrap()
        .applied());
    let g = version(s.machine_for_task(id).await.unwrap());
    assert!(s
        .machine_transition(&observed(S::Provisioning, g, S::Running))
        .await
        .unwrap()
        .applied());
    let events = s.machine_events(id, None, 10).await.unwrap();
    let statuses: Vec<_> = events.iter().map(|e| e.status).collect();
    assert_eq!(statuses, [S::Pending, S::Provisioning, S::Running]);
    t.stop().await;
}

/// A database as 0.6.0 left it (migrations 0001–0005: one user, image, host and machine with
/// an event and a queued task, a finished Idempotency-Key) takes 0006 (the renames) and 0007:
/// the machine, its log and its task are as they were, its spec generation is its former
/// generation (what its agent already holds), and the key still names the machine.
async fn a_database_of_earlier_migrations_upgrades_with_its_machines_intact(backend: Backend) {
    use control_plane::model::{DesiredState, MachineId};
    use control_plane::store::machines::{TransitionOutcome, Visibility};
    use control_plane::store::Store;
    use sqlx::migrate::Migrator;
    use sqlx::{AnyConnection, Connection};
    sqlx::any::install_default_drivers();
    let db = TestDb::new(backend).await;
    let (url, dir) = match backend {
        Backend::Sqlite => (format!("{}?mode=rwc", db.url), "sqlite"),
        Backend::Postgres => (db.url.clone(), "postgres"),
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/store/migrations")
        .join(dir);
    let mut earlier = Migrator::new(dir).await.unwrap();
    earlier.migrations = earlier
        .migrations
        .iter()
        // 0.6.0's schema: the tables were still `vms`, `vm_events` and `tasks.vm_id`.
        .filter(|m| m.version <= 5)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    let mut conn = AnyConnection::connect(&url).await.unwrap();
    earlier.run(&mut conn).await.unwrap();

    let (user, image, host, machine) = (
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4(),
    );
    let now = Utc::now().timestamp_micros();
    let statements: [(&str, Vec<String>); 7] = [
        (
            "INSERT INTO users (id, username, email, password_hash, role, created_at, updated_at) \
             VALUES ($1, 'ann', 'ann@example.com', 'x', 'user', 1, 1)",
            vec![user.clone()],
        ),
        (
            "INSERT INTO images (id, name, source, format, boot, created_at) \
             VALUES ($1, 'tiny', 'file:///i/', 'kernel', '{\"kernel\": \"file:///i/k\"}', 1)",
            vec![image.clone()],
        ),
        (
            "INSERT INTO hosts (id, name, grpc_address, state, hypervisor, vcpus, memory_mib, \
             disk_gib, created_at, credential_issued, credential_generation) \
             VALUES ($1, 'h1', 'http://127.0.0.1:1', 'ready', 'kvm', 8, 8192, 100, 1, 1, 1)",
            vec![host.clone()],
        ),
        (
            "INSERT INTO vms (id, owner_id, hostname, status, desired_state, host_id, \
             image_id, vcpus, memory_mib, disk_gib, ssh_keys, network, generation, created_at, \
             updated_at, status_changed_at) \
             VALUES ($1, $2, 'web', 'running', 'running', $3, $4, 1, 256, 1, '[]', \
             '{\"addresses\": [], \"ports\": [{\"guest\": 22, \"host_ip\": \"127.0.0.1\", \
             \"host_port\": 2222, \"proto\": \"tcp\"}]}', 5, 1, 2, 2)",
            vec![
                machine.to_string(),
                user.clone(),
                host.clone(),
                image.clone(),
            ],
        ),
        (
            "INSERT INTO vm_events (vm_id, action, status, message, created_at) \
             VALUES ($1, 'create', 'pending', 'machine requested', 1)",
            vec![machine.to_string()],
        ),
        (
            "INSERT INTO tasks (id, vm_id, kind, state, attempts, run_after, created_at, \
             updated_at) VALUES ('t1', $1, 'stop', 'queued', 0, 1, 1, 1)",
            vec![machine.to_string()],
        ),
        (
            "INSERT INTO idempotency_keys (user_id, key, request_hash, claim_id, \
             response_status, response_body, response_location, created_at) \
             VALUES ($1, 'k', 'h', 'c', 202, '{}', $2, $3)",
            vec![
                user.clone(),
                format!("/api/v1/machines/{machine}"),
                now.to_string(),
            ],
        ),
    ];
    for (sql, binds) in statements {
        let mut q = sqlx::query(sql);
        for (i, b) in binds.into_iter().enumerate() {
            // created_at of the key is the one number among the binds.
            q = if sql.contains("idempotency_keys") && i == 2 {
                q.bind(b.parse::<i64>().unwrap())
            } else {
                q.bind(b)
            };
        }
        q.execute(&mut conn).await.unwrap();
    }
    conn.close().await.unwrap();

    let store = Store::connect(&db.url, 2).await.unwrap();
    store.migrate().await.unwrap();
    let id = MachineId(machine);
    let m = store.machine_for_task(id).await.unwrap().unwrap();
    assert_eq!(
        (m.status, m.desired, m.version, m.spec_generation),
        (MachineStatus::Running, DesiredState::Running, 5, 5)
    );
    assert_eq!(
        (m.hostname.as_str(), m.image.name.as_str()),
        ("web", "tiny")
    );
    assert_eq!(m.host.map(|h| h.name), Some("h1".to_owned()));
    let shown = store
        .machine_get(id, Visibility::All)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(shown.owner_id.to_string(), user);
    assert_eq!(shown.network.unwrap().ports[0].host_port, 2222);
    // Its log and its queued task came along with the renamed tables.
    let log = store.machine_events(id, None, 10).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].message, "machine requested");
    assert_eq!(store.task_pending_count(id).await.unwrap(), 1);
    // Its owner's running total (migration 0008) holds what the machine holds, so quotas
    // count it.
    let usage = store.tenant_usage(user.parse().unwrap()).await.unwrap();
    assert_eq!((usage.machines, usage.vcpus, usage.memory_mib), (1, 1, 256));
    // Its host's kept allocation (migration 0010) holds it too, so placement counts it.
    let h1 = store.host_by_name("h1").await.unwrap().unwrap();
    assert_eq!(
        (h1.machines, h1.allocated.vcpus, h1.allocated.memory_mib),
        (1, 1, 256)
    );
    assert_eq!(store.allocation_drift().await.unwrap(), vec![]);
    // The finished key still answers with its machine.
    let claim = store
        .idempotency_claim(
            user.parse().unwrap(),
            "k",
            "h",
            Utc::now(),
            Duration::seconds(60),
            Duration::hours(24),
        )
        .await
        .unwrap();
    assert_eq!(claim, Claim::Replay { machine_id: id });
    // From here on a status change moves the version, not what agents are sent.
    let stopped = MachineTransition {
        desired: Some(DesiredState::Stopped),
        ..MachineTransition::new(
            id,
            MachineStatus::Running,
            5,
            MachineStatus::Stopped,
            NewEvent {
                action: "test",
                message: "stopped in a test",
            },
        )
    };
    assert_eq!(
        store.machine_transition(&stopped).await.unwrap(),
        TransitionOutcome::Applied { version: 6 }
    );
    let m = store.machine_for_task(id).await.unwrap().unwrap();
    assert_eq!((m.version, m.spec_generation), (6, 5));
    store.close().await;
}
