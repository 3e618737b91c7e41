//! Hypervisor hosts, as administrators see and steer them.

use super::{App, Principal};
use crate::error::Result;
use crate::model::scheduler::Resources;
use crate::store::hosts::HostRecord;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A host as administrators see it: one state that says whether it takes new machines.
#[derive(Debug, Clone)]
pub struct Host {
    pub id: String,
    pub name: String,
    /// Where the control plane reaches the host's agent.
    pub address: String,
    /// See [`shown_state`].
    pub state: String,
    pub cordoned: bool,
    pub problems: Vec<String>,
    pub hypervisor: String,
    pub capacity: Resources,
    pub allocated: Resources,
    /// Live machines placed on it.
    pub machines: i64,
    pub agent_version: String,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub evacuation: Option<Evacuation>,
}

/// How a host's evacuation goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evacuation {
    pub requested_at: DateTime<Utc>,
    /// Live machines still on the host.
    pub machines_left: i64,
    /// Of those, the ones being moved now.
    pub moving: i64,
}

/// The one state shown for a host, worst first: `unreachable` (or any other reachability
/// state than `ready`), else `degraded` (its agent reports problems; takes no new machines),
/// else `cordoned` (takes no new machines), else `ready`.
pub fn shown_state(reachability: &str, has_problems: bool, cordoned: bool) -> &str {
    if reachability != "ready" {
        reachability
    } else if has_problems {
        "degraded"
    } else if cordoned {
        "cordoned"
    } else {
        "ready"
    }
}

impl From<HostRecord> for Host {
    fn from(h: HostRecord) -> Self {
        let state = shown_state(&h.state, !h.problems.is_empty(), h.cordoned).to_owned();
        Self {
            id: h.id,
            name: h.name,
            address: h.grpc_address,
            state,
            cordoned: h.cordoned,
            problems: h.problems,
            hypervisor: h.hypervisor,
            capacity: h.capacity,
            allocated: h.allocated,
            machines: h.machines,
            agent_version: h.agent_version,
            last_heartbeat_at: h.last_heartbeat_at,
            created_at: h.created_at,
            evacuation: h.evacuation_requested_at.map(|requested_at| Evacuation {
                requested_at,
                machines_left: 0,
                moving: 0,
            }),
        }
    }
}

impl Host {
    /// Fills in the evacuation's progress: machines still on the host, and being moved.
    fn with_progress(mut self, moving: &std::collections::HashMap<String, i64>) -> Self {
        let machines = self.machines;
        let moving = moving.get(&self.id).copied().unwrap_or(0);
        if let Some(e) = &mut self.evacuation {
            e.moving = moving;
            // Its books count each machine until its move is done, and a machine whose move
            // here was placed before the cordon (it then stays; evacuate again for it).
            e.machines_left = machines;
        }
        self
    }
}

impl App {
    pub async fn host_list(&self, who: Principal) -> Result<Vec<Host>> {
        who.require_admin()?;
        let hosts = self.store.host_list().await?;
        let moving = self.store.moving_per_host().await?;
        Ok(hosts
            .into_iter()
            .map(|h| Host::from(h).with_progress(&moving))
            .collect())
    }

    /// One host, with its evacuation's progress.
    pub async fn host_get(&self, who: Principal, id: Uuid) -> Result<Host> {
        who.require_admin()?;
        let host = self
            .store
            .host_get(&id.to_string())
            .await?
            .ok_or(crate::error::Error::NotFound("host"))?;
        let moving = self.store.moving_per_host().await?;
        Ok(Host::from(host).with_progress(&moving))
    }

    /// Evacuates a host: cordoned, and each of its running or stopped machines moved to
    /// another host with room by a `move` task. Answers the host with its progress.
    pub async fn host_evacuate(&self, who: Principal, id: Uuid) -> Result<Host> {
        who.require_admin()?;
        let started = self
            .store
            .host_evacuate(&id.to_string())
            .await?
            .ok_or(crate::error::Error::NotFound("host"))?;
        tracing::warn!(target: "skygate::audit", admin = %who.user_id, host_id = %id, machines = started, "host evacuation requested");
        self.host_get(who, id).await
    }

    pub async fn host_set_cordoned(
        &self,
        who: Principal,
        id: Uuid,
        cordoned: bool,
    ) -> Result<Host> {
        who.require_admin()?;
        self.store
            .host_set_cordoned(&id.to_string(), cordoned)
            .await
            .map(Host::from)
    }

    /// Removes a host; with `force`, forgets the machines still on it (see `store/forget.rs`).
    pub async fn host_delete(&self, who: Principal, id: Uuid, force: bool) -> Result<()> {
        who.require_admin()?;
        let forgotten = self.store.host_delete(&id.to_string(), force).await?;
        if forgotten > 0 {
            self.shown_usage.forget_all();
        }
        tracing::warn!(target: "skygate::audit", admin = %who.user_id, host_id = %id, force, forgotten, "host removed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_state_is_shown() {
        assert_eq!(shown_state("unreachable", true, true), "unreachable");
        assert_eq!(shown_state("ready", true, true), "degraded");
        assert_eq!(shown_state("ready", false, true), "cordoned");
        assert_eq!(shown_state("ready", false, false), "ready");
    }
}
