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

/// Who waits on which machine.
#[derive(Debug, Default)]
pub struct MachineWatch {
    waiting: Mutex<HashMap<MachineId, Weak<Notify>>>,
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

    /// Wakes the waiters on `id`, if any.
    pub fn changed(&self, id: MachineId) {
        let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(notify) = waiting.get(&id).and_then(Weak::upgrade) {
            notify.notify_waiters();
        }
    }

    /// Wakes every waiter (they read again).
    fn changed_all(&self) {
        let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        for notify in waiting.values().filter_map(Weak::upgrade) {
            notify.notify_waiters();
        }
    }

    /// Starts the PostgreSQL listener that wakes this replica's waiters.
    pub(crate) fn listen(self: &Arc<Self>, url: &str) {
        let task = tokio::spawn(listen(url.to_owned(), Arc::downgrade(self)));
        *self.listener.lock().unwrap_or_else(PoisonError::into_inner) = Some(task.abort_handle());
    }
}

async fn listen(url: String, watch: Weak<MachineWatch>) {
    let mut listener = loop {
        match sqlx::postgres::PgListener::connect(&url).await {
            Ok(mut l) => match l.listen(CHANNEL).await {
                Ok(()) => break l,
                Err(e) => {
                    tracing::warn!(error = ?e, "the machine-change listener cannot listen; retrying")
                }
            },
            Err(e) => {
                tracing::warn!(error = ?e, "the machine-change listener cannot connect; retrying")
            }
        }
        if watch.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(RECONNECT_AFTER).await;
    };
    loop {
        let heard = listener.try_recv().await;
        let Some(w) = watch.upgrade() else { return };
        match heard {
            Ok(Some(notice)) => {
                if let Ok(id) = MachineId::from_str(notice.payload()) {
                    w.changed(id);
                }
            }
            // The connection was lost (the next call connects again): what was announced
            // meanwhile is gone, so every waiter reads again.
            Ok(None) => w.changed_all(),
            Err(e) => {
                drop(w);
                tracing::warn!(error = ?e, "the machine-change listener failed; retrying");
                tokio::time::sleep(RECONNECT_AFTER).await;
            }
        }
    }
}
