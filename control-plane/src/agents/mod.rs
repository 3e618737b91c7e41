//! The control plane's side of the agent link: the `AgentRegistry` gRPC service agents join
//! through, and the pool of `HostAgent` clients the workers and the reconciler call agents
//! with. Both directions carry the shared agent token.

pub mod clients;
pub mod registry;

pub use clients::AgentClients;
pub use registry::RegistryService;
