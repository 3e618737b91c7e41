//! API tokens: the `api_tokens` table (only hashes of the secrets).

use super::{from_micros, is_unique_violation, parse_col, to_micros, Store};
use crate::error::{Error, Result};
use crate::model::UserId;
use chrono::{DateTime, Utc};
use skygate_api_types::TokenScope;
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

/// A stored token, without its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTokenRecord {
    pub id: Uuid,
    pub user_id: UserId,
    pub name: String,
    pub scope: TokenScope,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, user_id, name, scope, expires_at, created_at, last_used_at";

fn from_row(row: &AnyRow) -> Result<ApiTokenRecord> {
    Ok(ApiTokenRecord {
        id: parse_col(&row.try_get::<String, _>("id")?, "api_tokens.id")?,
        user_id: parse_col(&row.try_get::<String, _>("user_id")?, "api_tokens.user_id")?,
        name: row.try_get("name")?,
        scope: parse_col(&row.try_get::<String, _>("scope")?, "api_tokens.scope")?,
        expires_at: from_micros(row.try_get("expires_at")?),
        created_at: from_micros(row.try_get("created_at")?),
        last_used_at: row
            .try_get::<Option<i64>, _>("last_used_at")?
            .map(from_micros),
    })
}

/// A new token's fields.
#[derive(Debug)]
pub struct NewApiToken<'a> {
    pub user_id: UserId,
    pub name: &'a str,
    pub token_hash: &'a str,
    pub scope: TokenScope,
    pub expires_at: DateTime<Utc>,
}

impl Store {
    /// Stores a token; 409 when the user has one by that name, 422 past `max_per_user`.
    pub async fn api_token_create(
        &self,
        new: NewApiToken<'_>,
        max_per_user: i64,
    ) -> Result<ApiTokenRecord> {
        let mut tx = self.begin_write().await?;
        let held: i64 = sqlx::query("SELECT COUNT(*) AS n FROM api_tokens WHERE user_id = $1")
            .bind(new.user_id.to_string())
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
        if held >= max_per_user {
            return Err(Error::Invalid(format!(
                "at most {max_per_user} API tokens per account; revoke one first"
            )));
        }
        let id = Uuid::now_v7();
        let inserted = sqlx::query(
            "INSERT INTO api_tokens (id, user_id, name, token_hash, scope, expires_at, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id.to_string())
        .bind(new.user_id.to_string())
        .bind(new.name)
        .bind(new.token_hash)
        .bind(new.scope.as_str())
        .bind(to_micros(new.expires_at))
        .bind(to_micros(Utc::now()))
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(e) if is_unique_violation(&e) => {
                return Err(Error::Conflict(format!(
                    "you already have an API token named '{}'",
                    new.name
                )))
            }
            other => {
                other?;
            }
        }
        let sql = format!("SELECT {COLUMNS} FROM api_tokens WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        from_row(&row)
    }

    /// A user's tokens, newest first (at most the per-user limit, so no paging).
    pub async fn api_token_list(&self, user: UserId) -> Result<Vec<ApiTokenRecord>> {
        let sql =
            format!("SELECT {COLUMNS} FROM api_tokens WHERE user_id = $1 ORDER BY created_at DESC");
        let rows = sqlx::query(&sql)
            .bind(user.to_string())
            .fetch_all(self.reader())
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// Revokes (deletes) one of the user's tokens; false when it has no such token.
    pub async fn api_token_delete(&self, user: UserId, id: Uuid) -> Result<bool> {
        let res = sqlx::query("DELETE FROM api_tokens WHERE id = $1 AND user_id = $2")
            .bind(id.to_string())
            .bind(user.to_string())
            .execute(&self.write)
            .await?;
        Ok(res.rows_affected() == 1)
    }

    /// The token whose secret hashes to `hash`, expired or not.
    pub async fn api_token_by_hash(&self, hash: &str) -> Result<Option<ApiTokenRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM api_tokens WHERE token_hash = $1");
        let row = sqlx::query(&sql)
            .bind(hash)
            .fetch_optional(self.reader())
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Removes tokens that expired before `before` (they authenticate nothing; this frees their
    /// names and their place under the per-account limit).
    pub async fn api_token_purge_expired(&self, before: DateTime<Utc>) -> Result<u64> {
        let res = sqlx::query("DELETE FROM api_tokens WHERE expires_at < $1")
            .bind(to_micros(before))
            .execute(&self.write)
            .await?;
        Ok(res.rows_affected())
    }

    /// Records that a token was used at `at`.
    pub async fn api_token_touch(&self, id: Uuid, at: DateTime<Utc>) -> Result<()> {
        sqlx::query("UPDATE api_tokens SET last_used_at = $1 WHERE id = $2")
            .bind(to_micros(at))
            .bind(id.to_string())
            .execute(&self.write)
            .await?;
        Ok(())
    }
}
