//! The host agent against a real libvirtd, driven over gRPC as the control plane will: real
//! QEMU domains (TCG here, KVM where the host has it) booting the tiny image, SSH through the
//! forwarded port, crashes, agent kill -9 mid-create, and a libvirtd restart.

// Helpers outside #[test] functions assert too.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod harness;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use harness::{qemu_pid, ssh_hostname, ssh_key, ssh_run, virsh, Fixture};
use proto::agent::v1 as pb;
use tokio_stream::StreamExt;
use uuid::Uuid;

const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

fn phase(state: &pb::MachineState) -> pb::MachinePhase {
    pb::MachinePhase::try_from(state.phase).unwrap_or(pb::MachinePhase::Unspecified)
}

fn ssh_port(state: &pb::MachineState) -> u16 {
    let ports = &state.network.as_ref().expect("network").ports;
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(
        (ports[0].guest_port, ports[0].host_ip.as_str()),
        (22, "127.0.0.1")
    );
    u16::try_from(ports[0].host_port).expect("a port")
}

fn machine_ref(id: Uuid) -> pb::MachineRef {
    pb::MachineRef {
        machine_id: id.to_string(),
    }
}

/// A WatchEvents stream that starts after everything already recorded: the backlog of a
/// stream from 0 is drained (it arrives at once), and a second stream resumes after it.
async fn watch_from_now(client: &mut harness::Client) -> tonic::Streaming<pb::MachineEvent> {
    let mut all = client
        .watch_events(pb::WatchEventsRequest { after_sequence: 0 })
        .await
        .expect("WatchEvents")
        .into_inner();
    let mut last = 0;
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(300), all.next()).await {
        last = event.expect("event").sequence;
    }
    client
        .watch_events(pb::WatchEventsRequest {
            after_sequence: last,
        })
        .await
        .expect("WatchEvents")
        .into_inner()
}

/// The reason of the next STOPPED event of machine `id`.
async fn next_stop_reason(events: &mut tonic::Streaming<pb::MachineEvent>, id: Uuid) -> String {
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = events.next().await {
            let event = event.expect("event");
            if event.machine_id == id.to_string() && event.phase == pb::MachinePhase::Stopped as i32
            {
                return event.reason;
            }
        }
        panic!("event stream ended")
    })
    .await
    .expect("a STOPPED event")
}

fn inode(path: &std::path::Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path:?}: {e}"))
        .ino()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_boots_answers_ssh_survives_stop_start_reboot_and_leaves_nothing() {
    let fx = Fixture::new();
    let agent = fx.start_agent(&[]);
    let mut client = fx.client(&agent).await;
    let (key, public) = ssh_key(fx.tmp.path());
    let id = Uuid::new_v4();
    let spec = fx.spec(id, 1, "lifecycle-1", Some(&public), pb::PowerState::Running);

    let t0 = Instant::now();
    let state = client
        .ensure_machine(pb::EnsureMachineRequest { spec: Some(spec) })
        .await
        .expect("EnsureMachine")
        .into_inner();
    let to_running = t0.elapsed();
    assert_eq!(phase(&state), pb::MachinePhase::Running);
    assert_eq!(state.generation, 1);
    assert_eq!(state.domain_name, format!("{}{id}", fx.prefix));
    let port = ssh_port(&state);
    assert_eq!(ssh_hostname(&key, port, BOOT_TIMEOUT), "lifecycle-1");
    let to_ssh = t0.elapsed();
    println!("EnsureMachine -> running: {to_running:?}; EnsureMachine -> ssh answered: {to_ssh:?}");

    let dir = fx.machine_dir(id);
    let (overlay, seed, console) = (
        dir.join("disk.qcow2"),
        dir.join("seed.iso"),
        dir.join("console.log"),
    );
    let (overlay_ino, seed_ino) = (inode(&overlay), inode(&seed));
    assert!(console.is_file());
    let tail = client
        .get_console(pb::GetConsoleRequest {
            machine_id: id.to_string(),
            max_bytes: 0,
        })
        .await
        .expect("GetConsole")
        .into_inner();
    assert!(
        String::from_utf8_lossy(&tail.data).contains("SKYGATE-READY hostname=lifecycle-1"),
        "console: {}",
        String::from_utf8_lossy(&tail.data)
    );

    let mut events = watch_from_now(&mut client).await;
    // The tiny image's acpid powers off on the ACPI button: a graceful stop.
    let t_stop = Instant::now();
    let stopped = client
        .stop_machine(pb::StopMachineRequest {
            machine_id: id.to_string(),
            graceful_timeout_secs: 30,
        })
        .await
        .expect("StopMachine")
        .into_inner();
    println!("graceful StopMachine: {:?}", t_stop.elapsed());
    assert_eq!(phase(&stopped), pb::MachinePhase::Stopped);
    assert_eq!(
        next_stop_reason(&mut events, id).await,
        "shut down by the guest"
    );
    assert_eq!(
        virsh(&["domstate", &state.domain_name]).unwrap().stdout,
        b"shut off\n\n"
    );
    assert_eq!(
        (inode(&overlay), inode(&seed)),
        (overlay_ino, seed_ino),
        "disk and seed kept"
    );

    let started = client
        .start_machine(machine_ref(id))
        .await
        .expect("StartMachine")
        .into_inner();
    assert_eq!(phase(&started), pb::MachinePhase::Running);
    assert_eq!(
        ssh_port(&started),
        port,
        "the forwarded port survives a stop"
    );
    assert_eq!(ssh_hostname(&key, port, BOOT_TIMEOUT), "lifecycle-1");

    // A guest that ignores the button is forced off after the timeout.
    ssh_run(&key, port, "killall acpid", BOOT_TIMEOUT);
    let forced = client
        .stop_machine(pb::StopMachineRequest {
            machine_id: id.to_string(),
            graceful_timeout_secs: 2,
        })
        .await
        .expect("StopMachine")
        .into_inner();
    assert_eq!(phase(&forced), pb::MachinePhase::Stopped);
    let reason = next_stop_reason(&mut events, id).await;
    assert!(reason.starts_with("forced off"), "{reason}");
    client
        .start_machine(machine_ref(id))
        .await
        .expect("StartMachine");
    assert_eq!(ssh_hostname(&key, port, BOOT_TIMEOUT), "lifecycle-1");

    let qemu_before = qemu_pid(&state.domain_name);
    let rebooted = client
        .reboot_machine(pb::RebootMachineRequest {
            machine_id: id.to_string(),
            request_id: String::new(),
        })
        .await
        .expect("RebootMachine")
        .into_inner();
    assert_eq!(phase(&rebooted), pb::MachinePhase::Running);
    assert_ne!(
        qemu_pid(&state.domain_name),
        qemu_before,
        "a power cycle, not a no-op"
    );
    assert_eq!(ssh_hostname(&key, port, BOOT_TIMEOUT), "lifecycle-1");

    let deleted = client
        .delete_machine(machine_ref(id))
        .await
        .expect("DeleteMachine")
        .into_inner();
    assert!(deleted.existed);
    assert!(fx.domains().is_empty(), "domain left: {:?}", fx.domains());
    assert!(!dir.exists(), "machine files left in {dir:?}");
    let absent = client
        .get_machine(machine_ref(id))
        .await
        .expect("GetMachine")
        .into_inner();
    assert_eq!(phase(&absent), pb::MachinePhase::Absent);
    assert!(
        !client
            .delete_machine(machine_ref(id))
            .await
            .expect("DeleteMachine again")
            .into_inner()
            .existed
    );
    let listed = client
        .list_machines(pb::ListMachinesRequest {})
        .await
        .expect("ListMachines")
        .into_inner();
    assert!(listed.machines.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_twice_gives_one_domain_and_older_generations_are_refused() {
    let fx = Fixture::new();
    let agent = fx.start_agent(&[]);
    let mut client = fx.client(&agent).await;
    let id = Uuid::new_v4();
    let ensure = |generation, host: &str| pb::EnsureMachineRequest {
        spec: Some(fx.spec(id, generation, host, None, pb::PowerState::Stopped)),
    };
    let first = client
        .ensure_machine(ensure(2, "twice"))
        .await
        .expect("EnsureMachine")
        .into_inner();
    let second = client
        .ensure_machine(ensure(2, "twice"))
        .await
        .expect("EnsureMachine again")
        .into_inner();
    assert_eq!(first, second);
    assert_eq!(phase(&first), pb::MachinePhase::Stopped);
    assert_eq!(fx.domains(), vec![first.domain_name.clone()]);

    let stale = client
        .ensure_machine(ensure(1, "twice"))
        .await
        .expect_err("older generation");
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
    let newer = client
        .ensure_machine(ensure(3, "renamed"))
        .await
        .expect("newer")
        .into_inner();
    assert_eq!((newer.generation, ssh_port(&newer)), (3, ssh_port(&first)));
    let xml = virsh(&["dumpxml", "--inactive", &first.domain_name])
        .unwrap()
        .stdout;
    assert!(String::from_utf8_lossy(&xml).contains("<title>renamed</title>"));
    assert_eq!(fx.domains().len(), 1);
    // libvirt keeps the spec's fingerprint: the same generation with other content is
    // refused, not silently powered.
    let conflict = client
        .ensure_machine(ensure(3, "other"))
        .await
        .expect_err("equal generation, other content");
    assert_eq!(conflict.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        conflict.metadata().get(proto::REASON_METADATA).unwrap(),
        proto::reason::GENERATION_CONFLICT,
        "{conflict:?}"
    );

    let info = client
        .get_host_info(pb::GetHostInfoRequest {})
        .await
        .expect("GetHostInfo")
        .into_inner();
    assert_eq!(
        (info.machine_count, info.domain_prefix.as_str()),
        (1, fx.prefix.as_str())
    );
    let allocated = info.allocated.expect("allocated");
    assert_eq!(
        (allocated.vcpus, allocated.memory_mib, allocated.disk_gib),
        (1, 256, 1)
    );
    assert!(info
        .capacity
        .is_some_and(|c| c.vcpus >= 1 && c.memory_mib > 0));
    let kind = pb::HypervisorKind::try_from(info.hypervisor).expect("kind");
    let hardware_kvm = ["kvm_intel", "kvm_amd"]
        .iter()
        .any(|m| std::path::Path::new("/sys/module").join(m).exists());
    assert_eq!(
        kind,
        if hardware_kvm {
            pb::HypervisorKind::Kvm
        } else {
            pb::HypervisorKind::Qemu
        }
    );

    assert!(
        client
            .delete_machine(machine_ref(id))
            .await
            .expect("DeleteMachine")
            .into_inner()
            .existed
    );
    assert!(fx.domains().is_empty());
}

/// kill -9 of the agent before each creation step, then a restart and a retried EnsureMachine:
/// one domain, no stray files, and deletion leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_create_then_restart_converges_without_leftovers() {
    let fx = Fixture::new();
    for step in ["image", "disk", "seed", "define", "start"] {
        let id = Uuid::new_v4();
        let request = pb::EnsureMachineRequest {
            spec: Some(fx.spec(id, 1, "crashy", None, pb::PowerState::Running)),
        };
        let paused = fx.start_agent(&[("SKYGATE_AGENT_TEST_PAUSE_BEFORE", step)]);
        let mut client = fx.client(&paused).await;
        let call = tokio::spawn({
            let request = request.clone();
            async move { client.ensure_machine(request).await }
        });
        paused.wait_for_log("test pause", Duration::from_secs(60));
        paused.kill9();
        assert!(
            call.await.expect("join").is_err(),
            "{step}: the call dies with the agent"
        );
        let defined = step == "start";
        assert_eq!(
            fx.domains().len(),
            usize::from(defined),
            "{step}: domains after kill -9"
        );

        let agent = fx.start_agent(&[]);
        // The restart removed files no domain owns; a defined domain keeps its files.
        assert_eq!(
            fx.machine_dir(id).exists(),
            defined,
            "{step}: files after restart"
        );
        let mut client = fx.client(&agent).await;
        let state = client
            .ensure_machine(request)
            .await
            .expect("retried EnsureMachine")
            .into_inner();
        assert_eq!(phase(&state), pb::MachinePhase::Running, "{step}");
        assert_eq!(fx.domains(), vec![state.domain_name.clone()], "{step}");
        assert!(
            client
                .delete_machine(machine_ref(id))
                .await
                .expect("DeleteMachine")
                .into_inner()
                .existed
        );
        assert!(
            fx.domains().is_empty() && !fx.machine_dir(id).exists(),
            "{step}: leftovers"
        );
        drop(agent);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_qemu_is_reported_within_10_s_and_can_be_started_again() {
    let fx = Fixture::new();
    let agent = fx.start_agent(&[]);
    let mut client = fx.client(&agent).await;
    let id = Uuid::new_v4();
    let state = client
        .ensure_machine(pb::EnsureMachineRequest {
            spec: Some(fx.spec(id, 1, "doomed", None, pb::PowerState::Running)),
        })
        .await
        .expect("EnsureMachine")
        .into_inner();
    let mut events = client
        .watch_events(pb::WatchEventsRequest { after_sequence: 0 })
        .await
        .expect("WatchEvents")
        .into_inner();
    let pid = qemu_pid(&state.domain_name);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill qemu");
    let killed_at = Instant::now();
    let crashed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = events.next().await {
            let event = event.expect("event");
            if event.machine_id == id.to_string() && event.phase == pb::MachinePhase::Crashed as i32
            {
                return event;
            }
        }
        panic!("event stream ended");
    })
    .await
    .expect("a CRASHED event within 10 s");
    println!(
        "QEMU killed -> CRASHED event: {:?} ({})",
        killed_at.elapsed(),
        crashed.reason
    );
    let now = client
        .get_machine(machine_ref(id))
        .await
        .expect("GetMachine")
        .into_inner();
    assert_eq!(phase(&now), pb::MachinePhase::Crashed);
    assert!(!now.message.is_empty());
    let restarted = client
        .start_machine(machine_ref(id))
        .await
        .expect("StartMachine")
        .into_inner();
    assert_eq!(phase(&restarted), pb::MachinePhase::Running);
    assert!(
        client
            .delete_machine(machine_ref(id))
            .await
            .expect("DeleteMachine")
            .into_inner()
            .existed
    );
}

/// libvirtd restarts under a running agent; the agent reconnects and carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_survives_a_libvirtd_restart() {
    let fx = Fixture::new();
    let agent = fx.start_agent(&[]);
    let mut client = fx.client(&agent).await;
    let id = Uuid::new_v4();
    client
        .ensure_machine(pb::EnsureMachineRequest {
            spec: Some(fx.spec(id, 1, "steady", None, pb::PowerState::Stopped)),
        })
        .await
        .expect("EnsureMachine");

    skygate_test_support::libvirt::stop_libvirtd(skygate_test_support::libvirt::Signal::SIGTERM);
    // While it is down the agent says so instead of hanging.
    let down = client
        .list_machines(pb::ListMachinesRequest {})
        .await
        .expect_err("libvirtd is down");
    assert_eq!(down.code(), tonic::Code::Unavailable, "{down:?}");
    harness::ensure_libvirtd();

    let listed = client
        .list_machines(pb::ListMachinesRequest {})
        .await
        .expect("ListMachines after restart")
        .into_inner();
    assert_eq!(listed.machines.len(), 1);
    let started = client
        .start_machine(machine_ref(id))
        .await
        .expect("StartMachine after restart")
        .into_inner();
    assert_eq!(phase(&started), pb::MachinePhase::Running);
    assert!(
        client
            .delete_machine(machine_ref(id))
            .await
            .expect("DeleteMachine")
            .into_inner()
            .existed
    );
    assert!(fx.domains().is_empty());
}
