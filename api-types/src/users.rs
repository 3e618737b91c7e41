//! Accounts and sessions: registering, logging in, tokens, the caller's profile, and the SSH
//! public keys a user saves for new machines.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

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
    pub created_at: DateTime<Utc>,
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
