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
    /// A per-user quota would be exceeded (403).
    #[error("{0}")]
    QuotaExceeded(String),
    /// An Idempotency-Key was reused with another request body (422).
    #[error("this Idempotency-Key was already used with a different request")]
    IdempotencyMismatch,
    /// A request with this Idempotency-Key has not finished yet (409).
    #[error("a request with this Idempotency-Key is still in progress")]
    IdempotencyInFlight,
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

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
