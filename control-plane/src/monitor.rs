//! The monitor: a host whose agent has not heartbeated for `unreachable_after` becomes
//! `unreachable` (the scheduler skips it, its machines' logs say so; its next heartbeat makes
//! it `ready` again, the registry writes that), and a machine whose transitional status has
//! outlasted its deadline fails with the reason, whether or not a task is still working on it.

use crate::model::MachineStatus;
use crate::store::machines::MachineTransition;
use crate::store::Store;
use crate::timing::WorkflowSettings;
use crate::worker::policy;
use std::collections::HashMap;

/// Checks hosts every heartbeat interval until aborted.
pub async fn run(store: Store, settings: WorkflowSettings) {
    // Often enough that a silent host is noticed within half the window after it.
    let every = settings
        .heartbeat_interval
        .min(settings.unreachable_after / 2)
        .max(std::time::Duration::from_millis(200));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = check_once(&store, &settings).await {
            tracing::warn!(error = ?e, "host check failed");
        }
    }
}

/// One pass.
pub async fn check_once(store: &Store, settings: &WorkflowSettings) -> crate::Result<()> {
    let silence = chrono::Duration::from_std(settings.unreachable_after)
        .unwrap_or_else(|_| chrono::Duration::seconds(20));
    let note = |name: &str| {
        format!(
            "its host {name} is unreachable (no heartbeat for {} s)",
            settings.unreachable_after.as_secs()
        )
    };
    for name in store
        .host_mark_unreachable(store.clock().await? - silence, note)
        .await?
    {
        tracing::warn!(host = %name, "host missed its heartbeats; unreachable");
    }
    let limits: HashMap<_, _> = MachineStatus::ALL
        .into_iter()
        // A move past its deadline is undone by its task (the machine stays on its host),
        // never failed.
        .filter(|s| *s != MachineStatus::Moving)
        .filter_map(|s| {
            let limit = policy::deadline(s, settings)?;
            Some((s, chrono::Duration::from_std(limit).ok()?))
        })
        .collect();
    for m in store.machines_past_deadline(&limits).await? {
        let limit = policy::deadline(m.status, settings).unwrap_or_default();
        let reason = policy::timeout_reason(m.status, limit);
        let failed = MachineTransition::failed(m.id, m.status, m.version, "deadline", &reason);
        if store.machine_transition(&failed).await?.applied() {
            tracing::warn!(machine = %m.id, status = %m.status, "machine failed its deadline");
        }
    }
    Ok(())
}
