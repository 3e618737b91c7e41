//! Workers: claim a due task, renew its lease while working, carry it out one idempotent step
//! at a time, record the outcome. A task that finds its machine no longer in the status it
//! was made for (deleted meanwhile, failed, superseded) ends as done without touching it.
//! Agents are called through `agents::AgentClient`; what an agent's failure means for the task
//! is `policy::classify`, and the database's failures are told apart from the agents'.

pub mod policy;

use crate::agents::client::move_disk;
use crate::agents::{machine_spec, AgentCallError, AgentClient, AgentClients, AgentTarget};
use crate::model::{MachineOnHost, MachineStatus};
use crate::store::machine_move::{MoveEnd, MovePlacement};
use crate::store::machines::{MachineTransition, NewEvent, TaskHost, TaskMachine};
use crate::store::placement::Placement;
use crate::store::tasks::{TaskKind, TaskOutcome, TaskRecord};
use crate::store::Store;
use crate::timing::WorkflowSettings;
use policy::ErrorClass;
use std::sync::Arc;
use std::time::Duration;

/// Aborts the task when dropped: a lease renewer must not outlive the step it renews (a
/// cancelled or panicking worker would otherwise keep its lease forever).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long an idle worker sleeps before looking for work again.
const IDLE: Duration = Duration::from_millis(500);

/// Everything a worker needs; shared by the pool.
#[derive(Debug)]
pub struct Workers {
    store: Store,
    agents: Arc<AgentClients>,
    settings: WorkflowSettings,
    /// This process's identity in task leases.
    owner: String,
}

/// Why a step ended without an outcome of its own. An agent's failure is never one of these:
/// it is an outcome (`Workers::agent_error`).
#[derive(Debug, thiserror::Error)]
enum StepError {
    /// Reading or writing the control plane's records failed.
    #[error("the control plane's database failed during this step")]
    Store(#[from] crate::Error),
    /// The records contradict themselves.
    #[error("the machine is provisioning without a host")]
    NoHost,
}

type Step = Result<TaskOutcome, StepError>;

impl Workers {
    pub fn new(store: Store, agents: Arc<AgentClients>, settings: WorkflowSettings) -> Self {
        let owner = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        Self {
            store,
            agents,
            settings,
            owner,
        }
    }

    /// Runs `settings.workers` loops until the returned handles are aborted.
    pub fn spawn(self: Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        (0..self.settings.workers.max(1))
            .map(|_| {
                let w = Arc::clone(&self);
                tokio::spawn(async move { w.run().await })
            })
            .collect()
    }

    async fn run(&self) {
        loop {
            match self.run_once().await {
                Ok(true) => {}
                Ok(false) => tokio::time::sleep(IDLE).await,
                Err(e) => {
                    tracing::warn!(error = ?e, "worker could not claim or finish a task");
                    tokio::time::sleep(IDLE).await;
                }
            }
        }
    }

    /// Claims and runs one task; false when there was nothing to do.
    pub async fn run_once(&self) -> Result<bool, crate::Error> {
        let lease = chrono::Duration::from_std(self.settings.lease)
            .unwrap_or_else(|_| chrono::Duration::seconds(30));
        let Some(task) = self.store.task_claim(&self.owner, lease).await? else {
            return Ok(false);
        };
        // Renews the lease while the step runs; if the lease is lost (this process stalled
        // past it and another worker took over), the step is abandoned at its next await.
        let (lost_tx, mut lost) = tokio::sync::oneshot::channel::<()>();
        let _renew = AbortOnDrop(tokio::spawn({
            let store = self.store.clone();
            let (id, owner, attempt) = (task.id.clone(), self.owner.clone(), task.attempts);
            let every = self.settings.lease / 3;
            let lease_std = self.settings.lease;
            async move {
                let mut renewed = tokio::time::Instant::now();
                loop {
                    tokio::time::sleep(every).await;
                    // Bounded: a database that does not answer at all must not keep this loop
                    // waiting past the lease.
                    let renewal = tokio::time::timeout(
                        every / 2,
                        store.task_extend(&id, &owner, attempt, lease),
                    )
                    .await
                    .unwrap_or_else(|_| Err(crate::Error::Unavailable("lease renewal timed out")));
                    match renewal {
                        Ok(true) => renewed = tokio::time::Instant::now(),
                        Ok(false) => {
                            let _ = lost_tx.send(());
                            break;
                        }
                        // The database is away. Before our lease can have run out, stop:
                        // another worker may take the task over once it is back, and two
                        // workers must never drive one machine.
                        Err(e) if renewal_overdue(renewed.elapsed(), every, lease_std) => {
                            metrics::counter!("skygate_task_lease_abandoned_total").increment(1);
                            tracing::error!(error = ?e, task = %id,
                                "could not renew the task's lease before it runs out; abandoning the step");
                            let _ = lost_tx.send(());
                            break;
                        }
                        Err(e) => {
                            metrics::counter!("skygate_task_lease_renewal_errors_total")
                                .increment(1);
                            tracing::warn!(error = ?e, task = %id, "lease renewal failed; retrying");
                        }
                    }
                }
            }
        }));
        let outcome = tokio::select! {
            step = self.execute(&task) => match step {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(error = ?e, task = %task.id, "task step failed");
                    TaskOutcome::Retry {
                        after: policy::backoff(task.attempts),
                        error: e.to_string(),
                    }
                }
            },
            _ = &mut lost => {
                tracing::warn!(task = %task.id, "lost the task's lease; abandoning the step");
                return Ok(true);
            }
        };
        tracing::info!(task = %task.id, kind = %task.kind, machine = %task.machine_id,
            attempt = task.attempts, ?outcome, "task attempt finished");
        if !self
            .store
            .task_finish(&task.id, &self.owner, task.attempts, &outcome)
            .await?
        {
            tracing::warn!(task = %task.id, "lost the task's lease before finishing; another worker has it");
        }
        Ok(true)
    }

    async fn execute(&self, task: &TaskRecord) -> Step {
        let Some(m) = self.store.machine_for_task(task.machine_id).await? else {
            return Ok(TaskOutcome::Done);
        };
        if let Some(limit) = policy::deadline(m.status, &self.settings) {
            let age = (self.store.clock().await? - m.status_changed_at)
                .to_std()
                .unwrap_or_default();
            if age > limit {
                let reason = policy::timeout_reason(m.status, limit);
                // A move never fails its machine: it stays on its host.
                if m.status == MachineStatus::Moving {
                    return self.undo_move(task, &m, &reason).await;
                }
                return self.fail(task, &m, &reason).await;
            }
        }
        match task.kind {
            TaskKind::Provision => self.provision(task, m).await,
            TaskKind::Start => {
                self.power(task, m, MachineStatus::Starting, MachineStatus::Running)
                    .await
            }
            TaskKind::Stop => {
                self.power(task, m, MachineStatus::Stopping, MachineStatus::Stopped)
                    .await
            }
            TaskKind::Reboot => {
                self.power(task, m, MachineStatus::Rebooting, MachineStatus::Running)
                    .await
            }
            TaskKind::Delete => self.delete(task, m).await,
            TaskKind::Resize => self.reshape(task, m, MachineStatus::Resizing).await,
            TaskKind::Rebuild => self.reshape(task, m, MachineStatus::Rebuilding).await,
            TaskKind::Move => self.move_machine(task, m).await,
        }
    }

    /// Moves a machine to another host, one idempotent step after another, each attempt
    /// starting from what the hosts say: room claimed on a target; unless the target has the
    /// machine already, stopped on its source, its disk streamed across (checked by SHA-256
    /// there) and its definition released on the source (its disk stays); defined on the
    /// target over the copied disk (never a new one) and powered as desired; recorded; and
    /// only then removed from the source. Until it is recorded, the source keeps the disk and
    /// an undo ([`Workers::undo_move`]) puts the machine back there as it was.
    async fn move_machine(&self, task: &TaskRecord, mut m: TaskMachine) -> Step {
        if m.status != MachineStatus::Moving {
            return Ok(TaskOutcome::Done);
        }
        let Some(source) = m.host.clone() else {
            return self.undo_move(task, &m, "the machine has no host").await;
        };
        if m.move_to.is_none() {
            match self.store.machine_move_place(m.id).await? {
                MovePlacement::Placed { .. } => match self.store.machine_for_task(m.id).await? {
                    Some(again) => m = again,
                    None => return Ok(TaskOutcome::Done),
                },
                MovePlacement::NoRoom(why) => {
                    let note = format!("waiting for room on another host: {why}");
                    self.store.machine_note(m.id, "move", &note).await?;
                    return Ok(TaskOutcome::Retry {
                        after: Duration::from_secs(5),
                        error: note,
                    });
                }
                MovePlacement::NotMoving => return Ok(TaskOutcome::Done),
            }
        }
        let Some(target) = m.move_to.clone() else {
            // Its target went away between the claim and this read (a host deleted): choose
            // again.
            return Ok(TaskOutcome::Retry {
                after: Duration::from_millis(200),
                error: "the move's target is gone; choosing another".into(),
            });
        };
        if !target.reachable {
            return self.wait_for_host(task, &m, &target.name).await;
        }
        let spec = match machine_spec(&m) {
            Ok(s) => s,
            Err(problem) => return self.undo_move(task, &m, &problem.to_string()).await,
        };
        let to = match self.client(&target) {
            Ok(to) => to,
            Err(e) => return self.move_error(task, &m, e).await,
        };
        // Defined there by an earlier attempt of this move (an undone move leaves no domain
        // there): the copy is made and the source released, so the move is finished from the
        // target alone, whatever the source says or whether it answers.
        let defined_there = match to.get(m.id).await {
            Ok(state) => state.phase != crate::model::PhaseOnHost::Absent,
            Err(e) if e.is_gone() => false,
            Err(e) => return self.move_error(task, &m, e).await,
        };
        if !defined_there {
            if !source.reachable {
                return self.wait_for_host(task, &m, &source.name).await;
            }
            let from = match self.client(&source) {
                Ok(from) => from,
                Err(e) => return self.move_error(task, &m, e).await,
            };
            // Released by an earlier attempt: its disk is still there, without a domain.
            let defined_here = match from.get(m.id).await {
                Ok(state) => state.phase != crate::model::PhaseOnHost::Absent,
                Err(e) if e.is_gone() => false,
                Err(e) => return self.move_error(task, &m, e).await,
            };
            if defined_here {
                if let Err(e) = from.stop(m.id).await {
                    return self.move_error(task, &m, e).await;
                }
                let note = format!("stopped on host {} for its move", source.name);
                self.store.machine_note(m.id, "move", &note).await?;
            }
            let note = format!(
                "copying its disk from host {} to host {}",
                source.name, target.name
            );
            self.store.machine_note(m.id, "move", &note).await?;
            match move_disk(&from, &to, m.id, &spec).await {
                Ok(bytes) => tracing::info!(machine = %m.id, bytes, from = %source.name,
                    to = %target.name, "disk moved"),
                Err(e) => return self.move_error(task, &m, e).await,
            }
            // The source gives up the machine's name and UUID, which a hypervisor it shares
            // with the target would not define twice; its disk stays until the move is
            // recorded (an undo defines it there again).
            if let Err(e) = from.release(m.id).await {
                return self.move_error(task, &m, e).await;
            }
            let note = format!(
                "released on host {} (its disk stays there until the move is done)",
                source.name
            );
            self.store.machine_note(m.id, "move", &note).await?;
        }
        match self.finish_move(&m, &source, &target, spec).await {
            Ok(step) => step,
            Err(e) => self.move_error(task, &m, e).await,
        }
    }

    /// Defines a moved machine on its target over the copied disk (never a new one), records
    /// the move, and only then removes the source's copy. The target's refusal is the
    /// caller's to judge.
    async fn finish_move(
        &self,
        m: &TaskMachine,
        source: &TaskHost,
        target: &TaskHost,
        spec: crate::agents::AgentSpec,
    ) -> Result<Step, AgentCallError> {
        let state = match self.client(target) {
            Ok(to) => to.ensure(spec.with_existing_disk()).await?,
            Err(e) => return Err(e),
        };
        let to_status = if state.phase == crate::model::PhaseOnHost::Running {
            MachineStatus::Running
        } else {
            MachineStatus::Stopped
        };
        let message = format!(
            "moved from host {} to host {}; {to_status}",
            source.name, target.name
        );
        let recorded = match self
            .store
            .machine_move_done(&MoveEnd {
                id: m.id,
                version: m.version,
                source: &source.id,
                target: Some(&target.id),
                to: to_status,
                network: Some(&state.network),
                message: &message,
            })
            .await
        {
            Ok(recorded) => recorded,
            Err(e) => return Ok(Err(e.into())),
        };
        if !recorded {
            return Ok(Ok(again_unless(false, "moving")));
        }
        // Recorded on the target: the source's copy may go. One it cannot remove now (it does
        // not answer, say) stays there as files without a domain, which its agent keeps and
        // reports (never a disk removed before the move is recorded).
        let removed: Result<(), String> = if source.reachable {
            match self.client(source) {
                Ok(from) => from
                    .delete(m.id)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        } else {
            Err("its host does not answer".to_owned())
        };
        match removed {
            Ok(()) => {
                let note = format!("removed from host {}", source.name);
                if let Err(e) = self.store.machine_event_any(m.id, "move", &note).await {
                    return Ok(Err(e.into()));
                }
            }
            Err(e) => tracing::warn!(machine = %m.id, host = %source.name, error = %e,
                "could not remove a moved machine's old copy; its files stay on that host"),
        }
        Ok(Ok(TaskOutcome::Done))
    }

    /// An agent's error during a move: written where the tenant reads it, then tried again (a
    /// refusal at once, anything else after [`policy::MAX_STEP_FAILURES`] failures or the
    /// status's deadline undoes the move).
    async fn move_error(&self, task: &TaskRecord, m: &TaskMachine, error: AgentCallError) -> Step {
        let said = policy::tenant_text(&error.to_string());
        let cause = policy::tenant_text(&error.said());
        tracing::warn!(task = %task.id, machine = %m.id, error = ?error, "move step failed");
        let what = format!("{said}: {cause}");
        if policy::classify(&error) == ErrorClass::Permanent {
            return self.undo_move(task, m, &what).await;
        }
        let failures = task.step_failures + 1;
        match policy::step_retry(failures) {
            Some(after) => {
                let note = format!(
                    "{what}; attempt {failures} of {}, trying again in {} s",
                    policy::MAX_STEP_FAILURES,
                    after.as_secs()
                );
                self.store.machine_note(m.id, "move", &note).await?;
                Ok(TaskOutcome::StepFailed { after, error: what })
            }
            None => {
                let reason = format!("{what}; gave up after {failures} attempts");
                self.undo_move(task, m, &reason).await
            }
        }
    }

    /// Undoes a move, in an order that never loses the machine nor runs it twice: a target
    /// that has the machine defined already has a complete copy, which may have run and been
    /// written to, so the move is finished instead; otherwise the source defines the machine
    /// again over its own disk (never a new one) and powers it as desired, the undo is
    /// recorded, and then the target's files (an import, no domain) are removed. A host that
    /// does not answer, or a step that fails, leaves the machine `moving` and the undo is
    /// tried again (the task's next attempt moves it, or undoes it, from what the hosts say).
    async fn undo_move(&self, task: &TaskRecord, m: &TaskMachine, reason: &str) -> Step {
        let undoing = format!("undoing the move: {reason}");
        self.store.machine_note(m.id, "move", &undoing).await?;
        let again = |what: String| TaskOutcome::Retry {
            after: policy::backoff(task.attempts),
            error: what,
        };
        let Some(source) = m.host.clone() else {
            return Ok(again("the machine has no host".into()));
        };
        if let Some(target) = &m.move_to {
            if !target.reachable {
                return self.wait_for_host(task, m, &target.name).await;
            }
            let defined_there = match self.client(target) {
                Ok(to) => to.get(m.id).await,
                Err(e) => Err(e),
            };
            match defined_there {
                Ok(state) if state.phase != crate::model::PhaseOnHost::Absent => {
                    let note = format!(
                        "its copy on host {} is complete: finishing the move instead",
                        target.name
                    );
                    self.store.machine_note(m.id, "move", &note).await?;
                    return match machine_spec(m) {
                        Ok(spec) => match self.finish_move(m, &source, target, spec).await {
                            Ok(step) => step,
                            Err(e) => Ok(again(policy::tenant_text(&e.said()))),
                        },
                        Err(problem) => Ok(again(problem.to_string())),
                    };
                }
                Ok(_) => {}
                Err(e) if e.is_gone() => {}
                Err(e) => return Ok(again(policy::tenant_text(&e.said()))),
            }
        }
        if !source.reachable {
            return self.wait_for_host(task, m, &source.name).await;
        }
        let restored = match (self.client(&source), machine_spec(m)) {
            (Ok(client), Ok(spec)) => client
                .ensure(spec.with_existing_disk())
                .await
                .map_err(|e| policy::tenant_text(&e.said())),
            (Err(e), _) => Err(policy::tenant_text(&e.said())),
            (_, Err(problem)) => Err(problem.to_string()),
        };
        let state = match restored {
            Ok(state) => state,
            Err(why) => {
                let note = format!(
                    "could not define it again on host {}: {why}; trying again",
                    source.name
                );
                self.store.machine_note(m.id, "move", &note).await?;
                return Ok(again(note));
            }
        };
        let to = if state.phase == crate::model::PhaseOnHost::Running {
            MachineStatus::Running
        } else {
            MachineStatus::Stopped
        };
        let message = format!(
            "move failed: {reason}; the machine stays on host {}",
            source.name
        );
        let recorded = self
            .store
            .machine_move_undo(&MoveEnd {
                id: m.id,
                version: m.version,
                source: &source.id,
                target: m.move_to.as_ref().map(|t| t.id.as_str()),
                to,
                network: Some(&state.network),
                message: &message,
            })
            .await?;
        if !recorded {
            return Ok(again_unless(false, "moving"));
        }
        // The target's leftovers (an imported disk, no domain): one it cannot remove now stays
        // there as files, which its agent keeps and reports; nothing there can run.
        if let Some(target) = m.move_to.as_ref().filter(|t| t.reachable) {
            if let Ok(to) = self.client(target) {
                if let Err(e) = to.delete(m.id).await {
                    tracing::warn!(machine = %m.id, host = %target.name, error = ?e,
                        "could not remove an undone move's copy; its files stay on that host");
                }
            }
        }
        tracing::warn!(task = %task.id, machine = %m.id, reason, "move undone");
        Ok(TaskOutcome::Failed(reason.to_owned()))
    }

    /// Resize and rebuild: the machine's new spec (a newer generation) sent to its host, which
    /// redefines it (and grows or replaces its disk); it ends as the agent leaves it, stopped
    /// or running as desired.
    async fn reshape(&self, task: &TaskRecord, m: TaskMachine, during: MachineStatus) -> Step {
        if m.status != during {
            return Ok(TaskOutcome::Done);
        }
        let Some(host) = m.host.clone() else {
            return self.fail(task, &m, "the machine has no host").await;
        };
        let what = match task.kind {
            TaskKind::Rebuild => format!("rebuilt on host {}", host.name),
            _ => format!(
                "resized on host {} to {} vCPUs, {} MiB of memory, {} GiB of disk",
                host.name, m.size.vcpus, m.size.memory_mib, m.size.disk_gib
            ),
        };
        self.ensure_and_record(task, &m, &host, &what).await
    }

    /// Sends machine `m`'s spec to its host and records what the agent left (`what` happened,
    /// in the event); an agent's failure is judged by [`Workers::agent_error`].
    async fn ensure_and_record(
        &self,
        task: &TaskRecord,
        m: &TaskMachine,
        host: &TaskHost,
        what: &str,
    ) -> Step {
        if !host.reachable {
            return self.wait_for_host(task, m, &host.name).await;
        }
        let spec = match machine_spec(m) {
            Ok(s) => s,
            Err(problem) => return self.fail(task, m, &problem.to_string()).await,
        };
        let ensured = match self.client(host) {
            Ok(client) => client.ensure(spec).await,
            Err(e) => Err(e),
        };
        match ensured {
            Ok(state) => self.record_ensured(task, m, &state, what).await,
            Err(e) => self.agent_error(task, m, &host.name, e).await,
        }
    }

    async fn provision(&self, task: &TaskRecord, mut m: TaskMachine) -> Step {
        if m.status == MachineStatus::Pending {
            // Read before the attempt: a change after it wakes the task (see WaitForCapacity).
            let seen_epoch = self.store.capacity_epoch().await?;
            match self.store.machine_place(m.id).await? {
                Placement::Placed { .. } | Placement::NotPending => {
                    match self.store.machine_for_task(m.id).await? {
                        Some(again) => m = again,
                        None => return Ok(TaskOutcome::Done),
                    }
                }
                Placement::NoRoom(why) => {
                    let note = format!("waiting for capacity: {why}");
                    self.store.machine_note(m.id, "schedule", &note).await?;
                    // Until capacity changes, or the placement deadline (checked on waking).
                    let waited = (self.store.clock().await? - m.status_changed_at)
                        .to_std()
                        .unwrap_or_default();
                    let at_most = self
                        .settings
                        .placement_timeout
                        .saturating_sub(waited)
                        .max(Duration::from_secs(1));
                    return Ok(TaskOutcome::WaitForCapacity {
                        seen_epoch,
                        at_most,
                        error: note,
                    });
                }
            }
        }
        if m.status != MachineStatus::Provisioning {
            return Ok(TaskOutcome::Done);
        }
        let Some(host) = m.host.clone() else {
            return Err(StepError::NoHost);
        };
        let what = format!("provisioned on host {}", host.name);
        self.ensure_and_record(task, &m, &host, &what).await
    }

    /// Records what an EnsureMachine left of machine `m`: from its status as read to running
    /// or stopped, as the agent reports it, with `what` happened in the event.
    async fn record_ensured(
        &self,
        task: &TaskRecord,
        m: &TaskMachine,
        state: &MachineOnHost,
        what: &str,
    ) -> Step {
        let to = if state.phase == crate::model::PhaseOnHost::Running {
            MachineStatus::Running
        } else {
            MachineStatus::Stopped
        };
        let message = format!("{what}; {to}");
        let event = NewEvent {
            action: task.kind.as_str(),
            message: &message,
        };
        Ok(self
            .store
            .machine_transition(&MachineTransition {
                network: Some(&state.network),
                ..MachineTransition::new(m.id, m.status, m.version, to, event)
            })
            .await
            .map(|settled| again_unless(settled.applied(), m.status.as_str()))?)
    }

    /// Start, stop and reboot: one agent call from `during` to `to`.
    async fn power(
        &self,
        task: &TaskRecord,
        m: TaskMachine,
        during: MachineStatus,
        to: MachineStatus,
    ) -> Step {
        if m.status != during {
            return Ok(TaskOutcome::Done);
        }
        let Some(host) = m.host.clone() else {
            return self.fail(task, &m, "the machine has no host").await;
        };
        if !host.reachable {
            return self.wait_for_host(task, &m, &host.name).await;
        }
        let result = match self.client(&host) {
            Ok(client) => self.power_call(&client, task, m.id).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(state) => {
                let message = format!("{} on host {}", to, host.name);
                let event = NewEvent {
                    action: task.kind.as_str(),
                    message: &message,
                };
                Ok(self
                    .store
                    .machine_transition(&MachineTransition {
                        network: Some(&state.network),
                        ..MachineTransition::new(m.id, during, m.version, to, event)
                    })
                    .await
                    .map(|settled| again_unless(settled.applied(), during.as_str()))?)
            }
            Err(e) if e.is_gone() => {
                let reason = format!("its domain is gone from host {}", host.name);
                self.fail(task, &m, &reason).await
            }
            Err(e) => self.agent_error(task, &m, &host.name, e).await,
        }
    }

    async fn power_call(
        &self,
        client: &AgentClient,
        task: &TaskRecord,
        id: crate::model::MachineId,
    ) -> Result<MachineOnHost, AgentCallError> {
        match task.kind {
            TaskKind::Start => client.start(id).await,
            TaskKind::Stop => client.stop(id).await,
            // The task id is stable across this task's attempts: a retry after the agent
            // already rebooted (we died before recording it) does not reboot again.
            _ => client.reboot(id, &task.id.to_string()).await,
        }
    }

    async fn delete(&self, task: &TaskRecord, m: TaskMachine) -> Step {
        if m.status != MachineStatus::Deleting {
            return Ok(TaskOutcome::Done);
        }
        if let Some(host) = m.host.clone() {
            if !host.reachable {
                return self.wait_for_host(task, &m, &host.name).await;
            }
            let deleted = match self.client(&host) {
                Ok(client) => client.delete(m.id).await,
                Err(e) => Err(e),
            };
            if let Err(e) = deleted {
                return self.agent_error(task, &m, &host.name, e).await;
            }
        }
        let _ = self
            .store
            .machine_transition(&MachineTransition::new(
                m.id,
                MachineStatus::Deleting,
                m.version,
                MachineStatus::Deleted,
                NewEvent {
                    action: "delete",
                    message: "deleted; nothing left on the host",
                },
            ))
            .await?;
        Ok(TaskOutcome::Done)
    }

    fn client(&self, host: &TaskHost) -> Result<AgentClient, AgentCallError> {
        self.agents.client(&AgentTarget::from(host))
    }

    async fn wait_for_host(&self, task: &TaskRecord, m: &TaskMachine, host: &str) -> Step {
        let note = format!("waiting for host {host}, which is unreachable");
        self.store
            .machine_note(m.id, task.kind.as_str(), &note)
            .await?;
        Ok(TaskOutcome::Retry {
            after: Duration::from_secs(5),
            error: note,
        })
    }

    async fn fail(&self, task: &TaskRecord, m: &TaskMachine, reason: &str) -> Step {
        let _ = self
            .store
            .machine_transition(&MachineTransition::failed(
                m.id,
                m.status,
                m.version,
                task.kind.as_str(),
                reason,
            ))
            .await?;
        Ok(TaskOutcome::Failed(reason.to_owned()))
    }

    /// What an agent's error means for the task, written where the tenant reads it: every
    /// attempt that failed leaves an event naming the step and the cause (host paths cut), so
    /// a machine never sits in a transitional status without saying why.
    ///
    /// - A refusal (the request as such is wrong) fails the machine at once.
    /// - A failed step (the agent ran it and named it) is retried
    ///   [`policy::MAX_STEP_FAILURES`] times in all, then the machine fails with its reason.
    /// - Anything else (the host not answering, a race) is retried until the status's
    ///   deadline.
    async fn agent_error(
        &self,
        task: &TaskRecord,
        m: &TaskMachine,
        host: &str,
        error: AgentCallError,
    ) -> Step {
        let said = policy::tenant_text(&error.said());
        tracing::warn!(task = %task.id, machine = %m.id, host, error = ?error,
            "agent call failed");
        let action = task.kind.as_str();
        match policy::classify(&error) {
            ErrorClass::Permanent => {
                return self
                    .fail(task, m, &format!("host {host} refused it: {said}"))
                    .await;
            }
            ErrorClass::Step => {
                let failures = task.step_failures + 1;
                let what = format!("{said} (host {host})");
                return match policy::step_retry(failures) {
                    Some(after) => {
                        let note = format!(
                            "{what}; attempt {failures} of {}, trying again in {} s",
                            policy::MAX_STEP_FAILURES,
                            after.as_secs()
                        );
                        self.store.machine_note(m.id, action, &note).await?;
                        Ok(TaskOutcome::StepFailed { after, error: what })
                    }
                    None => {
                        let reason = format!("{what}; gave up after {failures} attempts");
                        self.fail(task, m, &reason).await
                    }
                };
            }
            ErrorClass::Transient => {}
        }
        let what = match error.code() {
            Some(code) => {
                format!("host {host} did not complete it ({code:?}: {said}); trying again")
            }
            None => format!("could not call host {host} ({said}); trying again"),
        };
        self.store.machine_note(m.id, action, &what).await?;
        Ok(TaskOutcome::Retry {
            after: policy::backoff(task.attempts),
            error: what,
        })
    }
}

/// Whether a lease last renewed `since_renewal` ago may run out before the next renewal
/// attempt (`every` from now, taking up to `every / 2`) has answered: then the step must stop
/// now, not when another worker already has the task.
fn renewal_overdue(since_renewal: Duration, every: Duration, lease: Duration) -> bool {
    since_renewal + every + every / 2 >= lease
}

/// After an agent call: done when the outcome was recorded; otherwise the machine changed
/// while the agent worked (a tenant's stop during provisioning, say), and the next attempt
/// re-reads it and acts on what it is now (or ends, if it left `what`).
fn again_unless(settled: bool, what: &str) -> TaskOutcome {
    if settled {
        TaskOutcome::Done
    } else {
        TaskOutcome::Retry {
            after: Duration::from_millis(200),
            error: format!("the machine changed while it was {what}; acting on it again"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_renewal_is_retried_while_the_lease_lasts_then_the_step_stops() {
        let lease = Duration::from_secs(30);
        let every = lease / 3;
        // A failure answered 10 s after the last renewal: the next try (at 20 s, answered by
        // 25 s at the latest) still ends inside the lease.
        assert!(!renewal_overdue(every, every, lease));
        // A timed-out try, given up 15 s after: the next one could answer at 30 s, too late.
        assert!(renewal_overdue(every + every / 2, every, lease));
        assert!(renewal_overdue(every * 2, every, lease));
    }
}
