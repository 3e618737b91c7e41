//! Accounts: the `users` table.

use super::user_cache::{self, NoticeWait};
use super::{from_micros, is_unique_violation, parse_col, to_micros, Backend, Store};
use crate::error::{Error, Result};
use crate::model::{QuotaOverride, UserId};
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
    /// Set while an administrator has the account disabled.
    pub disabled_at: Option<DateTime<Utc>>,
    /// The limits an administrator gave this tenant.
    pub quota: QuotaOverride,
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

/// What an administrator changes on someone's account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountChange {
    /// Disabled: every session ends at once (the session version moves on and the refresh
    /// families are revoked), and logins are refused until it is enabled again.
    Disable,
    Enable,
    Role(Role),
    Quota(QuotaOverride),
}

/// Which accounts a listing holds.
#[derive(Debug, Default)]
pub struct AccountFilter<'a> {
    /// Part of the username or e-mail address, any case.
    pub search: Option<&'a str>,
    pub role: Option<Role>,
}

/// Changes to an account; `None` keeps the current value.
#[derive(Debug, Default)]
pub struct UserUpdate {
    pub email: Option<String>,
    pub password_hash: Option<String>,
}

const COLUMNS: &str = "id, username, email, password_hash, role, session_version, \
     disabled_at, max_machines, max_vcpus, max_memory_mib, created_at, updated_at";

fn from_row(row: &AnyRow) -> Result<UserRecord> {
    Ok(UserRecord {
        id: parse_col(&row.try_get::<String, _>("id")?, "users.id")?,
        username: row.try_get("username")?,
        email: row.try_get("email")?,
        password_hash: row.try_get("password_hash")?,
        role: parse_col(&row.try_get::<String, _>("role")?, "users.role")?,
        session_version: row.try_get("session_version")?,
        disabled_at: row
            .try_get::<Option<i64>, _>("disabled_at")?
            .map(from_micros),
        quota: QuotaOverride {
            max_machines: row.try_get("max_machines")?,
            max_vcpus: row.try_get("max_vcpus")?,
            max_memory_mib: row.try_get("max_memory_mib")?,
        },
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

/// The PostgreSQL advisory lock taken by changes that may remove an administrator
/// (0x53474144, "SGAD").
const ADMINS_LOCK: i64 = 0x5347_4144;

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

    /// One page of accounts in username order, after `after_username`.
    pub async fn user_list(
        &self,
        filter: &AccountFilter<'_>,
        after_username: Option<&str>,
        limit: i64,
    ) -> Result<Vec<UserRecord>> {
        let mut sql = format!("SELECT {COLUMNS} FROM users WHERE username > $1");
        if filter.search.is_some() {
            sql.push_str(" AND (username LIKE $2 ESCAPE '\\' OR LOWER(email) LIKE $2 ESCAPE '\\')");
        } else {
            // Keeps the parameters numbered alike: `$2` is always the pattern.
            sql.push_str(" AND $2 = $2");
        }
        if filter.role.is_some() {
            sql.push_str(" AND role = $3");
        } else {
            sql.push_str(" AND $3 = $3");
        }
        sql.push_str(" ORDER BY username LIMIT $4");
        let pattern = filter.search.map_or_else(String::new, like_pattern);
        let rows = sqlx::query(&sql)
            .bind(after_username.unwrap_or(""))
            .bind(pattern)
            .bind(filter.role.as_ref().map_or("", Role::as_str))
            .bind(limit)
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// Applies an administrator's change; `None` when there is no such account. Announced
    /// like every account write, so no replica keeps serving the old row (a disabled account's
    /// tokens are refused everywhere once this returns).
    pub async fn user_admin_change(
        &self,
        id: UserId,
        change: AccountChange,
    ) -> Result<Option<Arc<UserRecord>>> {
        let now = to_micros(Utc::now());
        let mut tx = self.begin_write().await?;
        let takes_power = matches!(
            change,
            AccountChange::Disable | AccountChange::Role(Role::User)
        );
        if takes_power && self.backend() == Backend::Postgres {
            // Changes that may remove an administrator take turns (SQLite's one writer does
            // this already), so two administrators demoting each other at once cannot both see
            // the other still there.
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(ADMINS_LOCK)
                .execute(&mut *tx)
                .await?;
        }
        let wait = self.announce_in_txn(&mut tx, id).await?;
        let updated = match change {
            AccountChange::Disable => {
                sqlx::query(
                    "UPDATE users SET disabled_at = COALESCE(disabled_at, $2), \
                     session_version = session_version + 1, updated_at = $2 WHERE id = $1",
                )
                .bind(id.to_string())
                .bind(now)
                .execute(&mut *tx)
                .await?
            }
            AccountChange::Enable => {
                sqlx::query("UPDATE users SET disabled_at = NULL, updated_at = $2 WHERE id = $1")
                    .bind(id.to_string())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
            }
            AccountChange::Role(role) => {
                sqlx::query("UPDATE users SET role = $3, updated_at = $2 WHERE id = $1")
                    .bind(id.to_string())
                    .bind(now)
                    .bind(role.as_str())
                    .execute(&mut *tx)
                    .await?
            }
            AccountChange::Quota(q) => {
                sqlx::query(
                    "UPDATE users SET max_machines = $3, max_vcpus = $4, max_memory_mib = $5, \
                     updated_at = $2 WHERE id = $1",
                )
                .bind(id.to_string())
                .bind(now)
                .bind(q.max_machines)
                .bind(q.max_vcpus)
                .bind(q.max_memory_mib)
                .execute(&mut *tx)
                .await?
            }
        };
        if updated.rows_affected() == 0 {
            return Ok(None);
        }
        if takes_power {
            let admins: i64 = sqlx::query(
                "SELECT COUNT(*) AS n FROM users WHERE role = 'admin' AND disabled_at IS NULL",
            )
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
            if admins == 0 {
                return Err(Error::Conflict(
                    "this is the last enabled administrator: make another one first".into(),
                ));
            }
        }
        if change == AccountChange::Disable {
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
        self.user_get(id).await
    }
}

/// A `LIKE` pattern matching `text` anywhere, its wildcards taken literally, in lower case
/// (usernames are lower case; e-mail addresses are compared lowered).
fn like_pattern(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len() + 2);
    pattern.push('%');
    for c in text.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

#[cfg(test)]
mod tests {
    use super::like_pattern;

    #[test]
    fn like_patterns_take_wildcards_literally() {
        assert_eq!(like_pattern("Ann"), "%ann%");
        assert_eq!(like_pattern("a_b%c\\d"), "%a\\_b\\%c\\\\d%");
    }
}
