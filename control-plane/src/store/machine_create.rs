//! Creating machines, many per transaction (group commit).
//!
//! A create writes a machine, its first event and its provision task, checks the hostname and
//! adds to its owner's total under a lock on that total. One transaction per create made one
//! tenant's creates take turns through every statement and every commit (issue 12: 508/s on
//! SQLite, 309/s on PostgreSQL, p99 over 100 ms). Here creates that arrive while a transaction
//! is running queue up, and the next transaction takes all of them (up to [`MAX_BATCH`]): one
//! lock, one hostname query per owner, one multi-row insert per table and one commit for the
//! lot. Each create is still judged on its own, in arrival order: a taken hostname or a spent
//! quota refuses that create only. A lone create is not delayed: a batch is whatever is
//! waiting, possibly one.
//!
//! If a batch's transaction fails as a whole (a database error, or a hostname another replica
//! took in the meantime), nothing of it was written and each create runs again alone, so one
//! bad create cannot fail its neighbours. (A COMMIT that succeeded but whose answer was lost
//! is the exception: the re-run finds each name taken by its own machine and answers 409 —
//! clients that must know use an Idempotency-Key.) A create whose client went away while it
//! waited in the queue is still written, as one whose answer was lost would be.

use super::machines::{label_rows_insert_in_txn, labels_json, NewMachine};
use super::tasks::database_now;
use super::usage::{usage_add_in_txn, usage_lock_in_txn};
use super::{begin_write_on, is_unique_violation, placeholders, Backend};
use crate::error::{Error, Result};
use crate::model::{DesiredState, Machine, MachineId, MachineStatus, Quota, Usage, UserId};
use sqlx::{Any, AnyPool, Row, Transaction};
use std::collections::{HashMap, HashSet};
use tokio::sync::{mpsc, oneshot};

/// Most creates in one transaction: bounds the statement size (12 parameters a machine) and
/// how long the owner's total stays locked.
const MAX_BATCH: usize = 64;

/// Creates waiting for the writer; beyond this, callers wait to queue (backpressure).
const QUEUE: usize = 1024;

/// The first line of every machine's log.
const CREATED_MESSAGE: &str = "machine requested; waiting for a host";

struct Job {
    new: NewMachine,
    quota: Quota,
    answer: oneshot::Sender<Result<Machine>>,
}

/// The queue in front of the create writer; the writer ends when the last handle goes.
#[derive(Debug, Clone)]
pub(crate) struct CreateQueue {
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("owner", &self.new.owner_id)
            .finish_non_exhaustive()
    }
}

impl CreateQueue {
    /// Starts the writer over `pool` (the write pool).
    pub(crate) fn start(pool: AnyPool, backend: Backend) -> Self {
        let (jobs, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write(pool, backend, rx));
        Self { jobs }
    }

    /// Creates one machine: waits for the batch it lands in to commit.
    pub(crate) async fn create(&self, new: NewMachine, quota: Quota) -> Result<Machine> {
        let (answer, answered) = oneshot::channel();
        self.jobs
            .send(Job { new, quota, answer })
            .await
            .map_err(|_| Error::Unavailable("the create writer has stopped"))?;
        answered
            .await
            .map_err(|_| Error::Unavailable("the create writer has stopped"))?
    }
}

async fn write(pool: AnyPool, backend: Backend, mut jobs: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let taken = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
        metrics::histogram!("skygate_create_batch_size").record(taken.len() as f64);
        run_batch(&pool, backend, taken).await;
    }
}

/// One transaction for `jobs`; alone for each if it fails as a whole.
async fn run_batch(pool: &AnyPool, backend: Backend, jobs: Vec<Job>) {
    if jobs.len() > 1 {
        let creates: Vec<(&NewMachine, &Quota)> = jobs.iter().map(|j| (&j.new, &j.quota)).collect();
        match in_own_txn(pool, backend, &creates).await {
            Ok(answers) => {
                for (job, answer) in jobs.into_iter().zip(answers) {
                    let _ = job.answer.send(answer);
                }
                return;
            }
            Err(e) => {
                tracing::debug!(error = ?e, size = jobs.len(), "a create batch failed; running its creates alone");
            }
        }
    }
    for job in jobs {
        let answer = in_own_txn(pool, backend, &[(&job.new, &job.quota)])
            .await
            .and_then(only);
        let _ = job.answer.send(answer);
    }
}

/// [`creates_in_txn`] in a transaction of its own, committed.
async fn in_own_txn(
    pool: &AnyPool,
    backend: Backend,
    creates: &[(&NewMachine, &Quota)],
) -> Result<Vec<Result<Machine>>> {
    let mut tx = begin_write_on(pool, backend).await?;
    let answers = creates_in_txn(&mut tx, backend, creates).await?;
    tx.commit().await?;
    Ok(answers)
}

/// The answer of a batch of one.
pub(crate) fn only(mut answers: Vec<Result<Machine>>) -> Result<Machine> {
    answers
        .pop()
        .unwrap_or_else(|| Err(Error::Internal("a create was not answered".into())))
}

/// What one owner's creates in a batch hold: the locked total and the live hostnames met.
struct OwnerState {
    usage: Usage,
    added: Usage,
    taken: HashMap<String, MachineId>,
}

/// `creates` inside `tx`: each one's answer, in order, or an error for the whole (then `tx`
/// must be dropped: what it wrote is not to be committed). A create with an Idempotency-Key
/// is a batch of one in its key's transaction.
pub(crate) async fn creates_in_txn(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    creates: &[(&NewMachine, &Quota)],
) -> Result<Vec<Result<Machine>>> {
    let now = database_now(backend, &mut **tx).await?;
    // Each owner locked once, in id order (two replicas' batches locking the same owners in
    // different orders would deadlock); then their hostnames in one query each.
    let mut order: Vec<UserId> = creates.iter().map(|(new, _)| new.owner_id).collect();
    order.sort_by_key(ToString::to_string);
    order.dedup();
    let mut owners: HashMap<UserId, OwnerState> = HashMap::new();
    for owner in order {
        let usage = usage_lock_in_txn(tx, backend, owner).await?;
        let names: HashSet<&str> = creates
            .iter()
            .filter(|(new, _)| new.owner_id == owner)
            .map(|(new, _)| new.hostname.as_str())
            .collect();
        let taken = live_hostnames_in_txn(tx, owner, &names).await?;
        owners.insert(
            owner,
            OwnerState {
                usage,
                added: Usage::default(),
                taken,
            },
        );
    }
    // Judge each create in order against what the ones before it left.
    let mut answers: Vec<Option<Result<Machine>>> = Vec::with_capacity(creates.len());
    let mut accepted: Vec<(usize, MachineId)> = Vec::new();
    for (i, (new, quota)) in creates.iter().enumerate() {
        let Some(state) = owners.get_mut(&new.owner_id) else {
            return Err(Error::Internal("a create's owner was not locked".into()));
        };
        if let Some(existing) = state.taken.get(new.hostname.as_str()) {
            answers.push(Some(Err(Error::HostnameTaken {
                hostname: new.hostname.to_string(),
                existing: *existing,
            })));
            continue;
        }
        let asked = Usage {
            machines: 1,
            vcpus: new.vcpus,
            memory_mib: new.memory_mib,
        };
        if let Err(why) = quota.admits(state.usage.plus(state.added), asked) {
            answers.push(Some(Err(Error::QuotaExceeded(why))));
            continue;
        }
        let id = MachineId::new();
        state.added = state.added.plus(asked);
        state.taken.insert(new.hostname.to_string(), id);
        accepted.push((i, id));
        answers.push(None);
    }
    if accepted.is_empty() {
        return Ok(answers.into_iter().flatten().collect());
    }
    for (owner, state) in &owners {
        if state.added.machines > 0 {
            usage_add_in_txn(tx, *owner, state.added).await?;
        }
    }
    let seqs = insert_machines_in_txn(tx, creates, &accepted, now).await?;
    insert_first_events_in_txn(tx, &accepted, now).await?;
    insert_provision_tasks_in_txn(tx, &accepted, now).await?;
    for (i, id) in &accepted {
        label_rows_insert_in_txn(tx, *id, &creates[*i].0.labels).await?;
    }
    for (i, id) in &accepted {
        let seq = *seqs
            .get(id)
            .ok_or_else(|| Error::Internal(format!("no seq returned for machine {id}")))?;
        answers[*i] = Some(Ok(created(creates[*i].0, *id, seq, now)));
    }
    Ok(answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(Error::Internal("a create was not answered".into()))))
        .collect())
}

/// Which of `names` are live machines of `owner` already, and their ids.
///
/// One exact lookup of the `(owner_id, hostname)` index per name, joined by `UNION ALL`.
/// Asked as `hostname IN (...)`, PostgreSQL looked the owner up in that index and filtered
/// every one of the owner's machines by name whenever its statistics said the owner had few
/// (as they do while a new tenant creates thousands): each batch read them all, and creates
/// slowed as the tenant grew (issue 12: 2,200/s, then 1,300/s, then 1,000/s in three
/// six-second runs).
async fn live_hostnames_in_txn(
    tx: &mut Transaction<'static, Any>,
    owner: UserId,
    names: &HashSet<&str>,
) -> Result<HashMap<String, MachineId>> {
    let lookups: Vec<String> = (0..names.len())
        .map(|n| {
            format!(
                "SELECT hostname, id FROM machines WHERE owner_id = $1 AND hostname = ${} \
                 AND deleted_at IS NULL",
                n + 2
            )
        })
        .collect();
    let sql = lookups.join(" UNION ALL ");
    let mut query = sqlx::query(&sql).bind(owner.to_string());
    for name in names {
        query = query.bind(*name);
    }
    let mut taken = HashMap::new();
    for row in query.fetch_all(&mut **tx).await? {
        let id: String = row.try_get("id")?;
        taken.insert(
            row.try_get("hostname")?,
            super::parse_col(&id, "machines.id")?,
        );
    }
    Ok(taken)
}

const MACHINE_COLUMNS: usize = 14;

/// The accepted machines in one statement; their `seq` by id.
async fn insert_machines_in_txn(
    tx: &mut Transaction<'static, Any>,
    creates: &[(&NewMachine, &Quota)],
    accepted: &[(usize, MachineId)],
    now: i64,
) -> Result<HashMap<MachineId, i64>> {
    // Fourteen parameters a row; the last (the time) also fills updated_at and status_changed_at.
    let rows: Vec<String> = (0..accepted.len())
        .map(|r| {
            let first = 1 + r * MACHINE_COLUMNS;
            let at = first + MACHINE_COLUMNS - 1;
            let list = placeholders(first, MACHINE_COLUMNS);
            format!("{}, ${at}, ${at})", &list[..list.len() - 1])
        })
        .collect();
    let sql = format!(
        "INSERT INTO machines (id, owner_id, hostname, status, desired_state, image_id, vcpus, \
         memory_mib, disk_gib, ssh_keys, user_data, restart_policy, labels, created_at, \
         updated_at, status_changed_at) \
         VALUES {} RETURNING id, seq",
        rows.join(", ")
    );
    let mut query = sqlx::query(&sql);
    for (i, id) in accepted {
        let new = creates[*i].0;
        let keys = serde_json::to_string(&new.ssh_keys)
            .map_err(|e| Error::Internal(format!("ssh keys to JSON: {e}")))?;
        query = query
            .bind(id.to_string())
            .bind(new.owner_id.to_string())
            .bind(new.hostname.to_string())
            .bind(MachineStatus::Pending.as_str())
            .bind(DesiredState::Running.as_str())
            .bind(new.image_id.to_string())
            .bind(new.vcpus)
            .bind(new.memory_mib)
            .bind(new.disk_gib)
            .bind(keys)
            .bind(new.user_data.clone())
            .bind(new.restart_policy.as_str())
            .bind(labels_json(&new.labels)?)
            .bind(now);
    }
    let rows = match query.fetch_all(&mut **tx).await {
        Ok(rows) => rows,
        // Another replica took a hostname since we looked (the lock is per owner and per
        // replica's transaction, not across replicas' creates): still 409, not 500. A batch
        // of many runs again, alone each, to say which.
        Err(e) if is_unique_violation(&e) => {
            return Err(Error::Conflict(match accepted {
                [(i, _)] => format!(
                    "a machine named '{}' already exists",
                    creates[*i].0.hostname
                ),
                _ => "a hostname was taken meanwhile".into(),
            }))
        }
        Err(e) => return Err(e.into()),
    };
    let mut seqs = HashMap::with_capacity(rows.len());
    for row in rows {
        let id: String = row.try_get("id")?;
        seqs.insert(super::parse_col(&id, "machines.id")?, row.try_get("seq")?);
    }
    Ok(seqs)
}

async fn insert_first_events_in_txn(
    tx: &mut Transaction<'static, Any>,
    accepted: &[(usize, MachineId)],
    now: i64,
) -> Result<()> {
    // Action, status, message and time are shared ($1-$4); one machine id a row from $5.
    let values: Vec<String> = (0..accepted.len())
        .map(|r| format!("(${}, $1, $2, $3, $4)", 5 + r))
        .collect();
    let sql = format!(
        "INSERT INTO machine_events (machine_id, action, status, message, created_at) VALUES {}",
        values.join(", ")
    );
    let mut query = sqlx::query(&sql)
        .bind("create")
        .bind(MachineStatus::Pending.as_str())
        .bind(CREATED_MESSAGE)
        .bind(now);
    for (_, id) in accepted {
        query = query.bind(id.to_string());
    }
    query.execute(&mut **tx).await?;
    Ok(())
}

async fn insert_provision_tasks_in_txn(
    tx: &mut Transaction<'static, Any>,
    accepted: &[(usize, MachineId)],
    now: i64,
) -> Result<()> {
    // Two parameters a row (task id, machine id); kind and time are shared.
    let values: Vec<String> = (0..accepted.len())
        .map(|r| {
            format!(
                "(${}, ${}, $1, 'queued', 0, $2, $2, $2)",
                3 + 2 * r,
                4 + 2 * r
            )
        })
        .collect();
    let sql = format!(
        "INSERT INTO tasks (id, machine_id, kind, state, attempts, run_after, created_at, \
         updated_at) VALUES {}",
        values.join(", ")
    );
    let mut query = sqlx::query(&sql)
        .bind(crate::model::TaskKind::Provision.as_str())
        .bind(now);
    for (_, id) in accepted {
        query = query
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(id.to_string());
    }
    query.execute(&mut **tx).await?;
    Ok(())
}

/// The machine as its create left it (what reading it back would show).
fn created(new: &NewMachine, id: MachineId, seq: i64, now: i64) -> Machine {
    let at = super::from_micros(now);
    Machine {
        seq,
        id,
        owner_id: new.owner_id,
        hostname: new.hostname.to_string(),
        status: MachineStatus::Pending,
        desired: DesiredState::Running,
        host_name: None,
        host_state: None,
        image_name: new.image_name.clone(),
        vcpus: new.vcpus,
        memory_mib: new.memory_mib,
        disk_gib: new.disk_gib,
        network: None,
        failure_reason: None,
        restart_policy: new.restart_policy,
        labels: new.labels.clone(),
        created_at: at,
        updated_at: at,
    }
}
