//! The HostAgent gRPC surface as a caller sees it, served in-process by `server::serve` on
//! 127.0.0.1 over the fake hypervisor (with the real qemu-img, genisoimage and image cache on
//! a temporary data directory): bearer authentication, the unauthenticated grpc.health.v1
//! service, EnsureMachine/StartMachine/GetConsole/DeleteMachine results and status codes, resumable
//! WatchEvents, and TLS and mutual TLS with certificates made by rcgen.

// clippy.toml's allow-unwrap/expect-in-tests covers #[test] functions only, not the helpers
// of an integration-test crate; a panic in them is the assertion too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use host_agent::disks::QemuImg;
use host_agent::domain_xml::HypervisorKind;
use host_agent::events::EventLog;
use host_agent::hypervisor::FakeHypervisor;
use host_agent::identity::Credentials;
use host_agent::images::{ImageCache, SourcePolicy};
use host_agent::machines::{MachineManager, ManagerConfig, NetworkMode};
use host_agent::paths::DataDir;
use host_agent::server::{serve, StartError, TlsFiles};
use host_agent::service::{HostAgentService, HostIdentity};
use proto::agent::v1 as pb;
use proto::agent::v1::host_agent_client::HostAgentClient;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use uuid::Uuid;

const TOKEN: &str = "grpc-test-token";
const PREFIX: &str = "skygate-grpc-";
/// Bounds every connect, call and stream read, so a regression fails instead of hanging.
const WAIT: Duration = Duration::from_secs(10);

/// Adds `authorization: <value>` to every call.
#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    fn token(token: &str) -> Self {
        Bearer(format!("Bearer {token}").parse().unwrap())
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Client = HostAgentClient<InterceptedService<Channel, Bearer>>;

/// An agent served in-process until [`Agent::stop`].
struct Agent {
    addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), StartError>>,
    kernel_url: String,
    kernel_sha256: String,
    _tmp: tempfile::TempDir,
}

impl Agent {
    /// Serves a fresh manager (fake hypervisor, empty data directory) on 127.0.0.1:0.
    async fn start(tls: Option<TlsFiles>) -> Agent {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::new(tmp.path().join("data")).unwrap();
        data.prepare().unwrap();
        let kernel = b"not really a kernel";
        let kernel_path = tmp.path().join("vmlinuz");
        std::fs::write(&kernel_path, kernel).unwrap();
        let events = Arc::new(EventLog::new(64));
        let manager = Arc::new(MachineManager::new(
            Arc::new(FakeHypervisor::new()),
            Arc::new(QemuImg::new()),
            ImageCache::new(
                data.clone(),
                SourcePolicy::with_file_dirs(&[tmp.path().to_path_buf()]).unwrap(),
            )
            .unwrap(),
            data,
            ManagerConfig {
                domain_prefix: PREFIX.into(),
                hypervisor_kind: HypervisorKind::Qemu,
                network: NetworkMode::User {
                    address: std::net::Ipv4Addr::LOCALHOST,
                    ports: "21000-21999".parse().unwrap(),
                },
                graceful_timeout: Duration::from_secs(5),
                pause_before: None,
            },
            Arc::clone(&events),
        ));
        let service = HostAgentService::new(
            manager,
            events,
            HostIdentity {
                name: "grpc-test-host".into(),
                hypervisor: HypervisorKind::Qemu,
                capacity: pb::Capacity {
                    vcpus: 16,
                    memory_mib: 8192,
                    disk_gib: 100,
                },
            },
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let stop = async {
                let _ = stop.await;
            };
            serve(
                listener,
                service,
                Credentials::new(TOKEN, None),
                tls.as_ref(),
                stop,
            )
            .await
        });
        Agent {
            addr,
            shutdown,
            task,
            kernel_url: format!("file://{}", kernel_path.display()),
            kernel_sha256: hex::encode(Sha256::digest(kernel)),
            _tmp: tmp,
        }
    }

    /// Triggers the shutdown and checks that serving ended cleanly. Drop clients first: the
    /// server drains open connections before it returns.
    async fn stop(self) {
        self.shutdown.send(()).unwrap();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("server did not shut down")
            .unwrap()
            .unwrap();
    }

    fn endpoint(&self, scheme: &str) -> Endpoint {
        Endpoint::from_shared(format!("{scheme}://{}", self.addr))
            .unwrap()
            .connect_timeout(WAIT)
            .timeout(WAIT)
    }

    async fn channel(&self) -> Channel {
        self.endpoint("http").connect().await.unwrap()
    }

    /// A plaintext client presenting the right token.
    async fn client(&self) -> Client {
        HostAgentClient::with_interceptor(self.channel().await, Bearer::token(TOKEN))
    }

    /// A kernel-boot spec for `id` that the fake hypervisor and real tools accept.
    fn spec(&self, id: &str, generation: u64) -> pb::MachineSpec {
        pb::MachineSpec {
            machine_id: id.into(),
            generation,
            hostname: "grpc-1".into(),
            vcpus: 1,
            memory_mib: 128,
            disk_gib: 1,
            image: Some(pb::ImageSource {
                name: "kernel".into(),
                url: String::new(),
                format: pb::DiskFormat::Kernel as i32,
                sha256: String::new(),
                kernel_boot: Some(pb::KernelBoot {
                    kernel_url: self.kernel_url.clone(),
                    kernel_sha256: self.kernel_sha256.clone(),
                    initrd_url: String::new(),
                    initrd_sha256: String::new(),
                    cmdline: "console=ttyS0".into(),
                }),
            }),
            ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ7 test".into()],
            user_data: None,
            desired_power: pb::PowerState::Running as i32,
            disk_generation: 0,
            disk_must_exist: false,
        }
    }
}

fn ensure(spec: pb::MachineSpec) -> pb::EnsureMachineRequest {
    pb::EnsureMachineRequest { spec: Some(spec) }
}

fn machine_ref(id: &str) -> pb::MachineRef {
    pb::MachineRef {
        machine_id: id.into(),
    }
}

/// The `skygate-reason` of a refusal, if it has one.
fn reason(status: &tonic::Status) -> Option<&str> {
    status
        .metadata()
        .get(proto::REASON_METADATA)
        .and_then(|v| v.to_str().ok())
}

fn phase(raw: i32) -> pb::MachinePhase {
    pb::MachinePhase::try_from(raw).unwrap_or(pb::MachinePhase::Unspecified)
}

/// The error of a call expected to fail.
fn refused<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> tonic::Status {
    result.expect_err("the call should have been refused")
}

#[tokio::test]
async fn calls_without_or_with_a_wrong_bearer_token_are_unauthenticated_and_the_right_one_is_served(
) {
    let agent = Agent::start(None).await;

    let mut anonymous = HostAgentClient::new(agent.channel().await);
    let status = refused(anonymous.list_machines(pb::ListMachinesRequest {}).await);
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    let mut wrong = HostAgentClient::with_interceptor(agent.channel().await, Bearer::token("nope"));
    let status = refused(wrong.list_machines(pb::ListMachinesRequest {}).await);
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // The token alone, without the scheme, is not accepted either.
    let bare = Bearer(TOKEN.parse().unwrap());
    let mut unprefixed = HostAgentClient::with_interceptor(agent.channel().await, bare);
    let status = refused(unprefixed.list_machines(pb::ListMachinesRequest {}).await);
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    let mut client = agent.client().await;
    let listed = client
        .list_machines(pb::ListMachinesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.machines.is_empty(), "{listed:?}");
    let info = client
        .get_host_info(pb::GetHostInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "grpc-test-host");
    assert_eq!(info.domain_prefix, PREFIX);
    assert_eq!(info.machine_count, 0);

    drop((anonymous, wrong, unprefixed, client));
    agent.stop().await;
}

#[tokio::test]
async fn health_check_reports_serving_for_the_server_and_the_host_agent_without_a_token() {
    let agent = Agent::start(None).await;
    let mut health = HealthClient::new(agent.channel().await);
    for service in ["", "skygate.agent.v1.HostAgent"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("health check of {service:?}: {s:?}"))
            .into_inner();
        assert_eq!(
            response.status,
            ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }
    let status = refused(
        health
            .check(HealthCheckRequest {
                service: "no.such.Service".into(),
            })
            .await,
    );
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    drop(health);
    agent.stop().await;
}

#[tokio::test]
async fn ensure_machine_boots_a_kernel_spec_with_an_ssh_forward_and_repeating_it_returns_the_same_state(
) {
    let agent = Agent::start(None).await;
    let mut client = agent.client().await;
    let id = Uuid::new_v4().to_string();

    let state = client
        .ensure_machine(ensure(agent.spec(&id, 1)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(phase(state.phase), pb::MachinePhase::Running, "{state:?}");
    assert_eq!(state.machine_id, id);
    assert_eq!(state.generation, 1);
    assert_eq!(state.domain_name, format!("{PREFIX}{id}"));
    let network = state.network.clone().expect("network");
    assert_eq!(network.ports.len(), 1, "{network:?}");
    let port = &network.ports[0];
    assert_eq!(
        (port.guest_port, port.host_ip.as_str(), port.proto.as_str()),
        (22, "127.0.0.1", "tcp")
    );
    assert!((21000..=21999).contains(&port.host_port), "{port:?}");
    assert_eq!(network.addresses, ["127.0.0.1"]);

    let again = client
        .ensure_machine(ensure(agent.spec(&id, 1)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, state);

    let fetched = client
        .get_machine(machine_ref(&id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched, state);
    let listed = client
        .list_machines(pb::ListMachinesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.machines, [state]);

    drop(client);
    agent.stop().await;
}

#[tokio::test]
async fn ensure_machine_refuses_a_zero_generation_a_non_uuid_id_or_a_missing_spec_naming_the_field()
{
    let agent = Agent::start(None).await;
    let mut client = agent.client().await;
    let id = Uuid::new_v4().to_string();

    let cases = [
        ("generation", ensure(agent.spec(&id, 0))),
        ("machine_id", ensure(agent.spec("not-a-uuid", 1))),
        ("spec", pb::EnsureMachineRequest { spec: None }),
    ];
    for (field, request) in cases {
        let status = refused(client.ensure_machine(request).await);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().contains(field),
            "the message should name {field}: {:?}",
            status.message()
        );
    }
    // Nothing was built by the refused requests.
    let listed = client
        .list_machines(pb::ListMachinesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.machines.is_empty(), "{listed:?}");

    drop(client);
    agent.stop().await;
}

#[tokio::test]
async fn ensure_machine_with_an_older_generation_than_the_applied_one_is_a_failed_precondition() {
    let agent = Agent::start(None).await;
    let mut client = agent.client().await;
    let id = Uuid::new_v4().to_string();

    client
        .ensure_machine(ensure(agent.spec(&id, 1)))
        .await
        .unwrap();
    let second = client
        .ensure_machine(ensure(agent.spec(&id, 2)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.generation, 2);

    let status = refused(client.ensure_machine(ensure(agent.spec(&id, 1))).await);
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        reason(&status),
        Some(proto::reason::STALE_GENERATION),
        "{status:?}"
    );
    let still = client
        .get_machine(machine_ref(&id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.generation, 2);

    drop(client);
    agent.stop().await;
}

#[tokio::test]
async fn unknown_machines_are_not_found_and_delete_machine_reports_whether_it_existed() {
    let agent = Agent::start(None).await;
    let mut client = agent.client().await;
    let unknown = Uuid::new_v4().to_string();

    let status = refused(client.start_machine(machine_ref(&unknown)).await);
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(
        reason(&status),
        Some(proto::reason::MACHINE_NOT_FOUND),
        "{status:?}"
    );
    let status = refused(
        client
            .get_console(pb::GetConsoleRequest {
                machine_id: unknown.clone(),
                max_bytes: 0,
            })
            .await,
    );
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = refused(client.start_machine(machine_ref("not-a-uuid")).await);
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    let id = Uuid::new_v4().to_string();
    client
        .ensure_machine(ensure(agent.spec(&id, 1)))
        .await
        .unwrap();
    let deleted = client
        .delete_machine(machine_ref(&id))
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.existed);
    let again = client
        .delete_machine(machine_ref(&id))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.existed);
    let gone = client
        .get_machine(machine_ref(&id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(phase(gone.phase), pb::MachinePhase::Absent, "{gone:?}");

    drop(client);
    agent.stop().await;
}

/// The next event of `stream`, failing on an error, the end of the stream or a timeout.
async fn next_event(stream: &mut tonic::Streaming<pb::MachineEvent>) -> pb::MachineEvent {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("no event within the wait")
        .expect("the event stream failed")
        .expect("the event stream ended")
}

#[tokio::test]
async fn watch_events_streams_phase_changes_in_sequence_and_resumes_after_a_given_sequence() {
    let agent = Agent::start(None).await;
    let mut client = agent.client().await;
    let id = Uuid::new_v4().to_string();

    let mut stream = client
        .watch_events(pb::WatchEventsRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    client
        .ensure_machine(ensure(agent.spec(&id, 1)))
        .await
        .unwrap();

    let defined = next_event(&mut stream).await;
    assert_eq!(defined.machine_id, id);
    assert_eq!(
        phase(defined.phase),
        pb::MachinePhase::Stopped,
        "{defined:?}"
    );
    assert!(defined.reason.starts_with("defined"), "{defined:?}");
    assert!(defined.sequence >= 1);
    assert!(defined.at_unix_ms > 0);
    let started = next_event(&mut stream).await;
    assert_eq!(started.machine_id, id);
    assert_eq!(
        phase(started.phase),
        pb::MachinePhase::Running,
        "{started:?}"
    );
    assert_eq!(started.sequence, defined.sequence + 1);

    // A client reconnecting after the first event gets the second one from the backlog ...
    let mut resumed = client
        .watch_events(pb::WatchEventsRequest {
            after_sequence: defined.sequence,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_event(&mut resumed).await, started);

    // ... and then follows live without repeating it; so does the first stream.
    client
        .stop_machine(pb::StopMachineRequest {
            machine_id: id.clone(),
            graceful_timeout_secs: 0,
        })
        .await
        .unwrap();
    let stopped = next_event(&mut resumed).await;
    assert_eq!(
        phase(stopped.phase),
        pb::MachinePhase::Stopped,
        "{stopped:?}"
    );
    assert_eq!(stopped.sequence, started.sequence + 1);
    assert_eq!(next_event(&mut stream).await, stopped);

    // A sequence this agent never issued (a control plane that watched an earlier run of
    // it) is refused rather than followed by silence.
    let ahead = client
        .watch_events(pb::WatchEventsRequest {
            after_sequence: stopped.sequence + 100,
        })
        .await
        .expect_err("a sequence from the future");
    assert_eq!(ahead.code(), Code::OutOfRange, "{ahead:?}");
    assert!(ahead.message().contains("watch from 0"), "{ahead:?}");

    drop((stream, resumed, client));
    agent.stop().await;
}

/// A CA, server and client certificates in PEM, and the server's files in a temporary
/// directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: String,
    client_cert: String,
    client_key: String,
    /// A client certificate from a CA the server does not trust.
    rogue_cert: String,
    rogue_key: String,
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A leaf certificate for `names`, signed by `ca`: (certificate PEM, key PEM).
fn leaf(
    ca: &Issuer<'_, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, pem: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca("SkyGate test CA");
        let (server_cert, server_key) = leaf(
            &ca,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) =
            leaf(&ca, &["control-plane"], ExtendedKeyUsagePurpose::ClientAuth);
        let rogue_ca = new_ca("Rogue CA");
        let (rogue_cert, rogue_key) = leaf(
            &rogue_ca,
            &["control-plane"],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        write(dir.path(), "ca.pem", &ca.pem());
        write(dir.path(), "server.pem", &server_cert);
        write(dir.path(), "server.key", &server_key);
        Pki {
            dir,
            ca: ca.pem(),
            client_cert,
            client_key,
            rogue_cert,
            rogue_key,
        }
    }

    /// The server's files; `mutual` makes it require client certificates from the CA.
    fn server_files(&self, mutual: bool) -> TlsFiles {
        TlsFiles {
            cert: self.dir.path().join("server.pem"),
            key: self.dir.path().join("server.key"),
            client_ca: mutual.then(|| self.dir.path().join("ca.pem")),
        }
    }

    /// Client TLS trusting the test CA, verifying the server as "localhost".
    fn client_tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .domain_name("localhost")
    }
}

/// Connects `endpoint` and calls ListMachines presenting `token`; any failure, of the connection or
/// of the call, is the error.
async fn list_machines_over(
    endpoint: Endpoint,
    token: &str,
) -> Result<pb::ListMachinesResponse, String> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut client = HostAgentClient::with_interceptor(channel, Bearer::token(token));
    client
        .list_machines(pb::ListMachinesRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| format!("call: {s:?}"))
}

/// Like [`list_machines_over`] with the right token, for attempts the transport must refuse: the
/// refusal must come from the connection (with the TLS `alert` the server sent, if given), not
/// from the token check.
async fn assert_transport_refuses(endpoint: Endpoint, what: &str, alert: Option<&str>) {
    match list_machines_over(endpoint, TOKEN).await {
        Ok(r) => panic!("{what}: expected a refusal, got {r:?}"),
        Err(e) => {
            assert!(!e.contains("Unauthenticated"), "{what}: {e}");
            if let Some(alert) = alert {
                assert!(e.contains(alert), "{what}: expected alert {alert}: {e}");
            }
        }
    }
}

#[tokio::test]
async fn tls_server_serves_clients_trusting_its_ca_and_refuses_plaintext_still_requiring_the_token()
{
    let pki = Pki::new();
    let agent = Agent::start(Some(pki.server_files(false))).await;
    let https = || {
        agent
            .endpoint("https")
            .tls_config(pki.client_tls())
            .unwrap()
    };

    let listed = list_machines_over(https(), TOKEN).await.unwrap();
    assert!(listed.machines.is_empty());
    let err = list_machines_over(https(), "nope").await.unwrap_err();
    assert!(err.contains("Unauthenticated"), "{err}");

    assert_transport_refuses(agent.endpoint("http"), "plaintext client", None).await;

    agent.stop().await;
}

#[tokio::test]
async fn mutual_tls_server_serves_only_clients_with_a_certificate_from_its_ca() {
    let pki = Pki::new();
    let agent = Agent::start(Some(pki.server_files(true))).await;
    let with_tls = |tls: ClientTlsConfig| agent.endpoint("https").tls_config(tls).unwrap();
    let trusted = || {
        with_tls(
            pki.client_tls()
                .identity(Identity::from_pem(&pki.client_cert, &pki.client_key)),
        )
    };

    let listed = list_machines_over(trusted(), TOKEN).await.unwrap();
    assert!(listed.machines.is_empty());
    let err = list_machines_over(trusted(), "nope").await.unwrap_err();
    assert!(err.contains("Unauthenticated"), "{err}");

    assert_transport_refuses(
        with_tls(pki.client_tls()),
        "client without a certificate",
        Some("CertificateRequired"),
    )
    .await;
    assert_transport_refuses(
        with_tls(
            pki.client_tls()
                .identity(Identity::from_pem(&pki.rogue_cert, &pki.rogue_key)),
        ),
        "client with a certificate from another CA",
        Some("UnknownCA"),
    )
    .await;
    assert_transport_refuses(agent.endpoint("http"), "plaintext client", None).await;

    agent.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_watch_streams_instead_of_waiting_for_them() {
    let agent = Agent::start(None).await;
    let mut client = agent.client().await;
    let mut stream = client
        .watch_events(pb::WatchEventsRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    // The client and its stream stay open: a control plane watching forever.
    let started = std::time::Instant::now();
    agent.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let end = tokio::time::timeout(WAIT, stream.message()).await.unwrap();
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    drop(client);
}
