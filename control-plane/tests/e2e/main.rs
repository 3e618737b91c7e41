//! SkyGate end to end: the control-plane and host-agent binaries on real libvirt, driven only
//! through the REST API as a tenant and an administrator would, with SSH into the guests
//! through their forwarded ports.

// Helpers outside #[test] functions assert too.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod harness;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use harness::{ssh_hostname, ssh_key, ssh_port, ssh_run, Capacity, Cluster};

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

/// Issue 15 on real QEMU: a resized machine's guest sees its new vCPUs, memory and disk
/// size and keeps what it wrote; a rebuilt one has a fresh disk and still takes the same SSH
/// key (the seed is written again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resized_guest_sees_its_new_size_and_a_rebuilt_one_a_fresh_disk_with_the_same_key() {
    let mut cluster = Cluster::start().await;
    cluster.add_agent("a", SMALL).await;
    cluster.register_tiny_image().await;
    let tenant = cluster.tenant("rea").await;
    let (key, public) = ssh_key(cluster.tmp.path());
    let id = cluster
        .create_machine(&tenant, "web-1", 1, Some(&public))
        .await;
    let port = ssh_port(&cluster.wait_status(&tenant, &id, "running", BOOT).await);
    let guest = |command: &str| ssh_run(&key, port, command, BOOT);
    // What the guest reads of itself: vCPUs, MemTotal in kB, the disk in 512-byte sectors.
    let size = "nproc; awk '/MemTotal/ {print $2}' /proc/meminfo; cat /sys/block/vda/size";
    let seen =
        |text: String| -> Vec<u64> { text.lines().map(|l| l.trim().parse().expect(l)).collect() };
    let before = seen(guest(size));
    assert_eq!((before[0], before[2]), (1, 2 << 20), "{before:?}");
    assert!(before[1] <= 256 << 10, "{before:?}");
    // The tiny image keeps no filesystem on its disk (only its host key, in the first 4 KiB),
    // so what the tenant writes is 12 bytes at 1 MiB, read back from there.
    const MARK: &str = "SKYGATE-MARK";
    let read_mark = "dd if=/dev/vda bs=1M skip=1 count=1 2>/dev/null | head -c 12";
    guest(&format!(
        "printf {MARK} | dd of=/dev/vda bs=1M seek=1 conv=fsync,notrunc 2>/dev/null"
    ));
    assert_eq!(guest(read_mark), MARK);
    let act = |action: &'static str, body: serde_json::Value| {
        let (cluster, tenant, id) = (&cluster, &tenant, &id);
        async move {
            let path = format!("/machines/{id}/{action}");
            let (status, m) = cluster.call("POST", &path, Some(tenant), Some(body)).await;
            assert_eq!(status, 202, "{action}: {m}");
        }
    };

    act("stop", serde_json::json!({})).await;
    cluster.wait_status(&tenant, &id, "stopped", BOOT).await;
    act(
        "resize",
        serde_json::json!({"vcpus": 2, "memory_mib": 512, "disk_gib": 2}),
    )
    .await;
    cluster.wait_status(&tenant, &id, "stopped", BOOT).await;
    act("start", serde_json::json!({})).await;
    cluster.wait_status(&tenant, &id, "running", BOOT).await;
    let after = seen(guest(size));
    assert_eq!((after[0], after[2]), (2, 4 << 20), "{after:?}");
    assert!(
        after[1] > 256 << 10,
        "MemTotal {} kB after 512 MiB",
        after[1]
    );
    assert_eq!(guest(read_mark), MARK, "a resize keeps the disk");
    assert_eq!(cluster.host("a").await["allocated"]["vcpus"], 2);

    act("rebuild", serde_json::json!({})).await;
    let m = cluster.wait_status(&tenant, &id, "running", BOOT).await;
    assert_eq!(ssh_port(&m), port, "the address stays");
    assert_eq!(ssh_hostname(&key, port, BOOT), "web-1");
    assert_ne!(guest(read_mark), MARK, "the old disk is gone");
    assert_eq!(seen(guest(size))[2], 4 << 20, "a rebuild keeps the size");
    let said = event_messages(&cluster, &tenant, &id).await;
    assert!(
        said.iter().any(|m| m.starts_with("rebuilt on host a")),
        "{said:?}"
    );

    let (status, _) = cluster
        .call("DELETE", &format!("/machines/{id}"), Some(&tenant), None)
        .await;
    assert_eq!(status, 202);
    cluster
        .wait_machine(&tenant, &id, "gone", BOOT, |m| m["status"] == 404)
        .await;
    assert!(cluster.domains_of("a").is_empty());
    assert!(cluster.machine_dirs_of("a").is_empty());
}

/// Issue 14 on real QEMU with two agents: evacuating the host of a running machine moves it,
/// disk and all, to the other agent, where it runs again: what was written to its disk over
/// SSH before the move is read back over SSH after it, through its new forwarded port, and the
/// old host keeps nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evacuating_a_host_moves_a_running_machine_and_its_data_to_the_other_host() {
    let mut cluster = Cluster::start().await;
    cluster.add_agent("a", SMALL).await;
    cluster.add_agent("b", SMALL).await;
    cluster.register_tiny_image().await;
    let admin = cluster.admin.clone();
    let b = cluster.host("b").await["id"]
        .as_str()
        .expect("host id")
        .to_owned();
    let post = |path: String| {
        let (cluster, admin) = (&cluster, &admin);
        async move { cluster.call("POST", &path, Some(admin), None).await }
    };
    assert_eq!(post(format!("/hosts/{b}/cordon")).await.0, 200);
    let tenant = cluster.tenant("eve").await;
    let (key, public) = ssh_key(cluster.tmp.path());
    let id = cluster
        .create_machine(&tenant, "web-1", 1, Some(&public))
        .await;
    let before = cluster.wait_status(&tenant, &id, "running", BOOT).await;
    assert_eq!(before["host"], "a");
    // The tiny image keeps no filesystem on its disk: the tenant's bytes go at 1 MiB.
    const MARK: &str = "SKYGATE-MOVED";
    let read_mark = "dd if=/dev/vda bs=1M skip=1 count=1 2>/dev/null | head -c 13";
    let old_port = ssh_port(&before);
    ssh_run(
        &key,
        old_port,
        &format!("printf {MARK} | dd of=/dev/vda bs=1M seek=1 conv=fsync,notrunc 2>/dev/null"),
        BOOT,
    );
    assert_eq!(ssh_run(&key, old_port, read_mark, BOOT), MARK);
    assert_eq!(post(format!("/hosts/{b}/uncordon")).await.0, 200);

    // The operator's way: `skygate hosts evacuate a --wait`.
    let config = cluster.tmp.path().join("cli-admin");
    let skygate = |args: &[&str], stdin: &str| skygate_cli(&cluster.http, &config, args, stdin);
    let login = skygate(
        &["login", "-u", "root", "--password-stdin"],
        harness::ADMIN_PASSWORD,
    );
    assert!(login.status.success(), "{}", login.stderr);
    let t0 = Instant::now();
    let evacuated = skygate(&["-o", "json", "hosts", "evacuate", "a", "--wait"], "");
    assert!(
        evacuated.status.success(),
        "{}\nevents: {:?}",
        evacuated.stderr,
        event_messages(&cluster, &tenant, &id).await
    );
    let h: serde_json::Value = serde_json::from_str(&evacuated.stdout).expect("host JSON");
    assert_eq!(h["evacuation"]["machines_left"], 0, "{h}");
    assert_eq!(h["cordoned"], true);
    let moved = cluster.wait_status(&tenant, &id, "running", BOOT).await;
    println!("evacuate -> running on b: {:?}", t0.elapsed());
    assert_eq!(moved["host"], "b");
    let new_port = ssh_port(&moved);
    assert_eq!(ssh_hostname(&key, new_port, BOOT), "web-1");
    assert_eq!(
        ssh_run(&key, new_port, read_mark, BOOT),
        MARK,
        "the disk moved"
    );
    assert!(
        cluster.domains_of("a").is_empty(),
        "{:?}",
        cluster.domains_of("a")
    );
    assert!(cluster.machine_dirs_of("a").is_empty());
    assert_eq!(cluster.domains_of("b").len(), 1);
    let said = event_messages(&cluster, &tenant, &id).await;
    assert!(
        said.iter()
            .any(|m| m.starts_with("moved from host a to host b; running")),
        "{said:?}"
    );

    let (status, _) = cluster
        .call("DELETE", &format!("/machines/{id}"), Some(&tenant), None)
        .await;
    assert_eq!(status, 202);
    cluster
        .wait_machine(&tenant, &id, "gone", BOOT, |m| m["status"] == 404)
        .await;
    assert!(cluster.all_domains().is_empty());
}

fn vcpus(n: u32) -> Capacity {
    Capacity {
        vcpus: n,
        memory_mib: 2048,
        disk_gib: 20,
    }
}

/// The machine's latest event messages, newest last.
async fn event_messages(cluster: &Cluster, token: &str, id: &str) -> Vec<String> {
    let (_, page) = cluster
        .call("GET", &format!("/machines/{id}/events"), Some(token), None)
        .await;
    page["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|e| e["message"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_follows_capacity_skips_cordoned_hosts_and_waits_for_room() {
    let mut cluster = Cluster::start().await;
    cluster.add_agent("a", vcpus(1)).await;
    cluster.add_agent("b", vcpus(1)).await;
    cluster.add_agent("c", vcpus(2)).await;
    cluster.register_tiny_image().await;
    let tenant = cluster.tenant("placer").await;
    let admin = cluster.admin.clone();

    let c_id = cluster.host("c").await["id"].as_str().unwrap().to_owned();
    let (status, c) = cluster
        .call("POST", &format!("/hosts/{c_id}/cordon"), Some(&admin), None)
        .await;
    assert_eq!(
        (status, c["state"].as_str()),
        (200, Some("cordoned")),
        "{c}"
    );

    // a and b take one machine each; cordoned c takes none.
    let m1 = cluster.create_machine(&tenant, "m1", 1, None).await;
    let m2 = cluster.create_machine(&tenant, "m2", 1, None).await;
    let mut hosts = Vec::new();
    for id in [&m1, &m2] {
        let m = cluster.wait_status(&tenant, id, "running", BOOT).await;
        hosts.push(m["host"].as_str().unwrap().to_owned());
    }
    hosts.sort();
    assert_eq!(hosts, ["a", "b"]);

    // Nothing has room: m3 waits, and says why.
    let m3 = cluster.create_machine(&tenant, "m3", 1, None).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let waiting = cluster
        .call("GET", &format!("/machines/{m3}"), Some(&tenant), None)
        .await
        .1;
    assert_eq!(waiting["status"], "pending", "{waiting}");
    let notes = event_messages(&cluster, &tenant, &m3).await;
    assert!(
        notes
            .iter()
            .any(|n| n.contains("waiting for capacity") && n.contains("c: cordoned")),
        "{notes:?}"
    );

    // Uncordoned, c takes it.
    let (status, _) = cluster
        .call(
            "POST",
            &format!("/hosts/{c_id}/uncordon"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let m = cluster.wait_status(&tenant, &m3, "running", BOOT).await;
    assert_eq!(m["host"], "c");

    // Two vCPUs fit nowhere now (c has one left); deleting m3 makes room on c.
    let m4 = cluster.create_machine(&tenant, "m4", 2, None).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        cluster
            .call("GET", &format!("/machines/{m4}"), Some(&tenant), None)
            .await
            .1["status"],
        "pending"
    );
    let (status, refused) = cluster
        .call("DELETE", &format!("/hosts/{c_id}"), Some(&admin), None)
        .await;
    assert_eq!(
        status, 409,
        "a host with live machines cannot be deleted: {refused}"
    );
    cluster
        .call("DELETE", &format!("/machines/{m3}"), Some(&tenant), None)
        .await;
    let m = cluster.wait_status(&tenant, &m4, "running", BOOT).await;
    assert_eq!(m["host"], "c");

    // Never more than a host offers.
    for name in ["a", "b", "c"] {
        let h = cluster.host(name).await;
        assert!(
            h["allocated"]["vcpus"].as_i64() <= h["capacity"]["vcpus"].as_i64(),
            "{h}"
        );
        assert_eq!(
            cluster.domains_of(name).len() as i64,
            h["machines"].as_i64().unwrap(),
            "{h}"
        );
    }
    for id in [&m1, &m2, &m4] {
        cluster
            .call("DELETE", &format!("/machines/{id}"), Some(&tenant), None)
            .await;
    }
    for id in [&m1, &m2, &m4] {
        cluster
            .wait_machine(&tenant, id, "gone", BOOT, |m| m["status"] == 404)
            .await;
    }
    assert!(
        cluster.all_domains().is_empty(),
        "{:?}",
        cluster.all_domains()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_control_plane_and_of_an_agent_leaves_no_doubled_or_orphaned_domain() {
    let mut cluster = Cluster::start().await;
    cluster.add_agent("a", vcpus(8)).await;
    cluster.register_tiny_image().await;
    let tenant = cluster.tenant("crashy").await;

    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(
                cluster
                    .create_machine(&tenant, &format!("k{i}"), 1, None)
                    .await,
            );
        }
        ids
    };
    // Mid-provisioning: some machines placed, some EnsureMachine calls in flight.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let http = cluster.http_addr();
    cluster.kill_control_plane();
    cluster.start_control_plane(&http);
    for id in &ids {
        cluster.wait_status(&tenant, id, "running", BOOT).await;
    }
    let mut domains = cluster.domains_of("a");
    domains.sort();
    let mut expected: Vec<String> = ids
        .iter()
        .map(|id| format!("{}{id}", cluster.agent_prefix("a")))
        .collect();
    expected.sort();
    assert_eq!(
        domains, expected,
        "one domain per machine, none doubled or orphaned"
    );
    assert_eq!(cluster.machine_dirs_of("a").len(), 3);

    // The agent dies: its host turns unreachable and the machines say so; QEMU lives on.
    cluster.kill_agent(0);
    cluster
        .wait_for_host("a", "unreachable", Duration::from_secs(30))
        .await;
    let notes = event_messages(&cluster, &tenant, &ids[0]).await;
    assert!(notes.iter().any(|n| n.contains("unreachable")), "{notes:?}");
    let m = cluster
        .call("GET", &format!("/machines/{}", ids[0]), Some(&tenant), None)
        .await
        .1;
    assert_eq!(m["host_state"], "unreachable", "{m}");
    cluster.start_agent(0, vcpus(8)).await;
    cluster
        .wait_for_host("a", "ready", Duration::from_secs(30))
        .await;
    let notes = event_messages(&cluster, &tenant, &ids[0]).await;
    assert!(
        notes.iter().any(|n| n.contains("reachable again")),
        "{notes:?}"
    );
    let mut after = cluster.domains_of("a");
    after.sort();
    assert_eq!(after, expected);
    for id in &ids {
        let m = cluster
            .call("GET", &format!("/machines/{id}"), Some(&tenant), None)
            .await
            .1;
        assert_eq!(m["status"], "running", "{m}");
    }
    for id in &ids {
        cluster
            .call("DELETE", &format!("/machines/{id}"), Some(&tenant), None)
            .await;
    }
    for id in &ids {
        cluster
            .wait_machine(&tenant, id, "gone", BOOT, |m| m["status"] == 404)
            .await;
    }
    assert!(
        cluster.all_domains().is_empty(),
        "{:?}",
        cluster.all_domains()
    );
    assert!(cluster.machine_dirs_of("a").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_notices_a_dead_domain_and_removes_an_orphan() {
    let mut cluster = Cluster::start().await;
    cluster.add_agent("a", vcpus(4)).await;
    cluster.register_tiny_image().await;
    let tenant = cluster.tenant("recon").await;
    let id = cluster.create_machine(&tenant, "victim", 1, None).await;
    cluster.wait_status(&tenant, &id, "running", BOOT).await;

    // Its QEMU dies: the machine reads stopped within seconds, and its log says why.
    let domain = format!("{}{id}", cluster.agent_prefix("a"));
    let pid: i32 = std::fs::read_to_string(format!("/run/libvirt/qemu/{domain}.pid"))
        .expect("qemu pid file")
        .trim()
        .parse()
        .expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill qemu");
    let killed = Instant::now();
    let m = cluster
        .wait_status(&tenant, &id, "stopped", Duration::from_secs(30))
        .await;
    println!("QEMU killed -> machine stopped: {:?}", killed.elapsed());
    assert_eq!(m["desired_state"], "stopped");
    let notes = event_messages(&cluster, &tenant, &id).await;
    assert!(
        notes.iter().any(|n| n.contains("exited unexpectedly")),
        "{notes:?}"
    );
    let (status, _) = cluster
        .call(
            "POST",
            &format!("/machines/{id}/start"),
            Some(&tenant),
            None,
        )
        .await;
    assert_eq!(status, 202);
    cluster.wait_status(&tenant, &id, "running", BOOT).await;

    // A domain with the agent's prefix that no machine owns (what a crash between an agent's
    // define and the control plane's record could leave) is removed after the grace period.
    let stray = uuid::Uuid::new_v4();
    let mut agent = cluster.agent_client("a").await;
    agent
        .ensure_machine(proto::agent::v1::EnsureMachineRequest {
            spec: Some(proto::agent::v1::MachineSpec {
                machine_id: stray.to_string(),
                generation: 1,
                hostname: "stray".into(),
                vcpus: 1,
                memory_mib: 128,
                disk_gib: 1,
                image: Some(skygate_test_support::tiny_image_source()),
                ssh_authorized_keys: vec![],
                user_data: None,
                desired_power: proto::agent::v1::PowerState::Stopped as i32,
                disk_generation: 0,
                disk_must_exist: false,
            }),
        })
        .await
        .expect("a stray domain");
    assert_eq!(cluster.domains_of("a").len(), 2);
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.domains_of("a").len() != 1 {
        assert!(
            Instant::now() < deadline,
            "orphan never removed: {:?}",
            cluster.domains_of("a")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(cluster.domains_of("a"), vec![domain]);
    assert_eq!(
        cluster
            .call("GET", &format!("/machines/{id}"), Some(&tenant), None)
            .await
            .1["status"],
        "running"
    );
}

/// Issue 14, forget: the agent of a host is killed and stays away; an administrator forgets
/// the machine it held (its QEMU still runs: nobody could ask it to stop). When the agent is
/// started again, neither the domain nor any file of the machine survives, and the machine's
/// log says what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_forgotten_while_its_host_is_lost_leaves_nothing_when_the_host_returns() {
    let mut cluster = Cluster::start().await;
    cluster.add_agent("a", vcpus(4)).await;
    cluster.register_tiny_image().await;
    let tenant = cluster.tenant("forget").await;
    let id = cluster.create_machine(&tenant, "lost", 1, None).await;
    cluster.wait_status(&tenant, &id, "running", BOOT).await;
    assert_eq!(cluster.domains_of("a").len(), 1);
    assert_eq!(cluster.machine_dirs_of("a").len(), 1);

    cluster.kill_agent(0);
    cluster
        .wait_for_host("a", "unreachable", Duration::from_secs(30))
        .await;
    let admin = cluster.admin.clone();
    let (status, body) = cluster
        .call(
            "DELETE",
            &format!("/machines/{id}?force=true"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "deleted");
    let (status, _) = cluster
        .call("GET", &format!("/machines/{id}"), Some(&tenant), None)
        .await;
    assert_eq!(status, 404);
    assert_eq!(cluster.host("a").await["allocated"]["vcpus"], 0);
    // What the lost host still runs, nobody has touched.
    assert_eq!(cluster.domains_of("a").len(), 1);

    cluster.start_agent(0, vcpus(4)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(cluster.domains_of("a").is_empty() && cluster.machine_dirs_of("a").is_empty()) {
        assert!(
            Instant::now() < deadline,
            "leftovers survived: domains {:?}, files {:?}",
            cluster.domains_of("a"),
            cluster.machine_dirs_of("a")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let notes = event_messages(&cluster, &admin, &id).await;
    assert!(
        notes
            .iter()
            .any(|n| n.contains("forgotten by an administrator")),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains("removed its leftover domain")),
        "{notes:?}"
    );
}

/// The pid of the QEMU running machine `id` on agent `agent`.
fn qemu_pid(cluster: &Cluster, agent: &str, id: &str) -> i32 {
    let domain = format!("{}{id}", cluster.agent_prefix(agent));
    std::fs::read_to_string(format!("/run/libvirt/qemu/{domain}.pid"))
        .expect("qemu pid file")
        .trim()
        .parse()
        .expect("pid")
}

/// Issue 14, restart policy: a machine with `on-failure` whose QEMU is killed runs again, on
/// a new QEMU; the cluster allows two restarts a window, so the third kill leaves it stopped,
/// and its log says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_qemu_is_restarted_by_policy_until_the_cap() {
    let mut cluster = Cluster::start().await;
    cluster.add_agent("a", vcpus(4)).await;
    cluster.register_tiny_image().await;
    let tenant = cluster.tenant("phoenix").await;
    let body = serde_json::json!({"hostname": "phoenix", "image": "tiny", "vcpus": 1, "memory_mib": 256,
        "disk_gib": 1, "restart_policy": "on-failure"});
    let (status, created) = cluster
        .call("POST", "/machines", Some(&tenant), Some(body))
        .await;
    assert_eq!(status, 202, "{created}");
    let id = created["id"].as_str().expect("id").to_owned();
    cluster.wait_status(&tenant, &id, "running", BOOT).await;

    for attempt in 1..=3 {
        let pid = qemu_pid(&cluster, "a", &id);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill qemu");
        let killed = Instant::now();
        if attempt <= 2 {
            let note = format!("restart {attempt} of at most 2");
            let deadline = Instant::now() + Duration::from_secs(60);
            let m = loop {
                let m = cluster
                    .wait_status(&tenant, &id, "running", Duration::from_secs(60))
                    .await;
                let notes = event_messages(&cluster, &tenant, &id).await;
                if notes.iter().any(|n| n.contains(&note)) {
                    break m;
                }
                assert!(Instant::now() < deadline, "no '{note}' in {notes:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            assert_eq!(m["desired_state"], "running");
            let new_pid = qemu_pid(&cluster, "a", &id);
            assert_ne!(new_pid, pid, "the same QEMU after a kill");
            println!(
                "QEMU killed -> running again ({note}): {:?}",
                killed.elapsed()
            );
        } else {
            let m = cluster
                .wait_status(&tenant, &id, "stopped", Duration::from_secs(60))
                .await;
            assert_eq!(m["desired_state"], "stopped");
        }
    }
    let notes = event_messages(&cluster, &tenant, &id).await;
    assert!(
        notes
            .iter()
            .any(|n| n.contains("not restarted: it was restarted 2 times")),
        "{notes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_takes_a_tenant_from_login_to_an_ssh_session() {
    let mut cluster = Cluster::start().await;
    cluster.add_agent("a", SMALL).await;
    cluster.register_tiny_image().await;
    cluster.tenant("clara").await;
    let (key, public) = ssh_key(cluster.tmp.path());
    let pubfile = cluster.tmp.path().join("id_ed25519.pub");
    let config = cluster.tmp.path().join("cli-config");
    let skygate = |args: &[&str], stdin: &str| {
        let out = skygate_cli(&cluster.http, &config, args, stdin);
        assert!(out.status.success(), "skygate {args:?}: {}", out.stderr);
        out.stdout
    };
    skygate(
        &["login", "-u", "clara", "--password-stdin"],
        "correct horse battery staple",
    );
    assert!(public.starts_with("ssh-ed25519"));
    let created = skygate(
        &[
            "machines",
            "create",
            "cli-vm",
            "--image",
            "tiny",
            "--memory-mib",
            "256",
            "--disk-gib",
            "1",
            "--ssh-key",
            pubfile.to_str().unwrap(),
            "--wait",
        ],
        "",
    );
    assert!(
        created.contains("running") && created.contains("port:"),
        "{created}"
    );
    // `skygate machines ssh` works the first time without a terminal or a prompt: it waits for
    // the guest to print its host keys on the console, pins them in the CLI's known_hosts and
    // has ssh check them strictly. setsid takes the controlling terminal away, so nothing can
    // ask /dev/tty either.
    let known_hosts = config.join("known_hosts");
    let cli_ssh = |extra: &[&str]| {
        let mut args = vec!["machines", "ssh", "cli-vm", "-i", key.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "hostname"]);
        run_bounded(
            std::process::Command::new("setsid")
                .arg("--wait")
                .arg(skygate_test_support::workspace_bin(
                    "skygate",
                    "skygate-cli",
                ))
                .args(&args)
                .env("SKYGATE_API", &cluster.http)
                .env("SKYGATE_CONFIG_DIR", &config),
            BOOT,
            "skygate machines ssh cli-vm",
        )
    };
    let first = cli_ssh(&[]);
    assert!(first.status.success(), "first ssh: {}", first.stderr);
    assert_eq!(first.stdout.trim(), "cli-vm", "{}", first.stderr);
    eprintln!("first `skygate machines ssh`: {}", first.stderr.trim());
    // The pin is the ed25519 key the guest printed on its console, under the machine's alias.
    let console = skygate(&["machines", "console", "cli-vm"], "");
    assert!(
        console.contains("SKYGATE-READY hostname=cli-vm"),
        "{console}"
    );
    let printed = console
        .lines()
        .skip_while(|l| !l.contains("-----BEGIN SSH HOST KEY KEYS-----"))
        .find(|l| l.starts_with("ssh-ed25519 "))
        .unwrap_or_else(|| panic!("no ed25519 host key on the console:\n{console}"));
    let printed: Vec<&str> = printed.split_whitespace().take(2).collect();
    let pinned = std::fs::read_to_string(&known_hosts).expect("the CLI's known_hosts");
    let (alias, pinned_key) = pinned
        .lines()
        .find_map(|l| l.split_once(' '))
        .unwrap_or_else(|| panic!("nothing pinned: {pinned:?}"));
    assert!(alias.starts_with("skygate-"), "{pinned}");
    assert_eq!(pinned_key, printed.join(" "), "{pinned}");
    assert_eq!(
        std::fs::metadata(&known_hosts)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // Later uses go by the pin.
    let again = cli_ssh(&[]);
    assert!(again.status.success(), "second ssh: {}", again.stderr);
    assert_eq!(again.stdout.trim(), "cli-vm");

    // Another valid key in place of the pinned one: ssh refuses, the CLI says why, and the pin
    // is not silently replaced by what the console says.
    let other = cluster.tmp.path().join("other-host-key");
    assert!(std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "other", "-f"])
        .arg(&other)
        .status()
        .expect("ssh-keygen")
        .success());
    let other_key = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let other_key: Vec<&str> = other_key.split_whitespace().take(2).collect();
    let corrupted = format!("{alias} {}\n", other_key.join(" "));
    std::fs::write(&known_hosts, &corrupted).unwrap();
    let refused = cli_ssh(&[]);
    assert!(
        !refused.status.success(),
        "ssh with a wrong pinned key succeeded: {}",
        refused.stdout
    );
    assert!(
        refused
            .stderr
            .contains("the SSH host key of machine cli-vm did not match the one pinned for it"),
        "{}",
        refused.stderr
    );
    assert!(refused.stdout.trim().is_empty(), "{}", refused.stdout);
    eprintln!("with a wrong pin: {}", refused.stderr.trim());
    assert_eq!(std::fs::read_to_string(&known_hosts).unwrap(), corrupted);
    // Re-pinning, which the user asks for, takes the console's keys again.
    let repinned = cli_ssh(&["--repin-host-keys"]);
    assert!(
        repinned.status.success(),
        "repinned ssh: {}",
        repinned.stderr
    );
    assert_eq!(repinned.stdout.trim(), "cli-vm");
    assert_eq!(std::fs::read_to_string(&known_hosts).unwrap(), pinned);

    // The guest keeps its host key across a reboot (on its own disk), so the pin still holds.
    skygate(&["machines", "reboot", "cli-vm", "--wait"], "");
    let deadline = Instant::now() + BOOT;
    loop {
        let console = skygate(&["machines", "console", "cli-vm"], "");
        if console.matches("SKYGATE-READY hostname=cli-vm").count() >= 2 {
            assert!(
                console.contains("host key restored from the disk"),
                "{console}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cli-vm did not come back after its reboot; console:\n{console}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let rebooted = cli_ssh(&[]);
    assert!(
        rebooted.status.success(),
        "ssh after a reboot: {}",
        rebooted.stderr
    );
    assert_eq!(rebooted.stdout.trim(), "cli-vm");
    assert_eq!(std::fs::read_to_string(&known_hosts).unwrap(), pinned);

    // Resize and rebuild (issue 15). A rebuild erases the disk, so it asks for --yes; the
    // fresh disk makes new host keys, which the next ssh pins from the console (the old pin
    // is dropped, and the old keys are no longer on the console).
    skygate(&["machines", "stop", "cli-vm", "--wait"], "");
    let resized = skygate(
        &["machines", "resize", "cli-vm", "--disk-gib", "2", "--wait"],
        "",
    );
    assert!(resized.contains("stopped"), "{resized}");
    let waited = skygate(
        &[
            "-o",
            "json",
            "machines",
            "wait",
            "cli-vm",
            "--status",
            "stopped",
            "--timeout",
            "5",
        ],
        "",
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&waited).unwrap()["disk_gib"],
        2,
        "{waited}"
    );
    skygate(&["machines", "start", "cli-vm", "--wait"], "");
    let unconfirmed = run_bounded(
        std::process::Command::new(skygate_test_support::workspace_bin(
            "skygate",
            "skygate-cli",
        ))
        .args(["machines", "rebuild", "cli-vm"])
        .env("SKYGATE_API", &cluster.http)
        .env("SKYGATE_CONFIG_DIR", &config),
        BOOT,
        "skygate machines rebuild without --yes",
    );
    assert!(!unconfirmed.status.success());
    assert!(
        unconfirmed.stderr.contains("--yes"),
        "{}",
        unconfirmed.stderr
    );
    let rebuilt = skygate(&["machines", "rebuild", "cli-vm", "--yes", "--wait"], "");
    assert!(rebuilt.contains("running"), "{rebuilt}");
    let after_rebuild = cli_ssh(&[]);
    assert!(
        after_rebuild.status.success(),
        "ssh after a rebuild: {}",
        after_rebuild.stderr
    );
    assert_eq!(after_rebuild.stdout.trim(), "cli-vm");
    let repinned = std::fs::read_to_string(&known_hosts).unwrap();
    assert_ne!(repinned, pinned, "the fresh disk's host key is pinned");

    skygate(&["machines", "stop", "cli-vm", "--wait"], "");
    skygate(&["machines", "delete", "cli-vm", "--wait"], "");
    assert!(cluster.all_domains().is_empty());
    // A deleted machine's keys are unpinned (its id, and so its alias, never comes back).
    assert_eq!(std::fs::read_to_string(&known_hosts).unwrap(), "");
}

/// `skygate ARGS` against the cluster at `http` with its session in `config`, bounded.
fn skygate_cli(http: &str, config: &std::path::Path, args: &[&str], stdin: &str) -> Finished {
    run_bounded_with_input(
        std::process::Command::new(skygate_test_support::workspace_bin(
            "skygate",
            "skygate-cli",
        ))
        .args(args)
        .env("SKYGATE_API", http)
        .env("SKYGATE_CONFIG_DIR", config),
        stdin,
        BOOT,
        &format!("skygate {args:?}"),
    )
}

/// What a finished command printed.
struct Finished {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` with stdin closed, killing it and failing with `what` if it has not finished
/// within `timeout`.
fn run_bounded(cmd: &mut std::process::Command, timeout: Duration, what: &str) -> Finished {
    run_bounded_with_input(cmd, "", timeout, what)
}

/// [`run_bounded`] with `input` on stdin (then closed).
fn run_bounded_with_input(
    cmd: &mut std::process::Command,
    input: &str,
    timeout: Duration,
    what: &str,
) -> Finished {
    use std::io::{Read, Write};
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    // Written on a thread and closed, so a child that does not read cannot block the test.
    let mut stdin = child.stdin.take();
    let input = input.as_bytes().to_vec();
    std::thread::spawn(move || {
        if let Some(pipe) = stdin.as_mut() {
            let _ = pipe.write_all(&input);
        }
    });
    // Drained on threads so a chatty child never blocks on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} did not finish within {timeout:?}; stderr: {}",
                stderr.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Finished {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Issue 10, fault tests: libvirtd killed (-9) while a machine is being built. The agent's
/// steps fail while it is away and are retried; once it is back the machine runs, with one
/// domain, and a delete leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirtd_killed_mid_provisioning_then_back_the_machine_still_runs() {
    let mut cluster = Cluster::start().await;
    cluster.add_agent("a", SMALL).await;
    cluster.register_tiny_image().await;
    let tenant = cluster.tenant("libvirt-fault").await;
    let id = cluster.create_machine(&tenant, "through", 1, None).await;
    cluster
        .wait_machine(&tenant, &id, "provisioning", BOOT, |m| {
            m["status"] == "provisioning" || m["status"] == "running"
        })
        .await;
    harness::kill_libvirtd();
    // Away for a few seconds (the agent's calls fail and are retried meanwhile).
    tokio::time::sleep(Duration::from_secs(4)).await;
    harness::ensure_libvirtd();
    cluster.wait_status(&tenant, &id, "running", BOOT).await;
    assert_eq!(
        cluster.domains_of("a"),
        vec![format!("{}{id}", cluster.agent_prefix("a"))]
    );
    cluster
        .call("DELETE", &format!("/machines/{id}"), Some(&tenant), None)
        .await;
    cluster
        .wait_machine(&tenant, &id, "gone", BOOT, |m| m["status"] == 404)
        .await;
    assert!(cluster.domains_of("a").is_empty());
    assert!(cluster.machine_dirs_of("a").is_empty());
}

/// A small tmpfs mounted for one test, unmounted (lazily: an agent may still hold it) when
/// the test ends, however it ends.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: std::path::PathBuf, size: &str) -> SmallDisk {
        std::fs::create_dir_all(&at).unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&at)
            .status()
            .expect("mount");
        assert!(status.success(), "mount tmpfs at {at:?}");
        SmallDisk(at)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Issue 10, fault tests: the agent's data directory is full (an 8 MiB tmpfs; the tiny
/// kernel alone is 14 MiB). The machine fails with a reason naming the step and the cause,
/// and nothing half-written stays: no partial image in the cache, no machine directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_dir_fails_the_machine_with_a_reason_and_leaves_nothing_half_written() {
    let mut cluster = Cluster::start().await;
    let data = cluster.tmp.path().join("agent-tight");
    let _disk = SmallDisk::mount(data.clone(), "8m");
    cluster.add_agent("tight", SMALL).await;
    cluster.register_tiny_image().await;
    let tenant = cluster.tenant("fill").await;
    let id = cluster.create_machine(&tenant, "no-room", 1, None).await;
    let failed = cluster
        .wait_machine(&tenant, &id, "failed", BOOT, |m| m["status"] == "failed")
        .await;
    let reason = failed["failure_reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let events = event_messages(&cluster, &tenant, &id).await;
    let said = format!("{reason} {events:?}").to_lowercase();
    assert!(said.contains("image"), "the step is named: {said}");
    println!("what the tenant was told: {said}");
    assert!(said.contains("no space left"), "the cause is named: {said}");
    // Nothing half-written: only finished images (none here) in the cache, no temp files.
    let leftovers: Vec<_> = walk(&data)
        .into_iter()
        .filter(|p| p.is_file() && p.metadata().map(|m| m.len() > 0).unwrap_or(false))
        .filter(|p| p.file_name().is_some_and(|n| n != "host-credential"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    cluster
        .call("DELETE", &format!("/machines/{id}"), Some(&tenant), None)
        .await;
    cluster
        .wait_machine(&tenant, &id, "gone", BOOT, |m| m["status"] == 404)
        .await;
    assert!(cluster.machine_dirs_of("tight").is_empty());
    assert!(cluster.domains_of("tight").is_empty());
}

/// Every path under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}
