//! Resizing and rebuilding a machine (issue 15): requests that change what its host builds.
//! Each is accepted in one transaction (the status, the next spec generation, the tenant's
//! usage and the host's allocation for a resize, the event, the task); the `resize` and
//! `rebuild` tasks then send the new spec to the host.

use super::machine_events::event_in_txn;
use super::machines::{machine_in_txn, swap_status_in_txn, Visibility};
use super::tasks::{capacity_changed_in_txn, enqueue_in_txn};
use super::usage::{usage_add_in_txn, usage_lock_in_txn};
use super::{parse_col, to_micros, Store};
use crate::error::{Error, Result};
use crate::model::machine_state::{self, Action, Transition};
use crate::model::scheduler::{resize_fits, Resources};
use crate::model::tasks::TaskKind;
use crate::model::{DesiredState, Machine, MachineId, MachineStatus, Quota, Usage, UserId};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

/// A resize as asked: what is `None` stays as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resize {
    pub vcpus: Option<i64>,
    pub memory_mib: Option<i64>,
    pub disk_gib: Option<i64>,
}

/// What a resize did.
#[derive(Debug, Clone)]
pub enum Resized {
    /// Accepted: the machine is `resizing`, a task carries it out.
    Accepted(Machine),
    /// The machine already has that size: nothing to do.
    Unchanged(Machine),
}

/// The image a rebuild makes the disk from.
#[derive(Debug, Clone)]
pub struct RebuildImage {
    pub id: String,
    pub name: String,
}

/// What a request reads of the machine before judging it.
struct Read {
    status: MachineStatus,
    desired: DesiredState,
    version: i64,
    owner: UserId,
    host_id: Option<String>,
    size: Resources,
    image_id: String,
}

async fn read_in_txn(
    tx: &mut Transaction<'static, Any>,
    id: MachineId,
    who: &Visibility,
) -> Result<Read> {
    let row: AnyRow = sqlx::query(
        "SELECT status, desired_state, version, owner_id, host_id, vcpus, memory_mib, disk_gib, \
         image_id FROM machines \
         WHERE id = $1 AND deleted_at IS NULL AND ($2 IS NULL OR owner_id = $2)",
    )
    .bind(id.to_string())
    .bind(who.owner())
    .fetch_optional(&mut **tx)
    .await?
    .ok_or(Error::NotFound("machine"))?;
    Ok(Read {
        status: parse_col(&row.try_get::<String, _>("status")?, "status")?,
        desired: parse_col(&row.try_get::<String, _>("desired_state")?, "desired_state")?,
        version: row.try_get("version")?,
        owner: parse_col(&row.try_get::<String, _>("owner_id")?, "owner_id")?,
        host_id: row.try_get("host_id")?,
        size: Resources {
            vcpus: row.try_get("vcpus")?,
            memory_mib: row.try_get("memory_mib")?,
            disk_gib: row.try_get("disk_gib")?,
        },
        image_id: row.try_get("image_id")?,
    })
}

/// Spends `delta` (negative parts give back) of host `host_id`'s capacity for a machine that
/// changes size there, if it fits ([`resize_fits`]); refused with the reason otherwise. One
/// conditional update, so two replicas changing one host at once take turns on its row and
/// the second sees what the first spent.
async fn host_resize_in_txn(
    tx: &mut Transaction<'static, Any>,
    host_id: &str,
    delta: Resources,
) -> Result<()> {
    let claimed = sqlx::query(
        "UPDATE hosts SET allocated_vcpus = allocated_vcpus + $2, \
         allocated_memory_mib = allocated_memory_mib + $3, \
         allocated_disk_gib = allocated_disk_gib + $4 \
         WHERE id = $1 AND ($2 <= 0 OR allocated_vcpus + $2 <= vcpus) \
         AND ($3 <= 0 OR allocated_memory_mib + $3 <= memory_mib) \
         AND ($4 <= 0 OR allocated_disk_gib + $4 <= disk_gib)",
    )
    .bind(host_id)
    .bind(delta.vcpus)
    .bind(delta.memory_mib)
    .bind(delta.disk_gib)
    .execute(&mut **tx)
    .await?;
    if claimed.rows_affected() == 1 {
        return Ok(());
    }
    // Refused: read the host to say why.
    let host = sqlx::query(
        "SELECT vcpus, memory_mib, disk_gib, allocated_vcpus, allocated_memory_mib, \
         allocated_disk_gib FROM hosts WHERE id = $1",
    )
    .bind(host_id)
    .fetch_one(&mut **tx)
    .await?;
    let resources = |prefix: &str| -> Result<Resources> {
        Ok(Resources {
            vcpus: host.try_get(format!("{prefix}vcpus").as_str())?,
            memory_mib: host.try_get(format!("{prefix}memory_mib").as_str())?,
            disk_gib: host.try_get(format!("{prefix}disk_gib").as_str())?,
        })
    };
    let why = resize_fits(resources("")?, resources("allocated_")?, delta)
        .err()
        .unwrap_or_else(|| "the machine's host changed meanwhile; try again".to_owned());
    Err(Error::Conflict(why))
}

/// Status, event and task of an accepted request, then the machine as it is now.
async fn accept_in_txn(
    store: &Store,
    tx: &mut Transaction<'static, Any>,
    id: MachineId,
    read: &Read,
    t: Transition,
    (action, kind, message): (Action, TaskKind, &str),
    now: i64,
) -> Result<Machine> {
    swap_status_in_txn(tx, id, (read.status, read.version), t, now).await?;
    event_in_txn(tx, id, action.as_str(), t.status, message, now).await?;
    enqueue_in_txn(tx, store.backend(), id, kind).await?;
    machine_in_txn(tx, store.backend(), id).await
}

impl Store {
    /// Resizes a stopped machine: within its owner's `quota` (only what grows is counted) and
    /// its host's free capacity, in one transaction with the owner's usage row locked, so two
    /// resizes or a resize and a create of one tenant cannot both spend its last unit. The
    /// disk only grows. Asking for the size it has is [`Resized::Unchanged`].
    pub async fn machine_resize(
        &self,
        id: MachineId,
        who: Visibility,
        asked: Resize,
        quota: &Quota,
    ) -> Result<Resized> {
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let read = read_in_txn(&mut tx, id, &who).await?;
        let old = read.size;
        let new = Resources {
            vcpus: asked.vcpus.unwrap_or(old.vcpus),
            memory_mib: asked.memory_mib.unwrap_or(old.memory_mib),
            disk_gib: asked.disk_gib.unwrap_or(old.disk_gib),
        };
        if new.disk_gib < old.disk_gib {
            return Err(Error::Invalid(format!(
                "disk_gib: the disk is {} GiB and only grows",
                old.disk_gib
            )));
        }
        if new == old {
            return Ok(Resized::Unchanged(
                machine_in_txn(&mut tx, self.backend(), id).await?,
            ));
        }
        let t = machine_state::request(Action::Resize, read.status, read.desired)
            .map_err(|e| Error::Conflict(e.to_string()))?;
        let delta = new.minus(old);
        let usage = usage_lock_in_txn(&mut tx, self.backend(), read.owner).await?;
        let change = Usage {
            machines: 0,
            vcpus: delta.vcpus,
            memory_mib: delta.memory_mib,
        };
        quota.admits(usage, change).map_err(Error::QuotaExceeded)?;
        let Some(host) = &read.host_id else {
            // A stopped machine was built on a host; without one the records disagree.
            return Err(Error::Internal(format!("stopped machine {id} has no host")));
        };
        host_resize_in_txn(&mut tx, host, delta).await?;
        if delta.vcpus < 0 || delta.memory_mib < 0 || delta.disk_gib < 0 {
            // Room given back: machines waiting for capacity look again.
            capacity_changed_in_txn(&mut tx, self.backend()).await?;
        }
        usage_add_in_txn(&mut tx, read.owner, change).await?;
        sqlx::query(
            "UPDATE machines SET vcpus = $2, memory_mib = $3, disk_gib = $4, \
             spec_generation = spec_generation + 1 WHERE id = $1",
        )
        .bind(id.to_string())
        .bind(new.vcpus)
        .bind(new.memory_mib)
        .bind(new.disk_gib)
        .execute(&mut *tx)
        .await?;
        let message = format!(
            "resize requested: {} to {} vCPUs, {} to {} MiB of memory, {} to {} GiB of disk",
            old.vcpus, new.vcpus, old.memory_mib, new.memory_mib, old.disk_gib, new.disk_gib
        );
        let machine = accept_in_txn(
            self,
            &mut tx,
            id,
            &read,
            t,
            (Action::Resize, TaskKind::Resize, &message),
            now,
        )
        .await?;
        tx.commit().await?;
        self.machine_changed(id);
        Ok(Resized::Accepted(machine))
    }

    /// Rebuilds a running, stopped or failed machine (one a host built): a fresh disk from `image` (its own when `None`)
    /// by its next spec, whose disk generation moves on; id, hostname, size, SSH keys and user
    /// data stay. It ends running or stopped, as it was.
    pub async fn machine_rebuild(
        &self,
        id: MachineId,
        who: Visibility,
        image: Option<RebuildImage>,
    ) -> Result<Machine> {
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let read = read_in_txn(&mut tx, id, &who).await?;
        let t = machine_state::request(Action::Rebuild, read.status, read.desired)
            .map_err(|e| Error::Conflict(e.to_string()))?;
        if read.host_id.is_none() {
            // Failed before any host built it: there is no disk to rebuild.
            return Err(Error::Conflict(
                "cannot rebuild a machine that was never built on a host: delete it and create \
                 it again"
                    .into(),
            ));
        }
        let image_id = image.as_ref().map_or(read.image_id.as_str(), |i| &i.id);
        sqlx::query(
            "UPDATE machines SET image_id = $2, disk_generation = disk_generation + 1, \
             spec_generation = spec_generation + 1, failure_reason = NULL WHERE id = $1",
        )
        .bind(id.to_string())
        .bind(image_id)
        .execute(&mut *tx)
        .await?;
        let message = match &image {
            Some(i) => format!("rebuild requested from image {}", i.name),
            None => "rebuild requested from its image".to_owned(),
        };
        let machine = accept_in_txn(
            self,
            &mut tx,
            id,
            &read,
            t,
            (Action::Rebuild, TaskKind::Rebuild, &message),
            now,
        )
        .await?;
        tx.commit().await?;
        self.machine_changed(id);
        Ok(machine)
    }
}
