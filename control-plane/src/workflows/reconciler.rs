//! The reconciler: keeps the database true to what the hosts really run.
//!
//! - A watcher per ready host follows its agent's WatchEvents and looks at a machine as soon
//!   as its domain changes (a QEMU killed shows up within the agent's poll interval).
//! - A periodic pass lists every ready host's domains (ListMachines) and compares them with the
//!   machines placed there, which also catches what a watcher missed (control plane down,
//!   stream resumed from 0) and removes orphaned domains after a grace period.
//!
//! The decisions are `drift::decide`; every repair writes an event on the machine.

use super::drift::{self, Actual, Repair};
use super::WorkflowSettings;
use crate::agents::clients::AgentTarget;
use crate::agents::AgentClients;
use crate::model::{DesiredState, MachineId, MachineStatus};
use crate::store::hosts::HostRecord;
use crate::store::machines::{MachineTransition, NewEvent};
use crate::store::Store;
use proto::agent::v1 as pb;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The reconciler's state: when each orphan was first seen, per host, and the watchers.
#[derive(Debug)]
pub struct Reconciler {
    store: Store,
    agents: Arc<AgentClients>,
    settings: WorkflowSettings,
    orphans: Mutex<HashMap<String, HashMap<Uuid, Instant>>>,
}

fn actual_of(phase: i32) -> Option<Actual> {
    match pb::MachinePhase::try_from(phase).ok()? {
        pb::MachinePhase::Running => Some(Actual::Running),
        pb::MachinePhase::Stopped => Some(Actual::Stopped),
        pb::MachinePhase::Crashed => Some(Actual::Crashed),
        pb::MachinePhase::Absent => None,
        _ => Some(Actual::Other),
    }
}

impl Reconciler {
    pub fn new(store: Store, agents: Arc<AgentClients>, settings: WorkflowSettings) -> Self {
        Self {
            store,
            agents,
            settings,
            orphans: Mutex::new(HashMap::new()),
        }
    }

    /// Runs the periodic pass and keeps one watcher per ready host, until aborted.
    pub async fn run(self: Arc<Self>) {
        let mut watchers: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut tick = tokio::time::interval(self.settings.reconcile_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let hosts = match self.store.host_list().await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = ?e, "reconciler could not list hosts");
                    continue;
                }
            };
            watchers.retain(|_, w| !w.is_finished());
            for host in hosts.iter().filter(|h| h.state == "ready") {
                if !watchers.contains_key(&host.id) {
                    let me = Arc::clone(&self);
                    let h = host.clone();
                    watchers.insert(
                        host.id.clone(),
                        tokio::spawn(async move { me.watch(h).await }),
                    );
                }
                if let Err(e) = self.pass_host(host).await {
                    tracing::warn!(host = %host.name, error = ?e, "reconciling host failed");
                }
            }
        }
    }

    /// Compares one host's domains with its machines and repairs the drift. The machines are
    /// read *before* the host is asked, and every repair is a compare-and-swap on the
    /// generation read here: a workflow that settles meanwhile makes the repair a no-op
    /// instead of being judged against a listing older than its result.
    pub async fn pass_host(&self, host: &HostRecord) -> crate::Result<()> {
        let known = self.known_machines(&host.id).await?;
        let mut client = self
            .agents
            .client(&AgentTarget::from(host))
            .map_err(|e| crate::Error::Internal(e.message().to_owned()))?;
        let mut request = tonic::Request::new(pb::ListMachinesRequest {});
        request.set_timeout(Duration::from_secs(15));
        let listed = match client.list_machines(request).await {
            Ok(l) => l.into_inner().machines,
            // Unreachable hosts are the monitor's business.
            Err(_) => return Ok(()),
        };
        let actual: Vec<(Uuid, Actual)> = listed
            .iter()
            .filter_map(|v| Some((Uuid::parse_str(&v.machine_id).ok()?, actual_of(v.phase)?)))
            .collect();
        let machines: Vec<(Uuid, MachineStatus)> =
            known.iter().map(|(id, (s, _))| (*id, *s)).collect();
        let repairs = {
            let mut orphans = self.orphans.lock().unwrap_or_else(|p| p.into_inner());
            let seen = orphans.entry(host.id.clone()).or_default();
            drift::decide(
                &host.name,
                &machines,
                &actual,
                seen,
                Instant::now(),
                self.settings.orphan_grace,
            )
        };
        self.apply_all(host, repairs, &known).await;
        Ok(())
    }

    async fn known_machines(
        &self,
        host_id: &str,
    ) -> crate::Result<HashMap<Uuid, (MachineStatus, i64)>> {
        Ok(self
            .store
            .machines_on_host(host_id)
            .await?
            .into_iter()
            .map(|m| (m.id.0, (m.status, m.version)))
            .collect())
    }

    /// Applies each repair; one that fails is logged and the rest still run.
    async fn apply_all(
        &self,
        host: &HostRecord,
        repairs: Vec<Repair>,
        known: &HashMap<Uuid, (MachineStatus, i64)>,
    ) {
        for repair in repairs {
            if let Err(e) = self.apply(host, repair, known).await {
                tracing::warn!(host = %host.name, error = ?e, "a repair failed");
            }
        }
    }

    /// Looks at one machine after its agent reported a change. The event only says *that*
    /// something changed: the decision uses the domain's state now (GetMachine), so an old event
    /// replayed from the agent's backlog cannot undo a newer truth.
    async fn check_machine(&self, host: &HostRecord, id: Uuid) -> crate::Result<()> {
        let known = self.known_machines(&host.id).await?;
        let Some(&(status, _)) = known.get(&id) else {
            // Not a live machine here: orphans are the periodic pass's business.
            return Ok(());
        };
        if !matches!(status, MachineStatus::Running | MachineStatus::Stopped) {
            return Ok(());
        }
        let mut client = self
            .agents
            .client(&AgentTarget::from(host))
            .map_err(|e| crate::Error::Internal(e.message().to_owned()))?;
        let mut request = tonic::Request::new(pb::MachineRef {
            machine_id: id.to_string(),
        });
        request.set_timeout(Duration::from_secs(15));
        let Ok(now) = client.get_machine(request).await else {
            return Ok(());
        };
        let actual: Vec<(Uuid, Actual)> = actual_of(now.into_inner().phase)
            .map(|a| (id, a))
            .into_iter()
            .collect();
        // A one-machine view: no orphan judgement here.
        let mut no_orphans = HashMap::new();
        let repairs = drift::decide(
            &host.name,
            &[(id, status)],
            &actual,
            &mut no_orphans,
            Instant::now(),
            Duration::MAX,
        );
        self.apply_all(host, repairs, &known).await;
        Ok(())
    }

    async fn apply(
        &self,
        host: &HostRecord,
        repair: Repair,
        known: &HashMap<Uuid, (MachineStatus, i64)>,
    ) -> crate::Result<()> {
        use MachineStatus as S;
        let generation = |id: &Uuid| known.get(id).map_or(-1, |(_, g)| *g);
        match repair {
            Repair::MarkStopped { id, reason } => {
                let event = NewEvent {
                    action: "reconcile",
                    message: &reason,
                };
                let _ = self
                    .store
                    .machine_transition(&MachineTransition {
                        desired: Some(DesiredState::Stopped),
                        ..MachineTransition::new(
                            MachineId(id),
                            S::Running,
                            generation(&id),
                            S::Stopped,
                            event,
                        )
                    })
                    .await?;
            }
            Repair::MarkRunning { id } => {
                let message = format!("found running on host {}", host.name);
                let event = NewEvent {
                    action: "reconcile",
                    message: &message,
                };
                let _ = self
                    .store
                    .machine_transition(&MachineTransition {
                        desired: Some(DesiredState::Running),
                        ..MachineTransition::new(
                            MachineId(id),
                            S::Stopped,
                            generation(&id),
                            S::Running,
                            event,
                        )
                    })
                    .await?;
            }
            Repair::MarkFailed { id, reason } => {
                if let Some(&(from, generation)) = known.get(&id) {
                    let _ = self
                        .store
                        .machine_transition(&MachineTransition::failed(
                            MachineId(id),
                            from,
                            generation,
                            "reconcile",
                            &reason,
                        ))
                        .await?;
                }
            }
            Repair::RemoveOrphan { id } => {
                let mut client = self
                    .agents
                    .client(&AgentTarget::from(host))
                    .map_err(|e| crate::Error::Internal(e.message().to_owned()))?;
                let mut request = tonic::Request::new(pb::MachineRef {
                    machine_id: id.to_string(),
                });
                request.set_timeout(Duration::from_secs(120));
                match client.delete_machine(request).await {
                    Ok(_) => {
                        tracing::warn!(host = %host.name, machine = %id, "removed an orphaned domain");
                        let note = format!(
                            "removed its leftover domain from host {} (no live machine owned it)",
                            host.name
                        );
                        self.store
                            .machine_event_any(MachineId(id), "reconcile", &note)
                            .await?;
                    }
                    Err(e) => {
                        tracing::warn!(host = %host.name, machine = %id, error = %e, "could not remove an orphaned domain");
                    }
                }
            }
        }
        Ok(())
    }

    /// Follows one host's events until the stream breaks (the next pass restarts it).
    async fn watch(&self, host: HostRecord) {
        let mut after = 0;
        loop {
            let Ok(mut client) = self.agents.client(&AgentTarget::from(&host)) else {
                return;
            };
            let stream = client
                .watch_events(pb::WatchEventsRequest {
                    after_sequence: after,
                })
                .await;
            let mut stream = match stream {
                Ok(s) => s.into_inner(),
                Err(e) if e.code() == tonic::Code::OutOfRange => {
                    // The agent restarted (or we fell far behind): start over and let a full
                    // pass catch up on what the stream cannot replay.
                    after = 0;
                    if let Err(e) = self.pass_host(&host).await {
                        tracing::warn!(host = %host.name, error = ?e, "resync pass failed");
                    }
                    continue;
                }
                Err(_) => return,
            };
            // Until the stream ends (agent shutting down, fell behind); then resume after the
            // last event seen.
            while let Ok(Some(event)) = stream.message().await {
                after = event.sequence;
                let Ok(id) = Uuid::parse_str(&event.machine_id) else {
                    continue;
                };
                if let Err(e) = self.check_machine(&host, id).await {
                    tracing::warn!(host = %host.name, error = ?e, "reacting to an agent event failed");
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
