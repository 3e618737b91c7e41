//! Use-cases: what the API may ask of SkyGate. Handlers translate HTTP to calls here; the
//! decisions (validation, authorisation, rate limits, quotas) are made here; SQL is in `store`.

pub mod audit;
pub mod cursor;
pub mod event_stream;
pub mod hosts;
pub mod idempotency;
pub mod images;
pub mod long_requests;
pub mod machines;
pub mod password_work;
pub mod sessions;
pub mod ssh_keys;
pub mod tokens;
pub mod users;

use crate::error::{Error, Result};
use crate::model::{MachineStatus, Quota, UserId};
use crate::store::Store;
use auth::token::AccessTokenIssuer;
use auth::Role;
use chrono::Duration;
use governor::{DefaultKeyedRateLimiter, Quota as RateQuota, RateLimiter};
use std::collections::HashMap;
use std::error::Error as _;
use std::net::IpAddr;
use std::num::NonZeroU32;

/// Bounds on one machine's size; requests outside them are 422.
#[derive(Debug, Clone, Copy)]
pub struct MachineLimits {
    pub max_vcpus: i64,
    pub min_memory_mib: i64,
    pub max_memory_mib: i64,
    pub max_disk_gib: i64,
}

impl Default for MachineLimits {
    fn default() -> Self {
        Self {
            max_vcpus: 32,
            min_memory_mib: 64,
            max_memory_mib: 256 * 1024,
            max_disk_gib: 2048,
        }
    }
}

/// Login throttling: per client address in memory, per account and client in the database
/// (`sessions::login_throttle` says how they combine).
#[derive(Debug, Clone, Copy)]
pub struct LoginLimits {
    /// Login attempts one client address may make per minute (a burst of that size).
    pub per_ip_per_minute: u32,
    /// Attempts one client may make on one account within `failure_window` before that
    /// client is paused on that account.
    pub max_failures: i64,
    /// Attempts an account takes from all clients within the window before clients that
    /// already tried it are paused.
    pub account_budget: i64,
    pub failure_window: Duration,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            per_ip_per_minute: 30,
            max_failures: 10,
            account_budget: 100,
            failure_window: Duration::minutes(15),
        }
    }
}

/// Tunables of the use-cases, set from flags.
#[derive(Debug, Clone, Copy, Default)]
pub struct Settings {
    pub machine_limits: MachineLimits,
    pub quota: Quota,
    pub login: LoginLimits,
    pub password_work: password_work::PasswordWorkSettings,
    /// How long audit events are kept.
    pub audit_retention: AuditRetention,
}

/// How long audit events are kept (`--audit-retention-days`).
#[derive(Debug, Clone, Copy)]
pub struct AuditRetention(pub Duration);

impl Default for AuditRetention {
    fn default() -> Self {
        Self(Duration::days(90))
    }
}

/// `iss` and `aud` of SkyGate access tokens.
pub const TOKEN_ISSUER: &str = "skygate-control-plane";
pub const TOKEN_AUDIENCE: &str = "skygate-api";

/// How long an Idempotency-Key is remembered, and how long a claim waits for its holder.
pub const IDEMPOTENCY_RETENTION: Duration = Duration::hours(24);
pub const IDEMPOTENCY_LOCK: Duration = Duration::seconds(60);

/// Who is calling: the authenticated user behind an access token or an API token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    pub user_id: UserId,
    pub role: Role,
    /// How the caller proved it: a session (an access token from a login) or an API token.
    pub credential: Credential,
}

/// What authenticated a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// An access token from a login (or a refresh).
    Session,
    /// An API token of this scope.
    ApiToken(skygate_api_types::TokenScope),
}

impl Principal {
    /// 403 unless the caller logged in: changing the password and minting API tokens need a
    /// session, so a leaked API token cannot take the account over or outlive its revocation.
    pub fn require_session(&self, what: &'static str) -> Result<()> {
        match self.credential {
            Credential::Session => Ok(()),
            Credential::ApiToken(_) => Err(Error::Forbidden(what)),
        }
    }

    /// 403 when a read-only API token asks for anything but a read.
    pub fn require_scope_for(&self, method: &axum::http::Method) -> Result<()> {
        use axum::http::Method;
        let read = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        match self.credential {
            Credential::ApiToken(skygate_api_types::TokenScope::Read) if !read => Err(
                Error::Forbidden("this API token is read-only: it may only read (GET)"),
            ),
            _ => Ok(()),
        }
    }

    /// 403 unless the caller is an administrator.
    pub fn require_admin(&self) -> Result<()> {
        match self.role {
            Role::Admin => Ok(()),
            Role::User => Err(Error::Forbidden("this needs the admin role")),
        }
    }
}

/// The application: the store, the token machinery and the settings, shared by all requests.
pub struct App {
    pub store: Store,
    pub tokens: AccessTokenIssuer,
    pub settings: Settings,
    pub cursors: cursor::CursorCodec,
    /// Password attempts (login, register, password checks) per client address.
    /// Keyed by `sessions::client_key` (an IPv6 client by its /64).
    credentials_per_ip: DefaultKeyedRateLimiter<String>,
    /// Where argon2 runs: fixed threads with fixed memory, refusing work beyond their queue.
    password_workers: password_work::PasswordWorkers,
    /// Clients for host agents (reading consoles); absent without an agent token.
    pub agents: Option<std::sync::Arc<crate::agents::AgentClients>>,
    /// The reconciler's last pass, as it reports it (none without provisioning).
    pub reconciler: std::sync::Arc<crate::reconciler::ReconcilerStatus>,
    /// Where requests leave their audit events.
    pub audit: audit::AuditLog,
    /// When this replica last recorded each API token's use.
    token_use: tokens::TokenUse,
    /// The usage profiles show, each kept a second.
    shown_usage: users::ShownUsage,
    /// Waits and event streams each account holds open here.
    long_requests: std::sync::Arc<long_requests::LongRequests>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("store", &self.store)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// One page of a keyset-paginated list, and whether more follow it.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub more: bool,
}

impl<T> Page<T> {
    /// A page from `limit + 1` rows read: the extra row only says that more follow.
    pub fn from_overfetch(mut rows: Vec<T>, limit: i64) -> Self {
        let limit = usize::try_from(limit).unwrap_or(0);
        let more = rows.len() > limit;
        rows.truncate(limit);
        Self { items: rows, more }
    }
}

/// How long finished tasks stay for diagnostics before housekeeping removes them.
const TASK_RETENTION: Duration = Duration::days(7);

impl App {
    /// `secret` is the server secret the access tokens are signed with; cursors derive theirs.
    pub fn new(store: Store, secret: &[u8], settings: Settings) -> Result<Self> {
        let tokens = AccessTokenIssuer::new(secret, TOKEN_ISSUER, TOKEN_AUDIENCE)?;
        tokens.self_test()?;
        let per_minute =
            NonZeroU32::new(settings.login.per_ip_per_minute).unwrap_or(NonZeroU32::MIN);
        Ok(Self {
            store,
            tokens,
            settings,
            cursors: cursor::CursorCodec::new(secret),
            credentials_per_ip: RateLimiter::keyed(RateQuota::per_minute(per_minute)),
            password_workers: password_work::PasswordWorkers::start(settings.password_work)
                .map_err(|e| Error::Internal(format!("{e}: {:?}", e.source())))?,
            agents: None,
            reconciler: Default::default(),
            audit: audit::AuditLog::default(),
            token_use: tokens::TokenUse::default(),
            shown_usage: users::ShownUsage::default(),
            long_requests: std::sync::Arc::default(),
        })
    }

    /// Lets the API reach agents (the console) through `agents`.
    pub fn with_agents(mut self, agents: std::sync::Arc<crate::agents::AgentClients>) -> Self {
        self.agents = Some(agents);
        self
    }

    /// 429 when `client` has made too many password attempts lately.
    pub fn throttle_credentials(&self, client: IpAddr) -> Result<()> {
        self.credentials_per_ip
            .check_key(&sessions::client_key(client))
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ));
                Error::RateLimited {
                    retry_after_secs: wait.as_secs().max(1),
                }
            })
    }

    /// Runs argon2 work on the password workers. When they are saturated the request is
    /// refused at once (503 with Retry-After) rather than queued for seconds.
    pub(crate) async fn argon2<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut auth::password::HashMemory) -> T + Send + 'static,
    {
        self.password_workers.run(work).await.map_err(|e| match e {
            password_work::PasswordWorkError::Busy => {
                metrics::counter!("skygate_password_work_refused_total").increment(1);
                Error::Unavailable("too many sign-ins in progress; retry shortly")
            }
            other => Error::Internal(other.to_string()),
        })
    }

    /// Periodic housekeeping: expired idempotency keys, login windows, refresh tokens,
    /// finished tasks, and audit events past their retention.
    pub async fn purge_expired(&self) -> Result<u64> {
        // The database's clock, as the windows were opened by it.
        let now = self.store.clock().await?;
        let a = self
            .store
            .idempotency_purge(now, IDEMPOTENCY_RETENTION)
            .await?;
        let b = self
            .store
            .sessions_purge_expired(now, self.settings.login.failure_window)
            .await?;
        let c = self.store.task_purge_finished(now - TASK_RETENTION).await?;
        let d = self
            .store
            .audit_purge(now - self.settings.audit_retention.0)
            .await?;
        let e = self.store.label_rows_purge_deleted().await?;
        let f = self.store.api_token_purge_expired(now).await?;
        self.credentials_per_ip.retain_recent();
        Ok(a + b + c + d + e + f)
    }
}

/// What the operations endpoints read.
impl App {
    /// Ready to serve: the database answers.
    pub async fn ready(&self) -> Result<()> {
        self.store.ping().await
    }

    /// Live machines per status (every status present), for `/metrics`.
    pub async fn machine_counts(&self) -> Result<HashMap<MachineStatus, i64>> {
        let mut counts = self.store.machine_count_by_status().await?;
        for status in MachineStatus::ALL {
            counts.entry(status).or_insert(0);
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::Page;

    #[test]
    fn an_overfetched_row_only_says_more_follow() {
        let page = Page::from_overfetch(vec![1, 2, 3], 2);
        assert_eq!((page.items, page.more), (vec![1, 2], true));
        let last = Page::from_overfetch(vec![1, 2], 2);
        assert_eq!((last.items, last.more), (vec![1, 2], false));
        assert!(Page::from_overfetch(vec![1], 0).items.is_empty());
    }
}
