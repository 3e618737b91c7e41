//! `/machines`: create (idempotent), list (keyset pages), read, lifecycle actions, delete,
//! events, console.

use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::params::{
    page_limit, wait_timeout, CreateMachineParams, ForceQuery, ListMachinesQuery, MachinePatch,
    PageQuery, RebuildParams, ResizeParams, WaitQuery,
};
use super::problem::Problem;
use super::views::{EventPage, MachinePage, MachineView};
use crate::app::idempotency::{request_hash, IdempotencyKey};
use crate::app::machines::{CreateMachine, Created};
use crate::app::{App, Principal};
use crate::error::{Error, Result};
use crate::model::{Action, MachineId, MachineStatus};
use crate::store::machine_reshape::{Resize, Resized};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::Arc;

const MACHINES_CURSOR: &str = "machines";
const EVENTS_CURSOR: &str = "events";

/// The answer to a create, first or replayed: 202 with the machine (as it is now) and its
/// `Location`; a replay says so in `Idempotent-Replayed`.
fn accepted(created: Created) -> Result<Response> {
    let location = HeaderValue::from_str(&format!("/api/v1/machines/{}", created.machine.id))
        .map_err(|e| Error::Internal(format!("machine location header: {e}")))?;
    let mut response = (
        StatusCode::ACCEPTED,
        Json(MachineView::from(created.machine)),
    )
        .into_response();
    response.headers_mut().insert(header::LOCATION, location);
    if created.replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

fn create_request(p: CreateMachineParams) -> CreateMachine {
    CreateMachine {
        hostname: p.hostname,
        image: p.image,
        vcpus: p.vcpus,
        memory_mib: p.memory_mib,
        disk_gib: p.disk_gib,
        ssh_keys: p.ssh_keys,
        user_data: p.user_data,
        restart_policy: p.restart_policy.unwrap_or_default(),
        labels: p.labels,
    }
}

/// Ask for a machine. Answers at once with the machine `pending`.
#[utoipa::path(post, path = "/machines", tag = "machines", operation_id = "machine_create", request_body = CreateMachineParams,
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255,
        pattern = r"^[\x21-\x7e]{1,255}$",
        description = "retry-safe key, kept 24 h: 1–255 visible ASCII characters")),
    security(("bearer" = [])),
    responses((status = 202, body = MachineView, headers(("Location" = String))),
        (status = 401, body = Problem), (status = 403, body = Problem, description = "quota exceeded"),
        (status = 409, body = Problem, description = "you already have a machine with this \
            hostname (`existing_machine_id` names it), or a request with this Idempotency-Key \
            is still in progress (with `Retry-After`)"),
        (status = 422, body = Problem, description = "an invalid request, an unknown image or \
            SSH key name, or an Idempotency-Key reused with a different body")))]
pub async fn create(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    headers: HeaderMap,
    ApiJson(p): ApiJson<CreateMachineParams>,
) -> Result<Response> {
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let key = v
                .to_str()
                .map_err(|_| Error::BadRequest("Idempotency-Key must be visible ASCII".into()))?;
            // Same key and same request: the body as parsed, so the order of its fields does
            // not matter.
            let canonical = serde_json::to_vec(&p)
                .map_err(|e| Error::Internal(format!("canonical request: {e}")))?;
            Some(IdempotencyKey {
                key,
                request_hash: request_hash(&canonical),
            })
        }
    };
    accepted(app.machine_create(who, create_request(p), key).await?)
}

/// Your machines (all machines for an administrator), newest first.
#[utoipa::path(get, path = "/machines", tag = "machines", operation_id = "machine_list", params(ListMachinesQuery),
    security(("bearer" = [])),
    responses((status = 200, body = MachinePage), (status = 400, body = Problem), (status = 401, body = Problem)))]
pub async fn list(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiQuery(q): ApiQuery<ListMachinesQuery>,
) -> Result<Json<MachinePage>> {
    let limit = page_limit(q.limit)?;
    let status = q
        .status
        .map(|s| s.parse::<MachineStatus>())
        .transpose()
        .map_err(|e| Error::BadRequest(format!("status: {e}")))?;
    let before = q
        .cursor
        .map(|c| app.cursors.decode(MACHINES_CURSOR, &c))
        .transpose()?;
    let label = q
        .label
        .as_deref()
        .map(crate::model::labels::parse_filter)
        .transpose()
        .map_err(Error::BadRequest)?;
    let page = app
        .machine_list(who, status, label.as_ref(), before, limit)
        .await?;
    let next_cursor = match (page.more, page.items.last()) {
        (true, Some(last)) => Some(app.cursors.encode(MACHINES_CURSOR, last.seq)),
        _ => None,
    };
    Ok(Json(MachinePage {
        items: page.items.into_iter().map(MachineView::from).collect(),
        next_cursor,
    }))
}

/// One machine.
#[utoipa::path(get, path = "/machines/{id}", tag = "machines", operation_id = "machine_get", params(("id" = uuid::Uuid, Path, description = "the resource's id (a UUID; anything else names nothing: 404)")),
    security(("bearer" = [])),
    responses((status = 200, body = MachineView), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn get(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<MachineId>,
) -> Result<Json<MachineView>> {
    Ok(Json(app.machine_get(who, id).await?.into()))
}

async fn act(app: &App, who: Principal, id: MachineId, action: Action) -> Result<Response> {
    let machine = app.machine_request(who, id, action).await?;
    Ok((StatusCode::ACCEPTED, Json(MachineView::from(machine))).into_response())
}

/// Start a stopped machine.
#[utoipa::path(post, path = "/machines/{id}/start", tag = "machines", operation_id = "machine_start", params(("id" = uuid::Uuid, Path, description = "the resource's id (a UUID; anything else names nothing: 404)")),
    security(("bearer" = [])),
    responses((status = 202, body = MachineView), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn start(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<MachineId>,
) -> Result<Response> {
    act(&app, who, id, Action::Start).await
}

/// Stop a running machine (gracefully, then forced).
#[utoipa::path(post, path = "/machines/{id}/stop", tag = "machines", operation_id = "machine_stop", params(("id" = uuid::Uuid, Path, description = "the resource's id (a UUID; anything else names nothing: 404)")),
    security(("bearer" = [])),
    responses((status = 202, body = MachineView), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn stop(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<MachineId>,
) -> Result<Response> {
    act(&app, who, id, Action::Stop).await
}

/// Reboot a running machine.
#[utoipa::path(post, path = "/machines/{id}/reboot", tag = "machines", operation_id = "machine_reboot", params(("id" = uuid::Uuid, Path, description = "the resource's id (a UUID; anything else names nothing: 404)")),
    security(("bearer" = [])),
    responses((status = 202, body = MachineView), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn reboot(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<MachineId>,
) -> Result<Response> {
    act(&app, who, id, Action::Reboot).await
}

/// Resize a stopped machine: vCPUs, memory, a larger disk.
///
/// The guest sees the new size at its next boot. What is not named stays. Checked against your quota (what grows) and the room on
/// the machine's host; it is `resizing`, then `stopped` again. Asking for the size it already
/// has changes nothing: 200.
#[utoipa::path(post, path = "/machines/{id}/resize", tag = "machines", operation_id = "machine_resize", params(("id" = uuid::Uuid, Path, description = "the resource's id (a UUID; anything else names nothing: 404)")),
    request_body = ResizeParams, security(("bearer" = [])),
    responses((status = 202, body = MachineView), (status = 200, body = MachineView, description = "it already has that size"),
        (status = 401, body = Problem), (status = 403, body = Problem, description = "quota exceeded"),
        (status = 404, body = Problem),
        (status = 409, body = Problem, description = "not stopped, or its host has no room for it (the detail says what is short)"),
        (status = 422, body = Problem, description = "no size named, a size out of range, or a smaller disk")))]
pub async fn resize(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<MachineId>,
    ApiJson(p): ApiJson<ResizeParams>,
) -> Result<Response> {
    let asked = Resize {
        vcpus: p.vcpus,
        memory_mib: p.memory_mib,
        disk_gib: p.disk_gib,
    };
    Ok(match app.machine_resize(who, id, asked).await? {
        Resized::Accepted(m) => (StatusCode::ACCEPTED, Json(MachineView::from(m))).into_response(),
        Resized::Unchanged(m) => (StatusCode::OK, Json(MachineView::from(m))).into_response(),
    })
}

/// Rebuild a running or stopped machine: a fresh disk from its image, or from `image`.
///
/// It keeps its id, hostname, size, SSH keys, user data and address; what its old disk held is
/// gone. It is `rebuilding`, then running or stopped as it was (a running one is shut down
/// first).
#[utoipa::path(post, path = "/machines/{id}/rebuild", tag = "machines", operation_id = "machine_rebuild", params(("id" = uuid::Uuid, Path, description = "the resource's id (a UUID; anything else names nothing: 404)")),
    request_body = RebuildParams, security(("bearer" = [])),
    responses((status = 202, body = MachineView), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem, description = "neither running nor stopped"),
        (status = 422, body = Problem, description = "an unknown or deprecated image")))]
pub async fn rebuild(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<MachineId>,
    ApiJson(p): ApiJson<RebuildParams>,
) -> Result<Response> {
    let machine = app.machine_rebuild(who, id, p.image.as_deref()).await?;
    Ok((StatusCode::ACCEPTED, Json(MachineView::from(machine))).into_response())
}

/// Delete a machine; it leaves the lists once deleted, and its hostname is free again. With
/// `force=true` (administrators) it is forgotten at once without its host's word: 200 with the
/// machine as deleted.
#[utoipa::path(delete, path = "/machines/{id}", tag = "machines", operation_id = "machine_delete", params(("id" = uuid::Uuid, Path, description = "the resource's id (a UUID; anything else names nothing: 404)"), ForceQuery),
    security(("bearer" = [])),
    responses((status = 202, body = MachineView), (status = 200, body = MachineView, description = "forgotten (force)"),
        (status = 401, body = Problem), (status = 403, body = Problem, description = "force needs the admin role"),
        (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn delete(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<MachineId>,
    ApiQuery(q): ApiQuery<ForceQuery>,
) -> Result<Response> {
    if q.force == Some(true) {
        let machine = app.machine_forget(who, id).await?;
        return Ok((StatusCode::OK, Json(MachineView::from(machine))).into_response());
    }
    act(&app, who, id, Action::Delete).await
}

/// Change a machine's settings that need nothing of its host: its restart policy and labels.
#[utoipa::path(patch, path = "/machines/{id}", tag = "machines", operation_id = "machine_patch", params(("id" = uuid::Uuid, Path, description = "the resource's id (a UUID; anything else names nothing: 404)")),
    request_body = MachinePatch, security(("bearer" = [])),
    responses((status = 200, body = MachineView), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn patch(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<MachineId>,
    ApiJson(p): ApiJson<MachinePatch>,
) -> Result<Json<MachineView>> {
    let patch = crate::store::machines::MachinePatch {
        restart_policy: p.restart_policy,
        labels: p.labels,
    };
    Ok(Json(app.machine_patch(who, id, patch).await?.into()))
}

/// Wait until the machine reaches `status` (or `failed`/`deleted`, which end any wait), then
/// answer it; 408 when `timeout` passes first. The server sleeps until the machine changes:
/// it is woken by the machine's events, on every replica.
#[utoipa::path(get, path = "/machines/{id}/wait", tag = "machines", operation_id = "machine_wait",
    params(("id" = uuid::Uuid, Path, description = "the resource's id (a UUID; anything else names nothing: 404)"), WaitQuery),
    security(("bearer" = [])),
    responses((status = 200, body = MachineView), (status = 400, body = Problem),
        (status = 401, body = Problem), (status = 404, body = Problem),
        (status = 408, body = Problem, description = "the timeout passed first")))]
pub async fn wait(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<MachineId>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> Result<Json<MachineView>> {
    let status: MachineStatus = q
        .status
        .parse()
        .map_err(|e| Error::BadRequest(format!("status: {e}")))?;
    let timeout = wait_timeout(q.timeout.as_deref())?;
    match app.machine_wait(who, id, status, timeout).await? {
        Some(machine) => Ok(Json(machine.into())),
        None => Err(Error::WaitTimedOut(format!(
            "the machine did not reach {status} within {} s; ask again",
            timeout.as_secs()
        ))),
    }
}

/// The machine's log, oldest first.
#[utoipa::path(get, path = "/machines/{id}/events", tag = "machines", operation_id = "machine_events",
    params(("id" = uuid::Uuid, Path, description = "the resource's id (a UUID; anything else names nothing: 404)"), PageQuery), security(("bearer" = [])),
    responses((status = 200, body = EventPage), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn events(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<MachineId>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<EventPage>> {
    let limit = page_limit(q.limit)?;
    let after = q
        .cursor
        .map(|c| app.cursors.decode(EVENTS_CURSOR, &c))
        .transpose()?;
    let page = app.machine_events(who, id, after, limit).await?;
    let next_cursor = match (page.more, page.items.last()) {
        (true, Some(last)) => Some(app.cursors.encode(EVENTS_CURSOR, last.seq)),
        _ => None,
    };
    Ok(Json(EventPage {
        items: page.items.into_iter().map(Into::into).collect(),
        next_cursor,
    }))
}

/// The tail of the machine's serial console (text/plain).
#[utoipa::path(get, path = "/machines/{id}/console", tag = "machines", operation_id = "machine_console", params(("id" = uuid::Uuid, Path, description = "the resource's id (a UUID; anything else names nothing: 404)")),
    security(("bearer" = [])),
    responses((status = 200, body = String, content_type = "text/plain"), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn console(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<MachineId>,
) -> Result<Response> {
    let tail = app.machine_console(who, id).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        String::from_utf8_lossy(&tail).into_owned(),
    )
        .into_response())
}
