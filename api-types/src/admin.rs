//! What administrators read about the control plane's own background work, and the audit log.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// The reconciler's status (`GET /admin/reconciler`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReconcilerView {
    /// The last finished pass; `null` before the first one (or when this control plane runs
    /// no reconciler: it has no agent token).
    pub last_pass: Option<PassView>,
}

/// One pass of the reconciler over every ready host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PassView {
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// Ready hosts asked for their machines, whatever they answered.
    pub hosts_checked: u64,
    /// Machines compared with what their hosts listed.
    pub machines_checked: u64,
    /// Repairs written (machines marked stopped, running or failed; orphaned domains removed).
    pub repairs: u64,
    /// How each check ended, by name, every name present: `compared` (a host listed and
    /// compared), `host_unreachable`, `agent_refused`, `agent_failed`, `client_failed`,
    /// `store_failed` (inconclusive host checks), `repaired`, `machine_changed` (a repair
    /// found the machine changed meanwhile and wrote nothing), `repair_failed`.
    pub outcomes: BTreeMap<String, u64>,
}

/// One audited call.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditEventView {
    pub at: DateTime<Utc>,
    /// The authenticated caller, when there was one.
    pub actor_id: Option<String>,
    /// The username a login or registration named (no token yet).
    pub actor_name: Option<String>,
    /// `METHOD /route/{template}`, e.g. `POST /machines/{id}/stop`.
    pub action: String,
    /// The path called, e.g. `/api/v1/machines/0193.../stop`.
    pub target: String,
    /// The HTTP status answered.
    pub outcome: u16,
    pub request_id: String,
    /// The client's address.
    pub client: String,
}

/// A page of the audit log, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditEventPage {
    pub items: Vec<AuditEventView>,
    /// Pass as `cursor` for the next (older) page; null on the last.
    pub next_cursor: Option<String>,
}
