//! `/auth/login`, `/auth/refresh` and `/auth/logout`: sessions (refresh-token families and
//! the access tokens they hand out).

use super::audit::AuditActor;
use super::extract::{ApiJson, Caller};
use super::params::{LoginParams, RefreshParams};
use super::problem::Problem;
use super::views::TokenPairView;
use crate::app::sessions::TokenPair;
use crate::app::App;
use crate::error::Result;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::Json;
use std::net::SocketAddr;
use std::sync::Arc;

impl From<TokenPair> for TokenPairView {
    fn from(t: TokenPair) -> Self {
        Self {
            access_token: t.access_token,
            refresh_token: t.refresh_token,
            token_type: "Bearer".to_owned(),
            expires_in: t.expires_in,
        }
    }
}

/// Log in with username and password.
#[utoipa::path(post, path = "/auth/login", tag = "auth", request_body = LoginParams,
    responses((status = 200, body = TokenPairView),
        (status = 401, body = Problem, description = "wrong username or password (the same answer for both)"),
        (status = 429, body = Problem)))]
pub async fn login(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    actor: AuditActor,
    ApiJson(p): ApiJson<LoginParams>,
) -> Result<Json<TokenPairView>> {
    actor.set_name(&p.username);
    let pair = app.login(peer.ip(), &p.username, &p.password).await?;
    Ok(Json(pair.into()))
}

/// Trade a refresh token for a new pair; the presented token is spent.
#[utoipa::path(post, path = "/auth/refresh", tag = "auth", request_body = RefreshParams,
    responses((status = 200, body = TokenPairView),
        (status = 401, body = Problem, description = "unknown, expired or spent refresh token")))]
pub async fn refresh(
    State(app): State<Arc<App>>,
    ApiJson(p): ApiJson<RefreshParams>,
) -> Result<Json<TokenPairView>> {
    Ok(Json(app.refresh(&p.refresh_token).await?.into()))
}

/// End the session (refresh-token family) the token belongs to.
#[utoipa::path(post, path = "/auth/logout", tag = "auth", request_body = RefreshParams,
    security(("bearer" = [])),
    responses((status = 204), (status = 401, body = Problem)))]
pub async fn logout(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiJson(p): ApiJson<RefreshParams>,
) -> Result<StatusCode> {
    app.logout(who, &p.refresh_token).await?;
    Ok(StatusCode::NO_CONTENT)
}
