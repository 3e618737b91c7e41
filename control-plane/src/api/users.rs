//! Accounts: `/auth/register` and `/auth/profile` (a tenant's own), and `/users` (their
//! administration).

use super::audit::AuditActor;
use super::extract::{Admin, ApiJson, ApiPath, ApiQuery, Caller};
use super::params::{
    page_limit, ListUsersQuery, ProfilePatch, QuotaParams, RegisterParams, RoleName, UserPatch,
};
use super::problem::Problem;
use super::views::{ProfileView, QuotaView, UserList, UserView};
use crate::app::sessions::ProfileChange;
use crate::app::App;
use crate::error::Result;
use crate::model::{QuotaOverride, UserId};
use crate::store::users::{AccountChange, AccountFilter};
use auth::Role;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::Json;
use std::net::SocketAddr;
use std::sync::Arc;
use uuid::Uuid;

/// Create an account.
#[utoipa::path(post, path = "/auth/register", tag = "auth", request_body = RegisterParams,
    responses((status = 201, body = UserView),
        (status = 409, body = Problem, description = "username or e-mail address taken"),
        (status = 422, body = Problem),
        (status = 429, body = Problem)))]
pub async fn register(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    actor: AuditActor,
    ApiJson(p): ApiJson<RegisterParams>,
) -> Result<(StatusCode, Json<UserView>)> {
    actor.set_name(&p.username);
    app.throttle_credentials(peer.ip())?;
    let user = app
        .register(&p.username, &p.email, &p.password, Role::User)
        .await?;
    Ok((StatusCode::CREATED, Json(user.into())))
}

/// The caller's account, with its limits and what it holds against them.
#[utoipa::path(get, path = "/auth/profile", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = ProfileView), (status = 401, body = Problem)))]
pub async fn profile(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
) -> Result<Json<ProfileView>> {
    let (account, quota) = app.profile(who).await?;
    Ok(Json(ProfileView {
        user: account.into(),
        quota: quota.into(),
    }))
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

const USERS_CURSOR: &str = "users";

fn role(name: RoleName) -> Role {
    match name {
        RoleName::User => Role::User,
        RoleName::Admin => Role::Admin,
    }
}

/// Accounts in username order, a page at a time (administrators).
#[utoipa::path(get, path = "/users", tag = "users", params(ListUsersQuery), security(("bearer" = [])),
    responses((status = 200, body = UserList), (status = 400, body = Problem),
        (status = 401, body = Problem), (status = 403, body = Problem), (status = 422, body = Problem)))]
pub async fn user_list(
    State(app): State<Arc<App>>,
    Admin(who): Admin,
    ApiQuery(q): ApiQuery<ListUsersQuery>,
) -> Result<Json<UserList>> {
    let limit = page_limit(q.limit)?;
    let after = q
        .cursor
        .map(|c| app.cursors.decode_text(USERS_CURSOR, &c))
        .transpose()?;
    let filter = AccountFilter {
        search: q.search.as_deref().filter(|s| !s.is_empty()),
        role: q.role.map(role),
    };
    let page = app.user_list(who, &filter, after.as_deref(), limit).await?;
    let next_cursor = match (page.more, page.items.last()) {
        (true, Some(last)) => Some(app.cursors.encode_text(USERS_CURSOR, &last.username)),
        _ => None,
    };
    Ok(Json(UserList {
        items: page.items.into_iter().map(Into::into).collect(),
        next_cursor,
    }))
}

/// One account (administrators).
#[utoipa::path(get, path = "/users/{id}", tag = "users", operation_id = "user_get",
    params(("id" = uuid::Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = UserView), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn user_get(
    State(app): State<Arc<App>>,
    Admin(who): Admin,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<UserView>> {
    Ok(Json(app.user_get(who, UserId(id)).await?.into()))
}

/// Change an account's role (administrators; not your own to `user`).
#[utoipa::path(patch, path = "/users/{id}", tag = "users", operation_id = "user_patch",
    params(("id" = uuid::Uuid, Path)), request_body = UserPatch, security(("bearer" = [])),
    responses((status = 200, body = UserView), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn user_patch(
    State(app): State<Arc<App>>,
    Admin(who): Admin,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(p): ApiJson<UserPatch>,
) -> Result<Json<UserView>> {
    let change = AccountChange::Role(role(p.role));
    Ok(Json(app.user_change(who, UserId(id), change).await?.into()))
}

/// Disable an account: its tokens stop working at once and it cannot log in; its machines
/// keep running (administrators; not your own).
#[utoipa::path(post, path = "/users/{id}/disable", tag = "users", operation_id = "user_disable",
    params(("id" = uuid::Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = UserView), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn user_disable(
    State(app): State<Arc<App>>,
    Admin(who): Admin,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<UserView>> {
    let account = app
        .user_change(who, UserId(id), AccountChange::Disable)
        .await?;
    Ok(Json(account.into()))
}

/// Enable a disabled account again; it logs in anew (administrators).
#[utoipa::path(post, path = "/users/{id}/enable", tag = "users", operation_id = "user_enable",
    params(("id" = uuid::Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = UserView), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn user_enable(
    State(app): State<Arc<App>>,
    Admin(who): Admin,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<UserView>> {
    let account = app
        .user_change(who, UserId(id), AccountChange::Enable)
        .await?;
    Ok(Json(account.into()))
}

/// A tenant's limits and usage (administrators, or the tenant itself).
#[utoipa::path(get, path = "/users/{id}/quota", tag = "users", operation_id = "quota_get",
    params(("id" = uuid::Uuid, Path)), security(("bearer" = [])),
    responses((status = 200, body = QuotaView), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn quota_get(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<QuotaView>> {
    Ok(Json(app.quota(who, UserId(id)).await?.into()))
}

/// Set a tenant's own limits; null in a limit is the server-wide default (administrators).
/// A limit below what the tenant holds takes nothing away: its next create is refused.
#[utoipa::path(put, path = "/users/{id}/quota", tag = "users", operation_id = "quota_put",
    params(("id" = uuid::Uuid, Path)), request_body = QuotaParams, security(("bearer" = [])),
    responses((status = 200, body = QuotaView), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn quota_put(
    State(app): State<Arc<App>>,
    Admin(who): Admin,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(p): ApiJson<QuotaParams>,
) -> Result<Json<QuotaView>> {
    let overrides = QuotaOverride {
        max_machines: p.max_machines,
        max_vcpus: p.max_vcpus,
        max_memory_mib: p.max_memory_mib,
    };
    Ok(Json(
        app.quota_set(who, UserId(id), overrides).await?.into(),
    ))
}
