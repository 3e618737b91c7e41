//! Drift between the database and a host, and the repair for each case, as a pure function.
//! Only machines in a settled status (`running`, `stopped`) are judged: a machine in a
//! transition belongs to its workflow, which will settle it.
//!
//! Policy (written down in the README):
//! - the domain of a `running` machine stopped or crashed (its QEMU died, or the guest powered
//!   itself off) → the machine is `stopped`, and wants to be stopped: the tenant sees what
//!   happened in its log and starts it again when it wants to;
//! - the domain of a `stopped` machine runs (started behind SkyGate's back) → `running`;
//! - the domain of a settled machine is gone → `failed`, naming the host;
//! - a domain with the agent's prefix that no live machine on this host owns → removed once it
//!   has been seen for the grace period (a creation racing the listing is never an orphan for
//!   that long).

use crate::model::MachineStatus;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// What the agent reports for one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actual {
    Running,
    /// Defined and off (shut down normally).
    Stopped,
    /// Its QEMU died.
    Crashed,
    /// Paused or shutting down: in motion, not judged.
    Other,
}

/// One repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// running → stopped (desired stopped), with why.
    MarkStopped { id: Uuid, reason: String },
    /// stopped → running.
    MarkRunning { id: Uuid },
    /// → failed, with why.
    MarkFailed { id: Uuid, reason: String },
    /// DeleteMachine of a domain no live machine owns.
    RemoveOrphan { id: Uuid },
}

/// Decides the repairs for one host. `machines` are the live machines placed on it with their
/// status; `actual` what its agent lists; `orphans` remembers since when each unowned domain
/// has been seen (updated here: entries for domains that are gone or owned are dropped).
pub fn decide(
    host: &str,
    machines: &[(Uuid, MachineStatus)],
    actual: &[(Uuid, Actual)],
    orphans: &mut HashMap<Uuid, Instant>,
    now: Instant,
    grace: Duration,
) -> Vec<Repair> {
    let reported: HashMap<Uuid, Actual> = actual.iter().copied().collect();
    let owned: HashMap<Uuid, MachineStatus> = machines.iter().copied().collect();
    let mut repairs = Vec::new();
    for (id, status) in machines {
        let repair = match (status, reported.get(id)) {
            (MachineStatus::Running, Some(Actual::Crashed)) => Some(Repair::MarkStopped {
                id: *id,
                reason: format!(
                    "its QEMU on host {host} exited unexpectedly; the machine is stopped, start \
                     it to run it again"
                ),
            }),
            (MachineStatus::Running, Some(Actual::Stopped)) => Some(Repair::MarkStopped {
                id: *id,
                reason: "the guest powered itself off".into(),
            }),
            (MachineStatus::Stopped, Some(Actual::Running)) => {
                Some(Repair::MarkRunning { id: *id })
            }
            (MachineStatus::Running | MachineStatus::Stopped, None) => Some(Repair::MarkFailed {
                id: *id,
                reason: format!("its domain disappeared from host {host}"),
            }),
            _ => None,
        };
        repairs.extend(repair);
    }
    orphans.retain(|id, _| reported.contains_key(id) && !owned.contains_key(id));
    for (id, _) in actual {
        if owned.contains_key(id) {
            continue;
        }
        let first_seen = *orphans.entry(*id).or_insert(now);
        if now.duration_since(first_seen) >= grace {
            repairs.push(Repair::RemoveOrphan { id: *id });
        }
    }
    repairs
}

#[cfg(test)]
mod tests {
    use super::*;
    use MachineStatus as S;

    #[test]
    fn settled_machines_follow_their_domains() {
        let (a, b, c, d) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        let mut orphans = HashMap::new();
        let repairs = decide(
            "h1",
            &[
                (a, S::Running),
                (b, S::Stopped),
                (c, S::Running),
                (d, S::Running),
            ],
            &[
                (a, Actual::Crashed),
                (b, Actual::Running),
                (d, Actual::Running),
            ],
            &mut orphans,
            Instant::now(),
            Duration::from_secs(60),
        );
        assert_eq!(repairs.len(), 3, "{repairs:?}");
        assert!(
            matches!(&repairs[0], Repair::MarkStopped { id, reason } if *id == a && reason.contains("h1"))
        );
        assert_eq!(repairs[1], Repair::MarkRunning { id: b });
        assert!(matches!(&repairs[2], Repair::MarkFailed { id, .. } if *id == c));
    }

    #[test]
    fn transitional_machines_are_left_to_their_workflows() {
        let id = Uuid::new_v4();
        let mut orphans = HashMap::new();
        for status in [
            S::Pending,
            S::Provisioning,
            S::Starting,
            S::Stopping,
            S::Rebooting,
            S::Deleting,
            S::Failed,
        ] {
            for actual in [
                vec![],
                vec![(id, Actual::Crashed)],
                vec![(id, Actual::Running)],
            ] {
                let r = decide(
                    "h",
                    &[(id, status)],
                    &actual,
                    &mut orphans,
                    Instant::now(),
                    Duration::ZERO,
                );
                assert!(r.is_empty(), "{status}: {r:?}");
            }
        }
    }

    #[test]
    fn orphans_are_removed_only_after_the_grace_period() {
        let orphan = Uuid::new_v4();
        let mut seen = HashMap::new();
        let t0 = Instant::now();
        let grace = Duration::from_secs(60);
        let actual = [(orphan, Actual::Running)];
        assert!(decide("h", &[], &actual, &mut seen, t0, grace).is_empty());
        assert!(decide(
            "h",
            &[],
            &actual,
            &mut seen,
            t0 + Duration::from_secs(30),
            grace
        )
        .is_empty());
        assert_eq!(
            decide("h", &[], &actual, &mut seen, t0 + grace, grace),
            vec![Repair::RemoveOrphan { id: orphan }]
        );
        // Claimed by a machine meanwhile (a creation that committed late): forgotten.
        assert!(decide(
            "h",
            &[(orphan, S::Provisioning)],
            &actual,
            &mut seen,
            t0 + grace,
            grace
        )
        .is_empty());
        assert!(seen.is_empty());
    }
}
