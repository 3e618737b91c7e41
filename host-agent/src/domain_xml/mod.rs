//! Libvirt domain XML for one SkyGate machine: the typed [`DomainSpec`], its validation, its
//! rendering (every caller string escaped by quick-xml, never by hand) and the `skygate:`
//! metadata format the agent reads back. Pure: no I/O, no libvirt calls.

use std::collections::HashSet;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use quick_xml::events::{BytesText, Event};
use quick_xml::name::{Namespace, ResolveResult};
use quick_xml::reader::NsReader;
use quick_xml::Writer;
use uuid::Uuid;

use crate::model::{PortForward, SpecFingerprint, MAX_MEMORY_MIB};

/// XML namespace of SkyGate's element inside `<metadata>`. libvirt keys metadata by this URI
/// (`virsh metadata DOMAIN --uri ...`); it is versioned so a future layout can coexist.
pub const METADATA_NAMESPACE: &str = "https://skygate.dev/xmlns/machine/v1";
/// Prefix used when writing the metadata element. Readers must match on
/// [`METADATA_NAMESPACE`], not on this prefix: libvirt is free to re-prefix on output.
pub const METADATA_PREFIX: &str = "skygate";
/// libvirt's QEMU namespace, needed for `<qemu:commandline>` (user networking).
const QEMU_NAMESPACE: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// Linux `IFNAMSIZ` minus the terminating NUL: the longest interface (bridge) name.
const MAX_IFNAME_LEN: usize = 15;

/// The QEMU `-netdev` id of the user-mode NIC; the `-device` argument refers to it.
const USER_NETDEV_ID: &str = "net0";
/// QEMU `-device` argument for the user-mode NIC. The explicit PCI address matters: without
/// it QEMU places the NIC at the first free slot it sees, which libvirt has already promised
/// to another device (the balloon, in practice) and the domain fails to start. Slot 0x10 is
/// far above the handful of slots libvirt assigns here. `pci.0` is the root bus of the `pc`
/// (i440fx) machine type, hence [`MACHINE_TYPE`].
const USER_NIC_DEVICE: &str = "virtio-net-pci,netdev=net0,bus=pci.0,addr=0x10";
/// Machine type for every domain. i440fx (`pc`) because the user-mode NIC's explicit address
/// names its root bus `pci.0`; one machine type for TCG and KVM keeps the two domains one
/// attribute (`type`) apart, so what is tested under TCG is what runs under KVM.
const MACHINE_TYPE: &str = "pc";

/// Which accelerator QEMU uses: `<domain type='kvm'>` or `<domain type='qemu'>` (TCG).
///
/// Chosen by probing the host (HOST-NOTES.md), never hard-coded: development machines expose a
/// `/dev/kvm` under which ordinary guests hang, so they must use [`HypervisorKind::Qemu`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HypervisorKind {
    /// Hardware virtualisation; also enables `<cpu mode='host-passthrough'/>`.
    Kvm,
    /// QEMU's software emulation (TCG); no host CPU model is passed through.
    Qemu,
}

impl HypervisorKind {
    /// The value of the domain's `type` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            HypervisorKind::Kvm => "kvm",
            HypervisorKind::Qemu => "qemu",
        }
    }
}

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootSource {
    /// Firmware boots from the overlay disk (`<boot dev='hd'/>`): images with their own
    /// bootloader, e.g. Debian/Ubuntu cloud images.
    Disk,
    /// Direct kernel boot: libvirt hands QEMU the kernel, initrd and command line.
    Kernel {
        /// Kernel image (bzImage) on the host.
        kernel: PathBuf,
        /// Initramfs on the host, if the image has one.
        initrd: Option<PathBuf>,
        /// Kernel command line; must contain `console=ttyS0` for the serial log to be useful.
        cmdline: String,
    },
}

/// How the guest's single NIC is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkAttachment {
    /// QEMU user networking (slirp) with host port forwards, passed through
    /// `<qemu:commandline>` because libvirt 9.0 has no native user+hostfwd (passt is not
    /// accepted there). The NIC is virtio-net-pci at `bus=pci.0,addr=0x10`.
    User {
        /// Forwards from the host to the guest, in order.
        forwards: Vec<PortForward>,
    },
    /// A libvirt-managed network (`<interface type='network'>`).
    LibvirtNetwork {
        /// Name of the libvirt network.
        name: String,
    },
    /// An existing host bridge (`<interface type='bridge'>`).
    Bridge {
        /// Name of the bridge device, e.g. `br0`.
        name: String,
    },
}

/// Everything needed to render one machine's libvirt domain.
///
/// String fields may hold anything; [`DomainSpec::to_xml`] rejects what cannot be represented
/// faithfully and escapes the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    /// Domain name, `<prefix><machine uuid>`; validated by the caller, re-checked here only for
    /// what would break the XML or libvirt (empty, `/`, control characters).
    pub name: String,
    /// libvirt `<uuid>`: the machine id.
    pub uuid: Uuid,
    /// Tenant-controlled hostname. Goes into `<title>` and the metadata only, never into a
    /// name, path or QEMU argument.
    pub hostname: String,
    /// Spec generation, stored in the metadata so the agent can refuse stale specs.
    pub generation: u64,
    /// The spec's content fingerprint, stored in the metadata so the agent can refuse other
    /// content at the same generation. `None` writes no element (as definitions made before
    /// fingerprints were recorded).
    pub fingerprint: Option<SpecFingerprint>,
    /// Size of the overlay in GiB, stored in the metadata so the agent can report what the
    /// host's machines are sized for after a restart.
    pub disk_gib: u64,
    /// `kvm` or `qemu` (TCG).
    pub hypervisor: HypervisorKind,
    /// Number of vCPUs, at least 1.
    pub vcpus: u32,
    /// Memory in MiB, at least 1 and at most [`MAX_MEMORY_MIB`].
    pub memory_mib: u64,
    /// How the guest boots.
    pub boot: BootSource,
    /// qcow2 overlay, attached as virtio-blk `vda`.
    pub disk: PathBuf,
    /// NoCloud seed ISO, attached read-only as a CD-ROM on virtio-scsi.
    pub seed: Option<PathBuf>,
    /// File the serial console (ttyS0) is appended to.
    pub console_log: PathBuf,
    /// How the NIC is attached.
    pub network: NetworkAttachment,
}

/// Why a [`DomainSpec`] could not be rendered. Messages never echo tenant-controlled strings
/// (a hostname may be long or hostile); they name the field and the offending position.
#[derive(Debug, thiserror::Error)]
pub enum DomainXmlError {
    /// A required string is empty.
    #[error("{field} must not be empty")]
    Empty {
        /// The spec field.
        field: &'static str,
    },
    /// A string holds a character that XML 1.0 cannot carry (NUL and most C0 controls, U+FFFE,
    /// U+FFFF) or that has no sane meaning in that place (any other control character:
    /// newlines in a title, a path or a kernel command line).
    #[error("{field} contains a forbidden character {ch:?} at byte {index}")]
    ForbiddenCharacter {
        /// The spec field.
        field: &'static str,
        /// The character.
        ch: char,
        /// Its byte offset in the string.
        index: usize,
    },
    /// A name contains a character libvirt or the kernel reserves (e.g. `/`).
    #[error("{field} contains the reserved character {ch:?}")]
    ReservedCharacter {
        /// The spec field.
        field: &'static str,
        /// The character.
        ch: char,
    },
    /// A bridge name that Linux would refuse (`dev_valid_name`).
    #[error("bridge name must be 1-15 bytes without '/', ':' or whitespace and not '.' or '..'")]
    InvalidBridgeName,
    /// A path is not valid UTF-8; libvirt XML is UTF-8 only.
    #[error("{field} is not valid UTF-8: {path:?}")]
    NonUtf8Path {
        /// The spec field.
        field: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A path is relative; QEMU would resolve it against libvirtd's working directory.
    #[error("{field} must be an absolute path")]
    RelativePath {
        /// The spec field.
        field: &'static str,
    },
    /// `vcpus` is 0.
    #[error("vcpus must be at least 1")]
    ZeroVcpus,
    /// `memory_mib` is 0.
    #[error("memory_mib must be at least 1")]
    ZeroMemory,
    /// `memory_mib` exceeds [`MAX_MEMORY_MIB`].
    #[error("memory_mib {0} exceeds the maximum of {MAX_MEMORY_MIB}")]
    MemoryTooLarge(u64),
    /// A port forward uses port 0.
    #[error("port forward #{index}: host and guest ports must not be 0")]
    ZeroPort {
        /// Position in `forwards`.
        index: usize,
    },
    /// Two forwards listen on the same host endpoint (QEMU would fail to start the domain).
    #[error("port forwards listen twice on {host_ip}:{host_port}")]
    DuplicateForward {
        /// Host address of the later forward.
        host_ip: Ipv4Addr,
        /// The shared host port.
        host_port: u16,
    },
    /// The XML writer failed. Writing into memory cannot fail today; kept typed rather than
    /// panicking should quick-xml ever report an error.
    #[error("writing domain XML")]
    Write(#[source] io::Error),
}

impl DomainSpec {
    /// Renders the libvirt domain XML, or says which field is unusable.
    ///
    /// The output is deterministic: the same spec always gives the same bytes, so the agent
    /// can compare it with what it defined before.
    pub fn to_xml(&self) -> Result<String, DomainXmlError> {
        let checked = self.check()?;
        let mut writer = Writer::new_with_indent(Vec::new(), b' ', 2);
        render(&mut writer, self, &checked).map_err(DomainXmlError::Write)?;
        // Every byte written came from `&str`s and ASCII markup, so this cannot fail; map it
        // anyway instead of unwrapping.
        String::from_utf8(writer.into_inner())
            .map_err(|e| DomainXmlError::Write(io::Error::new(io::ErrorKind::InvalidData, e)))
    }

    /// Validates every field and borrows the strings the renderer needs, so rendering itself
    /// has nothing left to decide.
    fn check(&self) -> Result<Checked<'_>, DomainXmlError> {
        check_name("name", &self.name)?;
        check_text("hostname", &self.hostname)?;
        if self.hostname.is_empty() {
            return Err(DomainXmlError::Empty { field: "hostname" });
        }
        if self.vcpus == 0 {
            return Err(DomainXmlError::ZeroVcpus);
        }
        if self.memory_mib == 0 {
            return Err(DomainXmlError::ZeroMemory);
        }
        if self.memory_mib > MAX_MEMORY_MIB {
            return Err(DomainXmlError::MemoryTooLarge(self.memory_mib));
        }
        let boot = match &self.boot {
            BootSource::Disk => CheckedBoot::Disk,
            BootSource::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                check_text("boot.cmdline", cmdline)?;
                CheckedBoot::Kernel {
                    kernel: check_path("boot.kernel", kernel)?,
                    initrd: initrd
                        .as_deref()
                        .map(|p| check_path("boot.initrd", p))
                        .transpose()?,
                    cmdline,
                }
            }
        };
        let network = match &self.network {
            NetworkAttachment::User { forwards } => CheckedNetwork::User {
                netdev: user_netdev_arg(forwards)?,
            },
            NetworkAttachment::LibvirtNetwork { name } => {
                check_name("network.name", name)?;
                CheckedNetwork::LibvirtNetwork(name)
            }
            NetworkAttachment::Bridge { name } => {
                check_bridge_name(name)?;
                CheckedNetwork::Bridge(name)
            }
        };
        Ok(Checked {
            uuid: self.uuid.hyphenated().to_string(),
            boot,
            disk: check_path("disk", &self.disk)?,
            seed: self
                .seed
                .as_deref()
                .map(|p| check_path("seed", p))
                .transpose()?,
            console_log: check_path("console_log", &self.console_log)?,
            network,
        })
    }
}

/// A spec that passed validation, with its paths as `&str`.
struct Checked<'a> {
    uuid: String,
    boot: CheckedBoot<'a>,
    disk: &'a str,
    seed: Option<&'a str>,
    console_log: &'a str,
    network: CheckedNetwork<'a>,
}

enum CheckedBoot<'a> {
    Disk,
    Kernel {
        kernel: &'a str,
        initrd: Option<&'a str>,
        cmdline: &'a str,
    },
}

enum CheckedNetwork<'a> {
    /// The full `-netdev` value.
    User {
        netdev: String,
    },
    LibvirtNetwork(&'a str),
    Bridge(&'a str),
}

/// Characters refused in every string: XML 1.0 cannot encode most C0 controls at all (not even
/// as `&#1;`), nor U+FFFE/U+FFFF; the remaining controls (tab, newlines, DEL, C1) have no sane
/// meaning in a title, name, path or command line, and libvirt itself rejects newlines in
/// `<title>`.
fn is_forbidden(c: char) -> bool {
    c.is_control() || matches!(c, '\u{FFFE}' | '\u{FFFF}')
}

fn check_text(field: &'static str, value: &str) -> Result<(), DomainXmlError> {
    match value.char_indices().find(|&(_, c)| is_forbidden(c)) {
        Some((index, ch)) => Err(DomainXmlError::ForbiddenCharacter { field, ch, index }),
        None => Ok(()),
    }
}

/// Domain and libvirt network names: non-empty, no control characters and no `/` (libvirt
/// uses names as file names under /etc/libvirt and /run/libvirt).
fn check_name(field: &'static str, value: &str) -> Result<(), DomainXmlError> {
    if value.is_empty() {
        return Err(DomainXmlError::Empty { field });
    }
    check_text(field, value)?;
    if value.contains('/') {
        return Err(DomainXmlError::ReservedCharacter { field, ch: '/' });
    }
    Ok(())
}

/// The kernel's `dev_valid_name`: what `ip link` would accept as a bridge name.
fn check_bridge_name(value: &str) -> Result<(), DomainXmlError> {
    if value.is_empty() {
        return Err(DomainXmlError::Empty {
            field: "network.name",
        });
    }
    check_text("network.name", value)?;
    let valid = value.len() <= MAX_IFNAME_LEN
        && value != "."
        && value != ".."
        && !value
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if valid {
        Ok(())
    } else {
        Err(DomainXmlError::InvalidBridgeName)
    }
}

fn check_path<'a>(field: &'static str, path: &'a Path) -> Result<&'a str, DomainXmlError> {
    let s = path.to_str().ok_or_else(|| DomainXmlError::NonUtf8Path {
        field,
        path: path.to_path_buf(),
    })?;
    if !path.is_absolute() {
        return Err(DomainXmlError::RelativePath { field });
    }
    check_text(field, s)?;
    Ok(s)
}

/// The QEMU `-netdev` value for user networking, e.g.
/// `user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:127.0.0.1:8080-:80`.
///
/// Built only from an `Ipv4Addr` and `u16`s, so no caller string can inject a `,` or `=` into
/// QEMU's option syntax.
fn user_netdev_arg(forwards: &[PortForward]) -> Result<String, DomainXmlError> {
    let mut seen: HashSet<(Ipv4Addr, u16)> = HashSet::new();
    let mut arg = format!("user,id={USER_NETDEV_ID}");
    for (index, fwd) in forwards.iter().enumerate() {
        if fwd.host_port == 0 || fwd.guest_port == 0 {
            return Err(DomainXmlError::ZeroPort { index });
        }
        // 0.0.0.0:P also conflicts with any other address on port P.
        let clash = seen.contains(&(fwd.host_ip, fwd.host_port))
            || (fwd.host_ip.is_unspecified() && seen.iter().any(|&(_, p)| p == fwd.host_port))
            || seen.contains(&(Ipv4Addr::UNSPECIFIED, fwd.host_port));
        if clash {
            return Err(DomainXmlError::DuplicateForward {
                host_ip: fwd.host_ip,
                host_port: fwd.host_port,
            });
        }
        seen.insert((fwd.host_ip, fwd.host_port));
        arg.push_str(&format!(
            ",hostfwd=tcp:{}:{}-:{}",
            fwd.host_ip, fwd.host_port, fwd.guest_port
        ));
    }
    Ok(arg)
}

type XmlWriter = Writer<Vec<u8>>;

/// `<name attrs...>text</name>`; quick-xml escapes both the attribute values and the text.
fn text_element(
    w: &mut XmlWriter,
    name: &str,
    attrs: &[(&str, &str)],
    text: &str,
) -> io::Result<()> {
    w.create_element(name)
        .with_attributes(attrs.iter().copied())
        .write_text_content(BytesText::new(text))?;
    Ok(())
}

/// `<name attrs.../>`.
fn empty_element(w: &mut XmlWriter, name: &str, attrs: &[(&str, &str)]) -> io::Result<()> {
    w.create_element(name)
        .with_attributes(attrs.iter().copied())
        .write_empty()?;
    Ok(())
}

/// `<name attrs...>children</name>`.
fn parent_element(
    w: &mut XmlWriter,
    name: &str,
    attrs: &[(&str, &str)],
    children: impl FnOnce(&mut XmlWriter) -> io::Result<()>,
) -> io::Result<()> {
    w.create_element(name)
        .with_attributes(attrs.iter().copied())
        .write_inner_content(children)?;
    Ok(())
}

fn render(w: &mut XmlWriter, spec: &DomainSpec, c: &Checked<'_>) -> io::Result<()> {
    let mut domain_attrs = vec![("type", spec.hypervisor.as_str())];
    // Declared only when used: libvirt drops unused namespaces anyway, and a domain without
    // <qemu:commandline> is not "tainted" (custom-argv) in libvirt's eyes.
    if matches!(c.network, CheckedNetwork::User { .. }) {
        domain_attrs.push(("xmlns:qemu", QEMU_NAMESPACE));
    }
    parent_element(w, "domain", &domain_attrs, |w| {
        text_element(w, "name", &[], &spec.name)?;
        text_element(w, "uuid", &[], &c.uuid)?;
        text_element(w, "title", &[], &spec.hostname)?;
        render_metadata(w, spec, c)?;
        text_element(
            w,
            "memory",
            &[("unit", "MiB")],
            &spec.memory_mib.to_string(),
        )?;
        text_element(
            w,
            "vcpu",
            &[("placement", "static")],
            &spec.vcpus.to_string(),
        )?;
        render_os(w, c)?;
        parent_element(w, "features", &[], |w| {
            // ACPI lets `virsh shutdown` (graceful stop) reach the guest; APIC is what every
            // modern x86 kernel expects.
            empty_element(w, "acpi", &[])?;
            empty_element(w, "apic", &[])
        })?;
        if spec.hypervisor == HypervisorKind::Kvm {
            // Full host CPU features for speed. TCG cannot pass the host CPU through.
            empty_element(w, "cpu", &[("mode", "host-passthrough")])?;
        }
        empty_element(w, "clock", &[("offset", "utc")])?;
        // A guest `poweroff` or a crash leaves the domain shut off for the agent to observe
        // and report; a guest `reboot` stays a reboot.
        text_element(w, "on_poweroff", &[], "destroy")?;
        text_element(w, "on_reboot", &[], "restart")?;
        text_element(w, "on_crash", &[], "destroy")?;
        render_devices(w, spec, c)?;
        if let CheckedNetwork::User { netdev } = &c.network {
            parent_element(w, "qemu:commandline", &[], |w| {
                empty_element(w, "qemu:arg", &[("value", "-netdev")])?;
                empty_element(w, "qemu:arg", &[("value", netdev)])?;
                empty_element(w, "qemu:arg", &[("value", "-device")])?;
                empty_element(w, "qemu:arg", &[("value", USER_NIC_DEVICE)])
            })?;
        }
        Ok(())
    })
}

fn render_metadata(w: &mut XmlWriter, spec: &DomainSpec, c: &Checked<'_>) -> io::Result<()> {
    parent_element(w, "metadata", &[], |w| {
        let machine = format!("{METADATA_PREFIX}:machine");
        let xmlns = format!("xmlns:{METADATA_PREFIX}");
        parent_element(w, &machine, &[(&xmlns, METADATA_NAMESPACE)], |w| {
            text_element(w, &format!("{METADATA_PREFIX}:id"), &[], &c.uuid)?;
            text_element(
                w,
                &format!("{METADATA_PREFIX}:generation"),
                &[],
                &spec.generation.to_string(),
            )?;
            if let Some(fingerprint) = &spec.fingerprint {
                text_element(
                    w,
                    &format!("{METADATA_PREFIX}:spec-sha256"),
                    &[],
                    &fingerprint.to_string(),
                )?;
            }
            text_element(
                w,
                &format!("{METADATA_PREFIX}:hostname"),
                &[],
                &spec.hostname,
            )?;
            text_element(
                w,
                &format!("{METADATA_PREFIX}:disk-gib"),
                &[],
                &spec.disk_gib.to_string(),
            )
        })
    })
}

fn render_os(w: &mut XmlWriter, c: &Checked<'_>) -> io::Result<()> {
    parent_element(w, "os", &[], |w| {
        text_element(
            w,
            "type",
            &[("arch", "x86_64"), ("machine", MACHINE_TYPE)],
            "hvm",
        )?;
        match &c.boot {
            CheckedBoot::Disk => empty_element(w, "boot", &[("dev", "hd")]),
            CheckedBoot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                text_element(w, "kernel", &[], kernel)?;
                if let Some(initrd) = initrd {
                    text_element(w, "initrd", &[], initrd)?;
                }
                // Always present, even empty, so the element structure does not depend on
                // the command line's content.
                text_element(w, "cmdline", &[], cmdline)
            }
        }
    })
}

fn render_devices(w: &mut XmlWriter, spec: &DomainSpec, c: &Checked<'_>) -> io::Result<()> {
    parent_element(w, "devices", &[], |w| {
        parent_element(w, "disk", &[("type", "file"), ("device", "disk")], |w| {
            // discard=unmap: guest TRIMs shrink the thin qcow2 overlay.
            empty_element(
                w,
                "driver",
                &[("name", "qemu"), ("type", "qcow2"), ("discard", "unmap")],
            )?;
            empty_element(w, "source", &[("file", c.disk)])?;
            empty_element(w, "target", &[("dev", "vda"), ("bus", "virtio")])
        })?;
        if let Some(seed) = c.seed {
            // virtio-scsi, not SATA: the Debian cloud kernel has no AHCI driver, and
            // virtio-scsi needs no libata probing (measured fastest, images/README.md).
            empty_element(
                w,
                "controller",
                &[("type", "scsi"), ("index", "0"), ("model", "virtio-scsi")],
            )?;
            parent_element(w, "disk", &[("type", "file"), ("device", "cdrom")], |w| {
                empty_element(w, "driver", &[("name", "qemu"), ("type", "raw")])?;
                empty_element(w, "source", &[("file", seed)])?;
                empty_element(w, "target", &[("dev", "sda"), ("bus", "scsi")])?;
                empty_element(w, "readonly", &[])
            })?;
        }
        // No USB controller means libvirt adds no USB tablet either: nothing for a headless
        // server to use, and one less emulated device polling under TCG.
        empty_element(w, "controller", &[("type", "usb"), ("model", "none")])?;
        match &c.network {
            // Rendered as <qemu:commandline> after <devices>.
            CheckedNetwork::User { .. } => {}
            CheckedNetwork::LibvirtNetwork(name) => {
                render_interface(w, spec.uuid, "network", "network", name)?;
            }
            CheckedNetwork::Bridge(name) => {
                render_interface(w, spec.uuid, "bridge", "bridge", name)?;
            }
        }
        // Serial console: a pty (so `virsh console` works) whose output libvirt also appends
        // to console_log through <log> (virtlogd when stdio_handler=logd, QEMU's chardev
        // logfile otherwise); the log is written whether or not anyone is attached. Both at
        // once, not the log-only fallback: measured on the dev machine (libvirt 9.0, QEMU 7.2,
        // tiny image) the readiness line reached the file, ssh worked, and `virsh ttyconsole`
        // reported the pty. OpenStack Nova has used the same pairing for years.
        parent_element(w, "serial", &[("type", "pty")], |w| {
            empty_element(w, "log", &[("file", c.console_log), ("append", "on")])?;
            empty_element(w, "target", &[("port", "0")])
        })?;
        parent_element(w, "console", &[("type", "pty")], |w| {
            empty_element(w, "target", &[("type", "serial"), ("port", "0")])
        })?;
        // Entropy for early boot (ssh host keys) without draining the host's pool.
        parent_element(w, "rng", &[("model", "virtio")], |w| {
            text_element(w, "backend", &[("model", "random")], "/dev/urandom")
        })?;
        empty_element(w, "memballoon", &[("model", "virtio")])
    })
}

fn render_interface(
    w: &mut XmlWriter,
    uuid: Uuid,
    kind: &str,
    source_attr: &str,
    source: &str,
) -> io::Result<()> {
    let mac = mac_address(uuid);
    parent_element(w, "interface", &[("type", kind)], |w| {
        // A MAC derived from the machine id: redefining the domain (a new generation) keeps
        // the same MAC, hence the same DHCP lease and address. libvirt would pick a new
        // random one on every define.
        empty_element(w, "mac", &[("address", &mac)])?;
        empty_element(w, "source", &[(source_attr, source)])?;
        empty_element(w, "model", &[("type", "virtio")])
    })
}

/// `52:54:00:xx:xx:xx` (QEMU's locally administered unicast prefix, as libvirt uses) with the
/// last three bytes of the machine id, which are random in v4 and v7 UUIDs.
fn mac_address(uuid: Uuid) -> String {
    let b = uuid.as_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[13], b[14], b[15])
}

/// The port forwards of a domain's user-mode NIC, read back from its XML (the `-netdev user`
/// argument of `<qemu:commandline>`): what the agent reports as the machine's ports and keeps
/// when it redefines the domain. Empty for bridged and libvirt-network domains.
pub fn read_user_forwards(xml: &str) -> Result<Vec<PortForward>, MetadataError> {
    let mut reader = NsReader::from_str(xml);
    let mut out = Vec::new();
    loop {
        let (ns, event) = reader.read_resolved_event()?;
        let (Event::Start(e) | Event::Empty(e)) = event else {
            if matches!(event, Event::Eof) {
                return Ok(out);
            }
            continue;
        };
        let qemu = matches!(ns, ResolveResult::Bound(Namespace(n)) if n == QEMU_NAMESPACE);
        if !qemu || e.local_name().as_ref() != "arg" {
            continue;
        }
        let Some(value) = e.try_get_attribute("value")? else {
            continue;
        };
        let value = value.normalized_value(quick_xml::XmlVersion::default())?;
        let Some(rest) = value.strip_prefix("user,") else {
            continue;
        };
        for part in rest.split(',') {
            if let Some(fwd) = part.strip_prefix("hostfwd=tcp:") {
                out.push(parse_hostfwd(fwd).ok_or_else(|| MetadataError::BadForward(part.into()))?);
            }
        }
    }
}

/// `127.0.0.1:2222-:22` → the forward; `None` for anything else.
fn parse_hostfwd(s: &str) -> Option<PortForward> {
    let (host, guest) = s.split_once('-')?;
    let (host_ip, host_port) = host.rsplit_once(':')?;
    let guest_port = guest.strip_prefix(':')?;
    Some(PortForward {
        host_ip: host_ip.parse().ok()?,
        host_port: host_port.parse().ok()?,
        guest_port: guest_port.parse().ok()?,
    })
}

/// SkyGate's metadata as read back from a defined domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineMetadata {
    /// The machine id.
    pub id: Uuid,
    /// The spec generation the domain was defined from.
    pub generation: u64,
    /// The hostname at that generation.
    pub hostname: String,
    /// The overlay size in GiB (absent in definitions written before it was recorded).
    pub disk_gib: Option<u64>,
    /// The fingerprint of the spec's content (absent in definitions written before it was
    /// recorded).
    pub fingerprint: Option<SpecFingerprint>,
}

/// Why [`MachineMetadata::from_xml`] failed.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// The document is not well-formed XML. quick-xml's error is kept as its text: its
    /// Display already embeds its own source, so as a source it would read twice.
    #[error("malformed XML: {0}")]
    Xml(String),
    /// A SkyGate element is missing (e.g. a domain SkyGate did not define).
    #[error("skygate metadata has no {0} element")]
    Missing(&'static str),
    /// A SkyGate element appears twice; ambiguous metadata is not trusted.
    #[error("skygate metadata has more than one {0} element")]
    Duplicate(&'static str),
    /// A SkyGate element contains markup instead of text.
    #[error("skygate metadata element {0} contains markup")]
    UnexpectedMarkup(&'static str),
    /// `id` is not a UUID.
    #[error("skygate metadata id is not a UUID")]
    InvalidId(#[source] uuid::Error),
    /// `generation` is not a decimal u64.
    #[error("skygate metadata generation is not an unsigned integer")]
    InvalidGeneration(#[source] std::num::ParseIntError),
    /// A `hostfwd` of the user-mode NIC is not `tcp:IP:PORT-:PORT`.
    #[error("unreadable port forward {0:?}")]
    BadForward(String),
    /// An attribute could not be read.
    #[error("malformed attribute")]
    Attr(#[from] quick_xml::events::attributes::AttrError),
    /// `disk-gib` is not a decimal u64.
    #[error("skygate metadata disk-gib is not an unsigned integer")]
    InvalidDiskSize(#[source] std::num::ParseIntError),
    /// `spec-sha256` is not a fingerprint.
    #[error("skygate metadata spec-sha256 is unreadable")]
    InvalidFingerprint(#[source] crate::model::InvalidFingerprint),
}

impl From<quick_xml::Error> for MetadataError {
    fn from(e: quick_xml::Error) -> Self {
        MetadataError::Xml(e.to_string())
    }
}

impl MachineMetadata {
    /// Reads SkyGate's metadata from either form libvirt hands out:
    ///
    /// - a full domain XML (`virDomainGetXMLDesc`): elements are matched by namespace URI and
    ///   local name, whatever prefix libvirt chose;
    /// - the element `virDomainGetMetadata(VIR_DOMAIN_METADATA_ELEMENT, METADATA_NAMESPACE)`
    ///   returns, which libvirt strips of its namespace (measured with libvirt 9.0:
    ///   `<machine><id>..</id><generation>..</generation>..</machine>`): an unqualified root
    ///   `machine` and its unqualified children.
    pub fn from_xml(xml: &str) -> Result<Self, MetadataError> {
        let mut reader = NsReader::from_str(xml);
        let mut fields = MetadataFields::default();
        // Depth of the next element; field elements are consumed whole by `read_text`.
        let mut depth = 0usize;
        let mut bare = false;
        loop {
            let (ns, event) = reader.read_resolved_event()?;
            let qualified =
                matches!(ns, ResolveResult::Bound(Namespace(n)) if n == METADATA_NAMESPACE);
            let unqualified = matches!(ns, ResolveResult::Unbound);
            match event {
                Event::Start(start) => {
                    let local = start.local_name();
                    if depth == 0 && unqualified && local.as_ref() == "machine" {
                        bare = true;
                    }
                    let ours = qualified || (bare && depth == 1 && unqualified);
                    if let Some((field, slot)) = ours.then(|| fields.slot(local.as_ref())).flatten()
                    {
                        if slot.is_some() {
                            return Err(MetadataError::Duplicate(field));
                        }
                        *slot = Some(read_text(&mut reader, field)?);
                    } else {
                        depth += 1;
                    }
                }
                // `<skygate:hostname/>`: an empty value (`to_xml` never writes one).
                Event::Empty(start) => {
                    let ours = qualified || (bare && depth == 1 && unqualified);
                    let local = start.local_name();
                    if let Some((field, slot)) = ours.then(|| fields.slot(local.as_ref())).flatten()
                    {
                        if slot.is_some() {
                            return Err(MetadataError::Duplicate(field));
                        }
                        *slot = Some(String::new());
                    }
                }
                Event::End(_) => depth = depth.saturating_sub(1),
                Event::Eof => break,
                _ => {}
            }
        }
        let id = fields.id.ok_or(MetadataError::Missing("id"))?;
        let generation = fields
            .generation
            .ok_or(MetadataError::Missing("generation"))?;
        Ok(MachineMetadata {
            id: Uuid::parse_str(id.trim()).map_err(MetadataError::InvalidId)?,
            generation: generation
                .trim()
                .parse()
                .map_err(MetadataError::InvalidGeneration)?,
            hostname: fields.hostname.ok_or(MetadataError::Missing("hostname"))?,
            disk_gib: fields
                .disk_gib
                .map(|v| v.trim().parse().map_err(MetadataError::InvalidDiskSize))
                .transpose()?,
            fingerprint: fields
                .fingerprint
                .map(|v| v.trim().parse().map_err(MetadataError::InvalidFingerprint))
                .transpose()?,
        })
    }
}

/// The raw text of each metadata field found so far.
#[derive(Default)]
struct MetadataFields {
    id: Option<String>,
    generation: Option<String>,
    hostname: Option<String>,
    disk_gib: Option<String>,
    fingerprint: Option<String>,
}

impl MetadataFields {
    /// The field an element of our namespace with this local name fills, if any.
    fn slot(&mut self, local_name: &str) -> Option<(&'static str, &mut Option<String>)> {
        match local_name {
            "id" => Some(("id", &mut self.id)),
            "generation" => Some(("generation", &mut self.generation)),
            "hostname" => Some(("hostname", &mut self.hostname)),
            "disk-gib" => Some(("disk-gib", &mut self.disk_gib)),
            "spec-sha256" => Some(("spec-sha256", &mut self.fingerprint)),
            _ => None,
        }
    }
}

/// Collects the unescaped text of the element whose start tag was just read, up to its end
/// tag. Text arrives as `Text` chunks split by `GeneralRef` events (`&amp;`, `&#13;`, ...).
fn read_text(reader: &mut NsReader<&[u8]>, field: &'static str) -> Result<String, MetadataError> {
    let mut out = String::new();
    loop {
        match reader.read_event()? {
            Event::Text(t) => out.push_str(&t.xml10_content()),
            Event::CData(t) => out.push_str(&t.xml10_content()),
            Event::GeneralRef(r) => push_reference(&mut out, &r)?,
            Event::End(_) => return Ok(out),
            Event::Comment(_) | Event::PI(_) => {}
            Event::Start(_) | Event::Empty(_) => {
                return Err(MetadataError::UnexpectedMarkup(field))
            }
            Event::Eof | Event::Decl(_) | Event::DocType(_) => {
                return Err(MetadataError::Missing(field))
            }
        }
    }
}

/// Appends what a `&...;` reference stands for: a character reference or one of XML's five
/// predefined entities (libvirt documents declare no others).
fn push_reference(
    out: &mut String,
    r: &quick_xml::events::BytesRef<'_>,
) -> Result<(), quick_xml::Error> {
    if let Some(ch) = r.resolve_char_ref()? {
        out.push(ch);
        return Ok(());
    }
    match quick_xml::escape::resolve_predefined_entity(r) {
        Some(s) => {
            out.push_str(s);
            Ok(())
        }
        None => Err(quick_xml::Error::Escape(
            quick_xml::escape::EscapeError::UnrecognizedEntity(0..0, r.to_string()),
        )),
    }
}

#[cfg(test)]
mod tests;
