//! The machine lifecycle as a pure state machine: what a tenant may ask in each status, and
//! which observed transitions workers and the reconciler may record (docs/machine-lifecycle.md).

use super::MachineId;
use std::fmt;

/// Statuses and desired states are the public API's words (`skygate-api-types`); their rules
/// live here.
pub use skygate_api_types::{DesiredState, MachineStatus, UnknownState};

/// A machine's status as read, with the version a write based on that read must find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineSnapshot {
    pub id: MachineId,
    pub status: MachineStatus,
    pub version: i64,
    /// What to do when its QEMU dies.
    pub restart_policy: super::RestartPolicy,
}

/// A tenant's lifecycle request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Start,
    Stop,
    Reboot,
    Delete,
    /// New vCPUs, memory or a larger disk for a stopped machine.
    Resize,
    /// A fresh disk from the machine's image (or another).
    Rebuild,
}

/// The outcome of an accepted request: the status and desired state to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub status: MachineStatus,
    pub desired: DesiredState,
}

/// Why a request makes no sense in the machine's current status (answered as 409).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a machine that is {status}{hint}")]
pub struct ActionRefused {
    pub action: Action,
    pub status: MachineStatus,
    hint: &'static str,
}

/// Not yet on a hypervisor: a stop or start only changes what will be built.
fn is_unprovisioned(status: MachineStatus) -> bool {
    matches!(status, MachineStatus::Pending | MachineStatus::Provisioning)
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Reboot => "reboot",
            Self::Delete => "delete",
            Self::Resize => "resize",
            Self::Rebuild => "rebuild",
        }
    }
}

/// Decides a tenant's request against the current status and desired state.
///
/// Requests during a transition (`starting`, `stopping`, `rebooting`) are refused rather than
/// queued: the tenant retries once the machine settles, which keeps one workflow per machine.
pub fn request(
    action: Action,
    status: MachineStatus,
    desired: DesiredState,
) -> Result<Transition, ActionRefused> {
    use MachineStatus as S;
    let refuse = |hint: &'static str| ActionRefused {
        action,
        status,
        hint,
    };
    let to = |status, desired| Ok(Transition { status, desired });
    if matches!(status, S::Deleting | S::Deleted) {
        return Err(refuse(""));
    }
    // A move ends on one host or the other by itself (undone at its deadline at the latest);
    // until then the machine is on two hosts' books.
    if status == S::Moving {
        return Err(refuse(
            ": it is being moved to another host; wait until it is running or stopped",
        ));
    }
    match action {
        Action::Delete => to(S::Deleting, DesiredState::Deleted),
        Action::Start => match status {
            S::Stopped => to(S::Starting, DesiredState::Running),
            s if is_unprovisioned(s) && desired == DesiredState::Stopped => {
                to(status, DesiredState::Running)
            }
            S::Failed => Err(refuse(": rebuild it or delete it")),
            S::Stopping => Err(refuse(": wait until it is stopped")),
            S::Resizing | S::Rebuilding => Err(refuse(": wait until it is stopped or running")),
            _ => Err(refuse(": it is already running or about to run")),
        },
        Action::Stop => match status {
            // A start may be waiting (a restart after a crash waits out its backoff): the
            // stop goes after it, and the start, finding the machine stopping, does nothing.
            S::Running | S::Starting => to(S::Stopping, DesiredState::Stopped),
            s if is_unprovisioned(s) && desired == DesiredState::Running => {
                to(status, DesiredState::Stopped)
            }
            S::Rebooting => Err(refuse(": wait until it is running")),
            S::Resizing | S::Rebuilding => Err(refuse(": wait until it is stopped or running")),
            S::Failed => Err(refuse(": rebuild it or delete it")),
            _ => Err(refuse(": it is already stopped or about to stop")),
        },
        Action::Reboot => match status {
            S::Running => to(S::Rebooting, DesiredState::Running),
            _ => Err(refuse(": only a running machine can reboot")),
        },
        // Its QEMU holds the disk and the size while it runs.
        Action::Resize => match status {
            S::Stopped => to(S::Resizing, DesiredState::Stopped),
            S::Running => Err(refuse(": stop it first")),
            _ => Err(refuse(": only a stopped machine can be resized")),
        },
        // Running or stopped, it ends as it was (a running one is stopped for the new disk). A
        // failed machine may be rebuilt too (the store checks it was built on a host): a
        // rebuild that failed, from an image that did not fit, is not a dead end.
        Action::Rebuild => match status {
            S::Running | S::Stopped | S::Failed => to(S::Rebuilding, desired),
            _ => Err(refuse(": wait until it is running or stopped")),
        },
    }
}

/// Whether a worker or the reconciler may record `from -> to` as an observed transition.
pub fn can_transition(from: MachineStatus, to: MachineStatus) -> bool {
    use MachineStatus as S;
    match (from, to) {
        (S::Deleted, _) => false,
        (S::Deleting, S::Deleted) => true,
        // A delete that outlasts its deadline (its host never answers): the tenant may
        // delete again.
        (S::Deleting, S::Failed) => true,
        (S::Deleting, _) => false,
        (_, S::Deleting) => true,
        (S::Pending, S::Provisioning | S::Failed) => true,
        (S::Provisioning, S::Running | S::Stopped | S::Failed) => true,
        (
            S::Running,
            S::Stopping | S::Rebooting | S::Rebuilding | S::Moving | S::Stopped | S::Failed,
        ) => true,
        (S::Stopping, S::Stopped | S::Failed) => true,
        (
            S::Stopped,
            S::Starting | S::Running | S::Resizing | S::Rebuilding | S::Moving | S::Failed,
        ) => true,
        (S::Failed, S::Rebuilding) => true,
        // A move never fails the machine: it ends on its new host or stays on its old one.
        (S::Moving, S::Running | S::Stopped) => true,
        (S::Moving, _) => false,
        (S::Resizing, S::Stopped | S::Failed) => true,
        (S::Rebuilding, S::Running | S::Stopped | S::Failed) => true,
        (S::Starting, S::Running | S::Stopping | S::Stopped | S::Failed) => true,
        (S::Rebooting, S::Running | S::Stopped | S::Failed) => true,
        _ => false,
    }
}

/// Why an observed transition cannot be written: a bug in its writer, not a race.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IllegalTransition {
    #[error("the lifecycle has no transition {from} -> {to}")]
    NotInLifecycle {
        from: MachineStatus,
        to: MachineStatus,
    },
    /// A machine becomes `failed` with a reason...
    #[error("a transition to failed needs a failure reason")]
    MissingReason,
    /// ...and a reason is written only then.
    #[error("a transition to {to} cannot carry a failure reason")]
    UnexpectedReason { to: MachineStatus },
}

/// Checks an observed transition before it is written: `from -> to` is in the lifecycle
/// ([`can_transition`]), and it carries a failure reason exactly when it ends in `failed`.
pub fn check_observed(
    from: MachineStatus,
    to: MachineStatus,
    with_reason: bool,
) -> Result<(), IllegalTransition> {
    if !can_transition(from, to) {
        return Err(IllegalTransition::NotInLifecycle { from, to });
    }
    match (to == MachineStatus::Failed, with_reason) {
        (true, false) => Err(IllegalTransition::MissingReason),
        (false, true) => Err(IllegalTransition::UnexpectedReason { to }),
        _ => Ok(()),
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DesiredState as D;
    use MachineStatus as S;

    /// Every tenant request.
    const ACTIONS: [Action; 6] = [
        Action::Start,
        Action::Stop,
        Action::Reboot,
        Action::Resize,
        Action::Rebuild,
        Action::Delete,
    ];

    #[test]
    fn status_text_round_trips() {
        for s in S::ALL {
            assert_eq!(s.as_str().parse::<S>().unwrap(), s);
        }
        assert!("runnin".parse::<S>().is_err());
        for d in [D::Running, D::Stopped, D::Deleted] {
            assert_eq!(d.as_str().parse::<D>().unwrap(), d);
        }
    }

    #[test]
    fn tenant_requests_follow_the_table() {
        let ok = |a, s, d, ts, td| {
            assert_eq!(
                request(a, s, d),
                Ok(Transition {
                    status: ts,
                    desired: td
                }),
                "{a:?} in {s:?}/{d:?}"
            )
        };
        ok(
            Action::Stop,
            S::Running,
            D::Running,
            S::Stopping,
            D::Stopped,
        );
        ok(
            Action::Start,
            S::Stopped,
            D::Stopped,
            S::Starting,
            D::Running,
        );
        ok(
            Action::Reboot,
            S::Running,
            D::Running,
            S::Rebooting,
            D::Running,
        );
        ok(Action::Stop, S::Pending, D::Running, S::Pending, D::Stopped);
        ok(
            Action::Start,
            S::Pending,
            D::Stopped,
            S::Pending,
            D::Running,
        );
        ok(
            Action::Stop,
            S::Provisioning,
            D::Running,
            S::Provisioning,
            D::Stopped,
        );
        for s in S::ALL {
            if !matches!(s, S::Deleting | S::Deleted | S::Moving) {
                ok(Action::Delete, s, D::Running, S::Deleting, D::Deleted);
            }
        }
        // A stop while a start waits (a restart's backoff) goes first.
        ok(
            Action::Stop,
            S::Starting,
            D::Running,
            S::Stopping,
            D::Stopped,
        );
        // A machine being moved ends on one host or the other first: nothing is accepted.
        for a in ACTIONS {
            assert!(request(a, S::Moving, D::Running).is_err(), "{a}");
        }
        assert!(
            !can_transition(S::Moving, S::Failed),
            "a move never fails its machine"
        );
    }

    #[test]
    fn nonsense_requests_are_refused() {
        let refused = |a, s, d| assert!(request(a, s, d).is_err(), "{a:?} in {s:?}/{d:?}");
        refused(Action::Start, S::Running, D::Running);
        refused(Action::Start, S::Pending, D::Running);
        refused(Action::Start, S::Stopping, D::Stopped);
        refused(Action::Start, S::Failed, D::Running);
        refused(Action::Stop, S::Stopped, D::Stopped);
        refused(Action::Stop, S::Pending, D::Stopped);
        refused(Action::Stop, S::Rebooting, D::Running);
        refused(Action::Reboot, S::Stopped, D::Stopped);
        refused(Action::Reboot, S::Pending, D::Running);
        for a in [Action::Start, Action::Stop, Action::Reboot, Action::Delete] {
            refused(a, S::Deleting, D::Deleted);
            refused(a, S::Deleted, D::Deleted);
        }
    }

    #[test]
    fn refusal_message_names_action_and_status() {
        let err = request(Action::Reboot, S::Stopped, D::Stopped).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot reboot a machine that is stopped: only a running machine can reboot"
        );
    }

    #[test]
    fn observed_transitions_carry_a_reason_exactly_when_they_fail() {
        assert_eq!(check_observed(S::Provisioning, S::Running, false), Ok(()));
        assert_eq!(check_observed(S::Running, S::Failed, true), Ok(()));
        assert_eq!(
            check_observed(S::Pending, S::Running, false),
            Err(IllegalTransition::NotInLifecycle {
                from: S::Pending,
                to: S::Running
            })
        );
        assert_eq!(
            check_observed(S::Running, S::Failed, false),
            Err(IllegalTransition::MissingReason)
        );
        assert_eq!(
            check_observed(S::Stopping, S::Stopped, true),
            Err(IllegalTransition::UnexpectedReason { to: S::Stopped })
        );
    }

    #[test]
    fn observed_transitions_follow_the_lifecycle() {
        assert!(can_transition(S::Pending, S::Provisioning));
        assert!(can_transition(S::Provisioning, S::Running));
        assert!(can_transition(S::Running, S::Stopping));
        assert!(can_transition(S::Stopping, S::Stopped));
        assert!(can_transition(S::Stopped, S::Starting));
        assert!(can_transition(S::Starting, S::Running));
        assert!(can_transition(S::Rebooting, S::Running));
        assert!(can_transition(S::Failed, S::Deleting));
        assert!(can_transition(S::Deleting, S::Deleted));
        assert!(can_transition(S::Deleting, S::Failed));
        assert!(!can_transition(S::Pending, S::Running));
        assert!(!can_transition(S::Deleted, S::Pending));
        assert!(!can_transition(S::Deleting, S::Running));
        assert!(!can_transition(S::Failed, S::Running));
        assert!(!can_transition(S::Stopped, S::Rebooting));
        // Every tenant-accepted request is also a legal observed transition (or no change).
        for s in S::ALL {
            for d in [D::Running, D::Stopped] {
                for a in ACTIONS {
                    if let Ok(t) = request(a, s, d) {
                        assert!(t.status == s || can_transition(s, t.status), "{a:?} {s:?}");
                    }
                }
            }
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// One thing that can happen to a machine: a tenant's request, the worker settling a
        /// transitional status, or a failure observed by the worker or the reconciler.
        #[derive(Debug, Clone, Copy)]
        enum Event {
            Request(Action),
            Settle,
            Fail,
        }

        fn event() -> impl Strategy<Value = Event> {
            prop_oneof![
                prop::sample::select(vec![
                    Action::Start,
                    Action::Stop,
                    Action::Reboot,
                    Action::Delete
                ])
                .prop_map(Event::Request),
                Just(Event::Settle),
                Just(Event::Fail),
            ]
        }

        /// Where the worker takes a transitional status (what `worker` records).
        fn settled(status: MachineStatus, desired: DesiredState) -> MachineStatus {
            let want = match desired {
                DesiredState::Running => S::Running,
                DesiredState::Stopped => S::Stopped,
                DesiredState::Deleted => S::Deleted,
            };
            match status {
                S::Pending => S::Provisioning,
                S::Provisioning | S::Starting | S::Rebooting => want,
                S::Stopping => S::Stopped,
                S::Deleting => S::Deleted,
                other => other,
            }
        }

        proptest! {
            /// Over any history: every change of status is one `can_transition` allows, a
            /// deleted machine stays deleted and accepts nothing, a delete is accepted from
            /// every status but deleting and deleted, and a delete always asks for `deleted`.
            #[test]
            fn any_history_keeps_the_lifecycle_rules(events in prop::collection::vec(event(), 1..60)) {
                let (mut status, mut desired) = (S::Pending, D::Running);
                for e in events {
                    let before = status;
                    match e {
                        Event::Request(action) => {
                            let deletable = !matches!(status, S::Deleting | S::Deleted);
                            match request(action, status, desired) {
                                Ok(t) => {
                                    prop_assert!(status == t.status || can_transition(status, t.status),
                                        "{action} took {status} to {}", t.status);
                                    if action == Action::Delete {
                                        prop_assert_eq!(t.desired, D::Deleted);
                                    }
                                    status = t.status;
                                    desired = t.desired;
                                }
                                Err(refused) => {
                                    prop_assert!(!(action == Action::Delete && deletable),
                                        "delete refused from {status}: {refused}");
                                }
                            }
                        }
                        Event::Settle => {
                            let to = settled(status, desired);
                            if to != status {
                                prop_assert!(can_transition(status, to), "{status} -> {to}");
                                status = to;
                            }
                        }
                        Event::Fail => {
                            if can_transition(status, S::Failed) {
                                status = S::Failed;
                            }
                        }
                    }
                    if before == S::Deleted {
                        prop_assert_eq!(status, S::Deleted, "a deleted machine came back");
                    }
                    if status == S::Deleted {
                        prop_assert_eq!(desired, D::Deleted);
                    }
                }
            }
        }
    }

    #[test]
    fn a_resize_needs_a_stopped_machine_and_a_rebuild_keeps_what_it_was_asked_to_be() {
        assert_eq!(
            request(Action::Resize, S::Stopped, D::Stopped),
            Ok(Transition {
                status: S::Resizing,
                desired: D::Stopped
            })
        );
        for status in [S::Running, S::Pending, S::Starting, S::Resizing, S::Failed] {
            assert!(
                request(Action::Resize, status, D::Stopped).is_err(),
                "{status}"
            );
        }
        for (status, desired) in [(S::Running, D::Running), (S::Stopped, D::Stopped)] {
            assert_eq!(
                request(Action::Rebuild, status, desired),
                Ok(Transition {
                    status: S::Rebuilding,
                    desired
                })
            );
        }
        for status in [S::Provisioning, S::Rebooting, S::Rebuilding, S::Resizing] {
            assert!(
                request(Action::Rebuild, status, D::Running).is_err(),
                "{status}"
            );
        }
        // A failed machine may be rebuilt (out of a failed rebuild, say).
        assert_eq!(
            request(Action::Rebuild, S::Failed, D::Running).map(|t| t.status),
            Ok(S::Rebuilding)
        );
        assert!(can_transition(S::Failed, S::Rebuilding));
        // Neither can be asked twice at once, and both end where the agent leaves them.
        assert!(can_transition(S::Resizing, S::Stopped));
        assert!(!can_transition(S::Resizing, S::Running));
        assert!(can_transition(S::Rebuilding, S::Running));
        assert!(can_transition(S::Rebuilding, S::Stopped));
        assert!(can_transition(S::Rebuilding, S::Deleting));
    }
}
