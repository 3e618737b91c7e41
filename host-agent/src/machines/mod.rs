//! The machine manager: turns specs into domains and files, drives power, deletes, and reports
//! what the hypervisor says. It owns no state that libvirt and the data directory cannot
//! rebuild: the domain's metadata holds its generation, its XML holds its forwarded port, and
//! per-machine files live under `machines/<uuid>/`.
//!
//! Every operation on one machine holds that machine's lock, so a retried EnsureVm waits for
//! the first instead of racing it. Creation writes files first and defines the domain last: a
//! crash in between leaves a directory without a domain, which [`MachineManager::sweep`]
//! removes at the next start (nothing else could own it) and a retried EnsureVm rebuilds.

mod spec;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

pub use spec::{
    parse_machine_id, DesiredPower, ImagePlan, MachineSpec, NetworkMode, SourceFile, SpecError,
    VmPhase, VmState,
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

/// The guest port forwarded for SSH.
const SSH_PORT: u16 = 22;
/// How often a stop polls the domain while waiting for the guest to power off.
const STOP_POLL: Duration = Duration::from_millis(250);
/// Default and largest console tail.
pub const DEFAULT_CONSOLE_BYTES: u64 = 64 << 10;
const MAX_CONSOLE_BYTES: u64 = 1 << 20;

/// The steps of creating a machine, in order; named for the test-only pause hook.
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
    reserved_ports: tokio::sync::Mutex<HashSet<u16>>,
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
            reserved_ports: tokio::sync::Mutex::new(HashSet::new()),
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
        (rest.len() == 36)
            .then(|| Uuid::parse_str(rest).ok())
            .flatten()
    }

    fn machine_lock(&self, id: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(locks.entry(id).or_default())
    }

    async fn pause_point(&self, step: CreateStep) {
        if self.cfg.pause_before == Some(step) {
            tracing::warn!(?step, "test pause: sleeping before this step until killed");
            std::future::pending::<()>().await;
        }
    }

    /// Removes what an interrupted creation or deletion left: machine directories without a
    /// domain of ours. Run once at start-up, before serving. Also baselines the event log
    /// with what exists, so the first poll reports changes, not the inventory.
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
            if !owned.contains(&id) {
                remove_dir_if_present(&entry.path())?;
                tracing::info!(machine = %id, "removed files of an interrupted create or delete");
                removed.push(id);
            }
        }
        Ok(removed)
    }

    /// Makes the machine exist as `spec` says, then converges its power state.
    pub async fn ensure(&self, spec: MachineSpec) -> Result<VmState, AgentError> {
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
        self.build(&spec, &name, kept_forwards).await?;
        let defined = if existing.is_some() {
            "redefined"
        } else {
            "defined"
        };
        self.events.observe(
            spec.id,
            VmPhase::Stopped,
            &format!("{defined} at generation {}", spec.generation),
        );
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
        let boot = self.fetch_image(&spec.image).await?;
        self.data.prepare_machine(spec.id)?;
        let overlay = self.data.overlay(spec.id);
        self.pause_point(CreateStep::Disk).await;
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
                    .create_overlay(base, *format, &overlay, spec.disk_gib)
                    .await?;
            }
            ImagePlan::Kernel { .. } => self.disks.create_blank(&overlay, spec.disk_gib).await?,
        }
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
        .await?;
        let mut reservation = None;
        let network = match &self.cfg.network {
            NetworkMode::User { address, ports } => {
                let forwards = if kept_forwards.is_empty() {
                    let mut reserved = self.reserved_ports.lock().await;
                    let claimed = self.claimed_ports(&reserved).await?;
                    let port = pick_port(ports, *address, &claimed, spec.id.as_u128() as u64)?;
                    reserved.insert(port);
                    reservation = Some(port);
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
        let defined = blocking(&self.hv, move |hv| hv.define(&xml)).await;
        if let Some(port) = reservation {
            // Defined or not, the port is no longer in flight: the domain's XML claims it now.
            self.reserved_ports.lock().await.remove(&port);
        }
        defined?;
        Ok(())
    }

    /// Ports claimed by our domains' definitions plus in-flight reservations.
    async fn claimed_ports(&self, reserved: &HashSet<u16>) -> Result<HashSet<u16>, AgentError> {
        let prefix = self.cfg.domain_prefix.clone();
        let domains = blocking(&self.hv, move |hv| hv.list(&prefix)).await?;
        let mut claimed = reserved.clone();
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
    ) -> Result<VmState, AgentError> {
        let status = self.require_status(id, name).await?;
        match (desired, status.phase) {
            (DesiredPower::Running, DomainPhase::Stopped | DomainPhase::Crashed) => {
                self.pause_point(CreateStep::Start).await;
                self.start_domain(id, name).await?;
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
        self.events.observe(id, VmPhase::Running, "started");
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
                    .observe(id, VmPhase::Stopped, "shut down by the guest");
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
            VmPhase::Stopped,
            &format!("forced off: the guest did not shut down within {timeout:?}"),
        );
        Ok(())
    }

    /// Starts a stopped or crashed machine; a running one is left as it is.
    pub async fn start(&self, id: Uuid) -> Result<VmState, AgentError> {
        let lock = self.machine_lock(id);
        let _guard = lock.lock().await;
        let name = self.domain_name(id);
        let status = self.require_status(id, &name).await?;
        if matches!(status.phase, DomainPhase::Stopped | DomainPhase::Crashed) {
            self.start_domain(id, &name).await?;
        }
        self.state_of(id).await
    }

    /// Stops a machine: graceful for `timeout` (the configured default when `None`), then
    /// forced. A stopped machine is left as it is.
    pub async fn stop(&self, id: Uuid, timeout: Option<Duration>) -> Result<VmState, AgentError> {
        let lock = self.machine_lock(id);
        let _guard = lock.lock().await;
        let name = self.domain_name(id);
        let status = self.require_status(id, &name).await?;
        if matches!(
            status.phase,
            DomainPhase::Running | DomainPhase::ShuttingDown | DomainPhase::Paused
        ) {
            self.stop_domain(id, &name, timeout.unwrap_or(self.cfg.graceful_timeout))
                .await?;
        } else if status.phase == DomainPhase::Crashed {
            // Shut off already; acknowledge so the machine reads as stopped from now on.
            self.events
                .observe(id, VmPhase::Stopped, "stopped after a crash");
        }
        self.state_of(id).await
    }

    /// Reboots a running machine: a full power cycle (graceful stop, forced after the
    /// timeout, then start), which works for every guest — including ones that ignore ACPI —
    /// and applies a redefinition that happened while it ran.
    pub async fn reboot(&self, id: Uuid) -> Result<VmState, AgentError> {
        let lock = self.machine_lock(id);
        let _guard = lock.lock().await;
        let name = self.domain_name(id);
        let status = self.require_status(id, &name).await?;
        if status.phase != DomainPhase::Running {
            return Err(AgentError::NotRunning(id));
        }
        self.stop_domain(id, &name, self.cfg.graceful_timeout)
            .await?;
        self.start_domain(id, &name).await?;
        self.state_of(id).await
    }

    /// Removes the domain, overlay, seed and console log. Returns whether anything existed.
    pub async fn delete(&self, id: Uuid) -> Result<bool, AgentError> {
        let lock = self.machine_lock(id);
        let _guard = lock.lock().await;
        let name = self.domain_name(id);
        let had_domain = self.get_status(&name).await?.is_some();
        if had_domain {
            let n = name.clone();
            blocking(&self.hv, move |hv| {
                hv.destroy(&n)?;
                hv.undefine(&n)
            })
            .await?;
        }
        let had_files = remove_dir_if_present(&self.data.machine_dir(id))?;
        if had_domain || had_files {
            self.events.observe(id, VmPhase::Absent, "deleted");
        }
        drop(_guard);
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        Ok(had_domain || had_files)
    }

    /// The actual state of one machine; `Absent` when it has no domain here.
    pub async fn state_of(&self, id: Uuid) -> Result<VmState, AgentError> {
        let name = self.domain_name(id);
        Ok(match self.get_status(&name).await? {
            Some(d) => self.describe(id, &d),
            None => VmState {
                id,
                generation: 0,
                phase: VmPhase::Absent,
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
    pub async fn list(&self) -> Result<Vec<VmState>, AgentError> {
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
    pub async fn poll_once(&self) -> Result<(), AgentError> {
        let states = self.list().await?;
        let seen: HashSet<Uuid> = states.iter().map(|s| s.id).collect();
        for s in &states {
            let reason = match s.phase {
                VmPhase::Crashed => "the domain's QEMU exited unexpectedly",
                _ => "observed",
            };
            if let Some(e) = self.events.observe(s.id, s.phase, reason) {
                tracing::info!(machine = %e.machine_id, phase = ?e.phase, reason, "machine changed");
            }
        }
        for id in self.events.known_machines() {
            if !seen.contains(&id) {
                // Locked so a delete in progress reports its own "deleted" first.
                let lock = self.machine_lock(id);
                let _guard = lock.lock().await;
                if self.get_status(&self.domain_name(id)).await?.is_none() {
                    self.events
                        .observe(id, VmPhase::Absent, "the domain disappeared");
                }
            }
        }
        Ok(())
    }

    fn describe(&self, id: Uuid, d: &DomainStatus) -> VmState {
        let (generation, disk_gib, mut message) = match MachineMetadata::from_xml(&d.xml) {
            Ok(m) => (m.generation, m.disk_gib.unwrap_or(0), String::new()),
            Err(e) => (0, 0, format!("unreadable metadata: {e}")),
        };
        let forwards = read_user_forwards(&d.xml).unwrap_or_default();
        let phase = phase_of(d.phase);
        if phase == VmPhase::Crashed && message.is_empty() {
            message = "the domain's QEMU exited unexpectedly".into();
        }
        // With user networking the machine is reachable at the forward address only.
        let mut addresses: Vec<String> = forwards.iter().map(|f| f.host_ip.to_string()).collect();
        addresses.dedup();
        VmState {
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

fn phase_of(p: DomainPhase) -> VmPhase {
    match p {
        DomainPhase::Stopped => VmPhase::Stopped,
        DomainPhase::Running => VmPhase::Running,
        DomainPhase::Paused => VmPhase::Paused,
        DomainPhase::ShuttingDown => VmPhase::ShuttingDown,
        DomainPhase::Crashed => VmPhase::Crashed,
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
