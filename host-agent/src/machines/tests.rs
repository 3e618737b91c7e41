//! Manager tests over the fake hypervisor (faults injected at each step) with the real
//! qemu-img, genisoimage and image cache on a temporary data directory.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::*;
use crate::disks::QemuImg;
use crate::hypervisor::{FakeHypervisor, HypervisorOp};
use crate::images::SourcePolicy;

const PREFIX: &str = "skygate-unit-";

struct Harness {
    _tmp: tempfile::TempDir,
    data: DataDir,
    fake: Arc<FakeHypervisor>,
    events: Arc<EventLog>,
    manager: MachineManager,
    kernel: SourceFile,
}

fn file_source(dir: &Path, name: &str, bytes: &[u8]) -> SourceFile {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    SourceFile {
        url: format!("file://{}", path.display()),
        sha256: hex::encode(Sha256::digest(bytes)),
    }
}

fn harness_with(graceful: Duration) -> Harness {
    let tmp = tempfile::tempdir().unwrap();
    let data = DataDir::new(tmp.path().join("data")).unwrap();
    data.prepare().unwrap();
    let kernel = file_source(tmp.path(), "vmlinuz", b"not really a kernel");
    let fake = Arc::new(FakeHypervisor::new());
    let events = Arc::new(EventLog::new(64));
    let manager = MachineManager::new(
        fake.clone(),
        Arc::new(QemuImg::new()),
        ImageCache::new(
            data.clone(),
            SourcePolicy::with_file_dirs(&[tmp.path().to_path_buf()]).unwrap(),
        )
        .unwrap(),
        data.clone(),
        ManagerConfig {
            domain_prefix: PREFIX.into(),
            hypervisor_kind: HypervisorKind::Qemu,
            network: NetworkMode::User {
                address: std::net::Ipv4Addr::LOCALHOST,
                ports: "21000-21999".parse().unwrap(),
            },
            graceful_timeout: graceful,
            pause_before: None,
        },
        events.clone(),
    );
    Harness {
        _tmp: tmp,
        data,
        fake,
        events,
        manager,
        kernel,
    }
}

fn harness() -> Harness {
    harness_with(Duration::from_secs(5))
}

impl Harness {
    fn spec(&self, id: Uuid, generation: u64, desired: DesiredPower) -> MachineSpec {
        MachineSpec {
            id,
            generation,
            hostname: "unit-1".into(),
            vcpus: 2,
            memory_mib: 256,
            disk_gib: 1,
            image: ImagePlan::Kernel {
                kernel: self.kernel.clone(),
                initrd: None,
                cmdline: "console=ttyS0".into(),
            },
            ssh_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ7 unit@test".into()],
            user_data: None,
            desired,
            disk_generation: 0,
            disk_must_exist: false,
        }
    }

    fn files_exist(&self, id: Uuid) -> bool {
        self.data.machine_dir(id).exists()
    }

    fn phases(&self, id: Uuid) -> Vec<MachinePhase> {
        self.events
            .subscribe(0)
            .unwrap()
            .0
            .into_iter()
            .filter(|e| e.machine_id == id)
            .map(|e| e.phase)
            .collect()
    }
}

#[tokio::test]
async fn ensure_builds_files_and_one_domain_and_repeating_it_changes_nothing() {
    let h = harness();
    let id = Uuid::new_v4();
    let state = h
        .manager
        .ensure(h.spec(id, 1, DesiredPower::Running))
        .await
        .unwrap();
    assert_eq!(state.phase, MachinePhase::Running);
    assert_eq!(state.generation, 1);
    assert_eq!(state.domain_name, format!("{PREFIX}{id}"));
    assert_eq!(state.forwards.len(), 1);
    assert_eq!(state.forwards[0].guest_port, 22);
    assert!((21000..=21999).contains(&state.forwards[0].host_port));
    assert_eq!(state.addresses, vec!["127.0.0.1".to_string()]);
    assert_eq!((state.vcpus, state.memory_mib, state.disk_gib), (2, 256, 1));
    for f in [h.data.overlay(id), h.data.seed(id)] {
        assert!(f.is_file(), "{f:?} missing");
    }
    let again = h
        .manager
        .ensure(h.spec(id, 1, DesiredPower::Running))
        .await
        .unwrap();
    assert_eq!(again, state);
    assert_eq!(h.fake.calls(HypervisorOp::Define), 1);
    assert_eq!(h.fake.calls(HypervisorOp::Start), 1);
    assert_eq!(h.fake.domain_names(), vec![format!("{PREFIX}{id}")]);
    assert_eq!(h.phases(id), [MachinePhase::Stopped, MachinePhase::Running]);
}

#[tokio::test]
async fn older_generations_are_refused_and_newer_ones_redefine_keeping_the_port() {
    let h = harness();
    let id = Uuid::new_v4();
    let first = h
        .manager
        .ensure(h.spec(id, 2, DesiredPower::Stopped))
        .await
        .unwrap();
    let err = h
        .manager
        .ensure(h.spec(id, 1, DesiredPower::Stopped))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        ManagerError::StaleGeneration {
            requested: 1,
            applied: 2
        }
    ));
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::FailedPrecondition
    );
    let mut newer = h.spec(id, 3, DesiredPower::Stopped);
    newer.hostname = "renamed".into();
    let third = h.manager.ensure(newer).await.unwrap();
    assert_eq!(third.generation, 3);
    assert_eq!(third.forwards, first.forwards);
    assert_eq!(h.fake.calls(HypervisorOp::Define), 2);
}

#[tokio::test]
async fn concurrent_ensures_of_one_machine_define_it_once() {
    let h = Arc::new(harness());
    let id = Uuid::new_v4();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let h = Arc::clone(&h);
            tokio::spawn(async move {
                h.manager
                    .ensure(h.spec(id, 1, DesiredPower::Running))
                    .await
                    .map(|s| s.phase)
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), MachinePhase::Running);
    }
    assert_eq!(h.fake.calls(HypervisorOp::Define), 1);
    assert_eq!(h.fake.calls(HypervisorOp::Start), 1);
}

#[tokio::test]
async fn machines_get_distinct_ports() {
    let h = harness();
    let a = h
        .manager
        .ensure(h.spec(Uuid::new_v4(), 1, DesiredPower::Stopped))
        .await
        .unwrap();
    let b = h
        .manager
        .ensure(h.spec(Uuid::new_v4(), 1, DesiredPower::Stopped))
        .await
        .unwrap();
    assert_ne!(a.forwards[0].host_port, b.forwards[0].host_port);
}

#[tokio::test]
async fn a_failed_first_define_leaves_no_files_and_a_retry_builds_the_machine() {
    let h = harness();
    let id = Uuid::new_v4();
    h.fake.fail_next(HypervisorOp::Define, 1);
    let err = h
        .manager
        .ensure(h.spec(id, 1, DesiredPower::Running))
        .await
        .unwrap_err();
    // The error names the step, with the hypervisor's error as its cause.
    match &err {
        ManagerError::Define(DefineError::Hypervisor(_)) => {
            assert_eq!(err.step(), Some(CreateStep::Define));
        }
        other => panic!("not a define error: {other}"),
    }
    assert_eq!(
        tonic::Status::from(err)
            .metadata()
            .get(proto::STEP_METADATA)
            .unwrap(),
        "define"
    );
    assert!(!h.files_exist(id));
    assert!(h.fake.domain_names().is_empty());
    let state = h
        .manager
        .ensure(h.spec(id, 1, DesiredPower::Running))
        .await
        .unwrap();
    assert_eq!(state.phase, MachinePhase::Running);
    assert!(!h.data.machine_dir(id).join(INCOMPLETE_MARKER).exists());
}

#[tokio::test]
async fn the_sweep_removes_interrupted_work_and_keeps_files_it_cannot_account_for() {
    let h = harness();
    let (interrupted, foreign, owned) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    h.manager
        .ensure(h.spec(owned, 1, DesiredPower::Stopped))
        .await
        .unwrap();
    // What a kill -9 between the seed and the define leaves.
    let dir = h.data.prepare_machine(interrupted).unwrap();
    std::fs::write(dir.join("disk.qcow2"), b"half").unwrap();
    std::fs::write(dir.join(INCOMPLETE_MARKER), b"create").unwrap();
    // A machine of another domain prefix (an operator's slip): its disk must survive.
    let dir = h.data.prepare_machine(foreign).unwrap();
    std::fs::write(dir.join("disk.qcow2"), b"tenant data").unwrap();
    assert_eq!(h.manager.sweep().await.unwrap(), vec![interrupted]);
    assert!(!h.files_exist(interrupted));
    assert!(h.data.overlay(foreign).is_file());
    assert!(h.data.overlay(owned).is_file());
}

#[tokio::test]
async fn operations_queued_behind_a_delete_still_run_one_at_a_time() {
    let h = Arc::new(harness());
    let id = Uuid::new_v4();
    h.manager
        .ensure(h.spec(id, 1, DesiredPower::Stopped))
        .await
        .unwrap();
    h.fake
        .delay(HypervisorOp::Undefine, Duration::from_millis(300));
    h.fake
        .delay(HypervisorOp::Define, Duration::from_millis(300));
    let delete = tokio::spawn({
        let h = Arc::clone(&h);
        async move { h.manager.delete(id).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let ensures: Vec<_> = (0..2)
        .map(|_| {
            let h = Arc::clone(&h);
            tokio::spawn(
                async move { h.manager.ensure(h.spec(id, 2, DesiredPower::Stopped)).await },
            )
        })
        .collect();
    assert!(delete.await.unwrap().unwrap());
    for e in ensures {
        assert_eq!(e.await.unwrap().unwrap().generation, 2);
    }
    // Never two hypervisor calls at once for this one machine.
    assert_eq!(h.fake.max_in_flight(), 1);
    assert_eq!(h.fake.calls(HypervisorOp::Define), 2);
}

#[tokio::test]
async fn a_failed_start_is_finished_by_the_retry_without_redefining() {
    let h = harness();
    let id = Uuid::new_v4();
    h.fake.fail_next(HypervisorOp::Start, 1);
    assert!(h
        .manager
        .ensure(h.spec(id, 1, DesiredPower::Running))
        .await
        .is_err());
    assert_eq!(
        h.manager.state_of(id).await.unwrap().phase,
        MachinePhase::Stopped
    );
    let state = h
        .manager
        .ensure(h.spec(id, 1, DesiredPower::Running))
        .await
        .unwrap();
    assert_eq!(state.phase, MachinePhase::Running);
    assert_eq!(h.fake.calls(HypervisorOp::Define), 1);
}

#[tokio::test]
async fn stop_is_graceful_when_the_guest_obeys_and_forced_when_it_does_not() {
    let h = harness_with(Duration::from_millis(600));
    let (obeys, ignores) = (Uuid::new_v4(), Uuid::new_v4());
    for id in [obeys, ignores] {
        h.manager
            .ensure(h.spec(id, 1, DesiredPower::Running))
            .await
            .unwrap();
    }
    assert_eq!(
        h.manager.stop(obeys, None).await.unwrap().phase,
        MachinePhase::Stopped
    );
    assert_eq!(h.fake.calls(HypervisorOp::Destroy), 0);
    h.fake.ignore_acpi();
    let started = Instant::now();
    assert_eq!(
        h.manager.stop(ignores, None).await.unwrap().phase,
        MachinePhase::Stopped
    );
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert_eq!(h.fake.calls(HypervisorOp::Destroy), 1);
    let reasons: Vec<String> = h
        .events
        .subscribe(0)
        .unwrap()
        .0
        .into_iter()
        .map(|e| e.reason)
        .collect();
    assert!(
        reasons.iter().any(|r| r == "shut down by the guest"),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.starts_with("forced off")),
        "{reasons:?}"
    );
    // Stopping a stopped machine is a no-op; starting brings it back with its files.
    assert_eq!(
        h.manager.stop(ignores, None).await.unwrap().phase,
        MachinePhase::Stopped
    );
    assert_eq!(
        h.manager.start(ignores).await.unwrap().phase,
        MachinePhase::Running
    );
    assert!(h.data.overlay(ignores).is_file() && h.data.seed(ignores).is_file());
}

/// Issue 10, point 12: a reboot whose answer was lost (the control plane died before
/// recording it) was carried out again when the task was retried.
#[tokio::test]
async fn a_retried_reboot_with_the_same_request_id_reboots_once() {
    let h = harness();
    let id = Uuid::new_v4();
    h.manager
        .ensure(h.spec(id, 1, DesiredPower::Running))
        .await
        .unwrap();
    let starts = h.fake.calls(HypervisorOp::Start);
    for _ in 0..3 {
        let state = h.manager.reboot(id, Some("task-1")).await.unwrap();
        assert_eq!(state.phase, MachinePhase::Running);
    }
    assert_eq!(
        h.fake.calls(HypervisorOp::Start),
        starts + 1,
        "one power cycle"
    );
    // Another request is another reboot.
    h.manager.reboot(id, Some("task-2")).await.unwrap();
    assert_eq!(h.fake.calls(HypervisorOp::Start), starts + 2);
}

#[tokio::test]
async fn reboot_power_cycles_a_running_machine_and_refuses_a_stopped_one() {
    let h = harness();
    let id = Uuid::new_v4();
    h.manager
        .ensure(h.spec(id, 1, DesiredPower::Stopped))
        .await
        .unwrap();
    assert!(matches!(
        h.manager.reboot(id, None).await,
        Err(ManagerError::NotRunning(_))
    ));
    h.manager.start(id).await.unwrap();
    assert_eq!(
        h.manager.reboot(id, None).await.unwrap().phase,
        MachinePhase::Running
    );
    assert_eq!(
        h.phases(id),
        [
            MachinePhase::Stopped,
            MachinePhase::Running,
            MachinePhase::Stopped,
            MachinePhase::Running
        ]
    );
}

#[tokio::test]
async fn delete_removes_domain_and_files_and_is_idempotent_even_after_a_fault() {
    let h = harness();
    let id = Uuid::new_v4();
    h.manager
        .ensure(h.spec(id, 1, DesiredPower::Running))
        .await
        .unwrap();
    h.fake.fail_next(HypervisorOp::Undefine, 1);
    assert!(h.manager.delete(id).await.is_err());
    assert!(h.manager.delete(id).await.unwrap());
    assert!(h.fake.domain_names().is_empty());
    assert!(!h.files_exist(id));
    assert!(!h.manager.delete(id).await.unwrap());
    assert_eq!(
        h.manager.state_of(id).await.unwrap().phase,
        MachinePhase::Absent
    );
    assert_eq!(h.phases(id).last(), Some(&MachinePhase::Absent));
    assert!(matches!(
        h.manager.start(id).await,
        Err(ManagerError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_crash_is_reported_by_the_poller_and_a_start_recovers() {
    let h = harness();
    let id = Uuid::new_v4();
    h.manager
        .ensure(h.spec(id, 1, DesiredPower::Running))
        .await
        .unwrap();
    h.manager.poll_once().await.unwrap();
    h.fake.crash(&h.manager.domain_name(id));
    h.manager.poll_once().await.unwrap();
    let last = h.events.subscribe(0).unwrap().0.pop().unwrap();
    assert_eq!((last.machine_id, last.phase), (id, MachinePhase::Crashed));
    assert!(last.reason.contains("QEMU exited"), "{}", last.reason);
    assert!(h
        .manager
        .state_of(id)
        .await
        .unwrap()
        .message
        .contains("QEMU"));
    assert_eq!(
        h.manager.start(id).await.unwrap().phase,
        MachinePhase::Running
    );
}

#[tokio::test]
async fn only_domains_named_prefix_plus_uuid_are_ours() {
    let h = harness();
    let id = Uuid::new_v4();
    h.manager
        .ensure(h.spec(id, 1, DesiredPower::Stopped))
        .await
        .unwrap();
    // Another agent with a longer prefix on the same host.
    let other = h
        .manager
        .domain_name(id)
        .replacen(PREFIX, &format!("{PREFIX}b-"), 1);
    let xml = h.fake.get(&h.manager.domain_name(id)).unwrap().unwrap().xml;
    h.fake
        .define(&xml.replace(&h.manager.domain_name(id), &other))
        .unwrap();
    let listed: Vec<Uuid> = h
        .manager
        .list()
        .await
        .unwrap()
        .iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(listed, vec![id]);
}

#[tokio::test]
async fn console_returns_the_tail_and_says_when_it_cut() {
    let h = harness();
    let id = Uuid::new_v4();
    h.manager
        .ensure(h.spec(id, 1, DesiredPower::Stopped))
        .await
        .unwrap();
    assert_eq!(h.manager.console(id, None).await.unwrap(), (vec![], false));
    std::fs::write(h.data.console_log(id), b"booting\nskygate-tiny: ready\n").unwrap();
    let (tail, truncated) = h.manager.console(id, Some(6)).await.unwrap();
    assert_eq!((tail.as_slice(), truncated), (&b"ready\n"[..], true));
    let (all, truncated) = h.manager.console(id, None).await.unwrap();
    assert!(all.starts_with(b"booting") && !truncated);
    assert!(matches!(
        h.manager.console(Uuid::new_v4(), None).await,
        Err(ManagerError::NotFound(_))
    ));
}

/// Issue 11: an equal generation with other content was taken for the applied spec and only
/// powered; two writers of one generation went unnoticed.
#[tokio::test]
async fn an_equal_generation_with_other_content_is_refused_and_power_alone_is_not_content() {
    let h = harness();
    let id = Uuid::new_v4();
    h.manager
        .ensure(h.spec(id, 2, DesiredPower::Stopped))
        .await
        .unwrap();
    // The same spec asking for other power: power only.
    let running = h
        .manager
        .ensure(h.spec(id, 2, DesiredPower::Running))
        .await
        .unwrap();
    assert_eq!(running.phase, MachinePhase::Running);
    let mut renamed = h.spec(id, 2, DesiredPower::Running);
    renamed.hostname = "renamed".into();
    let err = h.manager.ensure(renamed).await.unwrap_err();
    assert!(
        matches!(err, ManagerError::GenerationConflict { generation: 2 }),
        "{err}"
    );
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        status.metadata().get(proto::REASON_METADATA).unwrap(),
        proto::reason::GENERATION_CONFLICT
    );
    assert_eq!(h.fake.calls(HypervisorOp::Define), 1);
    assert_eq!(h.fake.calls(HypervisorOp::Start), 1);
}

/// A domain defined before fingerprints were recorded has none: its generation is taken as
/// the same spec, whatever the content (the upgrade path).
#[tokio::test]
async fn a_domain_without_a_fingerprint_is_taken_as_equal_at_its_generation() {
    let h = harness();
    let id = Uuid::new_v4();
    h.manager
        .ensure(h.spec(id, 2, DesiredPower::Stopped))
        .await
        .unwrap();
    let name = h.manager.domain_name(id);
    let xml = h.fake.get(&name).unwrap().unwrap().xml;
    let start = xml.find("<skygate:spec-sha256>").expect("a fingerprint");
    let end = xml.find("</skygate:spec-sha256>").unwrap() + "</skygate:spec-sha256>".len();
    let old = format!("{}{}", &xml[..start], &xml[end..]);
    h.fake.define(&old).unwrap();
    assert_eq!(
        MachineMetadata::from_xml(&h.fake.get(&name).unwrap().unwrap().xml)
            .unwrap()
            .fingerprint,
        None
    );
    let mut renamed = h.spec(id, 2, DesiredPower::Running);
    renamed.hostname = "renamed".into();
    let state = h.manager.ensure(renamed).await.unwrap();
    assert_eq!(state.phase, MachinePhase::Running);
    // Powered, not redefined (the fake counts the test's own define too).
    assert_eq!(h.fake.calls(HypervisorOp::Define), 2);
    // A newer generation records the fingerprint again.
    h.manager
        .ensure(h.spec(id, 3, DesiredPower::Running))
        .await
        .unwrap();
    let meta = MachineMetadata::from_xml(&h.fake.get(&name).unwrap().unwrap().xml).unwrap();
    assert_eq!(
        meta.fingerprint,
        Some(h.spec(id, 3, DesiredPower::Running).fingerprint())
    );
}

/// The cache files (not sidecars) in the data dir's image cache, by name.
fn cached_images(h: &Harness) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(h.data.images_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".size") && !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

/// Issue 14: cached images go when no machine uses them and nobody asked for them within
/// the grace period; a kernel named by a domain, and a base backing an overlay, stay.
#[tokio::test]
async fn unused_cached_images_are_removed_after_the_grace_and_used_ones_stay() {
    let h = harness();
    let dir = h.data.root().parent().unwrap().to_path_buf();
    // A real qcow2 base, as an image publisher would ship it.
    let base_path = dir.join("base.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base_path)
        .arg("1M")
        .status()
        .expect("qemu-img");
    assert!(made.success());
    let bytes = std::fs::read(&base_path).unwrap();
    let base = SourceFile {
        url: format!("file://{}", base_path.display()),
        sha256: hex::encode(Sha256::digest(&bytes)),
    };
    let (kernel_vm, disk_vm) = (Uuid::new_v4(), Uuid::new_v4());
    h.manager
        .ensure(h.spec(kernel_vm, 1, DesiredPower::Running))
        .await
        .unwrap();
    let mut disk_spec = h.spec(disk_vm, 1, DesiredPower::Stopped);
    disk_spec.image = ImagePlan::Disk {
        base,
        format: DiskFormat::Qcow2,
    };
    h.manager.ensure(disk_spec).await.unwrap();
    let both = cached_images(&h);
    assert_eq!(both.len(), 2, "{both:?}");

    // Both in use: nothing goes, even with no grace at all.
    let removed = h
        .manager
        .collect_unused_images(Duration::ZERO)
        .await
        .unwrap();
    assert!(removed.is_empty(), "{removed:?}");
    assert_eq!(cached_images(&h), both);

    // The kernel's machine goes: its kernel is unused, but was used within the hour.
    h.manager.delete(kernel_vm).await.unwrap();
    let removed = h
        .manager
        .collect_unused_images(Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(removed.is_empty(), "{removed:?}");
    // Past the grace it goes, with its sidecar; the base still backs an overlay.
    let removed = h
        .manager
        .collect_unused_images(Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert!(removed[0].to_string_lossy().ends_with(".vmlinuz"));
    let left = cached_images(&h);
    assert_eq!(left.len(), 1);
    assert!(left[0].ends_with(".qcow2"), "{left:?}");
    let sidecars = std::fs::read_dir(h.data.images_dir()).unwrap().count();
    assert_eq!(sidecars, 2, "the base and its sidecar only");

    // A new machine of the removed kernel fetches it again.
    let again = Uuid::new_v4();
    h.manager
        .ensure(h.spec(again, 1, DesiredPower::Running))
        .await
        .unwrap();
    assert_eq!(cached_images(&h).len(), 2);
}

fn disk_bytes(h: &Harness, id: Uuid) -> u64 {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(h.data.overlay(id))
        .output()
        .unwrap();
    crate::disks::ImageInfo::from_json(&out.stdout)
        .unwrap()
        .virtual_size_bytes
}

#[tokio::test]
async fn a_newer_generation_resizes_a_stopped_machine_and_its_disk_only_grows() {
    let h = harness();
    let id = Uuid::new_v4();
    h.manager
        .ensure(h.spec(id, 1, DesiredPower::Stopped))
        .await
        .unwrap();
    let mut bigger = h.spec(id, 2, DesiredPower::Stopped);
    (bigger.vcpus, bigger.memory_mib, bigger.disk_gib) = (3, 512, 4);
    let state = h.manager.ensure(bigger.clone()).await.unwrap();
    assert_eq!((state.vcpus, state.memory_mib, state.disk_gib), (3, 512, 4));
    assert_eq!(
        state.phase,
        MachinePhase::Stopped,
        "a resize does not start it"
    );
    assert_eq!(disk_bytes(&h, id), 4 << 30);
    // Sent again (a retried task): nothing changes.
    assert_eq!(h.manager.ensure(bigger).await.unwrap(), state);

    let mut smaller = h.spec(id, 3, DesiredPower::Stopped);
    smaller.disk_gib = 2;
    let err = h.manager.ensure(smaller).await.unwrap_err();
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::InvalidArgument
    );
    assert_eq!(disk_bytes(&h, id), 4 << 30);

    // Running: new vCPUs are defined for its next boot, but its disk is held by QEMU.
    h.manager.start(id).await.unwrap();
    let mut running = h.spec(id, 4, DesiredPower::Running);
    (running.vcpus, running.disk_gib) = (1, 4);
    assert_eq!(h.manager.ensure(running).await.unwrap().vcpus, 1);
    let mut grow_running = h.spec(id, 5, DesiredPower::Running);
    grow_running.disk_gib = 8;
    let err = h.manager.ensure(grow_running).await.unwrap_err();
    assert!(
        matches!(err, ManagerError::DiskInUse(m) if m == id),
        "{err:?}"
    );
    assert_eq!(disk_bytes(&h, id), 4 << 30);
}

/// Writes a pattern of 1 MiB at offset 0 of the machine's disk, as a guest would.
fn write_to_disk(h: &Harness, id: Uuid) {
    let ok = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0xab 0 1M"])
        .arg(h.data.overlay(id))
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok, "qemu-io write");
}

/// Whether the machine's disk holds what [`write_to_disk`] wrote.
fn disk_has_the_write(h: &Harness, id: Uuid) -> bool {
    std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-r", "-U", "-c", "read -P 0xab 0 1M"])
        .arg(h.data.overlay(id))
        .output()
        .map(|o| {
            o.status.success()
                && !String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed")
        })
        .unwrap()
}

#[tokio::test]
async fn a_newer_disk_generation_replaces_the_disk_once_stopping_a_running_machine_first() {
    let h = harness();
    let id = Uuid::new_v4();
    h.manager
        .ensure(h.spec(id, 1, DesiredPower::Stopped))
        .await
        .unwrap();
    write_to_disk(&h, id);
    assert!(disk_has_the_write(&h, id));
    h.manager.start(id).await.unwrap();
    std::fs::write(h.data.console_log(id), "old host keys\n").unwrap();
    let mut rebuild = h.spec(id, 2, DesiredPower::Running);
    rebuild.disk_generation = 1;
    let state = h.manager.ensure(rebuild.clone()).await.unwrap();
    assert_eq!(state.phase, MachinePhase::Running);
    assert!(!disk_has_the_write(&h, id), "the disk was made again");
    assert!(
        !h.data.console_log(id).exists(),
        "the console starts with the new disk"
    );
    assert_eq!(
        h.phases(id),
        [
            MachinePhase::Stopped,
            MachinePhase::Running,
            MachinePhase::Stopped,
            MachinePhase::Running
        ],
        "stopped before its disk was replaced, then started as desired"
    );
    // A retried rebuild (same generations) keeps the new disk, and so does a later change of
    // another kind.
    h.manager.stop(id, None).await.unwrap();
    write_to_disk(&h, id);
    h.manager.ensure(rebuild).await.unwrap();
    h.manager.stop(id, None).await.unwrap();
    let mut later = h.spec(id, 3, DesiredPower::Stopped);
    later.disk_generation = 1;
    h.manager.ensure(later).await.unwrap();
    assert!(disk_has_the_write(&h, id));
}

#[tokio::test]
async fn a_rebuild_that_fails_after_its_record_keeps_the_new_disk_on_the_retry() {
    let h = harness();
    let id = Uuid::new_v4();
    h.manager
        .ensure(h.spec(id, 1, DesiredPower::Stopped))
        .await
        .unwrap();
    let mut rebuild = h.spec(id, 2, DesiredPower::Stopped);
    rebuild.disk_generation = 1;
    // The first attempt's definition fails after the disk was made and recorded.
    h.fake.fail_next(HypervisorOp::Define, 1);
    h.manager.ensure(rebuild.clone()).await.unwrap_err();
    assert_eq!(
        std::fs::read_to_string(h.data.machine_dir(id).join(DISK_GENERATION)).unwrap(),
        "1"
    );
    write_to_disk(&h, id);
    let state = h.manager.ensure(rebuild).await.unwrap();
    assert_eq!(state.generation, 2);
    assert!(
        disk_has_the_write(&h, id),
        "recorded: the retry keeps the disk it made"
    );
}

/// A 64 MiB qcow2 base image in `h`'s source directory, as the image cache would fetch it.
fn qcow2_base(h: &Harness) -> SourceFile {
    let dir = h.data.root().parent().unwrap().to_path_buf();
    let path = dir.join("base.qcow2");
    if !path.exists() {
        let ok = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&path)
            .arg("64M")
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
    let bytes = std::fs::read(&path).unwrap();
    SourceFile {
        url: format!("file://{}", path.display()),
        sha256: hex::encode(Sha256::digest(&bytes)),
    }
}

fn disk_spec(h: &Harness, id: Uuid, base: SourceFile, desired: DesiredPower) -> MachineSpec {
    MachineSpec {
        image: ImagePlan::Disk {
            base,
            format: DiskFormat::Qcow2,
        },
        ..h.spec(id, 1, desired)
    }
}

#[tokio::test]
async fn a_stopped_machines_disk_moves_to_another_host_with_its_data_and_digest_checked() {
    let (a, b) = (harness(), harness());
    let id = Uuid::new_v4();
    let base_a = qcow2_base(&a);
    // The same image at another URL on the target (its cache is keyed by the digest).
    std::fs::copy(
        base_a.url.trim_start_matches("file://"),
        b.data.root().parent().unwrap().join("base.qcow2"),
    )
    .unwrap();
    let base_b = qcow2_base(&b);
    assert_eq!(base_a.sha256, base_b.sha256);
    a.manager
        .ensure(disk_spec(&a, id, base_a, DesiredPower::Running))
        .await
        .unwrap();
    let err = a.manager.export_disk(id).await.unwrap_err();
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::FailedPrecondition
    );
    a.manager.stop(id, None).await.unwrap();
    write_to_disk(&a, id);

    let mut parts = a.manager.export_disk(id).await.unwrap();
    let mut import = b
        .manager
        .import_begin(
            id,
            &disk_spec(&b, id, base_b.clone(), DesiredPower::Running).image,
        )
        .await
        .unwrap();
    let bytes = loop {
        match parts.recv().await.unwrap().unwrap() {
            ExportPart::Data(data) => import.write(&data).await.unwrap(),
            ExportPart::Done { sha256 } => {
                break b.manager.import_finish(import, &sha256).await.unwrap();
            }
        }
    };
    assert_eq!(bytes, std::fs::metadata(a.data.overlay(id)).unwrap().len());
    let info = QemuImg::new().info(&b.data.overlay(id)).await.unwrap();
    let backing = info.backing_file.unwrap();
    assert!(
        backing.starts_with(b.data.root().to_str().unwrap()),
        "pointed at the target's own base: {backing}"
    );
    assert!(disk_has_the_write(&b, id), "the data moved");
    // Defined over the imported disk, not a new one.
    let state = b
        .manager
        .ensure(disk_spec(&b, id, base_b.clone(), DesiredPower::Running))
        .await
        .unwrap();
    assert_eq!(state.phase, MachinePhase::Running);
    assert!(disk_has_the_write(&b, id));
    // Defined here now: another import would overwrite a disk in use.
    let err = b
        .manager
        .import_begin(
            id,
            &disk_spec(&b, id, base_b.clone(), DesiredPower::Running).image,
        )
        .await
        .unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::AlreadyExists);

    // A disk whose bytes do not match the sender's digest is not kept.
    let other = Uuid::new_v4();
    let mut import = b
        .manager
        .import_begin(
            other,
            &disk_spec(&b, other, base_b, DesiredPower::Running).image,
        )
        .await
        .unwrap();
    import.write(b"not what was sent").await.unwrap();
    let err = b
        .manager
        .import_finish(import, &"0".repeat(64))
        .await
        .unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::DataLoss);
    assert!(!b.data.overlay(other).exists());
}

#[tokio::test]
async fn a_rebuild_whose_image_does_not_fit_the_disk_leaves_the_old_disk() {
    let h = harness();
    let id = Uuid::new_v4();
    h.manager
        .ensure(h.spec(id, 1, DesiredPower::Stopped))
        .await
        .unwrap();
    write_to_disk(&h, id);
    // A 2 GiB base for a 1 GiB disk.
    let dir = h.data.root().parent().unwrap().to_path_buf();
    let big = dir.join("big.qcow2");
    assert!(std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&big)
        .arg("2G")
        .status()
        .unwrap()
        .success());
    let base = SourceFile {
        url: format!("file://{}", big.display()),
        sha256: hex::encode(Sha256::digest(std::fs::read(&big).unwrap())),
    };
    let mut rebuild = MachineSpec {
        generation: 2,
        ..disk_spec(&h, id, base, DesiredPower::Stopped)
    };
    rebuild.disk_generation = 1;
    let err = h.manager.ensure(rebuild).await.unwrap_err();
    assert_eq!(err.step(), Some(CreateStep::Disk), "{err:?}");
    assert!(disk_has_the_write(&h, id), "the old disk is untouched");
    assert!(!h.data.machine_dir(id).join(DISK_GENERATION).exists());
    assert!(!h.data.machine_dir(id).join(REBUILT_DISK).exists());
}

#[tokio::test]
async fn a_released_machine_keeps_its_disk_and_is_defined_again_over_it_never_a_new_one() {
    let h = harness();
    let id = Uuid::new_v4();
    // A disk that must be here already and is not: refused, nothing made.
    let must = MachineSpec {
        disk_must_exist: true,
        ..h.spec(id, 1, DesiredPower::Running)
    };
    let err = h.manager.ensure(must.clone()).await.unwrap_err();
    assert!(
        matches!(err, ManagerError::DiskMissing(m) if m == id),
        "{err:?}"
    );
    assert!(!h.files_exist(id));

    h.manager
        .ensure(h.spec(id, 1, DesiredPower::Running))
        .await
        .unwrap();
    h.manager.stop(id, None).await.unwrap();
    write_to_disk(&h, id);
    // A marker an earlier crash left behind (between a definition and its marker's removal).
    std::fs::write(h.data.machine_dir(id).join(INCOMPLETE_MARKER), "create").unwrap();
    assert!(h.manager.release(id).await.unwrap());
    assert!(h.fake.domain_names().is_empty(), "released: no domain");
    assert!(
        !h.manager.release(id).await.unwrap(),
        "releasing again: nothing to do"
    );
    // Its disk can still be exported (a move resumed after the release).
    let mut parts = h.manager.export_disk(id).await.unwrap();
    while let Some(part) = parts.recv().await {
        if let ExportPart::Done { .. } = part.unwrap() {
            break;
        }
    }
    drop(parts);
    // A restart of the agent keeps it: no marker, so the sweep leaves the directory alone.
    assert!(h.manager.sweep().await.unwrap().is_empty());
    // Defined again over the same disk (a move undone), powered as asked.
    let state = h.manager.ensure(must).await.unwrap();
    assert_eq!(state.phase, MachinePhase::Running);
    assert!(disk_has_the_write(&h, id), "the same disk, not a new one");
}
