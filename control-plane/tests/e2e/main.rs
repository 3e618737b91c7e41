//! SkyGate end to end: the control-plane and host-agent binaries on real libvirt, driven only
//! through the REST API as a tenant and an administrator would, with SSH into the guests
//! through their forwarded ports.

// Helpers outside #[test] functions assert too.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod harness;

use std::time::{Duration, Instant};

use harness::{ssh_hostname, ssh_key, ssh_port, Capacity, Cluster};

const BOOT: Duration = Duration::from_secs(120);
const SMALL: Capacity = Capacity {
    vcpus: 2,
    memory_mib: 2048,
    disk_gib: 20,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_creates_a_machine_reaches_it_over_ssh_and_nothing_is_left_after_delete() {
    let mut cluster = Cluster::start().await;
    cluster.add_agent("a", SMALL).await;
    cluster.register_tiny_image().await;
    let tenant = cluster.tenant("ann").await;
    let (key, public) = ssh_key(cluster.tmp.path());

    let t0 = Instant::now();
    let id = cluster
        .create_machine(&tenant, "web-1", 1, Some(&public))
        .await;
    let running = cluster.wait_status(&tenant, &id, "running", BOOT).await;
    let to_running = t0.elapsed();
    assert_eq!(running["host"], "a");
    let port = ssh_port(&running);
    assert_eq!(ssh_hostname(&key, port, BOOT), "web-1");
    println!(
        "POST /machines -> running: {to_running:?}; -> ssh answered: {:?}",
        t0.elapsed()
    );
    assert_eq!(cluster.domains_of("a").len(), 1);
    let host = cluster.host("a").await;
    assert_eq!(host["allocated"]["vcpus"], 1);
    assert_eq!(host["machines"], 1);

    let console = cluster
        .call(
            "GET",
            &format!("/machines/{id}/console"),
            Some(&tenant),
            None,
        )
        .await;
    assert_eq!(console.0, 200, "{}", console.1);
    assert!(console
        .1
        .as_str()
        .unwrap_or_default()
        .contains("SKYGATE-READY hostname=web-1"));

    for (action, during, after) in [
        ("stop", "stopping", "stopped"),
        ("start", "starting", "running"),
        ("reboot", "rebooting", "running"),
    ] {
        let (status, m) = cluster
            .call(
                "POST",
                &format!("/machines/{id}/{action}"),
                Some(&tenant),
                None,
            )
            .await;
        assert_eq!(status, 202, "{action}: {m}");
        assert_eq!(m["status"], during);
        let m = cluster.wait_status(&tenant, &id, after, BOOT).await;
        if after == "running" {
            assert_eq!(ssh_port(&m), port, "the port stays across {action}");
            assert_eq!(ssh_hostname(&key, port, BOOT), "web-1");
        }
    }

    let (status, _) = cluster
        .call("DELETE", &format!("/machines/{id}"), Some(&tenant), None)
        .await;
    assert_eq!(status, 202);
    cluster
        .wait_machine(&tenant, &id, "gone", BOOT, |m| m["status"] == 404)
        .await;
    assert!(
        cluster.domains_of("a").is_empty(),
        "{:?}",
        cluster.domains_of("a")
    );
    assert!(
        cluster.machine_dirs_of("a").is_empty(),
        "{:?}",
        cluster.machine_dirs_of("a")
    );
    let (_, events) = cluster.call("GET", "/machines", Some(&tenant), None).await;
    assert_eq!(events["items"].as_array().map(Vec::len), Some(0));
    assert_eq!(cluster.host("a").await["allocated"]["vcpus"], 0);
}
