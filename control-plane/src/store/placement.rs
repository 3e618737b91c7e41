//! Placement: choosing a host for a pending machine and reserving its capacity there, in one
//! transaction: the hosts' kept allocations are read (one row per host, whatever the number
//! of machines), the scheduler chooses, and the claim spends the room on the chosen host's row
//! only if it is still there.

use super::hosts::{allocation_claim_in_txn, hosts_for_placement};
use super::machine_events::event_in_txn;
use super::{parse_col, to_micros, Store};
use crate::error::Result;
use crate::model::scheduler::{self, NoPlacement, Rejection, Resources};
use crate::model::{MachineId, MachineStatus};
use sqlx::Row;

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
    /// Places a pending machine: runs the scheduler over every host's capacity and kept
    /// allocation and, when a host fits, claims the room on that host's row and records the
    /// host and `provisioning` in the same transaction (the reservation). Only the chosen
    /// host's row is locked (by the claim); a claim that finds the room taken by a concurrent
    /// placement (another replica) chooses again among the other hosts, as they are then.
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
            if allocation_claim_in_txn(&mut tx, &decision.host_id, need).await? {
                break decision;
            }
            // Each host is tried at most once, so this ends.
            taken.push(decision.host_id);
        };
        let placed = sqlx::query(
            "UPDATE machines SET host_id = $1, status = $2, status_changed_at = $3, updated_at = $3, \
             version = version + 1 WHERE id = $4 AND status = 'pending' AND host_id IS NULL",
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
}
