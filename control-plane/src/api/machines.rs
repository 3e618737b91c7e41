//! `/machines`: create (idempotent), list (keyset pages), read, lifecycle actions, delete,
//! events, console.

use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::params::{page_limit, CreateMachineParams, ListMachinesQuery, PageQuery};
use super::problem::Problem;
use super::views::{EventPage, MachinePage, MachineView};
use crate::app::idempotency::{request_hash, KeyedStart};
use crate::app::machines::CreateMachine;
use crate::app::{App, Principal};
use crate::error::{Error, Result};
use crate::model::{Action, MachineId, MachineStatus};
use crate::store::idempotency::{ClaimedKey, StoredResponse};
use crate::store::machines::MachineRecord;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::Arc;

const MACHINES_CURSOR: &str = "machines";
const EVENTS_CURSOR: &str = "events";

fn accepted(stored: StoredResponse, replayed: bool) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::ACCEPTED);
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        stored.body,
    )
        .into_response();
    if let Some(location) = stored.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// The 202 answer for a created machine, as stored for Idempotency-Key replays.
fn render_created(machine: &MachineRecord) -> Result<StoredResponse> {
    let body = serde_json::to_string(&MachineView::from(machine.clone()))
        .map_err(|e| Error::Internal(format!("machine view to JSON: {e}")))?;
    Ok(StoredResponse {
        status: StatusCode::ACCEPTED.as_u16(),
        body,
        location: Some(format!("/api/v1/machines/{}", machine.id)),
    })
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
        Some(v) => Some(
            v.to_str()
                .map_err(|_| Error::BadRequest("Idempotency-Key must be visible ASCII".into()))?,
        ),
    };
    let Some(key) = key else {
        let machine = app.machine_create(who, create_request(p), None).await?;
        return Ok(accepted(render_created(&machine)?, false));
    };
    let canonical =
        serde_json::to_vec(&p).map_err(|e| Error::Internal(format!("canonical request: {e}")))?;
    let claim_id = match app
        .idempotency_start(who, key, &request_hash(&canonical))
        .await?
    {
        KeyedStart::Replay(stored) => return Ok(accepted(stored, true)),
        KeyedStart::Run { claim_id } => claim_id,
    };
    let claimed = ClaimedKey {
        user: who.user_id,
        key,
        claim_id: &claim_id,
    };
    match app
        .machine_create(who, create_request(p), Some((claimed, &render_created)))
        .await
    {
        Ok(machine) => Ok(accepted(render_created(&machine)?, false)),
        Err(e) => {
            app.idempotency_abandon(who, key, &claim_id).await;
            Err(e)
        }
    }
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
    let (rows, more) = app.machine_list(who, status, before, limit).await?;
    let next_cursor = match (more, rows.last()) {
        (true, Some(last)) => Some(app.cursors.encode(MACHINES_CURSOR, last.seq)),
        _ => None,
    };
    Ok(Json(MachinePage {
        items: rows.into_iter().map(MachineView::from).collect(),
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

/// Delete a machine; it leaves the lists once deleted, and its hostname is free again.
#[utoipa::path(delete, path = "/machines/{id}", tag = "machines", operation_id = "machine_delete", params(("id" = uuid::Uuid, Path, description = "the resource's id (a UUID; anything else names nothing: 404)")),
    security(("bearer" = [])),
    responses((status = 202, body = MachineView), (status = 401, body = Problem),
        (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn delete(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<MachineId>,
) -> Result<Response> {
    act(&app, who, id, Action::Delete).await
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
    let (rows, more) = app.machine_events(who, id, after, limit).await?;
    let next_cursor = match (more, rows.last()) {
        (true, Some(last)) => Some(app.cursors.encode(EVENTS_CURSOR, last.seq)),
        _ => None,
    };
    Ok(Json(EventPage {
        items: rows.into_iter().map(Into::into).collect(),
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
