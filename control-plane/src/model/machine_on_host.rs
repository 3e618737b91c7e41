//! A machine as its host's agent reports it: the phase of its domain, the generation of the
//! spec the domain was built from, and its network. The control plane's view of the
//! hypervisor's truth, beside `MachineStatus` (what the control plane recorded).

use super::{MachineId, MachineNetwork};

/// The phase of a machine's domain on its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseOnHost {
    /// The host has no domain for the machine.
    Absent,
    /// Defined, not running.
    Stopped,
    Running,
    Paused,
    ShuttingDown,
    /// The guest or its QEMU died.
    Crashed,
    /// A phase this control plane does not know (a newer agent).
    Unknown,
}

/// One machine on one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineOnHost {
    pub id: MachineId,
    /// The generation of the spec the domain was built from (0 when absent).
    pub generation: u64,
    pub phase: PhaseOnHost,
    pub network: MachineNetwork,
    /// The agent's words on the phase (why a domain crashed, say).
    pub message: String,
}

/// An agent's notice that a machine's domain changed. It says only *that* something changed:
/// whoever reacts reads the state afresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineChange {
    /// Increases with every notice from one agent run.
    pub sequence: u64,
    /// `None` when the agent named something that is not a machine id.
    pub machine: Option<MachineId>,
}
