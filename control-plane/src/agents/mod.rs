//! The control plane's side of the agent link: the `AgentRegistry` gRPC service agents join
//! through, and the pool of `HostAgent` clients the workers and the reconciler call agents
//! with. Agents join with the shared join token and then use their host's own credential
//! (`credentials`).

pub mod client;
pub mod credentials;
pub mod registry;
pub mod spec;

pub use client::{AgentClients, AgentTls};
pub use registry::RegistryService;
