//! The manager's error: one variant per operation or creation step that failed, the cause as
//! its source. Messages name the operation only; the cause's words follow when the chain is
//! rendered (the gRPC edge, status.rs; the start-up line, preflight.rs), never twice.

use std::path::PathBuf;

use uuid::Uuid;

use crate::disks::DiskError;
use crate::domain_xml::{DomainXmlError, MetadataError};
use crate::hypervisor::HypervisorError;
use crate::images::ImageError;
use crate::model::SpecError;
use crate::paths::PathsError;
use crate::ports::PortsExhausted;
use crate::seed::SeedError;

/// The steps of creating a machine, in order: what the tenant reads in the machine's events
/// (through [`ManagerError::step`]) and where the test-only pause hook stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CreateStep {
    /// Before fetching the image.
    Image,
    /// Before creating the overlay.
    Disk,
    /// Before writing the seed.
    Seed,
    /// Before defining the domain.
    Define,
    /// Before starting it.
    Start,
}

impl CreateStep {
    /// The step's id on the wire (the `skygate-step` gRPC metadata).
    pub fn as_str(self) -> &'static str {
        match self {
            CreateStep::Image => "image",
            CreateStep::Disk => "disk",
            CreateStep::Seed => "seed",
            CreateStep::Define => "define",
            CreateStep::Start => "start",
        }
    }
}

/// Everything a manager operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// The spec is refused as such.
    #[error("invalid request")]
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
    /// The applied generation, with other content.
    #[error(
        "generation {generation} is applied with other content; a changed spec needs a new \
         generation"
    )]
    GenerationConflict {
        /// The generation in the request and of the defined domain.
        generation: u64,
    },
    /// A larger disk for a running machine: its QEMU holds the disk.
    #[error("machine {0} is running; its disk grows only while it is stopped")]
    DiskInUse(Uuid),
    /// The spec says the disk is here already, and it is not.
    #[error("machine {0} has no disk on this host to define it over")]
    DiskMissing(Uuid),
    /// The action needs the machine shut off (moving its disk).
    #[error("machine {0} is running; stop it first")]
    StillRunning(Uuid),
    /// Importing a moved machine's disk.
    #[error("import disk failed")]
    ImportDisk(#[source] super::moving::ImportError),
    /// The action needs a running machine.
    #[error("machine {0} is not running")]
    NotRunning(Uuid),
    /// A domain with our name whose metadata is not ours or is unreadable.
    #[error("domain {name} has unreadable SkyGate metadata")]
    ForeignDomain {
        /// The domain.
        name: String,
        /// Why.
        #[source]
        source: MetadataError,
    },
    /// Creation step [`CreateStep::Image`].
    #[error("fetch image failed")]
    FetchImage(#[source] ImageError),
    /// Creation step [`CreateStep::Disk`].
    #[error("create disk failed")]
    CreateDisk(#[source] CreateDiskError),
    /// Creation step [`CreateStep::Seed`].
    #[error("write seed failed")]
    WriteSeed(#[source] SeedError),
    /// Creation step [`CreateStep::Define`].
    #[error("define domain failed")]
    Define(#[source] DefineError),
    /// Creation step [`CreateStep::Start`]: starting a defined machine (EnsureMachine,
    /// StartMachine).
    #[error("start domain failed")]
    Start(#[source] HypervisorError),
    /// The start that ends a reboot's power cycle: not a creation step.
    #[error("start domain failed")]
    Restart(#[source] HypervisorError),
    /// Shutting the domain down, gracefully or not.
    #[error("stop domain failed")]
    Stop(#[source] HypervisorError),
    /// Destroying and undefining the domain.
    #[error("delete domain failed")]
    Delete(#[source] HypervisorError),
    /// Reading the domains (one or all) from the hypervisor.
    #[error("reading domains failed")]
    ReadDomains(#[source] HypervisorError),
    /// Finding which cached images machines use, or removing the others.
    #[error("collect unused images failed")]
    CollectImages(#[source] ImageError),
    /// Reading the host's facts (version, CPUs, memory) from the hypervisor.
    #[error("reading host facts failed")]
    HostFacts(#[source] HypervisorError),
    /// Reading, writing or removing a machine's files.
    #[error("{op} {}", path.display())]
    Files {
        /// What was done.
        op: FileOp,
        /// The file or directory.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

impl ManagerError {
    /// The creation step this error is the failure of, if it is one.
    pub fn step(&self) -> Option<CreateStep> {
        Some(match self {
            ManagerError::FetchImage(_) => CreateStep::Image,
            ManagerError::CreateDisk(_) => CreateStep::Disk,
            ManagerError::WriteSeed(_) => CreateStep::Seed,
            ManagerError::Define(_) => CreateStep::Define,
            ManagerError::Start(_) => CreateStep::Start,
            _ => return None,
        })
    }

    pub(super) fn files(op: FileOp, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ManagerError::Files {
            op,
            path: path.into(),
            source,
        }
    }
}

/// What the manager did to a file when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOp {
    /// Reading it.
    Reading,
    /// Writing it.
    Writing,
    /// Removing it (or a directory tree).
    Removing,
}

impl std::fmt::Display for FileOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FileOp::Reading => "reading",
            FileOp::Writing => "writing",
            FileOp::Removing => "removing",
        })
    }
}

/// Why creating a machine's disk failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateDiskError {
    /// The machine's directory could not be made.
    #[error(transparent)]
    Dir(#[from] PathsError),
    /// The marker of an unfinished creation could not be written.
    #[error("writing {}", path.display())]
    Marker {
        /// The marker.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// qemu-img failed or refused the base.
    #[error(transparent)]
    Disk(#[from] DiskError),
}

/// Why defining a machine's domain failed.
#[derive(Debug, thiserror::Error)]
pub enum DefineError {
    /// No port left to forward.
    #[error(transparent)]
    Ports(#[from] PortsExhausted),
    /// The domain XML could not be rendered.
    #[error(transparent)]
    Xml(#[from] DomainXmlError),
    /// Listing the ports other domains claim, or the definition itself, failed.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
}
