//! Guest images: registering one (administrators) and listing them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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
    pub boot: Option<BootParams>,
}

/// Direct kernel boot: what `RegisterImageParams::boot` takes (the app checks the URLs and
/// digests) and administrators see. Absent fields are left out.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BootParams {
    /// file:///, http:// or https:// URL of the kernel.
    #[schema(pattern = r"^(file|http|https)://")]
    pub kernel: String,
    /// URL of the initrd.
    #[schema(pattern = r"^(file|http|https)://")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line, at most 4096 bytes.
    #[schema(max_length = 4096)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// 64 lowercase hex digits.
    #[schema(pattern = r"^[0-9a-f]{64}$")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_sha256: Option<String>,
    /// 64 lowercase hex digits.
    #[schema(pattern = r"^[0-9a-f]{64}$")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_sha256: Option<String>,
}

/// Image formats (documentation of `RegisterImageParams::format`, which stays a string so
/// that an unknown format is the app's 422 with its message).
#[derive(Debug, Clone, Copy, ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum ImageFormat {
    Qcow2,
    Raw,
    Kernel,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageView {
    pub id: String,
    pub name: String,
    /// Where agents fetch it from; administrators only (absent for tenants).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub format: String,
    pub sha256: Option<String>,
    /// Direct kernel boot details; administrators only (absent for tenants).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootParams>,
    /// Whether the image boots a kernel directly (what a tenant needs to know of `boot`).
    pub direct_kernel_boot: bool,
    /// When it was deprecated: new machines cannot use it; machines made from it keep working.
    #[serde(default)]
    pub deprecated_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageList {
    pub items: Vec<ImageView>,
}
