//! The agent's wire messages turned into domain types (`model::MachineOnHost` and friends).
//! Pure; the only place besides `spec` that reads `proto::agent::v1` messages.

use crate::model::scheduler::Resources;
use crate::model::PortForward;
use crate::model::{MachineChange, MachineId, MachineNetwork, MachineOnHost, PhaseOnHost};
use proto::agent::v1 as pb;

/// What an agent says about its host (GetHostInfo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    pub name: String,
    /// `kvm` or `qemu` (empty when the agent did not say).
    pub hypervisor: &'static str,
    /// What the host offers, after overcommit.
    pub capacity: Resources,
    /// What the machines on it are sized for.
    pub allocated: Resources,
    pub agent_version: String,
    pub machine_count: u32,
}

pub fn phase(wire: i32) -> PhaseOnHost {
    match pb::MachinePhase::try_from(wire) {
        Ok(pb::MachinePhase::Absent) => PhaseOnHost::Absent,
        Ok(pb::MachinePhase::Stopped) => PhaseOnHost::Stopped,
        Ok(pb::MachinePhase::Running) => PhaseOnHost::Running,
        Ok(pb::MachinePhase::Paused) => PhaseOnHost::Paused,
        Ok(pb::MachinePhase::ShuttingDown) => PhaseOnHost::ShuttingDown,
        Ok(pb::MachinePhase::Crashed) => PhaseOnHost::Crashed,
        Ok(pb::MachinePhase::Unspecified) | Err(_) => PhaseOnHost::Unknown,
    }
}

/// The machine's network as its agent reports it.
pub fn network(wire: Option<pb::MachineNetwork>) -> MachineNetwork {
    let net = wire.unwrap_or_default();
    MachineNetwork {
        addresses: net.addresses,
        ports: net
            .ports
            .into_iter()
            .map(|p| PortForward {
                guest: u16::try_from(p.guest_port).unwrap_or_default(),
                host_ip: p.host_ip,
                host_port: u16::try_from(p.host_port).unwrap_or_default(),
                proto: p.proto,
            })
            .collect(),
    }
}

/// One machine's state; `None` when the agent names something that is not a machine id.
pub fn machine_on_host(wire: pb::MachineState) -> Option<MachineOnHost> {
    Some(MachineOnHost {
        id: wire.machine_id.parse::<MachineId>().ok()?,
        generation: wire.generation,
        phase: phase(wire.phase),
        network: network(wire.network),
        message: wire.message,
    })
}

pub fn machine_change(wire: &pb::MachineEvent) -> MachineChange {
    MachineChange {
        sequence: wire.sequence,
        machine: wire.machine_id.parse().ok(),
    }
}

fn resources(wire: Option<pb::Capacity>) -> Resources {
    let c = wire.unwrap_or_default();
    Resources {
        vcpus: i64::from(c.vcpus),
        memory_mib: i64::try_from(c.memory_mib).unwrap_or(i64::MAX),
        disk_gib: i64::try_from(c.disk_gib).unwrap_or(i64::MAX),
    }
}

pub fn host_info(wire: pb::HostInfo) -> HostInfo {
    HostInfo {
        hypervisor: match pb::HypervisorKind::try_from(wire.hypervisor) {
            Ok(pb::HypervisorKind::Kvm) => "kvm",
            Ok(pb::HypervisorKind::Qemu) => "qemu",
            _ => "",
        },
        name: wire.name,
        capacity: resources(wire.capacity),
        allocated: resources(wire.allocated),
        agent_version: wire.agent_version,
        machine_count: wire.machine_count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_becomes_a_machine_on_host_and_foreign_names_are_dropped() {
        let id = MachineId::new();
        let state = pb::MachineState {
            machine_id: id.to_string(),
            generation: 4,
            phase: pb::MachinePhase::Crashed as i32,
            domain_name: "skygate-x".into(),
            network: Some(pb::MachineNetwork {
                addresses: vec!["10.0.0.2".into()],
                ports: vec![pb::PortForward {
                    guest_port: 22,
                    host_ip: "127.0.0.1".into(),
                    host_port: 70000,
                    proto: "tcp".into(),
                }],
            }),
            message: "qemu died".into(),
        };
        let m = machine_on_host(state.clone()).unwrap();
        assert_eq!(
            (m.id, m.generation, m.phase, m.message.as_str()),
            (id, 4, PhaseOnHost::Crashed, "qemu died")
        );
        assert_eq!(m.network.addresses, ["10.0.0.2"]);
        // A port that does not fit is shown as 0, not wrapped around.
        assert_eq!(
            (m.network.ports[0].guest, m.network.ports[0].host_port),
            (22, 0)
        );
        let foreign = pb::MachineState {
            machine_id: "not-a-uuid".into(),
            ..state
        };
        assert!(machine_on_host(foreign).is_none());
    }

    #[test]
    fn every_wire_phase_has_a_phase_on_host() {
        assert_eq!(phase(pb::MachinePhase::Absent as i32), PhaseOnHost::Absent);
        assert_eq!(
            phase(pb::MachinePhase::ShuttingDown as i32),
            PhaseOnHost::ShuttingDown
        );
        assert_eq!(phase(0), PhaseOnHost::Unknown);
        assert_eq!(phase(99), PhaseOnHost::Unknown);
    }
}
