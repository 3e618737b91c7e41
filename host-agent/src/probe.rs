//! Choosing the accelerator: `--hypervisor auto|kvm|qemu`. Auto picks KVM only when a
//! hardware KVM module (kvm_intel or kvm_amd) is loaded *and* libvirt offers kvm: on the
//! development machines libvirt offers kvm over a paravirtual `kvm_pvm` under which ordinary
//! guests hang (HOST-NOTES.md), so libvirt's word alone is not enough.

use std::path::Path;

use crate::domain_xml::HypervisorKind;

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HypervisorChoice {
    /// KVM when the host has hardware KVM, else QEMU (TCG).
    Auto,
    /// KVM, or refuse to start.
    Kvm,
    /// QEMU software emulation (TCG), even where KVM exists.
    Qemu,
}

/// What the host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceleratorProbe {
    /// `/sys/module/kvm_intel` or `/sys/module/kvm_amd` exists.
    pub hardware_kvm_module: bool,
    /// libvirt's domain capabilities accept virttype kvm.
    pub libvirt_offers_kvm: bool,
    /// libvirt's domain capabilities accept virttype qemu.
    pub libvirt_offers_qemu: bool,
}

/// Why no accelerator could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// `--hypervisor kvm` on a host without usable KVM.
    #[error("--hypervisor kvm: {0}")]
    KvmUnavailable(&'static str),
    /// libvirt offers neither kvm nor qemu for x86_64 (QEMU not installed?).
    #[error("libvirt offers no x86_64 QEMU domains (is qemu-system-x86 installed?)")]
    NothingOffered,
}

impl AcceleratorProbe {
    /// Reads the kernel modules under `sys_module` (normally `/sys/module`); the libvirt
    /// answers come from the hypervisor's host facts.
    pub fn read(sys_module: &Path, libvirt_offers_kvm: bool, libvirt_offers_qemu: bool) -> Self {
        AcceleratorProbe {
            hardware_kvm_module: ["kvm_intel", "kvm_amd"]
                .iter()
                .any(|m| sys_module.join(m).exists()),
            libvirt_offers_kvm,
            libvirt_offers_qemu,
        }
    }
}

/// The accelerator for `choice` on a host that offers `probe`.
pub fn choose_hypervisor(
    choice: HypervisorChoice,
    probe: AcceleratorProbe,
) -> Result<HypervisorKind, ProbeError> {
    let kvm_usable = probe.hardware_kvm_module && probe.libvirt_offers_kvm;
    match choice {
        HypervisorChoice::Kvm if kvm_usable => Ok(HypervisorKind::Kvm),
        HypervisorChoice::Kvm if !probe.hardware_kvm_module => Err(ProbeError::KvmUnavailable(
            "neither kvm_intel nor kvm_amd is loaded",
        )),
        HypervisorChoice::Kvm => Err(ProbeError::KvmUnavailable("libvirt does not offer kvm")),
        HypervisorChoice::Auto if kvm_usable => Ok(HypervisorKind::Kvm),
        HypervisorChoice::Auto | HypervisorChoice::Qemu if probe.libvirt_offers_qemu => {
            Ok(HypervisorKind::Qemu)
        }
        HypervisorChoice::Auto | HypervisorChoice::Qemu => Err(ProbeError::NothingOffered),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(hw: bool, kvm: bool, qemu: bool) -> AcceleratorProbe {
        AcceleratorProbe {
            hardware_kvm_module: hw,
            libvirt_offers_kvm: kvm,
            libvirt_offers_qemu: qemu,
        }
    }

    #[test]
    fn auto_uses_kvm_only_with_a_hardware_module_and_libvirt_agreeing() {
        use HypervisorChoice::Auto;
        assert_eq!(
            choose_hypervisor(Auto, probe(true, true, true)),
            Ok(HypervisorKind::Kvm)
        );
        // This machine: libvirt offers kvm over kvm_pvm, no kvm_intel/kvm_amd.
        assert_eq!(
            choose_hypervisor(Auto, probe(false, true, true)),
            Ok(HypervisorKind::Qemu)
        );
        assert_eq!(
            choose_hypervisor(Auto, probe(true, false, true)),
            Ok(HypervisorKind::Qemu)
        );
        assert_eq!(
            choose_hypervisor(Auto, probe(false, false, false)),
            Err(ProbeError::NothingOffered)
        );
    }

    #[test]
    fn forced_choices_are_honoured_or_refused_with_the_reason() {
        assert_eq!(
            choose_hypervisor(HypervisorChoice::Kvm, probe(true, true, false)),
            Ok(HypervisorKind::Kvm)
        );
        assert!(matches!(
            choose_hypervisor(HypervisorChoice::Kvm, probe(false, true, true)),
            Err(ProbeError::KvmUnavailable(m)) if m.contains("kvm_intel")
        ));
        assert!(matches!(
            choose_hypervisor(HypervisorChoice::Kvm, probe(true, false, true)),
            Err(ProbeError::KvmUnavailable(m)) if m.contains("libvirt")
        ));
        assert_eq!(
            choose_hypervisor(HypervisorChoice::Qemu, probe(true, true, true)),
            Ok(HypervisorKind::Qemu)
        );
    }

    #[test]
    fn reads_modules_from_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!AcceleratorProbe::read(dir.path(), true, true).hardware_kvm_module);
        std::fs::create_dir(dir.path().join("kvm_amd")).unwrap();
        assert!(AcceleratorProbe::read(dir.path(), true, true).hardware_kvm_module);
    }
}
