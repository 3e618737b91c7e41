//! Evacuating a host (issue 14): its machines are put in `moving`, each with a `move` task;
//! a move claims room on another host (`move_to_host_id`), and ends either on that host (the
//! source's room given back) or, undone, on its source (the target's room given back). Until
//! then the machine is on both hosts' books, so neither can be given its room.

use super::hosts::{allocation_claim_in_txn, allocation_release_in_txn, hosts_for_placement};
use super::machine_events::event_in_txn;
use super::tasks::{capacity_changed_in_txn, enqueue_in_txn};
use super::{parse_col, to_micros, Backend, Store};
use crate::error::{Error, Result};
use crate::model::scheduler::{self, NoPlacement, Resources};
use crate::model::{MachineId, MachineNetwork, MachineStatus, TaskKind};
use sqlx::Row;
use std::collections::HashMap;

/// Where a move's copy goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MovePlacement {
    /// Room claimed on this host (now, or by an earlier attempt).
    Placed { host_name: String },
    /// No other host has room.
    NoRoom(NoPlacement),
    /// The machine is no longer moving.
    NotMoving,
}

/// How a move ends.
#[derive(Debug, Clone)]
pub struct MoveEnd<'a> {
    pub id: MachineId,
    /// The row's version as the task read it.
    pub version: i64,
    /// The hosts the task moved between: the end is recorded only if the row still names
    /// them (a host deleted or a claim cleared meanwhile makes the task read it again).
    pub source: &'a str,
    pub target: Option<&'a str>,
    pub to: MachineStatus,
    /// The machine's network on the host it ends on (`None`: keep what is recorded).
    pub network: Option<&'a MachineNetwork>,
    pub message: &'a str,
}

impl Store {
    /// Evacuates host `host_id`: cordons it, records when that was asked, and puts each of its
    /// running or stopped machines in `moving` with a `move` task, in one transaction. Machines
    /// in another status (starting, being deleted...) are left: asking again picks them up
    /// once they settle. Returns how many were put in `moving`, or `None` for no such host.
    pub async fn host_evacuate(&self, host_id: &str) -> Result<Option<usize>> {
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let Some(host) = sqlx::query("SELECT name, state FROM hosts WHERE id = $1")
            .bind(host_id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(None);
        };
        let name: String = host.try_get("name")?;
        if host.try_get::<String, _>("state")? != "ready" {
            // Its disks cannot be read from a host that does not answer.
            return Err(Error::Conflict(format!(
                "host {name} does not answer, so its machines' disks cannot be copied: wait \
                 for it, or, if it is lost, forget its machines (DELETE /hosts/{{id}}?force=true)"
            )));
        }
        sqlx::query(
            "UPDATE hosts SET cordoned = 1, evacuation_requested_at = $2, updated_at = $2 \
             WHERE id = $1",
        )
        .bind(host_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let ids: Vec<MachineId> = sqlx::query(
            "UPDATE machines SET status = $2, status_changed_at = $3, updated_at = $3, \
             version = version + 1 \
             WHERE host_id = $1 AND deleted_at IS NULL AND status IN ('running', 'stopped') \
             RETURNING id",
        )
        .bind(host_id)
        .bind(MachineStatus::Moving.as_str())
        .bind(now)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| parse_col(&r.try_get::<String, _>("id")?, "machines.id"))
        .collect::<Result<_>>()?;
        let message = format!("move requested: host {name} is being evacuated");
        for id in &ids {
            event_in_txn(&mut tx, *id, "move", MachineStatus::Moving, &message, now).await?;
            enqueue_in_txn(&mut tx, self.backend(), *id, TaskKind::Move).await?;
        }
        tx.commit().await?;
        for id in &ids {
            self.machine_changed(*id);
        }
        Ok(Some(ids.len()))
    }

    /// Chooses the host moving machine `id` goes to (any but its own that takes machines and
    /// has room) and claims its room there, in one transaction.
    pub async fn machine_move_place(&self, id: MachineId) -> Result<MovePlacement> {
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let Some(row) = sqlx::query(
            "SELECT m.status, m.host_id, m.vcpus, m.memory_mib, m.disk_gib, t.name AS to_name \
             FROM machines m LEFT JOIN hosts t ON t.id = m.move_to_host_id \
             WHERE m.id = $1 AND m.deleted_at IS NULL",
        )
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(MovePlacement::NotMoving);
        };
        let status: MachineStatus = parse_col(&row.try_get::<String, _>("status")?, "status")?;
        if status != MachineStatus::Moving {
            return Ok(MovePlacement::NotMoving);
        }
        if let Some(host_name) = row.try_get::<Option<String>, _>("to_name")? {
            return Ok(MovePlacement::Placed { host_name });
        }
        let source: Option<String> = row.try_get("host_id")?;
        let need = Resources {
            vcpus: row.try_get("vcpus")?,
            memory_mib: row.try_get("memory_mib")?,
            disk_gib: row.try_get("disk_gib")?,
        };
        let mut passed_over: Vec<String> = source.into_iter().collect();
        let decision = loop {
            let hosts = hosts_for_placement(&mut tx).await?;
            let candidates: Vec<_> = hosts
                .iter()
                .filter(|h| !passed_over.contains(&h.id))
                .map(|h| h.candidate())
                .collect();
            let decision = match scheduler::place(need, &candidates) {
                Ok(d) => d,
                Err(no) => return Ok(MovePlacement::NoRoom(no)),
            };
            if allocation_claim_in_txn(&mut tx, &decision.host_id, 1, need).await? {
                break decision;
            }
            // Taken meanwhile by another placement; each host is tried once.
            passed_over.push(decision.host_id);
        };
        let claimed = sqlx::query(
            "UPDATE machines SET move_to_host_id = $2 WHERE id = $1 AND status = 'moving' \
             AND move_to_host_id IS NULL AND deleted_at IS NULL",
        )
        .bind(id.to_string())
        .bind(&decision.host_id)
        .execute(&mut *tx)
        .await?;
        if claimed.rows_affected() == 0 {
            // Forgotten or settled meanwhile: the claim goes with the rolled-back transaction.
            return Ok(MovePlacement::NotMoving);
        }
        let message = format!("moving to host {}", decision.host_name);
        event_in_txn(&mut tx, id, "move", MachineStatus::Moving, &message, now).await?;
        tx.commit().await?;
        self.machine_changed(id);
        Ok(MovePlacement::Placed {
            host_name: decision.host_name,
        })
    }

    /// The move is done: the machine is on the host it moved to, `end.to`, and its old host's
    /// room is given back. False if it was no longer moving at `end.version`.
    pub async fn machine_move_done(&self, end: &MoveEnd<'_>) -> Result<bool> {
        self.move_end(end, true).await
    }

    /// The move is undone: the machine stays on its host, `end.to`, and the room claimed on
    /// the other host (if any) is given back. False if it was no longer moving at
    /// `end.version`.
    pub async fn machine_move_undo(&self, end: &MoveEnd<'_>) -> Result<bool> {
        self.move_end(end, false).await
    }

    async fn move_end(&self, end: &MoveEnd<'_>, done: bool) -> Result<bool> {
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        // Locked (PostgreSQL) until the end: a forget or a tenant's change meanwhile waits, and
        // then finds it settled (SQLite's one writer does this already).
        let lock = if self.backend() == Backend::Postgres {
            " FOR UPDATE"
        } else {
            ""
        };
        let Some(row) = sqlx::query(&format!(
            "SELECT host_id, move_to_host_id, vcpus, memory_mib, disk_gib FROM machines \
             WHERE id = $1 AND status = 'moving' AND version = $2 AND deleted_at IS NULL \
             AND host_id = $3 AND (move_to_host_id = $4 OR ($4 IS NULL AND move_to_host_id IS NULL)){lock}"
        ))
        .bind(end.id.to_string())
        .bind(end.version)
        .bind(end.source)
        .bind(end.target)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(false);
        };
        let source: Option<String> = row.try_get("host_id")?;
        let target: Option<String> = row.try_get("move_to_host_id")?;
        let size = Resources {
            vcpus: row.try_get("vcpus")?,
            memory_mib: row.try_get("memory_mib")?,
            disk_gib: row.try_get("disk_gib")?,
        };
        let (stays_on, given_back) = if done {
            (target, source)
        } else {
            (source, target)
        };
        let network = end
            .network
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| Error::Internal(format!("machine network to JSON: {e}")))?;
        sqlx::query(
            "UPDATE machines SET host_id = $2, move_to_host_id = NULL, status = $3, \
             network = COALESCE($4, network), status_changed_at = $5, updated_at = $5, \
             version = version + 1 WHERE id = $1",
        )
        .bind(end.id.to_string())
        .bind(&stays_on)
        .bind(end.to.as_str())
        .bind(network)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if let Some(host) = given_back {
            allocation_release_in_txn(&mut tx, &host, size).await?;
            capacity_changed_in_txn(&mut tx, self.backend()).await?;
        }
        event_in_txn(&mut tx, end.id, "move", end.to, end.message, now).await?;
        tx.commit().await?;
        self.machine_changed(end.id);
        Ok(true)
    }

    /// How many machines are being moved off each host (evacuation progress).
    pub async fn moving_per_host(&self) -> Result<HashMap<String, i64>> {
        let rows = sqlx::query(
            "SELECT host_id, COUNT(*) AS moving FROM machines \
             WHERE status = 'moving' AND deleted_at IS NULL AND host_id IS NOT NULL \
             GROUP BY host_id",
        )
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("host_id")?, r.try_get("moving")?)))
            .collect()
    }
}
