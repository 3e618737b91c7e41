//! Idempotency keys for `POST /machines`: the first request with a key claims it, the machine
//! it created is recorded with the key, and retries with the same key and body are told that
//! machine (the API shows it again).

use super::{is_unique_violation, parse_col, to_micros, Store};
use crate::error::Result;
use crate::model::{MachineId, UserId};
use chrono::{DateTime, Duration, Utc};
use sqlx::{Any, Row, Transaction};
use uuid::Uuid;

/// What claiming a key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This request owns the key now (as `claim_id`) and must complete or release it.
    Claimed { claim_id: String },
    /// The key was used with this body before and created this machine: answer with it.
    Replay { machine_id: MachineId },
    /// The key's first request is still running.
    InFlight,
    /// The key was used with a different body.
    Mismatch,
}

impl Store {
    /// Claims `(user, key)` for a request whose body hashes to `request_hash`. A claim whose
    /// holder has not finished within `lock_for` (it crashed) may be taken over; a key older
    /// than `retention` is forgotten and reusable.
    pub async fn idempotency_claim(
        &self,
        user: UserId,
        key: &str,
        request_hash: &str,
        now: DateTime<Utc>,
        lock_for: Duration,
        retention: Duration,
    ) -> Result<Claim> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "SELECT request_hash, claim_id, machine_id, locked_until, created_at \
             FROM idempotency_keys WHERE user_id = $1 AND key = $2",
        )
        .bind(user.to_string())
        .bind(key)
        .fetch_optional(&mut *tx)
        .await?;
        let lock_until = to_micros(now + lock_for);
        let claim_id = Uuid::new_v4().to_string();
        let Some(row) = row else {
            let res = sqlx::query(
                "INSERT INTO idempotency_keys (user_id, key, request_hash, claim_id, locked_until, \
                 created_at) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(user.to_string())
            .bind(key)
            .bind(request_hash)
            .bind(&claim_id)
            .bind(lock_until)
            .bind(to_micros(now))
            .execute(&mut *tx)
            .await;
            return match res {
                Ok(_) => {
                    tx.commit().await?;
                    Ok(Claim::Claimed { claim_id })
                }
                // A concurrent first request inserted it between our read and our write.
                Err(e) if is_unique_violation(&e) => Ok(Claim::InFlight),
                Err(e) => Err(e.into()),
            };
        };
        let created_at: i64 = row.try_get("created_at")?;
        let expired = created_at <= to_micros(now - retention);
        let stored_hash: String = row.try_get("request_hash")?;
        let created: Option<String> = row.try_get("machine_id")?;
        let locked_until: Option<i64> = row.try_get("locked_until")?;
        if !expired {
            if stored_hash != request_hash {
                return Ok(Claim::Mismatch);
            }
            if let Some(created) = created {
                return Ok(Claim::Replay {
                    machine_id: parse_col(&created, "idempotency_keys.machine_id")?,
                });
            }
            if locked_until.is_some_and(|l| l > to_micros(now)) {
                return Ok(Claim::InFlight);
            }
        }
        // Take over an expired key or a dead holder's claim; compare-and-swap on the claim we
        // saw, so of two retries racing here only one wins.
        let seen_claim: String = row.try_get("claim_id")?;
        let taken = sqlx::query(
            "UPDATE idempotency_keys SET request_hash = $1, claim_id = $2, machine_id = NULL, \
             locked_until = $3, created_at = $4 \
             WHERE user_id = $5 AND key = $6 AND claim_id = $7",
        )
        .bind(request_hash)
        .bind(&claim_id)
        .bind(lock_until)
        .bind(to_micros(now))
        .bind(user.to_string())
        .bind(key)
        .bind(&seen_claim)
        .execute(&mut *tx)
        .await?;
        if taken.rows_affected() == 0 {
            return Ok(Claim::InFlight);
        }
        tx.commit().await?;
        Ok(Claim::Claimed { claim_id })
    }

    /// Gives a claimed key up without an answer (the request failed on our side), so that
    /// the client's retry runs afresh.
    pub async fn idempotency_release(&self, user: UserId, key: &str, claim_id: &str) -> Result<()> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2 AND claim_id = $3 \
             AND machine_id IS NULL",
        )
        .bind(user.to_string())
        .bind(key)
        .bind(claim_id)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// Housekeeping: forgets keys older than `retention`.
    pub async fn idempotency_purge(&self, now: DateTime<Utc>, retention: Duration) -> Result<u64> {
        let res = sqlx::query("DELETE FROM idempotency_keys WHERE created_at <= $1")
            .bind(to_micros(now - retention))
            .execute(&self.write)
            .await?;
        Ok(res.rows_affected())
    }
}

/// A claimed key to complete in the same transaction as the work it guards, so that the work
/// and its stored answer commit together or not at all.
#[derive(Debug, Clone, Copy)]
pub struct ClaimedKey<'a> {
    pub user: UserId,
    pub key: &'a str,
    pub claim_id: &'a str,
}

/// Records inside `tx` the machine a claimed key's request created. Fails with
/// `IdempotencyInFlight` (and so rolls the work back) if the claim was taken over meanwhile by
/// a retry that found us dead.
pub(crate) async fn complete_in_txn(
    tx: &mut Transaction<'static, Any>,
    claimed: ClaimedKey<'_>,
    created: MachineId,
) -> Result<()> {
    let done = sqlx::query(
        "UPDATE idempotency_keys SET machine_id = $1, locked_until = NULL \
         WHERE user_id = $2 AND key = $3 AND claim_id = $4 AND machine_id IS NULL",
    )
    .bind(created.to_string())
    .bind(claimed.user.to_string())
    .bind(claimed.key)
    .bind(claimed.claim_id)
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() == 0 {
        return Err(crate::error::Error::IdempotencyInFlight);
    }
    Ok(())
}
