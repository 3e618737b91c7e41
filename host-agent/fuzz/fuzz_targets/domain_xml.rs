//! Fuzz target: any [`DomainSpec`] either renders to domain XML that a strict, independent XML
//! parser (roxmltree) reads back to the spec's values, or is refused with a validation error.
//! Never a panic, never `DomainXmlError::Write`.
//!
//! The property is that of `arbitrary_strings_never_break_the_xml` in
//! host-agent/src/domain_xml/tests.rs, with libFuzzer choosing the inputs instead of proptest:
//! the element skeleton equals that of a benign spec of the same shape, and every caller value
//! (name, uuid, hostname, memory, vcpus, paths, kernel command line, network, port forwards,
//! metadata) reads back unchanged. The spec is built in the target from `arbitrary` primitives,
//! so production types carry no fuzzing derives.

#![no_main]

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use arbitrary::Arbitrary;
use host_agent_fuzz::domain_xml::{
    read_user_forwards, BootSource, DomainSpec, DomainXmlError, HypervisorKind, MachineMetadata,
    NetworkAttachment, METADATA_NAMESPACE,
};
use host_agent_fuzz::model::{PortForward, SpecFingerprint, MAX_MEMORY_MIB};
use libfuzzer_sys::fuzz_target;
use roxmltree::{Document, Node};
use uuid::Uuid;

const QEMU_NAMESPACE: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// A path: mostly absolute UTF-8 (so that specs get past validation), sometimes any text or
/// raw bytes (non-UTF-8, relative).
#[derive(Debug, Arbitrary)]
enum FuzzPath {
    Absolute(String),
    Text(String),
    Bytes(Vec<u8>),
}

impl FuzzPath {
    fn into_path(self) -> PathBuf {
        match self {
            FuzzPath::Absolute(s) => PathBuf::from(format!("/{s}")),
            FuzzPath::Text(s) => PathBuf::from(s),
            FuzzPath::Bytes(b) => PathBuf::from(OsString::from_vec(b)),
        }
    }
}

/// Memory: small values (the usual case, 0 included), values around the maximum, or any u64.
#[derive(Debug, Arbitrary)]
enum Memory {
    Small(u16),
    NearMax(u8),
    Any(u64),
}

#[derive(Debug, Arbitrary)]
enum Boot {
    Disk,
    Kernel {
        kernel: FuzzPath,
        initrd: Option<FuzzPath>,
        cmdline: String,
    },
}

#[derive(Debug, Arbitrary)]
enum Network {
    /// (loopback, address, host port, guest port): `loopback` puts 127.0.0.1 in place of the
    /// address, so that forwards on the same endpoint (refused) are common.
    User(Vec<(bool, u32, u16, u16)>),
    LibvirtNetwork(String),
    Bridge(String),
}

#[derive(Debug, Arbitrary)]
struct Input {
    name: String,
    uuid: u128,
    hostname: String,
    generation: u64,
    fingerprint: Option<[u8; 32]>,
    disk_gib: u64,
    kvm: bool,
    vcpus: u32,
    memory: Memory,
    boot: Boot,
    disk: FuzzPath,
    seed: Option<FuzzPath>,
    console_log: FuzzPath,
    network: Network,
}

impl Input {
    fn into_spec(self) -> DomainSpec {
        DomainSpec {
            name: self.name,
            uuid: Uuid::from_u128(self.uuid),
            hostname: self.hostname,
            generation: self.generation,
            fingerprint: self.fingerprint.map(SpecFingerprint::from_bytes),
            disk_gib: self.disk_gib,
            hypervisor: if self.kvm {
                HypervisorKind::Kvm
            } else {
                HypervisorKind::Qemu
            },
            vcpus: self.vcpus,
            memory_mib: match self.memory {
                Memory::Small(m) => u64::from(m),
                Memory::NearMax(d) => (MAX_MEMORY_MIB + 2).saturating_sub(u64::from(d % 4)),
                Memory::Any(m) => m,
            },
            boot: match self.boot {
                Boot::Disk => BootSource::Disk,
                Boot::Kernel {
                    kernel,
                    initrd,
                    cmdline,
                } => BootSource::Kernel {
                    kernel: kernel.into_path(),
                    initrd: initrd.map(FuzzPath::into_path),
                    cmdline,
                },
            },
            disk: self.disk.into_path(),
            seed: self.seed.map(FuzzPath::into_path),
            console_log: self.console_log.into_path(),
            network: match self.network {
                Network::User(forwards) => NetworkAttachment::User {
                    forwards: forwards
                        .into_iter()
                        .map(|(loopback, ip, host_port, guest_port)| PortForward {
                            host_ip: if loopback {
                                Ipv4Addr::LOCALHOST
                            } else {
                                Ipv4Addr::from(ip)
                            },
                            host_port,
                            guest_port,
                        })
                        .collect(),
                },
                Network::LibvirtNetwork(name) => NetworkAttachment::LibvirtNetwork { name },
                Network::Bridge(name) => NetworkAttachment::Bridge { name },
            },
        }
    }
}

fuzz_target!(|input: Input| {
    let spec = input.into_spec();
    match spec.to_xml() {
        Ok(doc) => check_round_trip(&spec, &doc),
        // Rendering into memory has no I/O that could fail: this variant is a bug.
        Err(DomainXmlError::Write(e)) => panic!("to_xml failed writing: {e}"),
        // A typed refusal of an unusable spec is a correct outcome.
        Err(_) => {}
    }
});

/// The same shape (variants, options, number of forwards) as `spec`, with plain values: its
/// XML is the reference element skeleton.
fn benign_twin(spec: &DomainSpec) -> DomainSpec {
    DomainSpec {
        name: "skygate-benign".into(),
        uuid: Uuid::nil(),
        hostname: "benign".into(),
        generation: 1,
        fingerprint: spec.fingerprint,
        disk_gib: 1,
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
                        host_ip: Ipv4Addr::LOCALHOST,
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

/// (depth, namespace, local name) of every element, in document order.
fn skeleton(doc: &Document<'_>) -> Vec<(usize, Option<String>, String)> {
    fn walk(node: Node<'_, '_>, depth: usize, out: &mut Vec<(usize, Option<String>, String)>) {
        for child in node.children().filter(Node::is_element) {
            let name = child.tag_name();
            out.push((
                depth,
                name.namespace().map(str::to_owned),
                name.name().to_owned(),
            ));
            walk(child, depth + 1, out);
        }
    }
    let mut out = Vec::new();
    walk(doc.root(), 0, &mut out);
    out
}

/// Elements without a namespace whose local name is `name`.
fn elements<'a, 'i>(doc: &'a Document<'i>, name: &str) -> Vec<Node<'a, 'i>> {
    doc.descendants()
        .filter(|n| n.is_element() && n.tag_name().namespace().is_none())
        .filter(|n| n.tag_name().name() == name)
        .collect()
}

/// The text content of every un-namespaced `name` element (entities and CDATA resolved).
fn texts(doc: &Document<'_>, name: &str) -> Vec<String> {
    elements(doc, name)
        .into_iter()
        .map(|n| {
            n.children()
                .filter(Node::is_text)
                .filter_map(|t| t.text())
                .collect()
        })
        .collect()
}

/// The value of attribute `attr` on every un-namespaced `name` element that has it.
fn attrs(doc: &Document<'_>, name: &str, attr: &str) -> Vec<String> {
    elements(doc, name)
        .into_iter()
        .filter_map(|n| n.attribute(attr).map(str::to_owned))
        .collect()
}

fn path_str(p: &Path) -> String {
    // Rendered paths passed validation, which refuses non-UTF-8 ones.
    p.to_str().map(str::to_owned).unwrap_or_else(|| {
        panic!("non-UTF-8 path {p:?} rendered");
    })
}

fn check_round_trip(spec: &DomainSpec, xml: &str) {
    // Deterministic: the agent compares the XML it would write with what it defined.
    assert_eq!(
        spec.to_xml().ok().as_deref(),
        Some(xml),
        "to_xml is not deterministic"
    );

    let doc = Document::parse(xml).unwrap_or_else(|e| panic!("not well-formed XML: {e}\n{xml}"));
    let twin_xml = benign_twin(spec)
        .to_xml()
        .unwrap_or_else(|e| panic!("benign twin refused: {e}"));
    let twin = Document::parse(&twin_xml).unwrap_or_else(|e| panic!("twin XML: {e}"));
    assert_eq!(
        skeleton(&doc),
        skeleton(&twin),
        "element structure changed\n{xml}"
    );

    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "domain");
    assert_eq!(root.attribute("type"), Some(spec.hypervisor.as_str()));
    assert_eq!(texts(&doc, "name"), [spec.name.clone()]);
    assert_eq!(texts(&doc, "uuid"), [spec.uuid.hyphenated().to_string()]);
    assert_eq!(texts(&doc, "title"), [spec.hostname.clone()]);
    assert_eq!(texts(&doc, "memory"), [spec.memory_mib.to_string()]);
    assert_eq!(attrs(&doc, "memory", "unit"), ["MiB"]);
    assert_eq!(texts(&doc, "vcpu"), [spec.vcpus.to_string()]);

    // Disks: the overlay, then the seed if any; the console log.
    let mut sources = vec![path_str(&spec.disk)];
    sources.extend(spec.seed.as_deref().map(path_str));
    assert_eq!(attrs(&doc, "source", "file"), sources);
    assert_eq!(attrs(&doc, "log", "file"), [path_str(&spec.console_log)]);

    match &spec.boot {
        BootSource::Disk => {
            assert_eq!(attrs(&doc, "boot", "dev"), ["hd"]);
            assert!(texts(&doc, "kernel").is_empty());
        }
        BootSource::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            assert_eq!(texts(&doc, "kernel"), [path_str(kernel)]);
            assert_eq!(
                texts(&doc, "initrd"),
                initrd
                    .as_deref()
                    .map(path_str)
                    .into_iter()
                    .collect::<Vec<_>>()
            );
            assert_eq!(texts(&doc, "cmdline"), [cmdline.clone()]);
        }
    }

    // The agent's own readers get back what was written.
    let meta = MachineMetadata::from_xml(xml).unwrap_or_else(|e| panic!("metadata: {e}"));
    assert_eq!(
        meta,
        MachineMetadata {
            id: spec.uuid,
            generation: spec.generation,
            hostname: spec.hostname.clone(),
            disk_gib: Some(spec.disk_gib),
            fingerprint: spec.fingerprint,
        }
    );
    let machine = doc
        .descendants()
        .find(|n| n.tag_name().namespace() == Some(METADATA_NAMESPACE))
        .unwrap_or_else(|| panic!("no skygate metadata element\n{xml}"));
    assert_eq!(machine.tag_name().name(), "machine");

    let forwards = read_user_forwards(xml).unwrap_or_else(|e| panic!("forwards: {e}"));
    let qemu_args: Vec<String> = doc
        .descendants()
        .filter(|n| n.tag_name().namespace() == Some(QEMU_NAMESPACE))
        .filter(|n| n.tag_name().name() == "arg")
        .filter_map(|n| n.attribute("value").map(str::to_owned))
        .collect();
    match &spec.network {
        NetworkAttachment::User { forwards: want } => {
            assert_eq!(&forwards, want);
            assert_eq!(qemu_args.len(), 4);
            assert!(attrs(&doc, "interface", "type").is_empty());
        }
        NetworkAttachment::LibvirtNetwork { name } => {
            assert!(forwards.is_empty() && qemu_args.is_empty());
            assert_eq!(attrs(&doc, "interface", "type"), ["network"]);
            assert_eq!(attrs(&doc, "source", "network"), [name.clone()]);
        }
        NetworkAttachment::Bridge { name } => {
            assert!(forwards.is_empty() && qemu_args.is_empty());
            assert_eq!(attrs(&doc, "interface", "type"), ["bridge"]);
            assert_eq!(attrs(&doc, "source", "bridge"), [name.clone()]);
        }
    }
}
