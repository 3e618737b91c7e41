//! Drift between the database and a host, and the repair for each case, as a pure function.
//! Only machines in a settled status (`running`, `stopped`) are judged: a machine in a
//! transition belongs to its workflow, which will settle it.
//!
//! Policy (written down in the README):
//! - the domain of a `running` machine stopped or crashed (its QEMU died, or the guest powered
//!   itself off) → the machine is `stopped`, and wants to be stopped: the tenant sees what
//!   happened in its log and starts it again when it wants to; except a crash of a machine
//!   whose restart policy is `on-failure`, which is started again (within limits the writer
//!   of the repair checks against the machine's recent restarts);
//! - the domain of a `stopped` machine runs (started behind SkyGate's back) → `running`;
//! - the domain of a settled machine is gone → `failed`, naming the host;
//! - a domain with the agent's prefix that no live machine on this host owns → removed once it
//!   has been seen for the grace period (a creation racing the listing is never an orphan for
//!   that long).

use crate::model::machine_on_host::PhaseOnHost;
use crate::model::{MachineId, MachineSnapshot, MachineStatus, RestartPolicy};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// One repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// running → stopped (desired stopped), with why.
    MarkStopped { id: MachineId, reason: String },
    /// running → starting again after a crash (`on-failure`), or stopped past its limits.
    RestartCrashed { id: MachineId, reason: String },
    /// stopped → running.
    MarkRunning { id: MachineId },
    /// → failed, with why.
    MarkFailed { id: MachineId, reason: String },
    /// DeleteMachine of a domain no live machine owns.
    RemoveOrphan { id: MachineId },
}

/// Decides the repairs for one host. `machines` are the live machines placed on it as the
/// database has them; `domains` the phase of each domain its agent lists (`Absent` or missing:
/// no domain); `orphans` remembers since when each unowned domain has been seen (updated here:
/// entries for domains that are gone or owned are dropped).
pub fn decide(
    host: &str,
    machines: &[MachineSnapshot],
    domains: &HashMap<MachineId, PhaseOnHost>,
    orphans: &mut HashMap<MachineId, Instant>,
    now: Instant,
    grace: Duration,
) -> Vec<Repair> {
    let present = |id: &MachineId| domains.get(id).filter(|p| **p != PhaseOnHost::Absent);
    let mut repairs = Vec::new();
    for m in machines {
        let id = m.id;
        let repair = match (m.status, present(&id)) {
            (MachineStatus::Running, Some(PhaseOnHost::Crashed)) => match m.restart_policy {
                RestartPolicy::Never => Some(Repair::MarkStopped {
                    id,
                    reason: format!(
                        "its QEMU on host {host} exited unexpectedly; the machine is stopped, \
                         start it to run it again"
                    ),
                }),
                RestartPolicy::OnFailure => Some(Repair::RestartCrashed {
                    id,
                    reason: format!("its QEMU on host {host} exited unexpectedly"),
                }),
            },
            (MachineStatus::Running, Some(PhaseOnHost::Stopped)) => Some(Repair::MarkStopped {
                id,
                reason: "the guest powered itself off".into(),
            }),
            (MachineStatus::Stopped, Some(PhaseOnHost::Running)) => {
                Some(Repair::MarkRunning { id })
            }
            (MachineStatus::Running | MachineStatus::Stopped, None) => Some(Repair::MarkFailed {
                id,
                reason: format!("its domain disappeared from host {host}"),
            }),
            // Paused, shutting down or unknown: in motion, not judged.
            _ => None,
        };
        repairs.extend(repair);
    }
    let owned = |id: &MachineId| machines.iter().any(|m| m.id == *id);
    orphans.retain(|id, _| present(id).is_some() && !owned(id));
    let mut unowned: Vec<MachineId> = domains
        .iter()
        .filter(|(id, phase)| **phase != PhaseOnHost::Absent && !owned(id))
        .map(|(id, _)| *id)
        .collect();
    // One order whatever the map's: repairs are applied (and logged) in it.
    unowned.sort_by_key(|id| id.0);
    for id in unowned {
        let first_seen = *orphans.entry(id).or_insert(now);
        if now.duration_since(first_seen) >= grace {
            repairs.push(Repair::RemoveOrphan { id });
        }
    }
    repairs
}

#[cfg(test)]
mod tests {
    use super::*;
    use MachineStatus as S;
    use PhaseOnHost as P;

    fn machine(id: MachineId, status: MachineStatus) -> MachineSnapshot {
        MachineSnapshot {
            id,
            status,
            version: 1,
            restart_policy: RestartPolicy::Never,
        }
    }

    fn domains(list: &[(MachineId, PhaseOnHost)]) -> HashMap<MachineId, PhaseOnHost> {
        list.iter().copied().collect()
    }

    #[test]
    fn settled_machines_follow_their_domains() {
        let (a, b, c, d, e) = (
            MachineId::new(),
            MachineId::new(),
            MachineId::new(),
            MachineId::new(),
            MachineId::new(),
        );
        let mut orphans = HashMap::new();
        let repairs = decide(
            "h1",
            &[
                machine(a, S::Running),
                machine(b, S::Stopped),
                machine(c, S::Running),
                machine(d, S::Running),
                machine(e, S::Stopped),
            ],
            &domains(&[
                (a, P::Crashed),
                (b, P::Running),
                (d, P::Running),
                (e, P::Absent),
            ]),
            &mut orphans,
            Instant::now(),
            Duration::from_secs(60),
        );
        assert_eq!(repairs.len(), 4, "{repairs:?}");
        assert!(
            matches!(&repairs[0], Repair::MarkStopped { id, reason } if *id == a && reason.contains("h1"))
        );
        assert_eq!(repairs[1], Repair::MarkRunning { id: b });
        assert!(matches!(&repairs[2], Repair::MarkFailed { id, .. } if *id == c));
        assert!(matches!(&repairs[3], Repair::MarkFailed { id, .. } if *id == e));
    }

    #[test]
    fn only_a_crash_restarts_a_machine_that_asks_for_it() {
        let (crashed, powered_off) = (MachineId::new(), MachineId::new());
        let on_failure = |id| MachineSnapshot {
            restart_policy: RestartPolicy::OnFailure,
            ..machine(id, S::Running)
        };
        let repairs = decide(
            "h1",
            &[on_failure(crashed), on_failure(powered_off)],
            &domains(&[(crashed, P::Crashed), (powered_off, P::Stopped)]),
            &mut HashMap::new(),
            Instant::now(),
            Duration::from_secs(60),
        );
        assert_eq!(repairs.len(), 2, "{repairs:?}");
        assert!(repairs.iter().any(
            |r| matches!(r, Repair::RestartCrashed { id, reason } if *id == crashed && reason.contains("h1"))
        ));
        // A guest that powered itself off meant to: it is not restarted.
        assert!(repairs
            .iter()
            .any(|r| matches!(r, Repair::MarkStopped { id, .. } if *id == powered_off)));
    }

    #[test]
    fn transitional_machines_and_domains_in_motion_are_left_alone() {
        let id = MachineId::new();
        let mut orphans = HashMap::new();
        for status in [
            S::Pending,
            S::Provisioning,
            S::Starting,
            S::Stopping,
            S::Rebooting,
            S::Resizing,
            S::Rebuilding,
            S::Deleting,
            S::Failed,
        ] {
            for listed in [vec![], vec![(id, P::Crashed)], vec![(id, P::Running)]] {
                let r = decide(
                    "h",
                    &[machine(id, status)],
                    &domains(&listed),
                    &mut orphans,
                    Instant::now(),
                    Duration::ZERO,
                );
                assert!(r.is_empty(), "{status}: {r:?}");
            }
        }
        for phase in [P::Paused, P::ShuttingDown, P::Unknown] {
            let r = decide(
                "h",
                &[machine(id, S::Running)],
                &domains(&[(id, phase)]),
                &mut orphans,
                Instant::now(),
                Duration::ZERO,
            );
            assert!(r.is_empty(), "{phase:?}: {r:?}");
        }
    }

    #[test]
    fn orphans_are_removed_only_after_the_grace_period() {
        let orphan = MachineId::new();
        let mut seen = HashMap::new();
        let t0 = Instant::now();
        let grace = Duration::from_secs(60);
        let listed = domains(&[(orphan, P::Running)]);
        assert!(decide("h", &[], &listed, &mut seen, t0, grace).is_empty());
        assert!(decide(
            "h",
            &[],
            &listed,
            &mut seen,
            t0 + Duration::from_secs(30),
            grace
        )
        .is_empty());
        assert_eq!(
            decide("h", &[], &listed, &mut seen, t0 + grace, grace),
            vec![Repair::RemoveOrphan { id: orphan }]
        );
        // Claimed by a machine meanwhile (a creation that committed late): forgotten.
        assert!(decide(
            "h",
            &[machine(orphan, S::Provisioning)],
            &listed,
            &mut seen,
            t0 + grace,
            grace
        )
        .is_empty());
        assert!(seen.is_empty());
    }
}
