//! `/admin/...`: what administrators read about the control plane's own background work.
//! `GET /admin/reconciler` shows the reconciler's last pass.

use super::extract::Admin;
use super::problem::Problem;
use crate::app::App;
use crate::reconciler::PassReport;
use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use utoipa::ToSchema;

/// The reconciler's status.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReconcilerView {
    /// The last finished pass; `null` before the first one (or when this control plane runs
    /// no reconciler: it has no agent token).
    pub last_pass: Option<PassView>,
}

/// One pass over every ready host.
#[derive(Debug, Serialize, ToSchema)]
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

impl From<PassReport> for PassView {
    fn from(r: PassReport) -> Self {
        Self {
            started_at: r.started_at,
            finished_at: r.finished_at,
            hosts_checked: r.hosts_checked,
            machines_checked: r.machines_checked,
            repairs: r.repairs,
            outcomes: r
                .outcomes
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        }
    }
}

/// The reconciler's last pass (administrators).
#[utoipa::path(get, path = "/admin/reconciler", tag = "admin", operation_id = "admin_reconciler",
    security(("bearer" = [])),
    responses((status = 200, body = ReconcilerView), (status = 401, body = Problem),
        (status = 403, body = Problem)))]
pub async fn reconciler(State(app): State<Arc<App>>, _admin: Admin) -> Json<ReconcilerView> {
    Json(ReconcilerView {
        last_pass: app.reconciler.last_pass().map(Into::into),
    })
}
