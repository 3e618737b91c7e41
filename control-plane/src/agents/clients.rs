//! One lazily connected gRPC channel per agent address, shared by every caller; tonic
//! reconnects a channel by itself after the agent restarts.

use super::credentials::HostCredentials;
use crate::store::hosts::HostRecord;
use crate::store::machines::TaskHost;
use proto::agent::v1::host_agent_client::HostAgentClient;
use proto::bearer::BearerToken;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Where and as whom to call a host's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentTarget {
    pub host_id: String,
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
            address: h.grpc_address.clone(),
            credential_generation: h.credential_generation,
        }
    }
}

impl From<&TaskHost> for AgentTarget {
    fn from(h: &TaskHost) -> Self {
        Self {
            host_id: h.id.clone(),
            address: h.address.clone(),
            credential_generation: h.credential_generation,
        }
    }
}

/// A HostAgent client that presents the host's credential (or the join token).
pub type AgentClient = HostAgentClient<InterceptedService<Channel, BearerToken>>;

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

/// The pool.
#[derive(Debug)]
pub struct AgentClients {
    join: BearerToken,
    credentials: HostCredentials,
    tls: Option<AgentTls>,
    channels: Mutex<HashMap<String, Channel>>,
}

impl AgentClients {
    /// Plain HTTP/2 to agents unless `tls` is given (then https, verified against its CA).
    /// Each agent is called with its host's credential, derived from `credentials`, once it
    /// has joined; with the `join` token before.
    pub fn new(join: BearerToken, credentials: HostCredentials, tls: Option<AgentTls>) -> Self {
        Self {
            join,
            credentials,
            tls,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// A client for the agent of `target`.
    pub fn client(&self, target: &AgentTarget) -> Result<AgentClient, tonic::Status> {
        let address = target.address.as_str();
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match channels.get(address) {
            Some(c) => c.clone(),
            None => {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
                    .map_err(|e| {
                        tonic::Status::invalid_argument(format!("agent address {address:?}: {e}"))
                    })?
                    .connect_timeout(Duration::from_secs(5))
                    .tcp_keepalive(Some(Duration::from_secs(30)));
                if let Some(tls) = &self.tls {
                    let mut config =
                        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca));
                    if let Some((cert, key)) = &tls.identity {
                        config = config.identity(Identity::from_pem(cert, key));
                    }
                    endpoint = endpoint.tls_config(config).map_err(|e| {
                        tonic::Status::invalid_argument(format!("agent TLS settings: {e}"))
                    })?;
                }
                let channel = endpoint.connect_lazy();
                channels.insert(address.to_owned(), channel.clone());
                channel
            }
        };
        let bearer = match target.credential_generation {
            Some(generation) => {
                BearerToken::new(&self.credentials.credential(&target.host_id, generation))
                    .map_err(|_| {
                        tonic::Status::internal("a host credential is not a valid header")
                    })?
            }
            None => self.join.clone(),
        };
        Ok(HostAgentClient::with_interceptor(channel, bearer))
    }
}
