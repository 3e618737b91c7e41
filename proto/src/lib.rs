//! SkyGate's gRPC contract between the control plane and host agents: the `.proto` files under
//! `proto/` and the tonic/prost code generated from them at build time.

pub mod bearer;
pub mod ssh_key;

/// `skygate.agent.v1`: the host agent service, its client and its messages.
pub mod agent {
    /// Version 1 of the host agent contract.
    #[allow(
        missing_docs,
        missing_debug_implementations,
        unused_qualifications,
        clippy::all
    )]
    pub mod v1 {
        tonic::include_proto!("skygate.agent.v1");
    }
}

/// `skygate.controlplane.v1`: what agents call on the control plane (registration,
/// heartbeats).
pub mod controlplane {
    /// Version 1 of the registry contract.
    #[allow(
        missing_docs,
        missing_debug_implementations,
        unused_qualifications,
        clippy::all
    )]
    pub mod v1 {
        tonic::include_proto!("skygate.controlplane.v1");
    }
}

/// The protobuf package of the host agent service; bumped only with a breaking wire change.
pub const AGENT_PACKAGE: &str = "skygate.agent.v1";

/// gRPC metadata on a HostAgent error: the step of creating or starting a machine that failed
/// (`image`, `disk`, `seed`, `define`, `start`). Present only when the agent ran that step and it
/// failed; its absence means the call never got that far (an outage, a refusal, a race).
pub const STEP_METADATA: &str = "skygate-step";
