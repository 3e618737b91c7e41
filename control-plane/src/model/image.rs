//! A registered guest image, as stored. Who may see its `source` and `boot` is the API's
//! business (administrators only).

use super::ImageId;
use chrono::{DateTime, Utc};

/// A guest image agents can fetch.
#[derive(Debug, Clone)]
pub struct Image {
    pub id: ImageId,
    pub name: String,
    pub source: String,
    pub format: String,
    pub sha256: Option<String>,
    pub boot: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
}
