//! Sessions: refresh-token families (rotation, reuse detection) and the per-account count of
//! failed logins that rate limiting reads (kept here so it holds across replicas).

use super::tasks::now_sql;
use super::{from_micros, to_micros, Backend, Store};
use crate::error::Result;
use crate::model::UserId;
use auth::refresh::{self, RefreshDecision, RefreshRecord};
use chrono::{DateTime, Duration, Utc};
use sqlx::Row;
use uuid::Uuid;

/// The family a new refresh token joins: a fresh one at login, the old one on rotation.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
}

/// What presenting a refresh token led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The token was spent and the new one stored in its family. Role and session version
    /// are read in the same transaction, so an access token issued from them cannot outlive
    /// a password change that raced this refresh.
    Rotated {
        user_id: UserId,
        role: auth::Role,
        session_version: i64,
    },
    /// No such token.
    Unknown,
    /// Past its idle or absolute expiry.
    Expired,
    /// A spent or revoked token came back: its whole family is now revoked.
    ReuseDetected { user_id: UserId, family_id: String },
}

/// Login attempts counted in the current windows, this one included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginAttempts {
    /// When the window of this account-and-client pair began.
    pub window_start: DateTime<Utc>,
    /// Attempts by this client on this account in its window.
    pub from_client: i64,
    /// Attempts on this account by every client in their windows.
    pub account: i64,
    /// The database's clock when they were counted.
    pub now: DateTime<Utc>,
}

impl Store {
    /// A successful login: forgets `client`'s failed attempts on `username` (others' stay) and
    /// stores the new session's refresh token (only its hash) in `family`, in one transaction.
    /// False (nothing stored) when the account changed since the login read it, at
    /// `session_version`: disabled or given a new password meanwhile, so the session would
    /// outlive the change that should have ended it.
    #[allow(clippy::too_many_arguments)]
    pub async fn login_succeeded(
        &self,
        username: &str,
        client: &str,
        user_id: UserId,
        session_version: i64,
        token_hash: &str,
        family: Family,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        // The account row is share-locked by the check (PostgreSQL): a disable or password
        // change either committed before it (then the check fails) or waits for this insert
        // (then its revocation sees the new token).
        const STORE: &str = "INSERT INTO refresh_tokens (id, user_id, family_id, \
             family_created_at, token_hash, expires_at, created_at) \
             SELECT $1, $2, $3, $4, $5, $6, $7 WHERE EXISTS (SELECT 1 FROM users \
             WHERE id = $2 AND disabled_at IS NULL AND session_version = $8 LOCK_ROW)";
        let expires_at = refresh::expires_at(now, family.created_at);
        let store = |sql| {
            sqlx::query(sql)
                .bind(Uuid::new_v4().to_string())
                .bind(user_id.to_string())
                .bind(family.id.to_string())
                .bind(to_micros(family.created_at))
                .bind(token_hash)
                .bind(to_micros(expires_at))
                .bind(to_micros(now))
                .bind(session_version)
        };
        if self.backend() == Backend::Postgres {
            // One statement (a data-modifying CTE is atomic with its statement): BEGIN and
            // COMMIT had been two more of a login's round trips, each CPU taken from password
            // hashing on the same cores (issue 12).
            let sql = format!(
                "WITH forgotten AS (DELETE FROM login_failures WHERE username = $9 AND client = $10) \
                 {}",
                STORE.replace("LOCK_ROW", "FOR SHARE")
            );
            let stored = store(&sql)
                .bind(username)
                .bind(client)
                .execute(&self.write)
                .await?;
            return Ok(stored.rows_affected() == 1);
        }
        // SQLite has no data-modifying CTEs; its transaction costs no network round trip.
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM login_failures WHERE username = $1 AND client = $2")
            .bind(username)
            .bind(client)
            .execute(&mut *tx)
            .await?;
        // SQLite: the one writer connection serialises this with any change to the account.
        let sql = STORE.replace(" LOCK_ROW", "");
        let stored = store(&sql).execute(&mut *tx).await?;
        if stored.rows_affected() != 1 {
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Spends the token whose hash is `presented_hash` and stores `new_hash` in its family, in
    /// one transaction. Of several concurrent calls with one token exactly one rotates: the
    /// spend is a conditional update, and the losers see reuse.
    pub async fn refresh_token_rotate(
        &self,
        presented_hash: &str,
        new_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<RefreshOutcome> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "SELECT id, user_id, family_id, family_created_at, created_at, revoked_at, replaced_by \
             FROM refresh_tokens WHERE token_hash = $1",
        )
        .bind(presented_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(RefreshOutcome::Unknown);
        };
        let id: String = row.try_get("id")?;
        let user_id: UserId = super::parse_col(&row.try_get::<String, _>("user_id")?, "user_id")?;
        let family_id: String = row.try_get("family_id")?;
        let family_created_at = from_micros(row.try_get("family_created_at")?);
        let record = RefreshRecord {
            created_at: from_micros(row.try_get("created_at")?),
            family_created_at,
            revoked_at: row
                .try_get::<Option<i64>, _>("revoked_at")?
                .map(from_micros),
            replaced: row.try_get::<Option<String>, _>("replaced_by")?.is_some(),
        };
        // Lock the user row first: a password change updates it before revoking tokens, so
        // the two serialise and a rotation cannot slip a token past the revocation.
        sqlx::query("UPDATE users SET updated_at = updated_at WHERE id = $1")
            .bind(user_id.to_string())
            .execute(&mut *tx)
            .await?;
        let user =
            sqlx::query("SELECT role, session_version, disabled_at FROM users WHERE id = $1")
                .bind(user_id.to_string())
                .fetch_one(&mut *tx)
                .await?;
        if user.try_get::<Option<i64>, _>("disabled_at")?.is_some() {
            // Disabling revoked every family, but a login that read the account just before
            // may have added one since: it ends here.
            revoke_family_in_txn(&mut tx, &family_id, now).await?;
            tx.commit().await?;
            return Ok(RefreshOutcome::Unknown);
        }
        let mut decision = refresh::decide(&record, now);
        let new_id = Uuid::new_v4().to_string();
        if decision == RefreshDecision::Rotate {
            let spent = sqlx::query(
                "UPDATE refresh_tokens SET replaced_by = $1 \
                 WHERE id = $2 AND replaced_by IS NULL AND revoked_at IS NULL",
            )
            .bind(&new_id)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            if spent.rows_affected() == 0 {
                // Another request spent it between our read and our write.
                decision = RefreshDecision::Reuse;
            }
        }
        let outcome = match decision {
            RefreshDecision::Rotate => {
                sqlx::query(
                    "INSERT INTO refresh_tokens (id, user_id, family_id, family_created_at, \
                     token_hash, expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(&new_id)
                .bind(user_id.to_string())
                .bind(&family_id)
                .bind(to_micros(family_created_at))
                .bind(new_hash)
                .bind(to_micros(refresh::expires_at(now, family_created_at)))
                .bind(to_micros(now))
                .execute(&mut *tx)
                .await?;
                RefreshOutcome::Rotated {
                    user_id,
                    role: super::parse_col(&user.try_get::<String, _>("role")?, "users.role")?,
                    session_version: user.try_get("session_version")?,
                }
            }
            RefreshDecision::Reuse => {
                revoke_family_in_txn(&mut tx, &family_id, now).await?;
                RefreshOutcome::ReuseDetected { user_id, family_id }
            }
            RefreshDecision::Expired => RefreshOutcome::Expired,
        };
        tx.commit().await?;
        Ok(outcome)
    }

    /// Revokes the family of `user`'s token with this hash (logout). Unknown tokens, and
    /// other users' tokens, are ignored: logging out twice is not an error, and one user
    /// cannot end another's session.
    pub async fn refresh_family_revoke_by_token(
        &self,
        user: UserId,
        token_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "SELECT family_id FROM refresh_tokens WHERE token_hash = $1 AND user_id = $2",
        )
        .bind(token_hash)
        .bind(user.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(());
        };
        let family_id: String = row.try_get("family_id")?;
        revoke_family_in_txn(&mut tx, &family_id, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Counts one login attempt against `username` from `client` before its password is
    /// checked, and returns that pair's window and count with the account's count over every
    /// client, and the database's clock. A window older than `window` starts over at one.
    /// Counting first, in one statement, means concurrent guesses cannot all slip under the
    /// limit; a success clears the pair's count afterwards.
    ///
    /// One statement, clock read included: every round trip a login makes is CPU taken from
    /// the password hashing on the same cores (issue 12: the clock read and the account's sum
    /// had been two more). The sum of the other clients' counts is read in the statement's
    /// snapshot; this pair's count is the one just written.
    pub async fn login_attempt_record(
        &self,
        username: &str,
        client: &str,
        window: Duration,
    ) -> Result<LoginAttempts> {
        let now = now_sql(self.backend());
        // `WHERE true`: SQLite needs it to read the `ON CONFLICT` after an `INSERT ... SELECT`.
        let sql = format!(
            "INSERT INTO login_failures (username, client, window_start, failures) \
             SELECT $1, $2, ({now}), 1 WHERE true \
             ON CONFLICT (username, client) DO UPDATE SET \
               failures = CASE WHEN login_failures.window_start <= excluded.window_start - $3 \
                               THEN 1 ELSE login_failures.failures + 1 END, \
               window_start = CASE WHEN login_failures.window_start <= excluded.window_start - $3 \
                                   THEN excluded.window_start ELSE login_failures.window_start END \
             RETURNING window_start, failures, ({now}) AS now, \
               (SELECT CAST(COALESCE(SUM(o.failures), 0) AS BIGINT) FROM login_failures o \
                WHERE o.username = $1 AND o.client <> $2 AND o.window_start > ({now}) - $3) AS others"
        );
        let row = sqlx::query(&sql)
            .bind(username)
            .bind(client)
            .bind(window.num_microseconds().unwrap_or(i64::MAX))
            .fetch_one(&self.write)
            .await?;
        let from_client: i64 = row.try_get("failures")?;
        Ok(LoginAttempts {
            window_start: from_micros(row.try_get("window_start")?),
            from_client,
            account: from_client + row.try_get::<i64, _>("others")?,
            now: from_micros(row.try_get("now")?),
        })
    }

    /// Takes back one attempt counted by `login_attempt_record` whose password was never
    /// checked (the request was refused for overload).
    pub async fn login_attempt_uncount(&self, username: &str, client: &str) -> Result<()> {
        sqlx::query(
            "UPDATE login_failures SET failures = failures - 1 \
             WHERE username = $1 AND client = $2 AND failures > 0",
        )
        .bind(username)
        .bind(client)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// Housekeeping: drops failure windows and refresh tokens that can no longer matter.
    pub async fn sessions_purge_expired(
        &self,
        now: DateTime<Utc>,
        window: Duration,
    ) -> Result<u64> {
        let a = sqlx::query("DELETE FROM login_failures WHERE window_start <= $1")
            .bind(to_micros(now - window))
            .execute(&self.write)
            .await?;
        // Whole families only, once past their absolute expiry: a spent token must stay
        // recognisable as long as its family lives, or replaying it would not revoke the family.
        let b = sqlx::query("DELETE FROM refresh_tokens WHERE family_created_at <= $1")
            .bind(to_micros(now - refresh::REFRESH_ABSOLUTE_TTL))
            .execute(&self.write)
            .await?;
        Ok(a.rows_affected() + b.rows_affected())
    }
}

async fn revoke_family_in_txn(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    family_id: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    sqlx::query(
        "UPDATE refresh_tokens SET revoked_at = $1 WHERE family_id = $2 AND revoked_at IS NULL",
    )
    .bind(to_micros(now))
    .bind(family_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
