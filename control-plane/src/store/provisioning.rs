//! What the workers and the reconciler write: placement (with the capacity reservation in the
//! same transaction), settled outcomes from agents, failures and notes. Every status change is
//! a compare-and-swap on the status the writer expected, with its event, in one transaction.

use super::hosts::hosts_for_placement;
use super::machines::event_in_txn;
use super::{from_micros, parse_col, to_micros, Store};
use crate::error::{Error, Result};
use crate::model::machine_state;
use crate::model::scheduler::{self, NoPlacement, Resources};
use crate::model::{DesiredState, MachineId, MachineNetwork, MachineStatus};
use chrono::{DateTime, Utc};
use sqlx::{Any, Row, Transaction};

/// Everything a worker needs to act on one machine.
#[derive(Debug, Clone)]
pub struct TaskMachine {
    pub id: MachineId,
    pub status: MachineStatus,
    pub desired: DesiredState,
    pub generation: i64,
    pub status_changed_at: DateTime<Utc>,
    pub hostname: String,
    pub size: Resources,
    pub ssh_keys: Vec<String>,
    pub user_data: Option<String>,
    pub host: Option<TaskHost>,
    pub image: TaskImage,
}

/// The host a machine is placed on.
#[derive(Debug, Clone)]
pub struct TaskHost {
    pub id: String,
    pub name: String,
    pub address: String,
    pub reachable: bool,
    /// The generation of the host's credential once its agent joined (`None`: it joined
    /// before credentials existed and still takes the join token).
    pub credential_generation: Option<i64>,
}

/// The machine's image as registered.
#[derive(Debug, Clone)]
pub struct TaskImage {
    pub name: String,
    pub source: String,
    pub format: String,
    pub sha256: Option<String>,
    pub boot: Option<serde_json::Value>,
}

/// Every writer of an observed status change goes through the lifecycle's table first: a
/// transition it does not allow is a bug, not something to write.
fn check_transition(from: MachineStatus, to: MachineStatus) -> Result<()> {
    if machine_state::can_transition(from, to) {
        Ok(())
    } else {
        Err(Error::Internal(format!(
            "illegal transition {from} -> {to}"
        )))
    }
}

/// What placement did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Placed now (or earlier) on this host.
    Placed { host_name: String },
    /// Nothing fits; the machine stays pending.
    NoRoom(NoPlacement),
    /// The machine is no longer pending (deleted, failed, placed by someone else...).
    NotPending,
}

impl Store {
    /// The machine a task acts on, deleted ones included (a late task must see that).
    pub async fn machine_for_task(&self, id: MachineId) -> Result<Option<TaskMachine>> {
        let row = sqlx::query(
            "SELECT v.id, v.status, v.desired_state, v.generation, v.status_changed_at, \
             v.hostname, v.vcpus, v.memory_mib, v.disk_gib, v.ssh_keys, v.user_data, \
             h.id AS host_id, h.name AS host_name, h.grpc_address, h.state AS host_state, \
             h.credential_issued, h.credential_generation, \
             i.name AS image_name, i.source, i.format, i.sha256, i.boot \
             FROM machines v JOIN images i ON i.id = v.image_id LEFT JOIN hosts h ON h.id = v.host_id \
             WHERE v.id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(self.reader())
        .await?;
        let Some(r) = row else { return Ok(None) };
        let json = |col: &str, text: Option<String>| -> Result<Option<serde_json::Value>> {
            text.map(|t| serde_json::from_str(&t))
                .transpose()
                .map_err(|e| Error::Internal(format!("bad JSON in {col}: {e}")))
        };
        let host = match r.try_get::<Option<String>, _>("host_id")? {
            Some(id) => Some(TaskHost {
                id,
                name: r.try_get("host_name")?,
                address: r.try_get("grpc_address")?,
                reachable: r.try_get::<String, _>("host_state")? == "ready",
                credential_generation: (r.try_get::<i64, _>("credential_issued")? != 0)
                    .then(|| r.try_get("credential_generation"))
                    .transpose()?,
            }),
            None => None,
        };
        let keys = json("machines.ssh_keys", r.try_get("ssh_keys")?)?;
        Ok(Some(TaskMachine {
            id,
            status: parse_col(&r.try_get::<String, _>("status")?, "machines.status")?,
            desired: parse_col(
                &r.try_get::<String, _>("desired_state")?,
                "machines.desired_state",
            )?,
            generation: r.try_get("generation")?,
            status_changed_at: from_micros(r.try_get("status_changed_at")?),
            hostname: r.try_get("hostname")?,
            size: Resources {
                vcpus: r.try_get("vcpus")?,
                memory_mib: r.try_get("memory_mib")?,
                disk_gib: r.try_get("disk_gib")?,
            },
            ssh_keys: keys
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| Error::Internal(format!("bad machines.ssh_keys: {e}")))?
                .unwrap_or_default(),
            user_data: r.try_get("user_data")?,
            host,
            image: TaskImage {
                name: r.try_get("image_name")?,
                source: r.try_get("source")?,
                format: r.try_get("format")?,
                sha256: r.try_get("sha256")?,
                boot: json("images.boot", r.try_get("boot")?)?,
            },
        }))
    }

    /// Places a pending machine: runs the scheduler over every host's capacity and live
    /// allocations and, when a host fits, records the host and `provisioning` in the same
    /// transaction (the reservation). Hosts are locked for the transaction on PostgreSQL.
    pub async fn machine_place(&self, id: MachineId) -> Result<Placement> {
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "SELECT status, host_id, vcpus, memory_mib, disk_gib FROM machines \
             WHERE id = $1 AND deleted_at IS NULL",
        )
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(Placement::NotPending);
        };
        let status: MachineStatus = parse_col(&row.try_get::<String, _>("status")?, "status")?;
        if status != MachineStatus::Pending
            || row.try_get::<Option<String>, _>("host_id")?.is_some()
        {
            return Ok(Placement::NotPending);
        }
        let need = Resources {
            vcpus: row.try_get("vcpus")?,
            memory_mib: row.try_get("memory_mib")?,
            disk_gib: row.try_get("disk_gib")?,
        };
        let hosts = hosts_for_placement(&mut tx, self.backend()).await?;
        let candidates: Vec<_> = hosts.iter().map(|h| h.candidate()).collect();
        let decision = match scheduler::place(need, &candidates) {
            Ok(d) => d,
            Err(no) => return Ok(Placement::NoRoom(no)),
        };
        let placed = sqlx::query(
            "UPDATE machines SET host_id = $1, status = $2, status_changed_at = $3, updated_at = $3, \
             generation = generation + 1 WHERE id = $4 AND status = 'pending' AND host_id IS NULL",
        )
        .bind(&decision.host_id)
        .bind(MachineStatus::Provisioning.as_str())
        .bind(now)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        if placed.rows_affected() == 0 {
            // Placed by a duplicate task elsewhere, or moved by a request meanwhile.
            return Ok(Placement::NotPending);
        }
        let message = format!("placed on host {}", decision.host_name);
        event_in_txn(
            &mut tx,
            id,
            "schedule",
            MachineStatus::Provisioning,
            &message,
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(Placement::Placed {
            host_name: decision.host_name,
        })
    }

    /// Records what an agent did: `from` → `to` if the machine is still in `from` at
    /// `generation` (the row the worker acted on: a tenant's request meanwhile, such as a stop
    /// during provisioning, makes this a no-op and the worker acts again), with the machine's
    /// network when given. Reaching `deleted` stamps `deleted_at`, which frees the
    /// hostname and the host capacity. Returns whether it applied.
    #[allow(clippy::too_many_arguments)]
    pub async fn machine_settle(
        &self,
        id: MachineId,
        from: MachineStatus,
        generation: i64,
        to: MachineStatus,
        network: Option<&MachineNetwork>,
        action: &str,
        message: &str,
    ) -> Result<bool> {
        check_transition(from, to)?;
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let res = sqlx::query(
            "UPDATE machines SET status = $1, status_changed_at = $2, updated_at = $2, \
             network = COALESCE($3, network), failure_reason = NULL, \
             generation = generation + 1, \
             deleted_at = CASE WHEN $1 = 'deleted' THEN $2 ELSE deleted_at END \
             WHERE id = $4 AND status = $5 AND generation = $6 AND deleted_at IS NULL",
        )
        .bind(to.as_str())
        .bind(now)
        .bind(network.map(|n| serde_json::to_string(n).unwrap_or_default()))
        .bind(id.to_string())
        .bind(from.as_str())
        .bind(generation)
        .execute(&mut *tx)
        .await?;
        if res.rows_affected() == 0 {
            return Ok(false);
        }
        event_in_txn(&mut tx, id, action, to, message, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Marks a machine failed with a named reason, if it is still in `from` at `generation`
    /// (a stale deadline check or agent answer cannot fail a machine that moved on).
    pub async fn machine_fail(
        &self,
        id: MachineId,
        from: MachineStatus,
        generation: i64,
        action: &str,
        reason: &str,
    ) -> Result<bool> {
        check_transition(from, MachineStatus::Failed)?;
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let res = sqlx::query(
            "UPDATE machines SET status = 'failed', failure_reason = $1, status_changed_at = $2, \
             updated_at = $2, generation = generation + 1 \
             WHERE id = $3 AND deleted_at IS NULL AND status = $4 AND generation = $5",
        )
        .bind(reason)
        .bind(now)
        .bind(id.to_string())
        .bind(from.as_str())
        .bind(generation)
        .execute(&mut *tx)
        .await?;
        if res.rows_affected() == 0 {
            return Ok(false);
        }
        event_in_txn(&mut tx, id, action, MachineStatus::Failed, reason, now).await?;
        tx.commit().await?;
        Ok(true)
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
        Ok(())
    }

    /// Live machines placed on a host, with their status and generation.
    pub async fn machines_on_host(
        &self,
        host_id: &str,
    ) -> Result<Vec<(MachineId, MachineStatus, i64)>> {
        let rows = sqlx::query(
            "SELECT id, status, generation FROM machines WHERE host_id = $1 AND deleted_at IS NULL",
        )
        .bind(host_id)
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    parse_col(&r.try_get::<String, _>("id")?, "machines.id")?,
                    parse_col(&r.try_get::<String, _>("status")?, "machines.status")?,
                    r.try_get("generation")?,
                ))
            })
            .collect()
    }

    /// A reconciler's repair: `from` → `to` with the desired state set to match, if the
    /// machine is still in `from` at the `generation` the reconciler read *before* it asked
    /// the host (whatever a workflow or a tenant did since wins). `failed` records the message
    /// as the failure reason. Returns whether it applied.
    #[allow(clippy::too_many_arguments)]
    pub async fn machine_reconcile(
        &self,
        id: MachineId,
        from: MachineStatus,
        generation: i64,
        to: MachineStatus,
        desired: Option<DesiredState>,
        message: &str,
    ) -> Result<bool> {
        check_transition(from, to)?;
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let res = sqlx::query(
            "UPDATE machines SET status = $1, desired_state = COALESCE($2, desired_state), \
             failure_reason = CASE WHEN $1 = 'failed' THEN $3 ELSE failure_reason END, \
             status_changed_at = $4, updated_at = $4, generation = generation + 1 \
             WHERE id = $5 AND status = $6 AND generation = $7 AND deleted_at IS NULL",
        )
        .bind(to.as_str())
        .bind(desired.map(DesiredState::as_str))
        .bind(message)
        .bind(now)
        .bind(id.to_string())
        .bind(from.as_str())
        .bind(generation)
        .execute(&mut *tx)
        .await?;
        if res.rows_affected() == 0 {
            return Ok(false);
        }
        event_in_txn(&mut tx, id, "reconcile", to, message, now).await?;
        tx.commit().await?;
        Ok(true)
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
        Ok(())
    }

    /// Machines whose transitional status has outlasted its deadline, with the status and
    /// generation to fail them from. `limits` says how long each status may last.
    pub async fn machines_past_deadline(
        &self,
        limits: &[(MachineStatus, chrono::Duration)],
    ) -> Result<Vec<(MachineId, MachineStatus, i64)>> {
        let now = self.clock().await?;
        let mut out = Vec::new();
        for (status, limit) in limits {
            let rows = sqlx::query(
                "SELECT id, generation FROM machines WHERE status = $1 AND deleted_at IS NULL \
                 AND status_changed_at < $2",
            )
            .bind(status.as_str())
            .bind(to_micros(now - *limit))
            .fetch_all(self.reader())
            .await?;
            for r in rows {
                out.push((
                    parse_col(&r.try_get::<String, _>("id")?, "machines.id")?,
                    *status,
                    r.try_get("generation")?,
                ));
            }
        }
        Ok(out)
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
