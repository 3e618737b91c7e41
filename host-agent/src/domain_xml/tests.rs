//! Tests of the domain XML builder: snapshots, structure under hostile strings, details.

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
        fingerprint: None,
        disk_gib: 1,
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
            disk_gib: Some(1),
            fingerprint: None,
        }
    );
}

#[test]
fn the_spec_fingerprint_round_trips_and_a_bad_one_is_refused() {
    let fingerprint = SpecFingerprint::from_bytes([0xab; 32]);
    let spec = DomainSpec {
        fingerprint: Some(fingerprint),
        ..tcg_kernel_user_seed()
    };
    let doc = xml(&spec);
    assert_eq!(
        texts(&doc, "skygate:spec-sha256"),
        vec!["ab".repeat(32)],
        "{doc}"
    );
    assert_eq!(
        MachineMetadata::from_xml(&doc).unwrap().fingerprint,
        Some(fingerprint)
    );
    let ns = METADATA_NAMESPACE;
    let bad = format!(
        "<m:machine xmlns:m='{ns}'><m:id>{MACHINE_ID}</m:id><m:generation>1</m:generation>\
         <m:spec-sha256>AB</m:spec-sha256><m:hostname>h</m:hostname></m:machine>"
    );
    assert!(matches!(
        MachineMetadata::from_xml(&bad),
        Err(MetadataError::InvalidFingerprint(_))
    ));
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
            disk_gib: None,
            fingerprint: None,
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
            disk_gib: None,
            fingerprint: None,
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
                // Recorded or not, whatever its bytes: it is hex when written.
                fingerprint: (generation % 2 == 0)
                    .then(|| SpecFingerprint::from_bytes([generation as u8; 32])),
                disk_gib: generation % 1000,
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
            disk_gib: Some(spec.disk_gib),
            fingerprint: spec.fingerprint,
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
        cases: 10_000,
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
    assert!(ok >= 1000, "only {ok} of 10000 specs rendered");
    assert!(rejected >= 1000, "only {rejected} of 10000 specs rejected");
}

// ---- schema validation against libvirt's own RelaxNG ----

/// Needs virt-xml-validate and xmllint, which scripts/install-host-deps.sh installs (the test
/// command runs it first).
#[test]
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

#[test]
fn user_forwards_read_back_from_the_xml_they_were_written_to() {
    let spec = tcg_kernel_user_seed();
    let NetworkAttachment::User { forwards } = &spec.network else {
        unreachable!("fixture uses user networking")
    };
    let xml = spec.to_xml().unwrap();
    assert_eq!(&read_user_forwards(&xml).unwrap(), forwards);
    // Bridged domains have none.
    assert_eq!(
        read_user_forwards(&kvm_disk_bridge().to_xml().unwrap()).unwrap(),
        vec![]
    );
}

#[test]
fn user_forwards_ignore_unrelated_arguments_and_refuse_garbage() {
    let doc = |arg: &str| {
        format!(
            "<domain xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'><q:commandline>\
             <q:arg value='-netdev'/><q:arg value='{arg}'/></q:commandline></domain>"
        )
    };
    assert_eq!(
        read_user_forwards(&doc("user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22")).unwrap(),
        vec![PortForward {
            host_ip: LOOPBACK,
            host_port: 2222,
            guest_port: 22
        }]
    );
    assert_eq!(read_user_forwards(&doc("tap,id=net0")).unwrap(), vec![]);
    assert!(read_user_forwards(&doc("user,id=net0,hostfwd=tcp:nowhere:1-:22")).is_err());
    // Unqualified `arg` elements are not QEMU's.
    assert_eq!(
        read_user_forwards(
            "<domain><arg value='user,id=net0,hostfwd=tcp:127.0.0.1:1-:2'/></domain>"
        )
        .unwrap(),
        vec![]
    );
}
