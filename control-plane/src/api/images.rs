//! `/images`: the guest images machines are built from.

use super::extract::{Admin, ApiJson, ApiPath, Caller};
use super::params::{BootParams, RegisterImageParams};
use super::problem::Problem;
use super::views::{image_view, ImageList, ImageView};
use crate::app::images::RegisterImage;
use crate::app::App;
use crate::error::Result;
use crate::model::{ImageId, KernelBoot};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use std::sync::Arc;

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
                boot: p.boot.map(kernel_boot),
            },
        )
        .await?;
    Ok((StatusCode::CREATED, Json(image_view(image, true))))
}

/// Deprecate an image (administrators): new machines are refused it with a 422 naming it;
/// machines made from it keep working. It stays listed, marked, and its name stays taken.
#[utoipa::path(post, path = "/images/{id}/deprecate", tag = "images", operation_id = "image_deprecate",
    params(("id" = uuid::Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = ImageView), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn image_deprecate(
    State(app): State<Arc<App>>,
    Admin(who): Admin,
    ApiPath(id): ApiPath<ImageId>,
) -> Result<Json<ImageView>> {
    let image = app.image_deprecate(who, id, true).await?;
    Ok(Json(image_view(image, true)))
}

/// Undo a deprecation (administrators).
#[utoipa::path(post, path = "/images/{id}/undeprecate", tag = "images", operation_id = "image_undeprecate",
    params(("id" = uuid::Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = ImageView), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn image_undeprecate(
    State(app): State<Arc<App>>,
    Admin(who): Admin,
    ApiPath(id): ApiPath<ImageId>,
) -> Result<Json<ImageView>> {
    let image = app.image_deprecate(who, id, false).await?;
    Ok(Json(image_view(image, true)))
}

/// The request's boot details as the app takes them.
fn kernel_boot(b: BootParams) -> KernelBoot {
    KernelBoot {
        kernel: b.kernel,
        initrd: b.initrd,
        cmdline: b.cmdline,
        kernel_sha256: b.kernel_sha256,
        initrd_sha256: b.initrd_sha256,
    }
}
