//! Hypervisor hosts, as administrators see and steer them.

use super::{App, Principal};
use crate::error::Result;
use crate::store::hosts::HostRecord;
use uuid::Uuid;

impl App {
    pub async fn host_list(&self, who: Principal) -> Result<Vec<HostRecord>> {
        who.require_admin()?;
        self.store.host_list().await
    }

    pub async fn host_set_cordoned(
        &self,
        who: Principal,
        id: Uuid,
        cordoned: bool,
    ) -> Result<HostRecord> {
        who.require_admin()?;
        self.store
            .host_set_cordoned(&id.to_string(), cordoned)
            .await
    }

    pub async fn host_delete(&self, who: Principal, id: Uuid) -> Result<()> {
        who.require_admin()?;
        self.store.host_delete(&id.to_string()).await
    }
}
