//! The generated contract works end to end: a server implementing `HostAgent` on a real
//! socket on 127.0.0.1, reached by the generated client, unary and streaming.

use proto::agent::v1::host_agent_client::HostAgentClient;
use proto::agent::v1::host_agent_server::{HostAgent, HostAgentServer};
use proto::agent::v1::*;
use std::pin::Pin;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

/// Answers GetHostInfo and WatchEvents; everything else is unimplemented.
struct Probe;

type Events = Pin<Box<dyn Stream<Item = Result<MachineEvent, Status>> + Send>>;

#[tonic::async_trait]
impl HostAgent for Probe {
    async fn get_host_info(
        &self,
        _: Request<GetHostInfoRequest>,
    ) -> Result<Response<HostInfo>, Status> {
        Ok(Response::new(HostInfo {
            name: "probe".into(),
            hypervisor: HypervisorKind::Qemu as i32,
            capacity: Some(Capacity {
                vcpus: 2,
                memory_mib: 4096,
                disk_gib: 20,
            }),
            ..Default::default()
        }))
    }
    async fn ensure_machine(
        &self,
        _: Request<EnsureMachineRequest>,
    ) -> Result<Response<MachineState>, Status> {
        Err(Status::unimplemented("probe"))
    }
    async fn start_machine(
        &self,
        _: Request<MachineRef>,
    ) -> Result<Response<MachineState>, Status> {
        Err(Status::unimplemented("probe"))
    }
    async fn stop_machine(
        &self,
        _: Request<StopMachineRequest>,
    ) -> Result<Response<MachineState>, Status> {
        Err(Status::unimplemented("probe"))
    }
    async fn reboot_machine(
        &self,
        _: Request<RebootMachineRequest>,
    ) -> Result<Response<MachineState>, Status> {
        Err(Status::unimplemented("probe"))
    }
    async fn delete_machine(
        &self,
        _: Request<MachineRef>,
    ) -> Result<Response<DeleteMachineResponse>, Status> {
        Err(Status::unimplemented("probe"))
    }
    async fn get_machine(&self, _: Request<MachineRef>) -> Result<Response<MachineState>, Status> {
        Err(Status::unimplemented("probe"))
    }
    async fn list_machines(
        &self,
        _: Request<ListMachinesRequest>,
    ) -> Result<Response<ListMachinesResponse>, Status> {
        Err(Status::unimplemented("probe"))
    }
    type WatchEventsStream = Events;
    async fn watch_events(
        &self,
        req: Request<WatchEventsRequest>,
    ) -> Result<Response<Events>, Status> {
        let after = req.into_inner().after_sequence;
        let events = (after + 1..=after + 3).map(|sequence| {
            Ok(MachineEvent {
                sequence,
                machine_id: "m".into(),
                phase: MachinePhase::Running as i32,
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }
    async fn get_console(
        &self,
        _: Request<GetConsoleRequest>,
    ) -> Result<Response<ConsoleTail>, Status> {
        Err(Status::unimplemented("probe"))
    }
    async fn release_machine(
        &self,
        _: Request<MachineRef>,
    ) -> Result<Response<DeleteMachineResponse>, Status> {
        Err(Status::unimplemented("probe"))
    }
    type ExportDiskStream = Pin<Box<dyn Stream<Item = Result<DiskChunk, Status>> + Send>>;
    async fn export_disk(
        &self,
        _: Request<MachineRef>,
    ) -> Result<Response<Self::ExportDiskStream>, Status> {
        Err(Status::unimplemented("probe"))
    }
    async fn import_disk(
        &self,
        _: Request<tonic::Streaming<ImportDiskRequest>>,
    ) -> Result<Response<ImportDiskResponse>, Status> {
        Err(Status::unimplemented("probe"))
    }
}

#[tokio::test]
async fn generated_client_and_server_talk_over_a_socket() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(HostAgentServer::new(Probe))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = HostAgentClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    let info = client
        .get_host_info(GetHostInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "probe");
    assert_eq!(info.hypervisor(), HypervisorKind::Qemu);
    assert_eq!(info.capacity.unwrap().memory_mib, 4096);

    let status = client
        .get_machine(MachineRef {
            machine_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);

    let events: Vec<u64> = client
        .watch_events(WatchEventsRequest { after_sequence: 41 })
        .await
        .unwrap()
        .into_inner()
        .map(|e| e.unwrap().sequence)
        .collect()
        .await;
    assert_eq!(events, [42, 43, 44]);
    server.abort();
}

#[test]
fn specs_round_trip_through_the_wire_format() {
    use prost::Message;
    let spec = MachineSpec {
        machine_id: "0193f2c4-0000-7000-8000-000000000001".into(),
        generation: 7,
        hostname: "web-1".into(),
        vcpus: 2,
        memory_mib: 512,
        disk_gib: 10,
        image: Some(ImageSource {
            name: "tiny".into(),
            format: DiskFormat::Kernel as i32,
            kernel_boot: Some(KernelBoot {
                cmdline: "console=ttyS0".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ssh_authorized_keys: vec!["ssh-ed25519 AAAA k".into()],
        user_data: None,
        desired_power: PowerState::Running as i32,
        disk_generation: 2,
        disk_must_exist: true,
    };
    let decoded = MachineSpec::decode(spec.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded, spec);
    assert_eq!(
        decoded.image.unwrap().kernel_boot.unwrap().cmdline,
        "console=ttyS0"
    );
}

/// A control plane from before `RebootMachineRequest` sends a `MachineRef`; an agent from before reads
/// one. Both must still name the machine.
#[test]
fn reboot_requests_are_wire_compatible_with_machine_refs() {
    use prost::Message;
    let old = MachineRef {
        machine_id: "m-1".into(),
    };
    let new = RebootMachineRequest::decode(old.encode_to_vec().as_slice()).unwrap();
    assert_eq!(new.machine_id, "m-1");
    assert!(new.request_id.is_empty());
    let back = MachineRef::decode(
        RebootMachineRequest {
            machine_id: "m-2".into(),
            request_id: "t".into(),
        }
        .encode_to_vec()
        .as_slice(),
    )
    .unwrap();
    assert_eq!(back.machine_id, "m-2");
}
