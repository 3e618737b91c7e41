//! Steady heartbeats, gathered: a ready host reporting what its row already says changes
//! nothing but the time, so the registry notes it here and answers at once, and a flusher
//! writes every noted host's time in one statement per tick (issue 13). One write per host per
//! heartbeat queued behind a storm's writes on SQLite's single writer, until heartbeats came
//! late enough for the monitor to mark healthy hosts unreachable; at 1,000 hosts it was 1,000
//! writes per heartbeat period for nothing.

use crate::store::Store;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Hosts heard from since the last flush.
#[derive(Debug, Default)]
pub struct SteadyHeartbeats {
    heard: Mutex<HashSet<String>>,
}

impl SteadyHeartbeats {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A steady heartbeat from `host_id`, to be written at the next flush.
    pub fn note(&self, host_id: &str) {
        let mut heard = self.heard.lock().unwrap_or_else(PoisonError::into_inner);
        if !heard.contains(host_id) {
            heard.insert(host_id.to_owned());
        }
    }

    /// Everything noted since the last call.
    fn take(&self) -> Vec<String> {
        let mut heard = self.heard.lock().unwrap_or_else(PoisonError::into_inner);
        heard.drain().collect()
    }
}

/// How often noted heartbeats are written: a quarter of the heartbeat interval, between 50 ms
/// and 1 s. The monitor allows at least two intervals of silence, so a flush this late
/// never makes a host that heartbeats look silent.
pub fn flush_period(heartbeat_interval: Duration) -> Duration {
    (heartbeat_interval / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Writes the noted heartbeats every `period` until aborted. A failed write puts its hosts
/// back, for the next tick.
pub async fn flush(heard: Arc<SteadyHeartbeats>, store: Store, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let hosts = heard.take();
        if hosts.is_empty() {
            continue;
        }
        if let Err(e) = store.host_heartbeats_record(&hosts).await {
            tracing::warn!(error = ?e, hosts = hosts.len(), "could not record heartbeats; retrying");
            for host in &hosts {
                heard.note(host);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_noted_twice_is_written_once_and_taken_once() {
        let heard = SteadyHeartbeats::default();
        heard.note("a");
        heard.note("b");
        heard.note("a");
        let mut hosts = heard.take();
        hosts.sort();
        assert_eq!(hosts, ["a", "b"]);
        assert!(heard.take().is_empty());
    }

    #[test]
    fn the_flush_keeps_well_inside_the_silence_the_monitor_allows() {
        assert_eq!(flush_period(Duration::from_secs(5)), Duration::from_secs(1));
        assert_eq!(
            flush_period(Duration::from_secs(1)),
            Duration::from_millis(250)
        );
        assert_eq!(
            flush_period(Duration::from_millis(100)),
            Duration::from_millis(50)
        );
    }
}
