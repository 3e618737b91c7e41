//! `/events`: every event of the caller's machines (an administrator's: all) as server-sent
//! events, resumable with `Last-Event-ID` (`app::event_stream`).

use super::extract::{bearer_token, Caller};
use super::problem::Problem;
use crate::app::event_stream::StreamItem;
use crate::app::App;
use crate::error::{Error, Result};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use skygate_api_types::{LostEventsView, StreamEventView};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// How often an idle stream sends a comment, so that proxies and the server's own idle
/// timeout see a live connection.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

fn sse_event(item: StreamItem) -> Event {
    let (event, id, data) = match item {
        StreamItem::Event(e) => {
            let position = e.position;
            let view = StreamEventView {
                position,
                machine_id: e.machine_id.to_string(),
                hostname: e.hostname,
                action: e.action,
                status: e.status,
                message: e.message,
                created_at: e.created_at,
            };
            ("machine", position, serde_json::to_string(&view))
        }
        StreamItem::Lost {
            last_event_id,
            resume_from,
        } => {
            let view = LostEventsView {
                last_event_id,
                resume_from,
                detail: format!(
                    "event {last_event_id} was never written here; going on after \
                     {resume_from} (each machine's events are in GET /machines/{{id}}/events)"
                ),
            };
            ("lost", resume_from, serde_json::to_string(&view))
        }
    };
    // Plain structs of strings and numbers: serialising them cannot fail.
    Event::default()
        .event(event)
        .id(id.to_string())
        .data(data.unwrap_or_default())
}

/// The `Last-Event-ID` the client resumes after: a sequence number, 0 or more.
fn last_event_id(headers: &HeaderMap) -> Result<Option<i64>> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .map(Some)
        .ok_or_else(|| {
            Error::BadRequest(
                "Last-Event-ID must be the `id` of an event this stream sent (a number)".into(),
            )
        })
}

/// Your machines' events as they happen, as server-sent events.
///
/// Administrators get every machine's. Each is `event: machine` with `id` = the event's
/// `position` and a JSON `data`. Without `Last-Event-ID` the stream starts with the next
/// event; with it, it goes on after that event (an id this server never wrote gets an `event:
/// lost` first, saying where it goes on from). Events come in the order they were committed
/// and none is skipped: the server reads the next ones only when the client has taken the
/// last, so a slow reader falls behind and loses nothing. A comment line every 15 s keeps an
/// idle stream open. The stream ends when its credential no longer holds (checked every 30
/// s: an expired access token, a password change, a revoked API token, a disabled account, a
/// changed role): reconnect with a valid one and `Last-Event-ID`. An account may hold 16
/// waits and streams open per server (429 beyond).
#[utoipa::path(get, path = "/events", tag = "machines", operation_id = "event_stream",
    params(("Last-Event-ID" = Option<i64>, Header, minimum = 0,
        description = "resume after this event (the `id` of the last one received)")),
    security(("bearer" = [])),
    responses((status = 200, content_type = "text/event-stream", body = StreamEventView,
            description = "the stream; each `data` is a StreamEventView (`event: machine`) or a \
                LostEventsView (`event: lost`)"),
        (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 429, body = Problem, description = "16 waits and streams are open already")))]
pub async fn event_stream(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    headers: HeaderMap,
) -> Result<Response> {
    let after = last_event_id(&headers)?;
    // What `Caller` authenticated, kept to check again while the stream lasts.
    let bearer = bearer_token(&headers)?.to_owned();
    let items = app.event_stream(who, bearer, after).await?;
    let events = items.map(|item| Ok::<_, Infallible>(sse_event(item)));
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    // Proxies that buffer responses (nginx) would hold events back otherwise.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_event_id_is_a_number_or_nothing() {
        let mut headers = HeaderMap::new();
        assert_eq!(last_event_id(&headers).unwrap(), None);
        headers.insert("last-event-id", HeaderValue::from_static("42"));
        assert_eq!(last_event_id(&headers).unwrap(), Some(42));
        for bad in ["-1", "abc", "", "1.5"] {
            headers.insert("last-event-id", HeaderValue::from_static(bad));
            assert!(last_event_id(&headers).is_err(), "{bad:?}");
        }
    }
}
