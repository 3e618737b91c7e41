//! What the agent is asked to build ([`MachineSpec`], validated from the wire) and what it
//! reports back ([`MachineState`]). Pure types and checks, no I/O.

use std::net::Ipv4Addr;
use std::str::FromStr;

use uuid::Uuid;

use crate::disks::{DiskFormat, MAX_DISK_GIB};
use crate::domain_xml::{PortForward, MAX_MEMORY_MIB};
use crate::ports::PortRange;

/// Most vCPUs one machine may have (QEMU's i440fx limit is 255).
pub const MAX_VCPUS: u32 = 255;
/// Largest tenant user data (cloud-init's own limit on most clouds is 16-64 KiB).
pub const MAX_USER_DATA_BYTES: usize = 64 << 10;
/// Most SSH keys per machine.
pub const MAX_SSH_KEYS: usize = 64;
/// Longest kernel command line x86 Linux accepts.
const MAX_CMDLINE_BYTES: usize = 2048;

/// A file the image cache fetches: URL and expected SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// `file://`, `http://` or `https://`.
    pub url: String,
    /// Lowercase hex SHA-256.
    pub sha256: String,
}

/// How the machine's disk and boot are built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImagePlan {
    /// A base disk the overlay is backed by; firmware boots it.
    Disk {
        /// The base disk.
        base: SourceFile,
        /// Its declared format, checked against what qemu-img detects.
        format: DiskFormat,
    },
    /// Direct kernel boot; the overlay starts empty.
    Kernel {
        /// The kernel.
        kernel: SourceFile,
        /// The initramfs.
        initrd: Option<SourceFile>,
        /// Kernel command line.
        cmdline: String,
    },
}

/// Power state the spec asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DesiredPower {
    /// Running.
    Running,
    /// Defined and shut off.
    Stopped,
}

/// A validated machine spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineSpec {
    /// The machine id; names the domain and the data directory.
    pub id: Uuid,
    /// Spec generation, at least 1.
    pub generation: u64,
    /// RFC 1123 host name.
    pub hostname: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Overlay size in GiB.
    pub disk_gib: u64,
    /// Disk and boot.
    pub image: ImagePlan,
    /// OpenSSH public keys for root.
    pub ssh_keys: Vec<String>,
    /// Tenant user data.
    pub user_data: Option<String>,
    /// Power state to converge to.
    pub desired: DesiredPower,
}

/// Why a spec was refused; names the field, never echoes tenant strings at length.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> SpecError {
    SpecError {
        field,
        reason: reason.into(),
    }
}

/// Parses a machine id as the wire carries it.
pub fn parse_machine_id(raw: &str) -> Result<Uuid, SpecError> {
    Uuid::parse_str(raw).map_err(|_| bad("machine_id", "must be a UUID"))
}

impl MachineSpec {
    /// Checks the ranges and shapes the agent relies on. Hostname, keys and user data are
    /// re-checked by the seed writer; URLs and digests by the image cache.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.generation == 0 {
            return Err(bad("generation", "must be at least 1"));
        }
        if !crate::seed::is_valid_hostname(&self.hostname) {
            return Err(bad("hostname", "must be an RFC 1123 host name"));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(bad("vcpus", format!("must be 1-{MAX_VCPUS}")));
        }
        if !(1..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(bad("memory_mib", format!("must be 1-{MAX_MEMORY_MIB}")));
        }
        if !(1..=MAX_DISK_GIB).contains(&self.disk_gib) {
            return Err(bad("disk_gib", format!("must be 1-{MAX_DISK_GIB}")));
        }
        if self.ssh_keys.len() > MAX_SSH_KEYS {
            return Err(bad(
                "ssh_authorized_keys",
                format!("at most {MAX_SSH_KEYS}"),
            ));
        }
        if self
            .user_data
            .as_ref()
            .is_some_and(|u| u.len() > MAX_USER_DATA_BYTES)
        {
            return Err(bad(
                "user_data",
                format!("at most {MAX_USER_DATA_BYTES} bytes"),
            ));
        }
        match &self.image {
            ImagePlan::Disk { base, .. } => check_source("image.url", base),
            ImagePlan::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                check_source("image.kernel_boot.kernel_url", kernel)?;
                if let Some(initrd) = initrd {
                    check_source("image.kernel_boot.initrd_url", initrd)?;
                }
                if cmdline.len() > MAX_CMDLINE_BYTES || cmdline.chars().any(char::is_control) {
                    return Err(bad(
                        "image.kernel_boot.cmdline",
                        format!("one line of at most {MAX_CMDLINE_BYTES} bytes"),
                    ));
                }
                Ok(())
            }
        }
    }
}

fn check_source(field: &'static str, f: &SourceFile) -> Result<(), SpecError> {
    if f.url.is_empty() {
        return Err(bad(field, "is required"));
    }
    let hex = f.sha256.len() == 64
        && f.sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex {
        return Err(bad(field, "needs a 64-character lowercase hex sha256"));
    }
    Ok(())
}

/// How machines' NICs are attached (`--network`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkMode {
    /// QEMU user networking; guest port 22 forwarded from a port in `ports` on `address`.
    User {
        /// Host address forwards listen on.
        address: Ipv4Addr,
        /// Range forwarded ports are taken from.
        ports: PortRange,
    },
    /// A libvirt-managed network.
    Libvirt(String),
    /// A host bridge.
    Bridge(String),
}

impl FromStr for NetworkMode {
    type Err = String;

    /// `user`, `libvirt:NAME` or `bridge:NAME`; user networking gets the default address
    /// and range, which the agent's other flags then set.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let named = |name: &str| {
            if name.is_empty() {
                Err(format!("{s:?}: the name after ':' is empty"))
            } else {
                Ok(name.to_owned())
            }
        };
        match s.split_once(':') {
            None if s == "user" => Ok(NetworkMode::User {
                address: Ipv4Addr::LOCALHOST,
                ports: PortRange::default(),
            }),
            Some(("libvirt", name)) => named(name).map(NetworkMode::Libvirt),
            Some(("bridge", name)) => named(name).map(NetworkMode::Bridge),
            _ => Err(format!("{s:?}: expected user, libvirt:NAME or bridge:NAME")),
        }
    }
}

/// A machine's phase as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MachinePhase {
    /// No domain.
    Absent,
    /// Defined, shut off.
    Stopped,
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// ACPI shutdown in progress.
    ShuttingDown,
    /// QEMU or the guest died.
    Crashed,
}

/// The actual state of one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineState {
    /// The machine.
    pub id: Uuid,
    /// Generation of the definition (0 when absent or unreadable).
    pub generation: u64,
    /// Phase.
    pub phase: MachinePhase,
    /// libvirt domain name.
    pub domain_name: String,
    /// Addresses the machine is reachable at.
    pub addresses: Vec<String>,
    /// Forwarded ports (user networking).
    pub forwards: Vec<PortForward>,
    /// Detail for people (why it crashed, why metadata is unreadable).
    pub message: String,
    /// Configured vCPUs.
    pub vcpus: u32,
    /// Configured memory in MiB.
    pub memory_mib: u64,
    /// Overlay size in GiB, when recorded.
    pub disk_gib: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MachineSpec {
        MachineSpec {
            id: Uuid::new_v4(),
            generation: 1,
            hostname: "web-1".into(),
            vcpus: 1,
            memory_mib: 256,
            disk_gib: 1,
            image: ImagePlan::Kernel {
                kernel: SourceFile {
                    url: "file:///k".into(),
                    sha256: "a".repeat(64),
                },
                initrd: None,
                cmdline: "console=ttyS0".into(),
            },
            ssh_keys: vec![],
            user_data: None,
            desired: DesiredPower::Running,
        }
    }

    #[test]
    fn a_sane_spec_passes() {
        assert_eq!(spec().validate(), Ok(()));
    }

    #[test]
    fn each_out_of_range_field_is_named() {
        let cases: Vec<(&str, MachineSpec)> = vec![
            (
                "generation",
                MachineSpec {
                    generation: 0,
                    ..spec()
                },
            ),
            (
                "hostname",
                MachineSpec {
                    hostname: "-bad".into(),
                    ..spec()
                },
            ),
            ("vcpus", MachineSpec { vcpus: 0, ..spec() }),
            (
                "vcpus",
                MachineSpec {
                    vcpus: 256,
                    ..spec()
                },
            ),
            (
                "memory_mib",
                MachineSpec {
                    memory_mib: 0,
                    ..spec()
                },
            ),
            (
                "disk_gib",
                MachineSpec {
                    disk_gib: MAX_DISK_GIB + 1,
                    ..spec()
                },
            ),
            (
                "ssh_authorized_keys",
                MachineSpec {
                    ssh_keys: vec!["k".into(); 65],
                    ..spec()
                },
            ),
            (
                "user_data",
                MachineSpec {
                    user_data: Some("x".repeat(MAX_USER_DATA_BYTES + 1)),
                    ..spec()
                },
            ),
            (
                "image.kernel_boot.kernel_url",
                MachineSpec {
                    image: ImagePlan::Kernel {
                        kernel: SourceFile {
                            url: "file:///k".into(),
                            sha256: "A".repeat(64),
                        },
                        initrd: None,
                        cmdline: String::new(),
                    },
                    ..spec()
                },
            ),
            (
                "image.kernel_boot.cmdline",
                MachineSpec {
                    image: ImagePlan::Kernel {
                        kernel: SourceFile {
                            url: "file:///k".into(),
                            sha256: "a".repeat(64),
                        },
                        initrd: None,
                        cmdline: "a\nb".into(),
                    },
                    ..spec()
                },
            ),
            (
                "image.url",
                MachineSpec {
                    image: ImagePlan::Disk {
                        base: SourceFile {
                            url: String::new(),
                            sha256: "a".repeat(64),
                        },
                        format: DiskFormat::Qcow2,
                    },
                    ..spec()
                },
            ),
        ];
        for (field, s) in cases {
            assert_eq!(s.validate().map_err(|e| e.field), Err(field));
        }
    }

    #[test]
    fn network_modes_parse() {
        assert!(matches!("user".parse(), Ok(NetworkMode::User { .. })));
        assert_eq!("bridge:br0".parse(), Ok(NetworkMode::Bridge("br0".into())));
        assert_eq!(
            "libvirt:tenants".parse(),
            Ok(NetworkMode::Libvirt("tenants".into()))
        );
        assert!("bridge:".parse::<NetworkMode>().is_err());
        assert!("tap:x".parse::<NetworkMode>().is_err());
    }

    #[test]
    fn machine_ids_must_be_uuids() {
        assert!(parse_machine_id("../../etc").is_err());
        let id = Uuid::new_v4();
        assert_eq!(parse_machine_id(&id.to_string()), Ok(id));
    }
}
