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

/// XML namespace of SkyGate's element inside `<metadata>`. libvirt keys metadata by this URI
/// (`virsh metadata DOMAIN --uri ...`); it is versioned so a future layout can coexist.
pub const METADATA_NAMESPACE: &str = "https://skygate.dev/xmlns/machine/v1";
/// Prefix used when writing the metadata element. Readers must match on
/// [`METADATA_NAMESPACE`], not on this prefix: libvirt is free to re-prefix on output.
pub const METADATA_PREFIX: &str = "skygate";
/// libvirt's QEMU namespace, needed for `<qemu:commandline>` (user networking).
const QEMU_NAMESPACE: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// Largest `memory_mib` libvirt accepts: it parses memory into bytes and caps it at
/// `LLONG_MAX` (virMemoryMaxValue on 64-bit hosts), i.e. (2^63 - 1) >> 20 MiB.
pub const MAX_MEMORY_MIB: u64 = (1 << 43) - 1;

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
/// names its root bus `pci.0`; one machine type for TCG and KVM keeps "one attribute apart"
/// (DESIGN.md) true.
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
    #[error("writing domain XML: {0}")]
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
            text_element(
                w,
                &format!("{METADATA_PREFIX}:hostname"),
                &[],
                &spec.hostname,
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

/// SkyGate's metadata as read back from a defined domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineMetadata {
    /// The machine id.
    pub id: Uuid,
    /// The spec generation the domain was defined from.
    pub generation: u64,
    /// The hostname at that generation.
    pub hostname: String,
}

/// Why [`MachineMetadata::from_xml`] failed.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// The document is not well-formed XML.
    #[error("malformed XML: {0}")]
    Xml(#[from] quick_xml::Error),
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
    #[error("skygate metadata id is not a UUID: {0}")]
    InvalidId(#[source] uuid::Error),
    /// `generation` is not a decimal u64.
    #[error("skygate metadata generation is not an unsigned integer: {0}")]
    InvalidGeneration(#[source] std::num::ParseIntError),
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
        })
    }
}

/// The raw text of each metadata field found so far.
#[derive(Default)]
struct MetadataFields {
    id: Option<String>,
    generation: Option<String>,
    hostname: Option<String>,
}

impl MetadataFields {
    /// The field an element of our namespace with this local name fills, if any.
    fn slot(&mut self, local_name: &str) -> Option<(&'static str, &mut Option<String>)> {
        match local_name {
            "id" => Some(("id", &mut self.id)),
            "generation" => Some(("generation", &mut self.generation)),
            "hostname" => Some(("hostname", &mut self.hostname)),
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
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    use quick_xml::events::attributes::Attribute;
    use quick_xml::XmlVersion;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const MACHINE_ID: Uuid = Uuid::from_u128(0x0192_f5a3_7c1e_7b2d_9a4f_3e8c_d1b6_a7f0);
    const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

    /// The domain images/tiny/boot-test.sh defines by hand, plus the overlay disk: TCG, direct
    /// kernel boot, seed on virtio-scsi, user networking with ssh and http forwarded.
    fn tcg_kernel_user_seed() -> DomainSpec {
        DomainSpec {
            name: format!("skygate-{MACHINE_ID}"),
            uuid: MACHINE_ID,
            hostname: "tiny-check".into(),
            generation: 3,
            hypervisor: HypervisorKind::Qemu,
            vcpus: 1,
            memory_mib: 256,
            boot: BootSource::Kernel {
                kernel: "/var/lib/skygate-images/tiny/vmlinuz".into(),
                initrd: Some("/var/lib/skygate-images/tiny/initrd.img".into()),
                cmdline: "console=ttyS0 quiet".into(),
            },
            disk: format!("/var/lib/skygate-agent/machines/{MACHINE_ID}/disk.qcow2").into(),
            seed: Some(format!("/var/lib/skygate-agent/machines/{MACHINE_ID}/seed.iso").into()),
            console_log: format!("/var/lib/skygate-agent/machines/{MACHINE_ID}/console.log").into(),
            network: NetworkAttachment::User {
                forwards: vec![
                    PortForward {
                        host_ip: LOOPBACK,
                        host_port: 22022,
                        guest_port: 22,
                    },
                    PortForward {
                        host_ip: LOOPBACK,
                        host_port: 28080,
                        guest_port: 80,
                    },
                ],
            },
        }
    }

    /// A cloud image on a real KVM host, bridged, no seed (e.g. configured by other means).
    fn kvm_disk_bridge() -> DomainSpec {
        DomainSpec {
            hostname: "web-1".into(),
            generation: 1,
            hypervisor: HypervisorKind::Kvm,
            vcpus: 4,
            memory_mib: 8192,
            boot: BootSource::Disk,
            seed: None,
            network: NetworkAttachment::Bridge { name: "br0".into() },
            ..tcg_kernel_user_seed()
        }
    }

    /// A cloud image with a seed on a libvirt-managed network.
    fn kvm_disk_libvirt_network() -> DomainSpec {
        DomainSpec {
            hostname: "db-1".into(),
            generation: 7,
            hypervisor: HypervisorKind::Kvm,
            vcpus: 2,
            memory_mib: 2048,
            boot: BootSource::Disk,
            network: NetworkAttachment::LibvirtNetwork {
                name: "skygate-tenants".into(),
            },
            ..tcg_kernel_user_seed()
        }
    }

    // ---- parsing helpers: everything is read back with quick-xml, never with string search ----

    /// The element skeleton: (depth, qualified name) of every start or empty tag, in order.
    fn structure(xml: &str) -> Result<Vec<(usize, String)>, quick_xml::Error> {
        let mut reader = NsReader::from_str(xml);
        let mut depth = 0usize;
        let mut out = Vec::new();
        loop {
            match reader.read_event()? {
                Event::Start(e) => {
                    out.push((depth, e.name().as_ref().to_owned()));
                    depth += 1;
                }
                Event::Empty(e) => out.push((depth, e.name().as_ref().to_owned())),
                Event::End(_) => depth -= 1,
                Event::Eof => return Ok(out),
                _ => {}
            }
        }
    }

    /// Unescaped text of every element with this qualified name.
    fn texts(xml: &str, qname: &str) -> Vec<String> {
        let mut reader = NsReader::from_str(xml);
        let mut out = Vec::new();
        loop {
            match reader.read_event().unwrap() {
                Event::Start(e) if e.name().as_ref() == qname => {
                    out.push(read_text(&mut reader, "test").unwrap());
                }
                Event::Empty(e) if e.name().as_ref() == qname => out.push(String::new()),
                Event::Eof => return out,
                _ => {}
            }
        }
    }

    /// Normalized values of attribute `attr` on every element with this qualified name.
    fn attrs(xml: &str, qname: &str, attr: &str) -> Vec<String> {
        let mut reader = NsReader::from_str(xml);
        let mut out = Vec::new();
        loop {
            match reader.read_event().unwrap() {
                Event::Start(e) | Event::Empty(e) if e.name().as_ref() == qname => {
                    for a in e.attributes() {
                        let a: Attribute<'_> = a.unwrap();
                        if a.key.as_ref() == attr {
                            out.push(
                                a.normalized_value(XmlVersion::Implicit1_0)
                                    .unwrap()
                                    .into_owned(),
                            );
                        }
                    }
                }
                Event::Eof => return out,
                _ => {}
            }
        }
    }

    fn xml(spec: &DomainSpec) -> String {
        spec.to_xml().unwrap()
    }

    // ---- snapshots ----

    #[test]
    fn snapshot_tcg_kernel_boot_user_net_seed() {
        insta::assert_snapshot!(
            "tcg_kernel_boot_user_net_seed",
            xml(&tcg_kernel_user_seed())
        );
    }

    #[test]
    fn snapshot_kvm_disk_boot_bridge_no_seed() {
        insta::assert_snapshot!("kvm_disk_boot_bridge_no_seed", xml(&kvm_disk_bridge()));
    }

    #[test]
    fn snapshot_kvm_disk_boot_libvirt_network_seed() {
        insta::assert_snapshot!(
            "kvm_disk_boot_libvirt_network_seed",
            xml(&kvm_disk_libvirt_network())
        );
    }

    // ---- unit tests ----

    #[test]
    fn domain_type_follows_hypervisor() {
        let qemu = xml(&tcg_kernel_user_seed());
        assert_eq!(attrs(&qemu, "domain", "type"), ["qemu"]);
        let kvm = xml(&DomainSpec {
            hypervisor: HypervisorKind::Kvm,
            ..tcg_kernel_user_seed()
        });
        assert_eq!(attrs(&kvm, "domain", "type"), ["kvm"]);
    }

    #[test]
    fn host_passthrough_only_for_kvm() {
        let kvm = xml(&kvm_disk_bridge());
        assert_eq!(attrs(&kvm, "cpu", "mode"), ["host-passthrough"]);
        let qemu = xml(&DomainSpec {
            hypervisor: HypervisorKind::Qemu,
            ..kvm_disk_bridge()
        });
        assert!(attrs(&qemu, "cpu", "mode").is_empty());
        assert!(!structure(&qemu).unwrap().iter().any(|(_, n)| n == "cpu"));
    }

    #[test]
    fn user_networking_args_match_host_notes() {
        let doc = xml(&tcg_kernel_user_seed());
        assert_eq!(
            attrs(&doc, "qemu:arg", "value"),
            [
                "-netdev",
                "user,id=net0,hostfwd=tcp:127.0.0.1:22022-:22,hostfwd=tcp:127.0.0.1:28080-:80",
                "-device",
                "virtio-net-pci,netdev=net0,bus=pci.0,addr=0x10",
            ]
        );
        assert_eq!(attrs(&doc, "domain", "xmlns:qemu"), [QEMU_NAMESPACE]);
        // The user NIC lives only on the QEMU command line, not as a libvirt <interface>.
        assert!(attrs(&doc, "interface", "type").is_empty());
    }

    #[test]
    fn netdev_arg_formats() {
        assert_eq!(user_netdev_arg(&[]).unwrap(), "user,id=net0");
        let one = [PortForward {
            host_ip: LOOPBACK,
            host_port: 18080,
            guest_port: 80,
        }];
        assert_eq!(
            user_netdev_arg(&one).unwrap(),
            "user,id=net0,hostfwd=tcp:127.0.0.1:18080-:80"
        );
        let any_addr = [PortForward {
            host_ip: Ipv4Addr::UNSPECIFIED,
            host_port: 2222,
            guest_port: 22,
        }];
        assert_eq!(
            user_netdev_arg(&any_addr).unwrap(),
            "user,id=net0,hostfwd=tcp:0.0.0.0:2222-:22"
        );
    }

    #[test]
    fn other_networks_are_virtio_interfaces_without_qemu_namespace() {
        let bridge = xml(&kvm_disk_bridge());
        assert_eq!(attrs(&bridge, "interface", "type"), ["bridge"]);
        assert_eq!(attrs(&bridge, "source", "bridge"), ["br0"]);
        assert_eq!(attrs(&bridge, "model", "type"), ["virtio"]);
        assert!(attrs(&bridge, "domain", "xmlns:qemu").is_empty());
        assert!(attrs(&bridge, "qemu:arg", "value").is_empty());

        let net = xml(&kvm_disk_libvirt_network());
        assert_eq!(attrs(&net, "interface", "type"), ["network"]);
        assert_eq!(attrs(&net, "source", "network"), ["skygate-tenants"]);
        // Stable MAC from the machine id, so a redefinition keeps the DHCP lease.
        assert_eq!(attrs(&net, "mac", "address"), ["52:54:00:b6:a7:f0"]);
    }

    #[test]
    fn fixed_policy_elements() {
        let doc = xml(&tcg_kernel_user_seed());
        assert_eq!(texts(&doc, "on_poweroff"), ["destroy"]);
        assert_eq!(texts(&doc, "on_reboot"), ["restart"]);
        assert_eq!(texts(&doc, "on_crash"), ["destroy"]);
        assert_eq!(texts(&doc, "memory"), ["256"]);
        assert_eq!(attrs(&doc, "memory", "unit"), ["MiB"]);
        assert_eq!(texts(&doc, "vcpu"), ["1"]);
        assert_eq!(attrs(&doc, "memballoon", "model"), ["virtio"]);
        assert_eq!(attrs(&doc, "rng", "model"), ["virtio"]);
        assert_eq!(attrs(&doc, "controller", "model"), ["virtio-scsi", "none"]);
        assert_eq!(attrs(&doc, "target", "bus"), ["virtio", "scsi"]);
        assert_eq!(attrs(&doc, "log", "file").len(), 1);
        let names: Vec<String> = structure(&doc)
            .unwrap()
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        for absent in ["graphics", "input", "video", "sound"] {
            assert!(!names.iter().any(|n| n == absent), "{absent} present");
        }
        for present in ["acpi", "apic", "readonly"] {
            assert!(names.iter().any(|n| n == present), "{present} missing");
        }
    }

    #[test]
    fn disk_boot_and_kernel_boot_os_sections() {
        let disk = xml(&kvm_disk_bridge());
        assert_eq!(attrs(&disk, "boot", "dev"), ["hd"]);
        assert!(texts(&disk, "kernel").is_empty());
        let kernel = xml(&DomainSpec {
            boot: BootSource::Kernel {
                kernel: "/k".into(),
                initrd: None,
                cmdline: String::new(),
            },
            ..kvm_disk_bridge()
        });
        assert!(attrs(&kernel, "boot", "dev").is_empty());
        assert_eq!(texts(&kernel, "kernel"), ["/k"]);
        assert!(texts(&kernel, "initrd").is_empty());
        assert_eq!(texts(&kernel, "cmdline"), [""]);
    }

    #[test]
    fn output_is_deterministic() {
        assert_eq!(xml(&tcg_kernel_user_seed()), xml(&tcg_kernel_user_seed()));
    }

    #[test]
    fn hostile_but_representable_strings_round_trip() {
        let hostname = "<b>&amp;'\"]]>--<!-- x -->\u{e9}\u{1F600}\u{202E} ";
        let cmdline = "console=ttyS0 x=\"<&>\" y='a' -- ]]> &#0;";
        let kernel = "/v/a b/&lt;'\"<>]]>--\u{e9}";
        let spec = DomainSpec {
            hostname: hostname.into(),
            boot: BootSource::Kernel {
                kernel: kernel.into(),
                initrd: None,
                cmdline: cmdline.into(),
            },
            console_log: "/l/\"'&<>.log".into(),
            network: NetworkAttachment::LibvirtNetwork {
                name: "n<&>\"'".into(),
            },
            ..tcg_kernel_user_seed()
        };
        let doc = xml(&spec);
        assert_eq!(texts(&doc, "title"), [hostname]);
        assert_eq!(texts(&doc, "cmdline"), [cmdline]);
        assert_eq!(texts(&doc, "kernel"), [kernel]);
        assert_eq!(attrs(&doc, "log", "file"), ["/l/\"'&<>.log"]);
        assert_eq!(attrs(&doc, "source", "network"), ["n<&>\"'"]);
        let meta = MachineMetadata::from_xml(&doc).unwrap();
        assert_eq!(meta.hostname, hostname);
        assert_eq!(
            structure(&doc).unwrap(),
            structure(&xml(&DomainSpec {
                boot: BootSource::Kernel {
                    kernel: "/k".into(),
                    initrd: None,
                    cmdline: String::new(),
                },
                network: NetworkAttachment::LibvirtNetwork { name: "n".into() },
                ..tcg_kernel_user_seed()
            }))
            .unwrap()
        );
    }

    fn err(spec: DomainSpec) -> DomainXmlError {
        spec.to_xml().unwrap_err()
    }

    #[test]
    fn validation_errors() {
        let base = tcg_kernel_user_seed;
        assert!(matches!(
            err(DomainSpec { vcpus: 0, ..base() }),
            DomainXmlError::ZeroVcpus
        ));
        assert!(matches!(
            err(DomainSpec {
                memory_mib: 0,
                ..base()
            }),
            DomainXmlError::ZeroMemory
        ));
        assert!(matches!(
            err(DomainSpec {
                memory_mib: MAX_MEMORY_MIB + 1,
                ..base()
            }),
            DomainXmlError::MemoryTooLarge(_)
        ));
        assert!(DomainSpec {
            memory_mib: MAX_MEMORY_MIB,
            ..base()
        }
        .to_xml()
        .is_ok());
        assert!(matches!(
            err(DomainSpec {
                boot: BootSource::Kernel {
                    kernel: "/k".into(),
                    initrd: None,
                    cmdline: "console=ttyS0\0init=/bin/sh".into(),
                },
                ..base()
            }),
            DomainXmlError::ForbiddenCharacter {
                field: "boot.cmdline",
                ch: '\0',
                index: 13
            }
        ));
        assert!(matches!(
            err(DomainSpec {
                hostname: "a\nb".into(),
                ..base()
            }),
            DomainXmlError::ForbiddenCharacter {
                field: "hostname",
                ch: '\n',
                index: 1
            }
        ));
        assert!(matches!(
            err(DomainSpec {
                hostname: "x\u{FFFE}".into(),
                ..base()
            }),
            DomainXmlError::ForbiddenCharacter {
                field: "hostname",
                ..
            }
        ));
        assert!(matches!(
            err(DomainSpec {
                hostname: String::new(),
                ..base()
            }),
            DomainXmlError::Empty { field: "hostname" }
        ));
        assert!(matches!(
            err(DomainSpec {
                name: String::new(),
                ..base()
            }),
            DomainXmlError::Empty { field: "name" }
        ));
        assert!(matches!(
            err(DomainSpec {
                name: "skygate-../x".into(),
                ..base()
            }),
            DomainXmlError::ReservedCharacter {
                field: "name",
                ch: '/'
            }
        ));
        assert!(matches!(
            err(DomainSpec {
                disk: "disk.qcow2".into(),
                ..base()
            }),
            DomainXmlError::RelativePath { field: "disk" }
        ));
        assert!(matches!(
            err(DomainSpec {
                seed: Some(PathBuf::from(OsString::from_vec(b"/seed\xff.iso".to_vec()))),
                ..base()
            }),
            DomainXmlError::NonUtf8Path { field: "seed", .. }
        ));
        assert!(matches!(
            err(DomainSpec {
                console_log: "/log\t".into(),
                ..base()
            }),
            DomainXmlError::ForbiddenCharacter {
                field: "console_log",
                ..
            }
        ));
        for bad in ["", "averyverylongbr0", "br/0", "br:0", "br 0", ".", ".."] {
            let e = err(DomainSpec {
                network: NetworkAttachment::Bridge { name: bad.into() },
                ..base()
            });
            assert!(
                matches!(
                    e,
                    DomainXmlError::InvalidBridgeName | DomainXmlError::Empty { .. }
                ),
                "{bad:?}: {e}"
            );
        }
        assert!(matches!(
            err(DomainSpec {
                network: NetworkAttachment::LibvirtNetwork { name: "a/b".into() },
                ..base()
            }),
            DomainXmlError::ReservedCharacter {
                field: "network.name",
                ..
            }
        ));
    }

    #[test]
    fn forward_validation() {
        let fwd = |host_ip, host_port, guest_port| PortForward {
            host_ip,
            host_port,
            guest_port,
        };
        let spec = |forwards| DomainSpec {
            network: NetworkAttachment::User { forwards },
            ..tcg_kernel_user_seed()
        };
        assert!(matches!(
            err(spec(vec![fwd(LOOPBACK, 22, 22), fwd(LOOPBACK, 0, 80)])),
            DomainXmlError::ZeroPort { index: 1 }
        ));
        assert!(matches!(
            err(spec(vec![fwd(LOOPBACK, 2222, 0)])),
            DomainXmlError::ZeroPort { index: 0 }
        ));
        assert!(matches!(
            err(spec(vec![fwd(LOOPBACK, 2222, 22), fwd(LOOPBACK, 2222, 80)])),
            DomainXmlError::DuplicateForward {
                host_port: 2222,
                ..
            }
        ));
        for pair in [
            [
                fwd(Ipv4Addr::UNSPECIFIED, 2222, 22),
                fwd(LOOPBACK, 2222, 80),
            ],
            [
                fwd(LOOPBACK, 2222, 22),
                fwd(Ipv4Addr::UNSPECIFIED, 2222, 80),
            ],
        ] {
            assert!(matches!(
                err(spec(pair.to_vec())),
                DomainXmlError::DuplicateForward { .. }
            ));
        }
        // Same port on two distinct addresses, and two host ports to one guest port: fine.
        assert!(spec(vec![
            fwd(LOOPBACK, 2222, 22),
            fwd(Ipv4Addr::new(127, 0, 0, 2), 2222, 22),
            fwd(LOOPBACK, 2223, 22),
        ])
        .to_xml()
        .is_ok());
    }

    #[test]
    fn error_messages_do_not_echo_tenant_strings() {
        let e = err(DomainSpec {
            hostname: "secret-payload\u{7}".into(),
            ..tcg_kernel_user_seed()
        });
        assert!(!e.to_string().contains("secret-payload"), "{e}");
    }

    // ---- metadata ----

    #[test]
    fn metadata_round_trips() {
        let spec = tcg_kernel_user_seed();
        assert_eq!(
            MachineMetadata::from_xml(&xml(&spec)).unwrap(),
            MachineMetadata {
                id: MACHINE_ID,
                generation: 3,
                hostname: "tiny-check".into(),
            }
        );
    }

    #[test]
    fn metadata_is_matched_by_namespace_not_prefix() {
        // What virDomainGetMetadata may return: another prefix, and a decoy element with the
        // same local names in a different namespace.
        let doc = format!(
            "<m:machine xmlns:m='{METADATA_NAMESPACE}' xmlns:o='urn:other'>\
               <o:generation>99</o:generation>\
               <m:id>{MACHINE_ID}</m:id><m:generation>42</m:generation>\
               <m:hostname>a&amp;b&#233;</m:hostname></m:machine>"
        );
        assert_eq!(
            MachineMetadata::from_xml(&doc).unwrap(),
            MachineMetadata {
                id: MACHINE_ID,
                generation: 42,
                hostname: "a&b\u{e9}".into(),
            }
        );
    }

    #[test]
    fn metadata_from_virdomaingetmetadata_output() {
        // Verbatim shape of `virsh metadata DOMAIN --uri METADATA_NAMESPACE` (libvirt 9.0):
        // the namespace is stripped.
        let doc = format!(
            "<machine>\n  <id>{MACHINE_ID}</id>\n  <generation>5</generation>\n  \
             <hostname>dx &lt;check&gt; &amp; \"more\"</hostname>\n</machine>\n"
        );
        assert_eq!(
            MachineMetadata::from_xml(&doc).unwrap(),
            MachineMetadata {
                id: MACHINE_ID,
                generation: 5,
                hostname: "dx <check> & \"more\"".into(),
            }
        );
        // Unqualified look-alikes inside a full domain XML are not ours.
        let decoy = format!(
            "<domain><machine><id>{MACHINE_ID}</id><generation>1</generation>\
             <hostname>h</hostname></machine></domain>"
        );
        assert!(matches!(
            MachineMetadata::from_xml(&decoy),
            Err(MetadataError::Missing("id"))
        ));
    }

    #[test]
    fn metadata_errors() {
        let ns = METADATA_NAMESPACE;
        let missing = format!("<m:machine xmlns:m='{ns}'><m:id>{MACHINE_ID}</m:id></m:machine>");
        assert!(matches!(
            MachineMetadata::from_xml(&missing),
            Err(MetadataError::Missing("generation"))
        ));
        let dup = format!(
            "<m:machine xmlns:m='{ns}'><m:id>{MACHINE_ID}</m:id>\
             <m:generation>1</m:generation><m:generation>2</m:generation>\
             <m:hostname>h</m:hostname></m:machine>"
        );
        assert!(matches!(
            MachineMetadata::from_xml(&dup),
            Err(MetadataError::Duplicate("generation"))
        ));
        let bad_gen = format!(
            "<m:machine xmlns:m='{ns}'><m:id>{MACHINE_ID}</m:id>\
             <m:generation>-1</m:generation><m:hostname>h</m:hostname></m:machine>"
        );
        assert!(matches!(
            MachineMetadata::from_xml(&bad_gen),
            Err(MetadataError::InvalidGeneration(_))
        ));
        let bad_id = format!(
            "<m:machine xmlns:m='{ns}'><m:id>nope</m:id>\
             <m:generation>1</m:generation><m:hostname>h</m:hostname></m:machine>"
        );
        assert!(matches!(
            MachineMetadata::from_xml(&bad_id),
            Err(MetadataError::InvalidId(_))
        ));
        let markup = format!("<m:machine xmlns:m='{ns}'><m:id><x/></m:id></m:machine>");
        assert!(matches!(
            MachineMetadata::from_xml(&markup),
            Err(MetadataError::UnexpectedMarkup("id"))
        ));
        assert!(matches!(
            MachineMetadata::from_xml("<domain><name>x</name></domain>"),
            Err(MetadataError::Missing("id"))
        ));
        assert!(matches!(
            MachineMetadata::from_xml("<domain><name>x</domain>"),
            Err(MetadataError::Xml(_))
        ));
    }

    // ---- property test ----

    /// Strings built to break naive XML generation: markup characters, CDATA and comment
    /// terminators, entity look-alikes, quotes, unicode, controls, arbitrary `String`s.
    fn hostile_text() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            5 => "[a-z0-9][a-z0-9.-]{0,12}",
            5 => "[<>&'\"\\[\\]!?=,:; a-zA-Z\u{e9}\u{1F600}\u{202E}-]{1,16}",
            3 => prop::sample::select(vec![
                "]]>", "--", "<!--", "-->", "&amp;", "&#0;", "&#xD;", "<![CDATA[", "\"'", " ",
                "/", "\u{2028}", "\u{FEFF}", "\u{10FFFF}",
            ])
            .prop_map(String::from),
            1 => prop::sample::select(vec![
                "\n", "\r", "\r\n", "\0", "\t", "\u{FFFE}", "\u{85}", "\u{7f}", "\u{1b}",
            ])
            .prop_map(String::from),
            1 => any::<String>(),
        ];
        prop_oneof![
            1 => Just(String::new()),
            20 => prop::collection::vec(piece, 1..4).prop_map(|v| v.concat()),
        ]
    }

    /// A caller string: often plain, often hostile, so that enough specs pass validation for
    /// the round-trip half of the property to be exercised.
    fn any_text() -> impl Strategy<Value = String> {
        prop_oneof![
            2 => "[a-z0-9][a-z0-9.-]{0,12}",
            3 => hostile_text(),
        ]
    }

    fn any_path() -> impl Strategy<Value = PathBuf> {
        prop_oneof![
            8 => any_text().prop_map(|s| PathBuf::from(format!("/var/lib/skygate/{s}"))),
            1 => any_text().prop_map(PathBuf::from),
            1 => prop::collection::vec(any::<u8>(), 0..12).prop_map(|bytes| {
                let mut raw = b"/x/".to_vec();
                raw.extend(bytes);
                PathBuf::from(OsString::from_vec(raw))
            }),
        ]
    }

    fn any_forward() -> impl Strategy<Value = PortForward> {
        (
            prop_oneof![Just(LOOPBACK), any::<u32>().prop_map(Ipv4Addr::from)],
            any::<u16>(),
            any::<u16>(),
        )
            .prop_map(|(host_ip, host_port, guest_port)| PortForward {
                host_ip,
                host_port,
                guest_port,
            })
    }

    fn any_spec() -> impl Strategy<Value = DomainSpec> {
        let boot = prop_oneof![
            Just(BootSource::Disk),
            (any_path(), proptest::option::of(any_path()), any_text()).prop_map(
                |(kernel, initrd, cmdline)| BootSource::Kernel {
                    kernel,
                    initrd,
                    cmdline,
                }
            ),
        ];
        let network = prop_oneof![
            prop::collection::vec(any_forward(), 0..4)
                .prop_map(|forwards| NetworkAttachment::User { forwards }),
            any_text().prop_map(|name| NetworkAttachment::LibvirtNetwork { name }),
            prop_oneof!["[a-z0-9]{1,15}", any_text()]
                .prop_map(|name| NetworkAttachment::Bridge { name }),
        ];
        let name = prop_oneof![any_text().prop_map(|s| format!("skygate-{s}")), any_text(),];
        (
            (name, any::<u128>(), any_text(), any::<u64>(), any::<bool>()),
            (
                prop_oneof![1 => Just(0u32), 30 => 1u32..64],
                prop_oneof![
                    1 => Just(0u64),
                    30 => 1u64..65536,
                    1 => Just(MAX_MEMORY_MIB + 1),
                ],
            ),
            boot,
            (any_path(), proptest::option::of(any_path()), any_path()),
            network,
        )
            .prop_map(
                |(
                    (name, uuid, hostname, generation, kvm),
                    (vcpus, memory_mib),
                    boot,
                    (disk, seed, console_log),
                    network,
                )| DomainSpec {
                    name,
                    uuid: Uuid::from_u128(uuid),
                    hostname,
                    generation,
                    hypervisor: if kvm {
                        HypervisorKind::Kvm
                    } else {
                        HypervisorKind::Qemu
                    },
                    vcpus,
                    memory_mib,
                    boot,
                    disk,
                    seed,
                    console_log,
                    network,
                },
            )
    }

    /// The same shape (variants, options) as `spec`, with plain strings: its XML is the
    /// reference element structure.
    fn benign_twin(spec: &DomainSpec) -> DomainSpec {
        DomainSpec {
            name: "skygate-benign".into(),
            uuid: MACHINE_ID,
            hostname: "benign".into(),
            generation: 1,
            hypervisor: spec.hypervisor,
            vcpus: 1,
            memory_mib: 256,
            boot: match &spec.boot {
                BootSource::Disk => BootSource::Disk,
                BootSource::Kernel { initrd, .. } => BootSource::Kernel {
                    kernel: "/k".into(),
                    initrd: initrd.as_ref().map(|_| "/i".into()),
                    cmdline: "console=ttyS0".into(),
                },
            },
            disk: "/d.qcow2".into(),
            seed: spec.seed.as_ref().map(|_| "/s.iso".into()),
            console_log: "/c.log".into(),
            network: match &spec.network {
                NetworkAttachment::User { forwards } => NetworkAttachment::User {
                    forwards: (1..)
                        .zip(forwards)
                        .map(|(port, _)| PortForward {
                            host_ip: LOOPBACK,
                            host_port: port,
                            guest_port: port,
                        })
                        .collect(),
                },
                NetworkAttachment::LibvirtNetwork { .. } => {
                    NetworkAttachment::LibvirtNetwork { name: "n".into() }
                }
                NetworkAttachment::Bridge { .. } => NetworkAttachment::Bridge { name: "b".into() },
            },
        }
    }

    fn check_round_trip(spec: &DomainSpec, doc: &str) -> Result<(), TestCaseError> {
        let twin = benign_twin(spec)
            .to_xml()
            .map_err(|e| TestCaseError::fail(format!("benign twin failed: {e}")))?;
        let parsed = structure(doc).map_err(|e| TestCaseError::fail(format!("{e}\n{doc}")))?;
        prop_assert_eq!(parsed, structure(&twin).unwrap());
        prop_assert_eq!(texts(doc, "title"), vec![spec.hostname.clone()]);
        prop_assert_eq!(texts(doc, "name"), vec![spec.name.clone()]);
        let meta = MachineMetadata::from_xml(doc)
            .map_err(|e| TestCaseError::fail(format!("metadata: {e}")))?;
        prop_assert_eq!(
            meta,
            MachineMetadata {
                id: spec.uuid,
                generation: spec.generation,
                hostname: spec.hostname.clone(),
            }
        );
        let path = |p: &PathBuf| p.to_str().unwrap_or_default().to_owned();
        let mut sources = vec![path(&spec.disk)];
        sources.extend(spec.seed.as_ref().map(path));
        match &spec.network {
            NetworkAttachment::User { .. } => {}
            NetworkAttachment::LibvirtNetwork { name } => {
                prop_assert_eq!(attrs(doc, "source", "network"), vec![name.clone()]);
            }
            NetworkAttachment::Bridge { name } => {
                prop_assert_eq!(attrs(doc, "source", "bridge"), vec![name.clone()]);
            }
        }
        prop_assert_eq!(attrs(doc, "source", "file"), sources);
        prop_assert_eq!(attrs(doc, "log", "file"), vec![path(&spec.console_log)]);
        if let BootSource::Kernel {
            kernel,
            initrd,
            cmdline,
        } = &spec.boot
        {
            prop_assert_eq!(texts(doc, "kernel"), vec![path(kernel)]);
            prop_assert_eq!(
                texts(doc, "initrd"),
                initrd.iter().map(path).collect::<Vec<_>>()
            );
            prop_assert_eq!(texts(doc, "cmdline"), vec![cmdline.clone()]);
        }
        Ok(())
    }

    #[test]
    fn arbitrary_strings_never_break_the_xml() {
        let ok = AtomicUsize::new(0);
        let rejected = AtomicUsize::new(0);
        let mut runner = TestRunner::new(Config {
            cases: 256,
            // A manual runner has no source file to persist regressions next to.
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&any_spec(), |spec| match spec.to_xml() {
                Ok(doc) => {
                    ok.fetch_add(1, Ordering::Relaxed);
                    check_round_trip(&spec, &doc)
                }
                // A typed error is an acceptable outcome; a panic would fail the case.
                Err(_) => {
                    rejected.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            })
            .unwrap();
        let (ok, rejected) = (ok.into_inner(), rejected.into_inner());
        println!("property: {ok} rendered, {rejected} rejected");
        // Guard against a vacuous property: both outcomes must actually occur.
        assert!(ok >= 25, "only {ok} of 256 specs rendered");
        assert!(rejected >= 25, "only {rejected} of 256 specs rejected");
    }

    // ---- schema validation against libvirt's own RelaxNG ----

    #[test]
    #[ignore = "needs virt-xml-validate (scripts/install-host-deps.sh)"]
    fn libvirt_schema_accepts_generated_xml() {
        let dir = std::env::temp_dir().join(format!("skygate-domain-xml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, spec) in [
            ("tcg_kernel_user_seed", tcg_kernel_user_seed()),
            ("kvm_disk_bridge", kvm_disk_bridge()),
            ("kvm_disk_libvirt_network", kvm_disk_libvirt_network()),
        ] {
            let file = dir.join(format!("{name}.xml"));
            std::fs::write(&file, xml(&spec)).unwrap();
            let out = match std::process::Command::new("virt-xml-validate")
                .arg(&file)
                .arg("domain")
                .output()
            {
                Ok(out) => out,
                Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
                    "virt-xml-validate not found: run scripts/install-host-deps.sh \
                     (package libvirt-clients)"
                ),
                Err(e) => panic!("running virt-xml-validate: {e}"),
            };
            let stderr = String::from_utf8_lossy(&out.stderr);
            // virt-xml-validate is a shell script around xmllint (package libxml2-utils).
            assert!(
                !stderr.contains("xmllint: not found"),
                "xmllint not found: install libxml2-utils (scripts/install-host-deps.sh)"
            );
            assert!(
                out.status.success(),
                "{name}: {}{stderr}",
                String::from_utf8_lossy(&out.stdout),
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
