//! The audit log's use-cases: recording calls without holding them up, and reading them back
//! (administrators: everything; a tenant: its own).
//!
//! Requests hand their event to a bounded channel and go on; one writer per process appends
//! what has gathered, a batch per statement (a row per request, written on its own, cost as
//! much database time as a machine create). What this costs, chosen: an event reaches the
//! table a few milliseconds after its answer, and a process killed with -9 loses the events
//! it had not yet written. A batch the database refuses is retried (backing off to 30 s)
//! until it is written, so while the database is away the channel fills and requests wait
//! for the writer rather than drop events; only a shutdown gives up on a batch, after one
//! more try, and logs how many events it lost.

use super::{App, Page, Principal};
use crate::error::{Error, Result};
use crate::store::audit::{AuditEvent, AuditRecord, AuditScope};
use crate::store::Store;
use auth::Role;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Events that may wait for the writer before requests wait too.
const QUEUE: usize = 16_384;

/// Most events one write takes.
const BATCH: usize = 1024;

/// How long the writer lets events gather after writing a batch that was not full.
const GATHER: Duration = Duration::from_millis(20);

/// Where requests leave their audit events.
#[derive(Debug)]
pub struct AuditLog {
    sender: mpsc::Sender<AuditEvent>,
    /// Taken by [`AuditLog::start_writer`].
    receiver: Mutex<Option<mpsc::Receiver<AuditEvent>>>,
}

impl Default for AuditLog {
    fn default() -> Self {
        let (sender, receiver) = mpsc::channel(QUEUE);
        Self {
            sender,
            receiver: Mutex::new(Some(receiver)),
        }
    }
}

impl AuditLog {
    /// Hands an event to the writer.
    pub async fn record(&self, event: AuditEvent) {
        if self.sender.send(event).await.is_err() {
            tracing::error!(target: "skygate::audit", "the audit writer has stopped; an event was lost");
        }
    }

    /// Starts the writer (once): it appends what gathers until `stop` says so, then writes
    /// what is left and ends.
    pub fn start_writer(
        &self,
        store: Store,
        stop: watch::Receiver<bool>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let receiver = self
            .receiver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()?;
        Some(tokio::spawn(write(store, receiver, stop)))
    }
}

async fn write(
    store: Store,
    mut receiver: mpsc::Receiver<AuditEvent>,
    mut stop: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        // Checked here, not only by waiting for a change: `append` may have seen the stop
        // already (a failing database), and a stop already seen never fires again.
        if stopping(&stop) {
            while let Ok(e) = receiver.try_recv() {
                batch.push(e);
            }
            append(&store, &mut batch, &mut stop).await;
            return;
        }
        tokio::select! {
            n = receiver.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    return;
                }
            }
            _ = stop.changed() => continue,
        }
        let full = batch.len() >= BATCH;
        append(&store, &mut batch, &mut stop).await;
        if !full {
            // Let a few milliseconds of events gather: under load a write per handful of
            // events took the single SQLite writer from the requests themselves.
            tokio::select! {
                () = tokio::time::sleep(GATHER) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

/// Whether the server is shutting down: it said so, or it is gone without a word (a stop
/// channel whose sender was dropped would otherwise wake the writer forever).
fn stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Writes `batch`, retrying with a growing pause until it is written (or, once `stop` says
/// the server is shutting down, after one more try); then empties it.
async fn append(store: &Store, batch: &mut Vec<AuditEvent>, stop: &mut watch::Receiver<bool>) {
    let mut pause = Duration::from_millis(250);
    while !batch.is_empty() {
        let Err(e) = store.audit_append(batch).await else {
            break;
        };
        if stopping(stop) {
            tracing::error!(target: "skygate::audit", error = ?e, events = batch.len(), "writing audit events failed while shutting down; they are lost");
            break;
        }
        tracing::warn!(target: "skygate::audit", error = ?e, events = batch.len(), retry_in_ms = pause.as_millis() as u64, "writing audit events failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => {}
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
    batch.clear();
}

impl App {
    /// One page of the audit log, newest first: all of it for administrators, a tenant's own
    /// calls and the logins tried in its name for a tenant.
    pub async fn audit_events(
        &self,
        who: Principal,
        before_seq: Option<i64>,
        limit: i64,
    ) -> Result<Page<AuditRecord>> {
        let rows = match who.role {
            Role::Admin => {
                self.store
                    .audit_list(AuditScope::All, before_seq, limit + 1)
                    .await?
            }
            Role::User => {
                let me = self
                    .store
                    .user_get(who.user_id)
                    .await?
                    .ok_or(Error::NotFound("user"))?;
                let scope = AuditScope::Account {
                    id: me.id,
                    username: &me.username,
                };
                self.store.audit_list(scope, before_seq, limit + 1).await?
            }
        };
        Ok(Page::from_overfetch(rows, limit))
    }
}
