//! Account rows this replica has read, kept until any replica changes them.
//!
//! Every authenticated request needs its user's session version and role (a password change
//! must end older access tokens at once). Reading the row each time cost one query per request,
//! the largest part of `GET /auth/profile` (issue 12). The rows change rarely, so they are kept
//! here and dropped whenever one changes:
//!
//! - on this replica, by the store's own writes, right after they commit;
//! - on PostgreSQL, for every replica, by a `NOTIFY` sent inside the writing transaction (so it
//!   is delivered when the change commits) to a listener each replica keeps. The writer answers
//!   only after its own listener has heard the notice: PostgreSQL signals every listening
//!   session at that commit, so the other replicas have it then too, and drop the row as soon
//!   as their listener reads it (on one machine, well before a client can send its next
//!   request; not ordered with the answer, so "at once" here means that, not a guarantee).
//!   A replica whose listener may miss a notice keeps nothing and reads the row every time:
//!   while it is not connected, after a writer's own notice failed to come back (a connection
//!   that died without closing, a pooler that drops `LISTEN`), and when the connection fails
//!   the liveness query it is asked every 5 s.
//!
//! A read that raced a change must not put the old row back: every drop bumps an epoch, and a
//! row read from the database is kept only if no drop happened since the read began.
//!
//! So every write that changes a `users` column (a role change, a disabled account, ...) goes
//! through `users.rs`'s `announce_in_txn` and `announced`; a write that skipped them would
//! leave other requests on this and other replicas with the old row. (Writes that only lock
//! the row, `SET updated_at = updated_at`, change nothing.)

use super::users::UserRecord;
use crate::model::UserId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};

/// The PostgreSQL channel account changes are announced on; the payload is
/// `<user id> <notice id>`.
pub(crate) const CHANNEL: &str = "skygate_users";

/// Most rows kept; past it the cache starts over (a bound, not an eviction policy: a fleet's
/// active accounts fit many times over).
const MAX_ROWS: usize = 100_000;

/// How long a writer waits for its own notice before answering anyway.
const NOTICE_WAIT: Duration = Duration::from_secs(2);

/// How often the listener's connection is asked whether it is alive.
const LIVENESS_EVERY: Duration = Duration::from_secs(5);

/// How long the listener waits before connecting again after losing its connection.
const RECONNECT_AFTER: Duration = Duration::from_millis(500);

/// Where a read began, to tell whether its result may be kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadTicket(u64);

#[derive(Debug)]
pub(crate) struct UserCache {
    rows: RwLock<HashMap<UserId, Arc<UserRecord>>>,
    /// Bumped by every drop; see the module comment.
    epoch: AtomicU64,
    /// Whether every change is known to reach `drop_row`: always on SQLite (one process
    /// writes), on PostgreSQL only while the listener is connected.
    trusted: AtomicBool,
    /// Writers waiting for their own notice to come back, by notice id.
    waiting: Mutex<HashMap<String, oneshot::Sender<()>>>,
    /// The listener task (PostgreSQL), ended with the cache.
    listener: Mutex<Option<tokio::task::AbortHandle>>,
    /// Tells the listener to connect again (see [`UserCache::distrust`]).
    reconnect: Arc<Notify>,
}

impl Drop for UserCache {
    fn drop(&mut self) {
        if let Some(task) = self
            .listener
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

impl UserCache {
    /// A cache that every change reaches directly (one process writes).
    pub(crate) fn local() -> Arc<Self> {
        Arc::new(Self::new(true))
    }

    fn new(trusted: bool) -> Self {
        Self {
            rows: RwLock::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            trusted: AtomicBool::new(trusted),
            waiting: Mutex::new(HashMap::new()),
            listener: Mutex::new(None),
            reconnect: Arc::new(Notify::new()),
        }
    }

    /// The kept row, if it may be trusted.
    pub(crate) fn get(&self, id: UserId) -> Option<Arc<UserRecord>> {
        if !self.trusted.load(Ordering::Acquire) {
            return None;
        }
        self.rows
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
    }

    /// Call before reading a row from the database.
    pub(crate) fn ticket(&self) -> ReadTicket {
        ReadTicket(self.epoch.load(Ordering::Acquire))
    }

    /// Keeps a row read under `ticket`, unless something was dropped since.
    pub(crate) fn keep(&self, ticket: ReadTicket, row: Arc<UserRecord>) {
        if !self.trusted.load(Ordering::Acquire) {
            return;
        }
        let mut rows = self.rows.write().unwrap_or_else(PoisonError::into_inner);
        // Checked under the lock that drops take too, so a drop cannot slip in between.
        if self.epoch.load(Ordering::Acquire) != ticket.0 {
            return;
        }
        if rows.len() >= MAX_ROWS {
            rows.clear();
        }
        rows.insert(row.id, row);
    }

    /// Forgets one account's row (it changed).
    pub(crate) fn drop_row(&self, id: UserId) {
        let mut rows = self.rows.write().unwrap_or_else(PoisonError::into_inner);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        rows.remove(&id);
    }

    /// Forgets everything and stops or starts trusting the cache.
    fn reset(&self, trusted: bool) {
        let mut rows = self.rows.write().unwrap_or_else(PoisonError::into_inner);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        rows.clear();
        self.trusted.store(trusted, Ordering::Release);
    }

    /// A notice id to send with a change, and the wait for it to come back.
    pub(crate) fn expect_notice(self: &Arc<Self>) -> (String, NoticeWait) {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), tx);
        let wait = NoticeWait {
            id: id.clone(),
            heard: rx,
            cache: Arc::clone(self),
        };
        (id, wait)
    }

    /// A notice arrived: drop the row, and release the writer waiting for it, if it is ours.
    fn heard(&self, payload: &str) {
        let mut parts = payload.split(' ');
        match parts.next().map(str::parse::<UserId>) {
            Some(Ok(user)) => self.drop_row(user),
            // Not ours to read: forget everything rather than keep a row that may have changed.
            _ => self.reset(true),
        }
        if let Some(notice) = parts.next() {
            let waiter = self
                .waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(notice);
            if let Some(waiter) = waiter {
                let _ = waiter.send(());
            }
        }
    }

    /// The listener cannot be trusted (a notice it should have heard did not come): keep
    /// nothing and have it connect again.
    fn distrust(&self) {
        self.reset(false);
        self.reconnect.notify_one();
    }
}

/// A writer's wait for its notice (see [`UserCache::expect_notice`]); dropping it, waited for
/// or not (a rolled-back change), forgets it.
#[derive(Debug)]
pub(crate) struct NoticeWait {
    id: String,
    heard: oneshot::Receiver<()>,
    cache: Arc<UserCache>,
}

impl NoticeWait {
    /// Waits, boundedly. A notice that does not come back means the listener is not hearing
    /// what it should (a connection that died without closing, a pooler that drops `LISTEN`):
    /// the cache stops keeping rows until the listener has connected again.
    pub(crate) async fn done(mut self) {
        if tokio::time::timeout(NOTICE_WAIT, &mut self.heard)
            .await
            .is_err()
        {
            tracing::warn!("an account change's notice did not come back in time; reading accounts uncached until the listener has connected again");
            self.cache.distrust();
        }
    }
}

impl Drop for NoticeWait {
    fn drop(&mut self) {
        self.cache
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// A cache fed by PostgreSQL notices: connects the listener (so the cache is trusted from the
/// start) and keeps it connected in a task that ends with the cache.
pub(crate) async fn listening(url: &str) -> Result<Arc<UserCache>, sqlx::Error> {
    let cache = Arc::new(UserCache::new(false));
    let listener = connect(url).await?;
    cache.reset(true);
    let reconnect = Arc::clone(&cache.reconnect);
    let task = tokio::spawn(listen(
        url.to_owned(),
        Arc::downgrade(&cache),
        reconnect,
        listener,
    ));
    *cache
        .listener
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(task.abort_handle());
    Ok(cache)
}

async fn connect(url: &str) -> Result<sqlx::postgres::PgListener, sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect(url).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// Why the listener stops hearing.
enum Heard {
    Notice(sqlx::postgres::PgNotification),
    /// The connection dropped or did not answer: notices may have been lost.
    Lost,
}

async fn listen(
    url: String,
    cache: Weak<UserCache>,
    reconnect: Arc<Notify>,
    mut listener: sqlx::postgres::PgListener,
) {
    let mut check = tokio::time::interval(LIVENESS_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let heard = tokio::select! {
            // `try_recv` answers `None` when the connection dropped.
            notice = listener.try_recv() => match notice {
                Ok(Some(n)) => Heard::Notice(n),
                Ok(None) | Err(_) => Heard::Lost,
            },
            () = reconnect.notified() => Heard::Lost,
            _ = check.tick() => {
                // A connection that died without closing would wait here for ever: ask it
                // something, boundedly (notices arriving meanwhile are kept for `try_recv`).
                let alive = tokio::time::timeout(
                    NOTICE_WAIT,
                    sqlx::query("SELECT 1").execute(&mut listener),
                )
                .await;
                if matches!(alive, Ok(Ok(_))) {
                    continue;
                }
                Heard::Lost
            }
        };
        let Some(c) = cache.upgrade() else { return };
        match heard {
            Heard::Notice(n) => c.heard(n.payload()),
            Heard::Lost => {
                c.reset(false);
                drop(c);
                tracing::warn!(
                    "lost the account-change listener; reading accounts uncached until it is back"
                );
                listener = loop {
                    tokio::time::sleep(RECONNECT_AFTER).await;
                    match connect(&url).await {
                        Ok(l) => break l,
                        Err(e) => {
                            tracing::warn!(error = %e, "account-change listener: reconnecting")
                        }
                    }
                };
                if let Some(c) = cache.upgrade() {
                    c.reset(true);
                }
                tracing::info!("account-change listener connected again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use auth::Role;
    use chrono::Utc;

    fn row(id: UserId, session_version: i64) -> Arc<UserRecord> {
        Arc::new(UserRecord {
            id,
            username: "u".into(),
            email: "u@example.com".into(),
            password_hash: String::new(),
            role: Role::User,
            session_version,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        })
    }

    #[test]
    fn a_row_read_before_a_change_is_not_kept_after_it() {
        let cache = UserCache::local();
        let id = UserId::new();
        let ticket = cache.ticket();
        // The change commits and drops the row while the old read is still in flight.
        cache.drop_row(id);
        cache.keep(ticket, row(id, 1));
        assert!(cache.get(id).is_none());
        let ticket = cache.ticket();
        cache.keep(ticket, row(id, 2));
        assert_eq!(cache.get(id).unwrap().session_version, 2);
    }

    #[test]
    fn an_untrusted_cache_keeps_nothing() {
        let cache = UserCache::new(false);
        let id = UserId::new();
        cache.keep(cache.ticket(), row(id, 1));
        assert!(cache.get(id).is_none());
        cache.reset(true);
        cache.keep(cache.ticket(), row(id, 1));
        assert!(cache.get(id).is_some());
        // Losing the listener forgets what was kept.
        cache.reset(false);
        assert!(cache.get(id).is_none());
    }

    #[tokio::test]
    async fn a_notice_drops_its_row_and_releases_its_writer() {
        let cache = UserCache::local();
        let id = UserId::new();
        cache.keep(cache.ticket(), row(id, 1));
        let (notice, wait) = cache.expect_notice();
        cache.heard(&format!("{id} {notice}"));
        assert!(cache.get(id).is_none());
        tokio::time::timeout(Duration::from_millis(100), wait.done())
            .await
            .unwrap();
        // A payload that is not ours forgets everything.
        cache.keep(cache.ticket(), row(id, 1));
        cache.heard("junk");
        assert!(cache.get(id).is_none());
        // A wait given up (its change rolled back) is forgotten.
        let (_, wait) = cache.expect_notice();
        drop(wait);
        assert!(cache.waiting.lock().unwrap().is_empty());
    }

    // Waits out NOTICE_WAIT (2 s) for real.
    #[tokio::test]
    async fn a_notice_that_does_not_come_back_distrusts_the_cache() {
        let cache = UserCache::local();
        let id = UserId::new();
        cache.keep(cache.ticket(), row(id, 1));
        let (_, wait) = cache.expect_notice();
        wait.done().await;
        assert!(cache.get(id).is_none());
        cache.keep(cache.ticket(), row(id, 1));
        assert!(cache.get(id).is_none(), "kept rows while distrusted");
        assert!(cache.waiting.lock().unwrap().is_empty());
    }
}
