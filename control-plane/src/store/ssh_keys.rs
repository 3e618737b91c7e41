//! Tenants' saved SSH public keys: the `ssh_keys` table.

use super::{from_micros, is_unique_violation, parse_col, to_micros, Store};
use crate::error::{Error, Result};
use crate::model::{SavedSshKey, UserId};
use chrono::Utc;
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

fn from_row(row: &AnyRow) -> Result<SavedSshKey> {
    Ok(SavedSshKey {
        id: parse_col(&row.try_get::<String, _>("id")?, "ssh_keys.id")?,
        name: row.try_get("name")?,
        public_key: row.try_get("public_key")?,
        fingerprint: row.try_get("fingerprint")?,
        created_at: from_micros(row.try_get("created_at")?),
    })
}

const COLUMNS: &str = "id, name, public_key, fingerprint, created_at";

impl Store {
    /// Saves a key under a name unique per user; 409 when the name is taken, 422 when the
    /// user already has `max_keys`. The user's row is locked first, so concurrent saves
    /// cannot all slip under the cap.
    pub async fn ssh_key_create(
        &self,
        user: UserId,
        name: &str,
        public_key: &str,
        fingerprint: &str,
        max_keys: i64,
    ) -> Result<SavedSshKey> {
        let rec = SavedSshKey {
            id: Uuid::now_v7(),
            name: name.to_owned(),
            public_key: public_key.to_owned(),
            fingerprint: fingerprint.to_owned(),
            created_at: Utc::now(),
        };
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE users SET updated_at = updated_at WHERE id = $1")
            .bind(user.to_string())
            .execute(&mut *tx)
            .await?;
        let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ssh_keys WHERE user_id = $1")
            .bind(user.to_string())
            .fetch_one(&mut *tx)
            .await?;
        if held >= max_keys {
            return Err(Error::Invalid(format!(
                "you already have {held} saved SSH keys, the most allowed is {max_keys}; \
                 delete one first"
            )));
        }
        let res = sqlx::query(
            "INSERT INTO ssh_keys (id, user_id, name, public_key, fingerprint, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(rec.id.to_string())
        .bind(user.to_string())
        .bind(name)
        .bind(public_key)
        .bind(fingerprint)
        .bind(to_micros(rec.created_at))
        .execute(&mut *tx)
        .await;
        match res {
            Err(e) if is_unique_violation(&e) => Err(Error::Conflict(format!(
                "you already have an SSH key named '{name}'"
            ))),
            Err(e) => Err(e.into()),
            Ok(_) => {
                tx.commit().await?;
                Ok(rec)
            }
        }
    }

    /// Up to `limit` of the user's keys in name order, after `after_name` when given.
    pub async fn ssh_key_list(
        &self,
        user: UserId,
        after_name: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SavedSshKey>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM ssh_keys WHERE user_id = $1 AND name > $2 \
             ORDER BY name LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(user.to_string())
            .bind(after_name.unwrap_or(""))
            .bind(limit)
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(from_row).collect()
    }

    pub async fn ssh_key_by_name(&self, user: UserId, name: &str) -> Result<Option<SavedSshKey>> {
        let sql = format!("SELECT {COLUMNS} FROM ssh_keys WHERE user_id = $1 AND name = $2");
        let row = sqlx::query(&sql)
            .bind(user.to_string())
            .bind(name)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Deletes one of the user's keys by id; false when it has no such key. Machines keep
    /// the keys they were created with.
    pub async fn ssh_key_delete(&self, user: UserId, id: Uuid) -> Result<bool> {
        let res = sqlx::query("DELETE FROM ssh_keys WHERE user_id = $1 AND id = $2")
            .bind(user.to_string())
            .bind(id.to_string())
            .execute(&self.write)
            .await?;
        Ok(res.rows_affected() == 1)
    }
}
