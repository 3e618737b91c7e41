//! The timing the background work shares (flags of `serve`): the workers' leases and
//! deadlines, the agents' heartbeats the monitor and the registry judge, the reconciler's
//! interval and grace. One struct, since several of these bound one another (a lease renewal
//! every third of the lease, a host checked twice per unreachable window).

use std::time::Duration;

/// Timing of the workflows (flags of `serve`).
#[derive(Debug, Clone)]
pub struct WorkflowSettings {
    /// Concurrent workers in this process.
    pub workers: usize,
    /// How long a claimed task is ours without renewal; a crashed worker's tasks are taken
    /// over after this.
    pub lease: Duration,
    /// How long a machine may wait in `pending` for capacity before it fails.
    pub placement_timeout: Duration,
    /// How long any other transitional status may last before the machine fails.
    pub transition_timeout: Duration,
    /// How often agents heartbeat, and how often hosts are checked.
    pub heartbeat_interval: Duration,
    /// Silence after which a host is unreachable.
    pub unreachable_after: Duration,
    /// Graceful stop before the agent forces a machine off.
    pub stop_timeout: Duration,
    /// How often every host's domains are compared with the database.
    pub reconcile_interval: Duration,
    /// How long an unowned domain must be seen before it is removed.
    pub orphan_grace: Duration,
    /// How far the `on-failure` restart policy goes.
    pub restart: crate::model::RestartLimits,
}

impl Default for WorkflowSettings {
    fn default() -> Self {
        Self {
            workers: 4,
            lease: Duration::from_secs(30),
            placement_timeout: Duration::from_secs(600),
            transition_timeout: Duration::from_secs(900),
            heartbeat_interval: Duration::from_secs(5),
            unreachable_after: Duration::from_secs(20),
            stop_timeout: Duration::from_secs(30),
            reconcile_interval: Duration::from_secs(30),
            orphan_grace: Duration::from_secs(120),
            restart: crate::model::RestartLimits::default(),
        }
    }
}
