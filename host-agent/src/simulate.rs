//! The simulated fleet: many host agents in one process over fakes, faults injected by name.
//!
//! Each simulated host is what `server::run` builds for a real host, minus libvirt and the
//! host's tools: its own data directory under the fleet's root, its own
//! [`FakeHypervisor`] (latencies set with [`FakeHypervisor::delay`]), a [`FakeDiskTool`] and a
//! [`FakeSeedWriter`], the real [`MachineManager`], [`HostAgentService`] and
//! [`crate::server::serve`] on its own 127.0.0.1 port, the domain poller, and the real
//! registration and heartbeats. The control plane cannot tell it from a real agent except by
//! its `agent_version` (`<version>-simulated`).
//!
//! What is not simulated, on purpose:
//! - Images are fetched by the real [`ImageCache`] (sha256 checked), so a fleet is given the
//!   directories `file://` sources may come from ([`SimulateConfig::image_dirs`]); each host
//!   keeps its own copy, as real hosts do.
//! - User networking is the real one: each creation probes one port of the forward range by
//!   binding it for an instant (`ports::pick_port`), then releases it. The fake QEMU binds
//!   nothing, so a fleet holds no forwarded ports, only one listener per host.
//!
//! Faults: [`SimulatedFleet::silence`] / [`SimulatedFleet::resume`] (heartbeats),
//! [`SimulatedFleet::crash_domain`], [`SimulatedFleet::slow`] and [`SimulatedFleet::refuse`]
//! (every hypervisor call delayed or failing: the agent answers as over a slow or broken
//! libvirt, which is what a real host's refusals look like; the gRPC server itself keeps
//! accepting, and health keeps answering).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::agent::v1 as pb;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::domain_xml::HypervisorKind;
use crate::events::{EventLog, DEFAULT_RETAINED};
use crate::fake_tools::{FakeDiskTool, FakeSeedWriter};
use crate::hypervisor::{FakeHypervisor, HypervisorOp};
use crate::identity::Credentials;
use crate::images::{ImageCache, ImageDirError, ImageError, SourcePolicy};
use crate::machines::{MachineManager, ManagerConfig, NetworkMode};
use crate::paths::{DataDir, PathsError};
use crate::registration::{self, Registration, SelfCheck};
use crate::service::{HostAgentService, HostIdentity};

/// Domain names of every simulated host (each has its own fake hypervisor, so they cannot
/// collide).
const DOMAIN_PREFIX: &str = "skygate-";

/// What one simulated host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimulatedCapacity {
    /// vCPUs offered.
    pub vcpus: u32,
    /// Memory offered, MiB.
    pub memory_mib: u64,
    /// Disk offered, GiB.
    pub disk_gib: u64,
}

impl Default for SimulatedCapacity {
    fn default() -> Self {
        SimulatedCapacity {
            vcpus: 8,
            memory_mib: 16 << 10,
            disk_gib: 200,
        }
    }
}

/// How long the fake hypervisor takes for the steps that cost time on a real host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latencies {
    /// Defining a domain.
    pub define: Duration,
    /// Starting one.
    pub start: Duration,
    /// The ACPI shutdown request of a stop.
    pub stop: Duration,
}

impl Default for Latencies {
    /// Of the order of libvirt's on a real host for a small domain.
    fn default() -> Self {
        Latencies {
            define: Duration::from_millis(20),
            start: Duration::from_millis(50),
            stop: Duration::from_millis(50),
        }
    }
}

/// How a fleet is set up.
#[derive(Debug, Clone)]
pub struct SimulateConfig {
    /// How many hosts.
    pub hosts: usize,
    /// Host names are this followed by a four-digit number from 0001.
    pub name_prefix: String,
    /// gRPC URL of the control plane's registry.
    pub control_plane: String,
    /// The join token (also admitted by each host's server until it has its credential).
    pub join_token: String,
    /// What each host offers.
    pub capacity: SimulatedCapacity,
    /// The fake hypervisor's latencies.
    pub latencies: Latencies,
    /// Each host's data directory is `<data_root>/<name>`.
    pub data_root: PathBuf,
    /// Directories `file://` image sources may come from (none: no `file://` source).
    pub image_dirs: Vec<PathBuf>,
    /// How often each host polls its fake hypervisor for changes (a crashed domain is
    /// reported within this).
    pub poll_interval: Duration,
}

impl SimulateConfig {
    /// `hosts` hosts named `sim-0001`... with the default capacity and latencies.
    pub fn new(
        hosts: usize,
        control_plane: impl Into<String>,
        join_token: impl Into<String>,
        data_root: impl Into<PathBuf>,
    ) -> Self {
        SimulateConfig {
            hosts,
            name_prefix: "sim-".into(),
            control_plane: control_plane.into(),
            join_token: join_token.into(),
            capacity: SimulatedCapacity::default(),
            latencies: Latencies::default(),
            data_root: data_root.into(),
            image_dirs: Vec::new(),
            poll_interval: Duration::from_secs(2),
        }
    }
}

/// Errors of starting or steering a fleet.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    /// No simulated host has this name.
    #[error("no simulated host named {0:?}")]
    UnknownHost(String),
    /// The host has no domain for this machine.
    #[error("host {host:?} has no machine {machine}")]
    UnknownMachine {
        /// The host.
        host: String,
        /// The machine.
        machine: Uuid,
    },
    /// A host's data directory could not be made.
    #[error("data directory of {host:?}")]
    DataDir {
        /// The host.
        host: String,
        /// Why.
        #[source]
        source: PathsError,
    },
    /// An image directory cannot serve as one.
    #[error("image directories")]
    ImageDirs(#[source] ImageDirError),
    /// A host's image cache could not be opened.
    #[error("image cache of {host:?}")]
    ImageCache {
        /// The host.
        host: String,
        /// Why.
        #[source]
        source: ImageError,
    },
    /// A host's gRPC listener could not be bound.
    #[error("listening for {host:?} on 127.0.0.1")]
    Listen {
        /// The host.
        host: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A simulated host finds nothing wrong with itself: it has no tools to lose.
#[derive(Debug)]
struct NoProblems;

#[async_trait::async_trait]
impl SelfCheck for NoProblems {
    async fn problems(&self) -> Vec<String> {
        Vec::new()
    }
}

/// One simulated host.
#[derive(Debug)]
struct SimulatedHost {
    name: String,
    address: String,
    fake: Arc<FakeHypervisor>,
    credentials: Credentials,
    latencies: Latencies,
    /// What it registers with, kept so that [`SimulatedFleet::resume`] can start again.
    control_plane: String,
    join_token: String,
    request: proto::controlplane::v1::RegisterRequest,
    /// Registration and heartbeats; `None` while silenced.
    heartbeats: Mutex<Option<JoinHandle<()>>>,
    poller: JoinHandle<()>,
    server: JoinHandle<()>,
    shutdown: tokio::sync::watch::Sender<bool>,
}

/// What every simulated host's hypervisor holds ([`SimulatedFleet::census`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Census {
    pub hosts: usize,
    /// Defined domains, whatever their phase.
    pub domains: usize,
    /// Domains that run.
    pub running: usize,
}

impl std::fmt::Display for Census {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "census: hosts={} domains={} running={}",
            self.hosts, self.domains, self.running
        )
    }
}

/// Many simulated hosts, each a real gRPC server registered with a real control plane.
#[derive(Debug)]
pub struct SimulatedFleet {
    hosts: Vec<SimulatedHost>,
    by_name: HashMap<String, usize>,
}

impl SimulatedFleet {
    /// Starts every host: data directory, listener, server, poller, registration. Returns
    /// once all are serving; registration goes on in the background (see
    /// [`SimulatedFleet::registered`]).
    pub async fn start(cfg: SimulateConfig) -> Result<SimulatedFleet, SimulateError> {
        let policy =
            SourcePolicy::with_file_dirs(&cfg.image_dirs).map_err(SimulateError::ImageDirs)?;
        let mut hosts = Vec::with_capacity(cfg.hosts);
        let mut by_name = HashMap::with_capacity(cfg.hosts);
        for i in 1..=cfg.hosts {
            let name = format!("{}{i:04}", cfg.name_prefix);
            let host = start_host(&cfg, &name, policy.clone()).await?;
            by_name.insert(name, hosts.len());
            hosts.push(host);
        }
        Ok(SimulatedFleet { hosts, by_name })
    }

    /// The hosts' names, in order.
    pub fn names(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.name.clone()).collect()
    }

    /// The `host:port` a host serves on.
    pub fn address(&self, name: &str) -> Result<&str, SimulateError> {
        Ok(&self.host(name)?.address)
    }

    /// A host's fake hypervisor, to look at its domains or inject other faults.
    pub fn hypervisor(&self, name: &str) -> Result<Arc<FakeHypervisor>, SimulateError> {
        Ok(Arc::clone(&self.host(name)?.fake))
    }

    /// What the fleet's hypervisors hold, summed over every host: the other side of the
    /// control plane's books (a benchmark compares the two).
    pub fn census(&self) -> Census {
        let mut census = Census {
            hosts: self.hosts.len(),
            ..Census::default()
        };
        for host in &self.hosts {
            let (domains, running) = host.fake.domain_counts();
            census.domains += domains;
            census.running += running;
        }
        census
    }

    /// How many hosts have joined (hold the credential the control plane issued).
    pub fn registered(&self) -> usize {
        self.hosts
            .iter()
            .filter(|h| h.credentials.credential().is_some())
            .count()
    }

    /// Stops `name`'s registration and heartbeats (until [`SimulatedFleet::resume`]); its gRPC server keeps serving, so
    /// the control plane sees a host that stopped reporting, not one that vanished.
    pub fn silence(&self, name: &str) -> Result<(), SimulateError> {
        let host = self.host(name)?;
        if let Some(task) = lock(&host.heartbeats).take() {
            task.abort();
        }
        Ok(())
    }

    /// Starts `name`'s heartbeats again after [`SimulatedFleet::silence`]; the control plane
    /// marks it ready at the first one.
    pub fn resume(&self, name: &str) -> Result<(), SimulateError> {
        self.host(name)?.start_heartbeats();
        Ok(())
    }

    /// Makes machine `machine`'s domain on `name` die as if its QEMU had exited; the host's
    /// poller reports it to watchers as a crash.
    pub fn crash_domain(&self, name: &str, machine: Uuid) -> Result<(), SimulateError> {
        let host = self.host(name)?;
        if host
            .fake
            .crash(&format!("{DOMAIN_PREFIX}{}", machine.hyphenated()))
        {
            Ok(())
        } else {
            Err(SimulateError::UnknownMachine {
                host: name.to_owned(),
                machine,
            })
        }
    }

    /// Makes every hypervisor call on `name` take `delay` (zero: back to the configured
    /// latencies).
    pub fn slow(&self, name: &str, delay: Duration) -> Result<(), SimulateError> {
        let host = self.host(name)?;
        for op in HypervisorOp::ALL {
            host.fake.delay(op, delay);
        }
        if delay.is_zero() {
            set_latencies(&host.fake, host.latencies);
        }
        Ok(())
    }

    /// While `on`, every hypervisor call on `name` fails, so every HostAgent call that
    /// touches the host (all but health) answers an error; heartbeats go on, as an agent
    /// whose libvirt broke still heartbeats.
    pub fn refuse(&self, name: &str, on: bool) -> Result<(), SimulateError> {
        self.host(name)?.fake.fail_all(on);
        Ok(())
    }

    /// Shuts every host down: heartbeats and pollers stop, servers end their watch streams
    /// and finish the calls in progress (as the real agent does on SIGTERM).
    pub async fn stop(mut self) {
        for h in &self.hosts {
            if let Some(task) = lock(&h.heartbeats).take() {
                task.abort();
            }
            h.poller.abort();
            let _ = h.shutdown.send(true);
        }
        for h in std::mem::take(&mut self.hosts) {
            let _ = h.server.await;
        }
    }

    fn host(&self, name: &str) -> Result<&SimulatedHost, SimulateError> {
        self.by_name
            .get(name)
            .map(|&i| &self.hosts[i])
            .ok_or_else(|| SimulateError::UnknownHost(name.to_owned()))
    }
}

impl Drop for SimulatedFleet {
    /// A fleet dropped without [`SimulatedFleet::stop`] (a failed test) leaves no task behind.
    fn drop(&mut self) {
        for h in &self.hosts {
            if let Some(task) = lock(&h.heartbeats).take() {
                task.abort();
            }
            h.poller.abort();
            h.server.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn set_latencies(fake: &FakeHypervisor, l: Latencies) {
    fake.delay(HypervisorOp::Define, l.define);
    fake.delay(HypervisorOp::Start, l.start);
    fake.delay(HypervisorOp::Shutdown, l.stop);
}

async fn start_host(
    cfg: &SimulateConfig,
    name: &str,
    policy: SourcePolicy,
) -> Result<SimulatedHost, SimulateError> {
    let data_dir = |source| SimulateError::DataDir {
        host: name.to_owned(),
        source,
    };
    let data = DataDir::new(cfg.data_root.join(name)).map_err(data_dir)?;
    data.prepare().map_err(data_dir)?;
    let fake = Arc::new(FakeHypervisor::new());
    set_latencies(&fake, cfg.latencies);
    let events = Arc::new(EventLog::new(DEFAULT_RETAINED));
    let images =
        ImageCache::new(data.clone(), policy).map_err(|source| SimulateError::ImageCache {
            host: name.to_owned(),
            source,
        })?;
    let manager = MachineManager::new(
        fake.clone(),
        Arc::new(FakeDiskTool::new()),
        images,
        data.clone(),
        ManagerConfig {
            domain_prefix: DOMAIN_PREFIX.into(),
            hypervisor_kind: HypervisorKind::Qemu,
            network: NetworkMode::User {
                address: std::net::Ipv4Addr::LOCALHOST,
                ports: Default::default(),
            },
            // The fake's guests obey ACPI at once; a stop never waits this long.
            graceful_timeout: Duration::from_secs(5),
            pause_before: None,
        },
        Arc::clone(&events),
    )
    .with_seed_writer(Arc::new(FakeSeedWriter));
    let manager = Arc::new(manager);
    // Leftovers of an earlier run in the same root: the fake hypervisor starts empty, so
    // their directories own no domain and go.
    let _ = manager.sweep().await;
    let capacity = pb::Capacity {
        vcpus: cfg.capacity.vcpus,
        memory_mib: cfg.capacity.memory_mib,
        disk_gib: cfg.capacity.disk_gib,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|source| SimulateError::Listen {
            host: name.to_owned(),
            source,
        })?;
    let address = listener
        .local_addr()
        .map_err(|source| SimulateError::Listen {
            host: name.to_owned(),
            source,
        })?
        .to_string();
    let credentials = Credentials::new(&cfg.join_token, Some(data.root().join("host-credential")));
    let service = HostAgentService::new(
        Arc::clone(&manager),
        events,
        HostIdentity {
            name: name.to_owned(),
            hypervisor: HypervisorKind::Qemu,
            capacity,
        },
    );
    let (shutdown, mut down) = tokio::sync::watch::channel(false);
    let server = tokio::spawn({
        let credentials = credentials.clone();
        let name = name.to_owned();
        async move {
            let stopped = async move {
                let _ = down.wait_for(|d| *d).await;
            };
            if let Err(e) =
                crate::server::serve(listener, service, credentials, None, stopped).await
            {
                tracing::warn!(host = %name, error = %crate::report::chain(&e), "simulated host's server failed");
            }
        }
    });
    let poller = tokio::spawn(crate::server::poll_forever(manager, cfg.poll_interval));
    let host = SimulatedHost {
        name: name.to_owned(),
        address: address.clone(),
        fake,
        credentials,
        latencies: cfg.latencies,
        control_plane: cfg.control_plane.clone(),
        join_token: cfg.join_token.clone(),
        request: proto::controlplane::v1::RegisterRequest {
            name: name.to_owned(),
            address,
            capacity: Some(capacity),
            hypervisor: pb::HypervisorKind::Qemu as i32,
            agent_version: format!("{}-simulated", env!("CARGO_PKG_VERSION")),
            domain_prefix: DOMAIN_PREFIX.into(),
        },
        heartbeats: Mutex::new(None),
        poller,
        server,
        shutdown,
    };
    host.start_heartbeats();
    Ok(host)
}

impl SimulatedHost {
    /// Registers (with the credential it holds, else the join token) and heartbeats, unless
    /// already doing so.
    fn start_heartbeats(&self) {
        let mut task = lock(&self.heartbeats);
        if task.is_none() {
            *task = Some(tokio::spawn(registration::run(Registration {
                control_plane: self.control_plane.clone(),
                token: self.join_token.clone(),
                credentials: self.credentials.clone(),
                control_plane_ca: None,
                request: self.request.clone(),
                self_check: Arc::new(NoProblems),
            })));
        }
    }
}

// ---- The `simulate` command line (main.rs parses the flags, this runs them) ----

/// Why `skygate-host-agent simulate` could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimulateCliError {
    /// Neither `--agent-token`, `SKYGATE_AGENT_TOKEN` nor `--join-token-file`.
    #[error("no join token: set SKYGATE_AGENT_TOKEN or pass --join-token-file")]
    NoToken,
    /// The token file could not be read.
    #[error("reading the join token from {path:?}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The fleet did not start.
    #[error("starting the simulated fleet")]
    Start(#[source] SimulateError),
}

impl SimulateCliError {
    /// 2 for what the command line got wrong, 1 otherwise (as the real agent).
    pub fn exit_code(&self) -> u8 {
        match self {
            SimulateCliError::NoToken | SimulateCliError::TokenFile { .. } => 2,
            SimulateCliError::Start(_) => 1,
        }
    }
}

/// A fault asked for on stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultCommand {
    /// `silence NAME`: [`SimulatedFleet::silence`].
    Silence(String),
    /// `resume NAME`: [`SimulatedFleet::resume`].
    Resume(String),
    /// `crash NAME MACHINE_ID`: [`SimulatedFleet::crash_domain`].
    Crash(String, Uuid),
    /// `slow NAME MS`: [`SimulatedFleet::slow`].
    Slow(String, Duration),
    /// `refuse NAME` / `accept NAME`: [`SimulatedFleet::refuse`].
    Refuse(String, bool),
}

impl std::str::FromStr for FaultCommand {
    type Err = String;

    fn from_str(line: &str) -> Result<Self, Self::Err> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["silence", name] => Ok(FaultCommand::Silence((*name).into())),
            ["resume", name] => Ok(FaultCommand::Resume((*name).into())),
            ["crash", name, id] => Uuid::parse_str(id)
                .map(|id| FaultCommand::Crash((*name).into(), id))
                .map_err(|_| format!("{id:?} is not a machine id")),
            ["slow", name, ms] => ms
                .parse()
                .map(|ms| FaultCommand::Slow((*name).into(), Duration::from_millis(ms)))
                .map_err(|_| format!("{ms:?} is not a number of milliseconds")),
            ["refuse", name] => Ok(FaultCommand::Refuse((*name).into(), true)),
            ["accept", name] => Ok(FaultCommand::Refuse((*name).into(), false)),
            _ => Err(
                "expected `silence NAME`, `resume NAME`, `crash NAME MACHINE_ID`, \
                 `slow NAME MS`, `refuse NAME` or `accept NAME`"
                    .into(),
            ),
        }
    }
}

impl SimulatedFleet {
    /// Applies one fault.
    pub fn apply(&self, command: &FaultCommand) -> Result<(), SimulateError> {
        match command {
            FaultCommand::Silence(name) => self.silence(name),
            FaultCommand::Resume(name) => self.resume(name),
            FaultCommand::Crash(name, id) => self.crash_domain(name, *id),
            FaultCommand::Slow(name, delay) => self.slow(name, *delay),
            FaultCommand::Refuse(name, on) => self.refuse(name, *on),
        }
    }
}

/// Runs `skygate-host-agent simulate` until SIGINT or SIGTERM: starts the fleet, prints
/// `simulate: N hosts registered` once all have joined, and applies the faults read from
/// stdin, one line of result each (`ok: LINE` or `error: ...`); `census` prints what the
/// hypervisors hold (`census: hosts=H domains=D running=R`). The end of stdin ends the
/// reading, not the fleet, so a script may start it with stdin closed.
pub async fn run_cli(args: crate::config::SimulateArgs) -> Result<(), SimulateCliError> {
    raise_open_files_limit();
    let token = match (&args.agent_token, &args.join_token_file) {
        (Some(token), _) => token.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|source| SimulateCliError::TokenFile {
                path: path.clone(),
                source,
            })?
            .trim()
            .to_owned(),
        (None, None) => return Err(SimulateCliError::NoToken),
    };
    let hosts = args.hosts as usize;
    let cfg = SimulateConfig {
        hosts,
        name_prefix: args.name_prefix,
        control_plane: args.control_plane,
        join_token: token,
        capacity: SimulatedCapacity {
            vcpus: args.vcpus,
            memory_mib: args.memory_mib,
            disk_gib: args.disk_gib,
        },
        latencies: Latencies {
            define: Duration::from_millis(args.define_ms),
            start: Duration::from_millis(args.start_ms),
            stop: Duration::from_millis(args.stop_ms),
        },
        data_root: args.data_dir,
        image_dirs: args.image_dirs,
        poll_interval: Duration::from_secs(2),
    };
    let fleet = Arc::new(
        SimulatedFleet::start(cfg)
            .await
            .map_err(SimulateCliError::Start)?,
    );
    let announce = tokio::spawn({
        let fleet = Arc::clone(&fleet);
        async move {
            while fleet.registered() < hosts {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            say(&format!("simulate: {hosts} hosts registered"));
        }
    });
    // Stdin is read on a thread of its own (tokio's stdin is not among the crate's features,
    // and would block a pool thread the same way).
    let (tx, mut lines) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let faults = async {
        while let Some(line) = lines.recv().await {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if line == "census" {
                say(&fleet.census().to_string());
                continue;
            }
            match line.parse::<FaultCommand>() {
                Ok(c) => match fleet.apply(&c) {
                    Ok(()) => say(&format!("ok: {line}")),
                    Err(e) => say(&format!("error: {}", crate::report::chain(&e))),
                },
                Err(e) => say(&format!("error: {e}")),
            }
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = faults => {},
        () = crate::server::shutdown_signal() => {},
    }
    announce.abort();
    // The announcer held the other reference; aborted, it drops it once it is polled again.
    let _ = announce.await;
    match Arc::try_unwrap(fleet) {
        Ok(fleet) => fleet.stop().await,
        // Cannot happen (no other holder is left); dropping still aborts every task.
        Err(fleet) => drop(fleet),
    }
    Ok(())
}

/// Writes one line of the command's output to stdout, flushed at once (a script reading a
/// pipe waits for it). A stdout that went away is ignored: the fleet keeps running.
fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Raises the soft limit of open files to the hard limit: every host holds a listener, its
/// control plane's connections and a channel to the registry, so a thousand hosts need more
/// than the usual 1024. Failing only warns: a smaller fleet still runs.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "could not raise the open-files limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not read the open-files limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_commands_parse_and_say_what_they_expect() {
        let id = Uuid::new_v4();
        assert_eq!(
            "silence sim-0001".parse(),
            Ok(FaultCommand::Silence("sim-0001".into()))
        );
        assert_eq!(
            format!("crash sim-0002 {id}").parse(),
            Ok(FaultCommand::Crash("sim-0002".into(), id))
        );
        assert_eq!(
            "  slow sim-0003 250 ".parse(),
            Ok(FaultCommand::Slow(
                "sim-0003".into(),
                Duration::from_millis(250)
            ))
        );
        assert_eq!(
            "refuse a".parse(),
            Ok(FaultCommand::Refuse("a".into(), true))
        );
        assert_eq!(
            "accept a".parse(),
            Ok(FaultCommand::Refuse("a".into(), false))
        );
        assert_eq!("resume a".parse(), Ok(FaultCommand::Resume("a".into())));
        assert!("crash a not-a-uuid".parse::<FaultCommand>().is_err());
        assert!("slow a fast".parse::<FaultCommand>().is_err());
        assert!("reboot a".parse::<FaultCommand>().is_err());
    }
}
