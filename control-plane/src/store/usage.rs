//! Each tenant's running total of what its live machines hold: the `tenant_usage` table, kept
//! by the transactions that create a machine and that stamp one deleted.

use super::{Backend, Store};
use crate::error::Result;
use crate::model::{MachineId, Usage, UserId};
use sqlx::{Any, Row, Transaction};

/// The owner's total, locked until `tx` ends (a row lock on PostgreSQL; on SQLite the single
/// writer holds everything already): two creates of one tenant take turns from here, so both
/// cannot spend its last unit.
pub(crate) async fn usage_lock_in_txn(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    owner: UserId,
) -> Result<Usage> {
    let owner = owner.to_string();
    let lock = if backend == Backend::Postgres {
        " FOR UPDATE"
    } else {
        ""
    };
    let select =
        format!("SELECT machines, vcpus, memory_mib FROM tenant_usage WHERE owner_id = $1{lock}");
    let row = match sqlx::query(&select)
        .bind(&owner)
        .fetch_optional(&mut **tx)
        .await?
    {
        Some(row) => row,
        None => {
            // The tenant's first machine (or first since this table came).
            sqlx::query(
                "INSERT INTO tenant_usage (owner_id, machines, vcpus, memory_mib) \
                 VALUES ($1, 0, 0, 0) ON CONFLICT (owner_id) DO NOTHING",
            )
            .bind(&owner)
            .execute(&mut **tx)
            .await?;
            sqlx::query(&select)
                .bind(&owner)
                .fetch_one(&mut **tx)
                .await?
        }
    };
    Ok(Usage {
        machines: row.try_get("machines")?,
        vcpus: row.try_get("vcpus")?,
        memory_mib: row.try_get("memory_mib")?,
    })
}

/// Adds an admitted machine to the total locked by [`usage_lock_in_txn`].
pub(crate) async fn usage_add_in_txn(
    tx: &mut Transaction<'static, Any>,
    owner: UserId,
    asked: Usage,
) -> Result<()> {
    sqlx::query(
        "UPDATE tenant_usage SET machines = machines + $2, vcpus = vcpus + $3, \
         memory_mib = memory_mib + $4 WHERE owner_id = $1",
    )
    .bind(owner.to_string())
    .bind(asked.machines)
    .bind(asked.vcpus)
    .bind(asked.memory_mib)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Takes a machine that `tx` just stamped deleted off its owner's total.
pub(crate) async fn usage_release_in_txn(
    tx: &mut Transaction<'static, Any>,
    machine: MachineId,
) -> Result<()> {
    sqlx::query(
        "UPDATE tenant_usage SET machines = machines - 1, \
         vcpus = vcpus - (SELECT vcpus FROM machines WHERE id = $1), \
         memory_mib = memory_mib - (SELECT memory_mib FROM machines WHERE id = $1) \
         WHERE owner_id = (SELECT owner_id FROM machines WHERE id = $1)",
    )
    .bind(machine.to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Store {
    /// What `owner`'s live machines hold, as kept (tests compare it with a fresh sum).
    pub async fn tenant_usage(&self, owner: UserId) -> Result<Usage> {
        let row =
            sqlx::query("SELECT machines, vcpus, memory_mib FROM tenant_usage WHERE owner_id = $1")
                .bind(owner.to_string())
                .fetch_optional(self.reader())
                .await?;
        Ok(match row {
            Some(r) => Usage {
                machines: r.try_get("machines")?,
                vcpus: r.try_get("vcpus")?,
                memory_mib: r.try_get("memory_mib")?,
            },
            None => Usage::default(),
        })
    }
}
