//! The one mapping from the agent's errors to gRPC statuses, at the service's edge: the code
//! (from the manager error's variant and the kind of its cause), the `skygate-reason` and
//! `skygate-step` metadata, and the message (the error chain, each level's text once).
//!
//! Callers act on the code: INVALID_ARGUMENT and FAILED_PRECONDITION are not worth retrying
//! as they are; UNAVAILABLE is. A refusal they must tell apart from others carries a reason
//! (`proto::reason`); a failed creation step carries its step id, which the control plane
//! counts as that step's failure.

use std::error::Error as StdError;

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use crate::disks::DiskError;
use crate::events::ResumeError;
use crate::hypervisor::HypervisorError;
use crate::images::ImageError;
use crate::machines::{CreateDiskError, CreateStep, DefineError, ImportError, ManagerError};
use crate::report;
use crate::seed::SeedError;

/// What a status says besides its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusKind {
    /// The gRPC code.
    pub code: Code,
    /// The `skygate-reason` value, for refusals a caller acts on.
    pub reason: Option<&'static str>,
    /// The `skygate-step` value: the creation step that failed.
    pub step: Option<CreateStep>,
}

/// The code, reason and step of a manager error. A failure of a creation step is the step's
/// unless its cause is the hypervisor being unreachable: that is the host's outage, retried
/// until the host answers, not a step that failed.
pub fn classify(e: &ManagerError) -> StatusKind {
    use proto::reason;
    let refusal = |code, reason| StatusKind {
        code,
        reason: Some(reason),
        step: None,
    };
    let code = match e {
        ManagerError::NotFound(_) => return refusal(Code::NotFound, reason::MACHINE_NOT_FOUND),
        ManagerError::StaleGeneration { .. } => {
            return refusal(Code::FailedPrecondition, reason::STALE_GENERATION)
        }
        ManagerError::GenerationConflict { .. } => {
            return refusal(Code::FailedPrecondition, reason::GENERATION_CONFLICT)
        }
        ManagerError::NotRunning(_) => {
            return refusal(Code::FailedPrecondition, reason::NOT_RUNNING)
        }
        ManagerError::InvalidSpec(_) => Code::InvalidArgument,
        ManagerError::DiskInUse(_)
        | ManagerError::StillRunning(_)
        | ManagerError::DiskMissing(_) => Code::FailedPrecondition,
        ManagerError::ImportDisk(e) => match e {
            ImportError::AlreadyDefined(_) => Code::AlreadyExists,
            ImportError::Digest { .. } | ImportError::Truncated => Code::DataLoss,
            ImportError::NotADisk(_) => Code::InvalidArgument,
            ImportError::Disk(e) => disk_code(e),
        },
        ManagerError::ForeignDomain { .. } => Code::FailedPrecondition,
        ManagerError::FetchImage(e) => image_code(e),
        ManagerError::CreateDisk(CreateDiskError::Disk(e)) => disk_code(e),
        ManagerError::CreateDisk(CreateDiskError::Dir(_) | CreateDiskError::Marker { .. }) => {
            Code::Internal
        }
        ManagerError::WriteSeed(e) => seed_code(e),
        ManagerError::Define(DefineError::Ports(_)) => Code::ResourceExhausted,
        ManagerError::Define(DefineError::Xml(_)) => Code::InvalidArgument,
        ManagerError::Define(DefineError::Hypervisor(e))
        | ManagerError::Start(e)
        | ManagerError::Restart(e)
        | ManagerError::Stop(e)
        | ManagerError::Delete(e)
        | ManagerError::ReadDomains(e)
        | ManagerError::HostFacts(e) => hypervisor_code(e),
        ManagerError::Files { .. } | ManagerError::CollectImages(_) => Code::Internal,
    };
    StatusKind {
        code,
        reason: None,
        step: e.step().filter(|_| !is_outage(e)),
    }
}

/// Whether the cause is the hypervisor not answering.
fn is_outage(e: &ManagerError) -> bool {
    matches!(
        e,
        ManagerError::Define(DefineError::Hypervisor(HypervisorError::Unreachable(_)))
            | ManagerError::Start(HypervisorError::Unreachable(_))
    )
}

/// The image's record is wrong (a refused source, bytes that do not match the digest, an
/// image over the limit): fetching again gives the same answer, so the caller is told to stop.
/// Only a failed fetch may heal (a server back up).
fn image_code(e: &ImageError) -> Code {
    match e {
        ImageError::BadDigest(_)
        | ImageError::BadUrl { .. }
        | ImageError::NotAllowed { .. }
        | ImageError::DigestMismatch { .. }
        | ImageError::TooLarge { .. } => Code::InvalidArgument,
        ImageError::Fetch { .. } => Code::Unavailable,
        ImageError::Client(_) | ImageError::Io { .. } | ImageError::Dir(_) => Code::Internal,
    }
}

/// qemu-img not running or failing is the host's problem; a base it refuses (a backing file,
/// another format, an overlay smaller than the base) is the image's.
fn disk_code(e: &DiskError) -> Code {
    match e {
        DiskError::Io { .. }
        | DiskError::Spawn { .. }
        | DiskError::Timeout { .. }
        | DiskError::Failed { .. } => Code::Internal,
        _ => Code::FailedPrecondition,
    }
}

fn seed_code(e: &SeedError) -> Code {
    match e {
        SeedError::BadHostname(_) | SeedError::BadInstanceId(_) | SeedError::BadKey { .. } => {
            Code::InvalidArgument
        }
        _ => Code::Internal,
    }
}

fn hypervisor_code(e: &HypervisorError) -> Code {
    match e {
        HypervisorError::Unreachable(_) => Code::Unavailable,
        _ => Code::Internal,
    }
}

/// The error and its sources, each level's text once, joined with ": " ([`report::chain`]).
/// It stops at an error whose cause stays in the agent's log (an image fetch: the OS's words
/// would tell which files exist). It carries paths and libvirt text, never the agent token or
/// tenant user data.
pub fn message(e: &(dyn StdError + 'static)) -> String {
    report::chain_until(e, hides_cause)
}

/// Whether `e`'s sources must not reach callers ([`ImageError::hides_cause`]).
fn hides_cause(e: &(dyn StdError + 'static)) -> bool {
    e.downcast_ref::<ImageError>()
        .is_some_and(ImageError::hides_cause)
}

impl From<ManagerError> for Status {
    fn from(e: ManagerError) -> Self {
        let kind = classify(&e);
        let mut metadata = MetadataMap::new();
        if let Some(step) = kind.step {
            metadata.insert(
                proto::STEP_METADATA,
                MetadataValue::from_static(step.as_str()),
            );
        }
        if let Some(reason) = kind.reason {
            metadata.insert(proto::REASON_METADATA, MetadataValue::from_static(reason));
        }
        Status::with_metadata(kind.code, message(&e), metadata)
    }
}

/// A watch that cannot resume where asked: OUT_OF_RANGE, the message says to resync.
impl From<ResumeError> for Status {
    fn from(e: ResumeError) -> Self {
        Status::out_of_range(message(&e))
    }
}

/// A watch stream whose reader fell `missed` events behind the live feed.
pub fn lagged(missed: u64) -> Status {
    Status::aborted(format!(
        "event stream fell {missed} events behind; reconnect with the last sequence seen"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::{FetchError, SourceRule};
    use crate::model::SpecError;
    use crate::ports::PortsExhausted;
    use uuid::Uuid;

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

    fn unreachable() -> HypervisorError {
        HypervisorError::Unreachable("connection reset".into())
    }

    fn failed(op: &'static str) -> HypervisorError {
        HypervisorError::Failed {
            op,
            message: "internal error".into(),
        }
    }

    fn qemu_img_missing() -> DiskError {
        use std::os::unix::process::ExitStatusExt;
        DiskError::Failed {
            args: "create -f qcow2 disk.qcow2 1G".into(),
            status: std::process::ExitStatus::from_raw(127 << 8),
            stderr: "prlimit: failed to execute qemu-img: No such file or directory".into(),
        }
    }

    /// INVALID_ARGUMENT is what the control plane fails a machine on at once (its
    /// `workflows::policy::classify`); a mismatch or a refused source will not heal on a retry.
    #[test]
    fn a_digest_mismatch_and_a_refused_source_are_final_a_failed_fetch_is_not() {
        let refused = ImageError::NotAllowed {
            url: "file:///etc/shadow".into(),
            rule: SourceRule::FileOutsideImageDirs,
        };
        for (e, code) in [
            (mismatch(), Code::InvalidArgument),
            (refused, Code::InvalidArgument),
            (fetch_failure(), Code::Unavailable),
        ] {
            let e = ManagerError::FetchImage(e);
            assert_eq!(classify(&e).code, code, "{e}");
            let status = Status::from(e);
            assert_eq!(status.code(), code);
            assert_eq!(
                status.metadata().get(proto::STEP_METADATA).unwrap(),
                "image"
            );
        }
    }

    #[test]
    fn the_cause_of_a_failed_fetch_stays_out_of_the_status() {
        let status = Status::from(ManagerError::FetchImage(fetch_failure()));
        assert_eq!(
            status.message(),
            "fetch image failed: fetching image \"file:///srv/images/disk\" failed (the host \
             agent's log has the cause)"
        );
        assert!(!status.message().contains("denied"), "{}", status.message());
        // Other errors keep their chain: the operator needs it.
        let io = ManagerError::Files {
            op: crate::machines::FileOp::Reading,
            path: "/var/lib/skygate-agent/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        let status = Status::from(io);
        assert_eq!(status.code(), Code::Internal);
        assert!(status.message().contains("denied"), "{}", status.message());
    }

    /// The text the control plane shows the tenant (control-plane tests read it).
    #[test]
    fn a_failed_step_reads_step_then_cause_once() {
        let status = Status::from(ManagerError::CreateDisk(qemu_img_missing().into()));
        assert_eq!(
            status.message(),
            "create disk failed: qemu-img create -f qcow2 disk.qcow2 1G failed (exit status: \
             127): prlimit: failed to execute qemu-img: No such file or directory"
        );
        assert_eq!(status.metadata().get(proto::STEP_METADATA).unwrap(), "disk");
        let spawn = DiskError::Spawn {
            program: "/usr/bin/prlimit".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let status = Status::from(ManagerError::CreateDisk(spawn.into()));
        assert_eq!(
            status.message(),
            format!(
                "create disk failed: cannot run \"/usr/bin/prlimit\": {}",
                std::io::Error::from(std::io::ErrorKind::NotFound)
            )
        );
    }

    #[test]
    fn each_case_has_its_code_reason_and_step() {
        use proto::reason;
        let id = Uuid::nil();
        let cases: Vec<(ManagerError, Code, Option<&str>, Option<&str>)> = vec![
            (
                ManagerError::InvalidSpec(SpecError::new("vcpus", "must be 1-255")),
                Code::InvalidArgument,
                None,
                None,
            ),
            (
                ManagerError::NotFound(id),
                Code::NotFound,
                Some(reason::MACHINE_NOT_FOUND),
                None,
            ),
            (
                ManagerError::StaleGeneration {
                    requested: 1,
                    applied: 2,
                },
                Code::FailedPrecondition,
                Some(reason::STALE_GENERATION),
                None,
            ),
            (
                ManagerError::GenerationConflict { generation: 2 },
                Code::FailedPrecondition,
                Some(reason::GENERATION_CONFLICT),
                None,
            ),
            (
                ManagerError::NotRunning(id),
                Code::FailedPrecondition,
                Some(reason::NOT_RUNNING),
                None,
            ),
            (
                ManagerError::ForeignDomain {
                    name: "skygate-x".into(),
                    source: crate::domain_xml::MetadataError::Missing("id"),
                },
                Code::FailedPrecondition,
                None,
                None,
            ),
            (
                ManagerError::CreateDisk(qemu_img_missing().into()),
                Code::Internal,
                None,
                Some("disk"),
            ),
            (
                ManagerError::CreateDisk(DiskError::BadSize(0).into()),
                Code::FailedPrecondition,
                None,
                Some("disk"),
            ),
            (
                ManagerError::WriteSeed(SeedError::BadHostname("-".into())),
                Code::InvalidArgument,
                None,
                Some("seed"),
            ),
            (
                ManagerError::WriteSeed(SeedError::Timeout(std::time::Duration::from_secs(1))),
                Code::Internal,
                None,
                Some("seed"),
            ),
            (
                ManagerError::Define(DefineError::Ports(PortsExhausted {
                    first: 1,
                    last: 2,
                    address: std::net::Ipv4Addr::LOCALHOST,
                })),
                Code::ResourceExhausted,
                None,
                Some("define"),
            ),
            (
                ManagerError::Define(DefineError::Xml(
                    crate::domain_xml::DomainXmlError::ZeroVcpus,
                )),
                Code::InvalidArgument,
                None,
                Some("define"),
            ),
            (
                ManagerError::Define(DefineError::Hypervisor(failed("define"))),
                Code::Internal,
                None,
                Some("define"),
            ),
            // The host's outage is not the step's failure.
            (
                ManagerError::Define(DefineError::Hypervisor(unreachable())),
                Code::Unavailable,
                None,
                None,
            ),
            (
                ManagerError::Start(failed("start")),
                Code::Internal,
                None,
                Some("start"),
            ),
            (
                ManagerError::Start(unreachable()),
                Code::Unavailable,
                None,
                None,
            ),
            // A reboot's start is not a creation step.
            (
                ManagerError::Restart(failed("start")),
                Code::Internal,
                None,
                None,
            ),
            (
                ManagerError::Stop(failed("shutdown")),
                Code::Internal,
                None,
                None,
            ),
            (
                ManagerError::Delete(unreachable()),
                Code::Unavailable,
                None,
                None,
            ),
            (
                ManagerError::ReadDomains(unreachable()),
                Code::Unavailable,
                None,
                None,
            ),
            (
                ManagerError::HostFacts(failed("facts")),
                Code::Internal,
                None,
                None,
            ),
        ];
        for (e, code, reason, step) in cases {
            let text = e.to_string();
            let status = Status::from(e);
            assert_eq!(status.code(), code, "{text}");
            let meta = |key| {
                status
                    .metadata()
                    .get(key)
                    .map(|v| v.to_str().unwrap().to_owned())
            };
            assert_eq!(meta(proto::REASON_METADATA).as_deref(), reason, "{text}");
            assert_eq!(meta(proto::STEP_METADATA).as_deref(), step, "{text}");
        }
    }

    #[test]
    fn a_refused_resume_is_out_of_range_and_says_to_resync() {
        let status = Status::from(ResumeError::NeverIssued {
            requested: 9,
            latest: 1,
        });
        assert_eq!(status.code(), Code::OutOfRange);
        assert!(status.message().contains("watch from 0"), "{status:?}");
    }

    /// No level of a chain repeats the text of its source: the message shows each once.
    #[test]
    fn no_error_repeats_its_source() {
        let io = || std::io::Error::other("disk full");
        let errors: Vec<Box<dyn StdError + 'static>> = vec![
            Box::new(ManagerError::CreateDisk(CreateDiskError::Dir(
                crate::paths::PathsError::Io {
                    path: "/d".into(),
                    source: io(),
                },
            ))),
            Box::new(ManagerError::CreateDisk(CreateDiskError::Marker {
                path: "/d/.incomplete".into(),
                source: io(),
            })),
            Box::new(ManagerError::CreateDisk(
                DiskError::Io {
                    path: "/d/disk.qcow2".into(),
                    source: io(),
                }
                .into(),
            )),
            Box::new(ManagerError::WriteSeed(SeedError::Io {
                path: "/d/seed.iso".into(),
                source: io(),
            })),
            Box::new(ManagerError::WriteSeed(SeedError::Spawn(io()))),
            Box::new(ManagerError::FetchImage(ImageError::Io {
                path: "/d/images/x".into(),
                source: io(),
            })),
            Box::new(ManagerError::ForeignDomain {
                name: "skygate-x".into(),
                source: crate::domain_xml::MachineMetadata::from_xml("<a></b>").unwrap_err(),
            }),
            Box::new(ManagerError::ForeignDomain {
                name: "skygate-x".into(),
                source: crate::domain_xml::MetadataError::InvalidGeneration(
                    "x".parse::<u64>().unwrap_err(),
                ),
            }),
            Box::new(crate::domain_xml::DomainXmlError::Write(io())),
        ];
        for e in &errors {
            let mut level: &(dyn StdError + 'static) = e.as_ref();
            while let Some(next) = level.source() {
                let (own, inner) = (level.to_string(), next.to_string());
                assert!(!own.contains(&inner), "{own:?} repeats {inner:?}");
                level = next;
            }
            let text = message(e.as_ref());
            assert!(text.matches("disk full").count() <= 1, "{text}");
        }
    }
}
