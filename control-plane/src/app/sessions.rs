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
use uuid::Uuid;

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

impl App {
    /// Creates an account with the given role (tenants register as users; the admin CLI
    /// creates administrators).
    pub async fn register(
        &self,
        username: &str,
        email: &str,
        password: &str,
        role: Role,
    ) -> Result<UserRecord> {
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
    }

    /// Checks credentials and opens a session. Throttled per client address and per account;
    /// an unknown user (or a name that cannot be one) costs the same time and gets the same
    /// answer as a wrong password.
    pub async fn login(&self, client: IpAddr, username: &str, password: &str) -> Result<TokenPair> {
        self.throttle_credentials(client)?;
        if validate_username(username).is_err() {
            // Never stored or looked up: such a name cannot exist, and junk of any size or
            // content must not reach the failure table.
            let password = password.to_owned();
            self.argon2(move |m| password::verify_dummy_in(m, &password))
                .await?;
            return Err(Error::BadCredentials);
        }
        let now = Utc::now();
        let limits = self.settings.login;
        let (window_start, attempts) = self
            .store
            .login_attempt_record(username, now, limits.failure_window)
            .await?;
        if attempts > limits.max_failures {
            let window_end = window_start + limits.failure_window;
            let secs = (window_end - now).num_seconds().max(1);
            return Err(Error::RateLimited {
                retry_after_secs: u64::try_from(secs).unwrap_or(1),
            });
        }
        let user = self.store.user_by_username(username).await?;
        let stored = user.as_ref().map(|u| u.password_hash.clone());
        let attempt = password.to_owned();
        let check = self
            .argon2(move |m| match stored {
                Some(hash) => password::verify_password_in(m, &attempt, &hash),
                None => {
                    password::verify_dummy_in(m, &attempt);
                    Ok(PasswordCheck::Invalid)
                }
            })
            .await??;
        let (user, needs_rehash) = match (user, check) {
            (Some(user), PasswordCheck::Valid { needs_rehash }) => (user, needs_rehash),
            _ => return Err(Error::BadCredentials),
        };
        if needs_rehash {
            let password = password.to_owned();
            let hash = self
                .argon2(move |m| password::hash_password_in(m, &password))
                .await??;
            self.store
                .user_rehash_password(user.id, &user.password_hash, &hash)
                .await?;
        }
        self.store.login_failures_clear(username).await?;
        let family = Family {
            id: Uuid::new_v4(),
            created_at: now,
        };
        let refresh = RefreshToken::generate();
        self.store
            .refresh_token_insert(user.id, &refresh.hash(), family, now)
            .await?;
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
            RefreshOutcome::ReuseDetected => {
                tracing::warn!("refresh token reuse detected; its session family is revoked");
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

    /// Resolves a bearer access token to its user. Tokens issued before the user's last
    /// password change are refused.
    pub async fn authenticate(&self, bearer: &str) -> Result<Principal> {
        let claims = self.tokens.verify(bearer)?;
        let user = self
            .store
            .user_get(claims.user_id()?.into())
            .await?
            .ok_or(Error::Unauthenticated("invalid or expired access token"))?;
        if claims.sv != user.session_version {
            return Err(Error::Unauthenticated("invalid or expired access token"));
        }
        Ok(Principal {
            user_id: user.id,
            role: user.role,
        })
    }

    pub async fn profile(&self, who: Principal) -> Result<UserRecord> {
        self.store
            .user_get(who.user_id)
            .await?
            .ok_or(Error::NotFound("user"))
    }

    /// Changes e-mail and/or password after checking the current password. A new password
    /// ends every session of the user (refresh families and older access tokens).
    pub async fn profile_update(
        &self,
        who: Principal,
        change: ProfileChange,
    ) -> Result<UserRecord> {
        let user = self.profile(who).await?;
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
}
