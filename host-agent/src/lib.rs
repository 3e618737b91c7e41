//! SkyGate host agent library: the pieces of the agent that are pure logic and tested without
//! a hypervisor. The `skygate-host-agent` binary (main.rs) wires them to libvirt and gRPC.

pub mod disks;
pub mod domain_xml;
pub mod images;
pub mod paths;
pub mod seed;
