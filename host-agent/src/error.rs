//! The agent's error type, and its one mapping to gRPC status codes.

use tonic::{Code, Status};
use uuid::Uuid;

use crate::disks::DiskError;
use crate::domain_xml::{DomainXmlError, MetadataError};
use crate::hypervisor::HypervisorError;
use crate::images::ImageError;
use crate::machines::SpecError;
use crate::paths::PathsError;
use crate::ports::PortsExhausted;
use crate::seed::SeedError;

/// Everything an agent operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request is malformed.
    #[error("invalid request: {0}")]
    InvalidSpec(#[from] SpecError),
    /// No domain for this machine on this host.
    #[error("machine {0} has no domain on this host")]
    NotFound(Uuid),
    /// A spec older than the one applied.
    #[error("generation {requested} is older than the applied generation {applied}")]
    StaleGeneration {
        /// The generation in the request.
        requested: u64,
        /// The generation of the defined domain.
        applied: u64,
    },
    /// The action needs a running machine.
    #[error("machine {0} is not running")]
    NotRunning(Uuid),
    /// A domain with our name whose metadata is not ours or is unreadable.
    #[error("domain {name} has unreadable SkyGate metadata: {source}")]
    ForeignDomain {
        /// The domain.
        name: String,
        /// Why.
        #[source]
        source: MetadataError,
    },
    /// Fetching or verifying an image failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// qemu-img failed or refused a base.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The seed could not be built.
    #[error(transparent)]
    Seed(#[from] SeedError),
    /// The domain XML could not be rendered.
    #[error(transparent)]
    DomainXml(#[from] DomainXmlError),
    /// The hypervisor failed.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// The data directory is unusable.
    #[error(transparent)]
    Paths(#[from] PathsError),
    /// No port left to forward.
    #[error(transparent)]
    Ports(#[from] PortsExhausted),
    /// WatchEvents cannot resume where asked.
    #[error(transparent)]
    Resume(#[from] crate::events::ResumeError),
    /// A step of creating or starting a machine failed; the tenant reads which, and why, in
    /// the machine's events.
    #[error("{step} failed")]
    Step {
        /// The step.
        step: crate::machines::CreateStep,
        /// Why.
        #[source]
        source: Box<AgentError>,
    },
    /// Reading or removing a machine's files failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    /// The gRPC code callers act on: INVALID_ARGUMENT and FAILED_PRECONDITION are not worth
    /// retrying as they are; UNAVAILABLE is.
    pub fn code(&self) -> Code {
        match self {
            AgentError::InvalidSpec(_) | AgentError::DomainXml(_) => Code::InvalidArgument,
            AgentError::NotFound(_) => Code::NotFound,
            AgentError::StaleGeneration { .. }
            | AgentError::NotRunning(_)
            | AgentError::ForeignDomain { .. } => Code::FailedPrecondition,
            // The image's record is wrong (a refused source, bytes that do not match the
            // digest, an image over the limit): fetching again gives the same answer, so the
            // caller is told to stop. Only a failed fetch may heal (a server back up).
            AgentError::Image(e) => match e {
                ImageError::BadDigest(_)
                | ImageError::BadUrl { .. }
                | ImageError::NotAllowed { .. }
                | ImageError::DigestMismatch { .. }
                | ImageError::TooLarge { .. } => Code::InvalidArgument,
                ImageError::Fetch { .. } => Code::Unavailable,
                ImageError::Client(_) | ImageError::Io { .. } | ImageError::Dir(_) => {
                    Code::Internal
                }
            },
            AgentError::Disk(e) => match e {
                DiskError::Io { .. }
                | DiskError::Spawn { .. }
                | DiskError::Timeout { .. }
                | DiskError::Failed { .. } => Code::Internal,
                _ => Code::FailedPrecondition,
            },
            AgentError::Seed(e) => match e {
                SeedError::BadHostname(_)
                | SeedError::BadInstanceId(_)
                | SeedError::BadKey { .. } => Code::InvalidArgument,
                _ => Code::Internal,
            },
            AgentError::Hypervisor(HypervisorError::Unreachable(_)) => Code::Unavailable,
            AgentError::Hypervisor(_) | AgentError::Paths(_) | AgentError::Io { .. } => {
                Code::Internal
            }
            AgentError::Ports(_) => Code::ResourceExhausted,
            AgentError::Resume(_) => Code::OutOfRange,
            AgentError::Step { source, .. } => source.code(),
        }
    }
}

/// Whether `e` is an error whose sources callers must not read ([`ImageError::hides_cause`]),
/// as itself or wrapped in an [`AgentError`] (which shows an image error transparently).
fn hides_cause(e: &(dyn std::error::Error + 'static)) -> bool {
    let image = e
        .downcast_ref::<ImageError>()
        .or_else(|| match e.downcast_ref::<AgentError>() {
            Some(AgentError::Image(i)) => Some(i),
            _ => None,
        })
        .or_else(|| match e.downcast_ref::<Box<AgentError>>().map(|b| &**b) {
            Some(AgentError::Image(i)) => Some(i),
            _ => None,
        });
    image.is_some_and(ImageError::hides_cause)
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Self {
        // The message chain helps the operator; it carries paths and libvirt text, never the
        // agent token or tenant user data. It stops at an error whose cause stays in the
        // agent's log (an image fetch: the OS's words would tell which files exist).
        let mut message = e.to_string();
        let mut source = if hides_cause(&e) {
            None
        } else {
            std::error::Error::source(&e)
        };
        while let Some(s) = source {
            let text = s.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = if hides_cause(s) { None } else { s.source() };
        }
        let mut metadata = tonic::metadata::MetadataMap::new();
        if let AgentError::Step { step, .. } = &e {
            metadata.insert(
                proto::STEP_METADATA,
                tonic::metadata::MetadataValue::from_static(step.as_str()),
            );
        }
        Status::with_metadata(e.code(), message, metadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::{FetchError, SourceRule};
    use crate::machines::CreateStep;

    fn step(e: ImageError) -> AgentError {
        AgentError::Step {
            step: CreateStep::Image,
            source: Box::new(AgentError::Image(e)),
        }
    }

    fn mismatch() -> ImageError {
        ImageError::DigestMismatch {
            url: "http://127.0.0.1/image".into(),
            expected: "a".repeat(64).parse().unwrap(),
            actual: "b".repeat(64).parse().unwrap(),
        }
    }

    fn fetch_failure() -> ImageError {
        ImageError::Fetch {
            url: "file:///srv/images/disk".into(),
            source: FetchError::Read {
                path: "/srv/images/disk".into(),
                source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            },
        }
    }

    /// INVALID_ARGUMENT is what the control plane fails a machine on at once (its
    /// `workflows::policy::classify`); a mismatch or a refused source will not heal on a retry.
    #[test]
    fn a_digest_mismatch_and_a_refused_source_are_final_a_failed_fetch_is_not() {
        let refused = || ImageError::NotAllowed {
            url: "file:///etc/shadow".into(),
            rule: SourceRule::FileOutsideImageDirs,
        };
        for (e, code) in [
            (AgentError::Image(mismatch()), Code::InvalidArgument),
            (step(mismatch()), Code::InvalidArgument),
            (AgentError::Image(refused()), Code::InvalidArgument),
            (step(refused()), Code::InvalidArgument),
            (AgentError::Image(fetch_failure()), Code::Unavailable),
            (step(fetch_failure()), Code::Unavailable),
        ] {
            assert_eq!(e.code(), code, "{e}");
            assert_eq!(Status::from(e).code(), code);
        }
    }

    #[test]
    fn the_cause_of_a_failed_fetch_stays_out_of_the_status() {
        for e in [AgentError::Image(fetch_failure()), step(fetch_failure())] {
            let status = Status::from(e);
            assert!(
                status
                    .message()
                    .ends_with("fetching image \"file:///srv/images/disk\" failed (the host agent's log has the cause)"),
                "{}",
                status.message()
            );
            assert!(!status.message().contains("denied"), "{}", status.message());
        }
        // Other errors keep their chain: the operator needs it.
        let io = AgentError::Io {
            path: "/var/lib/skygate-agent/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        assert!(Status::from(io).message().contains("denied"));
    }
}
