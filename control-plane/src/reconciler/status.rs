//! What the reconciler's checks found, by name, and the report of its last pass (what
//! `GET /admin/reconciler` shows and the metrics carry). Pure apart from the shared slot the
//! report is kept in.
//!
//! Every check ends in one named outcome, so an inconclusive one (a host that does not
//! answer, an agent that refuses) is counted and logged instead of dropped (as omicron's
//! instance watcher names each incomplete check).

use crate::agents::AgentCallError;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// How one check ended: a host's listing compared with the database, or one repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CheckOutcome {
    /// The host's domains were listed and compared with its machines.
    Compared,
    /// The host's agent did not answer.
    HostUnreachable,
    /// The host's agent refused the call as such (an agent too old or too new, say).
    AgentRefused,
    /// The host's agent answered with another error.
    AgentFailed,
    /// No client could be made for the host (the control plane's TLS or address settings).
    ClientFailed,
    /// The database could not be read.
    StoreFailed,
    /// A repair was written (or an orphaned domain removed).
    Repaired,
    /// A repair found the machine changed since it was read (a workflow settled it): nothing
    /// written, the next look judges it again.
    MachineChanged,
    /// A repair's write or agent call failed.
    RepairFailed,
}

impl CheckOutcome {
    pub const ALL: [CheckOutcome; 9] = [
        CheckOutcome::Compared,
        CheckOutcome::HostUnreachable,
        CheckOutcome::AgentRefused,
        CheckOutcome::AgentFailed,
        CheckOutcome::ClientFailed,
        CheckOutcome::StoreFailed,
        CheckOutcome::Repaired,
        CheckOutcome::MachineChanged,
        CheckOutcome::RepairFailed,
    ];

    /// The name in the admin report and the metrics' `outcome` label.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckOutcome::Compared => "compared",
            CheckOutcome::HostUnreachable => "host_unreachable",
            CheckOutcome::AgentRefused => "agent_refused",
            CheckOutcome::AgentFailed => "agent_failed",
            CheckOutcome::ClientFailed => "client_failed",
            CheckOutcome::StoreFailed => "store_failed",
            CheckOutcome::Repaired => "repaired",
            CheckOutcome::MachineChanged => "machine_changed",
            CheckOutcome::RepairFailed => "repair_failed",
        }
    }

    /// Whether the check says nothing about the machines it was about.
    pub fn inconclusive(self) -> bool {
        !matches!(
            self,
            CheckOutcome::Compared | CheckOutcome::Repaired | CheckOutcome::MachineChanged
        )
    }

    /// The outcome of asking a host about its machines when the agent call failed.
    pub fn of_agent_error(e: &AgentCallError) -> Self {
        match e {
            AgentCallError::Setup { .. } => CheckOutcome::ClientFailed,
            AgentCallError::Unreachable { .. } => CheckOutcome::HostUnreachable,
            AgentCallError::Refused { .. } => CheckOutcome::AgentRefused,
            _ => CheckOutcome::AgentFailed,
        }
    }
}

/// What one pass over every ready host found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// Ready hosts the pass asked (whatever the answer).
    pub hosts_checked: u64,
    /// Machines compared with what their hosts listed.
    pub machines_checked: u64,
    /// Repairs written (the `repaired` outcomes).
    pub repairs: u64,
    /// Every outcome with its count, zeros included.
    pub outcomes: BTreeMap<&'static str, u64>,
}

/// A pass being counted.
#[derive(Debug, Clone)]
pub struct PassTally {
    started_at: DateTime<Utc>,
    hosts_checked: u64,
    machines_checked: u64,
    counts: BTreeMap<CheckOutcome, u64>,
}

impl PassTally {
    pub fn new(started_at: DateTime<Utc>) -> Self {
        Self {
            started_at,
            hosts_checked: 0,
            machines_checked: 0,
            counts: BTreeMap::new(),
        }
    }

    /// One host asked; `machines` of its machines compared (0 unless it listed).
    pub fn host(&mut self, machines: u64) {
        self.hosts_checked += 1;
        self.machines_checked += machines;
    }

    pub fn outcome(&mut self, outcome: CheckOutcome) {
        *self.counts.entry(outcome).or_default() += 1;
    }

    pub fn finish(self, finished_at: DateTime<Utc>) -> PassReport {
        let count = |o: CheckOutcome| self.counts.get(&o).copied().unwrap_or(0);
        PassReport {
            started_at: self.started_at,
            finished_at,
            hosts_checked: self.hosts_checked,
            machines_checked: self.machines_checked,
            repairs: count(CheckOutcome::Repaired),
            outcomes: CheckOutcome::ALL
                .into_iter()
                .map(|o| (o.as_str(), count(o)))
                .collect(),
        }
    }
}

/// The last pass's report, shared between the reconciler and the API.
#[derive(Debug, Default)]
pub struct ReconcilerStatus {
    last_pass: Mutex<Option<PassReport>>,
}

impl ReconcilerStatus {
    /// `None` before the first pass has finished (or without a reconciler).
    pub fn last_pass(&self) -> Option<PassReport> {
        self.last_pass
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_last_pass(&self, report: PassReport) {
        *self.last_pass.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::Call;

    #[test]
    fn a_pass_counts_hosts_machines_and_every_outcome() {
        let t0 = Utc::now();
        let mut tally = PassTally::new(t0);
        tally.host(3);
        tally.outcome(CheckOutcome::Compared);
        tally.outcome(CheckOutcome::Repaired);
        tally.outcome(CheckOutcome::Repaired);
        tally.outcome(CheckOutcome::MachineChanged);
        tally.host(0);
        tally.outcome(CheckOutcome::HostUnreachable);
        let report = tally.finish(t0 + chrono::Duration::seconds(1));
        assert_eq!((report.hosts_checked, report.machines_checked), (2, 3));
        assert_eq!(report.repairs, 2);
        assert_eq!(report.outcomes.len(), CheckOutcome::ALL.len());
        assert_eq!(report.outcomes["host_unreachable"], 1);
        assert_eq!(report.outcomes["compared"], 1);
        assert_eq!(report.outcomes["agent_refused"], 0);
    }

    #[test]
    fn a_failed_listing_is_named_by_why() {
        let of = |status| {
            CheckOutcome::of_agent_error(&AgentCallError::from_status(Call::List, "h", status))
        };
        let local = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(of(local), CheckOutcome::HostUnreachable);
        assert_eq!(
            of(tonic::Status::unimplemented("no such method")),
            CheckOutcome::AgentRefused
        );
        assert_eq!(
            of(tonic::Status::internal("libvirt")),
            CheckOutcome::AgentFailed
        );
        assert!(CheckOutcome::HostUnreachable.inconclusive());
        assert!(!CheckOutcome::MachineChanged.inconclusive());
    }

    #[test]
    fn outcome_names_are_distinct() {
        let names: std::collections::BTreeSet<_> =
            CheckOutcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(names.len(), CheckOutcome::ALL.len());
    }
}
