//! One lazily connected gRPC channel per agent address, shared by every caller; tonic
//! reconnects a channel by itself after the agent restarts.

use proto::agent::v1::host_agent_client::HostAgentClient;
use proto::bearer::BearerToken;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// A HostAgent client that presents the agent token.
pub type AgentClient = HostAgentClient<InterceptedService<Channel, BearerToken>>;

/// The pool.
#[derive(Debug)]
pub struct AgentClients {
    token: BearerToken,
    channels: Mutex<HashMap<String, Channel>>,
}

impl AgentClients {
    pub fn new(token: BearerToken) -> Self {
        Self {
            token,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// A client for the agent at `address` (`host:port`).
    pub fn client(&self, address: &str) -> Result<AgentClient, tonic::Status> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match channels.get(address) {
            Some(c) => c.clone(),
            None => {
                let endpoint = Endpoint::from_shared(format!("http://{address}"))
                    .map_err(|e| {
                        tonic::Status::invalid_argument(format!("agent address {address:?}: {e}"))
                    })?
                    .connect_timeout(Duration::from_secs(5))
                    .tcp_keepalive(Some(Duration::from_secs(30)));
                let channel = endpoint.connect_lazy();
                channels.insert(address.to_owned(), channel.clone());
                channel
            }
        };
        Ok(HostAgentClient::with_interceptor(
            channel,
            self.token.clone(),
        ))
    }
}
