//! Waking whoever waits on a machine (`GET /machines/{id}/wait`, issue 15) when it changes, on
//! every replica, without polling.
//!
//! - PostgreSQL: every machine event is announced with `NOTIFY skygate_machines, '<id>'` inside
//!   the transaction that writes it, so it is delivered when that transaction commits, to a
//!   listener each replica keeps (its own included). A listener that lost its connection wakes
//!   every waiter once it is back (they read again): notices sent meanwhile are gone.
//! - SQLite (one process): the store's methods that change a machine's status wake its
//!   waiters right after their commit.
//!
//! A waiter registers before it reads the machine, so a change between its read and its sleep
//! still wakes it.

use crate::model::MachineId;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;
use tokio::sync::Notify;

/// The PostgreSQL channel machine changes are announced on; the payload is the machine's id.
pub(crate) const CHANNEL: &str = "skygate_machines";

/// How long the listener waits before connecting again after losing its connection.
const RECONNECT_AFTER: Duration = Duration::from_millis(500);

/// How often the listener's connection is asked whether it is alive (a half-open connection
/// would otherwise leave waiters asleep until their timeouts), and how long it may take.
const LIVENESS_EVERY: Duration = Duration::from_secs(5);
const LIVENESS_WAIT: Duration = Duration::from_secs(2);

/// Who waits on which machine, and on any.
#[derive(Debug, Default)]
pub struct MachineWatch {
    waiting: Mutex<HashMap<MachineId, Weak<Notify>>>,
    /// Woken on every change of any machine (event streams, `GET /events`).
    any: Arc<Notify>,
    listener: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for MachineWatch {
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

impl MachineWatch {
    /// What a waiter on `id` sleeps on; hold it across the read that decides whether to sleep.
    pub fn subscribe(&self, id: MachineId) -> Arc<Notify> {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(live) = waiting.get(&id).and_then(Weak::upgrade) {
            return live;
        }
        // Entries whose waiters are all gone are dropped as new ones come.
        waiting.retain(|_, w| w.strong_count() > 0);
        let notify = Arc::new(Notify::new());
        waiting.insert(id, Arc::downgrade(&notify));
        notify
    }

    /// What a waiter on any machine's change sleeps on (arm it before reading, as above).
    pub fn subscribe_all(&self) -> Arc<Notify> {
        Arc::clone(&self.any)
    }

    /// Wakes the waiters on `id`, if any, and those on any machine.
    pub fn changed(&self, id: MachineId) {
        self.any.notify_waiters();
        let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(notify) = waiting.get(&id).and_then(Weak::upgrade) {
            notify.notify_waiters();
        }
    }

    /// Wakes every waiter (they read again).
    fn changed_all(&self) {
        self.any.notify_waiters();
        let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        for notify in waiting.values().filter_map(Weak::upgrade) {
            notify.notify_waiters();
        }
    }

    /// Starts the PostgreSQL listener that wakes this replica's waiters, once it listens: a
    /// wait that begins after the store is open misses nothing.
    pub(crate) async fn listening(self: &Arc<Self>, url: &str) -> Result<(), sqlx::Error> {
        let listener = connect(url).await?;
        let task = tokio::spawn(listen(url.to_owned(), Arc::downgrade(self), listener));
        *self.listener.lock().unwrap_or_else(PoisonError::into_inner) = Some(task.abort_handle());
        Ok(())
    }
}

async fn connect(url: &str) -> Result<sqlx::postgres::PgListener, sqlx::Error> {
    let mut listener = sqlx::postgres::PgListener::connect(url).await?;
    listener.ignore_pool_close_event(true);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// Hears notices until the connection is lost or stops answering its liveness query, then
/// connects again and wakes every waiter: whatever was announced meanwhile is gone.
async fn listen(url: String, watch: Weak<MachineWatch>, mut listener: sqlx::postgres::PgListener) {
    let mut check = tokio::time::interval(LIVENESS_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let lost = tokio::select! {
            heard = listener.try_recv() => match heard {
                Ok(Some(notice)) => {
                    let Some(w) = watch.upgrade() else { return };
                    if let Ok(id) = MachineId::from_str(notice.payload()) {
                        w.changed(id);
                    }
                    false
                }
                Ok(None) | Err(_) => true,
            },
            _ = check.tick() => {
                let alive = tokio::time::timeout(
                    LIVENESS_WAIT,
                    sqlx::query("SELECT 1").execute(&mut listener),
                )
                .await;
                !matches!(alive, Ok(Ok(_)))
            }
        };
        if !lost {
            continue;
        }
        tracing::warn!("the machine-change listener lost its connection; reconnecting");
        listener = loop {
            if watch.strong_count() == 0 {
                return;
            }
            tokio::time::sleep(RECONNECT_AFTER).await;
            match connect(&url).await {
                Ok(l) => break l,
                Err(e) => {
                    tracing::warn!(error = ?e, "the machine-change listener cannot connect; retrying")
                }
            }
        };
        let Some(w) = watch.upgrade() else { return };
        w.changed_all();
    }
}
