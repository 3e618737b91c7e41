//! The machine manager: turns specs into domains and files, drives power, deletes, and reports
//! what the hypervisor says. It owns no state that libvirt and the data directory cannot
//! rebuild: the domain's metadata holds its generation, its XML holds its forwarded port, and
//! per-machine files live under `machines/<uuid>/`.
//!
//! Every operation on one machine holds that machine's lock, so a retried EnsureMachine waits for
//! the first instead of racing it. Creation writes files first and defines the domain last: a
//! crash in between leaves a directory without a domain, which [`MachineManager::sweep`]
//! removes at the next start (nothing else could own it) and a retried EnsureMachine rebuilds.

mod spec;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

pub use spec::{
    parse_machine_id, DesiredPower, ImagePlan, MachinePhase, MachineSpec, MachineState,
    NetworkMode, SourceFile, SpecError,
};

use crate::disks::DiskTool;
use crate::domain_xml::{
    read_user_forwards, BootSource, DomainSpec, HypervisorKind, MachineMetadata, NetworkAttachment,
    PortForward,
};
use crate::error::AgentError;
use crate::events::EventLog;
use crate::hypervisor::{blocking, DomainPhase, DomainStatus, Hypervisor};
use crate::images::{ImageCache, ImageSourceSpec};
use crate::paths::{DataDir, ImageFileKind};
use crate::ports::pick_port;
use crate::seed::{write_seed_iso, SeedSpec};

/// Present in a machine directory while a creation or deletion is under way: what the
/// start-up sweep may remove when no domain owns the directory.
pub const INCOMPLETE_MARKER: &str = ".incomplete";

/// The guest port forwarded for SSH.
const SSH_PORT: u16 = 22;
/// How often a stop polls the domain while waiting for the guest to power off.
const STOP_POLL: Duration = Duration::from_millis(250);
/// Default and largest console tail.
pub const DEFAULT_CONSOLE_BYTES: u64 = 64 << 10;
const MAX_CONSOLE_BYTES: u64 = 1 << 20;

/// The steps of creating a machine, in order: named in the errors they fail with (what the
/// tenant reads in the machine's events) and by the test-only pause hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CreateStep {
    /// Before fetching the image.
    Image,
    /// Before creating the overlay.
    Disk,
    /// Before writing the seed.
    Seed,
    /// Before defining the domain.
    Define,
    /// Before starting it.
    Start,
}

impl CreateStep {
    /// The step's id on the wire (the `skygate-step` gRPC metadata).
    pub fn as_str(self) -> &'static str {
        match self {
            CreateStep::Image => "image",
            CreateStep::Disk => "disk",
            CreateStep::Seed => "seed",
            CreateStep::Define => "define",
            CreateStep::Start => "start",
        }
    }
}

impl std::fmt::Display for CreateStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CreateStep::Image => "fetch image",
            CreateStep::Disk => "create disk",
            CreateStep::Seed => "write seed",
            CreateStep::Define => "define domain",
            CreateStep::Start => "start domain",
        })
    }
}

/// Names the step an error happened in, unless the error is not the step's own: the
/// hypervisor being unreachable is the host's outage (retried until it answers), and a stale
/// generation is a race between requests, not a failing step.
trait InStep<T> {
    fn in_step(self, step: CreateStep) -> Result<T, AgentError>;
}

impl<T, E: Into<AgentError>> InStep<T> for Result<T, E> {
    fn in_step(self, step: CreateStep) -> Result<T, AgentError> {
        self.map_err(|e| match e.into() {
            e @ (AgentError::Hypervisor(crate::hypervisor::HypervisorError::Unreachable(_))
            | AgentError::StaleGeneration { .. }
            | AgentError::Step { .. }) => e,
            e => AgentError::Step {
                step,
                source: Box::new(e),
            },
        })
    }
}

/// How the manager is set up.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Only domains named `<prefix><uuid>` are ours.
    pub domain_prefix: String,
    /// Accelerator for new definitions.
    pub hypervisor_kind: HypervisorKind,
    /// NIC attachment.
    pub network: NetworkMode,
    /// How long a stop waits for the guest before forcing it off, unless the call says.
    pub graceful_timeout: Duration,
    /// Test-only: stop (sleep forever) before this creation step, so a test can kill -9 the
    /// agent there. Never set in production.
    pub pause_before: Option<CreateStep>,
}

/// The machine manager.
#[derive(Debug)]
pub struct MachineManager {
    hv: Arc<dyn Hypervisor>,
    disks: Arc<dyn DiskTool>,
    images: ImageCache,
    data: DataDir,
    cfg: ManagerConfig,
    events: Arc<EventLog>,
    locks: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
    /// Ports picked by creations that have not defined their domain yet.
    reserved_ports: Arc<Mutex<HashSet<u16>>>,
    /// Serialises picking a port (list claimed ports, probe, reserve) between creations.
    port_pick: tokio::sync::Mutex<()>,
}

impl MachineManager {
    /// A manager over these edges. Call [`MachineManager::sweep`] before serving.
    pub fn new(
        hv: Arc<dyn Hypervisor>,
        disks: Arc<dyn DiskTool>,
        images: ImageCache,
        data: DataDir,
        cfg: ManagerConfig,
        events: Arc<EventLog>,
    ) -> Self {
        MachineManager {
            hv,
            disks,
            images,
            data,
            cfg,
            events,
            locks: Mutex::new(HashMap::new()),
            reserved_ports: Arc::new(Mutex::new(HashSet::new())),
            port_pick: tokio::sync::Mutex::new(()),
        }
    }

    /// The hypervisor (for host facts).
    pub fn hypervisor(&self) -> &Arc<dyn Hypervisor> {
        &self.hv
    }

    /// The configuration.
    pub fn config(&self) -> &ManagerConfig {
        &self.cfg
    }

    /// `<prefix><uuid>`.
    pub fn domain_name(&self, id: Uuid) -> String {
        format!("{}{}", self.cfg.domain_prefix, id.hyphenated())
    }

    /// The machine id of a domain name, if the name is exactly `<prefix><uuid>`.
    fn machine_of(&self, name: &str) -> Option<Uuid> {
        let rest = name.strip_prefix(&self.cfg.domain_prefix)?;
        // Exactly the hyphenated form we write, so `skygate-` never claims `skygate-a-<uuid>`
        // of another agent with a longer prefix.
        Uuid::parse_str(rest)
            .ok()
            .filter(|id| id.hyphenated().to_string() == rest)
    }

    fn machine_lock(&self, id: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(locks.entry(id).or_default())
    }

    /// Drops machine `id`'s lock from the map unless someone else holds or waits for it (they
    /// cloned the `Arc`): removing it then would let a newcomer get a second, unrelated lock
    /// for the same machine and run beside them.
    fn forget_lock(&self, id: Uuid, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Ours and the map's.
        if Arc::strong_count(&lock) == 2 {
            locks.remove(&id);
        }
    }

    async fn pause_point(&self, step: CreateStep) {
        if self.cfg.pause_before == Some(step) {
            tracing::warn!(?step, "test pause: sleeping before this step until killed");
            std::future::pending::<()>().await;
        }
    }

    /// Removes what an interrupted creation or deletion left: machine directories that carry
    /// the [`INCOMPLETE_MARKER`] and have no domain of ours. A directory without a domain and
    /// without the marker is kept and reported: it belongs to a machine this agent cannot see
    /// (another `--domain-prefix` or `--libvirt-uri`), and deleting a tenant's disk on a
    /// configuration slip could not be undone. Run once at start-up, before serving. Also
    /// baselines the event log with what exists, so the first poll reports changes.
    pub async fn sweep(&self) -> Result<Vec<Uuid>, AgentError> {
        let prefix = self.cfg.domain_prefix.clone();
        let domains = blocking(&self.hv, move |hv| hv.list(&prefix)).await?;
        let mut owned = HashSet::new();
        for d in &domains {
            if let Some(id) = self.machine_of(&d.name) {
                owned.insert(id);
                self.events.baseline(id, phase_of(d.phase));
            }
        }
        let dir = self.data.machines_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(source) => return Err(io_err(&dir, source)),
        };
        let mut removed = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&dir, e))?;
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| Uuid::parse_str(n).ok())
            else {
                continue;
            };
            if owned.contains(&id) {
                continue;
            }
            if entry.path().join(INCOMPLETE_MARKER).exists() {
                remove_dir_if_present(&entry.path())?;
                tracing::info!(machine = %id, "removed files of an interrupted create or delete");
                removed.push(id);
            } else {
                tracing::warn!(
                    machine = %id,
                    dir = %entry.path().display(),
                    "machine files without a domain of this agent; kept (another domain \
                     prefix or libvirt URI?)"
                );
            }
        }
        Ok(removed)
    }

    /// Makes the machine exist as `spec` says, then converges its power state.
    pub async fn ensure(&self, spec: MachineSpec) -> Result<MachineState, AgentError> {
        spec.validate()?;
        let lock = self.machine_lock(spec.id);
        let _guard = lock.lock().await;
        let name = self.domain_name(spec.id);
        let existing = self.get_status(&name).await?;
        let mut kept_forwards = Vec::new();
        if let Some(d) = &existing {
            let meta = self.metadata(d)?;
            if spec.generation < meta.generation {
                return Err(AgentError::StaleGeneration {
                    requested: spec.generation,
                    applied: meta.generation,
                });
            }
            if spec.generation == meta.generation {
                return self.converge_power(spec.id, &name, spec.desired).await;
            }
            kept_forwards =
                read_user_forwards(&d.xml).map_err(|source| AgentError::ForeignDomain {
                    name: name.clone(),
                    source,
                })?;
        }
        if let Err(e) = self.build(&spec, &name, kept_forwards).await {
            if existing.is_none() {
                // Nothing was defined: leave no files behind either (a retry rebuilds them;
                // the image cache keeps the download).
                remove_dir_if_present(&self.data.machine_dir(spec.id))?;
            }
            return Err(e);
        }
        if existing.is_none() {
            self.events.observe(
                spec.id,
                MachinePhase::Stopped,
                &format!("defined at generation {}", spec.generation),
            );
        }
        self.converge_power(spec.id, &name, spec.desired).await
    }

    /// Image, overlay, seed, definition: each step idempotent.
    async fn build(
        &self,
        spec: &MachineSpec,
        name: &str,
        kept_forwards: Vec<PortForward>,
    ) -> Result<(), AgentError> {
        self.pause_point(CreateStep::Image).await;
        let boot = self
            .fetch_image(&spec.image)
            .await
            .in_step(CreateStep::Image)?;
        let dir = self
            .data
            .prepare_machine(spec.id)
            .in_step(CreateStep::Disk)?;
        write_marker(&dir, "create").in_step(CreateStep::Disk)?;
        let overlay = self.data.overlay(spec.id);
        self.pause_point(CreateStep::Disk).await;
        self.make_disk(spec, &boot, &overlay)
            .await
            .in_step(CreateStep::Disk)?;
        self.pause_point(CreateStep::Seed).await;
        let seed = self.data.seed(spec.id);
        write_seed_iso(
            &SeedSpec {
                instance_id: spec.id.to_string(),
                hostname: spec.hostname.clone(),
                ssh_keys: spec.ssh_keys.clone(),
                user_data: spec.user_data.clone(),
            },
            &seed,
        )
        .await
        .in_step(CreateStep::Seed)?;
        self.define(spec, name, boot, overlay, seed, kept_forwards)
            .await
            .in_step(CreateStep::Define)?;
        remove_marker(&dir)?;
        Ok(())
    }

    /// The machine's overlay (or blank disk for a kernel boot).
    async fn make_disk(
        &self,
        spec: &MachineSpec,
        boot: &FetchedImage,
        overlay: &std::path::Path,
    ) -> Result<(), AgentError> {
        match &spec.image {
            ImagePlan::Disk { format, .. } => {
                let base = boot.base.as_deref().ok_or_else(|| {
                    AgentError::InvalidSpec(SpecError {
                        field: "image",
                        reason: "no base disk".into(),
                    })
                })?;
                self.disks.check_base(base, *format).await?;
                self.disks
                    .create_overlay(base, *format, overlay, spec.disk_gib)
                    .await?;
            }
            ImagePlan::Kernel { .. } => self.disks.create_blank(overlay, spec.disk_gib).await?,
        }
        Ok(())
    }

    /// Picks the forwarded port (or keeps the old ones), renders the XML and defines it.
    async fn define(
        &self,
        spec: &MachineSpec,
        name: &str,
        boot: FetchedImage,
        overlay: std::path::PathBuf,
        seed: std::path::PathBuf,
        kept_forwards: Vec<PortForward>,
    ) -> Result<(), AgentError> {
        let mut reservation = None;
        let network = match &self.cfg.network {
            NetworkMode::User { address, ports } => {
                let forwards = if kept_forwards.is_empty() {
                    let _picking = self.port_pick.lock().await;
                    let claimed = self.claimed_ports().await?;
                    let port = pick_port(ports, *address, &claimed, spec.id.as_u128() as u64)?;
                    reservation = Some(PortReservation::new(&self.reserved_ports, port));
                    vec![PortForward {
                        host_ip: *address,
                        host_port: port,
                        guest_port: SSH_PORT,
                    }]
                } else {
                    kept_forwards
                };
                NetworkAttachment::User { forwards }
            }
            NetworkMode::Libvirt(n) => NetworkAttachment::LibvirtNetwork { name: n.clone() },
            NetworkMode::Bridge(n) => NetworkAttachment::Bridge { name: n.clone() },
        };
        let xml = DomainSpec {
            name: name.to_owned(),
            uuid: spec.id,
            hostname: spec.hostname.clone(),
            generation: spec.generation,
            disk_gib: spec.disk_gib,
            hypervisor: self.cfg.hypervisor_kind,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            boot: boot.source,
            disk: overlay,
            seed: Some(seed),
            console_log: self.data.console_log(spec.id),
            network,
        }
        .to_xml()?;
        self.pause_point(CreateStep::Define).await;
        blocking(&self.hv, move |hv| hv.define(&xml)).await?;
        // Defined: the domain's XML claims the port from now on.
        drop(reservation);
        Ok(())
    }

    /// Ports claimed by our domains' definitions plus in-flight reservations.
    async fn claimed_ports(&self) -> Result<HashSet<u16>, AgentError> {
        let prefix = self.cfg.domain_prefix.clone();
        let domains = blocking(&self.hv, move |hv| hv.list(&prefix)).await?;
        let mut claimed = lock_ports(&self.reserved_ports).clone();
        for d in domains {
            // A definition we cannot read claims nothing we could know of; QEMU would then
            // fail to start on a clash and say so.
            claimed.extend(
                read_user_forwards(&d.xml)
                    .unwrap_or_default()
                    .iter()
                    .map(|f| f.host_port),
            );
        }
        Ok(claimed)
    }

    async fn fetch_image(&self, plan: &ImagePlan) -> Result<FetchedImage, AgentError> {
        let fetch = |f: &SourceFile, format: ImageFileKind| ImageSourceSpec {
            url: f.url.clone(),
            sha256: f.sha256.clone(),
            format,
        };
        Ok(match plan {
            ImagePlan::Disk { base, format } => {
                let kind = match format {
                    crate::disks::DiskFormat::Qcow2 => ImageFileKind::Qcow2,
                    crate::disks::DiskFormat::Raw => ImageFileKind::Raw,
                };
                FetchedImage {
                    base: Some(self.images.ensure(&fetch(base, kind)).await?),
                    source: BootSource::Disk,
                }
            }
            ImagePlan::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                let kernel = self
                    .images
                    .ensure(&fetch(kernel, ImageFileKind::Kernel))
                    .await?;
                let initrd = match initrd {
                    Some(i) => Some(self.images.ensure(&fetch(i, ImageFileKind::Initrd)).await?),
                    None => None,
                };
                FetchedImage {
                    base: None,
                    source: BootSource::Kernel {
                        kernel,
                        initrd,
                        cmdline: cmdline.clone(),
                    },
                }
            }
        })
    }

    /// Starts or stops the domain as `desired` says; returns the resulting state.
    async fn converge_power(
        &self,
        id: Uuid,
        name: &str,
        desired: DesiredPower,
    ) -> Result<MachineState, AgentError> {
        let status = self.require_status(id, name).await?;
        match (desired, status.phase) {
            (DesiredPower::Running, DomainPhase::Stopped | DomainPhase::Crashed) => {
                self.pause_point(CreateStep::Start).await;
                self.start_domain(id, name)
                    .await
                    .in_step(CreateStep::Start)?;
            }
            (DesiredPower::Stopped, DomainPhase::Running | DomainPhase::ShuttingDown) => {
                self.stop_domain(id, name, self.cfg.graceful_timeout)
                    .await?;
            }
            _ => {}
        }
        self.state_of(id).await
    }

    async fn start_domain(&self, id: Uuid, name: &str) -> Result<(), AgentError> {
        let n = name.to_owned();
        blocking(&self.hv, move |hv| hv.start(&n)).await?;
        self.events.observe(id, MachinePhase::Running, "started");
        Ok(())
    }

    /// ACPI shutdown, polled until off or `timeout`, then forced off.
    async fn stop_domain(&self, id: Uuid, name: &str, timeout: Duration) -> Result<(), AgentError> {
        let n = name.to_owned();
        blocking(&self.hv, move |hv| hv.shutdown(&n)).await?;
        let deadline = Instant::now() + timeout;
        loop {
            let phase = self.require_status(id, name).await?.phase;
            if !matches!(phase, DomainPhase::Running | DomainPhase::ShuttingDown) {
                self.events
                    .observe(id, MachinePhase::Stopped, "shut down by the guest");
                return Ok(());
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(STOP_POLL).await;
        }
        let n = name.to_owned();
        blocking(&self.hv, move |hv| hv.destroy(&n)).await?;
        self.events.observe(
            id,
            MachinePhase::Stopped,
            &format!("forced off: the guest did not shut down within {timeout:?}"),
        );
        Ok(())
    }

    /// Starts a stopped or crashed machine; a running one is left as it is.
    pub async fn start(&self, id: Uuid) -> Result<MachineState, AgentError> {
        let lock = self.machine_lock(id);
        let _guard = lock.lock().await;
        let name = self.domain_name(id);
        let status = self.require_status(id, &name).await?;
        if matches!(status.phase, DomainPhase::Stopped | DomainPhase::Crashed) {
            self.start_domain(id, &name)
                .await
                .in_step(CreateStep::Start)?;
        }
        self.state_of(id).await
    }

    /// Stops a machine: graceful for `timeout` (the configured default when `None`), then
    /// forced. A stopped machine is left as it is.
    pub async fn stop(
        &self,
        id: Uuid,
        timeout: Option<Duration>,
    ) -> Result<MachineState, AgentError> {
        let lock = self.machine_lock(id);
        let _guard = lock.lock().await;
        let name = self.domain_name(id);
        let status = self.require_status(id, &name).await?;
        match status.phase {
            DomainPhase::Running | DomainPhase::ShuttingDown => {
                self.stop_domain(id, &name, timeout.unwrap_or(self.cfg.graceful_timeout))
                    .await?;
            }
            // A paused guest cannot see the ACPI button: waiting would only waste the timeout.
            DomainPhase::Paused => {
                let n = name.clone();
                blocking(&self.hv, move |hv| hv.destroy(&n)).await?;
                self.events.observe(
                    id,
                    MachinePhase::Stopped,
                    "forced off: the machine was paused",
                );
            }
            // A crashed domain is shut off already; libvirt keeps saying "crashed" until its
            // next start, and so does the agent.
            DomainPhase::Stopped | DomainPhase::Crashed => {}
        }
        self.state_of(id).await
    }

    /// Reboots a running machine: a full power cycle (graceful stop, forced after the
    /// timeout, then start), which works for every guest — including ones that ignore ACPI —
    /// and applies a redefinition that happened while it ran.
    ///
    /// With a `request_id`, one reboot per id: the id is recorded in the machine's directory
    /// once the guest is back, and a request with the recorded id answers the state without
    /// rebooting (a retry from a control plane that died before recording the first). Should
    /// the agent die between the power cycle and the record, the retry reboots again: that
    /// window is milliseconds, where before it was the whole round trip.
    pub async fn reboot(
        &self,
        id: Uuid,
        request_id: Option<&str>,
    ) -> Result<MachineState, AgentError> {
        let lock = self.machine_lock(id);
        let _guard = lock.lock().await;
        let name = self.domain_name(id);
        let record = self.data.machine_dir(id).join(LAST_REBOOT);
        if let Some(request_id) = request_id {
            if std::fs::read_to_string(&record).is_ok_and(|done| done == request_id) {
                tracing::info!(machine = %id, request_id, "reboot already done; not again");
                return self.state_of(id).await;
            }
        }
        let status = self.require_status(id, &name).await?;
        if status.phase != DomainPhase::Running {
            return Err(AgentError::NotRunning(id));
        }
        self.stop_domain(id, &name, self.cfg.graceful_timeout)
            .await?;
        self.start_domain(id, &name).await?;
        if let Some(request_id) = request_id {
            let tmp = record.with_extension("tmp");
            std::fs::write(&tmp, request_id)
                .and_then(|()| std::fs::rename(&tmp, &record))
                .map_err(|e| io_err(&record, e))?;
        }
        self.state_of(id).await
    }

    /// Removes the domain, overlay, seed and console log. Returns whether anything existed.
    pub async fn delete(&self, id: Uuid) -> Result<bool, AgentError> {
        let lock = self.machine_lock(id);
        let _guard = lock.lock().await;
        let name = self.domain_name(id);
        let had_domain = self.get_status(&name).await?.is_some();
        let dir = self.data.machine_dir(id);
        if had_domain && dir.is_dir() {
            // Should this process die between undefine and rm, the sweep finishes the job.
            write_marker(&dir, "delete")?;
        }
        if had_domain {
            let n = name.clone();
            blocking(&self.hv, move |hv| {
                hv.destroy(&n)?;
                hv.undefine(&n)
            })
            .await?;
        }
        // Overlays can be large: unlink them off the async workers.
        let had_files = tokio::task::spawn_blocking(move || remove_dir_if_present(&dir))
            .await
            .map_err(|e| AgentError::Io {
                path: "machine directory".into(),
                source: std::io::Error::other(e.to_string()),
            })??;
        if had_domain || had_files {
            self.events.observe(id, MachinePhase::Absent, "deleted");
        }
        drop(_guard);
        self.forget_lock(id, lock);
        Ok(had_domain || had_files)
    }

    /// The actual state of one machine; `Absent` when it has no domain here.
    pub async fn state_of(&self, id: Uuid) -> Result<MachineState, AgentError> {
        let name = self.domain_name(id);
        Ok(match self.get_status(&name).await? {
            Some(d) => self.describe(id, &d),
            None => MachineState {
                id,
                generation: 0,
                phase: MachinePhase::Absent,
                domain_name: name,
                addresses: vec![],
                forwards: vec![],
                message: String::new(),
                vcpus: 0,
                memory_mib: 0,
                disk_gib: 0,
            },
        })
    }

    /// Every machine with a domain of ours.
    pub async fn list(&self) -> Result<Vec<MachineState>, AgentError> {
        let prefix = self.cfg.domain_prefix.clone();
        let domains = blocking(&self.hv, move |hv| hv.list(&prefix)).await?;
        Ok(domains
            .iter()
            .filter_map(|d| self.machine_of(&d.name).map(|id| self.describe(id, d)))
            .collect())
    }

    /// The last `max_bytes` of the serial console log, and whether older output was cut.
    pub async fn console(
        &self,
        id: Uuid,
        max_bytes: Option<u64>,
    ) -> Result<(Vec<u8>, bool), AgentError> {
        let max = max_bytes
            .unwrap_or(DEFAULT_CONSOLE_BYTES)
            .clamp(1, MAX_CONSOLE_BYTES);
        let name = self.domain_name(id);
        if self.get_status(&name).await?.is_none() {
            return Err(AgentError::NotFound(id));
        }
        let path = self.data.console_log(id);
        tokio::task::spawn_blocking(move || read_tail(&path, max))
            .await
            .map_err(|e| AgentError::Io {
                path: "console log".into(),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    /// One poll: reports every phase change of our domains (and disappearances) as events.
    /// A machine whose phase differs from the last one recorded is looked at again under its
    /// lock; a machine busy with an operation is skipped (the operation reports its own
    /// changes, and a poll must not interleave stale observations with them).
    pub async fn poll_once(&self) -> Result<(), AgentError> {
        let states = self.list().await?;
        let mut seen = HashSet::new();
        for s in &states {
            seen.insert(s.id);
            if self.events.last_phase(s.id) != Some(s.phase) {
                self.recheck(s.id).await?;
            }
        }
        for id in self.events.known_machines() {
            if !seen.contains(&id) {
                self.recheck(id).await?;
            }
        }
        Ok(())
    }

    /// Observes one machine's phase under its lock, unless an operation holds the lock.
    async fn recheck(&self, id: Uuid) -> Result<(), AgentError> {
        let lock = self.machine_lock(id);
        let Ok(_guard) = lock.try_lock() else {
            return Ok(());
        };
        let state = self.state_of(id).await?;
        let reason = match state.phase {
            MachinePhase::Crashed => "the domain's QEMU exited unexpectedly",
            MachinePhase::Absent => "the domain disappeared",
            _ => "observed",
        };
        if let Some(e) = self.events.observe(id, state.phase, reason) {
            tracing::info!(machine = %e.machine_id, phase = ?e.phase, reason, "machine changed");
        }
        Ok(())
    }

    fn describe(&self, id: Uuid, d: &DomainStatus) -> MachineState {
        let (generation, disk_gib, mut message) = match MachineMetadata::from_xml(&d.xml) {
            Ok(m) => (m.generation, m.disk_gib.unwrap_or(0), String::new()),
            Err(e) => (0, 0, format!("unreadable metadata: {e}")),
        };
        let forwards = read_user_forwards(&d.xml).unwrap_or_default();
        let phase = phase_of(d.phase);
        if phase == MachinePhase::Crashed && message.is_empty() {
            message = "the domain's QEMU exited unexpectedly".into();
        }
        // With user networking the machine is reachable at the forward address only.
        let mut addresses: Vec<String> = forwards.iter().map(|f| f.host_ip.to_string()).collect();
        addresses.dedup();
        MachineState {
            id,
            generation,
            phase,
            domain_name: d.name.clone(),
            addresses,
            forwards,
            message,
            vcpus: d.vcpus,
            memory_mib: d.memory_kib / 1024,
            disk_gib,
        }
    }

    fn metadata(&self, d: &DomainStatus) -> Result<MachineMetadata, AgentError> {
        MachineMetadata::from_xml(&d.xml).map_err(|source| AgentError::ForeignDomain {
            name: d.name.clone(),
            source,
        })
    }

    async fn get_status(&self, name: &str) -> Result<Option<DomainStatus>, AgentError> {
        let n = name.to_owned();
        Ok(blocking(&self.hv, move |hv| hv.get(&n)).await?)
    }

    async fn require_status(&self, id: Uuid, name: &str) -> Result<DomainStatus, AgentError> {
        self.get_status(name).await?.ok_or(AgentError::NotFound(id))
    }
}

/// The files an image resolved to in the cache.
struct FetchedImage {
    base: Option<std::path::PathBuf>,
    source: BootSource,
}

/// In a machine's directory: the id of the last reboot carried out.
const LAST_REBOOT: &str = "last-reboot";

fn write_marker(dir: &std::path::Path, what: &str) -> Result<(), AgentError> {
    let path = dir.join(INCOMPLETE_MARKER);
    std::fs::write(&path, what).map_err(|e| io_err(&path, e))
}

fn remove_marker(dir: &std::path::Path) -> Result<(), AgentError> {
    let path = dir.join(INCOMPLETE_MARKER);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(&path, e)),
    }
}

fn lock_ports(ports: &Mutex<HashSet<u16>>) -> std::sync::MutexGuard<'_, HashSet<u16>> {
    ports.lock().unwrap_or_else(|p| p.into_inner())
}

/// A port picked for a domain not defined yet; released when dropped, whether the creation
/// defined the domain, failed or was cancelled.
struct PortReservation {
    ports: Arc<Mutex<HashSet<u16>>>,
    port: u16,
}

impl PortReservation {
    fn new(ports: &Arc<Mutex<HashSet<u16>>>, port: u16) -> Self {
        lock_ports(ports).insert(port);
        PortReservation {
            ports: Arc::clone(ports),
            port,
        }
    }
}

impl Drop for PortReservation {
    fn drop(&mut self) {
        lock_ports(&self.ports).remove(&self.port);
    }
}

fn phase_of(p: DomainPhase) -> MachinePhase {
    match p {
        DomainPhase::Stopped => MachinePhase::Stopped,
        DomainPhase::Running => MachinePhase::Running,
        DomainPhase::Paused => MachinePhase::Paused,
        DomainPhase::ShuttingDown => MachinePhase::ShuttingDown,
        DomainPhase::Crashed => MachinePhase::Crashed,
    }
}

fn io_err(path: &std::path::Path, source: std::io::Error) -> AgentError {
    AgentError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// `rm -r`, absent being fine; returns whether it existed.
fn remove_dir_if_present(dir: &std::path::Path) -> Result<bool, AgentError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(dir, e)),
    }
}

fn read_tail(path: &std::path::Path, max: u64) -> Result<(Vec<u8>, bool), AgentError> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        // Defined but never started: nothing printed yet.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((vec![], false)),
        Err(e) => return Err(io_err(path, e)),
    };
    let len = file.metadata().map_err(|e| io_err(path, e))?.len();
    let start = len.saturating_sub(max);
    file.seek(SeekFrom::Start(start))
        .map_err(|e| io_err(path, e))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    file.take(max)
        .read_to_end(&mut buf)
        .map_err(|e| io_err(path, e))?;
    Ok((buf, start > 0))
}

#[cfg(test)]
mod tests;
