//! The reconciler: keeps the database true to what the hosts really run.
//!
//! - A watcher per ready host follows its agent's WatchEvents and looks at a machine as soon
//!   as its domain changes (a QEMU killed shows up within the agent's poll interval).
//! - A periodic pass lists every ready host's domains (ListMachines) and compares them with the
//!   machines placed there, which also catches what a watcher missed (control plane down,
//!   stream resumed from 0) and removes orphaned domains after a grace period.
//!
//! The decisions are `drift::decide`; every repair writes an event on the machine. Every
//! check ends in a named outcome (`status::CheckOutcome`), logged and counted; each pass's
//! report is kept for `GET /admin/reconciler` and the metrics.

pub mod drift;
pub mod status;

use crate::agents::{AgentCallError, AgentClient, AgentClients, AgentTarget};
use crate::model::{DesiredState, MachineId, MachineSnapshot, MachineStatus, PhaseOnHost};
use crate::store::hosts::HostRecord;
use crate::store::machines::{MachineTransition, NewEvent};
use crate::store::restarts::CrashOutcome;
use crate::store::Store;
use crate::timing::WorkflowSettings;
use drift::Repair;
use futures::StreamExt;
use status::{CheckOutcome, PassTally};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use status::{PassReport, ReconcilerStatus};

/// Hosts a periodic pass checks at once.
const PASS_CONCURRENCY: usize = 32;

/// Of those, how many read their machines from the database at once (a watcher re-checking a
/// whole host after its stream was lost counts as a pass). The agents' listings
/// may wait in parallel, but a pass holding 32 database connections left the API and the
/// workers 8 of PostgreSQL's 40 during a 1,000-host storm (27 of them were seen reading
/// machines by host at once, issue 13).
const PASS_DATABASE_READS: usize = 4;

/// The reconciler's state: when each orphan was first seen, per host, and the last pass's
/// report.
#[derive(Debug)]
pub struct Reconciler {
    store: Store,
    agents: Arc<AgentClients>,
    settings: WorkflowSettings,
    orphans: Mutex<HashMap<String, HashMap<MachineId, Instant>>>,
    status: Arc<ReconcilerStatus>,
    /// Bounds the pass's database reads ([`PASS_DATABASE_READS`]).
    database_reads: tokio::sync::Semaphore,
}

/// What one host's check found: its outcome, how many machines it compared, and each
/// repair's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCheck {
    pub outcome: CheckOutcome,
    pub machines: u64,
    pub repairs: Vec<CheckOutcome>,
}

impl HostCheck {
    fn inconclusive(outcome: CheckOutcome) -> Self {
        Self {
            outcome,
            machines: 0,
            repairs: Vec::new(),
        }
    }
}

/// Logs and counts one outcome (periodic passes, resyncs and event checks alike).
fn note(host: &str, outcome: CheckOutcome, error: Option<&dyn std::fmt::Debug>) {
    crate::metrics::reconciler_check(outcome.as_str());
    match error {
        Some(e) => {
            tracing::warn!(host, outcome = outcome.as_str(), error = ?e, "reconciler check inconclusive")
        }
        None if outcome.inconclusive() => {
            tracing::warn!(
                host,
                outcome = outcome.as_str(),
                "reconciler check inconclusive"
            )
        }
        None => tracing::debug!(host, outcome = outcome.as_str(), "reconciler check"),
    }
}

impl Reconciler {
    /// `status` receives each pass's report (the API reads it there).
    pub fn new(
        store: Store,
        agents: Arc<AgentClients>,
        settings: WorkflowSettings,
        status: Arc<ReconcilerStatus>,
    ) -> Self {
        Self {
            store,
            agents,
            settings,
            orphans: Mutex::new(HashMap::new()),
            status,
            database_reads: tokio::sync::Semaphore::new(PASS_DATABASE_READS),
        }
    }

    /// Runs the periodic pass and keeps one watcher per ready host, until aborted.
    pub async fn run(self: Arc<Self>) {
        let mut watchers: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut tick = tokio::time::interval(self.settings.reconcile_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            watchers.retain(|_, w| !w.is_finished());
            let report = self.pass(&mut watchers).await;
            self.status.set_last_pass(report);
        }
    }

    /// One pass over every ready host: starts the watchers that are missing and compares each
    /// host's domains with its machines.
    async fn pass(
        self: &Arc<Self>,
        watchers: &mut HashMap<String, tokio::task::JoinHandle<()>>,
    ) -> PassReport {
        let started = Instant::now();
        let mut tally = PassTally::new(chrono::Utc::now());
        match self.store.host_list().await {
            Ok(hosts) => {
                let ready: Vec<&HostRecord> = hosts.iter().filter(|h| h.state == "ready").collect();
                for host in &ready {
                    if !watchers.contains_key(&host.id) {
                        let me = Arc::clone(self);
                        let h = (*host).clone();
                        watchers.insert(
                            host.id.clone(),
                            tokio::spawn(async move { me.watch(h).await }),
                        );
                    }
                }
                // Hosts one after another made a pass as long as the sum of every agent's
                // answer (issue 13: 1,000 hosts at 20 ms each is 20 s); a bounded number at once
                // keeps the database and the agents' connections within limits.
                // Owned hosts and an owned reconciler per check: a closure over borrowed ones
                // did not compile as part of a spawned task (a higher-ranked lifetime error).
                let mut checks = futures::stream::iter(ready.into_iter().cloned())
                    .map(|host| {
                        let me = Arc::clone(self);
                        async move { me.pass_host(&host).await }
                    })
                    .buffer_unordered(PASS_CONCURRENCY);
                while let Some(check) = checks.next().await {
                    tally.host(check.machines);
                    tally.outcome(check.outcome);
                    for repair in check.repairs {
                        tally.outcome(repair);
                    }
                }
            }
            Err(e) => {
                note("", CheckOutcome::StoreFailed, Some(&e));
                tally.outcome(CheckOutcome::StoreFailed);
            }
        }
        let report = tally.finish(chrono::Utc::now());
        let outcomes: Vec<(&'static str, u64)> =
            report.outcomes.iter().map(|(k, v)| (*k, *v)).collect();
        crate::metrics::reconciler_pass(
            report.finished_at.timestamp_millis() as f64 / 1000.0,
            started.elapsed(),
            &outcomes,
        );
        report
    }

    /// Compares one host's domains with its machines and repairs the drift. The machines are
    /// read *before* the host is asked, and every repair is a compare-and-swap on the
    /// generation read here: a workflow that settles meanwhile makes the repair a no-op
    /// instead of being judged against a listing older than its result.
    pub async fn pass_host(&self, host: &HostRecord) -> HostCheck {
        // Only the pass waits for a permit (never closed, so one always comes): a watcher's
        // check of one machine must not queue behind a pass over 1,000 hosts.
        let permit = self.database_reads.acquire().await;
        let known = self.known_machines(&host.id).await;
        drop(permit);
        let known = match known {
            Ok(k) => k,
            Err(e) => {
                note(&host.name, CheckOutcome::StoreFailed, Some(&e));
                return HostCheck::inconclusive(CheckOutcome::StoreFailed);
            }
        };
        let listed = match self.client(host) {
            Ok(client) => client.list().await,
            Err(e) => Err(e),
        };
        let listed = match listed {
            Ok(l) => l,
            // Marking the host unreachable is the monitor's business (by heartbeats); here
            // the check is only inconclusive, and says so.
            Err(e) => {
                let outcome = CheckOutcome::of_agent_error(&e);
                note(&host.name, outcome, Some(&e));
                return HostCheck::inconclusive(outcome);
            }
        };
        note(&host.name, CheckOutcome::Compared, None);
        let domains: HashMap<MachineId, PhaseOnHost> =
            listed.iter().map(|m| (m.id, m.phase)).collect();
        let machines: Vec<MachineSnapshot> = known.values().copied().collect();
        let repairs = {
            let mut orphans = self.orphans.lock().unwrap_or_else(|p| p.into_inner());
            let seen = orphans.entry(host.id.clone()).or_default();
            drift::decide(
                &host.name,
                &machines,
                &domains,
                seen,
                Instant::now(),
                self.settings.orphan_grace,
            )
        };
        HostCheck {
            outcome: CheckOutcome::Compared,
            machines: known.len() as u64,
            repairs: self.apply_all(host, repairs, &known).await,
        }
    }

    fn client(&self, host: &HostRecord) -> Result<AgentClient, AgentCallError> {
        self.agents.client(&AgentTarget::from(host))
    }

    async fn known_machines(
        &self,
        host_id: &str,
    ) -> crate::Result<HashMap<MachineId, MachineSnapshot>> {
        Ok(self
            .store
            .machines_on_host(host_id)
            .await?
            .into_iter()
            .map(|m| (m.id, m))
            .collect())
    }

    /// Applies each repair; one that fails is logged and counted and the rest still run.
    async fn apply_all(
        &self,
        host: &HostRecord,
        repairs: Vec<Repair>,
        known: &HashMap<MachineId, MachineSnapshot>,
    ) -> Vec<CheckOutcome> {
        let mut outcomes = Vec::with_capacity(repairs.len());
        for repair in repairs {
            let outcome = match self.apply(host, repair, known).await {
                Ok(true) => CheckOutcome::Repaired,
                Ok(false) => CheckOutcome::MachineChanged,
                Err(e) => {
                    note(&host.name, CheckOutcome::RepairFailed, Some(&e));
                    outcomes.push(CheckOutcome::RepairFailed);
                    continue;
                }
            };
            note(&host.name, outcome, None);
            outcomes.push(outcome);
        }
        outcomes
    }

    /// Looks at one machine after its agent reported a change. The event only says *that*
    /// something changed: the decision uses the domain's state now (GetMachine), so an old event
    /// replayed from the agent's backlog cannot undo a newer truth.
    async fn check_machine(&self, host: &HostRecord, id: MachineId) {
        let known = match self.known_machines(&host.id).await {
            Ok(k) => k,
            Err(e) => return note(&host.name, CheckOutcome::StoreFailed, Some(&e)),
        };
        let Some(&snapshot) = known.get(&id) else {
            // Not a live machine here: orphans are the periodic pass's business.
            return;
        };
        if !matches!(
            snapshot.status,
            MachineStatus::Running | MachineStatus::Stopped
        ) {
            return;
        }
        let now = match self.client(host) {
            Ok(client) => client.get(id).await,
            Err(e) => Err(e),
        };
        let phase = match now {
            Ok(m) => m.phase,
            // The agent's word that it has no domain for the machine is an answer.
            Err(e) if e.is_gone() => PhaseOnHost::Absent,
            Err(e) => return note(&host.name, CheckOutcome::of_agent_error(&e), Some(&e)),
        };
        let domains = HashMap::from([(id, phase)]);
        // A one-machine view: no orphan judgement here.
        let mut no_orphans = HashMap::new();
        let repairs = drift::decide(
            &host.name,
            &[snapshot],
            &domains,
            &mut no_orphans,
            Instant::now(),
            Duration::MAX,
        );
        self.apply_all(host, repairs, &known).await;
    }

    /// Writes one repair; whether it was applied (false: the machine changed meanwhile).
    async fn apply(
        &self,
        host: &HostRecord,
        repair: Repair,
        known: &HashMap<MachineId, MachineSnapshot>,
    ) -> Result<bool, RepairError> {
        use MachineStatus as S;
        // Every repair but an orphan's is of a machine read in this check; one that is not
        // there any more has changed, and the next check judges it again.
        let version = |id: &MachineId| known.get(id).map(|m| m.version);
        let applied = match repair {
            Repair::MarkStopped { id, reason } => {
                let event = NewEvent {
                    action: "reconcile",
                    message: &reason,
                };
                let Some(version) = version(&id) else {
                    return Ok(false);
                };
                self.store
                    .machine_transition(&MachineTransition {
                        desired: Some(DesiredState::Stopped),
                        ..MachineTransition::new(id, S::Running, version, S::Stopped, event)
                    })
                    .await?
                    .applied()
            }
            Repair::RestartCrashed { id, reason } => {
                let Some(version) = version(&id) else {
                    return Ok(false);
                };
                let outcome = self
                    .store
                    .machine_restart_after_crash(id, version, &reason, self.settings.restart)
                    .await?;
                tracing::info!(host = %host.name, machine = %id, ?outcome, "crashed machine with restart policy on-failure");
                outcome != CrashOutcome::Superseded
            }
            Repair::MarkRunning { id } => {
                let message = format!("found running on host {}", host.name);
                let event = NewEvent {
                    action: "reconcile",
                    message: &message,
                };
                let Some(version) = version(&id) else {
                    return Ok(false);
                };
                self.store
                    .machine_transition(&MachineTransition {
                        desired: Some(DesiredState::Running),
                        ..MachineTransition::new(id, S::Stopped, version, S::Running, event)
                    })
                    .await?
                    .applied()
            }
            Repair::MarkFailed { id, reason } => match known.get(&id) {
                Some(m) => self
                    .store
                    .machine_transition(&MachineTransition::failed(
                        id,
                        m.status,
                        m.version,
                        "reconcile",
                        &reason,
                    ))
                    .await?
                    .applied(),
                None => false,
            },
            Repair::RemoveOrphan { id } => {
                self.client(host)?.delete(id).await?;
                tracing::warn!(host = %host.name, machine = %id, "removed an orphaned domain");
                let note = format!(
                    "removed its leftover domain from host {} (no live machine owned it)",
                    host.name
                );
                self.store.machine_event_any(id, "reconcile", &note).await?;
                true
            }
        };
        Ok(applied)
    }

    /// Follows one host's events until the stream breaks (the next pass restarts it).
    async fn watch(&self, host: HostRecord) {
        let mut after = 0;
        loop {
            let opened = match self.client(&host) {
                Ok(client) => client.watch(after).await,
                Err(e) => Err(e),
            };
            let mut changes = match opened {
                Ok(c) => c,
                Err(AgentCallError::ResumeLost { .. }) => {
                    // The agent restarted (or we fell far behind): start over and let a full
                    // pass catch up on what the stream cannot replay.
                    after = 0;
                    self.pass_host(&host).await;
                    continue;
                }
                Err(e) => {
                    tracing::info!(host = %host.name, error = ?e,
                        "stopped watching the host's events; the next pass watches again");
                    return;
                }
            };
            // Until the stream ends (agent shutting down, fell behind); then resume after the
            // last event seen.
            while let Some(change) = changes.next().await {
                after = change.sequence;
                if let Some(id) = change.machine {
                    self.check_machine(&host, id).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Why a repair was not written.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("writing the repair failed")]
    Store(#[from] crate::Error),
    #[error("removing the orphaned domain failed")]
    Agent(#[from] AgentCallError),
}
