//! The one client of host agents: `AgentClients` keeps one lazily connected gRPC channel per
//! agent address, shared by every caller (tonic reconnects a channel by itself after the agent
//! restarts), and hands out an `AgentClient` per host with one method per agent call. Each
//! method takes and returns domain types, has its deadline set in one place (`deadline`), is
//! counted and timed in metrics by call and outcome, and fails with one error type
//! (`AgentCallError`) decided in one place.

use super::credentials::HostCredentials;
use super::error::{AgentCallError, Call, ClientSetupError};
use super::spec::AgentSpec;
use super::wire::{self, HostInfo};
use crate::model::{MachineChange, MachineId, MachineOnHost};
use crate::store::hosts::HostRecord;
use crate::store::machines::TaskHost;
use crate::timing::WorkflowSettings;
use proto::agent::v1 as pb;
use proto::agent::v1::host_agent_client::HostAgentClient;
use proto::bearer::BearerToken;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Where and as whom to call a host's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentTarget {
    pub host_id: String,
    /// The host's name, as errors and logs name it.
    pub name: String,
    /// `host:port`.
    pub address: String,
    /// The generation of the host's credential once its agent joined; `None`: the agent
    /// still takes the join token (it joined before credentials existed).
    pub credential_generation: Option<i64>,
}

impl From<&HostRecord> for AgentTarget {
    fn from(h: &HostRecord) -> Self {
        Self {
            host_id: h.id.clone(),
            name: h.name.clone(),
            address: h.grpc_address.clone(),
            credential_generation: h.credential_generation,
        }
    }
}

impl From<&TaskHost> for AgentTarget {
    fn from(h: &TaskHost) -> Self {
        Self {
            host_id: h.id.clone(),
            name: h.name.clone(),
            address: h.address.clone(),
            credential_generation: h.credential_generation,
        }
    }
}

/// TLS towards agents: the CA that signed their certificates and, for mutual TLS, the
/// control plane's own certificate and key (PEM).
#[derive(Clone)]
pub struct AgentTls {
    pub ca: Vec<u8>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for AgentTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTls")
            .field("mutual", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// The settings that bound agent calls.
#[derive(Debug, Clone, Copy)]
pub struct CallTiming {
    /// The longest EnsureMachine may take (it may fetch a multi-GiB image).
    pub transition_timeout: Duration,
    /// Graceful stop before the agent forces a machine off.
    pub stop_timeout: Duration,
}

impl From<&WorkflowSettings> for CallTiming {
    fn from(s: &WorkflowSettings) -> Self {
        Self {
            transition_timeout: s.transition_timeout,
            stop_timeout: s.stop_timeout,
        }
    }
}

/// How long each call may take before it counts as unanswered; `None` for the event stream,
/// which lasts as long as both sides do. The one place agent deadlines are written.
fn deadline(call: Call, timing: &CallTiming) -> Option<Duration> {
    let secs = Duration::from_secs;
    match call {
        Call::HostInfo | Call::Console => Some(secs(10)),
        Call::Get | Call::List => Some(secs(15)),
        // Fetching a multi-GiB image can take a while; the deadline covers the worst case. So
        // does moving a disk: the export lasts as long as the import reads it.
        Call::Ensure | Call::ExportDisk | Call::ImportDisk => Some(timing.transition_timeout),
        Call::Start | Call::Delete | Call::Release => Some(secs(120)),
        // The graceful stop, then the forced one.
        Call::Stop => Some(timing.stop_timeout + secs(60)),
        // A reboot stops the guest (gracefully first), then starts it.
        Call::Reboot => Some(timing.stop_timeout + secs(120)),
        Call::Watch => None,
    }
}

/// The most console output one read returns.
const CONSOLE_BYTES: u32 = 64 * 1024;

/// The pool.
#[derive(Debug)]
pub struct AgentClients {
    join: BearerToken,
    credentials: HostCredentials,
    tls: Option<AgentTls>,
    timing: CallTiming,
    channels: Mutex<HashMap<String, Channel>>,
}

impl AgentClients {
    /// Plain HTTP/2 to agents unless `tls` is given (then https, verified against its CA).
    /// Each agent is called with its host's credential, derived from `credentials`, once it
    /// has joined; with the `join` token before.
    pub fn new(
        join: BearerToken,
        credentials: HostCredentials,
        tls: Option<AgentTls>,
        timing: CallTiming,
    ) -> Self {
        Self {
            join,
            credentials,
            tls,
            timing,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// A client for the agent of `target`.
    pub fn client(&self, target: &AgentTarget) -> Result<AgentClient, AgentCallError> {
        self.connect(target)
            .map_err(|source| AgentCallError::Setup {
                host: target.name.clone(),
                source,
            })
    }

    fn connect(&self, target: &AgentTarget) -> Result<AgentClient, ClientSetupError> {
        let address = target.address.as_str();
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match channels.get(address) {
            Some(c) => c.clone(),
            None => {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
                    .map_err(|source| ClientSetupError::Address {
                        address: address.to_owned(),
                        source,
                    })?
                    .connect_timeout(Duration::from_secs(5))
                    .tcp_keepalive(Some(Duration::from_secs(30)));
                if let Some(tls) = &self.tls {
                    let mut config =
                        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca));
                    if let Some((cert, key)) = &tls.identity {
                        config = config.identity(Identity::from_pem(cert, key));
                    }
                    endpoint = endpoint.tls_config(config).map_err(ClientSetupError::Tls)?;
                }
                let channel = endpoint.connect_lazy();
                channels.insert(address.to_owned(), channel.clone());
                channel
            }
        };
        let bearer = match target.credential_generation {
            Some(generation) => {
                BearerToken::new(&self.credentials.credential(&target.host_id, generation))
                    .map_err(|_| ClientSetupError::Credential)?
            }
            None => self.join.clone(),
        };
        Ok(AgentClient {
            host: target.name.clone(),
            timing: self.timing,
            grpc: HostAgentClient::with_interceptor(channel, bearer),
        })
    }
}

type Grpc = HostAgentClient<InterceptedService<Channel, BearerToken>>;

/// One host's agent, called as that host (its credential, or the join token before it joined).
#[derive(Debug, Clone)]
pub struct AgentClient {
    host: String,
    timing: CallTiming,
    grpc: Grpc,
}

impl AgentClient {
    /// Sends one request with the call's deadline, records it in metrics, and decides what a
    /// failure means.
    async fn call<Req, Resp, F, Fut>(
        &self,
        call: Call,
        message: Req,
        send: F,
    ) -> Result<Resp, AgentCallError>
    where
        F: FnOnce(Grpc, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let mut request = tonic::Request::new(message);
        if let Some(limit) = deadline(call, &self.timing) {
            request.set_timeout(limit);
        }
        let started = Instant::now();
        let result = send(self.grpc.clone(), request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| AgentCallError::from_status(call, &self.host, status));
        let outcome = result.as_ref().map_or_else(AgentCallError::kind, |_| "ok");
        crate::metrics::agent_call(call.as_str(), outcome, started.elapsed());
        result
    }

    /// A machine's state from a reply that must name it.
    fn state(&self, call: Call, wire: pb::MachineState) -> Result<MachineOnHost, AgentCallError> {
        let id = wire.machine_id.clone();
        wire::machine_on_host(wire).ok_or_else(|| AgentCallError::Failed {
            host: self.host.clone(),
            call,
            source: tonic::Status::internal(format!("the reply names no machine: {id:?}")),
        })
    }

    /// GetHostInfo: capacity, usage and versions.
    pub async fn host_info(&self) -> Result<HostInfo, AgentCallError> {
        let reply = self
            .call(
                Call::HostInfo,
                pb::GetHostInfoRequest {},
                |mut c, r| async move { c.get_host_info(r).await },
            )
            .await?;
        Ok(wire::host_info(reply))
    }

    /// EnsureMachine: makes the machine exist as `spec` says (idempotent per generation).
    pub async fn ensure(&self, spec: AgentSpec) -> Result<MachineOnHost, AgentCallError> {
        let message = pb::EnsureMachineRequest { spec: Some(spec.0) };
        let reply = self
            .call(Call::Ensure, message, |mut c, r| async move {
                c.ensure_machine(r).await
            })
            .await?;
        self.state(Call::Ensure, reply)
    }

    /// StartMachine.
    pub async fn start(&self, id: MachineId) -> Result<MachineOnHost, AgentCallError> {
        let reply = self
            .call(Call::Start, machine_ref(id), |mut c, r| async move {
                c.start_machine(r).await
            })
            .await?;
        self.state(Call::Start, reply)
    }

    /// StopMachine: graceful for the stop timeout, then forced.
    pub async fn stop(&self, id: MachineId) -> Result<MachineOnHost, AgentCallError> {
        let message = pb::StopMachineRequest {
            machine_id: id.to_string(),
            graceful_timeout_secs: u32::try_from(self.timing.stop_timeout.as_secs())
                .unwrap_or(u32::MAX),
        };
        let reply = self
            .call(Call::Stop, message, |mut c, r| async move {
                c.stop_machine(r).await
            })
            .await?;
        self.state(Call::Stop, reply)
    }

    /// RebootMachine. `request_id` is stable across retries of one reboot: a retry after the
    /// agent already rebooted (the caller died before recording it) does not reboot again.
    pub async fn reboot(
        &self,
        id: MachineId,
        request_id: &str,
    ) -> Result<MachineOnHost, AgentCallError> {
        let message = pb::RebootMachineRequest {
            machine_id: id.to_string(),
            request_id: request_id.to_owned(),
        };
        let reply = self
            .call(Call::Reboot, message, |mut c, r| async move {
                c.reboot_machine(r).await
            })
            .await?;
        self.state(Call::Reboot, reply)
    }

    /// DeleteMachine: removes the domain and its files; whether anything was there.
    pub async fn delete(&self, id: MachineId) -> Result<bool, AgentCallError> {
        let reply = self
            .call(Call::Delete, machine_ref(id), |mut c, r| async move {
                c.delete_machine(r).await
            })
            .await?;
        Ok(reply.existed)
    }

    /// ReleaseMachine: undefines the machine's domain and keeps its disk (a move gives up the
    /// name and UUID on its source); whether there was a domain.
    pub async fn release(&self, id: MachineId) -> Result<bool, AgentCallError> {
        let reply = self
            .call(Call::Release, machine_ref(id), |mut c, r| async move {
                c.release_machine(r).await
            })
            .await?;
        Ok(reply.existed)
    }

    /// GetMachine: the machine's state as the hypervisor reports it now.
    pub async fn get(&self, id: MachineId) -> Result<MachineOnHost, AgentCallError> {
        let reply = self
            .call(Call::Get, machine_ref(id), |mut c, r| async move {
                c.get_machine(r).await
            })
            .await?;
        self.state(Call::Get, reply)
    }

    /// ListMachines: every domain the agent owns; names that are not machine ids are left out.
    pub async fn list(&self) -> Result<Vec<MachineOnHost>, AgentCallError> {
        let reply = self
            .call(
                Call::List,
                pb::ListMachinesRequest {},
                |mut c, r| async move { c.list_machines(r).await },
            )
            .await?;
        Ok(reply
            .machines
            .into_iter()
            .filter_map(wire::machine_on_host)
            .collect())
    }

    /// WatchEvents after `after_sequence` (0: everything the agent still keeps). Fails with
    /// `ResumeLost` when the agent cannot resume there.
    pub async fn watch(&self, after_sequence: u64) -> Result<Changes, AgentCallError> {
        let message = pb::WatchEventsRequest { after_sequence };
        let stream = self
            .call(Call::Watch, message, |mut c, r| async move {
                c.watch_events(r).await
            })
            .await?;
        Ok(Changes { stream })
    }

    /// GetConsole: the tail of the machine's serial console.
    pub async fn console(&self, id: MachineId) -> Result<Vec<u8>, AgentCallError> {
        let message = pb::GetConsoleRequest {
            machine_id: id.to_string(),
            max_bytes: CONSOLE_BYTES,
        };
        let reply = self
            .call(Call::Console, message, |mut c, r| async move {
                c.get_console(r).await
            })
            .await?;
        Ok(reply.data)
    }
}

/// Moves machine `id`'s disk from `source` to `target`: ExportDisk's chunks are relayed into
/// ImportDisk as they come (two in flight: a slow side slows the other, nothing piles up
/// here), ending with the source's SHA-256, which the target checks. `spec` is the machine's
/// (the target fetches its image's base). Returns the bytes moved. A failure on the source's
/// side is reported as the source's, not as the truncated import it causes.
pub async fn move_disk(
    source: &AgentClient,
    target: &AgentClient,
    id: MachineId,
    spec: &AgentSpec,
) -> Result<u64, AgentCallError> {
    use pb::import_disk_request::Part;
    let mut chunks = source
        .call(Call::ExportDisk, machine_ref(id), |mut c, r| async move {
            c.export_disk(r).await
        })
        .await?;
    let header = pb::ImportDiskRequest {
        part: Some(Part::Header(pb::ImportDiskHeader {
            machine_id: id.to_string(),
            image: spec.0.image.clone(),
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ImportDiskRequest>(2);
    let source_host = source.host.clone();
    let relay = tokio::spawn(async move {
        if tx.send(header).await.is_err() {
            return Ok(());
        }
        loop {
            match chunks.message().await {
                Ok(Some(chunk)) => {
                    let last = !chunk.sha256.is_empty();
                    let part = Some(Part::Chunk(chunk));
                    if tx.send(pb::ImportDiskRequest { part }).await.is_err() || last {
                        return Ok(());
                    }
                }
                // Ended without its digest: the import sees the stream end and refuses.
                Ok(None) => return Ok(()),
                Err(status) => {
                    return Err(AgentCallError::from_status(
                        Call::ExportDisk,
                        &source_host,
                        status,
                    ))
                }
            }
        }
    });
    let imported = target
        .call(
            Call::ImportDisk,
            tokio_stream::wrappers::ReceiverStream::new(rx),
            |mut c, r| async move { c.import_disk(r).await },
        )
        .await;
    let relayed = relay.await.unwrap_or(Ok(()));
    match (imported, relayed) {
        (Ok(done), _) => Ok(done.bytes),
        (Err(_), Err(source_side)) => Err(source_side),
        (Err(target_side), Ok(())) => Err(target_side),
    }
}

fn machine_ref(id: MachineId) -> pb::MachineRef {
    pb::MachineRef {
        machine_id: id.to_string(),
    }
}

/// An open WatchEvents stream.
#[derive(Debug)]
pub struct Changes {
    stream: tonic::Streaming<pb::MachineEvent>,
}

impl Changes {
    /// The next change; `None` once the stream has ended or broken (the agent shut down, or
    /// this reader fell behind): resume after the last sequence seen.
    pub async fn next(&mut self) -> Option<MachineChange> {
        match self.stream.message().await {
            Ok(Some(event)) => Some(wire::machine_change(&event)),
            Ok(None) | Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_but_the_stream_has_a_deadline_that_follows_the_settings() {
        let timing = CallTiming {
            transition_timeout: Duration::from_secs(900),
            stop_timeout: Duration::from_secs(30),
        };
        for call in Call::ALL {
            assert_eq!(
                deadline(call, &timing).is_none(),
                call == Call::Watch,
                "{call}"
            );
        }
        assert_eq!(
            deadline(Call::Ensure, &timing),
            Some(Duration::from_secs(900))
        );
        assert_eq!(deadline(Call::Stop, &timing), Some(Duration::from_secs(90)));
        assert_eq!(
            deadline(Call::Reboot, &timing),
            Some(Duration::from_secs(150))
        );
    }
}
