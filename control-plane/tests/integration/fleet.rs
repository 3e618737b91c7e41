//! A simulated fleet (`host_agent::simulate`: real gRPC agents over fake hypervisors) against
//! the real control plane: fifty hosts take 500 machines from ten tenants without
//! oversubscribing one, the kept allocations match what is placed and what the hypervisors
//! run, a crashed domain and a silenced host are noticed, and deleting everything leaves no
//! domain on any host. Timing targets live in `scripts/bench-fleet.sh`, not here.
//!
//! Why 500 and not the 2,000 issue 13 suggests: this is a debug build sharing two cores with
//! the rest of the suite, and at 2,000 both stores fell behind (database connections waited
//! past their 5 s bound, hosts flapped unreachable) and were not all running after 300 s; the
//! release build runs 2,000 in seconds (README, "Measured"). Tried again on 2026-11-26 after
//! the agent's poll stopped parsing XML (500 now takes some 25 s a store): 2,000 still ran
//! past nextest's 300 s bound on both stores (timed out). The gap is open work.

use crate::both_stores;
use crate::common::provisioning::{
    is, provisioning_config, register_fake_kernel_image, wait_for, wait_for_at_most,
};
use crate::common::{Backend, Session, TestApp};
use control_plane::app::Settings;
use control_plane::model::Quota;
use futures::StreamExt;
use host_agent::simulate::{Census, SimulateConfig, SimulatedCapacity, SimulatedFleet};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

const TOKEN: &str = "fleet-test-agent-token";
const HOSTS: usize = 50;
/// A tenth more than each host's share of the machines: the scheduler must spread them.
const VCPUS: u32 = 11;
const MACHINES: usize = 500;
/// Each tenant's machines fit one page of `GET /machines` (200).
const TENANTS: usize = 10;
/// Requests in flight at once from the test.
const CLIENTS: usize = 16;

/// The hosts as an administrator sees them.
async fn hosts(app: &TestApp, admin: &Session) -> Vec<Value> {
    app.get_json(admin, "/hosts").await["items"]
        .as_array()
        .unwrap()
        .clone()
}

/// How many of `who`'s machines have each status, as `status=count` pairs sorted by status.
async fn statuses(app: &TestApp, who: &Session) -> Vec<(String, usize)> {
    let items = app.get_json(who, "/machines?limit=200").await["items"]
        .as_array()
        .unwrap()
        .clone();
    let mut counts = std::collections::BTreeMap::new();
    for m in items {
        *counts
            .entry(m["status"].as_str().unwrap_or_default().to_owned())
            .or_insert(0) += 1;
    }
    counts.into_iter().collect()
}

/// Sends a request again while it is answered 503, as the contract lets a client (the
/// storm shares two cores with the rest of the suite, and a request can wait past the
/// database's 5 s bound); at most 20 times, then the last answer.
async fn retrying_unavailable(mut send: impl AsyncFnMut() -> StatusCode) -> StatusCode {
    for _ in 0..20 {
        let status = send().await;
        if status != StatusCode::SERVICE_UNAVAILABLE {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    send().await
}

/// Live machines by status, as the store counts them, sorted by status.
async fn live_by_status(app: &TestApp) -> Vec<(&'static str, usize)> {
    let counts = app.store.machine_count_by_status().await.unwrap();
    let mut seen: Vec<_> = counts
        .into_iter()
        .map(|(status, n)| (status.as_str(), usize::try_from(n).unwrap()))
        .collect();
    seen.sort();
    seen
}

async fn a_simulated_fleet_holds_500_machines_without_oversubscribing_and_notices_silence(
    backend: Backend,
) {
    let mut cfg = provisioning_config(TOKEN);
    cfg.workflows.workers = 8;
    // The product's lease (30 s) and four heartbeats of silence (the product allows four,
    // 20 s at its 5 s interval): the storm runs in a debug build beside the rest of the suite,
    // and a write can wait seconds for SQLite's one writer.
    cfg.workflows.lease = Duration::from_secs(30);
    cfg.workflows.unreachable_after = Duration::from_secs(4);
    let settings = Settings {
        quota: Quota {
            max_machines: 1_000,
            max_vcpus: 1_000,
            max_memory_mib: 1_000_000,
        },
        ..Settings::default()
    };
    let db = Arc::new(crate::common::TestDb::new(backend).await);
    let app = TestApp::spawn_full(db, settings, Default::default(), Some(cfg)).await;
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let mut sim = SimulateConfig::new(
        HOSTS,
        format!("http://{}", app.grpc.unwrap()),
        TOKEN,
        tmp.path().join("hosts"),
    );
    sim.capacity = SimulatedCapacity {
        vcpus: VCPUS,
        memory_mib: 8192,
        disk_gib: 100,
    };
    sim.image_dirs = vec![images.clone()];
    sim.poll_interval = Duration::from_millis(500);
    let fleet = SimulatedFleet::start(sim).await.unwrap();
    let names = fleet.names();
    assert_eq!(names.len(), HOSTS);

    let admin = app.admin("root").await;
    wait_for("every simulated host to be ready", async || {
        let ready = hosts(&app, &admin)
            .await
            .iter()
            .filter(|h| h["state"] == "ready")
            .count();
        is(ready, HOSTS)
    })
    .await;
    // A host is ready once its registration is written, a moment before its agent reads the
    // answer and counts itself registered.
    wait_for(
        "every simulated agent to count itself registered",
        async || is(fleet.registered(), HOSTS),
    )
    .await;
    for h in hosts(&app, &admin).await {
        assert_eq!(h["capacity"]["vcpus"], VCPUS, "{h}");
        assert!(
            h["agent_version"].as_str().unwrap().ends_with("-simulated"),
            "{h}"
        );
    }
    register_fake_kernel_image(&app, &admin, &images).await;

    let mut tenants = Vec::new();
    for i in 0..TENANTS {
        tenants.push(app.user(&format!("fleet-{i}")).await);
    }
    let (app_ref, tenants_ref) = (&app, &tenants);
    futures::stream::iter(0..MACHINES)
        .for_each_concurrent(CLIENTS, |i| async move {
            let status = retrying_unavailable(async || {
                app_ref
                    .as_user(&tenants_ref[i % TENANTS], Method::POST, "/machines")
                    .json(&json!({"hostname": format!("m-{i}"), "image": "fake",
                        "vcpus": 1, "memory_mib": 128, "disk_gib": 1}))
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
            .await;
            assert_eq!(status, StatusCode::ACCEPTED, "machine {i}");
        })
        .await;
    // Waited for on the store's counts (one statement a poll: listing every machine ten
    // times a second was most of the load), then checked as each tenant sees them.
    wait_for_at_most(
        "every machine running",
        Duration::from_secs(300),
        async || is(live_by_status(&app).await, [("running", MACHINES)]),
    )
    .await;
    let per_tenant = MACHINES / TENANTS;
    for t in &tenants {
        assert_eq!(
            statuses(&app, t).await,
            [("running".to_owned(), per_tenant)]
        );
    }

    // No host holds more than it offers; together they hold every machine, and each host's
    // hypervisor holds the domains the control plane counts there.
    let mut allocated = 0;
    for h in hosts(&app, &admin).await {
        let vcpus = h["allocated"]["vcpus"].as_u64().unwrap();
        assert!(vcpus <= u64::from(VCPUS), "oversubscribed: {h}");
        allocated += vcpus;
        let name = h["name"].as_str().unwrap();
        let domains = fleet.hypervisor(name).unwrap().domain_names().len();
        assert_eq!(h["machines"].as_u64(), Some(domains as u64), "{h}");
    }
    assert_eq!(allocated, MACHINES as u64);
    assert_eq!(app.store.allocation_drift().await.unwrap(), vec![]);
    assert_eq!(
        fleet.census(),
        Census {
            hosts: HOSTS,
            domains: MACHINES,
            running: MACHINES,
        }
    );

    // A domain whose QEMU dies on a simulated host: the control plane hears of it from the
    // host's events and marks the machine stopped.
    let crashed_on = &names[1];
    let domain = fleet.hypervisor(crashed_on).unwrap().domain_names()[0].clone();
    let crashed: uuid::Uuid = domain.strip_prefix("skygate-").unwrap().parse().unwrap();
    fleet.crash_domain(crashed_on, crashed).unwrap();
    wait_for("the crashed machine stopped", async || {
        is(
            app.get_json(&admin, &format!("/machines/{crashed}")).await["status"].clone(),
            "stopped",
        )
    })
    .await;

    // A host that stops heartbeating is noticed (unreachable after 4 s of silence here), and
    // is ready again once it heartbeats.
    let quiet = &names[0];
    fleet.silence(quiet).unwrap();
    let state_of = async |name: &str| {
        hosts(&app, &admin)
            .await
            .into_iter()
            .find(|h| h["name"] == name)
            .map(|h| h["state"].clone())
    };
    wait_for_at_most(
        "the silenced host unreachable",
        Duration::from_secs(10),
        async || is(state_of(quiet).await, Some(json!("unreachable"))),
    )
    .await;
    fleet.resume(quiet).unwrap();
    wait_for("the host ready again", async || {
        is(state_of(quiet).await, Some(json!("ready")))
    })
    .await;

    // Everything deleted: gone from the API, from every host and from the allocations.
    let mut owned = Vec::new();
    for t in &tenants {
        let items = app.get_json(t, "/machines?limit=200").await["items"]
            .as_array()
            .unwrap()
            .clone();
        owned.extend(items.into_iter().map(|m| (t, m)));
    }
    assert_eq!(owned.len(), MACHINES);
    futures::stream::iter(owned)
        .for_each_concurrent(CLIENTS, |(t, m)| async move {
            let id = m["id"].as_str().unwrap();
            let status = retrying_unavailable(async || {
                app_ref
                    .as_user(t, Method::DELETE, &format!("/machines/{id}"))
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
            .await;
            assert_eq!(status, StatusCode::ACCEPTED, "{m}");
        })
        .await;
    wait_for_at_most("every machine gone", Duration::from_secs(300), async || {
        is(live_by_status(&app).await, [])
    })
    .await;
    for t in &tenants {
        assert_eq!(statuses(&app, t).await, []);
    }
    for name in &names {
        let domains = fleet.hypervisor(name).unwrap().domain_names();
        assert!(domains.is_empty(), "{name} still has {domains:?}");
    }
    for h in hosts(&app, &admin).await {
        assert_eq!(h["allocated"]["vcpus"], 0, "{h}");
    }
    assert_eq!(app.store.allocation_drift().await.unwrap(), vec![]);
    assert_eq!(
        fleet.census(),
        Census {
            hosts: HOSTS,
            ..Census::default()
        }
    );
    fleet.stop().await;
    app.stop().await;
}

both_stores!(a_simulated_fleet_holds_500_machines_without_oversubscribing_and_notices_silence);
