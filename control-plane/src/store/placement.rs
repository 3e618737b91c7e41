//! Placement: choosing hosts for pending machines and reserving their capacity there, in one
//! transaction: the hosts' kept allocations are read (one row per host, whatever the number
//! of machines), the scheduler chooses for a batch of waiting machines, and each chosen host's
//! row is claimed once for what the batch puts there, only if it still has the room.

use super::hosts::{allocation_claim_in_txn, hosts_for_placement};
use super::machine_events::event_in_txn;
use super::{parse_col, to_micros, Backend, Store};
use crate::error::Result;
use crate::model::scheduler::{self, NoPlacement, PlacementDecision, Rejection, Resources};
use crate::model::{MachineId, MachineStatus};
use sqlx::{Any, Row, Transaction};
use std::collections::BTreeMap;

/// Most machines one placement transaction places: the hosts are read once for all of them
/// (issue 13: read once per machine, 1,000 hosts made each placement read 1,000 rows).
const BATCH: i64 = 64;

/// Pending machines besides `$1` whose provision task is waiting to run (queued, not parked
/// for capacity), oldest first: placed with `$1`, their own tasks find them placed and go on
/// to build them. A parked task's machine is left to its wake, so that no placed machine
/// waits on a parked task.
const OTHERS: &str = "SELECT m.id, m.vcpus, m.memory_mib, m.disk_gib FROM machines m \
    WHERE m.status = 'pending' AND m.host_id IS NULL AND m.deleted_at IS NULL AND m.id <> $1 \
    AND EXISTS (SELECT 1 FROM tasks t WHERE t.machine_id = m.id AND t.kind = 'provision' \
    AND t.state = 'queued' AND t.waiting_for_capacity = 0) ORDER BY m.seq LIMIT $2";

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

/// The size of machine `id` if it is pending and unplaced. `lock`: hold its row for the
/// transaction (PostgreSQL), so a concurrent batch skips it and a concurrent placement of it
/// waits, then finds it placed.
async fn pending_size_in_txn(
    tx: &mut Transaction<'static, Any>,
    id: MachineId,
    lock: bool,
) -> Result<Option<Resources>> {
    let sql = format!(
        "SELECT status, host_id, vcpus, memory_mib, disk_gib FROM machines \
         WHERE id = $1 AND deleted_at IS NULL{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let row = sqlx::query(&sql)
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    let Some(row) = row else { return Ok(None) };
    let status: MachineStatus = parse_col(&row.try_get::<String, _>("status")?, "status")?;
    if status != MachineStatus::Pending || row.try_get::<Option<String>, _>("host_id")?.is_some() {
        return Ok(None);
    }
    Ok(Some(Resources {
        vcpus: row.try_get("vcpus")?,
        memory_mib: row.try_get("memory_mib")?,
        disk_gib: row.try_get("disk_gib")?,
    }))
}

/// Records machine `id` on its chosen host, `provisioning`, with its event. False if it was
/// no longer pending and unplaced.
async fn record_in_txn(
    tx: &mut Transaction<'static, Any>,
    id: MachineId,
    decision: &PlacementDecision,
    now: i64,
) -> Result<bool> {
    let placed = sqlx::query(
        "UPDATE machines SET host_id = $1, status = $2, status_changed_at = $3, updated_at = $3, \
         version = version + 1 WHERE id = $4 AND status = 'pending' AND host_id IS NULL",
    )
    .bind(&decision.host_id)
    .bind(MachineStatus::Provisioning.as_str())
    .bind(now)
    .bind(id.to_string())
    .execute(&mut **tx)
    .await?;
    if placed.rows_affected() == 0 {
        return Ok(false);
    }
    let message = format!("placed on host {}", decision.host_name);
    event_in_txn(
        tx,
        id,
        "schedule",
        MachineStatus::Provisioning,
        &message,
        now,
    )
    .await?;
    Ok(true)
}

impl Store {
    /// Places a pending machine, with up to [`BATCH`] other machines waiting for placement:
    /// runs the scheduler over every host's capacity and kept allocation for the batch (each
    /// choice counting the ones before it), claims each chosen host's row once for what the
    /// batch puts there, and records every placed machine as `provisioning` on its host, in
    /// one transaction (the reservation). Only the chosen hosts' rows are locked, in id
    /// order. If a claim finds the room taken meanwhile (another replica placed there since
    /// the hosts were read), the batch is given up and the machine is placed alone.
    pub async fn machine_place(&self, id: MachineId) -> Result<Placement> {
        let postgres = self.backend() == Backend::Postgres;
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let Some(need) = pending_size_in_txn(&mut tx, id, postgres).await? else {
            return Ok(Placement::NotPending);
        };
        let others_sql = if postgres {
            format!("{OTHERS} FOR UPDATE OF m SKIP LOCKED")
        } else {
            OTHERS.to_owned()
        };
        let mut batch = vec![(id, need)];
        for row in sqlx::query(&others_sql)
            .bind(id.to_string())
            .bind(BATCH - 1)
            .fetch_all(&mut *tx)
            .await?
        {
            batch.push((
                parse_col(&row.try_get::<String, _>("id")?, "machines.id")?,
                Resources {
                    vcpus: row.try_get("vcpus")?,
                    memory_mib: row.try_get("memory_mib")?,
                    disk_gib: row.try_get("disk_gib")?,
                },
            ));
        }
        let hosts = hosts_for_placement(&mut tx).await?;
        let candidates: Vec<_> = hosts.iter().map(|h| h.candidate()).collect();
        let needs: Vec<Resources> = batch.iter().map(|(_, n)| *n).collect();
        let plan = scheduler::place_batch(&needs, &candidates);
        let mut per_host: BTreeMap<&str, (i64, Resources)> = BTreeMap::new();
        for (need, chosen) in needs.iter().zip(&plan) {
            if let Ok(d) = chosen {
                let spent = per_host.entry(d.host_id.as_str()).or_default();
                *spent = (spent.0 + 1, spent.1.plus(*need));
            }
        }
        // In id order (a BTreeMap), so two batches never wait on each other's hosts in a
        // cycle.
        for (host, (machines, total)) in &per_host {
            if !allocation_claim_in_txn(&mut tx, host, *machines, *total).await? {
                drop(tx);
                return self.place_alone(id).await;
            }
        }
        for ((machine, _), chosen) in batch.iter().zip(&plan) {
            if let Ok(d) = chosen {
                if !record_in_txn(&mut tx, *machine, d, now).await? {
                    // Held by this transaction (or SQLite's one writer), so not expected:
                    // whatever moved it, the claims above counted it, so start over alone.
                    drop(tx);
                    return self.place_alone(id).await;
                }
            }
        }
        tx.commit().await?;
        for ((machine, _), chosen) in batch.iter().zip(&plan) {
            if chosen.is_ok() {
                self.machine_changed(*machine);
            }
        }
        Ok(match plan.into_iter().next() {
            Some(Ok(d)) => Placement::Placed {
                host_name: d.host_name,
            },
            Some(Err(no)) => Placement::NoRoom(no),
            None => Placement::NotPending,
        })
    }

    /// Places one machine, choosing again without a host whose room a concurrent placement
    /// took between the read and the claim.
    async fn place_alone(&self, id: MachineId) -> Result<Placement> {
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let Some(need) = pending_size_in_txn(&mut tx, id, false).await? else {
            return Ok(Placement::NotPending);
        };
        let mut taken: Vec<String> = Vec::new();
        let decision = loop {
            let hosts = hosts_for_placement(&mut tx).await?;
            let candidates: Vec<_> = hosts
                .iter()
                .filter(|h| !taken.contains(&h.id))
                .map(|h| h.candidate())
                .collect();
            let decision = match scheduler::place(need, &candidates) {
                Ok(d) => d,
                Err(mut no) => {
                    no.rejections.extend(
                        hosts
                            .iter()
                            .filter(|h| taken.contains(&h.id))
                            .map(|h| (h.name.clone(), Rejection::TakenMeanwhile)),
                    );
                    no.rejections.sort_by(|a, b| a.0.cmp(&b.0));
                    return Ok(Placement::NoRoom(no));
                }
            };
            if allocation_claim_in_txn(&mut tx, &decision.host_id, 1, need).await? {
                break decision;
            }
            // Each host is tried at most once, so this ends.
            taken.push(decision.host_id);
        };
        if !record_in_txn(&mut tx, id, &decision, now).await? {
            // Placed by a duplicate task elsewhere, or moved by a request meanwhile; the
            // claim goes with the rolled-back transaction.
            return Ok(Placement::NotPending);
        }
        tx.commit().await?;
        self.machine_changed(id);
        Ok(Placement::Placed {
            host_name: decision.host_name,
        })
    }
}
