//! Start-up and shutdown: open the store, run migrations, load the secret, serve HTTP until
//! a signal, with housekeeping in the background.

use crate::agents::credentials::HostCredentials;
use crate::agents::heartbeats::{self, SteadyHeartbeats};
use crate::agents::{AgentClients, AgentTls, CallTiming, RegistryService};
use crate::api::{self, HttpSettings};
use crate::app::{App, Settings};
use crate::monitor;
use crate::reconciler::Reconciler;
use crate::store::Store;
use crate::timing::WorkflowSettings;
use crate::worker::Workers;
use anyhow::Context;
use proto::bearer::BearerToken;
use proto::controlplane::v1::agent_registry_server::AgentRegistryServer;
use std::fs::Permissions;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, ServerTlsConfig};

/// How long a shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(10);

/// Opens the database (creating the data dir for SQLite) and applies migrations.
pub async fn open_store(url: &str, data_dir: &Path, max_connections: u32) -> anyhow::Result<Store> {
    let sqlite = url.starts_with("sqlite:");
    if sqlite {
        create_private_dir(data_dir)?;
    }
    let store = Store::connect(url, max_connections)
        .await
        .context("connecting to the database")?;
    store.migrate().await.context("applying migrations")?;
    if sqlite {
        // The database holds password hashes: owner only, whatever the umask made of it
        // (the WAL and shared-memory files too).
        let path = url
            .trim_start_matches("sqlite://")
            .trim_start_matches("sqlite:");
        let path = path.split('?').next().unwrap_or(path);
        for suffix in ["", "-wal", "-shm"] {
            let file = format!("{path}{suffix}");
            if Path::new(&file).exists() {
                std::fs::set_permissions(&file, Permissions::from_mode(0o600))
                    .with_context(|| format!("making {file} private"))?;
            }
        }
    }
    Ok(store)
}

/// Creates `dir` (and its parents) if absent; a directory it creates itself is 0700, since it
/// will hold the database and the JWT secret. An existing one is left as the operator made it.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating data dir {}", dir.display()))?;
    std::fs::set_permissions(dir, Permissions::from_mode(0o700))
        .with_context(|| format!("making data dir {} private", dir.display()))
}

/// How the control plane talks to agents: where it serves the registry, the shared token,
/// and the workflows' timing.
#[derive(Debug, Clone)]
pub struct ProvisioningConfig {
    pub grpc_addr: SocketAddr,
    pub agent_token: String,
    pub workflows: WorkflowSettings,
    /// TLS (and mutual TLS) when calling agents.
    pub agent_tls: Option<AgentTls>,
    /// Certificate and key (PEM) to serve the registry over TLS; plaintext HTTP/2 without.
    pub registry_tls: Option<(Vec<u8>, Vec<u8>)>,
}

/// A running control plane; dropping the handle does not stop it, `shutdown` does.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    /// Where agents register (when provisioning is configured).
    pub grpc_addr: Option<SocketAddr>,
    pub app: Arc<App>,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish, and waits. Workers stop where they
    /// are: their tasks' leases run out and the next start takes them over.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        for b in &self.background {
            b.abort();
        }
        self.task.await.context("server task")??;
        Ok(())
    }
}

/// Serves the agent registry and starts the workers, the reconciler and the host monitor.
async fn start_provisioning(
    app: &App,
    secret: &[u8],
    agents: Arc<AgentClients>,
    config: &ProvisioningConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, Vec<tokio::task::JoinHandle<()>>)> {
    let store = &app.store;
    let listener = TcpListener::bind(config.grpc_addr)
        .await
        .with_context(|| format!("binding {}", config.grpc_addr))?;
    let grpc_addr = listener.local_addr()?;
    // The registry authenticates each call itself: the join token or a host's credential.
    let steady = SteadyHeartbeats::new();
    let registry = AgentRegistryServer::new(RegistryService::new(
        store.clone(),
        &config.agent_token,
        HostCredentials::new(secret),
        config.workflows.heartbeat_interval,
        config.workflows.unreachable_after,
        Arc::clone(&steady),
    ));
    let mut builder = tonic::transport::Server::builder();
    if let Some((cert, key)) = &config.registry_tls {
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .context("--grpc-tls-cert/--grpc-tls-key")?;
    }
    let grpc = tokio::spawn(async move {
        let served = builder
            .add_service(registry)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                let _ = stop.changed().await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "agent registry stopped");
        }
    });
    let workers = Arc::new(Workers::new(
        store.clone(),
        Arc::clone(&agents),
        config.workflows.clone(),
    ));
    let reconciler = Arc::new(Reconciler::new(
        store.clone(),
        agents,
        config.workflows.clone(),
        Arc::clone(&app.reconciler),
    ));
    let mut handles = workers.spawn();
    handles.push(grpc);
    handles.push(tokio::spawn(reconciler.run()));
    handles.push(tokio::spawn(monitor::run(
        store.clone(),
        config.workflows.clone(),
    )));
    handles.push(tokio::spawn(heartbeats::flush(
        steady,
        store.clone(),
        heartbeats::flush_period(config.workflows.heartbeat_interval),
    )));
    Ok((grpc_addr, handles))
}

/// Binds `addr` and serves the API; housekeeping runs every few minutes beside it. With
/// `provisioning`, also serves the agent registry and runs the workflows.
pub async fn start(
    store: Store,
    secret: &[u8],
    settings: Settings,
    http: &HttpSettings,
    addr: SocketAddr,
    provisioning: Option<&ProvisioningConfig>,
) -> anyhow::Result<Running> {
    // Install the metrics recorder before the first request records anything.
    crate::metrics::handle();
    let mut app = App::new(store, secret, settings).context("token self-test")?;
    if let Some(config) = provisioning {
        let token = BearerToken::new(&config.agent_token).context("--agent-token")?;
        app = app.with_agents(Arc::new(AgentClients::new(
            token,
            HostCredentials::new(secret),
            config.agent_tls.clone(),
            CallTiming::from(&config.workflows),
        )));
    }
    let app = Arc::new(app);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let addr = listener.local_addr()?;
    let router = api::router(app.clone(), http);
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    // Stopped after the last request has been answered, so its event is written too.
    let (audit_stop, audit_stopped) = tokio::sync::watch::channel(false);
    let audit_writer = app.audit.start_writer(app.store.clone(), audit_stopped);
    let (grpc_addr, background) = match provisioning {
        Some(config) => {
            let agents = app.agents.clone().context("agent clients")?;
            let (grpc, handles) =
                start_provisioning(&app, secret, agents, config, rx.clone()).await?;
            (Some(grpc), handles)
        }
        None => (None, Vec::new()),
    };
    let housekeeping = {
        let app = app.clone();
        let mut rx = rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(300));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = app.purge_expired().await {
                            tracing::warn!(error = ?e, "housekeeping failed");
                        }
                    }
                    _ = rx.changed() => break,
                }
            }
        })
    };
    let mut connections = http.connections;
    connections.max_connections = api::serve::effective_cap(
        connections.max_connections,
        api::serve::raise_descriptor_limit(),
    );
    let task = tokio::spawn(async move {
        api::serve::serve(listener, router, connections, DRAIN, async move {
            let _ = rx.changed().await;
        })
        .await;
        housekeeping.abort();
        let _ = audit_stop.send(true);
        if let Some(writer) = audit_writer {
            let _ = writer.await;
        }
        Ok(())
    });
    Ok(Running {
        addr,
        grpc_addr,
        app,
        shutdown: tx,
        task,
        background,
    })
}
