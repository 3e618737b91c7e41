//! `/images` and `/ssh-keys`: the catalogues around machines.

use super::extract::{Admin, ApiJson, ApiPath, ApiQuery, Caller};
use super::params::{page_limit, AddSshKeyParams, PageQuery, RegisterImageParams};
use super::problem::Problem;
use super::views::{image_view, ImageList, ImageView, SshKeyList, SshKeyView};
use crate::app::images::RegisterImage;
use crate::app::App;
use crate::error::Result;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use std::sync::Arc;
use uuid::Uuid;

/// Every image. Where an image comes from (`source`, `boot`) is shown to administrators
/// only: a source URL may carry credentials or name internal hosts.
#[utoipa::path(get, path = "/images", tag = "images", security(("bearer" = [])),
    responses((status = 200, body = ImageList), (status = 401, body = Problem)))]
pub async fn image_list(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
) -> Result<Json<ImageList>> {
    let admin = who.require_admin().is_ok();
    let items = app
        .image_list()
        .await?
        .into_iter()
        .map(|image| image_view(image, admin))
        .collect();
    Ok(Json(ImageList { items }))
}

/// Register an image (administrators).
#[utoipa::path(post, path = "/images", tag = "images", request_body = RegisterImageParams,
    security(("bearer" = [])),
    responses((status = 201, body = ImageView), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn image_register(
    State(app): State<Arc<App>>,
    Admin(who): Admin,
    ApiJson(p): ApiJson<RegisterImageParams>,
) -> Result<(StatusCode, Json<ImageView>)> {
    let image = app
        .image_register(
            who,
            RegisterImage {
                name: p.name,
                source: p.source,
                format: p.format,
                sha256: p.sha256,
                boot: p.boot,
            },
        )
        .await?;
    Ok((StatusCode::CREATED, Json(image_view(image, true))))
}

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
    let (rows, more) = app.ssh_key_list(who, after.as_deref(), limit).await?;
    let next_cursor = match (more, rows.last()) {
        (true, Some(last)) => Some(app.cursors.encode_text(SSH_KEYS_CURSOR, &last.name)),
        _ => None,
    };
    Ok(Json(SshKeyList {
        items: rows.into_iter().map(Into::into).collect(),
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
