//! SkyGate host agent library: the pieces of the agent that are pure logic and tested without
//! a hypervisor. The `skygate-host-agent` binary (main.rs) wires them to libvirt and gRPC.

pub mod domain_xml;
