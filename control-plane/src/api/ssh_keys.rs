//! `/ssh-keys`: tenants' saved SSH public keys, which machines may reference by name.

use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::params::{page_limit, AddSshKeyParams, PageQuery};
use super::problem::Problem;
use super::views::{SshKeyList, SshKeyView};
use crate::app::App;
use crate::error::Result;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use std::sync::Arc;
use uuid::Uuid;

/// Your saved SSH keys, by name, a page at a time.
#[utoipa::path(get, path = "/ssh-keys", tag = "ssh-keys", params(PageQuery), security(("bearer" = [])),
    responses((status = 200, body = SshKeyList), (status = 400, body = Problem), (status = 401, body = Problem)))]
pub async fn ssh_key_list(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<SshKeyList>> {
    let limit = page_limit(q.limit)?;
    let after = q
        .cursor
        .map(|c| app.cursors.decode_text(SSH_KEYS_CURSOR, &c))
        .transpose()?;
    let page = app.ssh_key_list(who, after.as_deref(), limit).await?;
    let next_cursor = match (page.more, page.items.last()) {
        (true, Some(last)) => Some(app.cursors.encode_text(SSH_KEYS_CURSOR, &last.name)),
        _ => None,
    };
    Ok(Json(SshKeyList {
        items: page.items.into_iter().map(Into::into).collect(),
        next_cursor,
    }))
}

const SSH_KEYS_CURSOR: &str = "ssh-keys";

/// Save an SSH key under a name that machines can reference.
#[utoipa::path(post, path = "/ssh-keys", tag = "ssh-keys", request_body = AddSshKeyParams,
    security(("bearer" = [])),
    responses((status = 201, body = SshKeyView), (status = 401, body = Problem),
        (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn ssh_key_add(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiJson(p): ApiJson<AddSshKeyParams>,
) -> Result<(StatusCode, Json<SshKeyView>)> {
    let key = app.ssh_key_add(who, &p.name, &p.public_key).await?;
    Ok((StatusCode::CREATED, Json(key.into())))
}

/// Forget a saved key; machines created with it keep it.
#[utoipa::path(delete, path = "/ssh-keys/{id}", tag = "ssh-keys", params(("id" = uuid::Uuid, Path, description = "the resource's id (a UUID; anything else names nothing: 404)")),
    security(("bearer" = [])),
    responses((status = 204), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn ssh_key_delete(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode> {
    app.ssh_key_delete(who, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
