//! Errors as `application/problem+json` (RFC 9457), in one place: the mapping from the
//! crate's `Error`, and a middleware that turns every other error response (404, 405, 413,
//! timeouts, extractor rejections) into a problem and stamps each problem with the request id.

use crate::error::Error;
use axum::body::{to_bytes, Body};
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

pub use skygate_api_types::{Problem, PROBLEM_JSON};

/// A problem for a bare status, for responses produced outside our handlers.
fn for_status(status: StatusCode) -> Problem {
    let (slug, detail) = match status {
        StatusCode::NOT_FOUND => ("not-found", "no such resource"),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method-not-allowed",
            "this method is not allowed on this resource",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload-too-large", "request body is too large"),
        StatusCode::REQUEST_TIMEOUT => ("timeout", "the request took too long"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported-media-type",
            "expected Content-Type: application/json",
        ),
        s if s.is_server_error() => ("internal", "internal error"),
        _ => ("error", "the request failed"),
    };
    Problem::new(status, slug, detail)
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let detail = match &self {
            e if e.is_store_unavailable() => {
                "the database is unavailable; retry shortly".to_owned()
            }
            e => e.to_string(),
        };
        let (status, slug) = match &self {
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            Error::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            Error::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request"),
            Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Error::HostnameTaken { .. } => (StatusCode::CONFLICT, "hostname-taken"),
            Error::Unauthenticated(_) | Error::BadCredentials => {
                (StatusCode::UNAUTHORIZED, "unauthenticated")
            }
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Error::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate-limited"),
            Error::TooManyOpen(_) => (StatusCode::TOO_MANY_REQUESTS, "too-many-open-requests"),
            Error::QuotaExceeded(_) => (StatusCode::FORBIDDEN, "quota-exceeded"),
            Error::IdempotencyMismatch => {
                (StatusCode::UNPROCESSABLE_ENTITY, "idempotency-key-mismatch")
            }
            Error::IdempotencyInFlight => (StatusCode::CONFLICT, "idempotency-key-in-flight"),
            Error::WaitTimedOut(_) => (StatusCode::REQUEST_TIMEOUT, "wait-timed-out"),
            Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            e if e.is_store_unavailable() => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Error::Store(_) | Error::Migrate(_) | Error::Auth(_) | Error::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(error = ?self, "request refused: unavailable");
        } else if status.is_server_error() {
            // The cause goes to the log (with the request id from the span), never to the client.
            tracing::error!(error = ?self, "request failed");
        }
        let mut problem = Problem::new(status, slug, detail);
        if let Error::HostnameTaken { existing, .. } = &self {
            problem.existing_machine_id = Some(existing.to_string());
        }
        let mut response = problem.into_response();
        let headers = response.headers_mut();
        match self {
            Error::RateLimited { retry_after_secs } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            // The request holding the key may finish (or be released) any moment; so may one
            // of the account's open waits.
            Error::IdempotencyInFlight | Error::TooManyOpen(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
            }
            _ if status == StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(UNAVAILABLE_RETRY_SECS),
                );
            }
            Error::Unauthenticated(_) | Error::BadCredentials => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

/// Retry-After on a 503: long enough for a busy moment to pass, short enough that clients
/// notice a recovered database quickly.
const UNAVAILABLE_RETRY_SECS: u64 = 2;

/// Largest error body we re-read to stamp the request id into.
const MAX_PROBLEM_BODY: usize = 64 * 1024;

/// Makes every error response a problem document carrying the request id.
pub async fn normalize(req: Request, next: Next) -> Response {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let response = next.run(req).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let is_problem = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == PROBLEM_JSON.as_bytes());
    let mut problem = match is_problem {
        true => match to_bytes(body, MAX_PROBLEM_BODY).await {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|_| for_status(status)),
            Err(_) => for_status(status),
        },
        // A rejection or framework response: keep its text when it is short plain text
        // (axum's rejections explain well what was wrong with the JSON), else a stock detail.
        false => {
            let mut p = for_status(status);
            if let Ok(bytes) = to_bytes(body, MAX_PROBLEM_BODY).await {
                let text = String::from_utf8_lossy(&bytes);
                if !text.trim().is_empty() && !status.is_server_error() && text.len() < 1024 {
                    p.detail = text.trim().to_owned();
                }
            }
            p
        }
    };
    problem.request_id = request_id;
    let body = serde_json::to_vec(&problem).unwrap_or_default();
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}
