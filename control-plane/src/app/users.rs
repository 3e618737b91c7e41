//! Account administration (issue 14): listing accounts, disabling and enabling them, roles,
//! and each tenant's limits with what it holds against them.

use super::sessions::Account;
use super::{App, Page, Principal};
use crate::error::{Error, Result};
use crate::model::{Quota, QuotaOverride, Usage, UserId};
use crate::store::users::{AccountChange, AccountFilter, UserRecord};
use auth::Role;

/// A tenant's limits: those in force, which of them an administrator set, and what it holds.
#[derive(Debug, Clone, Copy)]
pub struct QuotaReport {
    pub limits: Quota,
    pub overrides: QuotaOverride,
    pub usage: Usage,
}

/// The longest `search` text accepted: longer says nothing a username or address could match.
const MAX_SEARCH: usize = 254;

/// How old the usage a profile shows may be. Every authenticated request already reads the
/// account from the replica's cache; reading the usage row on each profile as well cost three
/// quarters of `GET /auth/profile`'s rate (17,500/s against 70,600/s, SQLite, 2026-11-26). The
/// figure shown is informational: creates check the quota against the row itself, under its
/// lock, so a second's staleness here admits nothing.
const USAGE_SHOWN_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// Each tenant's usage as a profile last read it, and when.
#[derive(Debug, Default)]
pub struct ShownUsage(
    std::sync::Mutex<std::collections::HashMap<UserId, (Usage, std::time::Instant)>>,
);

impl ShownUsage {
    fn get(&self, id: UserId) -> Option<Usage> {
        let kept = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        kept.get(&id)
            .filter(|(_, at)| at.elapsed() < USAGE_SHOWN_FOR)
            .map(|(usage, _)| *usage)
    }

    fn keep(&self, id: UserId, usage: Usage) {
        let mut kept = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A bound, not an eviction policy: past it the map starts over.
        if kept.len() > 100_000 {
            kept.clear();
        }
        kept.insert(id, (usage, std::time::Instant::now()));
    }

    /// Forgets everyone's usage: this replica just changed several tenants'.
    pub fn forget_all(&self) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// Forgets `id`'s usage: this replica just changed it.
    pub fn forget(&self, id: UserId) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
    }
}

impl App {
    /// One page of accounts in username order (administrators).
    pub async fn user_list(
        &self,
        who: Principal,
        filter: &AccountFilter<'_>,
        after_username: Option<&str>,
        limit: i64,
    ) -> Result<Page<Account>> {
        who.require_admin()?;
        if filter.search.is_some_and(|s| s.len() > MAX_SEARCH) {
            return Err(Error::BadRequest(format!(
                "search must be at most {MAX_SEARCH} bytes"
            )));
        }
        let rows = self
            .store
            .user_list(filter, after_username, limit + 1)
            .await?;
        let accounts = rows.iter().map(Account::from).collect();
        Ok(Page::from_overfetch(accounts, limit))
    }

    /// One account (administrators).
    pub async fn user_get(&self, who: Principal, id: UserId) -> Result<Account> {
        who.require_admin()?;
        let user = self
            .store
            .user_get(id)
            .await?
            .ok_or(Error::NotFound("user"))?;
        Ok(Account::from(&*user))
    }

    /// Disables, enables or changes the role of an account (administrators). An administrator
    /// cannot disable or demote their own account: the last administrator would otherwise be
    /// one request from a fleet nobody can operate (another administrator can).
    pub async fn user_change(
        &self,
        who: Principal,
        id: UserId,
        change: AccountChange,
    ) -> Result<Account> {
        who.require_admin()?;
        if !matches!(change, AccountChange::Quota(_)) {
            // Who holds which power is changed by a person who logged in, not by a token that
            // may have leaked (and would outlive its own revocation through another account).
            who.require_session("roles and disabling need a login, not an API token")?;
        }
        let own = who.user_id == id;
        match change {
            AccountChange::Disable if own => {
                return Err(Error::Conflict(
                    "you cannot disable your own account; another administrator can".into(),
                ))
            }
            AccountChange::Role(Role::User) if own => {
                return Err(Error::Conflict(
                    "you cannot take the admin role from yourself; another administrator can"
                        .into(),
                ))
            }
            AccountChange::Quota(q) => {
                q.validate().map_err(Error::Invalid)?;
            }
            _ => {}
        }
        let user = self
            .store
            .user_admin_change(id, change)
            .await?
            .ok_or(Error::NotFound("user"))?;
        tracing::info!(target: "skygate::audit", admin = %who.user_id, user_id = %id, change = ?change, "account changed");
        Ok(Account::from(&*user))
    }

    /// The caller's limits and usage for its profile: the usage as read at most
    /// [`USAGE_SHOWN_FOR`] ago (fresh after the caller's own creates on this replica).
    pub(super) async fn own_quota(&self, user: &UserRecord) -> Result<QuotaReport> {
        let usage = match self.shown_usage.get(user.id) {
            Some(usage) => usage,
            None => {
                let usage = self.store.tenant_usage(user.id).await?;
                self.shown_usage.keep(user.id, usage);
                usage
            }
        };
        Ok(QuotaReport {
            limits: user.quota.over(self.settings.quota),
            overrides: user.quota,
            usage,
        })
    }

    /// A tenant's limits and usage as they are now: administrators for anyone, a tenant for
    /// itself.
    pub async fn quota(&self, who: Principal, id: UserId) -> Result<QuotaReport> {
        if who.user_id != id {
            who.require_admin()?;
        }
        let user = self
            .store
            .user_get(id)
            .await?
            .ok_or(Error::NotFound("user"))?;
        Ok(QuotaReport {
            limits: user.quota.over(self.settings.quota),
            overrides: user.quota,
            usage: self.store.tenant_usage(id).await?,
        })
    }

    /// Sets a tenant's own limits (administrators); `None` in a limit is the server default.
    /// Lowering a limit below what the tenant holds takes nothing away: its next create is
    /// refused until it is back under.
    pub async fn quota_set(
        &self,
        who: Principal,
        id: UserId,
        overrides: QuotaOverride,
    ) -> Result<QuotaReport> {
        self.user_change(who, id, AccountChange::Quota(overrides))
            .await?;
        self.quota(who, id).await
    }
}
