//! Hypervisor hosts, as administrators see them.

use super::{App, Principal};
use crate::error::Result;
use crate::store::hosts::HostRecord;

impl App {
    pub async fn host_list(&self, who: Principal) -> Result<Vec<HostRecord>> {
        who.require_admin()?;
        self.store.host_list().await
    }
}
