//! The host monitor: a host whose agent has not heartbeated for `unreachable_after` becomes
//! `unreachable` (the scheduler skips it, its machines' logs say so); its next heartbeat makes
//! it `ready` again (the registry writes that).

use super::WorkflowSettings;
use crate::store::Store;

/// Checks hosts every heartbeat interval until aborted.
pub async fn run(store: Store, settings: WorkflowSettings) {
    let mut tick = tokio::time::interval(settings.heartbeat_interval);
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
    for (id, name) in store
        .host_mark_unreachable(chrono::Utc::now() - silence)
        .await?
    {
        tracing::warn!(host = %name, "host missed its heartbeats; unreachable");
        let note = format!(
            "its host {name} is unreachable (no heartbeat for {} s)",
            settings.unreachable_after.as_secs()
        );
        store.machine_note_on_host(&id, "reconcile", &note).await?;
    }
    Ok(())
}
