//! Liveness, readiness and metrics for operators; outside `/api/v1` and unauthenticated.

use crate::app::App;
use crate::error::Result;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use std::sync::Arc;

/// Alive: the process answers.
pub async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

/// Ready: the database answers too.
pub async fn readyz(State(app): State<Arc<App>>) -> Result<impl IntoResponse> {
    app.ready().await.map_err(|e| {
        tracing::warn!(error = ?e, "readiness check: database unreachable");
        crate::error::Error::Unavailable("database unreachable")
    })?;
    Ok((StatusCode::OK, "ready\n"))
}

/// Prometheus text exposition.
pub async fn metrics(State(app): State<Arc<App>>) -> Result<impl IntoResponse> {
    let counts = app.machine_counts().await?;
    crate::metrics::set_machine_counts(&counts);
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::handle().render(),
    ))
}
