//! `skygate.controlplane.v1.AgentRegistry`: agents register (name, address, capacity) and
//! heartbeat. Who may register a name is decided here (`decide_registration`: the join token
//! once, the host's own credential after); validation keeps garbage out of the hosts table;
//! the store does the rest.

use super::credentials::HostCredentials;
use super::heartbeats::SteadyHeartbeats;
use crate::model::scheduler::Resources;
use crate::store::hosts::{HostIdentity, HostRegistration, Refusal, RegisterDecision, Registered};
use crate::store::Store;
use proto::agent::v1 as agent_pb;
use proto::bearer::BearerAuth;
use proto::controlplane::v1 as pb;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// The service.
#[derive(Debug, Clone)]
pub struct RegistryService {
    store: Store,
    /// The shared join token (`--agent-token`).
    join: BearerAuth,
    credentials: HostCredentials,
    heartbeat_interval: Duration,
    unreachable_after: Duration,
    /// Heartbeats that change nothing but the time, written by [`super::heartbeats::flush`].
    steady: Arc<SteadyHeartbeats>,
}

impl RegistryService {
    pub fn new(
        store: Store,
        join_token: &str,
        credentials: HostCredentials,
        heartbeat_interval: Duration,
        unreachable_after: Duration,
        steady: Arc<SteadyHeartbeats>,
    ) -> Self {
        Self {
            store,
            join: BearerAuth::new(join_token),
            credentials,
            heartbeat_interval,
            unreachable_after,
            steady,
        }
    }
}

/// Who may register a host name, given what the host's row says (`None`: a new name) and
/// what the caller presented: the join token for a name without a credential (then one is
/// issued), the host's own credential for a name with one. The join token never takes over a
/// host that holds a credential: that is what stopped a second agent with the shared token from
/// re-pointing a live host at itself (issue 10).
pub fn decide_registration(
    existing: Option<&HostIdentity>,
    presented_join_token: bool,
    credential_matches: impl Fn(&HostIdentity) -> bool,
) -> RegisterDecision {
    match existing {
        Some(host) if host.credential_issued => {
            if credential_matches(host) {
                RegisterDecision::Rejoin
            } else if presented_join_token {
                RegisterDecision::Refuse(Refusal::HoldsCredential)
            } else {
                RegisterDecision::Refuse(Refusal::Unauthenticated)
            }
        }
        _ if presented_join_token => RegisterDecision::Join,
        _ => RegisterDecision::Refuse(Refusal::Unauthenticated),
    }
}

/// The answer to a refused registration, logged without the bearer.
fn refusal(why: Refusal, name: &str, address: &str) -> Status {
    match why {
        Refusal::Unauthenticated => {
            tracing::warn!(host = %name, "registration refused: wrong bearer");
            unauthenticated()
        }
        Refusal::HoldsCredential => {
            tracing::warn!(host = %name, address,
                "registration with the join token refused: the host holds its own credential");
            Status::permission_denied(format!(
                "host {name} already holds its own credential: its agent registers with that \
                 (kept in its data dir as host-credential); if it was lost, an operator resets \
                 it with `skygate-control-plane admin reset-host-credential --name {name}`"
            ))
        }
    }
}

fn unauthenticated() -> Status {
    // One answer for missing and wrong, like the REST API's 401.
    Status::unauthenticated("missing or wrong bearer token in the authorization metadata")
}

fn internal(e: crate::Error) -> Status {
    tracing::error!(error = ?e, "registry store call failed");
    Status::internal("the control plane could not record this")
}

fn capacity(c: Option<agent_pb::Capacity>) -> Result<Resources, Status> {
    let c = c.ok_or_else(|| Status::invalid_argument("capacity is required"))?;
    let to_i64 = |v: u64, what: &str| {
        i64::try_from(v)
            .map_err(|_| Status::invalid_argument(format!("capacity {what} is too large")))
    };
    Ok(Resources {
        vcpus: i64::from(c.vcpus),
        memory_mib: to_i64(c.memory_mib, "memory_mib")?,
        disk_gib: to_i64(c.disk_gib, "disk_gib")?,
    })
}

/// A host name: 1-63 characters of `[A-Za-z0-9._-]`.
fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `host:port` with a port; a name or an IP address before it.
fn valid_address(address: &str) -> bool {
    address.len() <= 255
        && address.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        })
        && !address.chars().any(|c| c.is_whitespace() || c == '/')
}

#[tonic::async_trait]
impl pb::agent_registry_server::AgentRegistry for RegistryService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let presented = BearerAuth::presented(&request)
            .ok_or_else(unauthenticated)?
            .to_owned();
        let join_token = self.join.is_token(presented.as_bytes());
        let r = request.into_inner();
        if !valid_name(&r.name) {
            return Err(Status::invalid_argument(
                "name must be 1-63 characters of letters, digits, '.', '_' and '-'",
            ));
        }
        if !valid_address(&r.address) {
            return Err(Status::invalid_argument("address must be host:port"));
        }
        let hypervisor = match agent_pb::HypervisorKind::try_from(r.hypervisor) {
            Ok(agent_pb::HypervisorKind::Kvm) => "kvm",
            Ok(agent_pb::HypervisorKind::Qemu) => "qemu",
            _ => return Err(Status::invalid_argument("hypervisor must be KVM or QEMU")),
        };
        let reg = HostRegistration {
            name: r.name.clone(),
            grpc_address: r.address,
            hypervisor: hypervisor.into(),
            agent_version: r.agent_version.chars().take(64).collect(),
            domain_prefix: r.domain_prefix.chars().take(64).collect(),
            capacity: capacity(r.capacity)?,
        };
        let credentials = &self.credentials;
        let matches = |host: &HostIdentity| {
            credentials.verify(&presented, &host.id, host.credential_generation)
        };
        let existing = self.store.host_by_name(&reg.name).await.map_err(internal)?;
        // Who the caller is comes first (the store decides again, atomically, below): nothing
        // about a host — not even whether its name is live — is told to a caller that may not
        // register it.
        let known = existing.as_ref().map(|h| HostIdentity {
            id: h.id.clone(),
            credential_issued: h.credential_generation.is_some(),
            credential_generation: h.credential_generation.unwrap_or(0),
        });
        if let RegisterDecision::Refuse(why) =
            decide_registration(known.as_ref(), join_token, matches)
        {
            return Err(refusal(why, &r.name, &reg.grpc_address));
        }
        // Two live agents claiming one name would point the host at the wrong hypervisor (and
        // the reconciler would judge one's machines by the other's domains): a different
        // domain prefix under a name that heartbeated lately is refused. A restarted agent
        // (same prefix, maybe a new port) is the same host.
        if let Some(existing) = existing {
            let now = self.store.clock().await.map_err(internal)?;
            let fresh = existing
                .last_heartbeat_at
                .is_some_and(|t| (now - t).to_std().unwrap_or_default() < self.unreachable_after);
            if existing.state == "ready" && fresh && existing.domain_prefix != reg.domain_prefix {
                return Err(Status::already_exists(format!(
                    "host {} is registered by a live agent with another domain prefix",
                    reg.name
                )));
            }
        }
        let registered = self
            .store
            .host_register(&reg, |existing| {
                decide_registration(existing, join_token, matches)
            })
            .await
            .map_err(internal)?;
        let (host_id, was_unreachable, issued) = match registered {
            Registered::Accepted {
                id,
                was_unreachable,
                issued_generation,
            } => (id, was_unreachable, issued_generation),
            Registered::Refused(why) => return Err(refusal(why, &r.name, &reg.grpc_address)),
        };
        tracing::info!(host = %r.name, %host_id, address = %reg.grpc_address,
            joined = issued.is_some(), "agent registered");
        if was_unreachable {
            tracing::info!(host = %r.name, "host is reachable again");
        }
        let host_credential = issued
            .map(|generation| self.credentials.credential(&host_id, generation))
            .unwrap_or_default();
        Ok(Response::new(pb::RegisterResponse {
            host_id,
            heartbeat_interval_secs: u32::try_from(self.heartbeat_interval.as_secs())
                .unwrap_or(u32::MAX)
                .max(1),
            host_credential,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let presented = BearerAuth::presented(&request)
            .ok_or_else(unauthenticated)?
            .to_owned();
        let r = request.into_inner();
        // A heartbeat carries the host's credential; a host that never had one issued (it
        // joined before credentials existed) may still use the join token until it registers.
        let found = self
            .store
            .host_for_heartbeat(&r.host_id)
            .await
            .map_err(internal)?;
        let (identity, report) = found.unzip();
        let admitted = match &identity {
            Some(host) if host.credential_issued => {
                self.credentials
                    .verify(&presented, &host.id, host.credential_generation)
            }
            Some(_) => self.join.is_token(presented.as_bytes()),
            // Unknown ids: only a caller holding the join token learns that.
            None if self.join.is_token(presented.as_bytes()) => {
                return Err(Status::not_found("no such host: register again"));
            }
            None => false,
        };
        if !admitted {
            return Err(unauthenticated());
        }
        let capacity = capacity(r.capacity)?;
        let problems = problems(r.problems);
        if report.is_some_and(|was| {
            was.ready && was.capacity == capacity && was.problems == problems.join("\n")
        }) {
            self.steady.note(&r.host_id);
            return Ok(Response::new(pb::HeartbeatResponse {}));
        }
        let Some(change) = self
            .store
            .host_heartbeat(&r.host_id, capacity, &problems)
            .await
            .map_err(internal)?
        else {
            return Err(Status::not_found("no such host: register again"));
        };
        if change.problems_changed {
            if problems.is_empty() {
                tracing::info!(host_id = %r.host_id, "host reports no problems any more");
            } else {
                tracing::warn!(host_id = %r.host_id, ?problems, "host reports problems; it takes no new machines");
            }
        }
        if change.was_unreachable {
            tracing::info!(host_id = %r.host_id, "host is reachable again");
        }
        Ok(Response::new(pb::HeartbeatResponse {}))
    }
}

/// At most this many problems of at most this many characters each are kept per host: an
/// agent (or anything holding its token) cannot fill the hosts table.
const MAX_PROBLEMS: usize = 16;
const MAX_PROBLEM_CHARS: usize = 300;

/// A heartbeat's problems as stored: one line each, trimmed, bounded, empty ones dropped.
fn problems(reported: Vec<String>) -> Vec<String> {
    reported
        .iter()
        .map(|p| {
            let line: String = p
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(MAX_PROBLEM_CHARS)
                .collect();
            line.trim().to_owned()
        })
        .filter(|p| !p.is_empty())
        .take(MAX_PROBLEMS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(issued: bool) -> HostIdentity {
        HostIdentity {
            id: "h".into(),
            credential_issued: issued,
            credential_generation: 3,
        }
    }

    #[test]
    fn the_join_token_joins_once_and_never_takes_a_host_over() {
        use RegisterDecision::*;
        let yes = |_: &HostIdentity| true;
        let no = |_: &HostIdentity| false;
        // A new name, or a host from before credentials: the join token joins.
        assert_eq!(decide_registration(None, true, no), Join);
        assert_eq!(decide_registration(Some(&host(false)), true, no), Join);
        // A host with a credential: only the credential registers it.
        assert_eq!(decide_registration(Some(&host(true)), false, yes), Rejoin);
        assert_eq!(
            decide_registration(Some(&host(true)), true, no),
            Refuse(Refusal::HoldsCredential)
        );
        // Anything else is nobody.
        for existing in [None, Some(host(false)), Some(host(true))] {
            assert_eq!(
                decide_registration(existing.as_ref(), false, no),
                Refuse(Refusal::Unauthenticated)
            );
        }
    }

    #[test]
    fn names_and_addresses_are_checked() {
        assert!(valid_name("host-1.example"));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
        assert!(!valid_name(&"a".repeat(64)));
        assert!(valid_address("127.0.0.1:9091"));
        assert!(valid_address("agent.example:443"));
        assert!(valid_address("[::1]:9091"));
        assert!(!valid_address("127.0.0.1"));
        assert!(!valid_address("127.0.0.1:0"));
        assert!(!valid_address("http://x:1"));
        assert!(!valid_address(":9091"));
    }

    #[test]
    fn problems_are_one_bounded_line_each() {
        let mut reported = vec![
            "  qemu-img does not run: No such file or directory \n".to_owned(),
            "".to_owned(),
            "two\nlines".to_owned(),
            "x".repeat(1000),
        ];
        reported.extend((0..40).map(|i| format!("p{i}")));
        let kept = problems(reported);
        assert_eq!(kept[0], "qemu-img does not run: No such file or directory");
        assert_eq!(kept[1], "two lines");
        assert_eq!(kept[2].chars().count(), MAX_PROBLEM_CHARS);
        assert_eq!(kept.len(), MAX_PROBLEMS);
        assert!(problems(vec![" ".into()]).is_empty());
    }
}
