//! Start-up and serving: check flags and environment (preflight.rs), connect libvirt, choose
//! the accelerator, sweep leftovers, start the poller, then serve HostAgent (bearer-authenticated) and grpc.health.v1 over TCP, with TLS
//! or mutual TLS when certificate files are configured.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proto::agent::v1::host_agent_server::HostAgentServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

pub use crate::config::TlsFiles;

use crate::config::AgentArgs;
use crate::disks::QemuImg;
use crate::events::{EventLog, DEFAULT_RETAINED};
use crate::hypervisor::{blocking, Hypervisor};
use crate::identity::Credentials;
use crate::images::ImageCache;
use crate::machines::{MachineManager, ManagerConfig};
use crate::preflight;
use crate::probe::{choose_hypervisor, AcceleratorProbe};
use crate::registration::{self, CapacityPolicy, Registration};
use crate::service::{hypervisor_to_wire, HostAgentService, HostIdentity};

/// Largest request the agent decodes (a spec with user data is well under this).
const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Why the agent could not start or stopped serving. Messages never repeat their source's
/// text; main.rs prints the chain as one line ([`crate::preflight::error_line`]).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A flag or the environment failed a start-up check.
    #[error(transparent)]
    Preflight(#[from] preflight::PreflightError),
    /// No accelerator fits `--hypervisor` on this host.
    #[error(transparent)]
    Accelerator(#[from] crate::probe::ProbeError),
    /// A certificate or key file could not be read.
    #[error("reading {}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// libvirt did not tell the host's facts (which the accelerator is chosen from).
    #[error("reading host facts from libvirt")]
    HostFacts(#[source] crate::hypervisor::HypervisorError),
    /// The image cache could not be set up.
    #[error("setting up the image cache")]
    ImageCache(#[source] crate::images::ImageError),
    /// Reading the host or taking stock of its domains failed.
    #[error("taking stock of the host")]
    Inventory(#[from] crate::machines::ManagerError),
    /// The listener or the transport failed.
    #[error("serving gRPC")]
    Transport(#[from] tonic::transport::Error),
    /// Binding the listen address failed.
    #[error("listening on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl StartError {
    /// The process exit code: 2 when the configuration or the host is unfit (fix something,
    /// then start again; like clap's code for a bad command line), 1 for anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Preflight(_) | StartError::Accelerator(_) => 2,
            _ => 1,
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, StartError> {
    std::fs::read(path).map_err(|source| StartError::ReadFile {
        path: path.to_path_buf(),
        source,
    })
}

/// How long in-flight calls may finish after a shutdown signal before the server stops
/// waiting for them.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves `service` on `listener` until `shutdown` completes, then ends watch streams and
/// lets other calls finish for up to [`DRAIN`].
pub async fn serve(
    listener: TcpListener,
    service: HostAgentService,
    credentials: Credentials,
    tls: Option<&TlsFiles>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let (down_tx, down_rx) = tokio::sync::watch::channel(false);
    let service = service.with_shutdown(down_rx.clone());
    let mut builder = Server::builder().timeout(Duration::from_secs(3600));
    if let Some(tls) = tls {
        let mut config =
            ServerTlsConfig::new().identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
        if let Some(ca) = &tls.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        builder = builder.tls_config(config)?;
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<HostAgentServer<HostAgentService>>()
        .await;
    let agent = HostAgentServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let mut drained = down_rx.clone();
    let server = builder
        // Health is deliberately unauthenticated: probes (grpc_health_probe, load balancers)
        // carry no credentials, and it reveals only "serving".
        .add_service(health_service)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            agent,
            credentials,
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutdown.await;
            let _ = down_tx.send(true);
        });
    tokio::select! {
        served = server => served?,
        () = async move {
            let _ = drained.wait_for(|down| *down).await;
            tokio::time::sleep(DRAIN).await;
        } => tracing::warn!(drain = ?DRAIN, "calls still running at shutdown were abandoned"),
    }
    Ok(())
}

/// Runs the agent as configured until SIGINT or SIGTERM. Flags and environment are checked
/// first (preflight.rs): nothing is created, swept or served before they pass.
pub async fn run(args: AgentArgs) -> Result<(), StartError> {
    let flags = preflight::check_flags(&args, &system_hostname())?;
    if let Some(tls) = &flags.tls {
        preflight::check_tls_files(tls)?;
    }
    let data = preflight::check_data_dir(&args.data_dir)?;
    let image_sources = preflight::check_image_dirs(&args.image_dirs)?;
    preflight::check_tools(&preflight::TOOLS).await?;
    // Before libvirt's wait: an address in use should fail in milliseconds. Nothing is
    // accepted until `serve`.
    let listener = TcpListener::bind(flags.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: flags.listen.to_string(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| StartError::Listen {
        addr: flags.listen.to_string(),
        source,
    })?;
    let hv: Arc<dyn Hypervisor> =
        Arc::new(preflight::connect_libvirt(&args.libvirt_uri, preflight::LIBVIRT_WAIT).await?);
    let facts = blocking(&hv, |hv| hv.host_facts())
        .await
        .map_err(StartError::HostFacts)?;
    let probe = AcceleratorProbe::read(
        Path::new("/sys/module"),
        facts.offers_kvm,
        facts.offers_qemu,
    );
    let kind = choose_hypervisor(args.hypervisor, probe)?;
    tracing::info!(
        hypervisor = kind.as_str(),
        libvirt = %facts.libvirt_version,
        ?probe,
        "accelerator chosen"
    );

    let events = Arc::new(EventLog::new(DEFAULT_RETAINED));
    let images = ImageCache::new(data.clone(), image_sources).map_err(StartError::ImageCache)?;
    let manager = Arc::new(MachineManager::new(
        Arc::clone(&hv),
        Arc::new(QemuImg::new()),
        images,
        data.clone(),
        ManagerConfig {
            domain_prefix: args.domain_prefix.clone(),
            hypervisor_kind: kind,
            network: args.network_mode(),
            graceful_timeout: Duration::from_secs(args.graceful_timeout_secs),
            pause_before: args.test_pause_before,
        },
        Arc::clone(&events),
    ));
    let removed = manager.sweep().await?;
    let owned = manager.list().await?;
    tracing::info!(
        domains = owned.len(),
        removed_leftovers = removed.len(),
        "inventory taken"
    );

    let poller = tokio::spawn(poll_forever(
        Arc::clone(&manager),
        Duration::from_millis(args.poll_interval_ms.max(100)),
    ));
    let image_collector = (args.image_grace_secs > 0).then(|| {
        tokio::spawn(collect_images_forever(
            Arc::clone(&manager),
            Duration::from_secs(args.image_grace_secs),
        ))
    });

    let capacity = CapacityPolicy {
        vcpus: args.capacity_vcpus.unwrap_or(facts.cpus),
        memory_mib: args.capacity_memory_mib.unwrap_or(facts.memory_kib / 1024),
        disk_gib: args
            .capacity_disk_gib
            .unwrap_or_else(|| disk_capacity_gib(data.root())),
        cpu_overcommit: args.cpu_overcommit,
        memory_overcommit: args.memory_overcommit,
    }
    .advertised();
    let host = HostIdentity {
        name: flags.name.clone(),
        hypervisor: kind,
        capacity,
    };
    // --advertise as normalised by preflight, else the bound address (the real port when
    // --listen used port 0).
    let advertise = flags.advertise.clone().unwrap_or_else(|| local.to_string());
    let control_plane_ca = args.control_plane_ca.as_deref().map(read).transpose()?;
    // The join token until the host has joined; its own credential (kept in the data dir)
    // from then on.
    let credentials = Credentials::new(&flags.token, Some(data.root().join("host-credential")));
    let registration = flags.control_plane.clone().map(|control_plane| {
        tokio::spawn(registration::run(Registration {
            control_plane,
            token: flags.token.clone(),
            credentials: credentials.clone(),
            control_plane_ca: control_plane_ca.clone(),
            request: proto::controlplane::v1::RegisterRequest {
                name: host.name.clone(),
                address: advertise.clone(),
                capacity: Some(capacity),
                hypervisor: hypervisor_to_wire(kind) as i32,
                agent_version: env!("CARGO_PKG_VERSION").into(),
                domain_prefix: args.domain_prefix.clone(),
            },
            self_check: Arc::new(preflight::HostSelfCheck::new(&args.data_dir)),
        }))
    });
    // Tests and scripts wait for this line (with the real port when --listen used port 0).
    tracing::info!(
        listen = %local,
        advertise = %advertise,
        tls = flags.tls.is_some(),
        mutual_tls = flags.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        "skygate-host-agent listening"
    );
    let service = HostAgentService::new(manager, events, host);
    let result = serve(
        listener,
        service,
        credentials,
        flags.tls.as_ref(),
        shutdown_signal(),
    )
    .await;
    poller.abort();
    if let Some(collector) = image_collector {
        collector.abort();
    }
    if let Some(r) = registration {
        r.abort();
    }
    result
}

pub(crate) async fn poll_forever(manager: Arc<MachineManager>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = manager.poll_once().await {
            // libvirtd down or restarting: the next tick reconnects.
            tracing::warn!(error = %crate::report::chain(&e), "polling domains failed");
        }
    }
}

/// Removes cached images nothing uses, every quarter of `grace` (at least a minute, at most an
/// hour), so an unused base goes between one and 1.25 grace periods after its last use.
pub(crate) async fn collect_images_forever(manager: Arc<MachineManager>, grace: Duration) {
    let every = (grace / 4).clamp(Duration::from_secs(60), Duration::from_secs(3600));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = manager.collect_unused_images(grace).await {
            tracing::warn!(error = %crate::report::chain(&e), "removing unused cached images failed");
        }
    }
}

pub(crate) async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

fn system_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Size of the file system holding the data directory, in GiB (0 when unknown).
fn disk_capacity_gib(path: &Path) -> u64 {
    nix::sys::statvfs::statvfs(path)
        .map(|s| s.blocks().saturating_mul(s.fragment_size()) >> 30)
        .unwrap_or(0)
}
