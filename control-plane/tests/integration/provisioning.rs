//! Workflows under injected faults: an in-process agent (the real gRPC service, manager,
//! qemu-img and seed writer) over the fake hypervisor registers with the control plane, and
//! each hypervisor step fails once in turn. Every machine still reaches what its tenant asked
//! for, running a step twice changes nothing, and nothing is left after a delete.

use crate::both_stores;
use crate::common::provisioning::{
    is, provisioning_config, register_fake_kernel_image, wait_for, wait_for_at_most,
};
use crate::common::{Backend, TestApp};
use control_plane::model::MachineId;
use control_plane::server::ProvisioningConfig;
use control_plane::store::tasks::TaskKind;
use host_agent::disks::QemuImg;
use host_agent::domain_xml::HypervisorKind;
use host_agent::events::EventLog;
use host_agent::hypervisor::{FakeHypervisor, HypervisorOp};
use host_agent::identity::Credentials;
use host_agent::images::{ImageCache, SourcePolicy};
use host_agent::machines::{MachineManager, ManagerConfig, NetworkMode};
use host_agent::paths::DataDir;
use host_agent::registration::{self, Registration, SelfCheck};
use host_agent::service::{HostAgentService, HostIdentity};
use proto::agent::v1 as pb;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &str = "workflow-test-agent-token";

/// A self-check that reports what the test sets (the real one runs the host's tools).
#[derive(Debug, Default)]
struct FakeSelfCheck(std::sync::Mutex<Vec<String>>);

impl FakeSelfCheck {
    fn set(&self, problems: &[&str]) {
        *self.0.lock().unwrap() = problems.iter().map(|p| (*p).to_owned()).collect();
    }
}

#[async_trait::async_trait]
impl SelfCheck for FakeSelfCheck {
    async fn problems(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// An in-process agent over the fake hypervisor, registered with the control plane.
struct FakeHost {
    tmp: tempfile::TempDir,
    fake: Arc<FakeHypervisor>,
    /// What its agent reports wrong with the host on each heartbeat.
    problems: Arc<FakeSelfCheck>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl FakeHost {
    async fn start(grpc: std::net::SocketAddr, name: &str, vcpus: u32) -> FakeHost {
        Self::start_with_tls(grpc, name, vcpus, None).await
    }

    async fn start_with_tls(
        grpc: std::net::SocketAddr,
        name: &str,
        vcpus: u32,
        tls: Option<host_agent::server::TlsFiles>,
    ) -> FakeHost {
        Self::start_with(grpc, name, vcpus, tls, QemuImg::new(), None).await
    }

    /// `registry_ca`: the registry serves TLS signed by this CA (PEM).
    async fn start_with(
        grpc: std::net::SocketAddr,
        name: &str,
        vcpus: u32,
        tls: Option<host_agent::server::TlsFiles>,
        disks: QemuImg,
        registry_ca: Option<Vec<u8>>,
    ) -> FakeHost {
        let tmp = tempfile::tempdir().unwrap();
        let fake = Arc::new(FakeHypervisor::new());
        let problems = Arc::new(FakeSelfCheck::default());
        let agent = AgentParts {
            dir: tmp.path(),
            fake: &fake,
            problems: &problems,
            grpc,
            name,
            vcpus,
        };
        let tasks = agent.spawn(tls, disks, registry_ca).await;
        FakeHost {
            tmp,
            fake,
            problems,
            tasks,
        }
    }

    /// The agent stops answering and heartbeating; its domains stay (its QEMUs run on).
    fn silence(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }

    /// The agent starts again on the same data and domains, as after a reboot of the agent.
    async fn resume(&mut self, grpc: std::net::SocketAddr, name: &str, vcpus: u32) {
        self.silence();
        let agent = AgentParts {
            dir: self.tmp.path(),
            fake: &self.fake,
            problems: &self.problems,
            grpc,
            name,
            vcpus,
        };
        self.tasks = agent.spawn(None, QemuImg::new(), None).await;
    }

    fn machine_dirs(&self) -> usize {
        std::fs::read_dir(self.tmp.path().join("data/machines"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// What an in-process agent is made of; `spawn` serves and registers it.
struct AgentParts<'a> {
    dir: &'a std::path::Path,
    fake: &'a Arc<FakeHypervisor>,
    problems: &'a Arc<FakeSelfCheck>,
    grpc: std::net::SocketAddr,
    name: &'a str,
    vcpus: u32,
}

impl AgentParts<'_> {
    async fn spawn(
        &self,
        tls: Option<host_agent::server::TlsFiles>,
        disks: QemuImg,
        registry_ca: Option<Vec<u8>>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let data = DataDir::new(self.dir.join("data")).unwrap();
        data.prepare().unwrap();
        let events = Arc::new(EventLog::new(256));
        let manager = MachineManager::new(
            self.fake.clone(),
            Arc::new(disks),
            ImageCache::new(
                data.clone(),
                // Every fake host's directory is under the temporary directory: an image one
                // test host registered is fetched by the others too (a moved machine's).
                SourcePolicy::with_file_dirs(&[std::env::temp_dir()]).unwrap(),
            )
            .unwrap(),
            data,
            ManagerConfig {
                domain_prefix: format!("skygate-wf-{}-", self.name),
                hypervisor_kind: HypervisorKind::Qemu,
                network: NetworkMode::User {
                    address: std::net::Ipv4Addr::LOCALHOST,
                    ports: "23000-23999".parse().unwrap(),
                },
                graceful_timeout: Duration::from_secs(1),
                pause_before: None,
            },
            events.clone(),
        );
        let capacity = pb::Capacity {
            vcpus: self.vcpus,
            memory_mib: 8192,
            disk_gib: 100,
        };
        let service = HostAgentService::new(
            Arc::new(manager),
            events,
            HostIdentity {
                name: self.name.into(),
                hypervisor: HypervisorKind::Qemu,
                capacity,
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        // Shared by the agent's server and its registration, as in the real agent.
        let credentials = Credentials::new(TOKEN, Some(self.dir.join("host-credential")));
        let server = tokio::spawn({
            let credentials = credentials.clone();
            async move {
                let _ = host_agent::server::serve(
                    listener,
                    service,
                    credentials,
                    tls.as_ref(),
                    std::future::pending(),
                )
                .await;
            }
        });
        let scheme = if registry_ca.is_some() {
            "https"
        } else {
            "http"
        };
        let joining = tokio::spawn(registration::run(Registration {
            control_plane: format!("{scheme}://{}", self.grpc),
            token: TOKEN.into(),
            credentials,
            control_plane_ca: registry_ca,
            request: proto::controlplane::v1::RegisterRequest {
                name: self.name.into(),
                address,
                capacity: Some(capacity),
                hypervisor: pb::HypervisorKind::Qemu as i32,
                agent_version: "test".into(),
                domain_prefix: format!("skygate-wf-{}-", self.name),
            },
            self_check: self.problems.clone(),
        }));
        vec![server, joining]
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn config() -> ProvisioningConfig {
    provisioning_config(TOKEN)
}

/// Ok when `seen` is at least `least`; else what was seen.
fn at_least<T: PartialOrd + std::fmt::Debug>(seen: T, least: T) -> Result<(), String> {
    if seen >= least {
        Ok(())
    } else {
        Err(format!("{seen:?}, less than {least:?}"))
    }
}

async fn status_of(app: &TestApp, who: &crate::common::Session, id: &str) -> Value {
    let res = app
        .as_user(who, Method::GET, &format!("/machines/{id}"))
        .send()
        .await
        .unwrap();
    if res.status() == StatusCode::NOT_FOUND {
        return json!("gone");
    }
    res.json::<Value>().await.unwrap()["status"].clone()
}

async fn faults_at_every_step_still_converge_and_steps_run_twice_change_nothing(backend: Backend) {
    let app = TestApp::spawn_provisioning(backend, config()).await;
    let (host, admin, tenant) = cluster_with_image(&app, "wf").await;

    // Provisioning: the define fails once, then the start fails once.
    host.fake.fail_next(HypervisorOp::Define, 1);
    let id = create(&app, &tenant, "wf-1").await;
    wait_for("a define attempt", async || {
        at_least(host.fake.calls(HypervisorOp::Define), 1)
    })
    .await;
    host.fake.fail_next(HypervisorOp::Start, 1);
    wait_for("running", async || {
        is(status_of(&app, &tenant, &id).await, "running")
    })
    .await;
    assert_eq!(host.fake.domain_names().len(), 1);
    assert_eq!(host.machine_dirs(), 1);
    let (defines, starts) = (
        host.fake.calls(HypervisorOp::Define),
        host.fake.calls(HypervisorOp::Start),
    );
    assert!(defines >= 2, "the failed define was retried: {defines}");

    // Provisioning again (a duplicated task): nothing changes.
    let machine: MachineId = id.parse().unwrap();
    app.store
        .task_enqueue(machine, TaskKind::Provision)
        .await
        .unwrap();
    wait_for("the duplicate task", async || {
        is(app.store.task_pending_count(machine).await.unwrap(), 0)
    })
    .await;
    assert_eq!(host.fake.calls(HypervisorOp::Define), defines);
    assert_eq!(host.fake.calls(HypervisorOp::Start), starts);
    assert_eq!(status_of(&app, &tenant, &id).await, "running");

    // Stop: the shutdown fails once.
    host.fake.fail_next(HypervisorOp::Shutdown, 1);
    let res = app
        .as_user(&tenant, Method::POST, &format!("/machines/{id}/stop"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    wait_for("stopped", async || {
        is(status_of(&app, &tenant, &id).await, "stopped")
    })
    .await;
    // Stopping again through a duplicated task changes nothing.
    app.store
        .task_enqueue(machine, TaskKind::Stop)
        .await
        .unwrap();
    wait_for("the duplicate stop", async || {
        is(app.store.task_pending_count(machine).await.unwrap(), 0)
    })
    .await;
    assert_eq!(status_of(&app, &tenant, &id).await, "stopped");

    // Delete: the undefine fails once; the retry finishes; a second delete is harmless.
    host.fake.fail_next(HypervisorOp::Undefine, 1);
    let res = app
        .as_user(&tenant, Method::DELETE, &format!("/machines/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    wait_for("deleted", async || {
        is(status_of(&app, &tenant, &id).await, "gone")
    })
    .await;
    assert!(host.fake.calls(HypervisorOp::Undefine) >= 2);
    app.store
        .task_enqueue(machine, TaskKind::Delete)
        .await
        .unwrap();
    wait_for("the duplicate delete", async || {
        is(app.store.task_pending_count(machine).await.unwrap(), 0)
    })
    .await;
    assert!(
        host.fake.domain_names().is_empty(),
        "{:?}",
        host.fake.domain_names()
    );
    assert_eq!(host.machine_dirs(), 0);
    let hosts = app.get_json(&admin, "/hosts").await;
    assert_eq!(hosts["items"][0]["allocated"]["vcpus"], 0);
    drop(host);
    app.stop().await;
}

async fn a_silent_host_turns_unreachable_and_only_an_admin_may_forget_it(backend: Backend) {
    let mut cfg = config();
    cfg.workflows.unreachable_after = Duration::from_secs(2);
    let app = TestApp::spawn_provisioning(backend, cfg).await;
    let host = FakeHost::start(app.grpc.unwrap(), "quiet", 8).await;
    let admin = app.admin("root").await;
    wait_for("the host to register", async || {
        is(
            app.get_json(&admin, "/hosts").await["items"][0]["state"].clone(),
            "ready",
        )
    })
    .await;
    let h = app.get_json(&admin, "/hosts").await["items"][0].clone();
    assert_eq!(h["capacity"]["vcpus"], 8);
    assert_eq!(h["hypervisor"], "qemu");
    let id = h["id"].as_str().unwrap().to_owned();
    // The agent goes silent: unreachable after two seconds.
    drop(host);
    wait_for("unreachable", async || {
        is(
            app.get_json(&admin, "/hosts").await["items"][0]["state"].clone(),
            "unreachable",
        )
    })
    .await;
    // Nothing lives there, so an administrator may forget it; a stranger may not.
    let tenant = app.user("nosy").await;
    let res = app
        .as_user(&tenant, Method::DELETE, &format!("/hosts/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let res = app
        .as_user(&admin, Method::DELETE, &format!("/hosts/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        app.get_json(&admin, "/hosts").await["items"]
            .as_array()
            .map(Vec::len),
        Some(0)
    );
    app.stop().await;
}

async fn two_replicas_placing_at_once_never_oversubscribe_a_host(backend: Backend) {
    let first = TestApp::spawn_provisioning(backend, config()).await;
    let second = TestApp::spawn_full(
        first.db.clone(),
        Default::default(),
        Default::default(),
        Some(config()),
    )
    .await;
    let host = FakeHost::start(first.grpc.unwrap(), "small", 3).await;
    let (admin, tenant) = ready_with_image(&first, &host, "small").await;
    // Six one-vCPU machines at once, half through each replica: the host offers three.
    let creates = (0..6).map(|i| {
        let app = if i % 2 == 0 { &first } else { &second };
        app.as_user(&tenant, Method::POST, "/machines")
            .json(&json!({"hostname": format!("r{i}"), "image": "fake", "vcpus": 1, "memory_mib": 128, "disk_gib": 1}))
            .send()
    });
    let mut ids = Vec::new();
    for res in futures::future::join_all(creates).await {
        let res = res.unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        ids.push(
            res.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    wait_for("three machines running", async || {
        let mut running = 0;
        for id in &ids {
            running += usize::from(status_of(&first, &tenant, id).await == "running");
        }
        is(running, 3)
    })
    .await;
    // The rest keep waiting for capacity; the host is exactly full.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut pending = 0;
    for id in &ids {
        pending += usize::from(status_of(&first, &tenant, id).await == "pending");
    }
    assert_eq!(pending, 3);
    let h = first.get_json(&admin, "/hosts").await["items"][0].clone();
    assert_eq!(
        (h["allocated"]["vcpus"].as_i64(), h["machines"].as_i64()),
        (Some(3), Some(3)),
        "{h}"
    );
    assert_eq!(host.fake.domain_names().len(), 3);
    assert_eq!(first.store.allocation_drift().await.unwrap(), vec![]);
    // Deleting the three that run gives their room back, and the three that waited take it.
    let mut running = Vec::new();
    for id in &ids {
        if status_of(&first, &tenant, id).await == "running" {
            running.push(id.clone());
        }
    }
    for (i, id) in running.iter().enumerate() {
        let app = if i % 2 == 0 { &first } else { &second };
        let res = app
            .as_user(&tenant, Method::DELETE, &format!("/machines/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::ACCEPTED);
    }
    wait_for("the three that waited running", async || {
        let mut now_running = 0;
        for id in ids.iter().filter(|id| !running.contains(id)) {
            now_running += usize::from(status_of(&first, &tenant, id).await == "running");
        }
        is(now_running, 3)
    })
    .await;
    let h = first.get_json(&admin, "/hosts").await["items"][0].clone();
    assert_eq!(
        (h["allocated"]["vcpus"].as_i64(), h["machines"].as_i64()),
        (Some(3), Some(3)),
        "{h}"
    );
    assert_eq!(first.store.allocation_drift().await.unwrap(), vec![]);
    drop(host);
    second.stop().await;
    first.stop().await;
}

async fn a_machine_nothing_can_hold_fails_at_the_placement_deadline_with_the_reason(
    backend: Backend,
) {
    let mut cfg = config();
    cfg.workflows.placement_timeout = Duration::from_secs(2);
    let app = TestApp::spawn_provisioning(backend, cfg).await;
    let admin = app.admin("root").await;
    let image = json!({"name": "img", "source": "file:///nowhere/disk.qcow2", "format": "qcow2",
        "sha256": "a".repeat(64)});
    let res = app
        .as_user(&admin, Method::POST, "/images")
        .json(&image)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let tenant = app.user("patient").await;
    let res = app
        .as_user(&tenant, Method::POST, "/machines")
        .json(&json!({"hostname": "never", "image": "img", "vcpus": 1, "memory_mib": 128, "disk_gib": 1}))
        .send()
        .await
        .unwrap();
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for("failed", async || {
        is(status_of(&app, &tenant, &id).await, "failed")
    })
    .await;
    let m = app.get_json(&tenant, &format!("/machines/{id}")).await;
    let reason = m["failure_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("timed out") && reason.contains("pending"),
        "{m}"
    );
    let events = app
        .get_json(&tenant, &format!("/machines/{id}/events"))
        .await;
    let messages: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("waiting for capacity: no hosts are registered")),
        "{messages:?}"
    );
    app.stop().await;
}

/// Starts a fake host and registers a fake kernel image; returns the host, the admin and a
/// tenant.
async fn cluster_with_image(
    app: &TestApp,
    name: &str,
) -> (FakeHost, crate::common::Session, crate::common::Session) {
    let host = FakeHost::start(app.grpc.unwrap(), name, 8).await;
    let (admin, tenant) = ready_with_image(app, &host, name).await;
    (host, admin, tenant)
}

/// Waits for `host` to register, registers a fake kernel image from its directory, and makes
/// an administrator and a tenant.
async fn ready_with_image(
    app: &TestApp,
    host: &FakeHost,
    name: &str,
) -> (crate::common::Session, crate::common::Session) {
    let admin = app.admin("root").await;
    wait_for("the host to register", async || {
        is(
            app.get_json(&admin, "/hosts").await["items"][0]["state"].clone(),
            "ready",
        )
    })
    .await;
    register_fake_kernel_image(app, &admin, host.tmp.path()).await;
    let tenant = app.user(&format!("{name}-tenant")).await;
    (admin, tenant)
}

async fn create(app: &TestApp, tenant: &crate::common::Session, hostname: &str) -> String {
    let res = app
        .as_user(tenant, Method::POST, "/machines")
        .json(&json!({"hostname": hostname, "image": "fake", "vcpus": 1, "memory_mib": 128, "disk_gib": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Polls the tenant's view of machine `id` until `done` holds for it, at most `limit`; on
/// timeout the panic names what it waited for and shows the machine and its events as last
/// seen.
async fn wait_for_machine(
    app: &TestApp,
    who: &crate::common::Session,
    id: &str,
    what: &str,
    limit: Duration,
    done: impl Fn(&Value, &[Value]) -> bool,
) -> (Value, Vec<Value>) {
    let deadline = Instant::now() + limit;
    loop {
        let machine = app.get_json(who, &format!("/machines/{id}")).await;
        let events = app
            .get_json(who, &format!("/machines/{id}/events?limit=200"))
            .await["items"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if done(&machine, &events) {
            return (machine, events);
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}; last seen: {machine:#} with events {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// qemu-img missing on the agent (its program points nowhere): within seconds the tenant reads
/// which step failed and why, with no host path in it; after the bounded retries the machine
/// is `failed` with that reason, and nothing is left on the host.
async fn a_failing_agent_step_reaches_the_tenant_then_fails_the_machine(backend: Backend) {
    let app = TestApp::spawn_provisioning(backend, config()).await;
    let missing = "/nonexistent/skygate-test/qemu-img";
    let host = FakeHost::start_with(
        app.grpc.unwrap(),
        "broken",
        8,
        None,
        QemuImg::new().with_program(missing),
        None,
    )
    .await;
    let (_admin, tenant) = ready_with_image(&app, &host, "broken").await;
    let started = Instant::now();
    let id = create(&app, &tenant, "no-disk").await;

    let step_event = |e: &Value| {
        let m = e["message"].as_str().unwrap_or("");
        m.contains("create disk failed") && m.contains("qemu-img") && m.contains("attempt 1 of 5")
    };
    let (_, events) = wait_for_machine(
        &app,
        &tenant,
        &id,
        "an event naming the failed disk step",
        Duration::from_secs(10),
        |_, events| events.iter().any(step_event),
    )
    .await;
    let first = events.iter().find(|e| step_event(e)).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the first failure took {:?} to show",
        started.elapsed()
    );
    let text = first["message"].as_str().unwrap();
    assert!(
        !text.contains("/nonexistent"),
        "a host path reached the tenant: {text}"
    );
    assert!(text.contains("host broken"), "{text}");

    let (machine, events) = wait_for_machine(
        &app,
        &tenant,
        &id,
        "status failed after the bounded retries",
        Duration::from_secs(40),
        |m, _| m["status"] == "failed",
    )
    .await;
    let reason = machine["failure_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("create disk failed")
            && reason.contains("qemu-img")
            && reason.contains("gave up after 5 attempts"),
        "{reason}"
    );
    assert!(!reason.contains("/nonexistent"), "{reason}");
    let retries = events
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .unwrap_or("")
                .contains("create disk failed")
        })
        .count();
    assert!(retries >= 5, "one event per attempt: {events:#?}");
    assert_eq!(host.fake.calls(HypervisorOp::Define), 0);
    assert_eq!(host.machine_dirs(), 0, "the failed attempts left files");
    drop(host);
    app.stop().await;
}

/// An agent that reports problems (its tools broke after it started): admins see the host
/// `degraded` with the problems, no machine is placed there meanwhile and the tenant reads
/// why; once the agent reports none, the host is `ready` and the machine is placed.
async fn a_host_reporting_problems_takes_no_machines_until_they_are_gone(backend: Backend) {
    let app = TestApp::spawn_provisioning(backend, config()).await;
    let (host, admin, tenant) = cluster_with_image(&app, "sick").await;
    let problem = "qemu-img (qemu-utils) does not run: not found in PATH";
    host.problems.set(&[problem]);
    wait_for("the host to be degraded", async || {
        let h = app.get_json(&admin, "/hosts").await["items"][0].clone();
        is(
            (h["state"].clone(), h["problems"].clone()),
            (json!("degraded"), json!([problem])),
        )
    })
    .await;
    let id = create(&app, &tenant, "patient").await;
    let (machine, _) = wait_for_machine(
        &app,
        &tenant,
        &id,
        "an event saying why it waits",
        Duration::from_secs(10),
        |_, events| {
            events.iter().any(|e| {
                e["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("sick: its agent reports problems")
            })
        },
    )
    .await;
    assert_eq!(machine["status"], "pending", "{machine}");
    // A tenant is not shown hosts, and so not their problems.
    let res = app
        .as_user(&tenant, Method::GET, "/hosts")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);

    host.problems.set(&[]);
    wait_for("the host to be ready again", async || {
        let h = app.get_json(&admin, "/hosts").await["items"][0].clone();
        is(
            (h["state"].clone(), h["problems"].clone()),
            (json!("ready"), json!([])),
        )
    })
    .await;
    wait_for_machine(
        &app,
        &tenant,
        &id,
        "running once the host is healthy",
        Duration::from_secs(20),
        |m, _| m["status"] == "running",
    )
    .await;
    drop(host);
    app.stop().await;
}

async fn a_stop_during_provisioning_is_honoured(backend: Backend) {
    let app = TestApp::spawn_provisioning(backend, config()).await;
    let (host, _admin, tenant) = cluster_with_image(&app, "slow").await;
    // The agent takes a while to define: the tenant changes its mind meanwhile.
    host.fake
        .delay(HypervisorOp::Define, Duration::from_millis(1500));
    let id = create(&app, &tenant, "fickle").await;
    wait_for("provisioning", async || {
        is(status_of(&app, &tenant, &id).await, "provisioning")
    })
    .await;
    let res = app
        .as_user(&tenant, Method::POST, &format!("/machines/{id}/stop"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    wait_for("stopped", async || {
        is(status_of(&app, &tenant, &id).await, "stopped")
    })
    .await;
    let m = app.get_json(&tenant, &format!("/machines/{id}")).await;
    assert_eq!(m["desired_state"], "stopped");
    let domain = host.fake.domain_names().pop().expect("one domain");
    use host_agent::hypervisor::{DomainPhase, Hypervisor};
    assert_eq!(
        host.fake.get(&domain).unwrap().unwrap().phase,
        DomainPhase::Stopped
    );
    app.stop().await;
}

async fn an_action_on_an_unreachable_host_fails_at_its_deadline(backend: Backend) {
    let mut cfg = config();
    cfg.workflows.unreachable_after = Duration::from_secs(2);
    cfg.workflows.transition_timeout = Duration::from_secs(3);
    let app = TestApp::spawn_provisioning(backend, cfg).await;
    let (host, admin, tenant) = cluster_with_image(&app, "doomed").await;
    let id = create(&app, &tenant, "stranded").await;
    wait_for("running", async || {
        is(status_of(&app, &tenant, &id).await, "running")
    })
    .await;
    drop(host);
    wait_for("unreachable", async || {
        is(
            app.get_json(&admin, "/hosts").await["items"][0]["state"].clone(),
            "unreachable",
        )
    })
    .await;
    let res = app
        .as_user(&tenant, Method::POST, &format!("/machines/{id}/stop"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    wait_for("failed", async || {
        is(status_of(&app, &tenant, &id).await, "failed")
    })
    .await;
    let m = app.get_json(&tenant, &format!("/machines/{id}")).await;
    assert!(
        m["failure_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("timed out: stopping"),
        "{m}"
    );
    let events = app
        .get_json(&tenant, &format!("/machines/{id}/events"))
        .await;
    let messages: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(
        messages.iter().any(|m| m.contains("is unreachable")),
        "{messages:?}"
    );
    app.stop().await;
}

async fn registration_checks_the_token_and_what_agents_claim(backend: Backend) {
    use proto::controlplane::v1::agent_registry_client::AgentRegistryClient;
    use proto::controlplane::v1::RegisterRequest;
    let app = TestApp::spawn_provisioning(backend, config()).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.grpc.unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = |name: &str, prefix: &str| RegisterRequest {
        name: name.into(),
        address: "127.0.0.1:9999".into(),
        capacity: Some(pb::Capacity {
            vcpus: 1,
            memory_mib: 512,
            disk_gib: 1,
        }),
        hypervisor: pb::HypervisorKind::Qemu as i32,
        agent_version: "t".into(),
        domain_prefix: prefix.into(),
    };
    let mut wrong = AgentRegistryClient::with_interceptor(
        channel.clone(),
        proto::bearer::BearerToken::new("not the token").unwrap(),
    );
    let err = wrong.register(request("h1", "p-")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut client = AgentRegistryClient::with_interceptor(
        channel.clone(),
        proto::bearer::BearerToken::new(TOKEN).unwrap(),
    );
    for bad in [
        request("", "p-"),
        request("a b", "p-"),
        RegisterRequest {
            address: "nowhere".into(),
            ..request("h1", "p-")
        },
        RegisterRequest {
            capacity: None,
            ..request("h1", "p-")
        },
        RegisterRequest {
            hypervisor: 0,
            ..request("h1", "p-")
        },
    ] {
        let err = client.register(bad).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }
    let first = client
        .register(request("h1", "p-"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first.host_credential.len(),
        43,
        "joining issues a credential"
    );
    // Whoever else holds the join token cannot take the host over (issue 10: a second agent
    // re-registered a live host to its own address with 256 vCPUs).
    let takeover = RegisterRequest {
        address: "127.0.0.1:4444".into(),
        capacity: Some(pb::Capacity {
            vcpus: 256,
            memory_mib: 512,
            disk_gib: 1,
        }),
        ..request("h1", "p-")
    };
    let err = client.register(takeover.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("reset-host-credential"), "{err:?}");
    let err = wrong.register(takeover).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let admin = app.admin("root").await;
    let hosts = app.get_json(&admin, "/hosts").await;
    assert_eq!(hosts["items"][0]["address"], "127.0.0.1:9999", "{hosts}");
    assert_eq!(hosts["items"][0]["capacity"]["vcpus"], 1, "{hosts}");
    // The agent itself, with its credential (a restart): the same host, nothing new issued.
    let mut own = AgentRegistryClient::with_interceptor(
        channel.clone(),
        proto::bearer::BearerToken::new(&first.host_credential).unwrap(),
    );
    let again = own
        .register(request("h1", "p-"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.host_id, again.host_id);
    assert!(again.host_credential.is_empty());
    // Heartbeats carry the credential, not the join token.
    let beat = |id: &str| proto::controlplane::v1::HeartbeatRequest {
        host_id: id.into(),
        capacity: Some(pb::Capacity {
            vcpus: 1,
            memory_mib: 1,
            disk_gib: 1,
        }),
        problems: Vec::new(),
    };
    own.heartbeat(beat(&first.host_id)).await.unwrap();
    let err = client.heartbeat(beat(&first.host_id)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    // Another live agent claiming the name with another prefix: refused; and a caller
    // without a valid bearer does not even learn that the name is live.
    let err = own.register(request("h1", "q-")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    let err = wrong.register(request("h1", "q-")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = client
        .heartbeat(beat(&uuid::Uuid::new_v4().to_string()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    // An operator resets the credential: the old one stops working, the join token joins
    // again and gets a new one.
    assert!(app.store.host_credential_reset("h1").await.unwrap());
    let err = own.heartbeat(beat(&first.host_id)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let rejoined = client
        .register(request("h1", "p-"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rejoined.host_id, first.host_id);
    assert_eq!(rejoined.host_credential.len(), 43);
    assert_ne!(rejoined.host_credential, first.host_credential);
    app.stop().await;
}

/// The agent's side of identity: it keeps the credential it was issued (0600) and, when an
/// operator resets it, joins again on its own; the registry can be served over TLS.
async fn agents_keep_their_credential_and_rejoin_after_a_reset(backend: Backend) {
    use std::os::unix::fs::PermissionsExt;
    let pki_dir = tempfile::tempdir().unwrap();
    let (files, _) = test_pki(pki_dir.path());
    let mut cfg = config();
    cfg.registry_tls = Some((
        std::fs::read(&files.cert).unwrap(),
        std::fs::read(&files.key).unwrap(),
    ));
    let ca = std::fs::read(files.client_ca.as_ref().unwrap()).unwrap();
    let app = TestApp::spawn_provisioning(backend, cfg).await;
    let grpc = app.grpc.unwrap();
    // Plaintext to a TLS registry gets nowhere.
    let plain = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        let mut c =
            proto::controlplane::v1::agent_registry_client::AgentRegistryClient::new(channel);
        assert!(c
            .heartbeat(proto::controlplane::v1::HeartbeatRequest::default())
            .await
            .is_err());
    }
    let host = FakeHost::start_with(grpc, "kept", 4, None, QemuImg::new(), Some(ca)).await;
    let admin = app.admin("root").await;
    let file = host.tmp.path().join("host-credential");
    wait_for(
        "the host joins over TLS and keeps its credential",
        async || {
            let hosts = app.get_json(&admin, "/hosts").await;
            match (&hosts["items"][0]["state"], file.exists()) {
                (Value::String(s), true) if s == "ready" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let first = std::fs::read_to_string(&file).unwrap();
    // A joined agent is driven with its host's credential only: the join token (which every
    // host shares) no longer lists, creates or stops its machines.
    let address = app.get_json(&admin, "/hosts").await["items"][0]["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let agent = |token: &str| {
        let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
            .unwrap()
            .connect_lazy();
        proto::agent::v1::host_agent_client::HostAgentClient::with_interceptor(
            channel,
            proto::bearer::BearerToken::new(token).unwrap(),
        )
    };
    let err = agent(TOKEN)
        .list_machines(pb::ListMachinesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    agent(&first)
        .list_machines(pb::ListMachinesRequest {})
        .await
        .unwrap();
    let id = app.get_json(&admin, "/hosts").await["items"][0]["id"].clone();
    assert!(app.store.host_credential_reset("kept").await.unwrap());
    wait_for("the agent joins again with a new credential", async || {
        let now = std::fs::read_to_string(&file).unwrap_or_default();
        let hosts = app.get_json(&admin, "/hosts").await;
        if now != first && !now.is_empty() && hosts["items"][0]["state"] == "ready" {
            Ok(())
        } else {
            Err(format!("{}", hosts["items"][0]["state"]))
        }
    })
    .await;
    assert_eq!(app.get_json(&admin, "/hosts").await["items"][0]["id"], id);
    app.stop().await;
}

/// Issue 10, point 12: leases, heartbeats and deadlines were judged by each replica's own
/// clock. A second replica (a real process) running five minutes ahead under libfaketime now
/// steals no lease, marks no host unreachable and fails no machine early.
#[tokio::test]
async fn a_replica_whose_clock_is_five_minutes_ahead_steals_no_lease() {
    use sqlx::Connection;
    let mut cfg = config();
    cfg.workflows.lease = Duration::from_secs(3);
    let app = TestApp::spawn_provisioning(Backend::Postgres, cfg).await;
    let (host, admin, tenant) = cluster_with_image(&app, "steady").await;
    // The machine's build holds its task (and lease, renewed every second) for 8 s.
    host.fake
        .delay(HypervisorOp::Define, Duration::from_secs(8));
    let id = create(&app, &tenant, "held").await;
    let mut db = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
    let lease_of = async |db: &mut sqlx::PgConnection| -> Option<(String, i64)> {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT lease_owner, attempts FROM tasks WHERE machine_id = $1 AND kind = 'provision' \
             AND lease_owner IS NOT NULL",
        )
        .bind(&id)
        .fetch_optional(db)
        .await
        .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let held = loop {
        if let Some(held) = lease_of(&mut db).await {
            break held;
        }
        assert!(Instant::now() < deadline, "the task was never claimed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let dir = tempfile::tempdir().unwrap();
    // libfaketime preloaded through `env`, which execs: the server is the test's own child,
    // killed by pid at the end (the `faketime` command forks and would leave it running).
    let lib = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .expect("libfaketime is installed (scripts/install-deps.sh)");
    let preload = format!("LD_PRELOAD={lib}");
    let mut ahead = crate::common::process::ServerProcess::start(
        &dir.path().join("state"),
        &["env", &preload, "FAKETIME=+5m"],
        &[
            "--database-url",
            &app.db.url,
            "--agent-token",
            TOKEN,
            "--grpc-addr",
            "127.0.0.1:0",
            "--task-lease-secs",
            "3",
        ],
    )
    .await;
    // While the build lasts, the lease stays where it is, and the host stays ready.
    while lease_of(&mut db).await.is_some() {
        assert_eq!(lease_of(&mut db).await.unwrap_or(held.clone()), held);
        let hosts = app.get_json(&admin, "/hosts").await;
        assert_eq!(hosts["items"][0]["state"], "ready", "{hosts}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for("running", async || {
        is(status_of(&app, &tenant, &id).await, "running")
    })
    .await;
    let events = app
        .get_json(&tenant, &format!("/machines/{id}/events"))
        .await;
    let text = events.to_string();
    assert!(
        !text.contains("unreachable") && !text.contains("timed out"),
        "{text}"
    );
    // The replica ahead ran all along (its workers polled the same tasks).
    assert!(
        ahead.child.try_wait().unwrap().is_none(),
        "{}",
        ahead.log_text()
    );
    drop(ahead);
    app.stop().await;
}

/// A CA, an agent certificate for 127.0.0.1 and a control-plane client certificate, in PEM.
fn test_pki(
    dir: &std::path::Path,
) -> (
    host_agent::server::TlsFiles,
    control_plane::agents::AgentTls,
) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "SkyGate test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |names: &[&str], usage| {
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        &["127.0.0.1", "localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(&["control-plane"], ExtendedKeyUsagePurpose::ClientAuth);
    let write = |name: &str, pem: &str| {
        let p = dir.join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let files = host_agent::server::TlsFiles {
        cert: write("agent.pem", &server_cert),
        key: write("agent-key.pem", &server_key),
        client_ca: Some(write("ca.pem", &ca.pem())),
    };
    let tls = control_plane::agents::AgentTls {
        ca: ca.pem().into_bytes(),
        identity: Some((client_cert.into_bytes(), client_key.into_bytes())),
    };
    (files, tls)
}

async fn machines_are_driven_over_mutual_tls_when_configured(backend: Backend) {
    let pki_dir = tempfile::tempdir().unwrap();
    let (agent_files, control_plane_tls) = test_pki(pki_dir.path());
    let mut cfg = config();
    cfg.agent_tls = Some(control_plane_tls);
    let app = TestApp::spawn_provisioning(backend, cfg).await;
    let host = FakeHost::start_with_tls(app.grpc.unwrap(), "secure", 8, Some(agent_files)).await;
    let (_admin, tenant) = ready_with_image(&app, &host, "secure").await;
    let id = create(&app, &tenant, "over-tls").await;
    wait_for("running", async || {
        is(status_of(&app, &tenant, &id).await, "running")
    })
    .await;
    assert_eq!(host.fake.domain_names().len(), 1);
    app.stop().await;
}

/// Issue 11, point 7: the reconciler's last pass is visible to administrators (and to no one
/// else), with every check named: a host whose agent does not answer is counted as
/// unreachable beside the host that was compared, and the metrics count it too.
async fn an_admin_sees_the_reconcilers_last_pass_with_an_unreachable_host(backend: Backend) {
    use proto::controlplane::v1::agent_registry_client::AgentRegistryClient;
    let app = TestApp::spawn_provisioning(backend, config()).await;
    let (host, admin, tenant) = cluster_with_image(&app, "seen").await;
    let res = app
        .as_user(&tenant, Method::GET, "/admin/reconciler")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        res.headers()["content-type"],
        "application/problem+json",
        "{res:?}"
    );
    let res = app
        .req(Method::GET, "/admin/reconciler")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let id = create(&app, &tenant, "watched").await;
    wait_for("running", async || {
        is(status_of(&app, &tenant, &id).await, "running")
    })
    .await;
    // A second host, registered as its agent would be, at an address where nothing listens
    // (its agent is down): ready until its heartbeats are missed, so the passes ask it.
    let dark = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.grpc.unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    AgentRegistryClient::with_interceptor(channel, proto::bearer::BearerToken::new(TOKEN).unwrap())
        .register(proto::controlplane::v1::RegisterRequest {
            name: "dark".into(),
            address: dark,
            capacity: Some(pb::Capacity {
                vcpus: 1,
                memory_mib: 512,
                disk_gib: 1,
            }),
            hypervisor: pb::HypervisorKind::Qemu as i32,
            agent_version: "t".into(),
            domain_prefix: "skygate-wf-dark-".into(),
        })
        .await
        .unwrap();
    wait_for(
        "a pass that compared one host and found the other unreachable",
        async || {
            let seen = app.get_json(&admin, "/admin/reconciler").await;
            let pass = &seen["last_pass"];
            let wanted = (
                pass["hosts_checked"].as_u64(),
                pass["outcomes"]["compared"].as_u64(),
                pass["outcomes"]["host_unreachable"].as_u64(),
                pass["machines_checked"].as_u64(),
            );
            is(wanted, (Some(2), Some(1), Some(1), Some(1))).map_err(|e| format!("{e} in {seen}"))
        },
    )
    .await;
    let pass = app.get_json(&admin, "/admin/reconciler").await["last_pass"].clone();
    assert_eq!(pass["repairs"], 0, "{pass}");
    assert_eq!(pass["outcomes"]["agent_refused"], 0, "{pass}");
    let at = |field: &str| {
        chrono::DateTime::parse_from_rfc3339(pass[field].as_str().unwrap_or_default()).unwrap()
    };
    assert!(at("started_at") <= at("finished_at"), "{pass}");
    let metrics = app
        .req(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("skygate_reconciler_checks_total{outcome=\"host_unreachable\"}"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("skygate_agent_calls_total{call=\"ListMachines\",outcome=\"unreachable\"}"),
        "{metrics}"
    );
    drop(host);
    app.stop().await;
}

both_stores!(
    an_admin_sees_the_reconcilers_last_pass_with_an_unreachable_host,
    a_failing_agent_step_reaches_the_tenant_then_fails_the_machine,
    a_host_reporting_problems_takes_no_machines_until_they_are_gone,
    machines_are_driven_over_mutual_tls_when_configured,
    a_stop_during_provisioning_is_honoured,
    an_action_on_an_unreachable_host_fails_at_its_deadline,
    registration_checks_the_token_and_what_agents_claim,
    agents_keep_their_credential_and_rejoin_after_a_reset,
    a_machine_nothing_can_hold_fails_at_the_placement_deadline_with_the_reason,
    two_replicas_placing_at_once_never_oversubscribe_a_host,
    faults_at_every_step_still_converge_and_steps_run_twice_change_nothing,
    a_silent_host_turns_unreachable_and_only_an_admin_may_forget_it,
    an_admin_forgets_a_lost_hosts_machines_and_the_host_cleans_up_when_it_returns,
    a_crashed_machine_that_asks_for_it_is_restarted_up_to_its_limit,
    a_wait_answers_when_the_machine_gets_there_or_408_at_its_timeout,
    machines_waiting_for_capacity_cost_nothing_until_room_appears,
);

/// Machines that find no room wait without retrying (their events do not grow), and start as
/// soon as room appears: here, when a machine on the full host is deleted.
async fn machines_waiting_for_capacity_cost_nothing_until_room_appears(backend: Backend) {
    let app = TestApp::spawn_provisioning(backend, config()).await;
    let host = FakeHost::start(app.grpc.unwrap(), "one", 1).await;
    let (_admin, tenant) = ready_with_image(&app, &host, "waits").await;
    let first = create(&app, &tenant, "first").await;
    wait_for("the first machine running", async || {
        is(status_of(&app, &tenant, &first).await, "running")
    })
    .await;
    let waiting: Vec<String> = [
        create(&app, &tenant, "second").await,
        create(&app, &tenant, "third").await,
    ]
    .into();
    let events = async |id: &str| {
        app.get_json(&tenant, &format!("/machines/{id}/events?limit=200"))
            .await["items"]
            .as_array()
            .map_or(0, Vec::len)
    };
    wait_for("both waiting machines to note that they wait", async || {
        let mut noted = 0;
        for id in &waiting {
            noted += usize::from(events(id).await >= 2);
        }
        is(noted, 2)
    })
    .await;
    let before = [events(&waiting[0]).await, events(&waiting[1]).await];
    // Placement retried every 2 s before: three more attempts each in this time.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        [events(&waiting[0]).await, events(&waiting[1]).await],
        before
    );
    for id in &waiting {
        assert_eq!(status_of(&app, &tenant, id).await, "pending");
    }
    let res = app
        .as_user(&tenant, Method::DELETE, &format!("/machines/{first}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    wait_for("one waiting machine to take the freed room", async || {
        let mut running = 0;
        for id in &waiting {
            running += usize::from(status_of(&app, &tenant, id).await == "running");
        }
        is(running, 1)
    })
    .await;
    drop(host);
    app.stop().await;
}

/// Issue 14, forget: a host goes silent with two running machines. An administrator forgets
/// one (`DELETE /machines/{id}?force=true`), then the host with the other
/// (`DELETE /hosts/{id}?force=true`): capacity and the tenant's usage come back at once. When
/// the agent returns, it registers again and what is left of both machines is removed, each
/// with an event saying so.
async fn an_admin_forgets_a_lost_hosts_machines_and_the_host_cleans_up_when_it_returns(
    backend: Backend,
) {
    let mut cfg = config();
    cfg.workflows.unreachable_after = Duration::from_secs(2);
    cfg.workflows.orphan_grace = Duration::from_secs(1);
    let app = TestApp::spawn_provisioning(backend, cfg).await;
    let grpc = app.grpc.unwrap();
    let (mut host, admin, tenant) = cluster_with_image(&app, "lost").await;
    let ids = [
        create(&app, &tenant, "one").await,
        create(&app, &tenant, "two").await,
    ];
    for id in &ids {
        wait_for_machine(
            &app,
            &tenant,
            id,
            "running",
            Duration::from_secs(30),
            |m, _| m["status"] == "running",
        )
        .await;
    }
    assert_eq!(host.fake.domain_names().len(), 2);
    assert_eq!(host.machine_dirs(), 2);
    let host_id = app.get_json(&admin, "/hosts").await["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // While the host answers, forcing is refused: a normal delete works there.
    let res = app
        .as_user(
            &admin,
            Method::DELETE,
            &format!("/machines/{}?force=true", ids[0]),
        )
        .send()
        .await
        .unwrap();
    let body = crate::common::problem(res, StatusCode::CONFLICT).await;
    assert!(
        body["detail"].as_str().unwrap().contains("not lost"),
        "{body}"
    );
    let res = app
        .as_user(
            &admin,
            Method::DELETE,
            &format!("/hosts/{host_id}?force=true"),
        )
        .send()
        .await
        .unwrap();
    crate::common::problem(res, StatusCode::CONFLICT).await;

    host.silence();
    wait_for("unreachable", async || {
        is(
            app.get_json(&admin, "/hosts").await["items"][0]["state"].clone(),
            "unreachable",
        )
    })
    .await;

    // The tenant's own delete cannot finish without the host; forcing is not the tenant's.
    let one = format!("/machines/{}", ids[0]);
    let res = app
        .as_user(&tenant, Method::DELETE, &format!("{one}?force=true"))
        .send()
        .await
        .unwrap();
    crate::common::problem(res, StatusCode::FORBIDDEN).await;
    let res = app
        .as_user(&tenant, Method::DELETE, &one)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);

    let res = app
        .as_user(&admin, Method::DELETE, &format!("{one}?force=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.json::<Value>().await.unwrap()["status"], "deleted");
    let res = app
        .as_user(&tenant, Method::GET, &one)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let h = app.get_json(&admin, "/hosts").await["items"][0].clone();
    assert_eq!(h["allocated"]["vcpus"], 1, "{h}");
    let me = app.get_json(&tenant, "/auth/profile").await;
    assert_eq!(me["quota"]["usage"]["machines"], 1, "{me}");
    // Forgetting it again: there is nothing live to forget.
    let res = app
        .as_user(&admin, Method::DELETE, &format!("{one}?force=true"))
        .send()
        .await
        .unwrap();
    crate::common::problem(res, StatusCode::NOT_FOUND).await;

    // The host still holds the other machine: removing it needs force, which takes both.
    let host_path = format!("/hosts/{host_id}");
    let res = app
        .as_user(&admin, Method::DELETE, &host_path)
        .send()
        .await
        .unwrap();
    let body = crate::common::problem(res, StatusCode::CONFLICT).await;
    assert!(body["detail"].as_str().unwrap().contains("force"), "{body}");
    let res = app
        .as_user(&admin, Method::DELETE, &format!("{host_path}?force=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let res = app
        .as_user(&tenant, Method::GET, &format!("/machines/{}", ids[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let me = app.get_json(&tenant, "/auth/profile").await;
    assert_eq!(me["quota"]["usage"]["machines"], 0, "{me}");
    let events = app
        .get_json(&admin, &format!("/machines/{}/events?limit=200", ids[1]))
        .await;
    let last = events["items"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["action"], "forget", "{events}");
    assert!(
        last["message"].as_str().unwrap().contains("host lost"),
        "{last}"
    );

    // The agent comes back: it joins again, and the leftovers of both machines go.
    host.resume(grpc, "lost", 8).await;
    wait_for("the leftovers to be removed", async || {
        let left = (host.fake.domain_names().len(), host.machine_dirs());
        is(left, (0, 0))
    })
    .await;
    for id in &ids {
        let events = app
            .get_json(&admin, &format!("/machines/{id}/events?limit=200"))
            .await;
        let said = events["items"].as_array().unwrap().iter().any(|e| {
            e["message"]
                .as_str()
                .unwrap()
                .contains("removed its leftover domain")
        });
        assert!(said, "no removal event for {id}: {events}");
    }
    let hosts = app.get_json(&admin, "/hosts").await;
    assert_eq!(hosts["items"][0]["state"], "ready", "{hosts}");
    assert_eq!(hosts["items"][0]["allocated"]["vcpus"], 0, "{hosts}");
    app.stop().await;
}

/// Issue 14, restart policy: a machine created with `on-failure` whose QEMU dies is started
/// again, with backoff, twice (the limit here); the third crash within the window leaves it
/// stopped with an event saying why. A `never` machine that crashes stays stopped. (Alone it
/// takes 7 s; the waits allow 90 s because CI runs four such tests at once on two cores, where
/// one took 31 s.)
async fn a_crashed_machine_that_asks_for_it_is_restarted_up_to_its_limit(backend: Backend) {
    let mut cfg = config();
    cfg.workflows.restart = control_plane::model::RestartLimits {
        max: 2,
        window: Duration::from_secs(600),
        backoff: Duration::from_secs(1),
        ..control_plane::model::RestartLimits::default()
    };
    let app = TestApp::spawn_provisioning(backend, cfg).await;
    let (host, _admin, tenant) = cluster_with_image(&app, "crashy").await;
    let res = app
        .as_user(&tenant, Method::POST, "/machines")
        .json(
            &json!({"hostname": "phoenix", "image": "fake", "vcpus": 1, "memory_mib": 128,
            "disk_gib": 1, "restart_policy": "on-failure"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let phoenix: Value = res.json().await.unwrap();
    assert_eq!(phoenix["restart_policy"], "on-failure");
    let phoenix = phoenix["id"].as_str().unwrap().to_owned();
    let plain = create(&app, &tenant, "plain").await;
    for id in [&phoenix, &plain] {
        wait_for_machine(
            &app,
            &tenant,
            id,
            "running",
            Duration::from_secs(90),
            |m, _| m["status"] == "running",
        )
        .await;
    }
    let domain = |id: &str| format!("skygate-wf-crashy-{id}");
    let said = |events: &[Value], text: &str| {
        events
            .iter()
            .any(|e| e["message"].as_str().unwrap_or_default().contains(text))
    };

    for attempt in 1..=2 {
        assert!(host.fake.crash(&domain(&phoenix)), "crash {attempt}");
        let note = format!("restart {attempt} of at most 2");
        wait_for_machine(
            &app,
            &tenant,
            &phoenix,
            &note,
            Duration::from_secs(90),
            |m, events| m["status"] == "running" && said(events, &note),
        )
        .await;
    }
    assert!(host.fake.crash(&domain(&phoenix)));
    let (m, events) = wait_for_machine(
        &app,
        &tenant,
        &phoenix,
        "stopped after the limit",
        Duration::from_secs(90),
        |m, _| m["status"] == "stopped",
    )
    .await;
    assert_eq!(m["desired_state"], "stopped");
    assert!(
        said(&events, "not restarted: it was restarted 2 times"),
        "{events:#?}"
    );

    // Without the policy, a crash is only reported.
    assert!(host.fake.crash(&domain(&plain)));
    let (_, events) = wait_for_machine(
        &app,
        &tenant,
        &plain,
        "stopped",
        Duration::from_secs(90),
        |m, _| m["status"] == "stopped",
    )
    .await;
    assert!(said(&events, "exited unexpectedly"), "{events:#?}");
    assert!(!said(&events, "restarting"), "{events:#?}");

    // The tenant changes its mind: the policy is set in place, and a bad one is refused.
    let res = app
        .as_user(&tenant, Method::PATCH, &format!("/machines/{plain}"))
        .json(&json!({"restart_policy": "on-failure"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.json::<Value>().await.unwrap()["restart_policy"],
        "on-failure"
    );
    let res = app
        .as_user(&tenant, Method::PATCH, &format!("/machines/{plain}"))
        .json(&json!({"restart_policy": "always"}))
        .send()
        .await
        .unwrap();
    crate::common::problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;

    // A crash with the policy: while its restart waits out the backoff the machine is
    // `starting`, and a stop then is accepted and keeps it down.
    let res = app
        .as_user(&tenant, Method::POST, &format!("/machines/{plain}/start"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let running = app
        .get_json(
            &tenant,
            &format!("/machines/{plain}/wait?status=running&timeout=60"),
        )
        .await;
    assert_eq!(running["status"], "running");
    assert!(host.fake.crash(&domain(&plain)));
    let starting = app
        .get_json(
            &tenant,
            &format!("/machines/{plain}/wait?status=starting&timeout=60"),
        )
        .await;
    assert_eq!(starting["status"], "starting", "{starting:#}");
    let res = app
        .as_user(&tenant, Method::POST, &format!("/machines/{plain}/stop"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let stopped = app
        .get_json(
            &tenant,
            &format!("/machines/{plain}/wait?status=stopped&timeout=60"),
        )
        .await;
    assert_eq!(stopped["status"], "stopped", "{stopped:#}");
    // Past the backoff: the restart that was waiting did nothing, and it never ran after the
    // crash (a stop that came after the restart would pass the checks above too).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = app.get_json(&tenant, &format!("/machines/{plain}")).await;
    assert_eq!(still["status"], "stopped", "{still:#}");
    assert_eq!(still["desired_state"], "stopped");
    let log = app
        .get_json(&tenant, &format!("/machines/{plain}/events?limit=200"))
        .await;
    let events = log["items"].as_array().unwrap();
    let crash = events
        .iter()
        .rposition(|e| e["status"] == "starting")
        .expect("the restart's starting");
    assert!(
        events[crash..].iter().all(|e| e["status"] != "running"),
        "{events:#?}"
    );
    let stranger = app.user("stranger").await;
    let res = app
        .as_user(&stranger, Method::PATCH, &format!("/machines/{plain}"))
        .json(&json!({"restart_policy": "never"}))
        .send()
        .await
        .unwrap();
    crate::common::problem(res, StatusCode::NOT_FOUND).await;
    drop(host);
    app.stop().await;
}

/// Issue 15, wait: asked right after the create, `wait?status=running` answers once the
/// machine runs (before its timeout); a wait for a status it will not reach answers 408 at its
/// timeout; a wait ends early when the machine fails or is deleted.
async fn a_wait_answers_when_the_machine_gets_there_or_408_at_its_timeout(backend: Backend) {
    let app = TestApp::spawn_provisioning(backend, config()).await;
    let (host, _admin, tenant) = cluster_with_image(&app, "waiter").await;
    let id = create(&app, &tenant, "w1").await;
    let asked = Instant::now();
    let res = app
        .as_user(
            &tenant,
            Method::GET,
            &format!("/machines/{id}/wait?status=running&timeout=60s"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let m: Value = res.json().await.unwrap();
    assert_eq!(m["status"], "running");
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "{:?}",
        asked.elapsed()
    );

    // It will not stop by itself: 408 after the timeout, not before.
    let asked = Instant::now();
    let res = app
        .as_user(
            &tenant,
            Method::GET,
            &format!("/machines/{id}/wait?status=stopped&timeout=2"),
        )
        .send()
        .await
        .unwrap();
    let body = crate::common::problem(res, StatusCode::REQUEST_TIMEOUT).await;
    assert!(
        body["detail"].as_str().unwrap().contains("stopped"),
        "{body}"
    );
    let waited = asked.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(10),
        "{waited:?}"
    );

    // A stop while someone waits for it: the wait answers when it is done.
    let waiter = {
        let url = app.url(&format!("/machines/{id}/wait?status=stopped&timeout=60s"));
        let request = app.client.get(url).bearer_auth(&tenant.access);
        tokio::spawn(async move { request.send().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let res = app
        .as_user(&tenant, Method::POST, &format!("/machines/{id}/stop"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let res = waiter.await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.json::<Value>().await.unwrap()["status"], "stopped");

    // Deleted: a wait for anything ends with the machine as deleted.
    let res = app
        .as_user(&tenant, Method::DELETE, &format!("/machines/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let res = app
        .as_user(
            &tenant,
            Method::GET,
            &format!("/machines/{id}/wait?status=running&timeout=30s"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.json::<Value>().await.unwrap()["status"], "deleted");

    // Bad questions, and other tenants' machines.
    for query in [
        "status=sleeping",
        "status=running&timeout=1h",
        "status=running&timeout=301",
        "timeout=5",
    ] {
        let res = app
            .as_user(
                &tenant,
                Method::GET,
                &format!("/machines/{id}/wait?{query}"),
            )
            .send()
            .await
            .unwrap();
        crate::common::problem(res, StatusCode::BAD_REQUEST).await;
    }
    let other = create(&app, &tenant, "w2").await;
    let stranger = app.user("stranger").await;
    let res = app
        .as_user(
            &stranger,
            Method::GET,
            &format!("/machines/{other}/wait?status=running"),
        )
        .send()
        .await
        .unwrap();
    crate::common::problem(res, StatusCode::NOT_FOUND).await;
    drop(host);
    app.stop().await;
}

/// Issue 15, wait across replicas: the machine is driven by replica A's workers while the
/// tenant waits on replica B, which runs none; B is woken by A's commits (PostgreSQL
/// NOTIFY), not by a timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_on_one_replica_is_woken_by_another_replicas_work() {
    let a = TestApp::spawn_provisioning(Backend::Postgres, config()).await;
    let b = TestApp::spawn_on(
        a.db.clone(),
        control_plane::app::Settings::default(),
        control_plane::api::HttpSettings::default(),
    )
    .await;
    let (host, _admin, tenant) = cluster_with_image(&a, "twin").await;
    let mut stream = EventStream::start(&b, &tenant, None).await;
    let id = create(&a, &tenant, "far").await;
    let res = b
        .as_user(
            &tenant,
            Method::GET,
            &format!("/machines/{id}/wait?status=running&timeout=60s"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.json::<Value>().await.unwrap()["status"], "running");
    // B's event stream carries what A's workers wrote, in order.
    let seen = stream
        .until(Duration::from_secs(30), |e| e.data["status"] == "running")
        .await;
    assert!(seen.windows(2).all(|w| w[0].id < w[1].id), "{seen:#?}");
    assert!(seen.iter().all(|e| e.data["machine_id"] == id.as_str()));
    drop(stream);
    drop(host);
    b.stop().await;
    a.stop().await;
}

/// Writes a pattern at the start of machine `id`'s disk on `host`, as its guest would.
fn write_to_disk(host: &FakeHost, id: &str) -> std::path::PathBuf {
    let data = DataDir::new(host.tmp.path().join("data")).unwrap();
    let overlay = data.overlay(id.parse().unwrap());
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0xab 0 1M"])
        .arg(&overlay)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    overlay
}

/// Whether the disk at `overlay` still holds what [`write_to_disk`] wrote.
fn disk_has_the_write(overlay: &std::path::Path) -> bool {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-r", "-U", "-c", "read -P 0xab 0 1M"])
        .arg(overlay)
        .output()
        .unwrap();
    out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("verification failed")
}

fn virtual_size(overlay: &std::path::Path) -> u64 {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(overlay)
        .output()
        .unwrap();
    serde_json::from_slice::<Value>(&out.stdout).unwrap()["virtual-size"]
        .as_u64()
        .unwrap()
}

/// Issue 15, resize and rebuild through the API and a real agent (fake hypervisor, real
/// qemu-img): what is refused says why (running, no room on the host, quota, a shrinking
/// disk); an accepted resize reaches the host's definition and disk, the tenant's usage and
/// the host's allocation; a rebuild leaves a fresh disk and the machine as it was.
async fn resize_and_rebuild_reach_the_host_and_say_why_when_refused(backend: Backend) {
    let app = TestApp::spawn_provisioning(backend, config()).await;
    let host = FakeHost::start(app.grpc.unwrap(), "resizer", 4).await;
    let (admin, tenant) = ready_with_image(&app, &host, "resizer").await;
    let id = create(&app, &tenant, "r1").await;
    let wait = |status: &'static str| {
        let path = format!("/machines/{id}/wait?status={status}&timeout=60");
        let (app, tenant) = (&app, &tenant);
        async move {
            let m = app.get_json(tenant, &path).await;
            assert_eq!(m["status"], status, "{m:#}");
            m
        }
    };
    let post = |path: String, body: Value| {
        let (app, tenant) = (&app, &tenant);
        async move {
            app.as_user(tenant, Method::POST, &path)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let resize = format!("/machines/{id}/resize");
    let rebuild = format!("/machines/{id}/rebuild");
    wait("running").await;

    let res = post(resize.clone(), json!({"vcpus": 2})).await;
    let body = crate::common::problem(res, StatusCode::CONFLICT).await;
    assert!(
        body["detail"].as_str().unwrap().contains("stop it first"),
        "{body}"
    );
    post(format!("/machines/{id}/stop"), json!({})).await;
    wait("stopped").await;

    for bad in [
        json!({}),
        json!({"vcpus": 0}),
        json!({"disk_gib": 99999}),
        json!({"cpus": 2}),
    ] {
        let res = post(resize.clone(), bad.clone()).await;
        crate::common::problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    // The size it has: nothing to do.
    let res = post(resize.clone(), json!({"vcpus": 1, "disk_gib": 1})).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.json::<Value>().await.unwrap()["status"], "stopped");
    // The host offers 4 vCPUs and this machine holds 1.
    let res = post(resize.clone(), json!({"vcpus": 5})).await;
    let body = crate::common::problem(res, StatusCode::CONFLICT).await;
    assert_eq!(
        body["detail"], "the machine's host has no room for 4 more vCPUs; try a smaller size",
        "{body}"
    );
    let tenant_id = app.get_json(&tenant, "/auth/profile").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let quota = |max_vcpus: Value| {
        let (app, admin, path) = (&app, &admin, format!("/users/{tenant_id}/quota"));
        async move {
            let res = app
                .as_user(admin, Method::PUT, &path)
                .json(
                    &json!({"max_machines": null, "max_vcpus": max_vcpus, "max_memory_mib": null}),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK);
        }
    };
    quota(json!(2)).await;
    let res = post(resize.clone(), json!({"vcpus": 3})).await;
    let body = crate::common::problem(res, StatusCode::FORBIDDEN).await;
    assert!(body["detail"].as_str().unwrap().contains("vCPUs"), "{body}");
    quota(Value::Null).await;

    let overlay = write_to_disk(&host, &id);
    let res = post(
        resize.clone(),
        json!({"vcpus": 2, "memory_mib": 256, "disk_gib": 3}),
    )
    .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(res.json::<Value>().await.unwrap()["status"], "resizing");
    let m = wait("stopped").await;
    assert_eq!(
        (
            m["vcpus"].as_i64(),
            m["memory_mib"].as_i64(),
            m["disk_gib"].as_i64()
        ),
        (Some(2), Some(256), Some(3))
    );
    let xml = host
        .fake
        .domain_xml(&format!("skygate-wf-resizer-{id}"))
        .unwrap();
    assert!(
        xml.contains(">2</vcpu>") && xml.contains(">256</memory>"),
        "{xml}"
    );
    assert_eq!(virtual_size(&overlay), 3 << 30);
    assert!(
        disk_has_the_write(&overlay),
        "a resize keeps the disk's data"
    );
    let profile = app.get_json(&tenant, "/auth/profile").await;
    assert_eq!(profile["quota"]["usage"]["vcpus"], 2, "{profile:#}");
    let hosts = app.get_json(&admin, "/hosts").await;
    assert_eq!(hosts["items"][0]["allocated"]["vcpus"], 2, "{hosts:#}");
    let res = post(resize.clone(), json!({"disk_gib": 2})).await;
    let body = crate::common::problem(res, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(
        body["detail"].as_str().unwrap().contains("only grows"),
        "{body}"
    );
    // A tenant over a lowered limit may still shrink (only what grows is checked).
    quota(json!(1)).await;
    let res = post(resize.clone(), json!({"memory_mib": 192})).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    wait("stopped").await;
    let res = post(resize.clone(), json!({"memory_mib": 256})).await;
    assert_eq!(
        res.status(),
        StatusCode::ACCEPTED,
        "growing memory only: vCPUs are not asked for"
    );
    wait("stopped").await;
    quota(Value::Null).await;

    // Rebuild a running machine: stopped for its fresh disk, running again.
    post(format!("/machines/{id}/start"), json!({})).await;
    wait("running").await;
    for (body, status) in [
        (
            json!({"image": "no-such-image"}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (json!({"image": 7}), StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        let res = post(rebuild.clone(), body).await;
        crate::common::problem(res, status).await;
    }
    let stranger = app.user("stranger").await;
    let res = app
        .as_user(&stranger, Method::POST, &rebuild)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    crate::common::problem(res, StatusCode::NOT_FOUND).await;
    let res = post(rebuild.clone(), json!({})).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(res.json::<Value>().await.unwrap()["status"], "rebuilding");
    let m = wait("running").await;
    assert_eq!(m["vcpus"], 2, "a rebuild keeps the size");
    assert!(!disk_has_the_write(&overlay), "the old disk is gone");
    assert_eq!(virtual_size(&overlay), 3 << 30);

    // A rebuild from an image that does not fit the disk fails at the disk step, leaves the
    // disk as it was, and the failed machine may be rebuilt again from one that fits.
    let big = host.tmp.path().join("big.qcow2");
    assert!(std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&big)
        .arg("8G")
        .status()
        .unwrap()
        .success());
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        std::fs::read(&big).unwrap(),
    ));
    let res = app
        .as_user(&admin, Method::POST, "/images")
        .json(
            &json!({"name": "big", "source": format!("file://{}", big.display()),
            "format": "qcow2", "sha256": digest}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    write_to_disk(&host, &id);
    let res = post(rebuild.clone(), json!({"image": "big"})).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let failed = wait("failed").await;
    let reason = failed["failure_reason"].as_str().unwrap();
    assert!(reason.contains("disk"), "{reason}");
    assert!(
        disk_has_the_write(&overlay),
        "the disk a failed rebuild leaves is the old one"
    );
    let res = post(rebuild.clone(), json!({"image": "fake"})).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let again = wait("running").await;
    assert_eq!(again["failure_reason"], Value::Null);
    assert!(!disk_has_the_write(&overlay));
    let events = app
        .get_json(&tenant, &format!("/machines/{id}/events?limit=200"))
        .await;
    let said: Vec<String> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}: {}",
                e["action"].as_str().unwrap(),
                e["message"].as_str().unwrap()
            )
        })
        .collect();
    for expected in [
        "resize: resize requested: 1 to 2 vCPUs, 128 to 256 MiB of memory, 1 to 3 GiB of disk",
        "resize: resized on host resizer to 2 vCPUs, 256 MiB of memory, 3 GiB of disk; stopped",
        "rebuild: rebuild requested from its image",
        "rebuild: rebuilt on host resizer; running",
    ] {
        assert!(
            said.iter().any(|s| s == expected),
            "{expected:?} not in {said:#?}"
        );
    }
    drop(host);
    app.stop().await;
}

both_stores!(resize_and_rebuild_reach_the_host_and_say_why_when_refused);

/// One server-sent event as a client reads it.
#[derive(Debug, Clone)]
struct Sse {
    event: String,
    id: i64,
    data: Value,
}

/// A client's end of `GET /events`: frames are read as they arrive.
struct EventStream {
    res: reqwest::Response,
    buffer: String,
}

impl EventStream {
    async fn open(
        app: &TestApp,
        who: &crate::common::Session,
        last: Option<&str>,
    ) -> reqwest::Response {
        let mut req = app.client.get(app.url("/events")).bearer_auth(&who.access);
        if let Some(id) = last {
            req = req.header("last-event-id", id);
        }
        req.send().await.unwrap()
    }

    async fn start(app: &TestApp, who: &crate::common::Session, last: Option<&str>) -> EventStream {
        let res = Self::open(app, who, last).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        EventStream {
            res,
            buffer: String::new(),
        }
    }

    /// The next event (keep-alive comments skipped), or `None` if none comes within `limit`.
    async fn next(&mut self, limit: Duration) -> Option<Sse> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = (String::new(), None, String::new());
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if let Some(id) = id {
                    return Some(Sse {
                        event,
                        id,
                        data: serde_json::from_str(&data).unwrap(),
                    });
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.res.chunk())
                .await
                .ok()?;
            let chunk = chunk.unwrap().expect("the stream ended");
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Events until one matches `done` (that one included), each within `limit`.
    async fn until(&mut self, limit: Duration, done: impl Fn(&Sse) -> bool) -> Vec<Sse> {
        let mut seen = Vec::new();
        loop {
            let e = self
                .next(limit)
                .await
                .unwrap_or_else(|| panic!("no further event within {limit:?}; so far {seen:#?}"));
            let last = done(&e);
            seen.push(e);
            if last {
                return seen;
            }
        }
    }
}

/// Issue 15, the event stream: a tenant sees its own machines' events as they happen (never
/// another's; an administrator sees all), in order, resumes after the last one it saw with
/// `Last-Event-ID`, is told when it asks for an event that was never written, and a reader
/// that did not read for a while still gets every event, none skipped.
async fn the_event_stream_shows_each_tenant_its_own_events_resumably_and_skips_none(
    backend: Backend,
) {
    let app = TestApp::spawn_provisioning(backend, config()).await;
    let host = FakeHost::start(app.grpc.unwrap(), "streamer", 64).await;
    let (admin, tenant) = ready_with_image(&app, &host, "streamer").await;
    let other = app.user("other-tenant").await;
    let mut mine = EventStream::start(&app, &tenant, None).await;
    let mut all = EventStream::start(&app, &admin, None).await;
    let id = create(&app, &tenant, "s1").await;
    let theirs = create(&app, &other, "s2").await;
    let short = Duration::from_secs(30);
    let is_running = |id: &str| {
        let id = id.to_owned();
        move |e: &Sse| e.data["machine_id"] == id.as_str() && e.data["status"] == "running"
    };
    let seen = mine.until(short, is_running(&id)).await;
    assert!(
        seen.iter()
            .all(|e| e.event == "machine" && e.data["machine_id"] == id.as_str()),
        "{seen:#?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0].id < w[1].id),
        "in order: {seen:#?}"
    );
    assert!(seen.iter().all(|e| e.id == e.data["position"]), "{seen:#?}");
    assert_eq!(seen[0].data["hostname"], "s1");
    assert_eq!(
        seen[0].data["message"],
        "machine requested; waiting for a host"
    );
    // Every event of the machine's own log, in the same order.
    let log = app
        .get_json(&tenant, &format!("/machines/{id}/events?limit=200"))
        .await;
    let logged: Vec<&Value> = log["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["message"])
        .collect();
    let streamed: Vec<&Value> = seen.iter().map(|e| &e.data["message"]).collect();
    assert_eq!(streamed, logged[..streamed.len()].to_vec());
    // The administrator's stream carries both tenants' machines.
    let admin_seen = all.until(short, is_running(&theirs)).await;
    assert!(admin_seen
        .iter()
        .any(|e| e.data["machine_id"] == id.as_str()));
    // The tenant's never showed the other machine, even once it ran.
    let res = app
        .as_user(&tenant, Method::POST, &format!("/machines/{id}/stop"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let stopped = mine.until(short, |e| e.data["status"] == "stopped").await;
    assert!(
        stopped.iter().all(|e| e.data["machine_id"] == id.as_str()),
        "{stopped:#?}"
    );
    drop(mine);

    // Resumed after the first event: the same events follow, from the second on.
    let first = seen[0].id.to_string();
    let mut resumed = EventStream::start(&app, &tenant, Some(&first)).await;
    let again = resumed.until(short, is_running(&id)).await;
    let ids = |v: &[Sse]| v.iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(ids(&again), ids(&seen[1..]));
    drop(resumed);

    // An id never written: told so, and where the stream goes on from.
    let mut lost = EventStream::start(&app, &tenant, Some("999999999")).await;
    let told = lost.next(short).await.unwrap();
    assert_eq!(told.event, "lost", "{told:?}");
    assert_eq!(told.data["last_event_id"], 999_999_999);
    assert!(
        told.id < 999_999_999 && told.data["resume_from"] == told.id,
        "{told:?}"
    );
    drop(lost);
    for bad in ["-3", "soon"] {
        let res = EventStream::open(&app, &tenant, Some(bad)).await;
        crate::common::problem(res, StatusCode::BAD_REQUEST).await;
    }
    let res = app.client.get(app.url("/events")).send().await.unwrap();
    crate::common::problem(res, StatusCode::UNAUTHORIZED).await;

    // A reader that reads nothing while 30 machines are made (more events than the server
    // reads at once) loses nothing: what it then reads is every event of theirs, as each
    // machine's log has it.
    let mut slow = EventStream::start(&app, &other, None).await;
    let mut made = Vec::new();
    for i in 0..30 {
        made.push(create(&app, &other, &format!("slow-{i}")).await);
    }
    for m in &made {
        wait_for("each machine to run", async || {
            is(
                app.get_json(&other, &format!("/machines/{m}")).await["status"].clone(),
                "running",
            )
        })
        .await;
    }
    let mut expected = Vec::new();
    for m in &made {
        let log = app
            .get_json(&other, &format!("/machines/{m}/events?limit=200"))
            .await;
        for e in log["items"].as_array().unwrap() {
            expected.push((m.clone(), e["message"].as_str().unwrap().to_owned()));
        }
    }
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let e = slow
            .next(short)
            .await
            .unwrap_or_else(|| panic!("{} of {} events came: {got:#?}", got.len(), expected.len()));
        got.push((
            e.data["machine_id"].as_str().unwrap().to_owned(),
            e.data["message"].as_str().unwrap().to_owned(),
        ));
    }
    let sorted = |mut v: Vec<(String, String)>| {
        v.sort();
        v
    };
    assert_eq!(sorted(got), sorted(expected));

    // At most 16 waits and streams per account on a server.
    let mut open = Vec::new();
    for _ in 0..15 {
        open.push(EventStream::start(&app, &other, None).await);
    }
    let res = EventStream::open(&app, &other, None).await;
    let body = crate::common::problem(res, StatusCode::TOO_MANY_REQUESTS).await;
    assert!(body["detail"].as_str().unwrap().contains("16"), "{body}");
    let res = app
        .as_user(
            &other,
            Method::GET,
            &format!("/machines/{theirs}/wait?status=running"),
        )
        .send()
        .await
        .unwrap();
    crate::common::problem(res, StatusCode::TOO_MANY_REQUESTS).await;
    drop(slow);
    // The closed one's place is free again (the server notices the close when it next
    // writes to it: at once here, as a keep-alive or event would otherwise).
    wait_for("a closed stream to free its place", async || {
        let res = EventStream::open(&app, &other, None).await;
        if res.status() == StatusCode::OK {
            Ok(())
        } else {
            Err(format!("{}", res.status()))
        }
    })
    .await;
    drop(host);
    app.stop().await;
}

both_stores!(the_event_stream_shows_each_tenant_its_own_events_resumably_and_skips_none);

/// Issue 15 on PostgreSQL: an event whose transaction commits after a later-numbered one is
/// still streamed (events go in commit order; an identity number taken earlier but committed
/// later was the case a stream could skip).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_late_is_still_streamed_on_postgres() {
    use sqlx::Connection;
    let app = TestApp::spawn_provisioning(Backend::Postgres, config()).await;
    let (host, admin, tenant) = cluster_with_image(&app, "late").await;
    let (quiet, busy) = (
        create(&app, &tenant, "late-1").await,
        create(&app, &tenant, "late-2").await,
    );
    for id in [&quiet, &busy] {
        wait_for("it to run", async || {
            is(
                app.get_json(&tenant, &format!("/machines/{id}")).await["status"].clone(),
                "running",
            )
        })
        .await;
    }
    let mut stream = EventStream::start(&app, &admin, None).await;
    // A transaction takes its event number now and commits last (on the other machine: it
    // holds a key-share lock on its machine's row, which a worker's step would wait for).
    let mut slow = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut slow).await.unwrap();
    sqlx::query(
        "INSERT INTO machine_events (machine_id, action, status, message, created_at) \
         VALUES ($1, 'note', 'running', 'written first, committed last', 0)",
    )
    .bind(&quiet)
    .execute(&mut slow)
    .await
    .unwrap();
    let res = app
        .as_user(&tenant, Method::POST, &format!("/machines/{busy}/stop"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let short = Duration::from_secs(30);
    let before = stream.until(short, |e| e.data["status"] == "stopped").await;
    assert!(
        before.iter().all(|e| e.data["machine_id"] == busy.as_str()),
        "{before:#?}"
    );
    sqlx::query("COMMIT").execute(&mut slow).await.unwrap();
    let late = stream
        .until(short, |e| {
            e.data["message"] == "written first, committed last"
        })
        .await;
    assert_eq!(late.len(), 1, "{late:#?}");
    assert!(late[0].id > before.last().unwrap().id, "{late:#?}");
    drop(stream);
    drop(host);
    app.stop().await;
}

/// The messages of machine `id`'s log, oldest first.
async fn messages(app: &TestApp, who: &crate::common::Session, id: &str) -> Vec<String> {
    app.get_json(who, &format!("/machines/{id}/events?limit=200"))
        .await["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_owned())
        .collect()
}

/// The host named `name` as `admin` sees it (null before it registered).
async fn host_named(app: &TestApp, admin: &crate::common::Session, name: &str) -> Value {
    app.get_json(admin, "/hosts").await["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Issue 14, evacuate: a host's machines move to another host with their disks (a running one
/// runs again there, a stopped one stays stopped), the source is left empty and cordoned, the
/// books follow; a move whose target keeps failing is undone and the machine stays whole on
/// its host.
async fn evacuating_a_host_moves_its_machines_with_their_disks_or_leaves_them_whole(
    backend: Backend,
) {
    let app = TestApp::spawn_provisioning(backend, config()).await;
    let a = FakeHost::start(app.grpc.unwrap(), "evac-a", 8).await;
    let (admin, tenant) = ready_with_image(&app, &a, "evac-a").await;
    let b = FakeHost::start(app.grpc.unwrap(), "evac-b", 8).await;
    wait_for("evac-b to register", async || {
        is(
            host_named(&app, &admin, "evac-b").await["state"].clone(),
            "ready",
        )
    })
    .await;
    let host_id = |name: &'static str| {
        let (app, admin) = (&app, &admin);
        async move {
            host_named(app, admin, name).await["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let (a_id, b_id) = (host_id("evac-a").await, host_id("evac-b").await);
    let admin_post = |path: String| {
        let (app, admin) = (&app, &admin);
        async move {
            app.as_user(admin, Method::POST, &path)
                .send()
                .await
                .unwrap()
        }
    };
    // Everything on a first.
    admin_post(format!("/hosts/{b_id}/cordon")).await;
    let running = create(&app, &tenant, "mover-1").await;
    let stopped = create(&app, &tenant, "mover-2").await;
    let status = |id: &str, want: &'static str| {
        let (app, tenant, path) = (&app, &tenant, format!("/machines/{id}"));
        async move {
            wait_for(&format!("{path} to be {want}"), async || {
                is(app.get_json(tenant, &path).await["status"].clone(), want)
            })
            .await;
            app.get_json(tenant, &path).await
        }
    };
    status(&running, "running").await;
    status(&stopped, "running").await;
    let res = app
        .as_user(&tenant, Method::POST, &format!("/machines/{stopped}/stop"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    status(&stopped, "stopped").await;
    let overlays_a: Vec<_> = [&running, &stopped]
        .into_iter()
        .map(|id| write_to_disk(&a, id))
        .collect();
    admin_post(format!("/hosts/{b_id}/uncordon")).await;

    // Tenants may not evacuate.
    let res = app
        .as_user(&tenant, Method::POST, &format!("/hosts/{a_id}/evacuate"))
        .send()
        .await
        .unwrap();
    crate::common::problem(res, StatusCode::FORBIDDEN).await;
    let res = admin_post(format!("/hosts/{a_id}/evacuate")).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let h: Value = res.json().await.unwrap();
    assert_eq!(h["cordoned"], true);
    assert_eq!(h["evacuation"]["machines_left"], 2, "{h:#}");
    wait_for("evac-a to be empty", async || {
        let h = app.get_json(&admin, &format!("/hosts/{a_id}")).await;
        is(h["evacuation"]["machines_left"].clone(), 0)
    })
    .await;
    let m = status(&running, "running").await;
    assert_eq!(m["host"], "evac-b");
    let m = status(&stopped, "stopped").await;
    assert_eq!(m["host"], "evac-b");
    // The source's copy is removed right after each move is recorded.
    for id in [&running, &stopped] {
        wait_for("the source's copy to be removed", async || {
            let said = messages(&app, &tenant, id).await;
            is(said.iter().any(|m| m == "removed from host evac-a"), true)
        })
        .await;
    }
    for (id, on_a) in [&running, &stopped].into_iter().zip(&overlays_a) {
        let data = DataDir::new(b.tmp.path().join("data")).unwrap();
        assert!(
            disk_has_the_write(&data.overlay(id.parse().unwrap())),
            "{id}'s disk moved"
        );
        assert!(!on_a.exists(), "nothing of {id} left on evac-a");
        let said = messages(&app, &tenant, id).await;
        for step in [
            "move requested: host evac-a is being evacuated",
            "moving to host evac-b",
            "copying its disk from host evac-a to host evac-b",
            "released on host evac-a (its disk stays there until the move is done)",
            "removed from host evac-a",
        ] {
            assert!(said.iter().any(|s| s == step), "{step:?} not in {said:#?}");
        }
        assert!(
            said.iter()
                .any(|s| s.starts_with("moved from host evac-a to host evac-b")),
            "{said:#?}"
        );
    }
    assert_eq!(a.machine_dirs(), 0);
    assert!(a.fake.domain_names().is_empty());
    assert_eq!(
        host_named(&app, &admin, "evac-a").await["allocated"]["vcpus"],
        0
    );
    assert_eq!(
        host_named(&app, &admin, "evac-b").await["allocated"]["vcpus"],
        2
    );

    // Back to a, whose hypervisor now refuses every definition: each move is undone, the
    // machine stays whole on b as it was, and a keeps nothing of it.
    admin_post(format!("/hosts/{a_id}/uncordon")).await;
    a.fake.fail_next(HypervisorOp::Define, 1000);
    let res = admin_post(format!("/hosts/{b_id}/evacuate")).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    wait_for_at_most(
        "the moves to be undone",
        Duration::from_secs(90),
        async || {
            let h = app.get_json(&admin, &format!("/hosts/{b_id}")).await;
            is(h["evacuation"]["moving"].clone(), 0)
        },
    )
    .await;
    let m = status(&running, "running").await;
    assert_eq!(m["host"], "evac-b");
    let m = status(&stopped, "stopped").await;
    assert_eq!(m["host"], "evac-b");
    // Stopped and released on b for its copy, then undone: defined and running there again.
    let said = messages(&app, &tenant, &running).await;
    let last = said.last().unwrap();
    assert!(
        last.starts_with("move failed: ") && last.ends_with("; the machine stays on host evac-b"),
        "{said:#?}"
    );
    assert!(last.contains("define"), "the failed step is named: {last}");
    let data = DataDir::new(b.tmp.path().join("data")).unwrap();
    assert!(disk_has_the_write(&data.overlay(running.parse().unwrap())));
    // Removed right after each undo is recorded.
    wait_for("the undone copies to be removed", async || {
        is(a.machine_dirs(), 0)
    })
    .await;
    assert_eq!(
        host_named(&app, &admin, "evac-a").await["allocated"]["vcpus"],
        0
    );
    assert_eq!(
        host_named(&app, &admin, "evac-b").await["allocated"]["vcpus"],
        2
    );
    let h = app.get_json(&admin, &format!("/hosts/{b_id}")).await;
    assert_eq!(h["evacuation"]["machines_left"], 2, "{h:#}");
    drop((a, b));
    app.stop().await;
}

both_stores!(evacuating_a_host_moves_its_machines_with_their_disks_or_leaves_them_whole);
