//! The audit log at the HTTP edge: a layer that records every mutating call (who, what,
//! target, outcome, request id, client address), and `GET /audit-events`.

use super::extract::{ApiQuery, Caller};
use super::params::{page_limit, PageQuery};
use super::problem::Problem;
use super::views::{AuditEventPage, AuditEventView};
use crate::app::App;
use crate::error::Result;
use crate::model::UserId;
use crate::store::audit::AuditEvent;
use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, OriginalUri, Request, State};
use axum::http::request::Parts;
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use axum::Json;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Who made the call, filled in while it is handled: by the `Caller` extractor once a token
/// checks out, or by a handler that names an account before there is a token (login,
/// register). A request the layer does not audit carries a slot nobody reads.
#[derive(Debug, Clone, Default)]
pub struct AuditActor(Arc<Mutex<Actor>>);

#[derive(Debug, Default)]
struct Actor {
    id: Option<UserId>,
    name: Option<String>,
}

impl AuditActor {
    pub fn set_id(&self, id: UserId) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).id = Some(id);
    }

    pub fn set_name(&self, name: &str) {
        // A name that cannot be a username is not kept: the log must not become a store for
        // whatever strangers type (a password pasted into the username field, say).
        if crate::app::sessions::validate_username(name).is_ok() {
            self.0.lock().unwrap_or_else(PoisonError::into_inner).name = Some(name.to_owned());
        }
    }

    fn take(&self) -> Actor {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for AuditActor {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Self>().cloned().unwrap_or_default())
    }
}

/// Whether a call changes something (reads are not audited).
fn mutates(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// An audited call in progress. Dropped before it is finished (the client hung up, or the
/// request timed out, after the handler may already have acted), it is still recorded, with
/// outcome 499 (nginx's "client closed request"): a caller cannot keep a call out of the log
/// by hanging up.
struct InFlight {
    app: Arc<App>,
    actor: AuditActor,
    event: Option<AuditEvent>,
}

impl InFlight {
    /// Records the call with the status it was answered.
    async fn answered(mut self, status: u16) {
        if let Some(mut event) = self.event.take() {
            event.outcome = status;
            finish(&self.app, event, self.actor.take()).await;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(mut event) = self.event.take() {
            event.outcome = 499;
            let (app, who) = (Arc::clone(&self.app), self.actor.take());
            tokio::spawn(async move { finish(&app, event, who).await });
        }
    }
}

/// Fills in who made the call and hands the event to the writer. A username named by a login
/// or registration is kept only when such an account exists: a password typed into the
/// username field must not become part of the log.
async fn finish(app: &App, mut event: AuditEvent, who: Actor) {
    event.actor_id = who.id;
    event.actor_name = match (who.id, who.name) {
        (None, Some(name)) => match app.store.user_by_username(&name).await {
            Ok(Some(_)) => Some(name),
            _ => None,
        },
        _ => None,
    };
    app.audit.record(event).await;
}

/// The layer: routes only (it runs after routing, so the route template is known; a path that
/// names no route is not a call to anything).
pub async fn record(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    if !mutates(req.method()) {
        return next.run(req).await;
    }
    let actor = AuditActor::default();
    req.extensions_mut().insert(actor.clone());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str);
    // The nested router's template lacks the `/api/v1` it is served under.
    let action = format!("{} {}", req.method(), route.trim_start_matches("/api/v1"));
    // The path as the client called it: nesting strips `/api/v1` from the request's own.
    let uri = req
        .extensions()
        .get::<OriginalUri>()
        .map_or_else(|| req.uri().clone(), |o| o.0.clone());
    let target = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned());
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let client = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_default();
    let in_flight = InFlight {
        app: Arc::clone(&app),
        actor,
        event: Some(AuditEvent {
            at: chrono::Utc::now(),
            actor_id: None,
            actor_name: None,
            action,
            target,
            outcome: 0,
            request_id,
            client,
        }),
    };
    let response = next.run(req).await;
    in_flight.answered(response.status().as_u16()).await;
    response
}

const AUDIT_CURSOR: &str = "audit-events";

/// The audit log, newest first: every mutating call and every login. Administrators read all
/// of it; a tenant its own calls and the logins tried in its name.
#[utoipa::path(get, path = "/audit-events", tag = "audit", params(PageQuery), security(("bearer" = [])),
    responses((status = 200, body = AuditEventPage), (status = 400, body = Problem),
        (status = 401, body = Problem)))]
pub async fn audit_events(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<AuditEventPage>> {
    let limit = page_limit(q.limit)?;
    let before = q
        .cursor
        .map(|c| app.cursors.decode(AUDIT_CURSOR, &c))
        .transpose()?;
    let page = app.audit_events(who, before, limit).await?;
    let next_cursor = match (page.more, page.items.last()) {
        (true, Some(last)) => Some(app.cursors.encode(AUDIT_CURSOR, last.seq)),
        _ => None,
    };
    Ok(Json(AuditEventPage {
        items: page
            .items
            .into_iter()
            .map(|r| AuditEventView {
                at: r.event.at,
                actor_id: r.event.actor_id.map(|id| id.to_string()),
                actor_name: r.event.actor_name,
                action: r.event.action,
                target: r.event.target,
                outcome: r.event.outcome,
                request_id: r.event.request_id,
                client: r.event.client,
            })
            .collect(),
        next_cursor,
    }))
}
