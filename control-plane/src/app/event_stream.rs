//! The event stream (`GET /events`, issue 15): every event of the caller's machines (an
//! administrator's: all) as it is written, resumable from the last one seen.
//!
//! The stream reads the `machine_events` log itself, one page at a time and only when the
//! client has taken the previous page, so what a connection buffers is bounded by a page and a
//! slow reader falls behind without losing anything: it goes on from where it is, or resumes
//! there with `Last-Event-ID` after a reconnect. It sleeps between changes (woken by the
//! machines' change notices, on every replica), with a slow poll as a safety net.
//!
//! Order on PostgreSQL: sequence numbers are taken when an event is written but become visible
//! when its transaction commits, so number 11 may be readable before 10 is. A stream delivers
//! strictly in number order and waits at such a gap ([`GAP_WAIT`]) for the transaction to
//! commit; a number still missing after that belonged to a transaction that rolled back. SQLite
//! has one writer, so its numbers become visible in order and nothing waits.

use super::long_requests::Slot;
use super::{App, Principal};
use crate::error::Result;
use crate::model::UserId;
use crate::store::machine_events::StreamedEvent;
use crate::store::Backend;
use auth::Role;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Events read at once.
const PAGE: i64 = 100;
/// How long a stream waits at a gap in the numbers for the transaction holding it to commit.
pub const GAP_WAIT: Duration = Duration::from_secs(2);
/// The longest a stream sleeps without a change notice: a notice lost with a listener's
/// connection costs at most this.
const SAFETY_POLL: Duration = Duration::from_secs(5);
/// A stream ends after this long (the client reconnects with `Last-Event-ID`), so that an
/// access token that expired or a role that changed is looked at again.
pub const MAX_STREAM: Duration = Duration::from_secs(15 * 60);

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

/// Where a stream is in the log, and the gap it waits at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Every number up to this one was delivered or given up.
    pub after: i64,
    /// The first missing number, and since when it has been waited for.
    gap: Option<(i64, Instant)>,
}

impl Cursor {
    pub fn new(after: i64) -> Self {
        Cursor { after, gap: None }
    }

    /// How many of `seqs` (ascending, all above `after`) may be delivered now: all of them up
    /// to the first gap (a number not among them, which a transaction in flight may still
    /// hold), unless that gap has been waited on for `wait` already. Moves `after` past what
    /// it takes. With a zero `wait` nothing is waited for.
    pub fn take(&mut self, seqs: &[i64], now: Instant, wait: Duration) -> usize {
        let mut taken = 0;
        for &seq in seqs {
            let expected = self.after + 1;
            if seq > expected && !wait.is_zero() {
                match self.gap {
                    Some((at, since)) if at == expected => {
                        if now.duration_since(since) < wait {
                            break;
                        }
                    }
                    _ => {
                        self.gap = Some((expected, now));
                        break;
                    }
                }
            }
            self.after = seq;
            self.gap = None;
            taken += 1;
        }
        taken
    }

    /// When the gap waited at is given up, if there is one.
    pub fn gap_deadline(&self, wait: Duration) -> Option<Instant> {
        self.gap.map(|(_, since)| since + wait)
    }
}

/// One open stream.
struct Stream {
    app: Arc<App>,
    who: Principal,
    cursor: Cursor,
    ready: VecDeque<StreamItem>,
    ends_at: Instant,
    /// Whose events the database query returns: `None` reads every machine's (PostgreSQL
    /// streams need every number to see the gaps; they filter afterwards).
    query_owner: Option<UserId>,
    gap_wait: Duration,
    _slot: Slot,
}

impl Stream {
    fn shows(&self, e: &StreamedEvent) -> bool {
        self.who.role == Role::Admin || e.owner_id == self.who.user_id
    }

    /// The next item, or `None` when the stream ends (its time is up, the account was
    /// disabled or removed, or the database failed: the client resumes).
    async fn next(&mut self) -> Option<StreamItem> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Some(item);
            }
            if Instant::now() >= self.ends_at {
                return None;
            }
            // Armed before the read: a change between the read and the sleep still wakes it.
            let wake = self.app.store.watch.subscribe_all();
            let woken = wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            match self.app.store.user_get(self.who.user_id).await {
                Ok(Some(user)) if user.disabled_at.is_none() => {}
                _ => return None,
            }
            let rows = match self
                .app
                .store
                .events_after(self.cursor.after, self.query_owner, PAGE)
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = ?e, "event stream: reading events failed; ending it");
                    return None;
                }
            };
            let read = rows.len();
            let seqs: Vec<i64> = rows.iter().map(|e| e.seq).collect();
            let taken = self.cursor.take(&seqs, Instant::now(), self.gap_wait);
            for event in rows.into_iter().take(taken) {
                if self.shows(&event) {
                    self.ready.push_back(StreamItem::Event(event));
                }
            }
            if !self.ready.is_empty() || (taken == read && read == PAGE as usize) {
                continue;
            }
            let until = self
                .cursor
                .gap_deadline(self.gap_wait)
                .unwrap_or_else(|| Instant::now() + SAFETY_POLL)
                .min(self.ends_at);
            tokio::select! {
                () = &mut woken => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }
}

impl App {
    /// Opens an event stream for `who`: events after `last_event_id`, or from now without
    /// one. Counts against the account's open long requests.
    pub async fn event_stream(
        self: &Arc<Self>,
        who: Principal,
        last_event_id: Option<i64>,
    ) -> Result<impl futures::Stream<Item = StreamItem> + Send + 'static> {
        let slot = self.long_requests.open(who.user_id)?;
        let newest = self.store.events_last_seq().await?;
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
        let postgres = self.store.backend() == Backend::Postgres;
        let query_owner = match who.role {
            Role::User if !postgres => Some(who.user_id),
            _ => None,
        };
        let stream = Stream {
            app: Arc::clone(self),
            who,
            cursor: Cursor::new(after),
            ready,
            ends_at: Instant::now() + MAX_STREAM,
            query_owner,
            gap_wait: if postgres { GAP_WAIT } else { Duration::ZERO },
            _slot: slot,
        };
        Ok(futures::stream::unfold(stream, |mut s| async move {
            s.next().await.map(|item| (item, s))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_order_are_taken_at_once() {
        let mut c = Cursor::new(4);
        let now = Instant::now();
        assert_eq!(c.take(&[5, 6, 7], now, GAP_WAIT), 3);
        assert_eq!(c.after, 7);
        assert_eq!(c.gap_deadline(GAP_WAIT), None);
    }

    #[test]
    fn a_gap_holds_back_what_follows_until_it_fills_or_its_wait_is_over() {
        let mut c = Cursor::new(4);
        let t0 = Instant::now();
        // 6 is readable before 5: 5's transaction has not committed yet.
        assert_eq!(c.take(&[6, 7], t0, GAP_WAIT), 0);
        assert_eq!(c.after, 4);
        assert_eq!(c.gap_deadline(GAP_WAIT), Some(t0 + GAP_WAIT));
        // Still missing a moment later: still waiting, from the first time it was seen.
        assert_eq!(c.take(&[6, 7], t0 + GAP_WAIT / 2, GAP_WAIT), 0);
        assert_eq!(c.gap_deadline(GAP_WAIT), Some(t0 + GAP_WAIT));
        // It commits: everything goes, in order.
        assert_eq!(c.take(&[5, 6, 7], t0 + GAP_WAIT / 2, GAP_WAIT), 3);
        assert_eq!((c.after, c.gap_deadline(GAP_WAIT)), (7, None));

        // A number that never comes (its transaction rolled back) is given up after the wait.
        assert_eq!(c.take(&[9], t0, GAP_WAIT), 0);
        assert_eq!(c.take(&[9, 11], t0 + GAP_WAIT, GAP_WAIT), 1);
        assert_eq!(c.after, 9);
        // ...and the next gap is waited for afresh.
        assert_eq!(c.gap_deadline(GAP_WAIT), Some(t0 + GAP_WAIT + GAP_WAIT));
    }

    #[test]
    fn without_a_wait_gaps_are_other_streams_events_and_skipped() {
        let mut c = Cursor::new(0);
        assert_eq!(c.take(&[3, 8, 20], Instant::now(), Duration::ZERO), 3);
        assert_eq!(c.after, 20);
    }
}
