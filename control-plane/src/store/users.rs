//! Accounts: the `users` table.

use super::user_cache::{self, NoticeWait};
use super::{from_micros, is_unique_violation, parse_col, to_micros, Backend, Store};
use crate::error::{Error, Result};
use crate::model::UserId;
use auth::Role;
use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use std::sync::Arc;

/// A stored account. Never leaves the app layer as is: views drop the hash.
#[derive(Debug, Clone)]
pub struct UserRecord {
    pub id: UserId,
    pub username: String,
    pub email: String,
    pub password_hash: String,
    pub role: Role,
    /// Bumped when the password changes; access tokens carry it and die when it moves on.
    pub session_version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Fields of a new account.
#[derive(Debug)]
pub struct NewUser<'a> {
    pub username: &'a str,
    pub email: &'a str,
    pub password_hash: &'a str,
    pub role: Role,
}

/// Changes to an account; `None` keeps the current value.
#[derive(Debug, Default)]
pub struct UserUpdate {
    pub email: Option<String>,
    pub password_hash: Option<String>,
}

const COLUMNS: &str =
    "id, username, email, password_hash, role, session_version, created_at, updated_at";

fn from_row(row: &AnyRow) -> Result<UserRecord> {
    Ok(UserRecord {
        id: parse_col(&row.try_get::<String, _>("id")?, "users.id")?,
        username: row.try_get("username")?,
        email: row.try_get("email")?,
        password_hash: row.try_get("password_hash")?,
        role: parse_col(&row.try_get::<String, _>("role")?, "users.role")?,
        session_version: row.try_get("session_version")?,
        created_at: from_micros(row.try_get("created_at")?),
        updated_at: from_micros(row.try_get("updated_at")?),
    })
}

/// Which unique field a duplicate account collides on, for a precise 409.
async fn taken_field(store: &Store, username: &str, email: &str) -> Result<Error> {
    let row = sqlx::query("SELECT username FROM users WHERE username = $1 OR email = $2 LIMIT 1")
        .bind(username)
        .bind(email)
        .fetch_optional(store.reader())
        .await?;
    Ok(match row {
        Some(r) if r.try_get::<String, _>("username")? == username => {
            Error::Conflict(format!("username '{username}' is taken"))
        }
        _ => Error::Conflict("email is already registered".into()),
    })
}

impl Store {
    /// Creates an account; 409 when the username or email is taken.
    pub async fn user_create(&self, new: NewUser<'_>) -> Result<Arc<UserRecord>> {
        let now = Utc::now();
        let id = UserId::new();
        let res = sqlx::query(
            "INSERT INTO users (id, username, email, password_hash, role, session_version, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 0, $6, $6)",
        )
        .bind(id.to_string())
        .bind(new.username)
        .bind(new.email)
        .bind(new.password_hash)
        .bind(new.role.as_str())
        .bind(to_micros(now))
        .execute(&self.write)
        .await;
        match res {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(taken_field(self, new.username, new.email).await?)
            }
            Err(e) => return Err(e.into()),
        }
        self.user_get(id).await?.ok_or(Error::NotFound("user"))
    }

    /// One account, from the cache of rows this replica has read when it has it there.
    pub async fn user_get(&self, id: UserId) -> Result<Option<Arc<UserRecord>>> {
        if let Some(kept) = self.users.get(id) {
            return Ok(Some(kept));
        }
        let ticket = self.users.ticket();
        let sql = format!("SELECT {COLUMNS} FROM users WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.read)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let user = Arc::new(from_row(&row)?);
        self.users.keep(ticket, Arc::clone(&user));
        Ok(Some(user))
    }

    /// Announces inside `tx` that account `id` changes (PostgreSQL: to every replica's cache).
    async fn announce_in_txn(
        &self,
        tx: &mut Transaction<'static, Any>,
        id: UserId,
    ) -> Result<Option<NoticeWait>> {
        if self.backend != Backend::Postgres {
            return Ok(None);
        }
        let (notice, wait) = self.users.expect_notice();
        // The listeners that will hear it: those connected now (one that connects later reads
        // the row after this commits, or never kept it).
        let listeners: Option<String> = sqlx::query_scalar(
            "SELECT (SELECT string_agg(pid::text, ' ') FROM pg_stat_activity \
             WHERE application_name = $3 AND datname = current_database()) AS listeners \
             FROM (SELECT pg_notify($1, $2)) AS n",
        )
        .bind(user_cache::CHANNEL)
        .bind(format!("{id} {notice}"))
        .bind(user_cache::LISTENER_NAME)
        .fetch_one(&mut **tx)
        .await?;
        wait.expect_from(listeners.as_deref());
        Ok(Some(wait))
    }

    /// After the announcing transaction committed: forget the row here, and (PostgreSQL) wait
    /// until every replica's listener has confirmed it dropped the row.
    async fn announced(&self, id: UserId, wait: Option<NoticeWait>) {
        self.users.drop_row(id);
        if let Some(wait) = wait {
            wait.done().await;
        }
    }

    /// An account by its username, kept like [`Store::user_get`]'s: a login reads it, and a
    /// round trip less per login is CPU left to password hashing (issue 12).
    pub async fn user_by_username(&self, username: &str) -> Result<Option<Arc<UserRecord>>> {
        if let Some(kept) = self.users.get_by_name(username) {
            return Ok(Some(kept));
        }
        let ticket = self.users.ticket();
        let sql = format!("SELECT {COLUMNS} FROM users WHERE username = $1");
        let row = sqlx::query(&sql)
            .bind(username)
            .fetch_optional(&self.read)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let user = Arc::new(from_row(&row)?);
        self.users.keep(ticket, Arc::clone(&user));
        Ok(Some(user))
    }

    /// Replaces the password hash without touching sessions (transparent rehash at login),
    /// unless the hash changed meanwhile: a concurrent password change wins.
    pub async fn user_rehash_password(
        &self,
        id: UserId,
        old_hash: &str,
        new_hash: &str,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2 AND password_hash = $3")
            .bind(new_hash)
            .bind(id.to_string())
            .bind(old_hash)
            .execute(&mut *tx)
            .await?;
        let wait = self.announce_in_txn(&mut tx, id).await?;
        tx.commit().await?;
        self.announced(id, wait).await;
        Ok(())
    }

    /// Applies a profile change. A new password also bumps the session version and revokes
    /// every refresh-token family, in the same transaction, so no old session survives it.
    pub async fn user_update(&self, id: UserId, update: UserUpdate) -> Result<Arc<UserRecord>> {
        let now = to_micros(Utc::now());
        let mut tx = self.begin_write().await?;
        let wait = self.announce_in_txn(&mut tx, id).await?;
        if let Some(email) = &update.email {
            let res = sqlx::query("UPDATE users SET email = $1, updated_at = $2 WHERE id = $3")
                .bind(email)
                .bind(now)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await;
            match res {
                Err(e) if is_unique_violation(&e) => {
                    return Err(Error::Conflict("email is already registered".into()))
                }
                other => {
                    other?;
                }
            }
        }
        if let Some(hash) = &update.password_hash {
            sqlx::query(
                "UPDATE users SET password_hash = $1, session_version = session_version + 1, \
                 updated_at = $2 WHERE id = $3",
            )
            .bind(hash)
            .bind(now)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE refresh_tokens SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL",
            )
            .bind(now)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.announced(id, wait).await;
        self.user_get(id).await?.ok_or(Error::NotFound("user"))
    }
}
