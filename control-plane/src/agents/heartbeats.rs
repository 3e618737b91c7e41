//! Steady heartbeats, gathered: a ready host reporting what its row already says changes
//! nothing but the time, so the registry notes it here and answers at once, and a flusher
//! writes every noted host's time in one statement per tick (issue 13). One write per host per
//! heartbeat queued behind a storm's writes on SQLite's single writer, until heartbeats came
//! late enough for the monitor to mark healthy hosts unreachable; at 1,000 hosts it was 1,000
//! writes per heartbeat period for nothing.

use crate::store::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Hosts heard from since the last flush, each with when it was last heard. The time heard,
/// not the time written, is what the row gets: a flush that failed and is retried later must
/// not make a host that has since gone silent look alive (it kept a silenced host `ready`
/// past the monitor's window while the database was slow).
#[derive(Debug, Default)]
pub struct SteadyHeartbeats {
    heard: Mutex<HashMap<String, Instant>>,
}

impl SteadyHeartbeats {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A steady heartbeat from `host_id` now, to be written at the next flush.
    pub fn note(&self, host_id: &str) {
        self.note_at(host_id, Instant::now());
    }

    /// A heartbeat from `host_id` at `at`; an earlier one (a failed flush's, put back) never
    /// replaces a later one.
    fn note_at(&self, host_id: &str, at: Instant) {
        let mut heard = self.heard.lock().unwrap_or_else(PoisonError::into_inner);
        match heard.get_mut(host_id) {
            Some(last) => *last = (*last).max(at),
            None => {
                heard.insert(host_id.to_owned(), at);
            }
        }
    }

    /// Everything noted since the last call.
    fn take(&self) -> Vec<(String, Instant)> {
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
            for (host, at) in &hosts {
                heard.note_at(host, *at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_noted_twice_is_taken_once_with_its_latest_time() {
        let heard = SteadyHeartbeats::default();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        heard.note_at("a", t0);
        heard.note_at("b", t0);
        heard.note_at("a", t1);
        let mut hosts = heard.take();
        hosts.sort();
        assert_eq!(hosts, [("a".to_owned(), t1), ("b".to_owned(), t0)]);
        assert!(heard.take().is_empty());
    }

    #[test]
    fn a_failed_flush_put_back_keeps_its_time_and_never_hides_a_later_one() {
        let heard = SteadyHeartbeats::default();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        heard.note_at("a", t1);
        // The failed flush's note of "a" at t0 comes back after "a" was heard again at t1;
        // "b", silent since, keeps t0.
        heard.note_at("a", t0);
        heard.note_at("b", t0);
        let mut hosts = heard.take();
        hosts.sort();
        assert_eq!(hosts, [("a".to_owned(), t1), ("b".to_owned(), t0)]);
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
