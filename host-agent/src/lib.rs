//! SkyGate host agent library. Pure logic (domain XML, seeds, specs, hypervisor choice) is
//! tested without a hypervisor; the I/O edges sit behind small traits (`DiskTool`,
//! `Hypervisor`). The `skygate-host-agent` binary (main.rs) wires them to libvirt and gRPC, or, in its
//! `simulate` mode, runs many hosts over fakes (simulate.rs).

pub mod config;
pub mod disks;
pub mod domain_xml;
pub mod events;
pub mod fake_tools;
pub mod hypervisor;
pub mod identity;
pub mod images;
pub mod machines;
pub mod model;
pub mod paths;
pub mod ports;
pub mod preflight;
pub mod probe;
pub mod registration;
pub mod report;
pub mod seed;
pub mod server;
pub mod service;
pub mod simulate;
pub mod status;
