//! Request extractors whose rejections are problem documents, and the `Caller` extractor
//! that authenticates bearer tokens.

use super::problem::Problem;
use crate::app::{App, Principal};
use crate::error::Error;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;
use std::sync::Arc;

/// `axum::Json` with problem+json rejections (400 syntax, 415 content type, 413 size, 422 shape).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(json_problem(&rejection)),
        }
    }
}

fn json_problem(rejection: &JsonRejection) -> Problem {
    let status = rejection.status();
    let slug = match rejection {
        JsonRejection::JsonDataError(_) => "invalid",
        JsonRejection::JsonSyntaxError(_) => "malformed-json",
        JsonRejection::MissingJsonContentType(_) => "unsupported-media-type",
        _ if status == StatusCode::PAYLOAD_TOO_LARGE => "payload-too-large",
        _ => "bad-request",
    };
    Problem::new(status, slug, rejection.body_text())
}

/// `axum::extract::Query` with a 400 problem on bad parameters.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Self(q.0))
            .map_err(|r: QueryRejection| {
                Problem::new(StatusCode::BAD_REQUEST, "bad-request", r.body_text())
            })
    }
}

/// `axum::extract::Path`; an id that does not parse names no resource, so it is a 404.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Self(p.0))
            .map_err(|_: PathRejection| {
                Problem::new(StatusCode::NOT_FOUND, "not-found", "no such resource")
            })
    }
}

/// The authenticated caller; rejects with 401 when the bearer token is missing or bad.
#[derive(Debug, Clone, Copy)]
pub struct Caller(pub Principal);

/// The token of `Authorization: Bearer <token>`.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Result<&str, Error> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(Error::Unauthenticated("missing bearer token"))?;
    value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(Error::Unauthenticated(
            "expected 'Authorization: Bearer <token>'",
        ))
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = Error;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        let caller = app.authenticate(bearer_token(&parts.headers)?).await?;
        caller.require_scope_for(&parts.method)?;
        tracing::Span::current().record("user", tracing::field::display(caller.user_id));
        if let Some(actor) = parts.extensions.get::<super::audit::AuditActor>() {
            actor.set_id(caller.user_id);
        }
        Ok(Caller(caller))
    }
}

/// An authenticated administrator: 401 without a valid token, 403 for anyone else. Taken
/// before the body, so a tenant hears "forbidden" whatever it sent, not what was wrong with it.
#[derive(Debug, Clone, Copy)]
pub struct Admin(pub Principal);

impl FromRequestParts<Arc<App>> for Admin {
    type Rejection = Error;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        let Caller(who) = Caller::from_request_parts(parts, app).await?;
        who.require_admin()?;
        Ok(Admin(who))
    }
}
