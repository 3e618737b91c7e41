//! SkyGate's gRPC contract (`skygate.agent.v1`) between the control plane and host agents.
//!
//! The .proto files and the tonic/prost code generated from them land with the host agent
//! (issue 3). Until then this crate only fixes the package name both sides will agree on.

/// The protobuf package of the host agent service; bumped only with a breaking wire change.
pub const AGENT_PACKAGE: &str = "skygate.agent.v1";
