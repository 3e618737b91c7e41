//! [`FakeHypervisor`]: an in-memory [`Hypervisor`] for tests that inject faults (a failing
//! define, a start that errors, a guest that ignores ACPI, a QEMU that dies). Not used by the
//! agent binary except in its `simulate` mode (simulate.rs), where each simulated host has one.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use super::{DomainPhase, DomainStatus, HostFacts, Hypervisor, HypervisorError};
use crate::domain_xml::MachineMetadata;

/// The fake's operations, for failure injection and call counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HypervisorOp {
    /// [`Hypervisor::list`] and [`Hypervisor::get`].
    Read,
    /// [`Hypervisor::define`].
    Define,
    /// [`Hypervisor::start`].
    Start,
    /// [`Hypervisor::shutdown`].
    Shutdown,
    /// [`Hypervisor::destroy`].
    Destroy,
    /// [`Hypervisor::undefine`].
    Undefine,
}

impl HypervisorOp {
    /// Every operation, for setting a fault on all of them at once.
    pub const ALL: [HypervisorOp; 6] = [
        HypervisorOp::Read,
        HypervisorOp::Define,
        HypervisorOp::Start,
        HypervisorOp::Shutdown,
        HypervisorOp::Destroy,
        HypervisorOp::Undefine,
    ];
}

#[derive(Debug, Clone)]
struct FakeDomain {
    xml: String,
    phase: DomainPhase,
}

#[derive(Debug, Default)]
struct FakeState {
    domains: BTreeMap<String, FakeDomain>,
    failures: HashMap<HypervisorOp, u32>,
    calls: HashMap<HypervisorOp, u32>,
    delays: HashMap<HypervisorOp, std::time::Duration>,
    in_flight: u32,
    max_in_flight: u32,
    ignore_acpi: bool,
    fail_all: bool,
}

/// An in-memory hypervisor with failure injection.
#[derive(Debug, Default)]
pub struct FakeHypervisor {
    state: Mutex<FakeState>,
}

impl FakeHypervisor {
    /// An empty fake whose guests obey ACPI shutdown at once.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        // A panicking test thread must not hide the fake's state from the assertions.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the next `times` calls of `op` fail.
    pub fn fail_next(&self, op: HypervisorOp, times: u32) {
        self.lock().failures.insert(op, times);
    }

    /// How often `op` was called (failed calls included).
    pub fn calls(&self, op: HypervisorOp) -> u32 {
        self.lock().calls.get(&op).copied().unwrap_or(0)
    }

    /// Makes every call of `op` take `delay` (outside the fake's lock, as a slow libvirt call
    /// would), to widen race windows in tests.
    pub fn delay(&self, op: HypervisorOp, delay: std::time::Duration) {
        self.lock().delays.insert(op, delay);
    }

    /// While `on`, every call fails (counted, after its delay), as with a libvirt daemon that
    /// answers nothing but errors.
    pub fn fail_all(&self, on: bool) {
        self.lock().fail_all = on;
    }

    /// The most calls that were ever in progress at once.
    pub fn max_in_flight(&self) -> u32 {
        self.lock().max_in_flight
    }

    /// Guests ignore the ACPI power button from now on (as the tiny image does).
    pub fn ignore_acpi(&self) {
        self.lock().ignore_acpi = true;
    }

    /// Simulates QEMU dying under a running domain. Returns whether the domain exists.
    pub fn crash(&self, name: &str) -> bool {
        match self.lock().domains.get_mut(name) {
            Some(d) => {
                d.phase = DomainPhase::Crashed;
                true
            }
            None => false,
        }
    }

    /// The definition of domain `name`, as last defined.
    pub fn domain_xml(&self, name: &str) -> Option<String> {
        self.lock().domains.get(name).map(|d| d.xml.clone())
    }

    /// Names of every defined domain.
    pub fn domain_names(&self) -> Vec<String> {
        self.lock().domains.keys().cloned().collect()
    }

    /// How many domains are defined, and how many of them run.
    pub fn domain_counts(&self) -> (usize, usize) {
        let st = self.lock();
        let running = st
            .domains
            .values()
            .filter(|d| d.phase == DomainPhase::Running)
            .count();
        (st.domains.len(), running)
    }

    fn enter(
        &self,
        op: HypervisorOp,
    ) -> Result<std::sync::MutexGuard<'_, FakeState>, HypervisorError> {
        let delay = {
            let mut st = self.lock();
            st.in_flight += 1;
            st.max_in_flight = st.max_in_flight.max(st.in_flight);
            st.delays.get(&op).copied()
        };
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        let mut st = self.lock();
        st.in_flight -= 1;
        *st.calls.entry(op).or_default() += 1;
        if st.fail_all {
            return Err(HypervisorError::Failed {
                op: "fake",
                message: format!("{op:?} refused: every call fails (fail_all)"),
            });
        }
        if let Some(n) = st.failures.get_mut(&op) {
            if *n > 0 {
                *n -= 1;
                return Err(HypervisorError::Failed {
                    op: "fake",
                    message: format!("injected failure of {op:?}"),
                });
            }
        }
        Ok(st)
    }
}

/// The text of the first `<tag ...>text</tag>` in `xml`; good enough for the XML this crate
/// writes, which is all the fake ever sees.
fn element_text<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let start = xml.find(&format!("<{tag}"))?;
    let body = &xml[start..];
    let open_end = body.find('>')? + 1;
    let close = body.find(&format!("</{tag}>"))?;
    body.get(open_end..close)
}

fn domain_status(name: &str, d: &FakeDomain) -> DomainStatus {
    DomainStatus {
        name: name.to_owned(),
        phase: d.phase,
        xml: d.xml.clone(),
        vcpus: element_text(&d.xml, "vcpu")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0),
        // The domain XML states memory in MiB.
        memory_kib: element_text(&d.xml, "memory")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(0, |mib| mib * 1024),
    }
}

impl Hypervisor for FakeHypervisor {
    fn host_facts(&self) -> Result<HostFacts, HypervisorError> {
        let _st = self.enter(HypervisorOp::Read)?;
        Ok(HostFacts {
            libvirt_version: "0.0.0-fake".into(),
            cpus: 8,
            memory_kib: 16 << 20,
            offers_kvm: false,
            offers_qemu: true,
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<DomainStatus>, HypervisorError> {
        let st = self.enter(HypervisorOp::Read)?;
        Ok(st
            .domains
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(n, d)| domain_status(n, d))
            .collect())
    }

    fn get(&self, name: &str) -> Result<Option<DomainStatus>, HypervisorError> {
        let st = self.enter(HypervisorOp::Read)?;
        Ok(st.domains.get(name).map(|d| domain_status(name, d)))
    }

    fn define(&self, xml: &str) -> Result<(), HypervisorError> {
        let mut st = self.enter(HypervisorOp::Define)?;
        let name = element_text(xml, "name")
            .ok_or_else(|| HypervisorError::Failed {
                op: "define",
                message: "no <name>".into(),
            })?
            .to_owned();
        MachineMetadata::from_xml(xml).map_err(|e| HypervisorError::Failed {
            op: "define",
            message: e.to_string(),
        })?;
        let phase = st
            .domains
            .get(&name)
            .map_or(DomainPhase::Stopped, |d| d.phase);
        st.domains.insert(
            name,
            FakeDomain {
                xml: xml.to_owned(),
                phase,
            },
        );
        Ok(())
    }

    fn start(&self, name: &str) -> Result<(), HypervisorError> {
        let mut st = self.enter(HypervisorOp::Start)?;
        let d = st
            .domains
            .get_mut(name)
            .ok_or_else(|| HypervisorError::NoDomain(name.to_owned()))?;
        if d.phase == DomainPhase::Running {
            return Err(HypervisorError::Failed {
                op: "start",
                message: "domain is already running".into(),
            });
        }
        d.phase = DomainPhase::Running;
        Ok(())
    }

    fn shutdown(&self, name: &str) -> Result<(), HypervisorError> {
        let mut st = self.enter(HypervisorOp::Shutdown)?;
        let ignore = st.ignore_acpi;
        let d = st
            .domains
            .get_mut(name)
            .ok_or_else(|| HypervisorError::NoDomain(name.to_owned()))?;
        if d.phase == DomainPhase::Running && !ignore {
            d.phase = DomainPhase::Stopped;
        }
        Ok(())
    }

    fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        let mut st = self.enter(HypervisorOp::Destroy)?;
        if let Some(d) = st.domains.get_mut(name) {
            d.phase = DomainPhase::Stopped;
        }
        Ok(())
    }

    fn undefine(&self, name: &str) -> Result<(), HypervisorError> {
        let mut st = self.enter(HypervisorOp::Undefine)?;
        if st
            .domains
            .get(name)
            .is_some_and(|d| d.phase == DomainPhase::Running)
        {
            return Err(HypervisorError::Failed {
                op: "undefine",
                message: "domain is running".into(),
            });
        }
        st.domains.remove(name);
        Ok(())
    }
}
