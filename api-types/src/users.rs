//! Accounts and sessions: registering, logging in, tokens, the caller's profile, and the SSH
//! public keys a user saves for new machines.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterParams {
    /// 3–32 characters of `[a-z0-9_.-]`.
    #[schema(min_length = 3, max_length = 32, pattern = r"^[a-z0-9_.-]{3,32}$")]
    pub username: String,
    /// An e-mail address (one '@', a dotted domain), at most 254 characters.
    #[schema(format = Email, max_length = 254)]
    pub email: String,
    /// 8–128 characters, not a commonly used password (422 when it is one).
    #[schema(min_length = 8, max_length = 128)]
    pub password: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginParams {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshParams {
    pub refresh_token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfilePatch {
    /// A new e-mail address.
    #[schema(format = Email, max_length = 254)]
    pub email: Option<String>,
    /// A new password: 8–128 characters, not a commonly used one (422 when it is one).
    #[schema(min_length = 8, max_length = 128)]
    pub password: Option<String>,
    /// Required for any change.
    pub current_password: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub id: String,
    pub username: String,
    pub email: String,
    /// `user` or `admin`.
    pub role: String,
    /// When an administrator disabled the account; null while it is enabled.
    #[serde(default)]
    pub disabled_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// The caller's account with its limits and what it holds against them.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProfileView {
    #[serde(flatten)]
    pub user: UserView,
    pub quota: QuotaView,
}

/// A tenant's limits and usage (`GET /users/{id}/quota`, and in the profile).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QuotaView {
    /// The limits in force: the tenant's own where an administrator set one, else the
    /// server's defaults.
    pub max_machines: i64,
    pub max_vcpus: i64,
    pub max_memory_mib: i64,
    /// What an administrator set for this tenant (null: the server default), as `PUT` takes it.
    pub overrides: QuotaParams,
    /// What the tenant's machines (not deleted) hold now.
    pub usage: UsageView,
}

/// `PUT /users/{id}/quota`: each limit 0 or more, or null for the server-wide default.
/// Every field is required, so a limit is never reset by leaving it out by mistake.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaParams {
    #[schema(minimum = 0)]
    pub max_machines: Option<i64>,
    #[schema(minimum = 0)]
    pub max_vcpus: Option<i64>,
    #[schema(minimum = 0)]
    pub max_memory_mib: Option<i64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub struct UsageView {
    pub machines: i64,
    pub vcpus: i64,
    pub memory_mib: i64,
}

/// What an account may do: a tenant's own machines, or everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RoleName {
    User,
    Admin,
}

/// `PATCH /users/{id}` (administrators).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    pub role: RoleName,
}

/// `GET /users` query.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListUsersQuery {
    /// 1–200, default 50.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Accounts whose username or e-mail address contains this text (any case).
    #[param(max_length = 254)]
    pub search: Option<String>,
    pub role: Option<RoleName>,
}

/// A page of accounts, in username order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UserList {
    pub items: Vec<UserView>,
    /// Pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenPairView {
    pub access_token: String,
    pub refresh_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddSshKeyParams {
    /// 1–64 of letters, digits, '-', '_', '.' and '@'.
    #[schema(min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9._@-]{1,64}$")]
    pub name: String,
    /// One OpenSSH public key line, e.g. `ssh-ed25519 AAAA... you@laptop`: a key line of at
    /// most 8 KiB, a comment of at most 1 KiB, no control characters (else 422).
    pub public_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SshKeyView {
    pub id: String,
    pub name: String,
    pub public_key: String,
    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SshKeyList {
    pub items: Vec<SshKeyView>,
    /// Pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// What an API token may do: `read` (GET only) or `full` (anything its owner may, except
/// changing the password or minting tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TokenScope {
    Read,
    Full,
}

impl TokenScope {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenScope::Read => "read",
            TokenScope::Full => "full",
        }
    }
}

impl std::str::FromStr for TokenScope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(TokenScope::Read),
            "full" => Ok(TokenScope::Full),
            other => Err(format!("unknown token scope '{other}'")),
        }
    }
}

/// `POST /tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenParams {
    /// 1–64 of letters, digits, '-', '_', '.', '@'; unique among your tokens.
    #[schema(min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9._@-]{1,64}$")]
    pub name: String,
    pub scope: TokenScope,
    /// 1–365.
    #[schema(minimum = 1, maximum = 365)]
    pub expires_in_days: i64,
}

/// An API token, without its secret.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub id: String,
    pub name: String,
    pub scope: TokenScope,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// When it last authenticated a request (to the minute); null if never.
    pub last_used_at: Option<DateTime<Utc>>,
}

/// A token just created: the only time its secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedTokenView {
    #[serde(flatten)]
    pub view: TokenView,
    /// The bearer secret (`sgt_...`). Shown once; store it now.
    pub token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenList {
    pub items: Vec<TokenView>,
}
