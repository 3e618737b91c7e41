//! Request bodies and query strings of the public API. Unknown fields are refused, so a typo
//! (`memory_mb`) is a 422 instead of a silently ignored setting.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

#[derive(Debug, Deserialize, ToSchema)]
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
    /// A new e-mail address.
    #[schema(format = Email, max_length = 254)]
    pub email: Option<String>,
    /// A new password: 8–128 characters, not a commonly used one (422 when it is one).
    #[schema(min_length = 8, max_length = 128)]
    pub password: Option<String>,
    /// Required for any change.
    pub current_password: String,
}

/// Also `Serialize`: its canonical JSON is what an Idempotency-Key is bound to.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMachineParams {
    /// An RFC 1123 label: 1–63 of `[a-z0-9-]`, not starting or ending with '-'; unique among
    /// your machines (409 otherwise).
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
    )]
    pub hostname: String,
    /// Name of a registered image (`GET /images`); an unknown name is 422.
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = r"^[a-z0-9][a-z0-9._-]{0,62}$"
    )]
    pub image: String,
    /// 1–32 (the server's default `--max-vcpus`; a server may allow fewer or more: 422).
    #[schema(minimum = 1, maximum = 32)]
    pub vcpus: i64,
    /// 64–262144 MiB (the default `--max-memory-mib`; a server may allow fewer or more: 422).
    #[schema(minimum = 64, maximum = 262144)]
    pub memory_mib: i64,
    /// 1–2048 GiB (the default `--max-disk-gib`; a server may allow fewer or more: 422).
    #[schema(minimum = 1, maximum = 2048)]
    pub disk_gib: i64,
    /// At most 32 entries, each an OpenSSH public key line or the name of one of your saved
    /// keys (422 when it is neither).
    #[serde(default)]
    #[schema(max_items = 32)]
    pub ssh_keys: Vec<String>,
    /// cloud-init user data: at most 65536 bytes of UTF-8, no NUL characters.
    #[schema(max_length = 65536, pattern = r"^[^\u0000]*$")]
    pub user_data: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListMachinesQuery {
    /// 1–200, default 50.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page. Opaque and signed: anything else is 400.
    #[param(min_length = 1)]
    pub cursor: Option<String>,
    /// Only machines in this status.
    #[param(value_type = Option<crate::model::MachineStatus>)]
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
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page. Opaque and signed: anything else is 400.
    #[param(min_length = 1)]
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterImageParams {
    /// 1–63 of `[a-z0-9._-]`, starting with a letter or digit.
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = r"^[a-z0-9][a-z0-9._-]{0,62}$"
    )]
    pub name: String,
    /// file:///, http:// or https:// URL of the disk (or of the image directory for `kernel`);
    /// credentials in it, or a link-local, unspecified or multicast host, are 422.
    #[schema(pattern = r"^(file|http|https)://")]
    pub source: String,
    /// `kernel` needs `boot`.
    #[schema(value_type = ImageFormat)]
    pub format: String,
    /// 64 lowercase hex digits.
    #[schema(pattern = r"^[0-9a-f]{64}$")]
    pub sha256: Option<String>,
    /// Direct kernel boot.
    #[schema(value_type = Option<BootParams>)]
    pub boot: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddSshKeyParams {
    /// 1–64 of letters, digits, '-', '_', '.' and '@'.
    #[schema(min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9._@-]{1,64}$")]
    pub name: String,
    /// One OpenSSH public key line, e.g. `ssh-ed25519 AAAA... you@laptop`: a key line of at
    /// most 8 KiB, a comment of at most 1 KiB, no control characters (else 422).
    pub public_key: String,
}

/// Image formats (documentation of `RegisterImageParams::format`, which stays a string so
/// that an unknown format is the app's 422 with its message).
#[derive(Debug, ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum ImageFormat {
    Qcow2,
    Raw,
    Kernel,
}

/// Direct kernel boot (documentation of `RegisterImageParams::boot`, checked by the app).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BootParams {
    /// file:///, http:// or https:// URL of the kernel.
    #[schema(pattern = r"^(file|http|https)://")]
    pub kernel: String,
    /// URL of the initrd.
    #[schema(pattern = r"^(file|http|https)://")]
    pub initrd: Option<String>,
    /// Kernel command line, at most 4096 bytes.
    #[schema(max_length = 4096)]
    pub cmdline: Option<String>,
    /// 64 lowercase hex digits.
    #[schema(pattern = r"^[0-9a-f]{64}$")]
    pub kernel_sha256: Option<String>,
    /// 64 lowercase hex digits.
    #[schema(pattern = r"^[0-9a-f]{64}$")]
    pub initrd_sha256: Option<String>,
}
