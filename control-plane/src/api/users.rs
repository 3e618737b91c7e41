//! `/auth/register` and `/auth/profile`: accounts (a tenant's own).

use super::extract::{ApiJson, Caller};
use super::params::{ProfilePatch, RegisterParams};
use super::problem::Problem;
use super::views::UserView;
use crate::app::sessions::ProfileChange;
use crate::app::App;
use crate::error::Result;
use auth::Role;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::Json;
use std::net::SocketAddr;
use std::sync::Arc;

/// Create an account.
#[utoipa::path(post, path = "/auth/register", tag = "auth", request_body = RegisterParams,
    responses((status = 201, body = UserView),
        (status = 409, body = Problem, description = "username or e-mail address taken"),
        (status = 422, body = Problem),
        (status = 429, body = Problem)))]
pub async fn register(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(p): ApiJson<RegisterParams>,
) -> Result<(StatusCode, Json<UserView>)> {
    app.throttle_credentials(peer.ip())?;
    let user = app
        .register(&p.username, &p.email, &p.password, Role::User)
        .await?;
    Ok((StatusCode::CREATED, Json(user.into())))
}

/// The caller's account.
#[utoipa::path(get, path = "/auth/profile", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = UserView), (status = 401, body = Problem)))]
pub async fn profile(State(app): State<Arc<App>>, Caller(who): Caller) -> Result<Json<UserView>> {
    Ok(Json(app.profile(who).await?.into()))
}

/// Change e-mail or password; a new password ends every other session.
#[utoipa::path(patch, path = "/auth/profile", tag = "auth", request_body = ProfilePatch,
    security(("bearer" = [])),
    responses((status = 200, body = UserView), (status = 401, body = Problem),
        (status = 403, body = Problem, description = "current_password is wrong"),
        (status = 422, body = Problem), (status = 429, body = Problem)))]
pub async fn profile_update(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Caller(who): Caller,
    ApiJson(p): ApiJson<ProfilePatch>,
) -> Result<Json<UserView>> {
    // It checks a password: the same throttle as logins, so a stolen access token is not a
    // free oracle for the current password.
    app.throttle_credentials(peer.ip())?;
    let change = ProfileChange {
        email: p.email,
        password: p.password,
        current_password: p.current_password,
    };
    Ok(Json(app.profile_update(who, change).await?.into()))
}
