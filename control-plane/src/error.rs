//! The control plane's one error type. Transport-neutral: `api::problem` maps it to HTTP in
//! one place. Messages are what a tenant may read; internal causes go to logs only.

use crate::model::MachineId;

/// Everything a use-case can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The resource does not exist, or the caller may not know that it does.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// Well-formed input that breaks a rule (422).
    #[error("{0}")]
    Invalid(String),
    /// Input we cannot make sense of at all, such as a tampered cursor (400).
    #[error("{0}")]
    BadRequest(String),
    /// The request conflicts with the resource's current state (409).
    #[error("{0}")]
    Conflict(String),
    /// The tenant already has a live machine with this hostname (409, names it).
    #[error("a machine named '{hostname}' already exists ({existing})")]
    HostnameTaken {
        hostname: String,
        existing: MachineId,
    },
    /// No valid credentials were presented (401).
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// Wrong username or password; deliberately says nothing about which (401).
    #[error("invalid username or password")]
    BadCredentials,
    /// Authenticated, but not allowed (403).
    #[error("{0}")]
    Forbidden(&'static str),
    /// Too many attempts; try again after the given number of seconds (429).
    #[error("too many attempts, retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    /// The account holds as many long requests (waits, event streams) open as it may (429).
    #[error("{0}")]
    TooManyOpen(String),
    /// A per-user quota would be exceeded (403).
    #[error("{0}")]
    QuotaExceeded(String),
    /// An Idempotency-Key was reused with another request body (422).
    #[error("this Idempotency-Key was already used with a different request")]
    IdempotencyMismatch,
    /// A request with this Idempotency-Key has not finished yet (409).
    #[error("a request with this Idempotency-Key is still in progress")]
    IdempotencyInFlight,
    /// A wait's timeout passed before the machine got there (408).
    #[error("{0}")]
    WaitTimedOut(String),
    /// A dependency is down; try again later (503).
    #[error("{0}")]
    Unavailable(&'static str),
    /// The database failed; the cause is logged, never shown.
    #[error("database error")]
    Store(#[from] sqlx::Error),
    /// A migration failed at start-up.
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Credential machinery failed (bad policy input is mapped to `Invalid` before this).
    #[error("authentication error")]
    Auth(#[source] auth::AuthError),
    /// A bug or an impossible state; the cause is logged, never shown.
    #[error("internal error")]
    Internal(String),
}

impl From<auth::AuthError> for Error {
    fn from(e: auth::AuthError) -> Self {
        use auth::AuthError as A;
        match e {
            A::PasswordTooShort { .. } | A::PasswordTooLong { .. } | A::PasswordTooCommon => {
                Error::Invalid(e.to_string())
            }
            A::InvalidToken(_) => Error::Unauthenticated("invalid or expired access token"),
            other => Error::Auth(other),
        }
    }
}

impl Error {
    /// Whether this is the database being out of reach (down, restarting, refusing
    /// connections, out of connections, locked) rather than a fault in a statement: the
    /// client should retry, so it is answered 503 with Retry-After, never 500.
    pub fn is_store_unavailable(&self) -> bool {
        let Error::Store(e) = self else { return false };
        match e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|code| unavailable_code(&code)),
            _ => false,
        }
    }
}

/// SQLSTATEs (PostgreSQL) and result codes (SQLite) that mean "not now" rather than "wrong":
/// PostgreSQL's connection exceptions (class 08), shutdown and start-up (57P01–57P03), too many
/// connections (53300), serialization failures and deadlocks (40001, 40P01: a retry succeeds);
/// SQLite's BUSY (5) and LOCKED (6) with their extended codes, listed one by one, since
/// SQLSTATEs are numbers too (42501 is a refused privilege, a fault to report, not to retry).
fn unavailable_code(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01"
        )
        || matches!(code, "5" | "261" | "517" | "773" | "6" | "262" | "518")
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outage_codes_are_told_from_faults() {
        for code in [
            "08006", "08001", "57P01", "57P03", "53300", "40001", "40P01", "5", "517", "6", "262",
        ] {
            assert!(unavailable_code(code), "{code}");
        }
        for code in [
            "23505", "42P01", "42501", "22021", "22022", "19", "2067", "1", "787",
        ] {
            assert!(!unavailable_code(code), "{code}");
        }
        assert!(Error::Store(sqlx::Error::PoolTimedOut).is_store_unavailable());
        assert!(Error::Store(sqlx::Error::Io(
            std::io::ErrorKind::ConnectionRefused.into()
        ))
        .is_store_unavailable());
        assert!(!Error::Store(sqlx::Error::RowNotFound).is_store_unavailable());
        assert!(!Error::Internal("x".into()).is_store_unavailable());
    }
}
