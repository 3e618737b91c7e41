//! The control plane's side of the agent link: the `AgentRegistry` gRPC service agents join
//! through, and the one client of `HostAgent` (`client`) the workers, the reconciler and the
//! API's console call agents with: typed calls (`wire`, `spec` turn domain types into messages
//! and back), one error (`error`). Agents join with the shared join token and then use their
//! host's own credential (`credentials`). Nothing outside this module touches `proto::agent`
//! messages or reads a gRPC status from an agent.

pub mod client;
pub mod credentials;
pub mod error;
pub mod heartbeats;
pub mod registry;
pub mod spec;
pub mod wire;

pub use client::{AgentClient, AgentClients, AgentTarget, AgentTls, CallTiming};
pub use error::{AgentCallError, Call};
pub use registry::RegistryService;
pub use spec::{machine_spec, AgentSpec, SpecProblem};
