//! The workflows' decisions, as plain functions: how long a status may last, which agent
//! errors are worth retrying, and how long to wait before the next attempt.

use super::WorkflowSettings;
use crate::model::MachineStatus;
use std::time::Duration;
use tonic::Code;

/// How long a machine may stay in `status` before it fails; `None` for settled statuses.
pub fn deadline(status: MachineStatus, s: &WorkflowSettings) -> Option<Duration> {
    use MachineStatus as S;
    match status {
        S::Pending => Some(s.placement_timeout),
        S::Provisioning | S::Starting | S::Stopping | S::Rebooting | S::Deleting => {
            Some(s.transition_timeout)
        }
        S::Running | S::Stopped | S::Deleted | S::Failed => None,
    }
}

/// The failure reason of a machine that outlasted `limit` in `status`.
pub fn timeout_reason(status: MachineStatus, limit: Duration) -> String {
    format!("timed out: {status} for more than {} s", limit.as_secs())
}

/// What to do about an agent's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The agent or the network hiccuped: try again (until the deadline).
    Transient,
    /// The agent refused the request as such: fail the machine with the agent's reason.
    Permanent,
}

/// Classifies a gRPC status from an agent.
pub fn classify(code: Code) -> ErrorClass {
    match code {
        Code::InvalidArgument
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented
        | Code::OutOfRange => ErrorClass::Permanent,
        // FAILED_PRECONDITION includes "a newer generation was applied" (a retry racing a
        // later request): re-reading the machine and trying again resolves it, and a real
        // refusal (a bad image) ends at the deadline with the agent's words.
        _ => ErrorClass::Transient,
    }
}

/// Wait before attempt `attempts + 1`: 1 s, 2 s, 4 s ... capped at 30 s.
pub fn backoff(attempts: i64) -> Duration {
    let exp = u32::try_from(attempts.clamp(1, 6) - 1).unwrap_or(0);
    Duration::from_secs(1u64 << exp).min(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transitional_status_has_a_deadline_and_settled_ones_none() {
        let s = WorkflowSettings::default();
        for status in MachineStatus::ALL {
            let transitional = !matches!(
                status,
                MachineStatus::Running
                    | MachineStatus::Stopped
                    | MachineStatus::Deleted
                    | MachineStatus::Failed
            );
            assert_eq!(deadline(status, &s).is_some(), transitional, "{status}");
        }
        assert_eq!(
            deadline(MachineStatus::Pending, &s),
            Some(s.placement_timeout)
        );
    }

    #[test]
    fn refusals_are_permanent_and_outages_transient() {
        assert_eq!(classify(Code::InvalidArgument), ErrorClass::Permanent);
        assert_eq!(classify(Code::Unauthenticated), ErrorClass::Permanent);
        assert_eq!(classify(Code::Unavailable), ErrorClass::Transient);
        assert_eq!(classify(Code::DeadlineExceeded), ErrorClass::Transient);
        assert_eq!(classify(Code::FailedPrecondition), ErrorClass::Transient);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let secs: Vec<u64> = (0..9).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(secs, [1, 1, 2, 4, 8, 16, 30, 30, 30]);
    }
}
