//! API tokens (issue 15): a tenant mints named, scoped, expiring bearer secrets for its
//! automation, lists them (never their secrets), and revokes them. Requests they authenticate
//! act as their owner, within their scope.

use super::{App, Credential, Principal};
use crate::error::{Error, Result};
use crate::store::api_tokens::{ApiTokenRecord, NewApiToken};
use auth::api_token::{hash_api_token, ApiToken};
use chrono::Utc;
use skygate_api_types::TokenScope;
use std::collections::HashMap;
use std::sync::Mutex;
use uuid::Uuid;

/// Most tokens one account holds.
pub const MAX_TOKENS: i64 = 50;

/// How stale a token's `last_used_at` may get: it is written at most this often, so a busy
/// script does not add a write to each of its requests.
const TOUCH_EVERY: chrono::Duration = chrono::Duration::seconds(60);

/// When this replica last wrote each token's `last_used_at`.
#[derive(Debug, Default)]
pub struct TokenUse(Mutex<HashMap<Uuid, chrono::DateTime<Utc>>>);

impl TokenUse {
    /// Whether `id`'s use at `now` should be written (and, if so, that it is being).
    fn due(&self, id: Uuid, now: chrono::DateTime<Utc>) -> bool {
        let mut last = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A bound, not an eviction policy: past it the map starts over (a few more writes).
        if last.len() > 100_000 {
            last.clear();
        }
        match last.get(&id) {
            Some(at) if now - *at < TOUCH_EVERY => false,
            _ => {
                last.insert(id, now);
                true
            }
        }
    }
}

impl App {
    /// Mints a token for the caller; the only time its secret is returned.
    pub async fn token_create(
        &self,
        who: Principal,
        name: &str,
        scope: TokenScope,
        expires_in_days: i64,
    ) -> Result<(ApiTokenRecord, ApiToken)> {
        who.require_session("an API token cannot create API tokens; log in")?;
        if !super::ssh_keys::is_key_name(name) {
            return Err(Error::Invalid(
                "name must be 1 to 64 characters of letters, digits, '-', '_', '.', '@'".into(),
            ));
        }
        if !(1..=365).contains(&expires_in_days) {
            return Err(Error::Invalid("expires_in_days must be 1 to 365".into()));
        }
        let token = ApiToken::generate();
        let hash = token.hash();
        let record = self
            .store
            .api_token_create(
                NewApiToken {
                    user_id: who.user_id,
                    name,
                    token_hash: &hash,
                    scope,
                    expires_at: Utc::now() + chrono::Duration::days(expires_in_days),
                },
                MAX_TOKENS,
            )
            .await?;
        tracing::info!(target: "skygate::auth", event = "api-token-created", user_id = %who.user_id, token_id = %record.id, scope = scope.as_str(), "API token created");
        Ok((record, token))
    }

    pub async fn token_list(&self, who: Principal) -> Result<Vec<ApiTokenRecord>> {
        self.store.api_token_list(who.user_id).await
    }

    /// Revokes one of the caller's tokens: it stops working with the next request.
    pub async fn token_delete(&self, who: Principal, id: Uuid) -> Result<()> {
        if self.store.api_token_delete(who.user_id, id).await? {
            Ok(())
        } else {
            Err(Error::NotFound("API token"))
        }
    }

    /// The principal behind an API token: its owner, if the token exists, has not expired and
    /// the owner is not disabled.
    pub(super) async fn authenticate_api_token(&self, bearer: &str) -> Result<Principal> {
        let invalid = || Error::Unauthenticated("invalid, expired or revoked API token");
        let token = self
            .store
            .api_token_by_hash(&hash_api_token(bearer))
            .await?
            .ok_or_else(invalid)?;
        let now = Utc::now();
        if token.expires_at <= now {
            return Err(invalid());
        }
        let user = self
            .store
            .user_get(token.user_id)
            .await?
            .ok_or_else(invalid)?;
        if user.disabled_at.is_some() {
            return Err(invalid());
        }
        if self.token_use.due(token.id, now) {
            // What the list shows, not what the request needs: a busy writer must not fail it.
            if let Err(e) = self.store.api_token_touch(token.id, now).await {
                tracing::warn!(error = ?e, token_id = %token.id, "could not record an API token's use");
            }
        }
        Ok(Principal {
            user_id: user.id,
            role: user.role,
            credential: Credential::ApiToken(token.scope),
        })
    }
}
