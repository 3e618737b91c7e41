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
            AgentError::Image(e) => match e {
                ImageError::BadDigest(_) | ImageError::BadUrl { .. } => Code::InvalidArgument,
                ImageError::DigestMismatch { .. } | ImageError::TooLarge { .. } => {
                    Code::FailedPrecondition
                }
                ImageError::Http { .. } => Code::Unavailable,
                ImageError::Io { .. } | ImageError::Dir(_) => Code::Internal,
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

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Self {
        // The message chain helps the operator; it carries paths and libvirt text, never the
        // agent token or tenant user data.
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let text = s.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = s.source();
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
