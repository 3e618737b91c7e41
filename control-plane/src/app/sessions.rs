//! Accounts and sessions: register, log in (with throttling), refresh, log out, profile, and
//! turning a bearer token into a `Principal`.

use super::{App, Principal};
use crate::error::{Error, Result};
use crate::model::UserId;
use crate::store::sessions::{Family, RefreshOutcome};
use crate::store::users::{NewUser, UserRecord, UserUpdate};
use auth::password::{self, PasswordCheck};
use auth::refresh::{hash_refresh_token, RefreshToken};
use auth::Role;
use chrono::Utc;
use std::net::IpAddr;
use std::sync::Arc;
use uuid::Uuid;

/// An account as its owner sees it: never its password hash or session version.
#[derive(Debug, Clone)]
pub struct Account {
    pub id: UserId,
    pub username: String,
    pub email: String,
    pub role: Role,
    /// Set while an administrator has the account disabled.
    pub disabled_at: Option<chrono::DateTime<Utc>>,
    pub created_at: chrono::DateTime<Utc>,
}

impl From<&UserRecord> for Account {
    fn from(u: &UserRecord) -> Self {
        Self {
            id: u.id,
            username: u.username.clone(),
            email: u.email.clone(),
            role: u.role,
            disabled_at: u.disabled_at,
            created_at: u.created_at,
        }
    }
}

/// What a successful login or refresh hands out.
#[derive(Debug)]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: i64,
}

/// Profile changes; a new password or e-mail needs the current password.
#[derive(Debug, Default)]
pub struct ProfileChange {
    pub email: Option<String>,
    pub password: Option<String>,
    pub current_password: String,
}

/// Usernames: 3–32 of `[a-z0-9_.-]`.
pub fn validate_username(username: &str) -> Result<()> {
    let ok_len = (3..=32).contains(&username.len());
    let ok_chars = username
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'));
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err(Error::Invalid(
            "username must be 3 to 32 characters of a-z, 0-9, '_', '.' and '-'".into(),
        ))
    }
}

/// E-mail addresses: a deliberately plain check (one '@', a dotted domain, no spaces, at most
/// 254 characters). Whether the mailbox exists is for a confirmation mail to find out.
pub fn validate_email(email: &str) -> Result<()> {
    let invalid = || Error::Invalid("email must be a valid address such as ann@example.com".into());
    if email.len() > 254 || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid());
    }
    let (local, domain) = email.split_once('@').ok_or_else(invalid)?;
    let labels_ok = domain.split('.').count() >= 2
        && domain
            .split('.')
            .all(|l| !l.is_empty() && !l.starts_with('-') && !l.ends_with('-'));
    if local.is_empty() || local.len() > 64 || domain.contains('@') || !labels_ok {
        return Err(invalid());
    }
    Ok(())
}

/// The key failed logins are counted under for a client: its IPv4 address, or the /64 of an
/// IPv6 address (one machine commonly holds a whole /64, so counting single addresses would
/// let it guess without limit).
pub fn client_key(client: IpAddr) -> String {
    match client {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                let prefix = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{prefix}/64")
            }
        },
    }
}

/// Whether a login attempt may be checked, given the counts that include it; `Some(seconds)`
/// to wait when not.
///
/// Guessing is slowed without letting a stranger lock the owner out (issue 10):
/// - one client may make `max_failures` attempts on one account per window, then waits for the
///   window to end — only that client waits;
/// - over every client, an account takes `account_budget` attempts per window; past that, a
///   client that has already tried this account in its window waits too, so a crowd of
///   addresses gets one guess each, while a client new to the account (the owner at a new
///   place) is still checked.
///
/// The cost, written down: an owner who mistypes while their account is over its budget waits
/// for their window (or signs in from another address).
pub fn login_throttle(
    limits: &super::LoginLimits,
    attempts: &crate::store::sessions::LoginAttempts,
    now: chrono::DateTime<Utc>,
) -> Option<u64> {
    let over_pair = attempts.from_client > limits.max_failures;
    let over_budget = attempts.account > limits.account_budget && attempts.from_client > 1;
    (over_pair || over_budget).then(|| {
        let window_end = attempts.window_start + limits.failure_window;
        u64::try_from((window_end - now).num_seconds())
            .unwrap_or(0)
            .max(1)
    })
}

impl App {
    /// Creates an account with the given role (tenants register as users; the admin CLI
    /// creates administrators).
    pub async fn register(
        &self,
        username: &str,
        email: &str,
        password: &str,
        role: Role,
    ) -> Result<Account> {
        validate_username(username)?;
        validate_email(email)?;
        password::check_policy(password)?;
        let password = password.to_owned();
        let hash = self
            .argon2(move |m| password::hash_password_in(m, &password))
            .await??;
        self.store
            .user_create(NewUser {
                username,
                email,
                password_hash: &hash,
                role,
            })
            .await
            .map(|u| Account::from(&*u))
    }

    /// Checks credentials and opens a session. Throttled per client address, per account and
    /// client address, and by a guess budget per account (see [`login_throttle`]); an unknown
    /// user (or a name that cannot be one) costs the same time and gets the same answer as a
    /// wrong password. Outcomes are logged with the user's id, never the password.
    pub async fn login(&self, client: IpAddr, username: &str, password: &str) -> Result<TokenPair> {
        self.throttle_credentials(client)?;
        if validate_username(username).is_err() {
            // Never stored or looked up: such a name cannot exist, and junk of any size or
            // content must not reach the failure table.
            let password = password.to_owned();
            self.argon2(move |m| password::verify_dummy_in(m, &password))
                .await?;
            tracing::info!(target: "skygate::auth", event = "login-failed", %client, user = "none", "login failed: not a valid username");
            return Err(Error::BadCredentials);
        }
        let limits = self.settings.login;
        let client_key = client_key(client);
        let attempts = self
            .store
            .login_attempt_record(username, &client_key, limits.failure_window)
            .await?;
        // The database's clock: failure windows are shared by every replica.
        let now = attempts.now;
        if let Some(retry_after_secs) = login_throttle(&limits, &attempts, now) {
            tracing::info!(target: "skygate::auth", event = "login-throttled", %client, from_client = attempts.from_client, account = attempts.account, "login throttled");
            return Err(Error::RateLimited { retry_after_secs });
        }
        let user = self.store.user_by_username(username).await?;
        let stored = user.as_ref().map(|u| u.password_hash.clone());
        let attempt = password.to_owned();
        let checked = self
            .argon2(move |m| match stored {
                Some(hash) => password::verify_password_in(m, &attempt, &hash),
                None => {
                    password::verify_dummy_in(m, &attempt);
                    Ok(PasswordCheck::Invalid)
                }
            })
            .await;
        let check = match checked {
            Ok(check) => check?,
            Err(refused) => {
                // Not checked (the password workers were saturated): not an attempt either,
                // or an owner retrying through an overload would use up their own budget.
                self.store
                    .login_attempt_uncount(username, &client_key)
                    .await?;
                return Err(refused);
            }
        };
        let (user, needs_rehash) = match (user, check) {
            (Some(user), PasswordCheck::Valid { needs_rehash }) => (user, needs_rehash),
            (user, _) => {
                let user_id = user.map(|u| u.id.to_string());
                tracing::info!(target: "skygate::auth", event = "login-failed", %client, user_id = user_id.as_deref().unwrap_or("unknown"), "login failed: wrong password or unknown user");
                return Err(Error::BadCredentials);
            }
        };
        if user.disabled_at.is_some() {
            // Said only to whoever knows the password: a guesser learns nothing new.
            tracing::info!(target: "skygate::auth", event = "login-refused", %client, user_id = %user.id, "login refused: account disabled");
            return Err(Error::Forbidden(
                "this account is disabled; ask an administrator",
            ));
        }
        if needs_rehash {
            let password = password.to_owned();
            let hash = self
                .argon2(move |m| password::hash_password_in(m, &password))
                .await??;
            self.store
                .user_rehash_password(user.id, &user.password_hash, &hash)
                .await?;
        }
        let family = Family {
            id: Uuid::new_v4(),
            created_at: now,
        };
        let refresh = RefreshToken::generate();
        let stored = self
            .store
            .login_succeeded(
                username,
                &client_key,
                user.id,
                user.session_version,
                &refresh.hash(),
                family,
                now,
            )
            .await?;
        if !stored {
            tracing::info!(target: "skygate::auth", event = "login-raced", %client, user_id = %user.id, "login refused: the account changed while it was checked");
            return Err(Error::Conflict(
                "the account changed while you logged in (disabled, or a new password); log in \
                 again"
                    .into(),
            ));
        }
        tracing::info!(target: "skygate::auth", event = "login", %client, user_id = %user.id, family_id = %family.id, "logged in");
        self.access_pair(user.id, user.role, user.session_version, refresh)
    }

    fn access_pair(
        &self,
        user: UserId,
        role: Role,
        session_version: i64,
        refresh: RefreshToken,
    ) -> Result<TokenPair> {
        let (access_token, _) = self
            .tokens
            .issue(user.0, role, session_version, Utc::now())?;
        Ok(TokenPair {
            access_token,
            refresh_token: refresh.as_str().to_owned(),
            expires_in: self.tokens.ttl().num_seconds(),
        })
    }

    /// Spends a refresh token for a new pair. A spent token presented again revokes its family.
    pub async fn refresh(&self, presented: &str) -> Result<TokenPair> {
        let new = RefreshToken::generate();
        let outcome = self
            .store
            .refresh_token_rotate(&hash_refresh_token(presented), &new.hash(), Utc::now())
            .await?;
        match outcome {
            RefreshOutcome::Rotated {
                user_id,
                role,
                session_version,
            } => self.access_pair(user_id, role, session_version, new),
            RefreshOutcome::ReuseDetected { user_id, family_id } => {
                tracing::warn!(target: "skygate::auth", event = "refresh-reuse", user_id = %user_id, family_id, "refresh token reuse detected; its session family is revoked");
                Err(Error::Unauthenticated("invalid refresh token"))
            }
            RefreshOutcome::Unknown | RefreshOutcome::Expired => {
                Err(Error::Unauthenticated("invalid refresh token"))
            }
        }
    }

    /// Ends the caller's session that the refresh token belongs to; unknown tokens (and other
    /// users') are not an error and change nothing.
    pub async fn logout(&self, who: Principal, presented: &str) -> Result<()> {
        self.store
            .refresh_family_revoke_by_token(who.user_id, &hash_refresh_token(presented), Utc::now())
            .await?;
        Ok(())
    }

    /// Resolves a bearer token (an access token, or an API token) to its user. Access tokens
    /// issued before the user's last password change are refused.
    pub async fn authenticate(&self, bearer: &str) -> Result<Principal> {
        if auth::api_token::is_api_token(bearer) {
            return self.authenticate_api_token(bearer).await;
        }
        let claims = self.tokens.verify(bearer)?;
        let user = self
            .store
            .user_get(claims.user_id()?.into())
            .await?
            .ok_or(Error::Unauthenticated("invalid or expired access token"))?;
        if claims.sv != user.session_version || user.disabled_at.is_some() {
            return Err(Error::Unauthenticated("invalid or expired access token"));
        }
        Ok(Principal {
            user_id: user.id,
            role: user.role,
            credential: super::Credential::Session,
        })
    }

    /// The caller's account, with its limits and what it holds against them.
    pub async fn profile(&self, who: Principal) -> Result<(Account, super::users::QuotaReport)> {
        let user = self.user(who).await?;
        Ok((Account::from(&*user), self.own_quota(&user).await?))
    }

    async fn user(&self, who: Principal) -> Result<Arc<UserRecord>> {
        self.store
            .user_get(who.user_id)
            .await?
            .ok_or(Error::NotFound("user"))
    }

    /// Changes e-mail and/or password after checking the current password. A new password
    /// ends every session of the user (refresh families and older access tokens).
    pub async fn profile_update(&self, who: Principal, change: ProfileChange) -> Result<Account> {
        who.require_session("an API token cannot change the profile; log in")?;
        let user = self.user(who).await?;
        if let Some(email) = &change.email {
            validate_email(email)?;
        }
        if let Some(new) = &change.password {
            password::check_policy(new)?;
        }
        let (current, stored) = (change.current_password.clone(), user.password_hash.clone());
        let check = self
            .argon2(move |m| password::verify_password_in(m, &current, &stored))
            .await??;
        if check == PasswordCheck::Invalid {
            return Err(Error::Forbidden("current_password is wrong"));
        }
        let password_hash = match &change.password {
            Some(new) => {
                let new = new.clone();
                Some(
                    self.argon2(move |m| password::hash_password_in(m, &new))
                        .await??,
                )
            }
            None => None,
        };
        self.store
            .user_update(
                user.id,
                UserUpdate {
                    email: change.email,
                    password_hash,
                },
            )
            .await
            .map(|u| Account::from(&*u))
    }
}

impl From<Uuid> for UserId {
    fn from(u: Uuid) -> Self {
        Self(u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::LoginLimits;
    use crate::store::sessions::LoginAttempts;
    use chrono::Duration;

    #[test]
    fn usernames() {
        for ok in ["ann", "ann.b-c_9", &"a".repeat(32)] {
            assert!(validate_username(ok).is_ok(), "{ok}");
        }
        for bad in ["an", &"a".repeat(33), "Ann", "ann b", "ann@x", "änn", ""] {
            assert!(validate_username(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn emails() {
        for ok in ["ann@example.com", "a.b+c@sub.example.org"] {
            assert!(validate_email(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ann",
            "ann@",
            "@example.com",
            "ann@example",
            "ann@@example.com",
            "ann @example.com",
            "ann@example..com",
            "ann@-example.com",
            "ann@example.com\n",
        ] {
            assert!(validate_email(bad).is_err(), "{bad:?}");
        }
    }
    fn attempts(from_client: i64, account: i64, started_secs_ago: i64) -> LoginAttempts {
        LoginAttempts {
            window_start: Utc::now() - Duration::seconds(started_secs_ago),
            from_client,
            account,
            now: Utc::now(),
        }
    }

    #[test]
    fn a_client_is_paused_after_its_own_failures_only() {
        let limits = LoginLimits::default();
        let now = Utc::now();
        assert_eq!(login_throttle(&limits, &attempts(10, 10, 0), now), None);
        let wait = login_throttle(&limits, &attempts(11, 11, 60), now).unwrap();
        assert!((839..=841).contains(&wait), "{wait}");
        // The owner from elsewhere: the account has many failures, but within budget.
        assert_eq!(login_throttle(&limits, &attempts(1, 90, 0), now), None);
    }

    #[test]
    fn over_the_budget_only_clients_new_to_the_account_are_checked() {
        let limits = LoginLimits::default();
        let now = Utc::now();
        let over = limits.account_budget + 1;
        assert_eq!(login_throttle(&limits, &attempts(1, over, 0), now), None);
        assert!(login_throttle(&limits, &attempts(2, over, 0), now).is_some());
        // A window that is about to end still asks for at least a second.
        let nearly = attempts(11, 11, limits.failure_window.num_seconds());
        assert_eq!(login_throttle(&limits, &nearly, now), Some(1));
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), "2001:db8:1:2::/64");
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        assert_eq!(client_key("::ffff:192.0.2.7".parse().unwrap()), "192.0.2.7");
        assert_eq!(client_key("192.0.2.7".parse().unwrap()), "192.0.2.7");
    }
}
