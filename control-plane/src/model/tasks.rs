//! The durable work a machine's lifecycle leaves behind: the kinds of task a worker carries
//! out, and which one (if any) an accepted tenant request needs. Pure.

use super::machine_state::Action;
use super::MachineStatus;
use std::fmt;
use std::str::FromStr;

/// What a task does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskKind {
    Provision,
    Start,
    Stop,
    Reboot,
    Delete,
    /// Sends a resized machine's new spec to its host.
    Resize,
    /// Sends a rebuilt machine's new spec (a newer disk generation) to its host.
    Rebuild,
    /// Moves a machine to another host (evacuating its host).
    Move,
}

impl TaskKind {
    pub const ALL: [TaskKind; 8] = [
        TaskKind::Provision,
        TaskKind::Start,
        TaskKind::Stop,
        TaskKind::Reboot,
        TaskKind::Delete,
        TaskKind::Resize,
        TaskKind::Rebuild,
        TaskKind::Move,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Provision => "provision",
            TaskKind::Start => "start",
            TaskKind::Stop => "stop",
            TaskKind::Reboot => "reboot",
            TaskKind::Delete => "delete",
            TaskKind::Resize => "resize",
            TaskKind::Rebuild => "rebuild",
            TaskKind::Move => "move",
        }
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task kind that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown task kind '{0}'")]
pub struct UnknownTaskKind(pub String);

impl FromStr for TaskKind {
    type Err = UnknownTaskKind;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownTaskKind(s.to_owned()))
    }
}

/// What carrying out an accepted request takes, besides writing its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowUp {
    /// A worker drives the machine's host: queue this task with the request.
    Queue(TaskKind),
    /// A delete of a machine never placed on a host: nothing on a hypervisor to clean up, so
    /// it completes with the request.
    DeleteNow,
    /// Nothing: a start or stop of a machine not built yet only changes what its
    /// provisioning will build.
    Nothing,
}

/// The follow-up of `action`, accepted and leaving the machine in `status`; `placed` says
/// whether the machine has a host.
pub fn follow_up(action: Action, status: MachineStatus, placed: bool) -> FollowUp {
    use MachineStatus as S;
    match (action, status) {
        (Action::Start, S::Starting) => FollowUp::Queue(TaskKind::Start),
        (Action::Stop, S::Stopping) => FollowUp::Queue(TaskKind::Stop),
        (Action::Reboot, S::Rebooting) => FollowUp::Queue(TaskKind::Reboot),
        (Action::Resize, S::Resizing) => FollowUp::Queue(TaskKind::Resize),
        (Action::Rebuild, S::Rebuilding) => FollowUp::Queue(TaskKind::Rebuild),
        (Action::Delete, _) if placed => FollowUp::Queue(TaskKind::Delete),
        (Action::Delete, _) => FollowUp::DeleteNow,
        _ => FollowUp::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MachineStatus as S;

    #[test]
    fn kinds_round_trip_through_text() {
        for k in TaskKind::ALL {
            assert_eq!(k.as_str().parse::<TaskKind>(), Ok(k));
        }
        assert_eq!(
            "resize-disk".parse::<TaskKind>(),
            Err(UnknownTaskKind("resize-disk".into()))
        );
    }

    #[test]
    fn power_requests_on_a_built_machine_queue_their_task() {
        assert_eq!(
            follow_up(Action::Start, S::Starting, true),
            FollowUp::Queue(TaskKind::Start)
        );
        assert_eq!(
            follow_up(Action::Stop, S::Stopping, true),
            FollowUp::Queue(TaskKind::Stop)
        );
        assert_eq!(
            follow_up(Action::Reboot, S::Rebooting, true),
            FollowUp::Queue(TaskKind::Reboot)
        );
    }

    #[test]
    fn power_requests_before_the_machine_is_built_queue_nothing() {
        // A stop during provisioning only changes what provisioning builds.
        assert_eq!(
            follow_up(Action::Stop, S::Provisioning, true),
            FollowUp::Nothing
        );
        assert_eq!(
            follow_up(Action::Start, S::Pending, false),
            FollowUp::Nothing
        );
    }

    #[test]
    fn a_delete_needs_its_host_only_when_it_has_one() {
        assert_eq!(
            follow_up(Action::Delete, S::Deleting, true),
            FollowUp::Queue(TaskKind::Delete)
        );
        assert_eq!(
            follow_up(Action::Delete, S::Deleting, false),
            FollowUp::DeleteNow
        );
    }
}
