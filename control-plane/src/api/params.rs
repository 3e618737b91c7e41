//! Request bodies and query strings of the public API. Unknown fields are refused, so a typo
//! (`memory_mb`) is a 422 instead of a silently ignored setting.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterParams {
    /// 3–32 characters of `[a-z0-9_.-]`.
    pub username: String,
    pub email: String,
    /// 8–128 characters, not a commonly used password.
    pub password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginParams {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshParams {
    pub refresh_token: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfilePatch {
    pub email: Option<String>,
    pub password: Option<String>,
    /// Required for any change.
    pub current_password: String,
}

/// Also `Serialize`: its canonical JSON is what an Idempotency-Key is bound to.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMachineParams {
    /// An RFC 1123 label, 1–63 characters, unique among your machines.
    pub hostname: String,
    /// Name of a registered image.
    pub image: String,
    pub vcpus: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
    /// OpenSSH public keys, or names of your saved keys.
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// cloud-init user data, at most 64 KiB.
    pub user_data: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListMachinesQuery {
    /// 1–200, default 50.
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only machines in this status.
    pub status: Option<String>,
}

/// Page size: 1–200, default 50.
pub fn page_limit(limit: Option<i64>) -> crate::error::Result<i64> {
    match limit {
        None => Ok(50),
        Some(n) if (1..=200).contains(&n) => Ok(n),
        Some(_) => Err(crate::error::Error::BadRequest(
            "limit must be between 1 and 200".into(),
        )),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// 1–200, default 50.
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterImageParams {
    pub name: String,
    /// file:///, http:// or https:// URL of the disk (or of the image directory for `kernel`).
    pub source: String,
    /// qcow2, raw or kernel.
    pub format: String,
    pub sha256: Option<String>,
    /// Direct kernel boot: `{kernel, initrd?, cmdline?, kernel_sha256?, initrd_sha256?}`.
    #[schema(value_type = Option<Object>)]
    pub boot: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddSshKeyParams {
    pub name: String,
    /// One OpenSSH public key line, e.g. `ssh-ed25519 AAAA... you@laptop`.
    pub public_key: String,
}
