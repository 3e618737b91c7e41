//! Joining the control plane: register (name, address, capacity, hypervisor) at start and
//! heartbeat at the interval the control plane asks for; register again when it forgets the
//! host (NOT_FOUND) and keep retrying, with backoff, while it is unreachable. The agent serves
//! HostAgent whether or not the control plane answers.
//!
//! Identity: the first registration presents the shared join token and receives the host's own
//! credential, which is kept in the data dir (0600) and presented from then on; the control
//! plane accepts nothing else for this host's name. When the control plane refuses the
//! credential (an operator reset it), the agent joins again with the join token.

use std::sync::Arc;
use std::time::Duration;

use crate::identity::Credentials;
use proto::agent::v1 as agent_pb;
use proto::bearer::BearerToken;
use proto::controlplane::v1 as pb;
use proto::controlplane::v1::agent_registry_client::AgentRegistryClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::Code;

/// How long to wait between attempts while the control plane does not answer, at most.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Capacity before overcommit, and the ratios applied to it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CapacityPolicy {
    /// Physical (or configured) vCPUs.
    pub vcpus: u32,
    /// Physical (or configured) memory.
    pub memory_mib: u64,
    /// Disk for overlays.
    pub disk_gib: u64,
    /// vCPUs offered per physical CPU.
    pub cpu_overcommit: f64,
    /// Memory offered per MiB of RAM.
    pub memory_overcommit: f64,
}

impl CapacityPolicy {
    /// What the host offers to the scheduler: base × ratio, rounded down. Ratios are
    /// validated at start-up (finite, > 0).
    pub fn advertised(&self) -> agent_pb::Capacity {
        let scale = |v: f64, r: f64| (v * r).floor().max(0.0);
        agent_pb::Capacity {
            vcpus: scale(f64::from(self.vcpus), self.cpu_overcommit).min(f64::from(u32::MAX))
                as u32,
            memory_mib: scale(self.memory_mib as f64, self.memory_overcommit) as u64,
            disk_gib: self.disk_gib,
        }
    }
}

/// Checks an overcommit ratio from the command line.
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if r.is_finite() && r > 0.0 && r <= 64.0 {
        Ok(r)
    } else {
        Err(format!("{s:?}: a ratio must be above 0 and at most 64"))
    }
}

/// Everything the loop needs.
#[derive(Debug, Clone)]
pub struct Registration {
    /// `http://host:port` of the control plane's gRPC endpoint.
    pub control_plane: String,
    /// The shared join token.
    pub token: String,
    /// The host's credential, shared with the agent's server (which admits it alone once it
    /// is issued).
    pub credentials: Credentials,
    /// PEM CA that signed the control plane's registry certificate (an `https://` URL).
    pub control_plane_ca: Option<Vec<u8>>,
    /// What to register.
    pub request: pb::RegisterRequest,
    /// Asked before every heartbeat what is wrong with the host.
    pub self_check: Arc<dyn SelfCheck>,
}

/// What the agent finds wrong with its host, asked before every heartbeat: the control plane
/// shows the answer to admins (`GET /hosts`: `degraded`, `problems`) and places no machine on
/// a host with problems, so a tool that broke after start-up (a package upgrade removed
/// `qemu-img`) stops new machines from failing there.
#[async_trait::async_trait]
pub trait SelfCheck: Send + Sync + std::fmt::Debug {
    /// One short line per problem; empty when healthy.
    async fn problems(&self) -> Vec<String>;
}

/// Registers, then heartbeats forever (until the task is dropped).
pub async fn run(reg: Registration) {
    let join = match BearerToken::new(&reg.token) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "not registering");
            return;
        }
    };
    let mut backoff = Duration::from_millis(250);
    // Register with the join token instead of the credential on the next attempt.
    let mut join_next = false;
    loop {
        let use_join = std::mem::take(&mut join_next);
        match session(&reg, &join, use_join).await {
            Ok(()) => backoff = Duration::from_millis(250),
            // Our credential was refused: an operator reset it (or the control plane's secret
            // changed). Try the join token next, at once: a reset host joins again and adopts
            // a new credential. Meanwhile the agent keeps admitting only the credential it
            // has, so an answer that is not really the control plane's never reopens it to the
            // join token; should the join be refused, the next attempt uses the credential.
            Err(status)
                if status.code() == Code::Unauthenticated
                    && reg.credentials.credential().is_some()
                    && !use_join =>
            {
                tracing::warn!(
                    message = status.message(),
                    "the control plane refused this host's credential; trying to join again \
                     with the join token"
                );
                join_next = true;
                continue;
            }
            // The control plane answered and said no: retrying the same request will not
            // change its mind, but its configuration (the token) may change, so keep trying
            // at the slowest pace, saying loudly what to fix. preflight.rs checks the flags
            // behind these (--advertise, --name, the token) at start-up, so this is rare.
            Err(status) if is_refusal(status.code()) => {
                tracing::error!(
                    control_plane = %reg.control_plane,
                    code = ?status.code(),
                    message = status.message(),
                    address = %reg.request.address,
                    name = %reg.request.name,
                    "the control plane refused this agent's registration; check --agent-token, \
                     --advertise and --name"
                );
                tokio::time::sleep(MAX_BACKOFF).await;
                backoff = MAX_BACKOFF;
            }
            Err(status) => {
                tracing::warn!(
                    control_plane = %reg.control_plane,
                    code = ?status.code(),
                    message = status.message(),
                    "registration with the control plane failed; retrying"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Whether `code` means the control plane rejected the request itself (bad token, bad name or
/// address), as opposed to being unreachable or failing.
fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument | Code::Unauthenticated | Code::PermissionDenied
    )
}

/// One registration and its heartbeats; returns Ok when the control plane forgot the host
/// (register again at once), Err on any other failure. The host's credential is presented
/// when it has one (the join token with `join`), and adopted when the control plane issues
/// one.
async fn session(
    reg: &Registration,
    join: &BearerToken,
    use_join: bool,
) -> Result<(), tonic::Status> {
    let mut endpoint = Channel::from_shared(reg.control_plane.clone())
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    if let Some(ca) = &reg.control_plane_ca {
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
            .map_err(|e| tonic::Status::invalid_argument(format!("control plane TLS: {e}")))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let bearer = match reg.credentials.credential().filter(|_| !use_join) {
        Some(own) => BearerToken::new(&own)
            .map_err(|_| tonic::Status::internal("the kept credential is unusable"))?,
        None => join.clone(),
    };
    let mut client = AgentRegistryClient::with_interceptor(channel.clone(), bearer);
    let registered = client.register(reg.request.clone()).await?.into_inner();
    if !registered.host_credential.is_empty() {
        let issued = BearerToken::new(&registered.host_credential).map_err(|_| {
            tonic::Status::internal("the control plane issued an unusable credential")
        })?;
        if let Err(e) = reg.credentials.adopt(&registered.host_credential) {
            // It works until the agent restarts; then an operator must reset it.
            tracing::error!(error = %e,
                "could not keep this host's credential in the data dir; after a restart the \
                 agent cannot register until an operator resets it");
        }
        client = AgentRegistryClient::with_interceptor(channel, issued);
        tracing::info!("joined the control plane; this host now has its own credential");
    }
    let every = Duration::from_secs(u64::from(registered.heartbeat_interval_secs.clamp(1, 300)));
    tracing::info!(host_id = %registered.host_id, interval = ?every, "registered with the control plane");
    loop {
        tokio::time::sleep(every).await;
        let beat = client
            .heartbeat(pb::HeartbeatRequest {
                host_id: registered.host_id.clone(),
                capacity: reg.request.capacity,
                problems: bounded_self_check(reg.self_check.as_ref()).await,
            })
            .await;
        match beat {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {
                tracing::warn!("the control plane no longer knows this host; registering again");
                return Ok(());
            }
            Err(s) => return Err(s),
        }
    }
}

/// How long a heartbeat waits for the self-check. Well under the control plane's unreachable
/// threshold (four heartbeat intervals): a hung tool must make the host `degraded`, saying so,
/// not silently `unreachable`.
const SELF_CHECK_LIMIT: Duration = Duration::from_secs(3);

async fn bounded_self_check(check: &dyn SelfCheck) -> Vec<String> {
    match tokio::time::timeout(SELF_CHECK_LIMIT, check.problems()).await {
        Ok(problems) => problems,
        Err(_) => vec![format!(
            "the agent's self-check (its tools, its data dir) did not finish within {} s",
            SELF_CHECK_LIMIT.as_secs()
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overcommit_scales_cpu_and_memory_but_not_disk() {
        let p = CapacityPolicy {
            vcpus: 2,
            memory_mib: 1000,
            disk_gib: 50,
            cpu_overcommit: 4.0,
            memory_overcommit: 1.5,
        };
        assert_eq!(
            p.advertised(),
            agent_pb::Capacity {
                vcpus: 8,
                memory_mib: 1500,
                disk_gib: 50
            }
        );
    }

    #[test]
    fn only_answers_about_the_request_itself_are_refusals() {
        for code in [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
        ] {
            assert!(is_refusal(code), "{code:?}");
        }
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Internal] {
            assert!(!is_refusal(code), "{code:?}");
        }
    }

    #[derive(Debug)]
    struct Hung;

    #[async_trait::async_trait]
    impl SelfCheck for Hung {
        async fn problems(&self) -> Vec<String> {
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn a_self_check_that_hangs_is_reported_as_a_problem() {
        let problems = bounded_self_check(&Hung).await;
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("did not finish within 3 s"),
            "{problems:?}"
        );
    }

    #[test]
    fn ratios_must_be_positive_and_finite() {
        assert_eq!(parse_ratio("4"), Ok(4.0));
        assert_eq!(parse_ratio("0.5"), Ok(0.5));
        for bad in ["0", "-1", "inf", "NaN", "x", "65"] {
            assert!(parse_ratio(bad).is_err(), "{bad}");
        }
    }
}
