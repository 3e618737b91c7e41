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

/// gRPC metadata on a HostAgent error: which refusal it is, so a caller never infers meaning
/// from a bare code (NOT_FOUND is also what an unknown method or a proxy answers).
pub const REASON_METADATA: &str = "skygate-reason";

/// The values of [`REASON_METADATA`].
pub mod reason {
    /// NOT_FOUND: this host has no domain for the machine (it is gone, or was never made).
    pub const MACHINE_NOT_FOUND: &str = "machine-not-found";
    /// FAILED_PRECONDITION: the spec's generation is older than the one applied.
    pub const STALE_GENERATION: &str = "stale-generation";
    /// FAILED_PRECONDITION: the spec's generation equals the applied one but its content
    /// differs (two writers produced one generation).
    pub const GENERATION_CONFLICT: &str = "generation-conflict";
    /// FAILED_PRECONDITION: the action needs a running machine.
    pub const NOT_RUNNING: &str = "not-running";
}
