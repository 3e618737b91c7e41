//! Idempotency-Key handling for creating requests: run once, answer the same to every retry.

use super::{App, Principal, IDEMPOTENCY_LOCK, IDEMPOTENCY_RETENTION};
use crate::error::{Error, Result};
use crate::model::MachineId;
use crate::store::idempotency::Claim;
use sha2::{Digest, Sha256};

/// Longest key accepted; keys are client-chosen (UUIDs in practice).
pub const MAX_KEY_LEN: usize = 255;

/// Checks a client's Idempotency-Key: 1–255 visible ASCII characters.
pub fn validate_key(key: &str) -> Result<()> {
    if (1..=MAX_KEY_LEN).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters"
        )))
    }
}

/// Hex SHA-256 of a request's canonical form, to tell "same request" from "same key reused".
pub fn request_hash(canonical: &[u8]) -> String {
    hex::encode(Sha256::digest(canonical))
}

/// An Idempotency-Key as a request carried it, with the hash of that request's canonical
/// form ([`request_hash`]).
#[derive(Debug, Clone)]
pub struct IdempotencyKey<'a> {
    pub key: &'a str,
    pub request_hash: String,
}

/// What a request carrying an Idempotency-Key may do.
#[derive(Debug)]
pub enum KeyedStart {
    /// Run it, completing `claim_id` together with the work.
    Run { claim_id: String },
    /// The first request created this machine: answer with it.
    Replay { machine_id: MachineId },
}

impl App {
    /// Claims `key` for a request hashing to `hash`: a retry of a finished request is told
    /// what it created, another body with the same key is 422, a retry while the first still
    /// runs 409.
    pub async fn idempotency_start(
        &self,
        who: Principal,
        key: &str,
        hash: &str,
    ) -> Result<KeyedStart> {
        validate_key(key)?;
        // The database's clock: another replica decides when this claim has lapsed.
        let now = self.store.clock().await?;
        let claim = self
            .store
            .idempotency_claim(
                who.user_id,
                key,
                hash,
                now,
                IDEMPOTENCY_LOCK,
                IDEMPOTENCY_RETENTION,
            )
            .await?;
        match claim {
            Claim::Claimed { claim_id } => Ok(KeyedStart::Run { claim_id }),
            Claim::Replay { machine_id } => Ok(KeyedStart::Replay { machine_id }),
            Claim::InFlight => Err(Error::IdempotencyInFlight),
            Claim::Mismatch => Err(Error::IdempotencyMismatch),
        }
    }

    /// Gives the key up after the work failed, so that a corrected retry runs afresh.
    ///
    /// When the database itself is what failed, the release cannot happen now: it is retried
    /// in the background until the claim would lapse anyway, so that a client retrying after
    /// the outage runs its request instead of being told for a minute that it is in progress.
    /// (A claim whose answer was stored is never released: see `idempotency_release`.)
    pub async fn idempotency_abandon(&self, who: Principal, key: &str, claim_id: &str) {
        let first = self
            .store
            .idempotency_release(who.user_id, key, claim_id)
            .await;
        let Err(e) = first else { return };
        if !e.is_store_unavailable() {
            tracing::warn!(error = ?e, "could not release idempotency key");
            return;
        }
        let (store, user, key, claim_id) = (
            self.store.clone(),
            who.user_id,
            key.to_owned(),
            claim_id.to_owned(),
        );
        tokio::spawn(async move {
            let give_up = tokio::time::Instant::now()
                + IDEMPOTENCY_LOCK
                    .to_std()
                    .unwrap_or(std::time::Duration::from_secs(60));
            while tokio::time::Instant::now() < give_up {
                tokio::time::sleep(RELEASE_RETRY).await;
                match store.idempotency_release(user, &key, &claim_id).await {
                    Ok(()) => return,
                    Err(e) if e.is_store_unavailable() => {}
                    Err(e) => {
                        tracing::warn!(error = ?e, "could not release idempotency key");
                        return;
                    }
                }
            }
        });
    }
}

/// How often a release that met a database outage is tried again.
const RELEASE_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_bounded_visible_ascii() {
        assert!(validate_key("3f1c2d8e-9a7b-4c1d-8e2f-0a1b2c3d4e5f").is_ok());
        assert!(validate_key(&"k".repeat(255)).is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key(&"k".repeat(256)).is_err());
        assert!(validate_key("has space").is_err());
        assert!(validate_key("ключ").is_err());
    }

    #[test]
    fn hash_distinguishes_requests() {
        assert_eq!(request_hash(b"{\"a\":1}"), request_hash(b"{\"a\":1}"));
        assert_ne!(request_hash(b"{\"a\":1}"), request_hash(b"{\"a\":2}"));
        assert_eq!(request_hash(b"").len(), 64);
    }
}
