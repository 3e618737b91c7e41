//! Response bodies of the public API, built from what `app` returns (domain types from
//! `model`, and `app`'s own for accounts and hosts); store records never reach the API.

use crate::app::hosts::Host;
use crate::app::sessions::Account;
use crate::model::{
    DesiredState, Image, Machine, MachineEvent, MachineNetwork, MachineStatus, SavedSshKey,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub id: String,
    pub username: String,
    pub email: String,
    /// `user` or `admin`.
    pub role: String,
    pub created_at: DateTime<Utc>,
}

impl From<Account> for UserView {
    fn from(u: Account) -> Self {
        Self {
            id: u.id.to_string(),
            username: u.username,
            email: u.email,
            role: u.role.as_str().to_owned(),
            created_at: u.created_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenPairView {
    pub access_token: String,
    pub refresh_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PortView {
    pub guest: u16,
    pub host_ip: String,
    pub host_port: u16,
    pub proto: String,
}

#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct NetworkView {
    pub addresses: Vec<String>,
    pub ports: Vec<PortView>,
}

impl From<MachineNetwork> for NetworkView {
    fn from(n: MachineNetwork) -> Self {
        Self {
            addresses: n.addresses,
            ports: n
                .ports
                .into_iter()
                .map(|p| PortView {
                    guest: p.guest,
                    host_ip: p.host_ip,
                    host_port: p.host_port,
                    proto: p.proto,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MachineView {
    pub id: String,
    pub owner_id: String,
    pub hostname: String,
    pub status: MachineStatus,
    pub desired_state: DesiredState,
    /// Image name.
    pub image: String,
    pub vcpus: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
    /// Name of the host the machine is placed on, once placed.
    pub host: Option<String>,
    /// Whether that host answers: `ready` or `unreachable` (then the machine's status is the
    /// last one known).
    pub host_state: Option<String>,
    pub network: NetworkView,
    pub failure_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<Machine> for MachineView {
    fn from(m: Machine) -> Self {
        Self {
            id: m.id.to_string(),
            owner_id: m.owner_id.to_string(),
            hostname: m.hostname,
            status: m.status,
            desired_state: m.desired,
            image: m.image_name,
            vcpus: m.vcpus,
            memory_mib: m.memory_mib,
            disk_gib: m.disk_gib,
            host: m.host_name,
            host_state: m.host_state,
            network: m.network.map(NetworkView::from).unwrap_or_default(),
            failure_reason: m.failure_reason,
            created_at: m.created_at,
            updated_at: m.updated_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MachinePage {
    pub items: Vec<MachineView>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    pub action: String,
    pub status: MachineStatus,
    pub message: String,
    pub created_at: DateTime<Utc>,
}

impl From<MachineEvent> for EventView {
    fn from(e: MachineEvent) -> Self {
        Self {
            action: e.action,
            status: e.status,
            message: e.message,
            created_at: e.created_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    pub items: Vec<EventView>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ImageView {
    pub id: String,
    pub name: String,
    /// Where agents fetch it from; administrators only (absent for tenants).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub format: String,
    pub sha256: Option<String>,
    /// Direct kernel boot details; administrators only (absent for tenants).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub boot: Option<serde_json::Value>,
    /// Whether the image boots a kernel directly (what a tenant needs to know of `boot`).
    pub direct_kernel_boot: bool,
    pub created_at: DateTime<Utc>,
}

impl ImageView {
    /// The image as `admin` or a tenant may see it.
    pub fn for_caller(i: Image, admin: bool) -> Self {
        Self {
            id: i.id.to_string(),
            name: i.name,
            direct_kernel_boot: i.boot.is_some(),
            source: admin.then_some(i.source),
            format: i.format,
            sha256: i.sha256,
            boot: if admin { i.boot } else { None },
            created_at: i.created_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ImageList {
    pub items: Vec<ImageView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SshKeyView {
    pub id: String,
    pub name: String,
    pub public_key: String,
    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    pub created_at: DateTime<Utc>,
}

impl From<SavedSshKey> for SshKeyView {
    fn from(k: SavedSshKey) -> Self {
        Self {
            id: k.id.to_string(),
            name: k.name,
            public_key: k.public_key,
            fingerprint: k.fingerprint,
            created_at: k.created_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SshKeyList {
    pub items: Vec<SshKeyView>,
    /// Pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CapacityView {
    pub vcpus: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
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
}

impl From<crate::model::scheduler::Resources> for CapacityView {
    fn from(r: crate::model::scheduler::Resources) -> Self {
        Self {
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            disk_gib: r.disk_gib,
        }
    }
}

impl From<Host> for HostView {
    fn from(h: Host) -> Self {
        Self {
            id: h.id,
            name: h.name,
            address: h.address,
            state: h.state,
            cordoned: h.cordoned,
            problems: h.problems,
            hypervisor: h.hypervisor,
            capacity: h.capacity.into(),
            allocated: h.allocated.into(),
            machines: h.machines,
            agent_version: h.agent_version,
            last_heartbeat_at: h.last_heartbeat_at,
            created_at: h.created_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HostList {
    pub items: Vec<HostView>,
}
