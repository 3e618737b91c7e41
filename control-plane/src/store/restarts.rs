//! Restarting a crashed machine whose restart policy is `on-failure` (issue 14): the decision
//! (`model::restart::after_crash`) is made against the machine's recent restarts as stored,
//! and written with its event and its start task in one transaction.

use super::machine_events::event_in_txn;
use super::tasks::enqueue_after_in_txn;
use super::{to_micros, Store};
use crate::error::{Error, Result};
use crate::model::restart::{after_crash, AfterCrash, RestartLimits};
use crate::model::{DesiredState, MachineId, MachineStatus, TaskKind};
use sqlx::Row;

/// What [`Store::machine_restart_after_crash`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrashOutcome {
    /// `starting`, its start task due after the backoff.
    Restarting { attempt: u32 },
    /// `stopped`: it was restarted as often as the limits allow.
    GaveUp,
    /// The machine had moved on (another status or version, or deleted): nothing written.
    Superseded,
}

impl Store {
    /// After the crash of running machine `id` (at `version`), described by `reason`: starts
    /// it again after the backoff, or leaves it stopped past `limits`, saying which in its log.
    pub async fn machine_restart_after_crash(
        &self,
        id: MachineId,
        version: i64,
        reason: &str,
        limits: RestartLimits,
    ) -> Result<CrashOutcome> {
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "SELECT restarts FROM machines WHERE id = $1 AND version = $2 AND status = $3 \
             AND deleted_at IS NULL",
        )
        .bind(id.to_string())
        .bind(version)
        .bind(MachineStatus::Running.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(CrashOutcome::Superseded);
        };
        let history: Vec<i64> = serde_json::from_str(&row.try_get::<String, _>("restarts")?)
            .map_err(|e| Error::Internal(format!("bad JSON in machines.restarts: {e}")))?;
        let window_minutes = limits.window.as_secs().div_ceil(60);
        let (status, desired, history, message, outcome) = match after_crash(&history, now, limits)
        {
            AfterCrash::Restart {
                attempt,
                delay,
                history,
            } => (
                MachineStatus::Starting,
                DesiredState::Running,
                history,
                format!(
                    "{reason}; restarting it in {} s (restart policy on-failure: restart \
                         {attempt} of at most {} in {window_minutes} min)",
                    delay.as_secs(),
                    limits.max
                ),
                (CrashOutcome::Restarting { attempt }, delay),
            ),
            AfterCrash::GiveUp { restarts } => (
                MachineStatus::Stopped,
                DesiredState::Stopped,
                history,
                format!(
                    "{reason}; not restarted: it was restarted {restarts} times within \
                         {window_minutes} min, as many as restart policy on-failure allows; \
                         start it when its trouble is fixed"
                ),
                (CrashOutcome::GaveUp, std::time::Duration::ZERO),
            ),
        };
        let history = serde_json::to_string(&history)
            .map_err(|e| Error::Internal(format!("restarts to JSON: {e}")))?;
        let written = sqlx::query(
            "UPDATE machines SET status = $1, desired_state = $2, restarts = $3, \
             status_changed_at = $4, updated_at = $4, version = version + 1 \
             WHERE id = $5 AND version = $6 AND deleted_at IS NULL",
        )
        .bind(status.as_str())
        .bind(desired.as_str())
        .bind(history)
        .bind(now)
        .bind(id.to_string())
        .bind(version)
        .execute(&mut *tx)
        .await?;
        if written.rows_affected() == 0 {
            // A request moved it on between the read and this write (PostgreSQL reads take
            // no lock): dropping the transaction writes nothing.
            return Ok(CrashOutcome::Superseded);
        }
        event_in_txn(&mut tx, id, "reconcile", status, &message, now).await?;
        let (outcome, delay) = outcome;
        if matches!(outcome, CrashOutcome::Restarting { .. }) {
            enqueue_after_in_txn(&mut tx, self.backend(), id, TaskKind::Start, delay).await?;
        }
        tx.commit().await?;
        self.machine_changed(id);
        Ok(outcome)
    }
}
