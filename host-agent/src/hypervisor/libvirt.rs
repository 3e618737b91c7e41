//! [`Hypervisor`] over libvirt through the `virt` crate. One connection, opened lazily and
//! reopened when libvirtd went away (a restart of the daemon must not need an agent restart).

use std::sync::Mutex;

use virt::connect::Connect;
use virt::domain::{Domain, DomainShutoffReason, DomainState, DomainStateReason};
use virt::enumutil::Enum;
use virt::error::{Error as VirtError, ErrorNumber};

use super::{DomainPhase, DomainStatus, HostFacts, Hypervisor, HypervisorError};

/// `VIR_DOMAIN_XML_INACTIVE`: the persistent definition, not the live one.
const XML_INACTIVE: u32 = virt::sys::VIR_DOMAIN_XML_INACTIVE;

/// libvirt-backed hypervisor.
#[derive(Debug)]
pub struct LibvirtHypervisor {
    uri: String,
    conn: Mutex<Option<Connect>>,
}

/// Seconds between keepalive probes, and unanswered probes before libvirt closes the
/// connection: a hung libvirtd fails calls after about 20 s instead of blocking them forever.
const KEEPALIVE_INTERVAL_SECS: i32 = 5;
const KEEPALIVE_COUNT: u32 = 3;

/// libvirt's default event loop, run on its own thread once per process. Keepalive needs it.
fn start_event_loop() -> Result<(), HypervisorError> {
    static STARTED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    STARTED
        .get_or_init(|| {
            virt::event::event_register_default_impl().map_err(|e| e.message().to_owned())?;
            std::thread::Builder::new()
                .name("libvirt-events".into())
                .spawn(|| loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::warn!(error = e.message(), "libvirt event loop iteration failed");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                })
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(HypervisorError::Unreachable)
}

impl LibvirtHypervisor {
    /// A hypervisor at `uri` (e.g. `qemu:///system`). Connects now, so a wrong URI or a
    /// stopped daemon is reported at start-up; later calls reconnect on their own.
    pub fn connect(uri: &str) -> Result<Self, HypervisorError> {
        // libvirt's default error handler prints every error to stderr; ours are returned.
        virt::error::clear_error_callback();
        start_event_loop()?;
        let hv = LibvirtHypervisor {
            uri: uri.to_owned(),
            conn: Mutex::new(None),
        };
        hv.with_conn(|_| Ok(()))?;
        Ok(hv)
    }

    /// A live connection: the current one, or a new one when there is none or it died.
    /// The lock is held only for this, never during a call, so a slow call (a define, a
    /// destroy of a stuck QEMU) does not hold up the others.
    fn connection(&self, fresh: bool) -> Result<Connect, HypervisorError> {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if fresh || slot.as_ref().is_none_or(|c| !c.is_alive().unwrap_or(false)) {
            // Dropping a dead connection releases our reference; libvirt frees it.
            *slot = None;
            let conn = Connect::open(Some(&self.uri))
                .map_err(|e| HypervisorError::Unreachable(e.message().to_owned()))?;
            if let Err(e) = conn.set_keep_alive(KEEPALIVE_INTERVAL_SECS, KEEPALIVE_COUNT) {
                tracing::warn!(error = e.message(), "libvirt keepalive not enabled");
            }
            *slot = Some(conn);
        }
        slot.clone()
            .ok_or_else(|| HypervisorError::Unreachable("no connection".into()))
    }

    /// Runs `f` with a live connection. When the connection turns out broken (libvirtd
    /// restarted) it is reopened and `f` retried once.
    fn with_conn<T>(
        &self,
        f: impl Fn(&Connect) -> Result<T, VirtError>,
    ) -> Result<T, HypervisorError> {
        let conn = self.connection(false)?;
        match f(&conn) {
            Err(e) if is_connection_error(&e) => {
                drop(conn);
                let conn = self.connection(true)?;
                f(&conn).map_err(classify)
            }
            other => other.map_err(classify),
        }
    }

    fn with_domain<T>(
        &self,
        name: &str,
        op: &'static str,
        f: impl Fn(&Domain) -> Result<T, VirtError>,
    ) -> Result<T, HypervisorError> {
        self.with_conn(|c| f(&c.lookup_domain_by_name(name)?))
            .map_err(|e| match e {
                HypervisorError::Failed { message, .. } => HypervisorError::Failed { op, message },
                other => other,
            })
    }
}

/// Errors after which the connection is unusable and must be reopened.
fn is_connection_error(e: &VirtError) -> bool {
    e.code().is_any(vec![
        ErrorNumber::NoConnect,
        ErrorNumber::InvalidConn,
        ErrorNumber::Rpc,
    ]) || (e.code().is(ErrorNumber::SystemError) && e.domain().is(virt::error::ErrorDomain::Rpc))
}

fn classify(e: VirtError) -> HypervisorError {
    if e.code().is(ErrorNumber::NoDomain) {
        HypervisorError::NoDomain(e.message().to_owned())
    } else if is_connection_error(&e) {
        HypervisorError::Unreachable(e.message().to_owned())
    } else {
        HypervisorError::Failed {
            op: "libvirt call",
            message: e.message().to_owned(),
        }
    }
}

fn status(dom: &Domain) -> Result<DomainStatus, VirtError> {
    let (state, reason) = dom.state()?;
    let phase = match state.known() {
        Some(DomainState::Running | DomainState::Blocked) => DomainPhase::Running,
        Some(DomainState::Paused | DomainState::PMSuspended) => DomainPhase::Paused,
        Some(DomainState::Shutdown) => DomainPhase::ShuttingDown,
        Some(DomainState::Crashed) => DomainPhase::Crashed,
        Some(DomainState::Shutoff)
            if matches!(reason, Enum::Known(DomainStateReason::Shutoff(r))
                if r.is(DomainShutoffReason::Crashed)) =>
        {
            DomainPhase::Crashed
        }
        Some(DomainState::Shutoff | DomainState::NoState) | None => DomainPhase::Stopped,
    };
    let info = dom.info()?;
    Ok(DomainStatus {
        name: dom.name()?,
        phase,
        xml: dom.xml_desc(XML_INACTIVE)?,
        vcpus: info.nr_virt_cpu,
        memory_kib: info.max_mem,
    })
}

fn offers(conn: &Connect, virttype: &str) -> bool {
    conn.domain_capabilities(None, Some("x86_64"), None, Some(virttype), 0)
        .is_ok()
}

fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

/// Whether `e` says the domain is already in the state the call wanted.
fn is_not_running(e: &VirtError) -> bool {
    e.code().is(ErrorNumber::OperationInvalid)
}

impl Hypervisor for LibvirtHypervisor {
    fn host_facts(&self) -> Result<HostFacts, HypervisorError> {
        self.with_conn(|c| {
            let node = c.node_info()?;
            Ok(HostFacts {
                libvirt_version: version_string(c.lib_version()?),
                cpus: node.cpus,
                memory_kib: node.memory,
                offers_kvm: offers(c, "kvm"),
                offers_qemu: offers(c, "qemu"),
            })
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<DomainStatus>, HypervisorError> {
        self.with_conn(|c| {
            let mut out = Vec::new();
            for dom in c.list_all_domains(0)? {
                let name = dom.name()?;
                if !name.starts_with(prefix) {
                    continue;
                }
                match status(&dom) {
                    Ok(s) => out.push(s),
                    // Undefined between the listing and the lookup: it is gone.
                    Err(e) if e.code().is(ErrorNumber::NoDomain) => {}
                    Err(e) if is_connection_error(&e) => return Err(e),
                    // One unreadable domain must not hide all the others.
                    Err(e) => tracing::warn!(domain = %name, error = e.message(), "skipping a domain libvirt cannot describe"),
                }
            }
            Ok(out)
        })
    }

    fn get(&self, name: &str) -> Result<Option<DomainStatus>, HypervisorError> {
        match self.with_domain(name, "get", status) {
            Ok(s) => Ok(Some(s)),
            Err(HypervisorError::NoDomain(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn define(&self, xml: &str) -> Result<(), HypervisorError> {
        self.with_conn(|c| c.define_domain_xml(xml).map(drop))
            .map_err(|e| match e {
                HypervisorError::Failed { message, .. } => HypervisorError::Failed {
                    op: "define",
                    message,
                },
                other => other,
            })
    }

    fn start(&self, name: &str) -> Result<(), HypervisorError> {
        self.with_domain(name, "start", |d| d.create().map(drop))
    }

    fn shutdown(&self, name: &str) -> Result<(), HypervisorError> {
        self.with_domain(name, "shutdown", |d| match d.shutdown() {
            Err(e) if is_not_running(&e) => Ok(()),
            other => other.map(drop),
        })
    }

    fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        match self.with_domain(name, "destroy", |d| match d.destroy() {
            Err(e) if is_not_running(&e) => Ok(()),
            other => other,
        }) {
            Err(HypervisorError::NoDomain(_)) => Ok(()),
            other => other,
        }
    }

    fn undefine(&self, name: &str) -> Result<(), HypervisorError> {
        match self.with_domain(name, "undefine", |d| d.undefine()) {
            Err(HypervisorError::NoDomain(_)) => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::version_string;

    #[test]
    fn libvirt_versions_read_as_dotted_triples() {
        assert_eq!(version_string(9_000_000), "9.0.0");
        assert_eq!(version_string(10_010_003), "10.10.3");
    }
}
