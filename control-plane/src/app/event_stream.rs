//! The event stream (`GET /events`, issue 15): every event of the caller's machines (an
//! administrator's: all) as it is written, resumable from the last one seen.
//!
//! The stream reads the `machine_events` log itself, one page at a time and only when the
//! client has taken the previous page, so what a connection buffers is bounded by a page and a
//! slow reader falls behind without losing anything: it goes on from where it is, or resumes
//! there with `Last-Event-ID` after a reconnect. It sleeps between changes (woken by the
//! machines' change notices, on every replica), with a slow poll as a safety net.
//!
//! It goes by stream position, which is commit order (`StreamedEvent::position`): a position
//! visible now means every lower one is visible too or was never committed, so moving past
//! what it has read never skips an event that commits later.

use super::long_requests::Slot;
use super::{App, Principal};
use crate::error::Result;
use crate::model::UserId;
use crate::store::machine_events::StreamedEvent;
use auth::Role;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Events read at once.
const PAGE: i64 = 100;
/// The longest a stream sleeps without a change notice: a notice lost with a listener's
/// connection costs at most this.
const SAFETY_POLL: Duration = Duration::from_secs(5);
/// How often a stream checks its credential again: an access token that expired, a password
/// change, a revoked API token, a disabled account or a changed role ends it.
const RECHECK: Duration = Duration::from_secs(30);

/// What a stream sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamItem {
    Event(StreamedEvent),
    /// The client asked to resume after an event this server never wrote (another database,
    /// or a log that was reset): it goes on from `resume_from`, and what it missed is in each
    /// machine's `GET /machines/{id}/events`.
    Lost {
        last_event_id: i64,
        resume_from: i64,
    },
}

/// One open stream.
struct Stream {
    app: Arc<App>,
    who: Principal,
    /// The credential it was opened with, checked again every [`RECHECK`].
    bearer: String,
    checked_at: Instant,
    /// Every event up to this position was read.
    after: i64,
    ready: VecDeque<StreamItem>,
    /// Whose events it reads: `None` for an administrator's stream.
    owner: Option<UserId>,
    _slot: Slot,
}

impl Stream {
    /// Whether the stream may go on: its credential still authenticates its principal.
    async fn still_allowed(&mut self) -> bool {
        if self.checked_at.elapsed() < RECHECK {
            return true;
        }
        self.checked_at = Instant::now();
        matches!(self.app.authenticate(&self.bearer).await, Ok(now) if now == self.who)
    }

    /// The next item, or `None` when the stream ends (its credential no longer holds, or the
    /// database failed: the client resumes).
    async fn next(&mut self) -> Option<StreamItem> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Some(item);
            }
            if !self.still_allowed().await {
                return None;
            }
            // Armed before the read: a change between the read and the sleep still wakes it.
            let wake = self.app.store.watch.subscribe_all();
            let woken = wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let rows = match self
                .app
                .store
                .events_after(self.after, self.owner, PAGE)
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = ?e, "event stream: reading events failed; ending it");
                    return None;
                }
            };
            if let Some(last) = rows.last() {
                self.after = last.position;
                self.ready.extend(rows.into_iter().map(StreamItem::Event));
                continue;
            }
            let recheck = self.checked_at + RECHECK;
            tokio::select! {
                () = &mut woken => {}
                () = tokio::time::sleep(SAFETY_POLL) => {}
                () = tokio::time::sleep_until(recheck) => {}
            }
        }
    }
}

impl App {
    /// Opens an event stream for `who`, who authenticated with `bearer`: events after
    /// `last_event_id`, or from now without one. Counts against the account's open long
    /// requests.
    pub async fn event_stream(
        self: &Arc<Self>,
        who: Principal,
        bearer: String,
        last_event_id: Option<i64>,
    ) -> Result<impl futures::Stream<Item = StreamItem> + Send + 'static> {
        let slot = self.long_requests.open(who.user_id)?;
        let newest = self.store.events_last_position().await?;
        let mut ready = VecDeque::new();
        let after = match last_event_id {
            Some(id) if id > newest => {
                ready.push_back(StreamItem::Lost {
                    last_event_id: id,
                    resume_from: newest,
                });
                newest
            }
            Some(id) => id,
            None => newest,
        };
        let stream = Stream {
            app: Arc::clone(self),
            who,
            bearer,
            checked_at: Instant::now(),
            after,
            ready,
            owner: (who.role != Role::Admin).then_some(who.user_id),
            _slot: slot,
        };
        Ok(futures::stream::unfold(stream, |mut s| async move {
            s.next().await.map(|item| (item, s))
        }))
    }
}
