//! Hypervisor hosts as administrators see them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CapacityView {
    pub vcpus: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    pub id: String,
    pub name: String,
    /// Where the control plane reaches the host's agent.
    pub address: String,
    /// `unreachable` (no heartbeat lately), else `degraded` (its agent reports problems; takes
    /// no new machines), else `cordoned` (takes no new machines), else `ready`.
    pub state: String,
    pub cordoned: bool,
    /// What the agent's self-check finds wrong with the host (a tool that does not run, a data
    /// dir it cannot write), one line each; empty when healthy.
    pub problems: Vec<String>,
    /// `kvm` or `qemu`.
    pub hypervisor: String,
    /// What the host offers (after its agent's overcommit ratios).
    pub capacity: CapacityView,
    /// What its live machines are sized for.
    pub allocated: CapacityView,
    /// Live machines placed on it.
    pub machines: i64,
    pub agent_version: String,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// Set once an administrator asked to evacuate it (`POST /hosts/{id}/evacuate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evacuation: Option<EvacuationView>,
}

/// How an evacuation goes: done when no machine is left on the host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EvacuationView {
    pub requested_at: DateTime<Utc>,
    /// Live machines still on the host (those being moved included).
    pub machines_left: i64,
    /// Of those, the ones being moved now; the others could not be moved (their events say
    /// why) or were busy when it was asked (ask again).
    pub moving: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostList {
    pub items: Vec<HostView>,
}
