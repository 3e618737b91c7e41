//! The `skygate.agent.v1.HostAgent` gRPC service: converts wire messages to the agent's model
//! types and back, one conversion per type. Errors become statuses through status.rs, the one
//! mapping (a wire message the model refuses is a [`ManagerError::InvalidSpec`] there too).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use proto::agent::v1 as pb;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::domain_xml::HypervisorKind;
use crate::events::{EventLog, MachineEvent};
use crate::machines::{ExportPart, ImportError, MachineManager, ManagerError};
use crate::model::{
    parse_machine_id, DesiredPower, DiskFormat, ImagePlan, MachinePhase, MachineSpec, MachineState,
    SourceFile, SpecError,
};

/// Who this host is and what it offers.
#[derive(Debug, Clone)]
pub struct HostIdentity {
    /// Name reported to the control plane.
    pub name: String,
    /// The accelerator in use.
    pub hypervisor: HypervisorKind,
    /// What the host offers, after overcommit.
    pub capacity: pb::Capacity,
}

/// The wire form of an accelerator.
pub fn hypervisor_to_wire(kind: HypervisorKind) -> pb::HypervisorKind {
    match kind {
        HypervisorKind::Kvm => pb::HypervisorKind::Kvm,
        HypervisorKind::Qemu => pb::HypervisorKind::Qemu,
    }
}

/// The service.
#[derive(Debug, Clone)]
pub struct HostAgentService {
    manager: Arc<MachineManager>,
    events: Arc<EventLog>,
    host: HostIdentity,
    /// Turns true when the server shuts down: open WatchEvents streams end then, or the
    /// server would wait for them forever.
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl HostAgentService {
    /// A service over `manager`, streaming from `events`.
    pub fn new(manager: Arc<MachineManager>, events: Arc<EventLog>, host: HostIdentity) -> Self {
        HostAgentService {
            manager,
            events,
            host,
            shutdown: tokio::sync::watch::channel(false).1,
        }
    }

    /// Ends streams when `shutdown` turns true.
    pub fn with_shutdown(mut self, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        self.shutdown = shutdown;
        self
    }
}

fn invalid(field: &'static str, reason: &str) -> Status {
    refused(SpecError::new(field, reason))
}

/// A request the model refuses, as the one mapping renders it.
fn refused(e: SpecError) -> Status {
    Status::from(ManagerError::InvalidSpec(e))
}

fn source(url: String, sha256: String) -> SourceFile {
    SourceFile { url, sha256 }
}

/// Wire spec → validated spec.
pub fn spec_from_wire(spec: Option<pb::MachineSpec>) -> Result<MachineSpec, Status> {
    let spec = spec.ok_or_else(|| invalid("spec", "is required"))?;
    let plan = image_from_wire(spec.image)?;
    let desired = match pb::PowerState::try_from(spec.desired_power) {
        Ok(pb::PowerState::Running) => DesiredPower::Running,
        Ok(pb::PowerState::Stopped) => DesiredPower::Stopped,
        _ => return Err(invalid("desired_power", "must be RUNNING or STOPPED")),
    };
    Ok(MachineSpec {
        id: parse_machine_id(&spec.machine_id).map_err(refused)?,
        generation: spec.generation,
        hostname: spec.hostname,
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        disk_gib: spec.disk_gib,
        image: plan,
        ssh_keys: spec.ssh_authorized_keys,
        user_data: spec.user_data,
        desired,
        disk_generation: spec.disk_generation,
        disk_must_exist: spec.disk_must_exist,
    })
}

/// Wire image → the agent's plan for it.
fn image_from_wire(image: Option<pb::ImageSource>) -> Result<ImagePlan, Status> {
    let image = image.ok_or_else(|| invalid("image", "is required"))?;
    let format = pb::DiskFormat::try_from(image.format)
        .map_err(|_| invalid("image.format", "unknown format"))?;
    Ok(match format {
        pb::DiskFormat::Qcow2 | pb::DiskFormat::Raw => ImagePlan::Disk {
            base: source(image.url, image.sha256),
            format: if format == pb::DiskFormat::Qcow2 {
                DiskFormat::Qcow2
            } else {
                DiskFormat::Raw
            },
        },
        pb::DiskFormat::Kernel => {
            let k = image
                .kernel_boot
                .ok_or_else(|| invalid("image.kernel_boot", "is required for format kernel"))?;
            ImagePlan::Kernel {
                kernel: source(k.kernel_url, k.kernel_sha256),
                initrd: (!k.initrd_url.is_empty()).then(|| source(k.initrd_url, k.initrd_sha256)),
                cmdline: k.cmdline,
            }
        }
        pb::DiskFormat::Unspecified => return Err(invalid("image.format", "is required")),
    })
}

fn phase_to_wire(p: MachinePhase) -> pb::MachinePhase {
    match p {
        MachinePhase::Absent => pb::MachinePhase::Absent,
        MachinePhase::Stopped => pb::MachinePhase::Stopped,
        MachinePhase::Running => pb::MachinePhase::Running,
        MachinePhase::Paused => pb::MachinePhase::Paused,
        MachinePhase::ShuttingDown => pb::MachinePhase::ShuttingDown,
        MachinePhase::Crashed => pb::MachinePhase::Crashed,
    }
}

fn state_to_wire(s: MachineState) -> pb::MachineState {
    pb::MachineState {
        machine_id: s.id.to_string(),
        generation: s.generation,
        phase: phase_to_wire(s.phase) as i32,
        domain_name: s.domain_name,
        network: Some(pb::MachineNetwork {
            addresses: s.addresses,
            ports: s
                .forwards
                .into_iter()
                .map(|f| pb::PortForward {
                    guest_port: f.guest_port.into(),
                    host_ip: f.host_ip.to_string(),
                    host_port: f.host_port.into(),
                    proto: "tcp".into(),
                })
                .collect(),
        }),
        message: s.message,
    }
}

fn event_to_wire(e: MachineEvent) -> pb::MachineEvent {
    pb::MachineEvent {
        sequence: e.sequence,
        machine_id: e.machine_id.to_string(),
        phase: phase_to_wire(e.phase) as i32,
        reason: e.reason,
        at_unix_ms: e.at_unix_ms,
    }
}

fn machine_id(raw: &str) -> Result<uuid::Uuid, Status> {
    parse_machine_id(raw).map_err(refused)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::MachineEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::host_agent_server::HostAgent for HostAgentService {
    async fn get_host_info(
        &self,
        _: Request<pb::GetHostInfoRequest>,
    ) -> Result<Response<pb::HostInfo>, Status> {
        let facts = self.manager.host_facts().await?;
        let machines = self.manager.list().await?;
        let allocated = pb::Capacity {
            vcpus: machines.iter().map(|v| v.vcpus).sum(),
            memory_mib: machines.iter().map(|v| v.memory_mib).sum(),
            disk_gib: machines.iter().map(|v| v.disk_gib).sum(),
        };
        Ok(Response::new(pb::HostInfo {
            name: self.host.name.clone(),
            hypervisor: hypervisor_to_wire(self.host.hypervisor) as i32,
            capacity: Some(self.host.capacity),
            allocated: Some(allocated),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            libvirt_version: facts.libvirt_version,
            domain_prefix: self.manager.config().domain_prefix.clone(),
            machine_count: u32::try_from(machines.len()).unwrap_or(u32::MAX),
        }))
    }

    async fn ensure_machine(
        &self,
        request: Request<pb::EnsureMachineRequest>,
    ) -> Result<Response<pb::MachineState>, Status> {
        let spec = spec_from_wire(request.into_inner().spec)?;
        let state = self.manager.ensure(spec).await?;
        Ok(Response::new(state_to_wire(state)))
    }

    async fn start_machine(
        &self,
        request: Request<pb::MachineRef>,
    ) -> Result<Response<pb::MachineState>, Status> {
        let id = machine_id(&request.into_inner().machine_id)?;
        Ok(Response::new(state_to_wire(self.manager.start(id).await?)))
    }

    async fn stop_machine(
        &self,
        request: Request<pb::StopMachineRequest>,
    ) -> Result<Response<pb::MachineState>, Status> {
        let req = request.into_inner();
        let id = machine_id(&req.machine_id)?;
        let timeout = (req.graceful_timeout_secs > 0)
            .then(|| Duration::from_secs(req.graceful_timeout_secs.min(3600).into()));
        Ok(Response::new(state_to_wire(
            self.manager.stop(id, timeout).await?,
        )))
    }

    async fn reboot_machine(
        &self,
        request: Request<pb::RebootMachineRequest>,
    ) -> Result<Response<pb::MachineState>, Status> {
        let r = request.into_inner();
        let id = machine_id(&r.machine_id)?;
        let request_id = (!r.request_id.is_empty()).then_some(r.request_id.as_str());
        Ok(Response::new(state_to_wire(
            self.manager.reboot(id, request_id).await?,
        )))
    }

    async fn delete_machine(
        &self,
        request: Request<pb::MachineRef>,
    ) -> Result<Response<pb::DeleteMachineResponse>, Status> {
        let id = machine_id(&request.into_inner().machine_id)?;
        let existed = self.manager.delete(id).await?;
        Ok(Response::new(pb::DeleteMachineResponse { existed }))
    }

    async fn release_machine(
        &self,
        request: Request<pb::MachineRef>,
    ) -> Result<Response<pb::DeleteMachineResponse>, Status> {
        let id = machine_id(&request.into_inner().machine_id)?;
        let existed = self.manager.release(id).await?;
        Ok(Response::new(pb::DeleteMachineResponse { existed }))
    }

    async fn get_machine(
        &self,
        request: Request<pb::MachineRef>,
    ) -> Result<Response<pb::MachineState>, Status> {
        let id = machine_id(&request.into_inner().machine_id)?;
        Ok(Response::new(state_to_wire(
            self.manager.state_of(id).await?,
        )))
    }

    async fn list_machines(
        &self,
        _: Request<pb::ListMachinesRequest>,
    ) -> Result<Response<pb::ListMachinesResponse>, Status> {
        let machines = self.manager.list().await?;
        Ok(Response::new(pb::ListMachinesResponse {
            machines: machines.into_iter().map(state_to_wire).collect(),
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let after = request.into_inner().after_sequence;
        let (backlog, rx) = self.events.subscribe(after)?;
        let last_backlog = backlog.last().map_or(after, |e| e.sequence);
        let live = BroadcastStream::new(rx).filter_map(move |item| match item {
            // Already delivered from the backlog.
            Ok(e) if e.sequence <= last_backlog => None,
            Ok(e) => Some(Ok(event_to_wire(e))),
            Err(BroadcastStreamRecvError::Lagged(n)) => Some(Err(crate::status::lagged(n))),
        });
        let events = tokio_stream::iter(backlog.into_iter().map(|e| Ok(event_to_wire(e))))
            .chain(live)
            .map(Some);
        // `None` marks shutdown; the stream ends there.
        let stop = tokio_stream::wrappers::WatchStream::new(self.shutdown.clone())
            .filter(|down| *down)
            .map(|_| None);
        let stream = events.merge(stop).map_while(|item| item);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_console(
        &self,
        request: Request<pb::GetConsoleRequest>,
    ) -> Result<Response<pb::ConsoleTail>, Status> {
        let req = request.into_inner();
        let id = machine_id(&req.machine_id)?;
        let max = (req.max_bytes > 0).then_some(u64::from(req.max_bytes));
        let (data, truncated) = self.manager.console(id, max).await?;
        Ok(Response::new(pb::ConsoleTail { data, truncated }))
    }

    type ExportDiskStream = Pin<Box<dyn Stream<Item = Result<pb::DiskChunk, Status>> + Send>>;

    async fn export_disk(
        &self,
        request: Request<pb::MachineRef>,
    ) -> Result<Response<Self::ExportDiskStream>, Status> {
        let id = machine_id(&request.into_inner().machine_id)?;
        let parts = self.manager.export_disk(id).await?;
        let chunks = tokio_stream::wrappers::ReceiverStream::new(parts).map(|part| {
            Ok(match part? {
                ExportPart::Data(data) => pb::DiskChunk {
                    data,
                    sha256: String::new(),
                },
                ExportPart::Done { sha256 } => pb::DiskChunk {
                    data: Vec::new(),
                    sha256,
                },
            })
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn import_disk(
        &self,
        request: Request<tonic::Streaming<pb::ImportDiskRequest>>,
    ) -> Result<Response<pb::ImportDiskResponse>, Status> {
        use pb::import_disk_request::Part;
        let mut parts = request.into_inner();
        let header = match parts.message().await?.and_then(|m| m.part) {
            Some(Part::Header(h)) => h,
            _ => return Err(invalid("header", "must come first")),
        };
        let id = machine_id(&header.machine_id)?;
        let image = image_from_wire(header.image)?;
        let mut import = self.manager.import_begin(id, &image).await?;
        while let Some(message) = parts.message().await? {
            let Some(Part::Chunk(chunk)) = message.part else {
                return Err(invalid("header", "comes once, first"));
            };
            if !chunk.sha256.is_empty() {
                let bytes = self.manager.import_finish(import, &chunk.sha256).await?;
                return Ok(Response::new(pb::ImportDiskResponse { bytes }));
            }
            import.write(&chunk.data).await?;
        }
        Err(ManagerError::ImportDisk(ImportError::Truncated).into())
    }
}
