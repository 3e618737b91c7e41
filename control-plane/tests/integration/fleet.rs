//! A simulated fleet (`host_agent::simulate`: real gRPC agents over fake hypervisors) against
//! the real control plane: ten hosts of eight vCPUs take sixty machines from three tenants
//! without oversubscribing one, the kept allocations match what is placed, a crashed domain and
//! a silenced host are noticed, and deleting everything leaves no domain on any host.

use crate::both_stores;
use crate::common::provisioning::{
    is, provisioning_config, register_fake_kernel_image, wait_for, wait_for_at_most,
};
use crate::common::{Backend, Session, TestApp};
use host_agent::simulate::{SimulateConfig, SimulatedCapacity, SimulatedFleet};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

const TOKEN: &str = "fleet-test-agent-token";
const HOSTS: usize = 10;
const VCPUS: u32 = 8;
const MACHINES: usize = 60;

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

async fn a_simulated_fleet_holds_sixty_machines_without_oversubscribing_and_notices_silence(
    backend: Backend,
) {
    let mut cfg = provisioning_config(TOKEN);
    cfg.workflows.workers = 4;
    cfg.workflows.unreachable_after = Duration::from_secs(2);
    let app = TestApp::spawn_provisioning(backend, cfg).await;
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
    assert_eq!(fleet.registered(), HOSTS);
    for h in hosts(&app, &admin).await {
        assert_eq!(h["capacity"]["vcpus"], VCPUS, "{h}");
        assert!(
            h["agent_version"].as_str().unwrap().ends_with("-simulated"),
            "{h}"
        );
    }
    register_fake_kernel_image(&app, &admin, &images).await;

    let tenants = [
        app.user("fleet-a").await,
        app.user("fleet-b").await,
        app.user("fleet-c").await,
    ];
    for i in 0..MACHINES {
        let res = app
            .as_user(&tenants[i % tenants.len()], Method::POST, "/machines")
            .json(&json!({"hostname": format!("m-{i}"), "image": "fake",
                "vcpus": 1, "memory_mib": 128, "disk_gib": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED, "machine {i}");
    }
    let per_tenant = MACHINES / tenants.len();
    wait_for("every machine running", async || {
        let mut seen = Vec::new();
        for t in &tenants {
            seen.push(statuses(&app, t).await);
        }
        let want = vec![("running".to_owned(), per_tenant)];
        is(seen, vec![want.clone(), want.clone(), want])
    })
    .await;

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

    // A host that stops heartbeating is noticed (unreachable after 2 s of silence here), and
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
    for t in &tenants {
        let items = app.get_json(t, "/machines?limit=200").await["items"]
            .as_array()
            .unwrap()
            .clone();
        for m in items {
            let id = m["id"].as_str().unwrap();
            let res = app
                .as_user(t, Method::DELETE, &format!("/machines/{id}"))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::ACCEPTED, "{m}");
        }
    }
    wait_for("every machine gone", async || {
        let mut left = 0;
        for t in &tenants {
            left += app.get_json(t, "/machines?limit=200").await["items"]
                .as_array()
                .unwrap()
                .len();
        }
        is(left, 0)
    })
    .await;
    for name in &names {
        let domains = fleet.hypervisor(name).unwrap().domain_names();
        assert!(domains.is_empty(), "{name} still has {domains:?}");
    }
    for h in hosts(&app, &admin).await {
        assert_eq!(h["allocated"]["vcpus"], 0, "{h}");
    }
    assert_eq!(app.store.allocation_drift().await.unwrap(), vec![]);
    fleet.stop().await;
    app.stop().await;
}

both_stores!(a_simulated_fleet_holds_sixty_machines_without_oversubscribing_and_notices_silence);
