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
    // Mid-provisioning: some machines placed, some EnsureVm calls in flight.
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
    let image: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string("/var/lib/skygate-images/tiny/image.json").expect("image.json"),
    )
    .unwrap();
    let text = |k: &str| image["boot"][k].as_str().unwrap_or_default().to_owned();
    agent
        .ensure_vm(proto::agent::v1::EnsureVmRequest {
            spec: Some(proto::agent::v1::VmSpec {
                machine_id: stray.to_string(),
                generation: 1,
                hostname: "stray".into(),
                vcpus: 1,
                memory_mib: 128,
                disk_gib: 1,
                image: Some(proto::agent::v1::ImageSource {
                    name: "tiny".into(),
                    format: proto::agent::v1::DiskFormat::Kernel as i32,
                    kernel_boot: Some(proto::agent::v1::KernelBoot {
                        kernel_url: text("kernel"),
                        kernel_sha256: text("kernel_sha256"),
                        initrd_url: text("initrd"),
                        initrd_sha256: text("initrd_sha256"),
                        cmdline: text("cmdline"),
                    }),
                    ..Default::default()
                }),
                ssh_authorized_keys: vec![],
                user_data: None,
                desired_power: proto::agent::v1::PowerState::Stopped as i32,
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
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_skygate"))
            .args(args)
            .env("SKYGATE_API", &cluster.http)
            .env("SKYGATE_CONFIG_DIR", &config)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("skygate");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "skygate {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
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
    // `skygate machines ssh` runs the system ssh against the forwarded port.
    let deadline = Instant::now() + BOOT;
    let answer = loop {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_skygate"))
            .args([
                "machines",
                "ssh",
                "cli-vm",
                "-i",
                key.to_str().unwrap(),
                "--",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=5",
                "-o",
                "LogLevel=ERROR",
                "hostname",
            ])
            .env("SKYGATE_API", &cluster.http)
            .env("SKYGATE_CONFIG_DIR", &config)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).trim().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(answer, "cli-vm");
    let console = skygate(&["machines", "console", "cli-vm"], "");
    assert!(
        console.contains("SKYGATE-READY hostname=cli-vm"),
        "{console}"
    );
    skygate(&["machines", "stop", "cli-vm", "--wait"], "");
    skygate(&["machines", "delete", "cli-vm", "--wait"], "");
    assert!(cluster.all_domains().is_empty());
}
