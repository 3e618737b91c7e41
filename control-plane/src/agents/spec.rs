//! The agent's `MachineSpec` for a machine, from what the control plane stores. Pure.
//! The wire message stays inside `agents`: callers hold an [`AgentSpec`] and hand it to
//! `AgentClient::ensure`.

use crate::model::{DesiredState, KernelBoot};
use crate::store::machines::{TaskImage, TaskMachine};
use proto::agent::v1 as pb;

/// Why a machine cannot be turned into a spec (the machine fails with this reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("image {image}: {reason}")]
pub struct SpecProblem {
    pub image: String,
    pub reason: String,
}

fn image_source(image: &TaskImage) -> Result<pb::ImageSource, SpecProblem> {
    let problem = |reason: &str| SpecProblem {
        image: image.name.clone(),
        reason: reason.into(),
    };
    let boot = image.boot.clone();
    let text = |field: fn(&KernelBoot) -> Option<&String>| {
        boot.as_ref().and_then(field).cloned().unwrap_or_default()
    };
    match image.format.as_str() {
        "kernel" => {
            let kernel_sha256 = text(|b| b.kernel_sha256.as_ref());
            if kernel_sha256.is_empty() {
                return Err(problem(
                    "boot.kernel_sha256 is required to verify the kernel",
                ));
            }
            let initrd_url = text(|b| b.initrd.as_ref());
            let initrd_sha256 = text(|b| b.initrd_sha256.as_ref());
            if !initrd_url.is_empty() && initrd_sha256.is_empty() {
                return Err(problem(
                    "boot.initrd_sha256 is required to verify the initrd",
                ));
            }
            Ok(pb::ImageSource {
                name: image.name.clone(),
                url: String::new(),
                format: pb::DiskFormat::Kernel as i32,
                sha256: String::new(),
                kernel_boot: Some(pb::KernelBoot {
                    kernel_url: text(|b| Some(&b.kernel)),
                    kernel_sha256,
                    initrd_url,
                    initrd_sha256,
                    cmdline: text(|b| b.cmdline.as_ref()),
                }),
            })
        }
        "qcow2" | "raw" => {
            let sha256 = image
                .sha256
                .clone()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| problem("sha256 is required to verify the disk"))?;
            Ok(pb::ImageSource {
                name: image.name.clone(),
                url: image.source.clone(),
                format: if image.format == "qcow2" {
                    pb::DiskFormat::Qcow2
                } else {
                    pb::DiskFormat::Raw
                } as i32,
                sha256,
                kernel_boot: None,
            })
        }
        other => Err(problem(&format!("unknown format {other:?}"))),
    }
}

/// A machine's spec as its agent is sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSpec(pub(super) pb::MachineSpec);

impl AgentSpec {
    /// The same spec, for a host that must have the machine's disk already (a moved machine's
    /// target, or its source defining it again): the agent refuses rather than make a blank
    /// disk.
    pub fn with_existing_disk(mut self) -> Self {
        self.0.disk_must_exist = true;
        self
    }
}

/// The spec for `m`, with its power as the tenant wants it now. Its generation is the
/// machine's `spec_generation`, which moves only when what the agent builds changes: a
/// status change (another `version`) sends the same generation, and the agent only
/// converges power.
pub fn machine_spec(m: &TaskMachine) -> Result<AgentSpec, SpecProblem> {
    let u32_of = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
    let u64_of = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok(AgentSpec(pb::MachineSpec {
        machine_id: m.id.to_string(),
        generation: u64_of(m.spec_generation),
        hostname: m.hostname.clone(),
        vcpus: u32_of(m.size.vcpus),
        memory_mib: u64_of(m.size.memory_mib),
        disk_gib: u64_of(m.size.disk_gib),
        image: Some(image_source(&m.image)?),
        ssh_authorized_keys: m.ssh_keys.clone(),
        user_data: m.user_data.clone(),
        desired_power: match m.desired {
            DesiredState::Running => pb::PowerState::Running,
            DesiredState::Stopped | DesiredState::Deleted => pb::PowerState::Stopped,
        } as i32,
        disk_generation: u64_of(m.disk_generation),
        disk_must_exist: false,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::scheduler::Resources;
    use crate::model::{MachineId, MachineStatus};

    fn machine(image: TaskImage) -> TaskMachine {
        TaskMachine {
            id: MachineId::new(),
            status: MachineStatus::Provisioning,
            desired: DesiredState::Stopped,
            version: 7,
            spec_generation: 3,
            disk_generation: 0,
            status_changed_at: chrono::Utc::now(),
            hostname: "web-1".into(),
            size: Resources {
                vcpus: 2,
                memory_mib: 512,
                disk_gib: 4,
            },
            ssh_keys: vec!["ssh-ed25519 AAAA k".into()],
            user_data: Some("#cloud-config\n".into()),
            host: None,
            move_to: None,
            image,
        }
    }

    #[test]
    fn a_kernel_image_becomes_a_kernel_boot_spec() {
        let m = machine(TaskImage {
            name: "tiny".into(),
            source: "file:///i/".into(),
            format: "kernel".into(),
            sha256: None,
            boot: Some(KernelBoot {
                kernel: "file:///i/vmlinuz".into(),
                kernel_sha256: Some("a".repeat(64)),
                initrd: Some("file:///i/initrd.img".into()),
                initrd_sha256: Some("b".repeat(64)),
                cmdline: Some("console=ttyS0".into()),
            }),
        });
        let spec = machine_spec(&m).unwrap().0;
        assert_eq!(spec.generation, 3);
        assert_eq!(spec.desired_power, pb::PowerState::Stopped as i32);
        assert_eq!((spec.vcpus, spec.memory_mib, spec.disk_gib), (2, 512, 4));
        let image = spec.image.unwrap();
        assert_eq!(image.format, pb::DiskFormat::Kernel as i32);
        let k = image.kernel_boot.unwrap();
        assert_eq!(k.initrd_url, "file:///i/initrd.img");
        assert_eq!(k.cmdline, "console=ttyS0");
    }

    #[test]
    fn unverifiable_images_are_refused_with_a_reason() {
        let disk = TaskImage {
            name: "deb".into(),
            source: "https://example.invalid/d.qcow2".into(),
            format: "qcow2".into(),
            sha256: None,
            boot: None,
        };
        assert!(machine_spec(&machine(disk.clone()))
            .unwrap_err()
            .to_string()
            .contains("sha256 is required"));
        let ok = machine_spec(&machine(TaskImage {
            sha256: Some("c".repeat(64)),
            ..disk
        }))
        .unwrap()
        .0;
        assert_eq!(ok.image.unwrap().format, pb::DiskFormat::Qcow2 as i32);
        let kernel = TaskImage {
            name: "k".into(),
            source: "file:///k/".into(),
            format: "kernel".into(),
            sha256: None,
            boot: Some(KernelBoot {
                kernel: "file:///k/vmlinuz".into(),
                initrd: None,
                cmdline: None,
                kernel_sha256: None,
                initrd_sha256: None,
            }),
        };
        assert!(machine_spec(&machine(kernel)).is_err());
    }
}
