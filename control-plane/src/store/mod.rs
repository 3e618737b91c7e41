//! The only place with SQL. One store over two back ends: SQLite (embedded default) and
//! PostgreSQL (several control-plane replicas).
//!
//! Both back ends run the same statements through sqlx's `Any` driver: the schema keeps to
//! the common subset (UUIDs as text, times as Unix microseconds, `$n` placeholders, which
//! SQLite also understands), and each back end has its own migration files beside this module.
//! The price is that PostgreSQL columns are plainer than they could be; the gain is one
//! implementation and one test suite instead of two that drift apart.

pub mod api_tokens;
pub mod audit;
pub mod forget;
pub mod hosts;
pub mod idempotency;
pub mod images;
mod machine_create;
pub mod machine_events;
pub mod machine_move;
pub mod machine_reshape;
pub mod machine_watch;
pub mod machines;
pub mod placement;
pub mod restarts;
pub mod sessions;
pub mod ssh_keys;
pub mod tasks;
pub mod usage;
mod user_cache;
pub mod users;

use crate::error::{Error, Result};
use chrono::{DateTime, TimeZone, Utc};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyPool, Executor, Transaction};
use std::str::FromStr;
use std::time::Duration;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("src/store/migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator =
    sqlx::migrate!("src/store/migrations/postgres");

/// How long a statement waits for a connection before the request is answered 503: long
/// enough for a burst to drain, short enough that a client of an unreachable database hears
/// so in seconds.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// A PostgreSQL connection idle longer than this is pinged before it is handed out (see
/// `Store::connect`).
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Which database the store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    /// Reads. On SQLite (WAL) readers never block the writer.
    read: AnyPool,
    /// Writes. On SQLite this pool has one connection: SQLite allows one writer at a time, and
    /// queueing here is kinder than `SQLITE_BUSY`. On PostgreSQL it is the same pool as `read`.
    write: AnyPool,
    backend: Backend,
    /// Account rows kept between requests (see `user_cache`).
    users: std::sync::Arc<user_cache::UserCache>,
    /// Creates waiting to be written together (see `machine_create`).
    creates: machine_create::CreateQueue,
    /// Who waits on which machine (see `machine_watch`).
    pub watch: std::sync::Arc<machine_watch::MachineWatch>,
}

impl Store {
    /// Connects to `url` (`sqlite://PATH` or `postgres://...`), creating a SQLite file if absent.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(Error::Invalid(
                "database URL must start with sqlite:// or postgres://".into(),
            ));
        };
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_owned(),
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let pool = |max: u32| {
            AnyPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                // sqlx pings every connection it hands out by default: a round trip to the
                // connection's thread (SQLite) or to the server (PostgreSQL) before every
                // statement, a fifth of the CPU of `GET /machines` and two of a login's
                // dozen round trips (issue 12). A SQLite connection is a thread in this process
                // and cannot be lost; a PostgreSQL connection in steady use is known alive
                // (a statement failing on a broken one closes it). Only one idle for a while
                // (the server may have restarted meanwhile) is pinged.
                .test_before_acquire(false)
                .before_acquire(move |conn, meta| {
                    Box::pin(async move {
                        if backend == Backend::Postgres && meta.idle_for > PING_IF_IDLE_FOR {
                            sqlx::Connection::ping(conn).await?;
                        }
                        Ok(true)
                    })
                })
                .after_connect(move |conn, _meta| {
                    Box::pin(async move {
                        if backend == Backend::Postgres {
                            // One plan per statement, made once per connection. Left to choose,
                            // PostgreSQL re-planned the machine list on every execution (its
                            // generic plan looked dearer than the custom ones), and planning
                            // cost more than running it: 6,500 lists/s, 11,400 with this
                            // (issue 12). Statements are written so that their plan does
                            // not depend on the values bound (key ranges, exact lookups); the
                            // optional bounds (`$n IS NULL OR ...`) of small per-machine reads
                            // such as events are filters on an index lookup either way.
                            conn.execute("SET plan_cache_mode = force_generic_plan")
                                .await?;
                        }
                        if backend == Backend::Sqlite {
                            // Foreign keys are off by default in SQLite; WAL lets reads run
                            // beside the writer; busy_timeout covers other processes (admin CLI).
                            conn.execute(
                                "PRAGMA foreign_keys = ON; PRAGMA journal_mode = WAL; \
                                 PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;",
                            )
                            .await?;
                        }
                        Ok(())
                    })
                })
                .connect_with(options.clone())
        };
        let (read, write) = match backend {
            Backend::Sqlite => {
                // The writer connects first so that it creates the file and switches to WAL.
                let write = pool(1).await?;
                (pool(max_connections).await?, write)
            }
            Backend::Postgres => {
                let p = pool(max_connections).await?;
                (p.clone(), p)
            }
        };
        let users = match backend {
            Backend::Sqlite => user_cache::UserCache::local(),
            Backend::Postgres => user_cache::listening(&url).await?,
        };
        let creates = machine_create::CreateQueue::start(write.clone(), backend);
        let watch = std::sync::Arc::new(machine_watch::MachineWatch::default());
        if backend == Backend::Postgres {
            watch.listening(&url).await?;
        }
        Ok(Self {
            read,
            write,
            backend,
            users,
            creates,
            watch,
        })
    }

    /// After a commit that changed machine `id`: wakes its waiters here (SQLite; on PostgreSQL
    /// the event's `NOTIFY` reaches every replica's listener, this one's included).
    pub(crate) fn machine_changed(&self, id: crate::model::MachineId) {
        if self.backend == Backend::Sqlite {
            self.watch.changed(id);
        }
    }

    /// Applies the back end's pending migrations.
    pub async fn migrate(&self) -> Result<()> {
        let migrator = match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator.run(&self.write).await?;
        Ok(())
    }

    /// Whether the database answers (for `/readyz`).
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes both pools (tests, shutdown).
    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }

    /// Starts a write transaction. On SQLite it takes the write lock up front (`IMMEDIATE`) so
    /// a read-then-write never fails half-way with `SQLITE_BUSY`.
    pub(crate) async fn begin_write(&self) -> Result<Transaction<'static, Any>> {
        begin_write_on(&self.write, self.backend).await
    }

    pub(crate) fn reader(&self) -> &AnyPool {
        &self.read
    }
}

/// [`Store::begin_write`] on the write pool `pool` (for the create writer, which holds the
/// pool rather than the store).
///
/// The BEGIN runs on a task of its own, which finishes it whatever happens to the caller.
/// sqlx's begin is not cancel-safe (transact-rs/sqlx#4393 on PostgreSQL; on SQLite a custom
/// BEGIN behaves alike): a caller dropped mid-BEGIN returns the connection to the pool inside
/// a transaction nothing will end, and every later BEGIN on it fails
/// (`InvalidSavePointStatement`). Callers are dropped mid-step by design (a worker that lost
/// its lease abandons its step), and SQLite has one writer connection: a fleet storm in the
/// test suite poisoned it and every write of the control plane failed from then on. Once
/// the task holds a `Transaction`, dropping it rolls back as sqlx intends.
pub(crate) async fn begin_write_on(
    pool: &AnyPool,
    backend: Backend,
) -> Result<Transaction<'static, Any>> {
    let pool = pool.clone();
    let begun = tokio::spawn(async move {
        match backend {
            Backend::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => pool.begin().await,
        }
    })
    .await
    .map_err(|e| Error::Internal(format!("the task beginning a transaction failed: {e}")))?;
    Ok(begun?)
}

/// Now, as stored: Unix microseconds.
pub(crate) fn to_micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// A stored time back as a `DateTime`; out-of-range values (never written by us) clamp.
pub(crate) fn from_micros(us: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(us).single().unwrap_or_default()
}

/// Whether `e` is a unique-constraint violation (on either back end).
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Parses a stored text column into a domain type; a bad value is corruption, not user error.
pub(crate) fn parse_col<T: FromStr>(value: &str, column: &str) -> Result<T> {
    value
        .parse()
        .map_err(|_| Error::Internal(format!("bad value in column {column}: {value:?}")))
}

/// `$first, $first+1, ...` for `n` parameters, in parentheses: one row of a multi-row INSERT.
pub(crate) fn placeholders(first: usize, n: usize) -> String {
    let list: Vec<String> = (first..first + n).map(|p| format!("${p}")).collect();
    format!("({})", list.join(", "))
}

#[cfg(test)]
mod placeholder_tests {
    use super::placeholders;

    #[test]
    fn placeholders_number_from_the_first() {
        assert_eq!(placeholders(3, 2), "($3, $4)");
        assert_eq!(placeholders(1, 1), "($1)");
    }
}
