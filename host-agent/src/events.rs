//! The agent's event log: every observed change of a machine's phase, numbered. Kept in
//! memory (a bounded ring) and fanned out to WatchEvents streams; a client that reconnects
//! with the last sequence it saw gets what followed, as far as the ring still holds it. After
//! an agent restart numbering starts again and the control plane reconciles from ListMachines
//! (the agent keeps no state of its own).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;
use uuid::Uuid;

use crate::model::MachinePhase;

/// How many events the ring keeps for late subscribers.
pub const DEFAULT_RETAINED: usize = 4096;

/// Why a watch cannot resume where the client asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    /// The sequence is ahead of this agent's numbering.
    #[error(
        "sequence {requested} was never issued by this agent (its latest is {latest}; it has \
         restarted since?): resync with ListMachines and watch from 0"
    )]
    NeverIssued {
        /// What the client asked for.
        requested: u64,
        /// The latest sequence issued.
        latest: u64,
    },
    /// The events right after the sequence have left the ring.
    #[error(
        "events after {requested} are no longer retained (the oldest is {oldest}): resync \
         with ListMachines and watch from 0"
    )]
    Forgotten {
        /// What the client asked for.
        requested: u64,
        /// The oldest retained sequence.
        oldest: u64,
    },
}

/// One change of a machine's phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineEvent {
    /// Increases by one per event, from 1.
    pub sequence: u64,
    /// The machine.
    pub machine_id: Uuid,
    /// Its new phase.
    pub phase: MachinePhase,
    /// Why, for people.
    pub reason: String,
    /// When the agent saw it, in milliseconds since the Unix epoch.
    pub at_unix_ms: i64,
}

#[derive(Debug)]
struct Inner {
    next_sequence: u64,
    retained: VecDeque<MachineEvent>,
    last_phase: HashMap<Uuid, MachinePhase>,
}

/// The event log. Publishing deduplicates: a phase equal to the last one recorded for that
/// machine is not an event, so the poller and the operations can both report freely.
#[derive(Debug)]
pub struct EventLog {
    inner: Mutex<Inner>,
    capacity: usize,
    tx: broadcast::Sender<MachineEvent>,
}

impl EventLog {
    /// A log retaining the last `capacity` events.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(16));
        EventLog {
            inner: Mutex::new(Inner {
                next_sequence: 1,
                retained: VecDeque::new(),
                last_phase: HashMap::new(),
            }),
            capacity: capacity.max(1),
            tx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `machine_id` is now in `phase`; returns the event unless nothing changed.
    pub fn observe(
        &self,
        machine_id: Uuid,
        phase: MachinePhase,
        reason: &str,
    ) -> Option<MachineEvent> {
        let mut inner = self.lock();
        if inner.last_phase.get(&machine_id) == Some(&phase) {
            return None;
        }
        if phase == MachinePhase::Absent {
            inner.last_phase.remove(&machine_id);
        } else {
            inner.last_phase.insert(machine_id, phase);
        }
        let event = MachineEvent {
            sequence: inner.next_sequence,
            machine_id,
            phase,
            reason: reason.to_owned(),
            at_unix_ms: now_unix_ms(),
        };
        inner.next_sequence += 1;
        if inner.retained.len() == self.capacity {
            inner.retained.pop_front();
        }
        inner.retained.push_back(event.clone());
        // Sent under the lock so subscribers see sequence order; no receivers is fine.
        let _ = self.tx.send(event.clone());
        Some(event)
    }

    /// Seeds the last known phase without emitting an event (start-up: what already exists
    /// is the baseline, not news).
    pub fn baseline(&self, machine_id: Uuid, phase: MachinePhase) {
        self.lock().last_phase.insert(machine_id, phase);
    }

    /// The last phase recorded for `machine_id` (`None`: never seen or absent).
    pub fn last_phase(&self, machine_id: Uuid) -> Option<MachinePhase> {
        self.lock().last_phase.get(&machine_id).copied()
    }

    /// Machines whose last recorded phase is not `Absent`.
    pub fn known_machines(&self) -> Vec<Uuid> {
        self.lock().last_phase.keys().copied().collect()
    }

    /// The retained events after `after_sequence`, and a receiver for everything later. Taken
    /// under one lock, so nothing falls between the two. A client must not silently miss
    /// events: resuming after a sequence this agent never issued (it restarted and numbers
    /// from 1 again) or after one whose successors are no longer retained is an error telling
    /// it to resync (ListMachines) and watch from 0.
    pub fn subscribe(
        &self,
        after_sequence: u64,
    ) -> Result<(Vec<MachineEvent>, broadcast::Receiver<MachineEvent>), ResumeError> {
        let inner = self.lock();
        let latest = inner.next_sequence - 1;
        if after_sequence > latest {
            return Err(ResumeError::NeverIssued {
                requested: after_sequence,
                latest,
            });
        }
        if let Some(oldest) = inner.retained.front().map(|e| e.sequence) {
            if after_sequence > 0 && after_sequence + 1 < oldest {
                return Err(ResumeError::Forgotten {
                    requested: after_sequence,
                    oldest,
                });
            }
        }
        let backlog = inner
            .retained
            .iter()
            .filter(|e| e.sequence > after_sequence)
            .cloned()
            .collect();
        Ok((backlog, self.tx.subscribe()))
    }
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_changes_and_drops_repeats() {
        let log = EventLog::new(8);
        let id = Uuid::new_v4();
        assert_eq!(
            log.observe(id, MachinePhase::Stopped, "defined")
                .map(|e| e.sequence),
            Some(1)
        );
        assert!(log.observe(id, MachinePhase::Stopped, "again").is_none());
        assert_eq!(
            log.observe(id, MachinePhase::Running, "started")
                .map(|e| e.sequence),
            Some(2)
        );
        log.baseline(id, MachinePhase::Crashed);
        assert!(log
            .observe(id, MachinePhase::Crashed, "seen by poller")
            .is_none());
    }

    #[tokio::test]
    async fn resumes_after_a_sequence_and_then_follows_live() {
        let log = EventLog::new(2);
        let id = Uuid::new_v4();
        log.observe(id, MachinePhase::Stopped, "a");
        log.observe(id, MachinePhase::Running, "b");
        log.observe(id, MachinePhase::Stopped, "c");
        // Capacity 2: event 1 is forgotten.
        let (backlog, mut rx) = log.subscribe(0).unwrap();
        assert_eq!(
            backlog.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            [2, 3]
        );
        let (backlog, _) = log.subscribe(2).unwrap();
        assert_eq!(backlog.iter().map(|e| e.sequence).collect::<Vec<_>>(), [3]);
        assert!(log.subscribe(3).unwrap().0.is_empty());
        // Event 1 is gone but a client that saw it misses nothing.
        assert_eq!(log.subscribe(1).unwrap().0.len(), 2);
        log.observe(id, MachinePhase::Absent, "deleted");
        let live = rx.recv().await.unwrap();
        assert_eq!((live.sequence, live.phase), (4, MachinePhase::Absent));
        // Now event 2 is gone too: resuming after 1 would skip it unnoticed.
        assert_eq!(
            log.subscribe(1).unwrap_err(),
            ResumeError::Forgotten {
                requested: 1,
                oldest: 3
            }
        );
        // A client that saw sequence 500 from an earlier run of the agent.
        assert_eq!(
            log.subscribe(500).unwrap_err(),
            ResumeError::NeverIssued {
                requested: 500,
                latest: 4
            }
        );
    }
}
