//! The worker's decisions, as plain functions: how long a status may last, which agent
//! errors are worth retrying, and how long to wait before the next attempt.

use crate::agents::AgentCallError;
use crate::model::MachineStatus;
use crate::timing::WorkflowSettings;
use std::time::Duration;

/// How long a machine may stay in `status` before it fails; `None` for settled statuses.
pub fn deadline(status: MachineStatus, s: &WorkflowSettings) -> Option<Duration> {
    use MachineStatus as S;
    match status {
        S::Pending => Some(s.placement_timeout),
        S::Provisioning
        | S::Starting
        | S::Stopping
        | S::Rebooting
        | S::Resizing
        | S::Rebuilding
        | S::Moving
        | S::Deleting => Some(s.transition_timeout),
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
    /// The agent ran a step and it failed: try again [`MAX_STEP_FAILURES`] times in all.
    Step,
    /// The agent refused the request as such: fail the machine with the agent's reason.
    Permanent,
}

/// Classifies an agent's error for a task (a machine that is gone is the caller's to judge:
/// for a power action it fails the machine).
pub fn classify(error: &AgentCallError) -> ErrorClass {
    match error {
        // A generation conflict is the host holding other content at the generation we send:
        // sending it again cannot change that, so the machine fails with the agent's words
        // instead of waiting out its deadline.
        AgentCallError::Refused { .. } | AgentCallError::GenerationConflict { .. } => {
            ErrorClass::Permanent
        }
        AgentCallError::StepFailed { .. } => ErrorClass::Step,
        // Not answering is the host's state, not the request's: the host monitor marks it
        // unreachable and the deadline bounds the wait.
        // UNAUTHENTICATED (in `Failed`) is about the host, not the request: its agent is
        // between a reset and its new credential, or joined a moment ago and has not taken its
        // credential up yet. The next try (or the host's repair) settles it.
        // A stale generation is a retry racing a later request: re-reading the machine and
        // trying again resolves it; a refusal without a reason ends at the deadline with the
        // agent's words.
        AgentCallError::Setup { .. }
        | AgentCallError::Unreachable { .. }
        | AgentCallError::Gone { .. }
        | AgentCallError::Stale { .. }
        | AgentCallError::NotRunning { .. }
        | AgentCallError::ResumeLost { .. }
        | AgentCallError::Failed { .. } => ErrorClass::Transient,
    }
}

/// How many times an agent step (fetch image, create disk, write seed, define, start) may fail
/// before the machine fails with the step's reason. A step that failed five times in about
/// fifteen seconds (1 + 2 + 4 + 8 s apart) is broken, not flaky, and the tenant learns it
/// then instead of at the transition deadline minutes later. Outages (the host not answering)
/// are not step failures: those wait for the host until the deadline.
pub const MAX_STEP_FAILURES: i64 = 5;

/// After the `failures`-th failure of a step: how long until the next try, or `None` to give
/// up.
pub fn step_retry(failures: i64) -> Option<Duration> {
    (failures < MAX_STEP_FAILURES).then(|| backoff(failures))
}

/// Agent text as a tenant may read it: absolute paths (the agent's data dir, tool locations)
/// are cut to their last component, which is all a tenant needs to recognise the file.
/// A path starts with `/` at the start of the text or after whitespace, a quote, `=`, `(` or `[`
/// (so the `//` of a URL is left alone) and runs to the next space, quote, `)`, `]` or `,`.
pub fn tenant_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut prev: Option<char> = None;
    while let Some(c) = rest.chars().next() {
        let starts_path = c == '/'
            && prev.is_none_or(|p| p.is_whitespace() || matches!(p, '"' | '\'' | '=' | '(' | '['));
        if starts_path {
            let end = rest
                .find(|ch: char| ch.is_whitespace() || matches!(ch, '"' | '\'' | ')' | ']' | ','))
                .unwrap_or(rest.len());
            let path = &rest[..end];
            let last = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
            out.push_str(if last.is_empty() { "/" } else { last });
            prev = path.chars().last();
            rest = &rest[end..];
        } else {
            out.push(c);
            prev = Some(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
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
        use crate::agents::Call;
        use tonic::{Code, Status};
        let classify_status =
            |status| classify(&AgentCallError::from_status(Call::Ensure, "h", status));
        let classify = |code| classify_status(Status::new(code, "x"));
        assert_eq!(classify(Code::InvalidArgument), ErrorClass::Permanent);
        assert_eq!(classify(Code::Unauthenticated), ErrorClass::Transient);
        assert_eq!(classify(Code::Unavailable), ErrorClass::Transient);
        assert_eq!(classify(Code::DeadlineExceeded), ErrorClass::Transient);
        assert_eq!(classify(Code::FailedPrecondition), ErrorClass::Transient);
        let with_reason = |reason: &'static str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert(
                proto::REASON_METADATA,
                tonic::metadata::MetadataValue::from_static(reason),
            );
            classify_status(Status::with_metadata(Code::FailedPrecondition, "x", m))
        };
        assert_eq!(
            with_reason(proto::reason::GENERATION_CONFLICT),
            ErrorClass::Permanent
        );
        assert_eq!(
            with_reason(proto::reason::STALE_GENERATION),
            ErrorClass::Transient
        );
    }

    #[test]
    fn a_failed_step_is_a_step_unless_the_request_itself_was_refused() {
        use crate::agents::Call;
        use tonic::metadata::{MetadataMap, MetadataValue};
        use tonic::{Code, Status};
        let step = |code| {
            let mut m = MetadataMap::new();
            m.insert(proto::STEP_METADATA, MetadataValue::from_static("disk"));
            classify(&AgentCallError::from_status(
                Call::Ensure,
                "h",
                Status::with_metadata(code, "x", m),
            ))
        };
        assert_eq!(step(Code::Internal), ErrorClass::Step);
        assert_eq!(step(Code::Unavailable), ErrorClass::Step);
        assert_eq!(step(Code::InvalidArgument), ErrorClass::Permanent);
    }

    #[test]
    fn a_step_is_retried_four_times_then_given_up() {
        let waits: Vec<Option<u64>> = (1..=6)
            .map(|f| step_retry(f).map(|d| d.as_secs()))
            .collect();
        assert_eq!(waits, [Some(1), Some(2), Some(4), Some(8), None, None]);
    }

    #[test]
    fn tenant_text_keeps_file_names_and_drops_host_paths() {
        let cases = [
            (
                "create disk failed: cannot run \"/usr/bin/prlimit\": No such file or directory",
                "create disk failed: cannot run \"prlimit\": No such file or directory",
            ),
            (
                "qemu-img create -f qcow2 -b /var/lib/skygate/images/ab12.qcow2 /var/lib/skygate/machines/x/disk.qcow2 1G failed",
                "qemu-img create -f qcow2 -b ab12.qcow2 disk.qcow2 1G failed",
            ),
            ("Cannot access storage file '/srv/a b/disk' (as uid:64055)", "Cannot access storage file 'a b/disk' (as uid:64055)"),
            ("GET http://images.example/tiny/kernel: 404", "GET http://images.example/tiny/kernel: 404"),
            ("path=/var/lib/x, then (/tmp/y)", "path=x, then (y)"),
            ("stderr:\n/var/lib/a: denied\t/etc/b", "stderr:\na: denied\tb"),
            ("/", "/"),
            ("", ""),
            ("no paths here", "no paths here"),
        ];
        for (input, want) in cases {
            assert_eq!(tenant_text(input), want, "{input}");
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let secs: Vec<u64> = (0..9).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(secs, [1, 1, 2, 4, 8, 16, 30, 30, 30]);
    }
}
