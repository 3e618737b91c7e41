//! `/admin/...`: what administrators read about the control plane's own background work.
//! `GET /admin/reconciler` shows the reconciler's last pass.

use super::extract::Admin;
use super::problem::Problem;
use crate::app::App;
use crate::reconciler::PassReport;
use axum::extract::State;
use axum::Json;
use skygate_api_types::{PassView, ReconcilerView};
use std::sync::Arc;

/// The report as the API shows it.
fn pass_view(r: PassReport) -> PassView {
    PassView {
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

/// The reconciler's last pass (administrators).
#[utoipa::path(get, path = "/admin/reconciler", tag = "admin", operation_id = "admin_reconciler",
    security(("bearer" = [])),
    responses((status = 200, body = ReconcilerView), (status = 401, body = Problem),
        (status = 403, body = Problem)))]
pub async fn reconciler(State(app): State<Arc<App>>, _admin: Admin) -> Json<ReconcilerView> {
    Json(ReconcilerView {
        last_pass: app.reconciler.last_pass().map(pass_view),
    })
}
