//! `/hosts`: hypervisor hosts, for administrators. Hosts appear when their agent registers.

use super::extract::{ApiPath, ApiQuery, Caller};
use super::params::ForceQuery;
use super::problem::Problem;
use super::views::{HostList, HostView};
use crate::app::App;
use crate::error::Result;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use std::sync::Arc;
use uuid::Uuid;

/// Hypervisor hosts with their capacity, allocation, state and last heartbeat.
#[utoipa::path(get, path = "/hosts", tag = "hosts", security(("bearer" = [])),
    responses((status = 200, body = HostList), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn host_list(State(app): State<Arc<App>>, Caller(who): Caller) -> Result<Json<HostList>> {
    let items: Vec<HostView> = app
        .host_list(who)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(Json(HostList { items }))
}

/// One host, with its evacuation's progress when one was asked for.
#[utoipa::path(get, path = "/hosts/{id}", tag = "hosts", operation_id = "host_get", params(("id" = uuid::Uuid, Path, description = "the resource's id (a UUID; anything else names nothing: 404)")),
    security(("bearer" = [])),
    responses((status = 200, body = HostView), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn host_get(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<HostView>> {
    Ok(Json(app.host_get(who, id).await?.into()))
}

/// Evacuate a host: it is cordoned and each of its machines moves to another host with room.
///
/// One durable `move` task per running or stopped machine: a running one is stopped, its
/// disk streamed from this host's agent to the other's (checked by SHA-256 there), and it is
/// started again there; a stopped one is moved as it is. Its disk survives; its forwarded port
/// may change (the machine shows the new one). A move that fails leaves the machine on this
/// host as it was. Machines busy with something else are left (ask again once they settle).
/// Progress in `evacuation` of `GET /hosts/{id}`: done when no machine is left.
#[utoipa::path(post, path = "/hosts/{id}/evacuate", tag = "hosts", operation_id = "host_evacuate", params(("id" = uuid::Uuid, Path, description = "the resource's id (a UUID; anything else names nothing: 404)")),
    security(("bearer" = [])),
    responses((status = 202, body = HostView), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn evacuate(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<(StatusCode, Json<HostView>)> {
    let host = app.host_evacuate(who, id).await?;
    Ok((StatusCode::ACCEPTED, Json(host.into())))
}

/// Stop placing new machines on a host; those already there stay.
#[utoipa::path(post, path = "/hosts/{id}/cordon", tag = "hosts", operation_id = "host_cordon", params(("id" = uuid::Uuid, Path, description = "the resource's id (a UUID; anything else names nothing: 404)")),
    security(("bearer" = [])),
    responses((status = 200, body = HostView), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn cordon(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<HostView>> {
    Ok(Json(app.host_set_cordoned(who, id, true).await?.into()))
}

/// Let the scheduler place machines on a host again.
#[utoipa::path(post, path = "/hosts/{id}/uncordon", tag = "hosts", operation_id = "host_uncordon", params(("id" = uuid::Uuid, Path, description = "the resource's id (a UUID; anything else names nothing: 404)")),
    security(("bearer" = [])),
    responses((status = 200, body = HostView), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn uncordon(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<HostView>> {
    Ok(Json(app.host_set_cordoned(who, id, false).await?.into()))
}

/// Forget a host; refused (409) while live machines are placed on it, unless `force=true`:
/// then they are forgotten with it. A host whose agent is still running registers again at
/// its next heartbeat, and its agent removes what is left of forgotten machines.
#[utoipa::path(delete, path = "/hosts/{id}", tag = "hosts", operation_id = "host_delete", params(("id" = uuid::Uuid, Path, description = "the resource's id (a UUID; anything else names nothing: 404)"), ForceQuery),
    security(("bearer" = [])),
    responses((status = 204), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn delete(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<ForceQuery>,
) -> Result<StatusCode> {
    app.host_delete(who, id, q.force == Some(true)).await?;
    Ok(StatusCode::NO_CONTENT)
}
