//! Response bodies of the public API (defined in `skygate-api-types`, shared with the client),
//! built from what `app` returns (domain types from
//! `model`, and `app`'s own for accounts and hosts); store records never reach the API.

use crate::app::hosts::Host;
use crate::app::sessions::Account;
use crate::app::users::QuotaReport;
use crate::model::{Image, KernelBoot, Machine, MachineEvent, MachineNetwork, SavedSshKey};

pub use skygate_api_types::{
    AuditEventPage, AuditEventView, BootParams, CapacityView, CreatedTokenView, EvacuationView,
    EventPage, EventView, HostList, HostView, ImageList, ImageView, MachinePage, MachineView,
    NetworkView, PortView, ProfileView, QuotaParams, QuotaView, SshKeyList, SshKeyView, TokenList,
    TokenPairView, TokenView, UsageView, UserList, UserView,
};

impl From<Account> for UserView {
    fn from(u: Account) -> Self {
        Self {
            id: u.id.to_string(),
            username: u.username,
            email: u.email,
            role: u.role.as_str().to_owned(),
            disabled_at: u.disabled_at,
            created_at: u.created_at,
        }
    }
}

impl From<QuotaReport> for QuotaView {
    fn from(q: QuotaReport) -> Self {
        Self {
            max_machines: q.limits.max_machines,
            max_vcpus: q.limits.max_vcpus,
            max_memory_mib: q.limits.max_memory_mib,
            overrides: QuotaParams {
                max_machines: q.overrides.max_machines,
                max_vcpus: q.overrides.max_vcpus,
                max_memory_mib: q.overrides.max_memory_mib,
            },
            usage: UsageView {
                machines: q.usage.machines,
                vcpus: q.usage.vcpus,
                memory_mib: q.usage.memory_mib,
            },
        }
    }
}

impl From<MachineNetwork> for NetworkView {
    fn from(n: MachineNetwork) -> Self {
        Self {
            addresses: n.addresses,
            ports: n
                .ports
                .into_iter()
                .map(|p| PortView {
                    guest: p.guest,
                    host_ip: p.host_ip,
                    host_port: p.host_port,
                    proto: p.proto,
                })
                .collect(),
        }
    }
}

impl From<Machine> for MachineView {
    fn from(m: Machine) -> Self {
        Self {
            id: m.id.to_string(),
            owner_id: m.owner_id.to_string(),
            hostname: m.hostname,
            status: m.status,
            desired_state: m.desired,
            image: m.image_name,
            vcpus: m.vcpus,
            memory_mib: m.memory_mib,
            disk_gib: m.disk_gib,
            host: m.host_name,
            host_state: m.host_state,
            network: m.network.map(NetworkView::from).unwrap_or_default(),
            failure_reason: m.failure_reason,
            restart_policy: m.restart_policy,
            labels: m.labels,
            created_at: m.created_at,
            updated_at: m.updated_at,
        }
    }
}

impl From<MachineEvent> for EventView {
    fn from(e: MachineEvent) -> Self {
        Self {
            action: e.action,
            status: e.status,
            message: e.message,
            created_at: e.created_at,
        }
    }
}

/// The image as `admin` or a tenant may see it.
pub fn image_view(i: Image, admin: bool) -> ImageView {
    ImageView {
        id: i.id.to_string(),
        name: i.name,
        direct_kernel_boot: i.boot.is_some(),
        source: admin.then_some(i.source),
        format: i.format,
        sha256: i.sha256,
        boot: if admin { i.boot.map(boot_view) } else { None },
        deprecated_at: i.deprecated_at,
        created_at: i.created_at,
    }
}

impl From<SavedSshKey> for SshKeyView {
    fn from(k: SavedSshKey) -> Self {
        Self {
            id: k.id.to_string(),
            name: k.name,
            public_key: k.public_key,
            fingerprint: k.fingerprint,
            created_at: k.created_at,
        }
    }
}

impl From<crate::model::scheduler::Resources> for CapacityView {
    fn from(r: crate::model::scheduler::Resources) -> Self {
        Self {
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            disk_gib: r.disk_gib,
        }
    }
}

impl From<Host> for HostView {
    fn from(h: Host) -> Self {
        Self {
            id: h.id,
            name: h.name,
            address: h.address,
            state: h.state,
            cordoned: h.cordoned,
            problems: h.problems,
            hypervisor: h.hypervisor,
            capacity: h.capacity.into(),
            allocated: h.allocated.into(),
            machines: h.machines,
            agent_version: h.agent_version,
            last_heartbeat_at: h.last_heartbeat_at,
            created_at: h.created_at,
            evacuation: h.evacuation.map(|e| EvacuationView {
                requested_at: e.requested_at,
                machines_left: e.machines_left,
                moving: e.moving,
            }),
        }
    }
}

/// An image's boot details as administrators see them.
fn boot_view(b: KernelBoot) -> BootParams {
    BootParams {
        kernel: b.kernel,
        initrd: b.initrd,
        cmdline: b.cmdline,
        kernel_sha256: b.kernel_sha256,
        initrd_sha256: b.initrd_sha256,
    }
}
