//! Forgetting what a lost host held (issue 14): an administrator stamps a machine deleted
//! without its host's word, or removes a dead host with every machine on it. Capacity and the
//! tenant's usage are released in the same transaction; nothing is asked of the host. If it
//! comes back, the reconciler finds the machines' domains owned by no live machine and
//! removes them after the orphan grace period, writing an event on each (`reconcile/drift.rs`).

use super::hosts::allocation_release_in_txn;
use super::machine_events::event_in_txn;
use super::tasks::capacity_changed_in_txn;
use super::usage::usage_release_in_txn;
use super::{to_micros, Backend, Store};
use crate::error::{Error, Result};
use crate::model::scheduler::Resources;
use crate::model::{MachineId, MachineStatus};
use sqlx::{Any, Row, Transaction};

/// Stamps one live machine deleted and gives back what it held; false when it was not live.
async fn forget_in_txn(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    id: MachineId,
    message: &str,
    now: i64,
) -> Result<bool> {
    let lock = if backend == Backend::Postgres {
        " FOR UPDATE"
    } else {
        ""
    };
    // Locked until the end (PostgreSQL), so a move that ends meanwhile cannot give the same
    // room back too.
    let moving_to: Option<String> = sqlx::query(&format!(
        "SELECT move_to_host_id FROM machines WHERE id = $1{lock}"
    ))
    .bind(id.to_string())
    .fetch_optional(&mut **tx)
    .await?
    .map(|r| r.try_get("move_to_host_id"))
    .transpose()?
    .flatten();
    let forgotten = sqlx::query(
        "UPDATE machines SET status = $1, desired_state = $1, deleted_at = $2, updated_at = $2, \
         status_changed_at = $2, version = version + 1, move_to_host_id = NULL \
         WHERE id = $3 AND deleted_at IS NULL \
         RETURNING host_id, vcpus, memory_mib, disk_gib",
    )
    .bind(MachineStatus::Deleted.as_str())
    .bind(now)
    .bind(id.to_string())
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = forgotten else {
        return Ok(false);
    };
    usage_release_in_txn(tx, id).await?;
    let size = Resources {
        vcpus: row.try_get("vcpus")?,
        memory_mib: row.try_get("memory_mib")?,
        disk_gib: row.try_get("disk_gib")?,
    };
    // Its host's room, and the room a move had claimed (read before the update cleared it).
    for host in [row.try_get::<Option<String>, _>("host_id")?, moving_to]
        .into_iter()
        .flatten()
    {
        allocation_release_in_txn(tx, &host, size).await?;
    }
    event_in_txn(tx, id, "forget", MachineStatus::Deleted, message, now).await?;
    Ok(true)
}

/// Forgetting is for what a lost host held: a host that answers is asked instead (a normal
/// delete), so a mistaken `force` cannot throw away machines that are fine.
fn refuse_unless_lost(host: &str, state: &str) -> Result<()> {
    if state == "unreachable" {
        return Ok(());
    }
    Err(Error::Conflict(format!(
        "host {host} is {state}, not lost: delete its machines normally (force is for machines \
         whose host stopped answering)"
    )))
}

/// The message a forgotten machine's log ends with.
fn forgotten_note(host: Option<&str>) -> String {
    match host {
        Some(host) => format!(
            "forgotten by an administrator without word from host {host}; if the host comes \
             back, what is left of the machine there is removed"
        ),
        None => "forgotten by an administrator; it was on no host".into(),
    }
}

impl Store {
    /// Forgets a live machine whose host is lost (`unreachable`) or that is on no host; false
    /// when there is no live machine with this id, 409 when its host answers (a normal delete
    /// works there). A task still queued for it ends without acting when it finds the machine
    /// deleted.
    pub async fn machine_forget(&self, id: MachineId) -> Result<bool> {
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "SELECT h.name, h.state FROM machines m LEFT JOIN hosts h ON h.id = m.host_id \
             WHERE m.id = $1 AND m.deleted_at IS NULL",
        )
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        let host: Option<String> = row.try_get("name")?;
        let state: Option<String> = row.try_get("state")?;
        if let (Some(host), Some(state)) = (&host, &state) {
            refuse_unless_lost(host, state)?;
        }
        if !forget_in_txn(
            &mut tx,
            self.backend(),
            id,
            &forgotten_note(host.as_deref()),
            now,
        )
        .await?
        {
            return Ok(false);
        }
        capacity_changed_in_txn(&mut tx, self.backend()).await?;
        tx.commit().await?;
        self.machine_changed(id);
        Ok(true)
    }

    /// Removes a host. Refused (409) while live machines are placed on it, unless `force`:
    /// then every one of them is forgotten in the same transaction. Deleted machines keep
    /// their history; their host reference is cleared. Returns how many were forgotten.
    pub async fn host_delete(&self, id: &str, force: bool) -> Result<u64> {
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let lock = if self.backend() == Backend::Postgres {
            // A placement's claim updates this row: no machine lands here between the read
            // of its machines and the delete.
            " FOR UPDATE"
        } else {
            ""
        };
        let host = sqlx::query(&format!(
            "SELECT name, state FROM hosts WHERE id = $1{lock}"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(Error::NotFound("host"))?;
        let name: String = host.try_get("name")?;
        let live: Vec<MachineId> =
            sqlx::query("SELECT id FROM machines WHERE host_id = $1 AND deleted_at IS NULL")
                .bind(id)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|row| super::parse_col(&row.try_get::<String, _>("id")?, "machines.id"))
                .collect::<Result<_>>()?;
        if !live.is_empty() && !force {
            return Err(Error::Conflict(format!(
                "{} machine(s) still live on this host: delete or move them first, or, if the \
                 host is lost, forget them with it (?force=true)",
                live.len()
            )));
        }
        if !live.is_empty() {
            refuse_unless_lost(&name, &host.try_get::<String, _>("state")?)?;
        }
        // Machines being moved here: a host that answers finishes or undoes those moves first
        // (removing it would drop their claims mid-copy); a lost one sends them elsewhere.
        let incoming: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM machines WHERE move_to_host_id = $1 AND deleted_at IS NULL",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        if incoming > 0 {
            refuse_unless_lost(&name, &host.try_get::<String, _>("state")?).map_err(|_| {
                Error::Conflict(format!(
                    "{incoming} machine(s) are being moved to host {name}: wait until their \
                     moves end"
                ))
            })?;
        }
        let note = forgotten_note(Some(&name));
        let mut forgotten = 0;
        for machine in &live {
            if forget_in_txn(&mut tx, self.backend(), *machine, &note, now).await? {
                forgotten += 1;
            }
        }
        sqlx::query("UPDATE machines SET host_id = NULL WHERE host_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        // A move to this host looks for another (its claim goes with the host's row).
        sqlx::query(
            "UPDATE machines SET move_to_host_id = NULL, version = version + 1 \
             WHERE move_to_host_id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM hosts WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if forgotten > 0 {
            capacity_changed_in_txn(&mut tx, self.backend()).await?;
        }
        tx.commit().await?;
        for machine in &live {
            self.machine_changed(*machine);
        }
        Ok(forgotten)
    }
}
