//! A machine as SkyGate shows it (with its host's and image's names), and a line of its log.
//! What the store reads and the API renders; no rules here.

use super::{DesiredState, MachineId, MachineNetwork, MachineStatus, UserId};
use chrono::{DateTime, Utc};

/// A stored machine (live, unless a caller asked for history), as tenants see it. What it
/// boots with (keys, user data) is read only for its agent (`TaskMachine`): a list page does
/// not carry up to 64 KiB of user data per row that no answer shows.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Strictly increasing creation order; the keyset for pagination.
    pub seq: i64,
    pub id: MachineId,
    pub owner_id: UserId,
    pub hostname: String,
    pub status: MachineStatus,
    pub desired: DesiredState,
    pub host_name: Option<String>,
    /// `ready` or `unreachable`, once placed.
    pub host_state: Option<String>,
    pub image_name: String,
    pub vcpus: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
    pub network: Option<MachineNetwork>,
    pub failure_reason: Option<String>,
    pub restart_policy: super::RestartPolicy,
    pub labels: std::collections::BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One line of a machine's log.
#[derive(Debug, Clone)]
pub struct MachineEvent {
    pub seq: i64,
    pub action: String,
    pub status: MachineStatus,
    pub message: String,
    pub created_at: DateTime<Utc>,
}
