//! A registered guest image, as stored. Who may see its `source` and `boot` is the API's
//! business (administrators only).

use super::ImageId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A guest image agents can fetch.
#[derive(Debug, Clone)]
pub struct Image {
    pub id: ImageId,
    pub name: String,
    pub source: String,
    pub format: String,
    pub sha256: Option<String>,
    pub boot: Option<KernelBoot>,
    /// Set while new machines may not use it.
    pub deprecated_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// Direct kernel boot: where the kernel (and initrd) come from, their digests, the command
/// line. Stored as JSON in `images.boot` with these names; absent fields are left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelBoot {
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_sha256: Option<String>,
}
