//! The agent's domain types: what it is asked to build ([`MachineSpec`], validated from the
//! wire), what it reports back ([`MachineState`], [`MachinePhase`]) and the pure rules between
//! them (spec limits, the spec's content fingerprint, the generation check). A leaf: it imports
//! nothing of the crate, so every other module (the manager, the event log, the renderers, the
//! gRPC edge) can depend on it without a cycle. No I/O.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Most vCPUs one machine may have (QEMU's i440fx limit is 255).
pub const MAX_VCPUS: u32 = 255;
/// Largest `memory_mib` libvirt accepts: it parses memory into bytes and caps it at
/// `LLONG_MAX` (virMemoryMaxValue on 64-bit hosts), i.e. (2^63 - 1) >> 20 MiB.
pub const MAX_MEMORY_MIB: u64 = (1 << 43) - 1;
/// Largest overlay size accepted, in GiB (64 TiB): keeps `size_gib * GIB` far from overflow
/// and refuses obvious typos.
pub const MAX_DISK_GIB: u64 = 64 * 1024;
/// Largest tenant user data (cloud-init's own limit on most clouds is 16-64 KiB).
pub const MAX_USER_DATA_BYTES: usize = 64 << 10;
/// Most SSH keys per machine.
pub const MAX_SSH_KEYS: usize = 64;
/// Longest kernel command line x86 Linux accepts.
const MAX_CMDLINE_BYTES: usize = 2048;
/// Longest host name (RFC 1123).
const MAX_HOSTNAME_LEN: usize = 253;

/// Whether `name` is an RFC 1123 host name (also what the tiny init accepts).
pub fn is_valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HOSTNAME_LEN
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// A disk image format the agent accepts for base images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskFormat {
    /// QEMU's copy-on-write format.
    Qcow2,
    /// A plain byte-for-byte disk.
    Raw,
}

impl DiskFormat {
    /// The name `qemu-img` uses (`-f`, `-F`, and `format` in `info`).
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// One TCP port forward of QEMU user networking: `host_ip:host_port` on the host reaches
/// `guest_port` on the guest. TCP only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortForward {
    /// Host address QEMU listens on (127.0.0.1 for tests and laptops).
    pub host_ip: Ipv4Addr,
    /// Host port QEMU listens on; must not be 0 (QEMU would pick one we could not report).
    pub host_port: u16,
    /// Guest port the connection is forwarded to; must not be 0.
    pub guest_port: u16,
}

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
    /// Moves with every rebuild: above the recorded one, the disk is made again from `image`.
    pub disk_generation: u64,
    /// The disk must be here already (a moved or released machine): never made anew. Not
    /// content (not in the fingerprint): a precondition of this request.
    pub disk_must_exist: bool,
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

impl SpecError {
    /// A refusal of `field`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        SpecError {
            field,
            reason: reason.into(),
        }
    }
}

/// Parses a machine id as the wire carries it.
pub fn parse_machine_id(raw: &str) -> Result<Uuid, SpecError> {
    Uuid::parse_str(raw).map_err(|_| SpecError::new("machine_id", "must be a UUID"))
}

impl MachineSpec {
    /// Checks the ranges and shapes the agent relies on. Hostname, keys and user data are
    /// re-checked by the seed writer; URLs and digests by the image cache.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.generation == 0 {
            return Err(SpecError::new("generation", "must be at least 1"));
        }
        if !is_valid_hostname(&self.hostname) {
            return Err(SpecError::new("hostname", "must be an RFC 1123 host name"));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(SpecError::new("vcpus", format!("must be 1-{MAX_VCPUS}")));
        }
        if !(1..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(SpecError::new(
                "memory_mib",
                format!("must be 1-{MAX_MEMORY_MIB}"),
            ));
        }
        if !(1..=MAX_DISK_GIB).contains(&self.disk_gib) {
            return Err(SpecError::new(
                "disk_gib",
                format!("must be 1-{MAX_DISK_GIB}"),
            ));
        }
        if self.ssh_keys.len() > MAX_SSH_KEYS {
            return Err(SpecError::new(
                "ssh_authorized_keys",
                format!("at most {MAX_SSH_KEYS}"),
            ));
        }
        if self
            .user_data
            .as_ref()
            .is_some_and(|u| u.len() > MAX_USER_DATA_BYTES)
        {
            return Err(SpecError::new(
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
                    return Err(SpecError::new(
                        "image.kernel_boot.cmdline",
                        format!("one line of at most {MAX_CMDLINE_BYTES} bytes"),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The fingerprint of what this spec asks the machine to be: every field but the
    /// generation (the version, not the content) and the desired power (a spec at one
    /// generation may be sent again to start or stop the machine).
    ///
    /// The canonical rendering is a version tag, then each field in a fixed order as its name,
    /// a NUL, its length (u64, little endian) and its bytes; optional fields are written only
    /// when present, lists with their length first. Field names are constants without NUL
    /// and every value is length-prefixed, so two different specs never render alike.
    pub fn fingerprint(&self) -> SpecFingerprint {
        let mut c = Canonical(Sha256::new());
        c.0.update(b"skygate-machine-spec/v1\n");
        c.field("hostname", self.hostname.as_bytes());
        c.field("vcpus", &self.vcpus.to_le_bytes());
        c.field("memory_mib", &self.memory_mib.to_le_bytes());
        c.field("disk_gib", &self.disk_gib.to_le_bytes());
        let source = |c: &mut Canonical, name: &str, f: &SourceFile| {
            c.field(&format!("{name}.url"), f.url.as_bytes());
            c.field(&format!("{name}.sha256"), f.sha256.as_bytes());
        };
        match &self.image {
            ImagePlan::Disk { base, format } => {
                c.field("image", b"disk");
                source(&mut c, "image.base", base);
                c.field("image.format", format.as_str().as_bytes());
            }
            ImagePlan::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                c.field("image", b"kernel");
                source(&mut c, "image.kernel", kernel);
                if let Some(initrd) = initrd {
                    source(&mut c, "image.initrd", initrd);
                }
                c.field("image.cmdline", cmdline.as_bytes());
            }
        }
        c.field("ssh_keys", &(self.ssh_keys.len() as u64).to_le_bytes());
        for key in &self.ssh_keys {
            c.field("ssh_key", key.as_bytes());
        }
        if let Some(user_data) = &self.user_data {
            c.field("user_data", user_data.as_bytes());
        }
        // Only once rebuilt: every fingerprint recorded before rebuilds existed stays valid.
        if self.disk_generation > 0 {
            c.field("disk_generation", &self.disk_generation.to_le_bytes());
        }
        SpecFingerprint(c.0.finalize().into())
    }
}

/// The running hash of a canonical rendering.
struct Canonical(Sha256);

impl Canonical {
    fn field(&mut self, name: &str, value: &[u8]) {
        self.0.update(name.as_bytes());
        self.0.update([0]);
        self.0.update((value.len() as u64).to_le_bytes());
        self.0.update(value);
    }
}

fn check_source(field: &'static str, f: &SourceFile) -> Result<(), SpecError> {
    if f.url.is_empty() {
        return Err(SpecError::new(field, "is required"));
    }
    let hex = f.sha256.len() == 64
        && f.sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex {
        return Err(SpecError::new(
            field,
            "needs a 64-character lowercase hex sha256",
        ));
    }
    Ok(())
}

/// SHA-256 of a spec's content ([`MachineSpec::fingerprint`]); kept in the domain's SkyGate
/// metadata so an equal generation with other content is recognised. Written and read as 64
/// lowercase hex characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpecFingerprint([u8; 32]);

impl SpecFingerprint {
    /// A fingerprint from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        SpecFingerprint(bytes)
    }
}

impl fmt::Display for SpecFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// A fingerprint that is not 64 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a spec fingerprint (64 lowercase hex characters)")]
pub struct InvalidFingerprint;

impl FromStr for SpecFingerprint {
    type Err = InvalidFingerprint;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Lowercase only, so one fingerprint has one spelling.
        if s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(InvalidFingerprint);
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| InvalidFingerprint)?;
        Ok(SpecFingerprint(bytes))
    }
}

/// The spec a defined domain was built from, as its metadata records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppliedSpec {
    /// Its generation.
    pub generation: u64,
    /// Its content's fingerprint; `None` for domains defined before fingerprints were
    /// recorded.
    pub fingerprint: Option<SpecFingerprint>,
}

/// What an EnsureMachine does about a domain already defined from `applied`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationCheck {
    /// A newer generation: rebuild and redefine, then converge power.
    Redefine,
    /// The applied spec again: only converge power.
    PowerOnly,
    /// An older generation: refused (a late retry racing a newer request).
    Stale,
    /// The applied generation with other content: refused (two writers made one generation;
    /// applying either silently would hide the other).
    Conflict,
}

/// Compares a requested spec (its generation and fingerprint) with the applied one. A domain
/// without a recorded fingerprint (defined before they were) is taken as equal at its
/// generation: there is nothing to compare, and refusing would strand every machine defined
/// before the upgrade.
pub fn check_generation(
    applied: AppliedSpec,
    generation: u64,
    fingerprint: SpecFingerprint,
) -> GenerationCheck {
    use std::cmp::Ordering;
    match generation.cmp(&applied.generation) {
        Ordering::Less => GenerationCheck::Stale,
        Ordering::Greater => GenerationCheck::Redefine,
        Ordering::Equal => match applied.fingerprint {
            Some(f) if f != fingerprint => GenerationCheck::Conflict,
            _ => GenerationCheck::PowerOnly,
        },
    }
}

/// A machine's phase as the agent reports it: the hypervisor's domain phase, plus `Absent`
/// when there is no domain.
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
            disk_generation: 0,
            disk_must_exist: false,
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
    fn machine_ids_must_be_uuids() {
        assert!(parse_machine_id("../../etc").is_err());
        let id = Uuid::new_v4();
        assert_eq!(parse_machine_id(&id.to_string()), Ok(id));
    }

    #[test]
    fn the_fingerprint_ignores_generation_and_power_and_nothing_else() {
        let base = spec();
        let same = [
            MachineSpec {
                generation: 7,
                ..base.clone()
            },
            MachineSpec {
                desired: DesiredPower::Stopped,
                ..base.clone()
            },
        ];
        for s in same {
            assert_eq!(s.fingerprint(), base.fingerprint(), "{s:?}");
        }
        let kernel = |url: &str, initrd: Option<SourceFile>, cmdline: &str| ImagePlan::Kernel {
            kernel: SourceFile {
                url: url.into(),
                sha256: "a".repeat(64),
            },
            initrd,
            cmdline: cmdline.into(),
        };
        let other = [
            MachineSpec {
                hostname: "web-2".into(),
                ..base.clone()
            },
            MachineSpec {
                vcpus: 2,
                ..base.clone()
            },
            MachineSpec {
                memory_mib: 512,
                ..base.clone()
            },
            MachineSpec {
                disk_gib: 2,
                ..base.clone()
            },
            MachineSpec {
                image: kernel("file:///k2", None, "console=ttyS0"),
                ..base.clone()
            },
            MachineSpec {
                image: kernel("file:///k", None, "console=ttyS0 quiet"),
                ..base.clone()
            },
            MachineSpec {
                image: kernel(
                    "file:///k",
                    Some(SourceFile {
                        url: "file:///i".into(),
                        sha256: "b".repeat(64),
                    }),
                    "console=ttyS0",
                ),
                ..base.clone()
            },
            MachineSpec {
                image: ImagePlan::Disk {
                    base: SourceFile {
                        url: "file:///k".into(),
                        sha256: "a".repeat(64),
                    },
                    format: DiskFormat::Qcow2,
                },
                ..base.clone()
            },
            MachineSpec {
                ssh_keys: vec!["ssh-ed25519 AAAA a".into()],
                ..base.clone()
            },
            MachineSpec {
                user_data: Some(String::new()),
                ..base.clone()
            },
        ];
        let mut seen = std::collections::HashSet::from([base.fingerprint()]);
        for s in other {
            assert!(seen.insert(s.fingerprint()), "{s:?} collides");
        }
        // The same keys split differently are different content.
        let split = |keys: &[&str]| {
            MachineSpec {
                ssh_keys: keys.iter().map(|k| (*k).to_owned()).collect(),
                ..base.clone()
            }
            .fingerprint()
        };
        assert_ne!(split(&["ab", "c"]), split(&["a", "bc"]));
        assert_ne!(split(&["a"]), split(&["a", ""]));
    }

    #[test]
    fn a_fingerprint_reads_back_from_its_text_and_only_lowercase() {
        let f = spec().fingerprint();
        let text = f.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse(), Ok(f));
        assert_eq!(
            text.to_uppercase().parse::<SpecFingerprint>(),
            Err(InvalidFingerprint)
        );
        assert!("abc".parse::<SpecFingerprint>().is_err());
        assert!("g".repeat(64).parse::<SpecFingerprint>().is_err());
    }

    #[test]
    fn the_generation_check_refuses_older_and_conflicting_specs() {
        let (f, g) = (
            SpecFingerprint::from_bytes([1; 32]),
            SpecFingerprint::from_bytes([2; 32]),
        );
        let applied = |fingerprint| AppliedSpec {
            generation: 5,
            fingerprint,
        };
        use GenerationCheck::*;
        for (applied, generation, requested, expected) in [
            (applied(Some(f)), 6, g, Redefine),
            (applied(Some(f)), 6, f, Redefine),
            (applied(Some(f)), 5, f, PowerOnly),
            (applied(Some(f)), 5, g, Conflict),
            (applied(Some(f)), 4, f, Stale),
            (applied(Some(f)), 4, g, Stale),
            // Defined before fingerprints: an equal generation is taken as the same spec.
            (applied(None), 5, g, PowerOnly),
            (applied(None), 6, g, Redefine),
            (applied(None), 4, g, Stale),
        ] {
            assert_eq!(
                check_generation(applied, generation, requested),
                expected,
                "{applied:?} vs {generation}"
            );
        }
    }
}
