//! The machine manager: turns specs into domains and files, drives power, deletes, and reports
//! what the hypervisor says. It owns no state that libvirt and the data directory cannot
//! rebuild: the domain's metadata holds its generation, its XML holds its forwarded port, and
//! per-machine files live under `machines/<uuid>/`.
//!
//! Every operation on one machine holds that machine's lock, so a retried EnsureMachine waits for
//! the first instead of racing it. Creation writes files first and defines the domain last: a
//! crash in between leaves a directory without a domain, which [`MachineManager::sweep`]
//! removes at the next start (nothing else could own it) and a retried EnsureMachine rebuilds.

mod error;
mod moving;
mod network;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

pub use error::{CreateDiskError, CreateStep, DefineError, FileOp, ManagerError};
pub use moving::{DiskImport, ExportPart, ImportError};
pub use network::NetworkMode;

use crate::disks::DiskTool;
use crate::domain_xml::{
    read_user_forwards, BootSource, DomainSpec, HypervisorKind, MachineMetadata, NetworkAttachment,
};
use crate::events::EventLog;
use crate::hypervisor::{blocking, DomainPhase, DomainStatus, HostFacts, Hypervisor};
use crate::images::{ImageCache, ImageSourceSpec};
use crate::model::{
    check_generation, AppliedSpec, DesiredPower, DiskFormat, GenerationCheck, ImagePlan,
    MachinePhase, MachineSpec, MachineState, PortForward, SourceFile, SpecError,
};
use crate::paths::{DataDir, ImageFileKind};
use crate::ports::pick_port;
use crate::seed::{GenIsoImage, SeedSpec, SeedWriter};

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
    seeds: Arc<dyn SeedWriter>,
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
            seeds: Arc::new(GenIsoImage),
            images,
            data,
            cfg,
            events,
            locks: Mutex::new(HashMap::new()),
            reserved_ports: Arc::new(Mutex::new(HashSet::new())),
            port_pick: tokio::sync::Mutex::new(()),
        }
    }

    /// Writes seeds with `seeds` instead of genisoimage (the simulator's fake).
    pub fn with_seed_writer(mut self, seeds: Arc<dyn SeedWriter>) -> Self {
        self.seeds = seeds;
        self
    }

    /// The host's facts as the hypervisor reports them.
    pub async fn host_facts(&self) -> Result<HostFacts, ManagerError> {
        blocking(&self.hv, |hv| hv.host_facts())
            .await
            .map_err(ManagerError::HostFacts)
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
    pub async fn sweep(&self) -> Result<Vec<Uuid>, ManagerError> {
        let domains = self.list_domains().await?;
        let mut owned = HashSet::new();
        for d in &domains {
            if let Some(id) = self.machine_of(&d.name) {
                owned.insert(id);
                self.events.baseline(id, machine_phase(d.phase));
            }
        }
        let dir = self.data.machines_dir();
        let reading = |e| ManagerError::files(FileOp::Reading, &dir, e);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(reading(e)),
        };
        let mut removed = Vec::new();
        for entry in entries {
            let entry = entry.map_err(reading)?;
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

    /// Makes the machine exist as `spec` says, then converges its power state. A domain
    /// defined at the spec's generation is only powered as asked, unless its recorded content
    /// differs from the spec's: then the spec is refused ([`check_generation`]).
    pub async fn ensure(&self, spec: MachineSpec) -> Result<MachineState, ManagerError> {
        spec.validate()?;
        let lock = self.machine_lock(spec.id);
        let _guard = lock.lock().await;
        let name = self.domain_name(spec.id);
        let existing = self.get_status(&name).await?;
        let mut kept_forwards = Vec::new();
        if let Some(d) = &existing {
            let meta = self.metadata(d)?;
            let applied = AppliedSpec {
                generation: meta.generation,
                fingerprint: meta.fingerprint,
            };
            match check_generation(applied, spec.generation, spec.fingerprint()) {
                GenerationCheck::Stale => {
                    return Err(ManagerError::StaleGeneration {
                        requested: spec.generation,
                        applied: meta.generation,
                    })
                }
                GenerationCheck::Conflict => {
                    tracing::warn!(machine = %spec.id, generation = spec.generation,
                        "refused: the applied generation was defined with other content");
                    return Err(ManagerError::GenerationConflict {
                        generation: spec.generation,
                    });
                }
                GenerationCheck::PowerOnly => {
                    return self.converge_power(spec.id, &name, spec.desired).await
                }
                GenerationCheck::Redefine => {}
            }
            kept_forwards =
                read_user_forwards(&d.xml).map_err(|source| ManagerError::ForeignDomain {
                    name: name.clone(),
                    source,
                })?;
        }
        if existing.is_none() && spec.disk_must_exist && !self.data.overlay(spec.id).exists() {
            return Err(ManagerError::DiskMissing(spec.id));
        }
        let disk = match &existing {
            None => DiskPlan::Create,
            Some(d) => {
                let plan = self.disk_plan(&spec, d)?;
                if plan == DiskPlan::Replace && d.phase != DomainPhase::Stopped {
                    // Its QEMU holds the old disk: off first, then a fresh disk.
                    self.power_off(spec.id, &name, d.phase, self.cfg.graceful_timeout)
                        .await?;
                }
                plan
            }
        };
        // Files without a domain: a released machine (a move undone) or an imported disk (a
        // move's target), which a failed definition must not throw away.
        let had_files = self.data.machine_dir(spec.id).exists();
        if let Err(e) = self
            .build(&spec, &name, kept_forwards, disk, had_files)
            .await
        {
            if existing.is_none() && !had_files {
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

    /// What a redefinition of the existing domain `d` does to its disk: a fresh one when the
    /// spec's disk generation is above the recorded one (a rebuild), else the same one grown
    /// to the spec's size if it is larger. Refuses a smaller disk (disks never shrink) and a
    /// larger one while the domain runs (its QEMU holds the disk).
    fn disk_plan(&self, spec: &MachineSpec, d: &DomainStatus) -> Result<DiskPlan, ManagerError> {
        if spec.disk_generation > self.recorded_disk_generation(spec.id)? {
            return Ok(DiskPlan::Replace);
        }
        let recorded_gib = self.metadata(d)?.disk_gib.unwrap_or(spec.disk_gib);
        if spec.disk_gib < recorded_gib {
            return Err(SpecError::new(
                "disk_gib",
                format!("the disk is {recorded_gib} GiB; disks never shrink"),
            )
            .into());
        }
        if spec.disk_gib > recorded_gib && d.phase != DomainPhase::Stopped {
            return Err(ManagerError::DiskInUse(spec.id));
        }
        Ok(DiskPlan::Keep)
    }

    /// The disk generation recorded in the machine's directory (0 when none is: never
    /// rebuilt).
    fn recorded_disk_generation(&self, id: Uuid) -> Result<u64, ManagerError> {
        let path = self.data.machine_dir(id).join(DISK_GENERATION);
        match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().map_err(|e| {
                ManagerError::files(
                    FileOp::Reading,
                    &path,
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(ManagerError::files(FileOp::Reading, &path, e)),
        }
    }

    /// Turns a domain in `phase` off: a graceful stop (forced after `timeout`) for a running
    /// guest, a forced one at once for a paused guest, which cannot see the ACPI button
    /// (waiting would only waste the timeout).
    async fn power_off(
        &self,
        id: Uuid,
        name: &str,
        phase: DomainPhase,
        timeout: Duration,
    ) -> Result<(), ManagerError> {
        match phase {
            DomainPhase::Running | DomainPhase::ShuttingDown => {
                self.stop_domain(id, name, timeout).await
            }
            DomainPhase::Paused => {
                let n = name.to_owned();
                blocking(&self.hv, move |hv| hv.destroy(&n))
                    .await
                    .map_err(ManagerError::Stop)?;
                self.events.observe(
                    id,
                    MachinePhase::Stopped,
                    "forced off: the machine was paused",
                );
                Ok(())
            }
            DomainPhase::Stopped | DomainPhase::Crashed => Ok(()),
        }
    }

    /// Image, overlay, seed, definition: each step idempotent, each failure named by its step.
    ///
    /// A rebuild ([`DiskPlan::Replace`]) makes the new overlay beside the old one, renames it
    /// over the old one (and removes the console log), and records the spec's disk generation
    /// before the domain is redefined: a rebuild that fails before the rename leaves the old
    /// disk; an agent killed after the rename but before the record makes the disk again on
    /// the retry (nothing of the tenant's is in it yet); one killed after the record keeps the
    /// new disk.
    async fn build(
        &self,
        spec: &MachineSpec,
        name: &str,
        kept_forwards: Vec<PortForward>,
        disk: DiskPlan,
        had_files: bool,
    ) -> Result<(), ManagerError> {
        self.pause_point(CreateStep::Image).await;
        let image = self
            .fetch_image(&spec.image)
            .await
            .map_err(ManagerError::FetchImage)?;
        let dir = self
            .data
            .prepare_machine(spec.id)
            .map_err(|e| ManagerError::CreateDisk(e.into()))?;
        if disk == DiskPlan::Create && !had_files {
            // A new machine: until it is defined, the sweep may remove what a crash left. Not
            // for files already here (a released machine's disk may be the only copy).
            write_marker(&dir, "create").map_err(|(path, source)| {
                ManagerError::CreateDisk(CreateDiskError::Marker { path, source })
            })?;
        }
        let overlay = self.data.overlay(spec.id);
        self.pause_point(CreateStep::Disk).await;
        if disk == DiskPlan::Replace {
            // The new disk is made beside the old one and takes its place only once made: a
            // base that does not fit the disk, or any other failure, leaves the old disk as it
            // was. A leftover from an attempt that died before the rename is made again.
            let fresh = dir.join(REBUILT_DISK);
            remove_file_if_present(&fresh)?;
            self.make_disk(spec.disk_gib, &image, &fresh)
                .await
                .map_err(|e| ManagerError::CreateDisk(e.into()))?;
            sync_file(&fresh).map_err(|e| ManagerError::files(FileOp::Writing, &fresh, e))?;
            std::fs::rename(&fresh, &overlay)
                .and_then(|()| sync_dir(&dir))
                .map_err(|e| ManagerError::files(FileOp::Writing, &overlay, e))?;
            // The console shows the new disk's life only: a client pinning host keys from it
            // must never find the keys the old disk made.
            remove_file_if_present(&self.data.console_log(spec.id))?;
        } else {
            self.make_disk(spec.disk_gib, &image, &overlay)
                .await
                .map_err(|e| ManagerError::CreateDisk(e.into()))?;
        }
        if disk == DiskPlan::Keep {
            self.disks
                .grow(&overlay, spec.disk_gib)
                .await
                .map_err(|e| ManagerError::CreateDisk(e.into()))?;
        }
        if disk == DiskPlan::Replace || spec.disk_generation > 0 {
            let record = dir.join(DISK_GENERATION);
            write_atomically(&record, &spec.disk_generation.to_string())
                .map_err(|e| ManagerError::files(FileOp::Writing, &record, e))?;
        }
        self.pause_point(CreateStep::Seed).await;
        let seed = self.data.seed(spec.id);
        self.seeds
            .write(
                &SeedSpec {
                    instance_id: spec.id.to_string(),
                    hostname: spec.hostname.clone(),
                    ssh_keys: spec.ssh_keys.clone(),
                    user_data: spec.user_data.clone(),
                },
                &seed,
            )
            .await
            .map_err(ManagerError::WriteSeed)?;
        let files = MachineFiles { overlay, seed };
        self.define(spec, name, image.into_boot_source(), files, kept_forwards)
            .await
            .map_err(ManagerError::Define)?;
        remove_marker(&dir)?;
        Ok(())
    }

    /// The machine's overlay (or blank disk for a kernel boot).
    async fn make_disk(
        &self,
        disk_gib: u64,
        image: &FetchedImage,
        overlay: &Path,
    ) -> Result<(), crate::disks::DiskError> {
        match image {
            FetchedImage::Disk { base, format } => {
                self.disks.check_base(base, *format).await?;
                self.disks
                    .create_overlay(base, *format, overlay, disk_gib)
                    .await?;
            }
            FetchedImage::Kernel(_) => self.disks.create_blank(overlay, disk_gib).await?,
        }
        Ok(())
    }

    /// Picks the forwarded port (or keeps the old ones), renders the XML and defines it.
    async fn define(
        &self,
        spec: &MachineSpec,
        name: &str,
        boot: BootSource,
        files: MachineFiles,
        kept_forwards: Vec<PortForward>,
    ) -> Result<(), DefineError> {
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
            fingerprint: Some(spec.fingerprint()),
            disk_gib: spec.disk_gib,
            hypervisor: self.cfg.hypervisor_kind,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            boot,
            disk: files.overlay,
            seed: Some(files.seed),
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
    async fn claimed_ports(&self) -> Result<HashSet<u16>, crate::hypervisor::HypervisorError> {
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

    async fn fetch_image(
        &self,
        plan: &ImagePlan,
    ) -> Result<FetchedImage, crate::images::ImageError> {
        let fetch = |f: &SourceFile, format: ImageFileKind| ImageSourceSpec {
            url: f.url.clone(),
            sha256: f.sha256.clone(),
            format,
        };
        Ok(match plan {
            ImagePlan::Disk { base, format } => {
                let kind = match format {
                    DiskFormat::Qcow2 => ImageFileKind::Qcow2,
                    DiskFormat::Raw => ImageFileKind::Raw,
                };
                FetchedImage::Disk {
                    base: self.images.ensure(&fetch(base, kind)).await?,
                    format: *format,
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
                FetchedImage::Kernel(BootSource::Kernel {
                    kernel,
                    initrd,
                    cmdline: cmdline.clone(),
                })
            }
        })
    }

    /// Starts or stops the domain as `desired` says; returns the resulting state.
    async fn converge_power(
        &self,
        id: Uuid,
        name: &str,
        desired: DesiredPower,
    ) -> Result<MachineState, ManagerError> {
        let status = self.require_status(id, name).await?;
        match (desired, status.phase) {
            (DesiredPower::Running, DomainPhase::Stopped | DomainPhase::Crashed) => {
                self.pause_point(CreateStep::Start).await;
                self.start_domain(id, name)
                    .await
                    .map_err(ManagerError::Start)?;
            }
            (DesiredPower::Stopped, DomainPhase::Running | DomainPhase::ShuttingDown) => {
                self.stop_domain(id, name, self.cfg.graceful_timeout)
                    .await?;
            }
            _ => {}
        }
        self.state_of(id).await
    }

    async fn start_domain(
        &self,
        id: Uuid,
        name: &str,
    ) -> Result<(), crate::hypervisor::HypervisorError> {
        let n = name.to_owned();
        blocking(&self.hv, move |hv| hv.start(&n)).await?;
        self.events.observe(id, MachinePhase::Running, "started");
        Ok(())
    }

    /// ACPI shutdown, polled until off or `timeout`, then forced off.
    async fn stop_domain(
        &self,
        id: Uuid,
        name: &str,
        timeout: Duration,
    ) -> Result<(), ManagerError> {
        let n = name.to_owned();
        blocking(&self.hv, move |hv| hv.shutdown(&n))
            .await
            .map_err(ManagerError::Stop)?;
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
        blocking(&self.hv, move |hv| hv.destroy(&n))
            .await
            .map_err(ManagerError::Stop)?;
        self.events.observe(
            id,
            MachinePhase::Stopped,
            &format!("forced off: the guest did not shut down within {timeout:?}"),
        );
        Ok(())
    }

    /// Starts a stopped or crashed machine; a running one is left as it is.
    pub async fn start(&self, id: Uuid) -> Result<MachineState, ManagerError> {
        let lock = self.machine_lock(id);
        let _guard = lock.lock().await;
        let name = self.domain_name(id);
        let status = self.require_status(id, &name).await?;
        if matches!(status.phase, DomainPhase::Stopped | DomainPhase::Crashed) {
            self.start_domain(id, &name)
                .await
                .map_err(ManagerError::Start)?;
        }
        self.state_of(id).await
    }

    /// Stops a machine: graceful for `timeout` (the configured default when `None`), then
    /// forced. A stopped machine is left as it is.
    pub async fn stop(
        &self,
        id: Uuid,
        timeout: Option<Duration>,
    ) -> Result<MachineState, ManagerError> {
        let lock = self.machine_lock(id);
        let _guard = lock.lock().await;
        let name = self.domain_name(id);
        let status = self.require_status(id, &name).await?;
        // A crashed domain is shut off already; libvirt keeps saying "crashed" until its next
        // start, and so does the agent.
        self.power_off(
            id,
            &name,
            status.phase,
            timeout.unwrap_or(self.cfg.graceful_timeout),
        )
        .await?;
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
    ) -> Result<MachineState, ManagerError> {
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
            return Err(ManagerError::NotRunning(id));
        }
        self.stop_domain(id, &name, self.cfg.graceful_timeout)
            .await?;
        self.start_domain(id, &name)
            .await
            .map_err(ManagerError::Restart)?;
        if let Some(request_id) = request_id {
            write_atomically(&record, request_id)
                .map_err(|e| ManagerError::files(FileOp::Writing, &record, e))?;
        }
        self.state_of(id).await
    }

    /// Removes cached image files (bases, kernels, initrds) that no machine here uses and that
    /// no creation has asked for within `grace` (issue 14); returns them. In use: named by a
    /// defined domain of ours (kernels, initrds) or the backing file of any machine's overlay
    /// (a machine's directory counts even before its domain is defined). An overlay whose
    /// backing cannot be read keeps every file: better a stale base than a broken disk.
    pub async fn collect_unused_images(
        &self,
        grace: Duration,
    ) -> Result<Vec<PathBuf>, ManagerError> {
        let prefix = self.cfg.domain_prefix.clone();
        let domains = blocking(&self.hv, move |hv| hv.list(&prefix))
            .await
            .map_err(ManagerError::ReadDomains)?;
        let listed: HashSet<String> = domains.iter().map(|d| d.name.clone()).collect();
        let mut claims: Vec<String> = domains.into_iter().map(|d| d.xml).collect();
        // A machine directory without a listed domain (being created, or a domain libvirt
        // could not describe) may boot a kernel nobody here names: kernels and initrds are
        // then all kept this time.
        let mut undescribed = false;
        let dir = self.data.machines_dir();
        let files_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ManagerError::Files {
                op: FileOp::Reading,
                path,
                source,
            }
        };
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(e) => Some(e),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(files_err(&dir)(e)),
        };
        while let Some(entry) = match entries.as_mut() {
            Some(e) => e.next_entry().await.map_err(files_err(&dir))?,
            None => None,
        } {
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| Uuid::parse_str(n).ok())
            else {
                continue;
            };
            undescribed |= !listed.contains(&self.domain_name(id));
            let overlay = self.data.overlay(id);
            if !tokio::fs::try_exists(&overlay).await.unwrap_or(true) {
                continue;
            }
            match self.disks.info(&overlay).await {
                Ok(info) => claims.extend(info.backing_file),
                Err(e) => {
                    tracing::warn!(overlay = %overlay.display(), error = %crate::report::chain(&e),
                        "cannot read an overlay's backing file; keeping every cached image");
                    return Ok(Vec::new());
                }
            }
        }
        let in_use = |name: &str| {
            let boot_file = name.ends_with(ImageFileKind::Kernel.extension())
                || name.ends_with(ImageFileKind::Initrd.extension());
            (undescribed && boot_file) || claims.iter().any(|c| c.contains(name))
        };
        let removed = self
            .images
            .remove_unused(&in_use, grace)
            .await
            .map_err(ManagerError::CollectImages)?;
        for path in &removed {
            tracing::info!(path = %path.display(), "removed a cached image no machine uses");
        }
        Ok(removed)
    }

    /// Removes the domain, overlay, seed and console log. Returns whether anything existed.
    pub async fn delete(&self, id: Uuid) -> Result<bool, ManagerError> {
        let lock = self.machine_lock(id);
        let _guard = lock.lock().await;
        let name = self.domain_name(id);
        let had_domain = self.get_status(&name).await?.is_some();
        let dir = self.data.machine_dir(id);
        if had_domain && dir.is_dir() {
            // Should this process die between undefine and rm, the sweep finishes the job.
            write_marker(&dir, "delete")
                .map_err(|(path, e)| ManagerError::files(FileOp::Writing, path, e))?;
        }
        if had_domain {
            let n = name.clone();
            blocking(&self.hv, move |hv| {
                hv.destroy(&n)?;
                hv.undefine(&n)
            })
            .await
            .map_err(ManagerError::Delete)?;
        }
        // Overlays can be large: unlink them off the async workers.
        let removing = dir.clone();
        let had_files = tokio::task::spawn_blocking(move || remove_dir_if_present(&removing))
            .await
            .map_err(|e| {
                ManagerError::files(FileOp::Removing, &dir, std::io::Error::other(e.to_string()))
            })??;
        if had_domain || had_files {
            self.events.observe(id, MachinePhase::Absent, "deleted");
        }
        drop(_guard);
        self.forget_lock(id, lock);
        Ok(had_domain || had_files)
    }

    /// The actual state of one machine; `Absent` when it has no domain here.
    pub async fn state_of(&self, id: Uuid) -> Result<MachineState, ManagerError> {
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
    pub async fn list(&self) -> Result<Vec<MachineState>, ManagerError> {
        let domains = self.list_domains().await?;
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
    ) -> Result<(Vec<u8>, bool), ManagerError> {
        let max = max_bytes
            .unwrap_or(DEFAULT_CONSOLE_BYTES)
            .clamp(1, MAX_CONSOLE_BYTES);
        let name = self.domain_name(id);
        if self.get_status(&name).await?.is_none() {
            return Err(ManagerError::NotFound(id));
        }
        let path = self.data.console_log(id);
        let reading = path.clone();
        tokio::task::spawn_blocking(move || read_tail(&reading, max))
            .await
            .map_err(|e| {
                ManagerError::files(FileOp::Reading, &path, std::io::Error::other(e.to_string()))
            })?
            .map_err(|e| ManagerError::files(FileOp::Reading, &path, e))
    }

    /// One poll: reports every phase change of our domains (and disappearances) as events.
    /// A machine whose phase differs from the last one recorded is looked at again under its
    /// lock; a machine busy with an operation is skipped (the operation reports its own
    /// changes, and a poll must not interleave stale observations with them).
    ///
    /// Only the phases are compared: describing every domain (its metadata and forwards, parsed
    /// from its XML) on every poll was most of a simulated fleet's CPU at 1,000 hosts of 20
    /// machines (issue 13), and work for nothing on a real host too.
    pub async fn poll_once(&self) -> Result<(), ManagerError> {
        let domains = self.list_domains().await?;
        let mut seen = HashSet::new();
        for d in &domains {
            let Some(id) = self.machine_of(&d.name) else {
                continue;
            };
            seen.insert(id);
            if self.events.last_phase(id) != Some(machine_phase(d.phase)) {
                self.recheck(id).await?;
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
    async fn recheck(&self, id: Uuid) -> Result<(), ManagerError> {
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
            Err(e) => (
                0,
                0,
                format!("unreadable metadata: {}", crate::report::chain(&e)),
            ),
        };
        let forwards = read_user_forwards(&d.xml).unwrap_or_default();
        let phase = machine_phase(d.phase);
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

    fn metadata(&self, d: &DomainStatus) -> Result<MachineMetadata, ManagerError> {
        MachineMetadata::from_xml(&d.xml).map_err(|source| ManagerError::ForeignDomain {
            name: d.name.clone(),
            source,
        })
    }

    async fn list_domains(&self) -> Result<Vec<DomainStatus>, ManagerError> {
        let prefix = self.cfg.domain_prefix.clone();
        blocking(&self.hv, move |hv| hv.list(&prefix))
            .await
            .map_err(ManagerError::ReadDomains)
    }

    async fn get_status(&self, name: &str) -> Result<Option<DomainStatus>, ManagerError> {
        let n = name.to_owned();
        blocking(&self.hv, move |hv| hv.get(&n))
            .await
            .map_err(ManagerError::ReadDomains)
    }

    async fn require_status(&self, id: Uuid, name: &str) -> Result<DomainStatus, ManagerError> {
        self.get_status(name)
            .await?
            .ok_or(ManagerError::NotFound(id))
    }
}

/// What an image resolved to in the cache.
enum FetchedImage {
    /// A base disk for the overlay.
    Disk { base: PathBuf, format: DiskFormat },
    /// A kernel (and initrd) to boot directly; [`BootSource::Kernel`].
    Kernel(BootSource),
}

impl FetchedImage {
    fn into_boot_source(self) -> BootSource {
        match self {
            FetchedImage::Disk { .. } => BootSource::Disk,
            FetchedImage::Kernel(boot) => boot,
        }
    }
}

/// The files a creation made for the domain to use.
struct MachineFiles {
    overlay: PathBuf,
    seed: PathBuf,
}

/// In a machine's directory: the id of the last reboot carried out.
const LAST_REBOOT: &str = "last-reboot";
/// In a machine's directory: the disk generation its overlay was made for (absent: 0).
const DISK_GENERATION: &str = "disk-generation";

/// What a build does to the machine's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiskPlan {
    /// A new machine: made from the image.
    Create,
    /// A redefinition: the disk is kept, grown to the spec's size.
    Keep,
    /// A rebuild: the old disk is removed and a fresh one made from the image.
    Replace,
}

/// In a machine's directory while a rebuild makes its new disk.
const REBUILT_DISK: &str = "disk.rebuilt.qcow2";

/// Writes `content` to a temporary file beside `path`, then renames it over `path`, each step
/// synced: a reader finds the old content or the new, never part of it, even after a power
/// cut.
fn write_atomically(path: &Path, content: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content)?;
    sync_file(&tmp)?;
    std::fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// fsync of a file's content.
fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// fsync of a directory: its entries (a rename into it) survive a power cut.
pub(super) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes the [`INCOMPLETE_MARKER`]; on failure, its path and the cause.
fn write_marker(dir: &Path, what: &str) -> Result<(), (PathBuf, std::io::Error)> {
    let path = dir.join(INCOMPLETE_MARKER);
    std::fs::write(&path, what).map_err(|e| (path, e))
}

pub(super) fn remove_marker(dir: &Path) -> Result<(), ManagerError> {
    remove_file_if_present(&dir.join(INCOMPLETE_MARKER))
}

/// `rm`, absent being fine.
fn remove_file_if_present(path: &Path) -> Result<(), ManagerError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ManagerError::files(FileOp::Removing, path, e)),
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

/// The one conversion from what libvirt reports of a domain to what the agent reports of a
/// machine (which adds `Absent`, for no domain).
fn machine_phase(p: DomainPhase) -> MachinePhase {
    match p {
        DomainPhase::Stopped => MachinePhase::Stopped,
        DomainPhase::Running => MachinePhase::Running,
        DomainPhase::Paused => MachinePhase::Paused,
        DomainPhase::ShuttingDown => MachinePhase::ShuttingDown,
        DomainPhase::Crashed => MachinePhase::Crashed,
    }
}

/// `rm -r`, absent being fine; returns whether it existed.
fn remove_dir_if_present(dir: &Path) -> Result<bool, ManagerError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(ManagerError::files(FileOp::Removing, dir, e)),
    }
}

fn read_tail(path: &Path, max: u64) -> std::io::Result<(Vec<u8>, bool)> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        // Defined but never started: nothing printed yet.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((vec![], false)),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max);
    file.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    file.take(max).read_to_end(&mut buf)?;
    Ok((buf, start > 0))
}

#[cfg(test)]
mod tests;
