//! Account rows this replica has read, kept until any replica changes them.
//!
//! Every authenticated request needs its user's session version and role (a password change
//! must end older access tokens at once). Reading the row each time cost one query per request,
//! the largest part of `GET /auth/profile` (issue 12). The rows change rarely, so they are kept
//! here and dropped whenever one changes:
//!
//! - on this replica, by the store's own writes, right after they commit;
//! - on PostgreSQL, for every replica, by a `NOTIFY` sent inside the writing transaction (so it
//!   is delivered when the change commits) to a listener each replica keeps. Each listener,
//!   once it has dropped the row, confirms with a notice of its own on a second channel. The
//!   writer names, in its transaction, the listeners connected then (`pg_stat_activity`, by
//!   the application name they set), and answers only when each of them has confirmed: so
//!   when the answer to a password change reaches its client, no replica still holds the old
//!   row (issue 12; a writer that answered when its own listener had heard the notice let the
//!   other replica serve the old token once in ten CI runs).
//!   A replica whose listener may miss a notice keeps nothing and reads the row every time:
//!   while it is not connected, after a writer's own listener failed to confirm, and when the
//!   connection fails the liveness query it is asked every 5 s. A writer waits for the others
//!   at most 2 s, then answers and logs which did not confirm: a replica cut off from
//!   PostgreSQL that way stops trusting its cache when its liveness query fails, at most
//!   `LIVENESS_EVERY + NOTICE_WAIT` later.
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
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};

/// The PostgreSQL channel account changes are announced on; the payload is
/// `<user id> <notice id>`.
pub(crate) const CHANNEL: &str = "skygate_users";

/// The channel listeners confirm on, once they have dropped a row; the payload is the notice
/// id, the sender the listener's backend pid.
const CONFIRM_CHANNEL: &str = "skygate_users_confirm";

/// The application name listeners' connections carry, so writers can name them.
pub(crate) const LISTENER_NAME: &str = "skygate-user-cache";

/// Most rows kept; past it the cache starts over (a bound, not an eviction policy: a fleet's
/// active accounts fit many times over).
const MAX_ROWS: usize = 100_000;

/// How long a writer waits for its own notice before answering anyway.
const NOTICE_WAIT: Duration = Duration::from_secs(2);

/// How often the listener's connection is asked whether it is alive.
const LIVENESS_EVERY: Duration = Duration::from_secs(5);

/// How long the listener waits before connecting again after losing its connection.
const RECONNECT_AFTER: Duration = Duration::from_millis(500);

/// The kept rows, by id and by username (usernames never change, so one row has one name).
#[derive(Debug, Default)]
struct Rows {
    by_id: HashMap<UserId, Arc<UserRecord>>,
    by_name: HashMap<String, Arc<UserRecord>>,
}

impl Rows {
    fn clear(&mut self) {
        self.by_id.clear();
        self.by_name.clear();
    }
}

/// Where a read began, to tell whether its result may be kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadTicket(u64);

#[derive(Debug)]
pub(crate) struct UserCache {
    rows: RwLock<Rows>,
    /// Bumped by every drop; see the module comment.
    epoch: AtomicU64,
    /// Whether every change is known to reach `drop_row`: always on SQLite (one process
    /// writes), on PostgreSQL only while the listener is connected.
    trusted: AtomicBool,
    /// Writers waiting for listeners to confirm their notice, by notice id.
    waiting: Mutex<HashMap<String, Waiter>>,
    /// This replica's listener's backend pid; 0 while it is not connected.
    own_listener: AtomicU32,
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
            rows: RwLock::new(Rows::default()),
            epoch: AtomicU64::new(0),
            trusted: AtomicBool::new(trusted),
            waiting: Mutex::new(HashMap::new()),
            own_listener: AtomicU32::new(0),
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
            .by_id
            .get(&id)
            .cloned()
    }

    /// The kept row of `username`, if it may be trusted.
    pub(crate) fn get_by_name(&self, username: &str) -> Option<Arc<UserRecord>> {
        if !self.trusted.load(Ordering::Acquire) {
            return None;
        }
        self.rows
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_name
            .get(username)
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
        if rows.by_id.len() >= MAX_ROWS {
            rows.clear();
        }
        rows.by_name.insert(row.username.clone(), Arc::clone(&row));
        rows.by_id.insert(row.id, row);
    }

    /// Forgets one account's row (it changed).
    pub(crate) fn drop_row(&self, id: UserId) {
        let mut rows = self.rows.write().unwrap_or_else(PoisonError::into_inner);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        if let Some(row) = rows.by_id.remove(&id) {
            rows.by_name.remove(&row.username);
        }
    }

    /// Forgets everything and stops or starts trusting the cache.
    fn reset(&self, trusted: bool) {
        let mut rows = self.rows.write().unwrap_or_else(PoisonError::into_inner);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        rows.clear();
        self.trusted.store(trusted, Ordering::Release);
    }

    /// A notice id to send with a change, and the wait for listeners to confirm it.
    pub(crate) fn expect_notice(self: &Arc<Self>) -> (String, NoticeWait) {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter {
            expected: HashSet::new(),
            confirmed: HashSet::new(),
            armed: false,
            done: Some(tx),
        };
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), waiter);
        let wait = NoticeWait {
            id: id.clone(),
            heard: rx,
            cache: Arc::clone(self),
        };
        (id, wait)
    }

    /// A notice arrived: drop the row. Returns the notice id to confirm, if it has one.
    fn heard<'p>(&self, payload: &'p str) -> Option<&'p str> {
        let mut parts = payload.split(' ');
        match parts.next().map(str::parse::<UserId>) {
            Some(Ok(user)) => self.drop_row(user),
            // Not ours to read: forget everything rather than keep a row that may have changed.
            _ => self.reset(true),
        }
        parts.next()
    }

    /// Listener `pid` confirmed `notice`: release its writer once every listener it named has.
    fn confirmed(&self, notice: &str, pid: u32) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(waiter) = waiting.get_mut(notice) {
            waiter.confirmed.insert(pid);
            waiter.release_if_done();
        }
    }

    /// The listener cannot be trusted (a notice it should have heard did not come): keep
    /// nothing and have it connect again.
    fn distrust(&self) {
        self.reset(false);
        self.reconnect.notify_one();
    }
}

/// A writer's wait for its notice to be confirmed.
#[derive(Debug)]
struct Waiter {
    /// The listeners connected when the change was written (this replica's own included).
    expected: HashSet<u32>,
    /// The listeners that have confirmed so far (confirmations may come first).
    confirmed: HashSet<u32>,
    /// Whether `expected` is known yet.
    armed: bool,
    done: Option<oneshot::Sender<()>>,
}

impl Waiter {
    fn release_if_done(&mut self) {
        if self.armed && self.expected.is_subset(&self.confirmed) {
            if let Some(done) = self.done.take() {
                let _ = done.send(());
            }
        }
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
    /// Names the listeners that must confirm: `listeners`, as the writing transaction saw them
    /// (a space-separated list of backend pids), and this replica's own.
    pub(crate) fn expect_from(&self, listeners: Option<&str>) {
        let own = self.cache.own_listener.load(Ordering::Acquire);
        let mut waiting = self
            .cache
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(waiter) = waiting.get_mut(&self.id) {
            waiter.expected = listeners
                .unwrap_or_default()
                .split(' ')
                .filter_map(|pid| u32::from_str(pid).ok())
                .chain((own != 0).then_some(own))
                .collect();
            waiter.armed = true;
            waiter.release_if_done();
        }
    }

    /// Waits, boundedly, for every named listener to confirm. If this replica's own did not,
    /// its listener is not hearing what it should (a connection that died without closing, a
    /// pooler that drops `LISTEN`): the cache stops keeping rows until it has connected again.
    /// Others that did not are logged; they distrust their own caches (module comment).
    pub(crate) async fn done(mut self) {
        if tokio::time::timeout(NOTICE_WAIT, &mut self.heard)
            .await
            .is_ok()
        {
            return;
        }
        let own = self.cache.own_listener.load(Ordering::Acquire);
        let missing: Vec<u32> = self
            .cache
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&self.id)
            .map(|w| w.expected.difference(&w.confirmed).copied().collect())
            .unwrap_or_default();
        tracing::warn!(
            ?missing,
            "listeners did not confirm an account change in time; answering anyway"
        );
        if own == 0 || missing.contains(&own) {
            tracing::warn!("reading accounts uncached until the listener has connected again");
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
    let (listener, pid) = connect(url).await?;
    cache.own_listener.store(pid, Ordering::Release);
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

/// A listener connection named [`LISTENER_NAME`], listening on both channels, and its pid.
async fn connect(url: &str) -> Result<(sqlx::postgres::PgListener, u32), sqlx::Error> {
    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    let options = PgConnectOptions::from_str(url)?.application_name(LISTENER_NAME);
    // One connection; a reconnect through this pool keeps the name.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_with(options)
        .await?;
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
    listener.ignore_pool_close_event(true);
    listener.listen_all([CHANNEL, CONFIRM_CHANNEL]).await?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut listener)
        .await?;
    Ok((listener, u32::try_from(pid).unwrap_or_default()))
}

/// Confirms `notice` from the listener's connection (its pid is the sender).
async fn confirm(
    listener: &mut sqlx::postgres::PgListener,
    notice: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1 AS sent FROM (SELECT pg_notify($1, $2)) AS n")
        .bind(CONFIRM_CHANNEL)
        .bind(notice)
        .execute(listener)
        .await
        .map(drop)
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
        let lost = match heard {
            Heard::Notice(n) if n.channel() == CONFIRM_CHANNEL => {
                c.confirmed(n.payload(), n.process_id());
                false
            }
            Heard::Notice(n) => match c.heard(n.payload()) {
                // Confirmed only now, with the row dropped; boundedly, as the liveness query.
                Some(notice) => !matches!(
                    tokio::time::timeout(NOTICE_WAIT, confirm(&mut listener, notice)).await,
                    Ok(Ok(()))
                ),
                None => false,
            },
            Heard::Lost => true,
        };
        if !lost {
            continue;
        }
        c.own_listener.store(0, Ordering::Release);
        c.reset(false);
        drop(c);
        tracing::warn!(
            "lost the account-change listener; reading accounts uncached until it is back"
        );
        listener = loop {
            tokio::time::sleep(RECONNECT_AFTER).await;
            match connect(&url).await {
                Ok((l, pid)) => {
                    if let Some(c) = cache.upgrade() {
                        c.own_listener.store(pid, Ordering::Release);
                        c.reset(true);
                    }
                    break l;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "account-change listener: reconnecting")
                }
            }
        };
        tracing::info!("account-change listener connected again");
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
            disabled_at: None,
            quota: crate::model::QuotaOverride::default(),
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
    fn a_row_is_found_by_its_name_until_it_is_dropped() {
        let cache = UserCache::local();
        let id = UserId::new();
        cache.keep(cache.ticket(), row(id, 1));
        assert_eq!(cache.get_by_name("u").unwrap().id, id);
        cache.drop_row(id);
        assert!(cache.get_by_name("u").is_none());
        // The name taken again by a new account (the old one deleted) finds the new one.
        let again = UserId::new();
        cache.keep(cache.ticket(), row(again, 1));
        assert_eq!(cache.get_by_name("u").unwrap().id, again);
        cache.reset(false);
        assert!(cache.get_by_name("u").is_none());
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
    async fn a_writer_is_released_when_every_named_listener_has_confirmed() {
        let cache = UserCache::local();
        cache.own_listener.store(7, Ordering::Release);
        let id = UserId::new();
        cache.keep(cache.ticket(), row(id, 1));
        let (notice, mut wait) = cache.expect_notice();
        // Another replica's listener confirms before the writer has named who must.
        cache.confirmed(&notice, 9);
        wait.expect_from(Some("9 8"));
        assert_eq!(
            cache.heard(&format!("{id} {notice}")),
            Some(notice.as_str())
        );
        assert!(cache.get(id).is_none());
        cache.confirmed(&notice, 7);
        cache.confirmed("someone else's", 8);
        assert!(
            wait.heard.try_recv().is_err(),
            "released before 8 confirmed"
        );
        cache.confirmed(&notice, 8);
        tokio::time::timeout(Duration::from_millis(100), wait.done())
            .await
            .unwrap();
        // A payload that is not ours forgets everything.
        cache.keep(cache.ticket(), row(id, 1));
        assert_eq!(cache.heard("junk"), None);
        assert!(cache.get(id).is_none());
        // A wait given up (its change rolled back) is forgotten.
        let (_, wait) = cache.expect_notice();
        drop(wait);
        assert!(cache.waiting.lock().unwrap().is_empty());
    }

    // Waits out NOTICE_WAIT (2 s) for real.
    #[tokio::test]
    async fn another_replica_that_does_not_confirm_delays_but_does_not_distrust() {
        let cache = UserCache::local();
        cache.own_listener.store(7, Ordering::Release);
        let id = UserId::new();
        cache.keep(cache.ticket(), row(id, 1));
        let (notice, wait) = cache.expect_notice();
        wait.expect_from(Some("7 8"));
        cache.confirmed(&notice, 7);
        wait.done().await;
        assert!(cache.get(id).is_some(), "this replica's listener confirmed");
    }

    // Waits out NOTICE_WAIT (2 s) for real.
    #[tokio::test]
    async fn a_notice_its_own_listener_does_not_confirm_distrusts_the_cache() {
        let cache = UserCache::local();
        cache.own_listener.store(7, Ordering::Release);
        let id = UserId::new();
        cache.keep(cache.ticket(), row(id, 1));
        let (notice, wait) = cache.expect_notice();
        wait.expect_from(Some("8"));
        cache.confirmed(&notice, 8);
        wait.done().await;
        assert!(cache.get(id).is_none());
        cache.keep(cache.ticket(), row(id, 1));
        assert!(cache.get(id).is_none(), "kept rows while distrusted");
        assert!(cache.waiting.lock().unwrap().is_empty());
    }
}
