//! Machines' logs: the `machine_events` table. Status changes write their event in their own
//! transaction (see `machines`); notes say what happens without a status change, once.

use super::{from_micros, parse_col, to_micros, Backend, Store};
use crate::error::Result;
use crate::model::{MachineEvent, MachineId, MachineStatus, UserId};
use chrono::{DateTime, Utc};
use sqlx::{Any, Row, Transaction};

/// Writes one line of a machine's log inside `tx`.
pub(crate) async fn event_in_txn(
    tx: &mut Transaction<'static, Any>,
    id: MachineId,
    action: &str,
    status: MachineStatus,
    message: &str,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO machine_events (machine_id, action, status, message, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id.to_string())
    .bind(action)
    .bind(status.as_str())
    .bind(message)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// One event of any machine, for the event stream (`GET /events`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamedEvent {
    /// Where it is in the stream: events are streamed in this order, which is the order their
    /// transactions committed (SQLite: `seq`; PostgreSQL: `position`, migration 0021).
    pub position: i64,
    pub machine_id: MachineId,
    pub owner_id: UserId,
    pub hostname: String,
    pub action: String,
    pub status: MachineStatus,
    pub message: String,
    pub created_at: DateTime<Utc>,
}

impl Store {
    /// The events' stream position column.
    fn position_column(&self) -> &'static str {
        match self.backend() {
            Backend::Sqlite => "e.seq",
            Backend::Postgres => "e.position",
        }
    }

    /// Every machine's events after stream position `after`, in stream order, at most `limit`;
    /// only `owner`'s machines' when given. Deleted machines' too: how a machine ended is news.
    pub async fn events_after(
        &self,
        after: i64,
        owner: Option<UserId>,
        limit: i64,
    ) -> Result<Vec<StreamedEvent>> {
        let position = self.position_column();
        let sql = format!(
            "SELECT {position} AS position, e.machine_id, m.owner_id, m.hostname, e.action, \
             e.status, e.message, e.created_at FROM machine_events e \
             JOIN machines m ON m.id = e.machine_id \
             WHERE {position} > $1 AND ($2 IS NULL OR m.owner_id = $2) \
             ORDER BY {position} LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(after)
            .bind(owner.map(|o| o.to_string()))
            .bind(limit)
            .fetch_all(self.reader())
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StreamedEvent {
                    position: r.try_get("position")?,
                    machine_id: parse_col(&r.try_get::<String, _>("machine_id")?, "machine_id")?,
                    owner_id: parse_col(&r.try_get::<String, _>("owner_id")?, "owner_id")?,
                    hostname: r.try_get("hostname")?,
                    action: r.try_get("action")?,
                    status: parse_col(&r.try_get::<String, _>("status")?, "machine_events.status")?,
                    message: r.try_get("message")?,
                    created_at: from_micros(r.try_get("created_at")?),
                })
            })
            .collect()
    }

    /// The last stream position given so far (0 before the first event).
    pub async fn events_last_position(&self) -> Result<i64> {
        let sql = format!(
            "SELECT COALESCE(MAX({}), 0) AS position FROM machine_events e",
            self.position_column()
        );
        let row = sqlx::query(&sql).fetch_one(self.reader()).await?;
        Ok(row.try_get("position")?)
    }

    /// A machine's log, oldest first, after `after_seq` when given. Deleted machines have none
    /// to show (they are gone for the tenant).
    pub async fn machine_events(
        &self,
        id: MachineId,
        after_seq: Option<i64>,
        limit: i64,
    ) -> Result<Vec<MachineEvent>> {
        let rows = sqlx::query(
            "SELECT seq, action, status, message, created_at FROM machine_events \
             WHERE machine_id = $1 AND ($2 IS NULL OR seq > $2) ORDER BY seq LIMIT $3",
        )
        .bind(id.to_string())
        .bind(after_seq)
        .bind(limit)
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(MachineEvent {
                    seq: r.try_get("seq")?,
                    action: r.try_get("action")?,
                    status: parse_col(&r.try_get::<String, _>("status")?, "machine_events.status")?,
                    message: r.try_get("message")?,
                    created_at: from_micros(r.try_get("created_at")?),
                })
            })
            .collect()
    }

    /// Writes an event without a status change, unless the machine's last event already says
    /// exactly this (a worker retrying every few seconds must not flood the log).
    pub async fn machine_note(&self, id: MachineId, action: &str, message: &str) -> Result<()> {
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let row = sqlx::query("SELECT status FROM machines WHERE id = $1 AND deleted_at IS NULL")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else { return Ok(()) };
        let status: MachineStatus = parse_col(&row.try_get::<String, _>("status")?, "status")?;
        note_in_txn(&mut tx, id, status, action, message, now).await?;
        tx.commit().await?;
        self.machine_changed(id);
        Ok(())
    }

    /// An event on a machine in whatever state, deleted included (the removal of an orphaned
    /// domain of a deleted machine is recorded on it). Unknown ids are ignored.
    pub async fn machine_event_any(
        &self,
        id: MachineId,
        action: &str,
        message: &str,
    ) -> Result<()> {
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let row = sqlx::query("SELECT status FROM machines WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(r) = row {
            let status: MachineStatus = parse_col(&r.try_get::<String, _>("status")?, "status")?;
            event_in_txn(&mut tx, id, action, status, message, now).await?;
        }
        tx.commit().await?;
        self.machine_changed(id);
        Ok(())
    }
}

/// Writes an event unless it repeats the machine's last one (a note said every pass is said
/// once).
async fn note_in_txn(
    tx: &mut Transaction<'static, Any>,
    id: MachineId,
    status: MachineStatus,
    action: &str,
    message: &str,
    now: i64,
) -> Result<()> {
    let last: Option<String> = sqlx::query(
        "SELECT message FROM machine_events WHERE machine_id = $1 ORDER BY seq DESC LIMIT 1",
    )
    .bind(id.to_string())
    .fetch_optional(&mut **tx)
    .await?
    .map(|r| r.try_get("message"))
    .transpose()?;
    if last.as_deref() != Some(message) {
        event_in_txn(tx, id, action, status, message, now).await?;
    }
    Ok(())
}

/// Writes an event to every live machine on a host (it went away, it came back), in the
/// transaction that changes the host's state: whoever sees the state sees the notes.
pub(crate) async fn note_machines_on_host_in_txn(
    tx: &mut Transaction<'static, Any>,
    host_id: &str,
    action: &str,
    message: &str,
    now: i64,
) -> Result<()> {
    let rows =
        sqlx::query("SELECT id, status FROM machines WHERE host_id = $1 AND deleted_at IS NULL")
            .bind(host_id)
            .fetch_all(&mut **tx)
            .await?;
    for r in rows {
        let id: MachineId = parse_col(&r.try_get::<String, _>("id")?, "machines.id")?;
        let status: MachineStatus =
            parse_col(&r.try_get::<String, _>("status")?, "machines.status")?;
        note_in_txn(tx, id, status, action, message, now).await?;
    }
    Ok(())
}
