//! Hypervisor hosts: the `hosts` table. Agents register here once provisioning exists; until
//! then the table is read, and empty.

use super::{from_micros, Store};
use crate::error::Result;
use chrono::{DateTime, Utc};
use sqlx::Row;

/// A registered host as stored.
#[derive(Debug, Clone)]
pub struct HostRecord {
    pub id: String,
    pub name: String,
    pub grpc_address: String,
    pub state: String,
    pub hypervisor: String,
    pub vcpus: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

impl Store {
    /// Every host, by name.
    pub async fn host_list(&self) -> Result<Vec<HostRecord>> {
        let rows = sqlx::query(
            "SELECT id, name, grpc_address, state, hypervisor, vcpus, memory_mib, disk_gib, \
             last_heartbeat_at, created_at FROM hosts ORDER BY name",
        )
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(HostRecord {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    grpc_address: r.try_get("grpc_address")?,
                    state: r.try_get("state")?,
                    hypervisor: r.try_get("hypervisor")?,
                    vcpus: r.try_get("vcpus")?,
                    memory_mib: r.try_get("memory_mib")?,
                    disk_gib: r.try_get("disk_gib")?,
                    last_heartbeat_at: r
                        .try_get::<Option<i64>, _>("last_heartbeat_at")?
                        .map(from_micros),
                    created_at: from_micros(r.try_get("created_at")?),
                })
            })
            .collect()
    }
}
