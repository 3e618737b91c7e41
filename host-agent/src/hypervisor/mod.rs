//! The narrow interface between the agent and the hypervisor: define, start, stop, undefine and
//! observe domains by name. [`LibvirtHypervisor`] is the real one; [`FakeHypervisor`] exists
//! for tests that need to inject faults. Calls block (libvirt's API is synchronous); async
//! callers go through [`blocking`].

mod fake;
mod libvirt;

use std::sync::Arc;

pub use fake::{FakeHypervisor, HypervisorOp};
pub use libvirt::LibvirtHypervisor;

/// What the hypervisor says a domain is doing, reduced to what the agent acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DomainPhase {
    /// Defined, not running (shut off normally).
    Stopped,
    /// Running (or blocked on I/O, which is running too).
    Running,
    /// Paused by libvirt (e.g. out of disk space on the host).
    Paused,
    /// An ACPI shutdown is in progress.
    ShuttingDown,
    /// Its QEMU died or the guest crashed.
    Crashed,
}

/// One domain as listed by the hypervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainStatus {
    /// libvirt domain name.
    pub name: String,
    /// Power phase.
    pub phase: DomainPhase,
    /// The persistent (inactive) definition, where SkyGate's metadata and forwards live.
    pub xml: String,
    /// Configured vCPUs.
    pub vcpus: u32,
    /// Configured memory in KiB.
    pub memory_kib: u64,
}

/// Facts about the host the agent reports and chooses its accelerator from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// libvirt daemon version, `major.minor.micro`.
    pub libvirt_version: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// Physical memory in KiB.
    pub memory_kib: u64,
    /// Whether libvirt's domain capabilities offer `kvm` for x86_64.
    pub offers_kvm: bool,
    /// Whether libvirt's domain capabilities offer `qemu` (TCG) for x86_64.
    pub offers_qemu: bool,
}

/// Errors from the hypervisor.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The hypervisor could not be reached (after one reconnect attempt).
    #[error("hypervisor unreachable: {0}")]
    Unreachable(String),
    /// The named domain does not exist.
    #[error("no domain named {0}")]
    NoDomain(String),
    /// The hypervisor refused or failed the operation.
    #[error("{op} failed: {message}")]
    Failed {
        /// The operation.
        op: &'static str,
        /// What the hypervisor said.
        message: String,
    },
    /// A blocking call's thread panicked or was cancelled.
    #[error("hypervisor call did not complete: {0}")]
    Join(String),
}

/// The operations the agent needs from a hypervisor. Implementations must be safe to call from
/// several threads; each call is one hypervisor round trip or a few.
pub trait Hypervisor: Send + Sync + std::fmt::Debug + 'static {
    /// Host facts (version, CPUs, memory, accelerators offered).
    fn host_facts(&self) -> Result<HostFacts, HypervisorError>;
    /// Every persistent or running domain whose name starts with `prefix`.
    fn list(&self, prefix: &str) -> Result<Vec<DomainStatus>, HypervisorError>;
    /// One domain, or `None` when absent.
    fn get(&self, name: &str) -> Result<Option<DomainStatus>, HypervisorError>;
    /// Defines (or redefines) a persistent domain from `xml`. A running domain keeps running;
    /// the new definition applies at its next start.
    fn define(&self, xml: &str) -> Result<(), HypervisorError>;
    /// Starts a defined domain. Starting a running domain is an error.
    fn start(&self, name: &str) -> Result<(), HypervisorError>;
    /// Asks the guest to shut down (ACPI power button); returns at once.
    fn shutdown(&self, name: &str) -> Result<(), HypervisorError>;
    /// Powers the domain off at once. Idempotent: absent or stopped is success.
    fn destroy(&self, name: &str) -> Result<(), HypervisorError>;
    /// Removes the definition (stopped domains only). Idempotent: absent is success.
    fn undefine(&self, name: &str) -> Result<(), HypervisorError>;
}

/// Runs a blocking hypervisor call on tokio's blocking pool, off the async workers.
pub async fn blocking<T, F>(hv: &Arc<dyn Hypervisor>, f: F) -> Result<T, HypervisorError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Hypervisor) -> Result<T, HypervisorError> + Send + 'static,
{
    let hv = Arc::clone(hv);
    tokio::task::spawn_blocking(move || f(hv.as_ref()))
        .await
        .map_err(|e| HypervisorError::Join(e.to_string()))?
}
