//! What went wrong calling an agent, decided in one place (`AgentCallError::from_status`)
//! from the gRPC status: its code, the agent's `skygate-reason` and `skygate-step` metadata, and
//! whether an answer arrived at all. Callers match on the variants and never read codes.
//!
//! Why not the bare code: NOT_FOUND is also what a proxy or a wrong route answers, so "the
//! machine is gone" is only ever read from the agent's reason (as omicron reads
//! `NO_SUCH_INSTANCE`, not a 404, in `SledAgentInstanceError::vmm_gone`).

use std::fmt;
use tonic::{Code, Status};

/// The agent's calls, named as in logs and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    HostInfo,
    Ensure,
    Start,
    Stop,
    Reboot,
    Delete,
    Get,
    List,
    Watch,
    Console,
    ExportDisk,
    ImportDisk,
    Release,
}

impl Call {
    pub const ALL: [Call; 13] = [
        Call::HostInfo,
        Call::Ensure,
        Call::Start,
        Call::Stop,
        Call::Reboot,
        Call::Delete,
        Call::Get,
        Call::List,
        Call::Watch,
        Call::Console,
        Call::ExportDisk,
        Call::ImportDisk,
        Call::Release,
    ];

    /// The gRPC method's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Call::HostInfo => "GetHostInfo",
            Call::Ensure => "EnsureMachine",
            Call::Start => "StartMachine",
            Call::Stop => "StopMachine",
            Call::Reboot => "RebootMachine",
            Call::Delete => "DeleteMachine",
            Call::Get => "GetMachine",
            Call::List => "ListMachines",
            Call::Watch => "WatchEvents",
            Call::Console => "GetConsole",
            Call::ExportDisk => "ExportDisk",
            Call::ImportDisk => "ImportDisk",
            Call::Release => "ReleaseMachine",
        }
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why no client for a host could be made (the control plane's settings, not the host).
#[derive(Debug, thiserror::Error)]
pub enum ClientSetupError {
    #[error("agent address {address:?} is not a valid URI")]
    Address {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the agent TLS settings were refused")]
    Tls(#[source] tonic::transport::Error),
    #[error("the host's credential is not a valid header value")]
    Credential,
}

/// A failed agent call. Every variant but `Setup` carries the status as its source: its message
/// is the agent's words (or the transport's, for `Unreachable`).
#[derive(Debug, thiserror::Error)]
pub enum AgentCallError {
    /// No client could be made for the host.
    #[error("no client for host {host}")]
    Setup {
        host: String,
        #[source]
        source: ClientSetupError,
    },
    /// No answer came from the agent: no connection, the link broke, or the call's deadline
    /// passed. Whether the agent acted is unknown.
    #[error("host {host} did not answer {call}")]
    Unreachable {
        host: String,
        call: Call,
        #[source]
        source: Status,
    },
    /// The agent has no domain for the machine (NOT_FOUND with reason `machine-not-found`).
    #[error("host {host} has no domain for the machine ({call})")]
    Gone {
        host: String,
        call: Call,
        #[source]
        source: Status,
    },
    /// The spec's generation is older than the one the agent applied (FAILED_PRECONDITION,
    /// `stale-generation`): a newer request got there first.
    #[error("host {host} has a newer generation of the machine applied ({call})")]
    Stale {
        host: String,
        call: Call,
        #[source]
        source: Status,
    },
    /// The agent applied this generation with another content (FAILED_PRECONDITION,
    /// `generation-conflict`): two writers made one generation.
    #[error("host {host} has a different spec under the same generation ({call})")]
    GenerationConflict {
        host: String,
        call: Call,
        #[source]
        source: Status,
    },
    /// The action needs a running machine (FAILED_PRECONDITION, `not-running`).
    #[error("host {host} cannot {call}: the machine is not running")]
    NotRunning {
        host: String,
        call: Call,
        #[source]
        source: Status,
    },
    /// The agent ran a step of creating or starting the machine and it failed
    /// (`skygate-step` names it: image, disk, seed, define, start).
    #[error("host {host} failed the {step} step of {call}")]
    StepFailed {
        host: String,
        call: Call,
        step: String,
        #[source]
        source: Status,
    },
    /// The agent refused the request as such (INVALID_ARGUMENT, PERMISSION_DENIED,
    /// UNIMPLEMENTED, OUT_OF_RANGE): asking again the same way gets the same answer.
    #[error("host {host} refused {call}")]
    Refused {
        host: String,
        call: Call,
        #[source]
        source: Status,
    },
    /// WatchEvents cannot resume after the sequence asked for (OUT_OF_RANGE): the agent
    /// restarted or the events are no longer kept; resync and watch from 0.
    #[error("host {host} cannot resume its events where asked")]
    ResumeLost {
        host: String,
        #[source]
        source: Status,
    },
    /// Any other answer (INTERNAL, UNAVAILABLE from a hypervisor that is down, UNAUTHENTICATED
    /// while a credential is being replaced, a FAILED_PRECONDITION without a reason, a
    /// NOT_FOUND without one): worth trying again.
    #[error("host {host} failed {call}")]
    Failed {
        host: String,
        call: Call,
        #[source]
        source: Status,
    },
}

impl AgentCallError {
    /// The one decision of what a status from `host`'s agent means.
    pub fn from_status(call: Call, host: &str, status: Status) -> Self {
        let host = host.to_owned();
        // A status built on this side (connect error, broken link, deadline) keeps the local
        // error as its source; one decoded from the agent's answer has none.
        if std::error::Error::source(&status).is_some() {
            return Self::Unreachable {
                host,
                call,
                source: status,
            };
        }
        match status.code() {
            Code::OutOfRange if call == Call::Watch => {
                return Self::ResumeLost {
                    host,
                    source: status,
                }
            }
            // Refusals come before steps: a step that failed because the request is wrong
            // (an image whose digest does not match) is a refusal.
            Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unimplemented
            | Code::OutOfRange => {
                return Self::Refused {
                    host,
                    call,
                    source: status,
                }
            }
            _ => {}
        }
        if let Some(step) = metadata(&status, proto::STEP_METADATA) {
            return Self::StepFailed {
                host,
                call,
                step,
                source: status,
            };
        }
        let reason = metadata(&status, proto::REASON_METADATA);
        match (status.code(), reason.as_deref()) {
            (Code::NotFound, Some(proto::reason::MACHINE_NOT_FOUND)) => Self::Gone {
                host,
                call,
                source: status,
            },
            (Code::FailedPrecondition, Some(proto::reason::STALE_GENERATION)) => Self::Stale {
                host,
                call,
                source: status,
            },
            (Code::FailedPrecondition, Some(proto::reason::GENERATION_CONFLICT)) => {
                Self::GenerationConflict {
                    host,
                    call,
                    source: status,
                }
            }
            (Code::FailedPrecondition, Some(proto::reason::NOT_RUNNING)) => Self::NotRunning {
                host,
                call,
                source: status,
            },
            _ => Self::Failed {
                host,
                call,
                source: status,
            },
        }
    }

    /// Whether the host has no domain for the machine (omicron's `vmm_gone`).
    pub fn is_gone(&self) -> bool {
        matches!(self, Self::Gone { .. })
    }

    /// A short name of the variant, for metric labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Setup { .. } => "setup",
            Self::Unreachable { .. } => "unreachable",
            Self::Gone { .. } => "gone",
            Self::Stale { .. } => "stale",
            Self::GenerationConflict { .. } => "generation_conflict",
            Self::NotRunning { .. } => "not_running",
            Self::StepFailed { .. } => "step_failed",
            Self::Refused { .. } => "refused",
            Self::ResumeLost { .. } => "resume_lost",
            Self::Failed { .. } => "failed",
        }
    }

    fn status(&self) -> Option<&Status> {
        match self {
            Self::Setup { .. } => None,
            Self::Unreachable { source, .. }
            | Self::Gone { source, .. }
            | Self::Stale { source, .. }
            | Self::GenerationConflict { source, .. }
            | Self::NotRunning { source, .. }
            | Self::StepFailed { source, .. }
            | Self::Refused { source, .. }
            | Self::ResumeLost { source, .. }
            | Self::Failed { source, .. } => Some(source),
        }
    }

    /// The gRPC code, as tenants' events name it ("Unavailable"); `None` for `Setup`.
    pub fn code(&self) -> Option<Code> {
        self.status().map(Status::code)
    }

    /// What the agent (or, when it did not answer, the transport) said; for `Setup`, why no
    /// client could be made.
    pub fn said(&self) -> String {
        match self {
            Self::Setup { source, .. } => source.to_string(),
            other => other
                .status()
                .map(|s| s.message().to_owned())
                .unwrap_or_default(),
        }
    }
}

fn metadata(status: &Status, key: &str) -> Option<String> {
    status
        .metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::{MetadataMap, MetadataValue};

    fn answered(code: Code, pairs: &[(&'static str, &'static str)]) -> Status {
        let mut metadata = MetadataMap::new();
        for (k, v) in pairs {
            metadata.insert(*k, MetadataValue::from_static(v));
        }
        Status::with_metadata(code, "the agent's words", metadata)
    }

    fn decide(call: Call, status: Status) -> AgentCallError {
        AgentCallError::from_status(call, "h1", status)
    }

    #[test]
    fn gone_only_when_the_agent_says_the_machine_is_not_found() {
        let gone = decide(
            Call::Start,
            answered(
                Code::NotFound,
                &[(proto::REASON_METADATA, proto::reason::MACHINE_NOT_FOUND)],
            ),
        );
        assert!(gone.is_gone(), "{gone:?}");
        // A bare NOT_FOUND may be a proxy or a route the agent does not serve.
        let bare = decide(Call::Start, answered(Code::NotFound, &[]));
        assert_eq!(bare.kind(), "failed");
        let other_reason = decide(
            Call::Start,
            answered(
                Code::NotFound,
                &[(proto::REASON_METADATA, proto::reason::NOT_RUNNING)],
            ),
        );
        assert!(!other_reason.is_gone());
    }

    #[test]
    fn failed_preconditions_are_told_apart_by_their_reason() {
        let with = |reason| {
            decide(
                Call::Ensure,
                answered(
                    Code::FailedPrecondition,
                    &[(proto::REASON_METADATA, reason)],
                ),
            )
            .kind()
        };
        assert_eq!(with(proto::reason::STALE_GENERATION), "stale");
        assert_eq!(
            with(proto::reason::GENERATION_CONFLICT),
            "generation_conflict"
        );
        assert_eq!(with(proto::reason::NOT_RUNNING), "not_running");
        assert_eq!(
            decide(Call::Ensure, answered(Code::FailedPrecondition, &[])).kind(),
            "failed"
        );
    }

    #[test]
    fn refusals_come_before_steps_and_steps_before_other_failures() {
        for code in [
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::Unimplemented,
            Code::OutOfRange,
        ] {
            let e = decide(
                Call::Ensure,
                answered(code, &[(proto::STEP_METADATA, "image")]),
            );
            assert_eq!(e.kind(), "refused", "{code:?}");
        }
        let step = decide(
            Call::Ensure,
            answered(Code::Internal, &[(proto::STEP_METADATA, "disk")]),
        );
        assert!(
            matches!(&step, AgentCallError::StepFailed { step, .. } if step == "disk"),
            "{step:?}"
        );
        assert_eq!(step.said(), "the agent's words");
        for code in [
            Code::Internal,
            Code::Unavailable,
            Code::Unauthenticated,
            Code::ResourceExhausted,
        ] {
            assert_eq!(decide(Call::Ensure, answered(code, &[])).kind(), "failed");
        }
    }

    #[test]
    fn out_of_range_on_a_watch_means_resync() {
        let e = decide(Call::Watch, answered(Code::OutOfRange, &[]));
        assert_eq!(e.kind(), "resume_lost");
    }

    #[test]
    fn a_status_made_on_this_side_means_no_answer() {
        // What tonic builds for a refused connection or an expired deadline: the local error
        // stays as its source.
        let local = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(local.code(), Code::Cancelled);
        let e = decide(Call::List, local);
        assert_eq!(e.kind(), "unreachable");
        assert_eq!(e.code(), Some(Code::Cancelled));
        let refused = Status::from_error(Box::new(tonic::ConnectError(Box::new(
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        ))));
        assert_eq!(decide(Call::Ensure, refused).kind(), "unreachable");
    }

    #[test]
    fn messages_name_the_host_and_call_but_not_the_source() {
        let e = decide(Call::Stop, answered(Code::Internal, &[]));
        let text = e.to_string();
        assert!(
            text.contains("h1") && text.contains("StopMachine"),
            "{text}"
        );
        assert!(!text.contains("the agent's words"), "{text}");
    }
}
