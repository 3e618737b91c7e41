//! The HTTP edge: routes, the gateway layers (request id, access log, metrics, problem
//! documents, CORS, timeouts, body limits) and the OpenAPI document. Handlers only translate
//! between HTTP and `app`.

pub mod admin;
pub mod audit;
pub mod events;
pub mod extract;
pub mod health;
pub mod hosts;
pub mod images;
pub mod machines;
pub mod openapi;
pub mod params;
pub mod problem;
pub mod serve;
pub mod sessions;
pub mod ssh_keys;
pub mod tokens;
pub mod users;
pub mod views;

use crate::app::App;
use axum::http::{HeaderName, HeaderValue, Method, Request};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{middleware, Router};
use openapi::ErrorResponses;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// Largest request body accepted (the API's bodies are small; user_data is at most 64 KiB).
pub const BODY_LIMIT: usize = 1024 * 1024;

/// Refuses a body announced larger than `BODY_LIMIT` from its Content-Length alone, before
/// reading any of it; chunked bodies are cut off by `DefaultBodyLimit` as they are read.
async fn reject_oversized(
    req: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    let announced = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > BODY_LIMIT as u64) {
        return axum::http::StatusCode::PAYLOAD_TOO_LARGE.into_response();
    }
    next.run(req).await
}

/// Longest client-chosen request id kept; longer or odd ones are replaced by a fresh UUID.
const MAX_REQUEST_ID: usize = 128;

/// Drops a client's `x-request-id` that is too long or has characters outside
/// `[A-Za-z0-9._:-]`, so that what reaches logs and responses stays bounded and plain.
async fn sanitize_request_id(
    mut req: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    let ok = |v: &HeaderValue| {
        let b = v.as_bytes();
        !b.is_empty()
            && b.len() <= MAX_REQUEST_ID
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(c))
    };
    if req.headers().get("x-request-id").is_some_and(|v| !ok(v)) {
        req.headers_mut().remove("x-request-id");
    }
    next.run(req).await
}

/// Gateway settings.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Origins allowed to call the API from a browser; empty sends no CORS headers.
    pub cors_origins: Vec<HeaderValue>,
    /// Requests running longer are answered 408 and dropped.
    pub request_timeout: Duration,
    /// The connection cap and the header (and idle) deadline.
    pub connections: serve::ConnectionLimits,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            cors_origins: Vec::new(),
            request_timeout: Duration::from_secs(30),
            connections: serve::ConnectionLimits::default(),
        }
    }
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document of `/api/v1`, generated from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(title = "SkyGate API", description = "Tenant API of the SkyGate VM control plane."),
    servers((url = "/api/v1")),
    paths(
        users::register, sessions::login, sessions::refresh, sessions::logout,
        users::profile, users::profile_update,
        users::user_list, users::user_get, users::user_patch, users::user_disable,
        users::user_enable, users::quota_get, users::quota_put,
        machines::create, machines::list, machines::get, machines::start, machines::stop,
        machines::reboot, machines::resize, machines::rebuild, machines::delete, machines::patch,
        machines::wait, machines::events, events::event_stream,
        machines::console,
        images::image_list, images::image_register, images::image_deprecate,
        images::image_undeprecate,
        ssh_keys::ssh_key_list, ssh_keys::ssh_key_add, ssh_keys::ssh_key_delete,
        hosts::host_list, hosts::host_get, hosts::evacuate, hosts::cordon, hosts::uncordon,
        hosts::delete,
        admin::reconciler, audit::audit_events, tokens::token_create, tokens::token_list,
        tokens::token_delete,
    ),
    components(schemas(problem::Problem, skygate_api_types::LostEventsView)),
    modifiers(&BearerAuth, &ErrorResponses),
    tags(
        (name = "auth", description = "Accounts and sessions"),
        (name = "machines", description = "Virtual machines"),
        (name = "images", description = "Guest images"),
        (name = "ssh-keys", description = "Saved SSH public keys"),
        (name = "hosts", description = "Hypervisor hosts (administrators)"),
        (name = "users", description = "Accounts, their roles and limits (administrators)"),
        (name = "tokens", description = "API tokens for automation"),
        (name = "audit", description = "Who did what: every mutating call and every login"),
        (name = "admin", description = "The control plane's background work (administrators)"),
    )
)]
#[derive(Debug)]
pub struct ApiDoc;

/// The document as served and as checked in (pretty JSON, trailing newline).
pub fn openapi_json() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}

async fn serve_openapi() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi_json(),
    )
}

/// The API browser (`/api/v1/docs`): one self-contained page that renders `openapi.json`.
/// Its content security policy forbids loading anything from another origin.
async fn serve_docs() -> impl IntoResponse {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; base-uri 'none'; form-action 'none'",
            ),
        ],
        include_str!("docs.html"),
    )
}

fn api_routes(app: &Arc<App>, settings: &HttpSettings) -> Router<Arc<App>> {
    use axum::routing::delete as del;
    Router::new()
        .route("/auth/register", post(users::register))
        .route("/auth/login", post(sessions::login))
        .route("/auth/refresh", post(sessions::refresh))
        .route("/auth/logout", post(sessions::logout))
        .route(
            "/auth/profile",
            get(users::profile).patch(users::profile_update),
        )
        .route("/machines", post(machines::create).get(machines::list))
        .route(
            "/machines/{id}",
            get(machines::get)
                .patch(machines::patch)
                .delete(machines::delete),
        )
        .route("/machines/{id}/start", post(machines::start))
        .route("/machines/{id}/stop", post(machines::stop))
        .route("/machines/{id}/reboot", post(machines::reboot))
        .route("/machines/{id}/resize", post(machines::resize))
        .route("/machines/{id}/rebuild", post(machines::rebuild))
        .route("/machines/{id}/events", get(machines::events))
        .route("/machines/{id}/console", get(machines::console))
        .route(
            "/images",
            get(images::image_list).post(images::image_register),
        )
        .route("/images/{id}/deprecate", post(images::image_deprecate))
        .route("/images/{id}/undeprecate", post(images::image_undeprecate))
        .route(
            "/ssh-keys",
            get(ssh_keys::ssh_key_list).post(ssh_keys::ssh_key_add),
        )
        .route("/ssh-keys/{id}", del(ssh_keys::ssh_key_delete))
        .route(
            "/tokens",
            post(tokens::token_create).get(tokens::token_list),
        )
        .route("/tokens/{id}", del(tokens::token_delete))
        .route("/users", get(users::user_list))
        .route("/users/{id}", get(users::user_get).patch(users::user_patch))
        .route("/users/{id}/disable", post(users::user_disable))
        .route("/users/{id}/enable", post(users::user_enable))
        .route(
            "/users/{id}/quota",
            get(users::quota_get).put(users::quota_put),
        )
        .route("/hosts", get(hosts::host_list))
        .route("/hosts/{id}", get(hosts::host_get).delete(hosts::delete))
        .route("/hosts/{id}/evacuate", post(hosts::evacuate))
        .route("/hosts/{id}/cordon", post(hosts::cordon))
        .route("/hosts/{id}/uncordon", post(hosts::uncordon))
        .route("/admin/reconciler", get(admin::reconciler))
        .route("/audit-events", get(audit::audit_events))
        // Every mutating route is audited; it runs after routing, so it knows the route.
        .route_layer(middleware::from_fn_with_state(app.clone(), audit::record))
        .route("/openapi.json", get(serve_openapi))
        .route("/docs", get(serve_docs))
        .route_layer(request_timeout(settings))
        // Not under the request timeout: a wait lasts what its `timeout` says (at most
        // `params::MAX_WAIT`), and answers 408 itself.
        .route("/machines/{id}/wait", get(machines::wait))
        .route("/events", get(events::event_stream))
}

/// Requests running longer than the gateway's limit are answered 408 and dropped.
fn request_timeout(settings: &HttpSettings) -> TimeoutLayer {
    TimeoutLayer::with_status_code(
        axum::http::StatusCode::REQUEST_TIMEOUT,
        settings.request_timeout,
    )
}

fn cors(settings: &HttpSettings) -> CorsLayer {
    if settings.cors_origins.is_empty() {
        return CorsLayer::new();
    }
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(settings.cors_origins.clone()))
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([
            axum::http::header::AUTHORIZATION,
            axum::http::header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("last-event-id"),
        ])
        .expose_headers([
            axum::http::header::LOCATION,
            axum::http::header::RETRY_AFTER,
            HeaderName::from_static("x-request-id"),
        ])
        .max_age(Duration::from_secs(600))
}

/// The whole HTTP application.
pub fn router(app: Arc<App>, settings: &HttpSettings) -> Router {
    let x_request_id = HeaderName::from_static("x-request-id");
    let access_log = TraceLayer::new_for_http()
        .make_span_with(|req: &Request<_>| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let route = req
                .extensions()
                .get::<axum::extract::MatchedPath>()
                .map_or("unmatched", |p| p.as_str());
            let client = req
                .extensions()
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.ip().to_string())
                .unwrap_or_default();
            // Path only: query strings may carry cursors, and headers carry tokens. `user` is
            // filled in by the `Caller` extractor once the token is checked.
            tracing::info_span!(
                "request",
                method = %req.method(),
                path = %req.uri().path(),
                route,
                client,
                request_id = %id,
                user = tracing::field::Empty,
            )
        })
        // The access log (target `skygate::access`): answers that went well at debug only. At
        // tens of thousands of requests a second a line each took some 13 % of the server's
        // time (issue 12), and the request metrics count them all anyway; operators who want
        // every line set RUST_LOG=info,skygate::access=debug. Refusals (4xx) stay at info,
        // failures warn.
        .on_response(
            |res: &axum::http::Response<_>, latency: Duration, _span: &tracing::Span| {
                let status = res.status().as_u16();
                let latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
                if res.status().is_client_error() {
                    tracing::info!(target: "skygate::access", status, latency_ms, "refused");
                } else if !res.status().is_server_error() {
                    tracing::debug!(target: "skygate::access", status, latency_ms, "answered");
                }
            },
        )
        .on_failure(DefaultOnFailure::new().level(Level::WARN));
    let ops = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route_layer(request_timeout(settings));
    Router::new()
        .nest("/api/v1", api_routes(&app, settings))
        .merge(ops)
        .layer(
            ServiceBuilder::new()
                .layer(middleware::from_fn(sanitize_request_id))
                .layer(SetRequestIdLayer::new(
                    x_request_id.clone(),
                    MakeRequestUuid,
                ))
                .layer(PropagateRequestIdLayer::new(x_request_id))
                .layer(access_log)
                .layer(middleware::from_fn(problem::normalize))
                // A bug that panics answers 500 (as a problem, with the request id) instead
                // of dropping the connection.
                .layer(CatchPanicLayer::new())
                .layer(middleware::from_fn(crate::metrics::track))
                .layer(cors(settings))
                .layer(middleware::from_fn(reject_oversized))
                .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT)),
        )
        .with_state(app)
}
