//! `/tokens`: a tenant's API tokens for automation.

use super::extract::{ApiJson, ApiPath, Caller};
use super::problem::Problem;
use super::views::{CreatedTokenView, TokenList, TokenView};
use crate::app::App;
use crate::error::Result;
use crate::store::api_tokens::ApiTokenRecord;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use skygate_api_types::CreateTokenParams;
use std::sync::Arc;
use uuid::Uuid;

fn view(t: ApiTokenRecord) -> TokenView {
    TokenView {
        id: t.id.to_string(),
        name: t.name,
        scope: t.scope,
        created_at: t.created_at,
        expires_at: t.expires_at,
        last_used_at: t.last_used_at,
    }
}

/// Create an API token; its secret is in this answer only. Needs a login session: an API
/// token cannot mint more.
#[utoipa::path(post, path = "/tokens", tag = "tokens", request_body = CreateTokenParams,
    security(("bearer" = [])),
    responses((status = 201, body = CreatedTokenView), (status = 401, body = Problem),
        (status = 403, body = Problem, description = "asked with an API token"),
        (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn token_create(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiJson(p): ApiJson<CreateTokenParams>,
) -> Result<(StatusCode, Json<CreatedTokenView>)> {
    let (record, token) = app
        .token_create(who, &p.name, p.scope, p.expires_in_days)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedTokenView {
            view: view(record),
            token: token.as_str().to_owned(),
        }),
    ))
}

/// Your API tokens, newest first, without their secrets.
#[utoipa::path(get, path = "/tokens", tag = "tokens", security(("bearer" = [])),
    responses((status = 200, body = TokenList), (status = 401, body = Problem)))]
pub async fn token_list(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
) -> Result<Json<TokenList>> {
    let items = app.token_list(who).await?.into_iter().map(view).collect();
    Ok(Json(TokenList { items }))
}

/// Revoke an API token: it stops working with the next request.
#[utoipa::path(delete, path = "/tokens/{id}", tag = "tokens", operation_id = "token_delete",
    params(("id" = uuid::Uuid, Path)), security(("bearer" = [])),
    responses((status = 204), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub async fn token_delete(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode> {
    app.token_delete(who, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
