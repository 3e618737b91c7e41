//! The durable work queue: one `tasks` row per lifecycle action, written in the transaction
//! that accepts the action. Workers claim a due task with a lease; a worker that dies simply
//! lets its lease run out and another (or the restarted one) takes the task over. Every step
//! a task performs is idempotent, so running a step twice is harmless.
//!
//! Claiming: PostgreSQL picks with `FOR UPDATE SKIP LOCKED`, so replicas never wait on each
//! other's rows; SQLite has one writer, which serialises claims by itself. A task is not
//! claimed while another task of the same machine holds a live lease: one action per machine
//! at a time.

use super::{from_micros, parse_col, to_micros, Backend, Store};
use crate::error::Result;
use crate::model::MachineId;
use chrono::{DateTime, Duration, Utc};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

/// The kinds of task are the lifecycle's (`model::tasks`); the queue stores them by name.
pub use crate::model::TaskKind;

/// The database's clock in Unix microseconds, per back end. Leases are stamped and compared by
/// it, never by a replica's own clock: a replica whose clock runs five minutes fast would
/// otherwise see every lease as expired and take tasks that are being worked on (issue 10).
const POSTGRES_NOW: &str = "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)";
const SQLITE_NOW: &str = "SELECT CAST((julianday('now') - 2440587.5) * 86400000000.0 AS BIGINT)";

/// The database's clock now, in Unix microseconds (see [`POSTGRES_NOW`]), read through
/// `executor` (inside a transaction, or on a pool).
///
/// SQLite's clock is this machine's: the file is this process's (and, briefly, the admin
/// command's on the same machine), so there are no replicas to agree with and the time is
/// read here, without asking the database. Asking was a round trip to SQLite's connection
/// thread, some 15 per machine's life, a third of every statement a fleet storm ran (issue
/// 13). (`julianday('now')`, millisecond precision, is the same clock; the login-attempt
/// statement still reads it inside its one statement, which costs no round trip.)
pub(crate) async fn database_now<'e, E>(backend: Backend, executor: E) -> Result<i64>
where
    E: sqlx::Executor<'e, Database = Any>,
{
    match backend {
        Backend::Sqlite => Ok(to_micros(Utc::now())),
        Backend::Postgres => Ok(sqlx::query_scalar(POSTGRES_NOW).fetch_one(executor).await?),
    }
}

/// Another queued task of the same machine (`t`) holding a live lease at `$1`.
const OTHER_LIVE_LEASE: &str =
    "SELECT 1 FROM tasks o WHERE o.machine_id = t.machine_id AND o.id <> t.id \
    AND o.state = 'queued' AND o.lease_expires_at >= $1";

/// `columns` of the task claimable at `$1` that is most overdue (queued, due, not leased, no
/// other task of its machine leased), `then` after the order (locking clauses).
fn most_overdue(columns: &str, then: &str) -> String {
    format!(
        "SELECT {columns} FROM tasks t WHERE t.state = 'queued' AND t.run_after <= $1 \
         AND (t.lease_expires_at IS NULL OR t.lease_expires_at < $1) \
         AND NOT EXISTS ({OTHER_LIVE_LEASE}) \
         ORDER BY t.run_after, t.created_at LIMIT 1 {then}"
    )
}

/// What a claim returns of its task ([`task_record`]).
const CLAIMED: &str = "id, machine_id, kind, attempts, step_failures, created_at";

/// A claimed task's row ([`CLAIMED`]).
fn task_record(row: &AnyRow) -> Result<TaskRecord> {
    Ok(TaskRecord {
        id: row.try_get("id")?,
        machine_id: parse_col(&row.try_get::<String, _>("machine_id")?, "tasks.machine_id")?,
        kind: parse_col(&row.try_get::<String, _>("kind")?, "tasks.kind")?,
        attempts: row.try_get("attempts")?,
        step_failures: row.try_get("step_failures")?,
        created_at: from_micros(row.try_get("created_at")?),
    })
}

/// A claimed task.
#[derive(Debug, Clone)]
pub struct TaskRecord {
    pub id: String,
    pub machine_id: MachineId,
    pub kind: TaskKind,
    /// Including this one.
    pub attempts: i64,
    /// Attempts before this one whose agent step failed ([`TaskOutcome::StepFailed`]).
    pub step_failures: i64,
    pub created_at: DateTime<Utc>,
}

/// How a task attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskOutcome {
    /// Finished (including "nothing left to do").
    Done,
    /// Gave up; the machine was marked failed with the reason.
    Failed(String),
    /// Try again after a delay (a transient error, or waiting for capacity).
    Retry {
        after: std::time::Duration,
        error: String,
    },
    /// Placement found no room: wait until capacity may have changed (see
    /// [`capacity_changed_in_txn`]), or `at_most`. `seen_epoch` is what
    /// [`Store::capacity_epoch`] said before the attempt: if capacity changed since, the task
    /// is due again at once instead.
    WaitForCapacity {
        seen_epoch: i64,
        at_most: std::time::Duration,
        error: String,
    },
    /// An agent ran a step of the task and it failed: try again after a delay, counting it
    /// toward the task's bound on step failures.
    StepFailed {
        after: std::time::Duration,
        error: String,
    },
}

/// Queues a task inside the transaction that accepted the action, due now by the database's
/// clock (a replica with a fast clock would otherwise delay it by its skew).
pub(crate) async fn enqueue_in_txn(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    machine_id: MachineId,
    kind: TaskKind,
) -> Result<()> {
    enqueue_after_in_txn(tx, backend, machine_id, kind, std::time::Duration::ZERO).await
}

/// Queues a task due `delay` after now by the database's clock.
pub(crate) async fn enqueue_after_in_txn(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    machine_id: MachineId,
    kind: TaskKind,
    delay: std::time::Duration,
) -> Result<()> {
    let now = database_now(backend, &mut **tx).await?;
    let due = now.saturating_add(i64::try_from(delay.as_micros()).unwrap_or(i64::MAX));
    sqlx::query(
        "INSERT INTO tasks (id, machine_id, kind, state, attempts, run_after, created_at, updated_at) \
         VALUES ($1, $2, $3, 'queued', 0, $5, $4, $4)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(machine_id.to_string())
    .bind(kind.as_str())
    .bind(now)
    .bind(due)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Says, inside the transaction that changed it, that capacity may have grown: moves the epoch
/// on and makes every task waiting for capacity due now.
pub(crate) async fn capacity_changed_in_txn(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
) -> Result<()> {
    // The epoch row first: a worker parking a task holds it shared (see `task_park`), so the
    // two take turns and the wake below sees every task parked before it.
    sqlx::query("UPDATE capacity_epoch SET epoch = epoch + 1 WHERE id = 1")
        .execute(&mut **tx)
        .await?;
    let now = database_now(backend, &mut **tx).await?;
    sqlx::query(
        "UPDATE tasks SET waiting_for_capacity = 0, run_after = $1          WHERE waiting_for_capacity = 1 AND state = 'queued'",
    )
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub(crate) fn now_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => POSTGRES_NOW,
        Backend::Sqlite => SQLITE_NOW,
    }
}

/// `after` past `now`; a delay too long to represent is 30 s.
fn later(now: DateTime<Utc>, after: std::time::Duration) -> DateTime<Utc> {
    now + Duration::from_std(after).unwrap_or_else(|_| Duration::seconds(30))
}

/// The write that ends an attempt ([`Store::task_finish`]), if `owner` still holds the task
/// for `attempt`.
struct TaskFinish<'a> {
    id: &'a str,
    owner: &'a str,
    attempt: i64,
    state: &'static str,
    run_after: DateTime<Utc>,
    error: Option<&'a str>,
    now: DateTime<Utc>,
    step_failed: i64,
    waiting: i64,
}

impl<'a> TaskFinish<'a> {
    fn query(&self) -> sqlx::query::Query<'a, Any, sqlx::any::AnyArguments<'a>> {
        sqlx::query(
            "UPDATE tasks SET state = $1, run_after = $2, last_error = COALESCE($3, last_error), \
             lease_owner = NULL, lease_expires_at = NULL, updated_at = $4, \
             step_failures = step_failures + $8, waiting_for_capacity = $9 \
             WHERE id = $5 AND lease_owner = $6 AND attempts = $7",
        )
        .bind(self.state)
        .bind(to_micros(self.run_after))
        .bind(self.error)
        .bind(to_micros(self.now))
        .bind(self.id)
        .bind(self.owner)
        .bind(self.attempt)
        .bind(self.step_failed)
        .bind(self.waiting)
    }
}

impl Store {
    /// The database's clock. Every time that one replica writes and another compares — leases,
    /// due times, heartbeats, status deadlines — comes from here, so replicas whose clocks
    /// disagree still agree on what has expired.
    pub async fn clock(&self) -> Result<DateTime<Utc>> {
        Ok(from_micros(
            database_now(self.backend(), self.reader()).await?,
        ))
    }

    /// Claims the most overdue claimable task for `owner` until `now + lease`.
    ///
    /// On PostgreSQL the pick skips rows other replicas hold (`FOR UPDATE SKIP LOCKED`), then
    /// locks the machine's row and checks again, in a fresh statement, that no other task of
    /// that machine holds a live lease: two replicas picking two tasks of one machine at once
    /// take turns there, and the second finds the first's lease.
    ///
    /// On SQLite, whose one writer runs one statement at a time, the pick and the lease are
    /// one statement: a transaction of four round trips to the writer's thread (BEGIN, pick,
    /// lease, COMMIT) held the only write connection four times as long, for every claim and
    /// every idle worker's look (issue 13).
    pub async fn task_claim(&self, owner: &str, lease: Duration) -> Result<Option<TaskRecord>> {
        let postgres = self.backend() == Backend::Postgres;
        if !postgres {
            // The connection first, then the time: a lease stamped before waiting for the
            // writer would be short by the wait.
            let mut conn = self.write.acquire().await?;
            let now = database_now(self.backend(), &mut *conn).await?;
            let until = now + lease.num_microseconds().unwrap_or(i64::MAX / 4);
            let row = sqlx::query(&format!(
                "UPDATE tasks SET lease_owner = $2, lease_expires_at = $3, \
                 attempts = attempts + 1, updated_at = $1 WHERE id = ({}) RETURNING {CLAIMED}",
                most_overdue("t.id", "")
            ))
            .bind(now)
            .bind(owner)
            .bind(until)
            .fetch_optional(&mut *conn)
            .await?;
            return row.as_ref().map(task_record).transpose();
        }
        let pick = most_overdue("t.id, t.machine_id", "FOR UPDATE OF t SKIP LOCKED");
        let mut tx = self.begin_write().await?;
        let now = database_now(self.backend(), &mut *tx).await?;
        let until = now + lease.num_microseconds().unwrap_or(i64::MAX / 4);
        let Some(picked) = sqlx::query(&pick)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?
        else {
            tx.commit().await?;
            return Ok(None);
        };
        let (id, machine_id): (String, String) =
            (picked.try_get("id")?, picked.try_get("machine_id")?);
        if postgres {
            sqlx::query("SELECT id FROM machines WHERE id = $1 FOR UPDATE")
                .bind(&machine_id)
                .fetch_optional(&mut *tx)
                .await?;
            let busy = sqlx::query(&format!(
                "SELECT 1 AS busy FROM tasks t WHERE t.id = $2 AND EXISTS ({OTHER_LIVE_LEASE})"
            ))
            .bind(now)
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await?;
            if busy.is_some() {
                tx.rollback().await?;
                return Ok(None);
            }
        }
        let row = sqlx::query(&format!(
            "UPDATE tasks SET lease_owner = $1, lease_expires_at = $2, attempts = attempts + 1, \
             updated_at = $3 WHERE id = $4 RETURNING {CLAIMED}"
        ))
        .bind(owner)
        .bind(until)
        .bind(now)
        .bind(&id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        task_record(&row).map(Some)
    }

    /// The capacity epoch now (read before a placement attempt; see
    /// [`TaskOutcome::WaitForCapacity`]).
    pub async fn capacity_epoch(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT epoch FROM capacity_epoch WHERE id = 1")
                .fetch_one(self.reader())
                .await?,
        )
    }

    /// Extends a lease this owner still holds for this attempt (`attempts` fences off a
    /// worker of the same process whose lease was taken over); false when it lost the task.
    pub async fn task_extend(
        &self,
        id: &str,
        owner: &str,
        attempt: i64,
        lease: Duration,
    ) -> Result<bool> {
        // The connection first, then the time (as in the claim).
        let mut conn = self.write.acquire().await?;
        let now = database_now(self.backend(), &mut *conn).await?;
        let until = now + lease.num_microseconds().unwrap_or(i64::MAX / 4);
        let res = sqlx::query(
            "UPDATE tasks SET lease_expires_at = $1 WHERE id = $2 AND lease_owner = $3 \
             AND attempts = $4 AND state = 'queued'",
        )
        .bind(until)
        .bind(id)
        .bind(owner)
        .bind(attempt)
        .execute(&mut *conn)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Records an attempt's outcome, if this owner still holds the task for this attempt.
    pub async fn task_finish(
        &self,
        id: &str,
        owner: &str,
        attempt: i64,
        outcome: &TaskOutcome,
    ) -> Result<bool> {
        // Due times too: a retry scheduled by a replica with a fast clock would otherwise sit
        // out its backoff plus the skew.
        let (state, after, error, step_failed) = match outcome {
            TaskOutcome::Done => ("done", None, None, 0),
            TaskOutcome::Failed(e) => ("failed", None, Some(e), 0),
            TaskOutcome::Retry { after, error } => ("queued", Some(after), Some(error), 0),
            TaskOutcome::StepFailed { after, error } => ("queued", Some(after), Some(error), 1),
            TaskOutcome::WaitForCapacity {
                seen_epoch,
                at_most,
                error,
            } => {
                return self
                    .task_park(id, owner, attempt, *seen_epoch, *at_most, error)
                    .await
            }
        };
        // One statement, no transaction: on SQLite a BEGIN and a COMMIT around it were two
        // more round trips holding the only write connection, once per task (issue 13).
        let now = from_micros(database_now(self.backend(), &self.write).await?);
        let finished = TaskFinish {
            id,
            owner,
            attempt,
            state,
            run_after: after.map_or(now, |after| later(now, *after)),
            error: error.map(String::as_str),
            now,
            step_failed,
            waiting: 0,
        };
        Ok(finished.query().execute(&self.write).await?.rows_affected() == 1)
    }

    /// Ends an attempt that found no room: parks the task until capacity changes (or
    /// `at_most`), unless it changed during the attempt (the epoch moved from `seen_epoch`),
    /// then it is due again now. The epoch is read (held shared on PostgreSQL) in the
    /// transaction that parks, so a change is either seen here or wakes the parked task.
    async fn task_park(
        &self,
        id: &str,
        owner: &str,
        attempt: i64,
        seen_epoch: i64,
        at_most: std::time::Duration,
        error: &str,
    ) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let now = from_micros(database_now(self.backend(), &mut *tx).await?);
        let share = if self.backend() == Backend::Postgres {
            " FOR SHARE"
        } else {
            ""
        };
        let epoch: i64 = sqlx::query_scalar(&format!(
            "SELECT epoch FROM capacity_epoch WHERE id = 1{share}"
        ))
        .fetch_one(&mut *tx)
        .await?;
        let parks = epoch == seen_epoch;
        let finished = TaskFinish {
            id,
            owner,
            attempt,
            state: "queued",
            run_after: if parks { later(now, at_most) } else { now },
            error: Some(error),
            now,
            step_failed: 0,
            waiting: i64::from(parks),
        };
        let res = finished.query().execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(res.rows_affected() == 1)
    }

    /// Queues a task on its own (operators re-driving a machine; tests running a step twice).
    pub async fn task_enqueue(&self, machine_id: MachineId, kind: TaskKind) -> Result<()> {
        let mut tx = self.begin_write().await?;
        enqueue_in_txn(&mut tx, self.backend(), machine_id, kind).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Removes finished (done or failed) tasks last touched before `before`; returns how many.
    pub async fn task_purge_finished(&self, before: DateTime<Utc>) -> Result<u64> {
        let res =
            sqlx::query("DELETE FROM tasks WHERE state IN ('done', 'failed') AND updated_at < $1")
                .bind(to_micros(before))
                .execute(&self.write)
                .await?;
        Ok(res.rows_affected())
    }

    /// Tasks still queued for a machine (tests and diagnostics).
    pub async fn task_pending_count(&self, machine_id: MachineId) -> Result<i64> {
        Ok(sqlx::query(
            "SELECT COUNT(*) AS n FROM tasks WHERE machine_id = $1 AND state = 'queued'",
        )
        .bind(machine_id.to_string())
        .fetch_one(self.reader())
        .await?
        .try_get("n")?)
    }
}
