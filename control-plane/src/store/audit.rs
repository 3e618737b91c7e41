//! The audit log: the `audit_events` table, appended to in batches, read a page at a time,
//! and trimmed to the retention.

use super::{from_micros, parse_col, placeholders, to_micros, Store};
use crate::error::Result;
use crate::model::UserId;
use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::Row;

/// One audited call: who, what, on what, with which outcome, from where, when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub at: DateTime<Utc>,
    /// The authenticated caller, when there was one.
    pub actor_id: Option<UserId>,
    /// The username a login or registration named (no token yet).
    pub actor_name: Option<String>,
    /// `METHOD /route/{template}`.
    pub action: String,
    /// The path (and query) called: which resource.
    pub target: String,
    /// The HTTP status answered.
    pub outcome: u16,
    pub request_id: String,
    pub client: String,
}

/// A stored event with its place in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: i64,
    pub event: AuditEvent,
}

/// Whose events a listing holds.
#[derive(Debug, Clone, Copy)]
pub enum AuditScope<'a> {
    All,
    /// What an account did, and what was tried in its name (logins).
    Account {
        id: UserId,
        username: &'a str,
    },
}

const COLUMNS: usize = 8;

/// Rows per INSERT: eight parameters each, well inside both back ends' limits.
const ROWS_PER_INSERT: usize = 256;

fn from_row(row: &AnyRow) -> Result<AuditRecord> {
    Ok(AuditRecord {
        seq: row.try_get("seq")?,
        event: AuditEvent {
            at: from_micros(row.try_get("at")?),
            actor_id: row
                .try_get::<Option<String>, _>("actor_id")?
                .map(|id| parse_col(&id, "audit_events.actor_id"))
                .transpose()?,
            actor_name: row.try_get("actor_name")?,
            action: row.try_get("action")?,
            target: row.try_get("target")?,
            outcome: u16::try_from(row.try_get::<i64, _>("outcome")?).unwrap_or(0),
            request_id: row.try_get("request_id")?,
            client: row.try_get("client")?,
        },
    })
}

impl Store {
    /// Appends `events`, in order, a few hundred rows per statement.
    pub async fn audit_append(&self, events: &[AuditEvent]) -> Result<()> {
        for chunk in events.chunks(ROWS_PER_INSERT) {
            let rows: Vec<String> = (0..chunk.len())
                .map(|r| placeholders(1 + r * COLUMNS, COLUMNS))
                .collect();
            let sql = format!(
                "INSERT INTO audit_events (at, actor_id, actor_name, action, target, outcome, \
                 request_id, client) VALUES {}",
                rows.join(", ")
            );
            let mut query = sqlx::query(&sql);
            for e in chunk {
                query = query
                    .bind(to_micros(e.at))
                    .bind(e.actor_id.map(|id| id.to_string()))
                    .bind(e.actor_name.clone())
                    .bind(e.action.clone())
                    .bind(e.target.clone())
                    .bind(i64::from(e.outcome))
                    .bind(e.request_id.clone())
                    .bind(e.client.clone());
            }
            query.execute(&self.write).await?;
        }
        Ok(())
    }

    /// Newest first, strictly older than `before_seq` when given, at most `limit`.
    pub async fn audit_list(
        &self,
        scope: AuditScope<'_>,
        before_seq: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditRecord>> {
        let select = "SELECT seq, at, actor_id, actor_name, action, target, outcome, \
                      request_id, client FROM audit_events";
        let before = before_seq.unwrap_or(i64::MAX);
        let rows = match scope {
            AuditScope::All => {
                sqlx::query(&format!(
                    "{select} WHERE seq < $1 ORDER BY seq DESC LIMIT $2"
                ))
                .bind(before)
                .bind(limit)
                .fetch_all(self.reader())
                .await?
            }
            // Two index ranges merged: the account's calls, and what was tried in its name.
            AuditScope::Account { id, username } => {
                sqlx::query(&format!(
                    "SELECT * FROM ( \
                     SELECT * FROM ({select} WHERE actor_id = $1 AND seq < $3 \
                       ORDER BY seq DESC LIMIT $4) mine \
                     UNION ALL \
                     SELECT * FROM ({select} WHERE actor_name = $2 AND actor_id IS NULL \
                       AND seq < $3 ORDER BY seq DESC LIMIT $4) named \
                     ) page ORDER BY seq DESC LIMIT $4"
                ))
                .bind(id.to_string())
                .bind(username)
                .bind(before)
                .bind(limit)
                .fetch_all(self.reader())
                .await?
            }
        };
        rows.iter().map(from_row).collect()
    }

    /// Removes events older than `before`; how many.
    pub async fn audit_purge(&self, before: DateTime<Utc>) -> Result<u64> {
        let res = sqlx::query("DELETE FROM audit_events WHERE at < $1")
            .bind(to_micros(before))
            .execute(&self.write)
            .await?;
        Ok(res.rows_affected())
    }
}
