//! Machines: what a tenant asks for, what the API shows of them, and their log.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use utoipa::{IntoParams, ToSchema};

/// What SkyGate knows about a machine right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MachineStatus {
    Pending,
    Provisioning,
    Running,
    Stopping,
    Stopped,
    Starting,
    Rebooting,
    /// A stopped machine taking its new size (`POST /machines/{id}/resize`); stopped after.
    Resizing,
    /// Getting a fresh disk (`POST /machines/{id}/rebuild`); running or stopped after, as
    /// it was.
    Rebuilding,
    /// Being moved to another host (its host is being evacuated); running or stopped after,
    /// as it was, on the new host or, if the move failed, on the old one.
    Moving,
    Deleting,
    Deleted,
    Failed,
}

/// What the tenant asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    Running,
    Stopped,
    Deleted,
}

impl MachineStatus {
    /// Every status, in lifecycle order (for metrics and validation).
    pub const ALL: [MachineStatus; 13] = [
        Self::Pending,
        Self::Provisioning,
        Self::Running,
        Self::Stopping,
        Self::Stopped,
        Self::Starting,
        Self::Rebooting,
        Self::Resizing,
        Self::Rebuilding,
        Self::Moving,
        Self::Deleting,
        Self::Deleted,
        Self::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Provisioning => "provisioning",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Starting => "starting",
            Self::Rebooting => "rebooting",
            Self::Resizing => "resizing",
            Self::Rebuilding => "rebuilding",
            Self::Moving => "moving",
            Self::Deleting => "deleting",
            Self::Deleted => "deleted",
            Self::Failed => "failed",
        }
    }
}

impl DesiredState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Deleted => "deleted",
        }
    }
}

impl fmt::Display for MachineStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status or desired-state string that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown state '{0}'")]
pub struct UnknownState(pub String);

impl FromStr for MachineStatus {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

impl FromStr for DesiredState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Running, Self::Stopped, Self::Deleted]
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// Also `Serialize`: its canonical JSON is what an Idempotency-Key is bound to.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMachineParams {
    /// An RFC 1123 label: 1–63 of `[a-z0-9-]`, not starting or ending with '-'; unique among
    /// your machines (409 otherwise).
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
    )]
    pub hostname: String,
    /// Name of a registered image (`GET /images`); an unknown name is 422.
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = r"^[a-z0-9][a-z0-9._-]{0,62}$"
    )]
    pub image: String,
    /// 1–32 (the server's default `--max-vcpus`; a server may allow fewer or more: 422).
    #[schema(minimum = 1, maximum = 32)]
    pub vcpus: i64,
    /// 64–262144 MiB (the default `--max-memory-mib`; a server may allow fewer or more: 422).
    #[schema(minimum = 64, maximum = 262144)]
    pub memory_mib: i64,
    /// 1–2048 GiB (the default `--max-disk-gib`; a server may allow fewer or more: 422).
    #[schema(minimum = 1, maximum = 2048)]
    pub disk_gib: i64,
    /// At most 32 entries, each an OpenSSH public key line or the name of one of your saved
    /// keys (422 when it is neither).
    #[serde(default)]
    #[schema(max_items = 32)]
    pub ssh_keys: Vec<String>,
    /// cloud-init user data: at most 65536 bytes of UTF-8, no NUL characters.
    #[schema(max_length = 65536, pattern = r"^[^\u0000]*$")]
    pub user_data: Option<String>,
    /// What happens when the machine's QEMU dies; `never` when left out.
    // Left out of the body when absent, so what an Idempotency-Key was bound to before this
    // field existed hashes the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<RestartPolicy>,
    /// Key/value labels, at most 64: keys 1–63 of `[a-z0-9._/-]` starting and ending with a
    /// letter or digit, values 0–63 of `[A-Za-z0-9._-]` (else 422).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// What happens when a machine's QEMU dies. `never`: it reads `stopped` and waits for you.
/// `on-failure`: it is started again after a backoff, at most a server-set number of times in
/// a window (5 in 10 minutes by default), then stays stopped with an event saying why. A guest
/// that powers itself off is never restarted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    Never,
    OnFailure,
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Never => "never",
            RestartPolicy::OnFailure => "on-failure",
        }
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RestartPolicy {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [RestartPolicy::Never, RestartPolicy::OnFailure]
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// `GET /machines/{id}/wait` query.
#[derive(Debug, Clone, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// The status to wait for; `failed` and `deleted` also end the wait.
    #[param(value_type = MachineStatus)]
    pub status: String,
    /// How long to wait: seconds, or a number with `s` or `m` (`60s`, `2m`); at most 300 s,
    /// default 60 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(pattern = r"^[0-9]{1,6}[sm]?$")]
    pub timeout: Option<String>,
}

/// `PATCH /machines/{id}`: the settings that change nothing on the host.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachinePatch {
    pub restart_policy: Option<RestartPolicy>,
    /// Label changes, as a JSON merge patch (RFC 7396): a key with a string sets that label, a
    /// key with `null` removes it, labels not named stay.
    pub labels: Option<BTreeMap<String, Option<String>>>,
}

/// `POST /machines/{id}/resize`: the new size of a stopped machine; what is not named stays.
/// The disk only grows (the guest sees the new size at its next boot).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResizeParams {
    /// 1–32 (the server's `--max-vcpus`).
    #[schema(minimum = 1, maximum = 32)]
    pub vcpus: Option<i64>,
    /// 64–262144 MiB (the server's `--max-memory-mib`).
    #[schema(minimum = 64, maximum = 262144)]
    pub memory_mib: Option<i64>,
    /// At least the disk's size now, at most 2048 GiB (the server's `--max-disk-gib`).
    #[schema(minimum = 1, maximum = 2048)]
    pub disk_gib: Option<i64>,
}

/// `POST /machines/{id}/rebuild`: a fresh disk from `image` (default: the machine's own).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RebuildParams {
    /// Name of a registered image that is not deprecated (the machine's own image may be).
    pub image: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListMachinesQuery {
    /// 1–200, default 50.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page. Opaque and signed: anything else is 400.
    #[param(min_length = 1)]
    pub cursor: Option<String>,
    /// Only machines in this status.
    #[param(value_type = Option<MachineStatus>)]
    pub status: Option<String>,
    /// Only machines carrying this label: `KEY=VALUE` (e.g. `env=prod`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PortView {
    pub guest: u16,
    pub host_ip: String,
    pub host_port: u16,
    pub proto: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct NetworkView {
    pub addresses: Vec<String>,
    pub ports: Vec<PortView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MachinePage {
    pub items: Vec<MachineView>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// One event of `GET /events` (the `data` of an SSE event named `machine`, whose `id` is
/// `position`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StreamEventView {
    /// Where the event is in the stream: increases with every event, in the order they were
    /// committed; pass the last one seen as `Last-Event-ID` to resume.
    pub position: i64,
    pub machine_id: String,
    pub hostname: String,
    pub action: String,
    pub status: MachineStatus,
    pub message: String,
    pub created_at: DateTime<Utc>,
}

/// The `data` of an SSE event named `lost`: the stream could not go on from `last_event_id`
/// (this server never wrote it) and goes on from `resume_from`; what came between is in
/// each machine's `GET /machines/{id}/events`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LostEventsView {
    pub last_event_id: i64,
    pub resume_from: i64,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    pub action: String,
    pub status: MachineStatus,
    pub message: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    pub items: Vec<EventView>,
    pub next_cursor: Option<String>,
}
