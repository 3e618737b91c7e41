//! Machines: the `machines` table. Tenants' requests (create, read, list, lifecycle
//! requests), what workers read to act on a machine, and the one writer of observed
//! transitions. Every status change is written together with its event row
//! (`machine_events`) in one transaction, and every write moves the row's `version` on.
//!
//! Two numbers, kept apart as neon's storage controller keeps them: `version` is the row's
//! compare-and-swap guard (bumped by every write, so a writer who read the row earlier
//! changes nothing if anyone wrote since); `spec_generation` is what agents are sent and
//! moves only when what they build changes, so a status change never makes an agent
//! rebuild a domain.

use super::hosts::allocation_release_in_txn;
use super::idempotency::{complete_in_txn, ClaimedKey};
use super::machine_create::{creates_in_txn, only};
use super::machine_events::event_in_txn;
use super::tasks::{capacity_changed_in_txn, enqueue_in_txn};
use super::usage::usage_release_in_txn;
use super::{from_micros, parse_col, to_micros, Backend, Store};
use crate::error::{Error, Result};
use crate::model::machine_state::{self, Action};
use crate::model::scheduler::Resources;
use crate::model::tasks::{self, FollowUp};
use crate::model::{
    DesiredState, Hostname, ImageId, KernelBoot, Machine, MachineId, MachineNetwork, MachineStatus,
    Quota, RestartPolicy, UserId,
};
use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use std::collections::BTreeMap;

/// A validated request for a new machine.
#[derive(Debug, Clone)]
pub struct NewMachine {
    pub owner_id: UserId,
    pub hostname: Hostname,
    pub image_id: ImageId,
    /// The image's name, as the created machine shows it.
    pub image_name: String,
    pub vcpus: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
    pub ssh_keys: Vec<String>,
    pub user_data: Option<String>,
    pub restart_policy: RestartPolicy,
    pub labels: BTreeMap<String, String>,
}

/// What `PATCH /machines/{id}` changes; `None` keeps the current value.
#[derive(Debug, Clone, Default)]
pub struct MachinePatch {
    pub restart_policy: Option<RestartPolicy>,
    /// Label changes: `Some(value)` sets a label, `None` removes it, others stay.
    pub labels: Option<BTreeMap<String, Option<String>>>,
}

/// A machine's labels as `machines.labels` keeps them.
pub(crate) fn labels_json(labels: &BTreeMap<String, String>) -> Result<String> {
    serde_json::to_string(labels).map_err(|e| Error::Internal(format!("labels to JSON: {e}")))
}

/// Writes a machine's labels, replacing what it had: the JSON shown and the rows filtered on.
async fn labels_write_in_txn(
    tx: &mut Transaction<'static, Any>,
    id: MachineId,
    labels: &BTreeMap<String, String>,
) -> Result<()> {
    sqlx::query("DELETE FROM machine_labels WHERE machine_id = $1")
        .bind(id.to_string())
        .execute(&mut **tx)
        .await?;
    label_rows_insert_in_txn(tx, id, labels).await?;
    sqlx::query("UPDATE machines SET labels = $1 WHERE id = $2")
        .bind(labels_json(labels)?)
        .bind(id.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The rows a list filters on, for a machine that has none yet (a new one: its JSON is in its
/// row already). Nothing at all for a machine without labels.
pub(crate) async fn label_rows_insert_in_txn(
    tx: &mut Transaction<'static, Any>,
    id: MachineId,
    labels: &BTreeMap<String, String>,
) -> Result<()> {
    if !labels.is_empty() {
        let rows: Vec<String> = (0..labels.len())
            .map(|r| format!("($1, ${}, ${})", 2 + 2 * r, 3 + 2 * r))
            .collect();
        let sql = format!(
            "INSERT INTO machine_labels (machine_id, key, value) VALUES {}",
            rows.join(", ")
        );
        let mut query = sqlx::query(&sql).bind(id.to_string());
        for (key, value) in labels {
            query = query.bind(key.clone()).bind(value.clone());
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Which machines a caller may see: a tenant its own, an administrator all.
#[derive(Debug, Clone, Copy)]
pub enum Visibility {
    Owner(UserId),
    All,
}

impl Visibility {
    pub(super) fn owner(&self) -> Option<String> {
        match self {
            Visibility::Owner(u) => Some(u.to_string()),
            Visibility::All => None,
        }
    }
}

/// Everything a worker needs to act on one machine.
#[derive(Debug, Clone)]
pub struct TaskMachine {
    pub id: MachineId,
    pub status: MachineStatus,
    pub desired: DesiredState,
    /// The row's version as read: a write based on this read passes it as
    /// [`MachineTransition::expected_version`].
    pub version: i64,
    /// The generation of what agents build (sent in the spec).
    pub spec_generation: i64,
    /// Moves with every rebuild (sent in the spec: the agent makes a fresh disk).
    pub disk_generation: i64,
    pub status_changed_at: DateTime<Utc>,
    pub hostname: String,
    pub size: Resources,
    pub ssh_keys: Vec<String>,
    pub user_data: Option<String>,
    pub host: Option<TaskHost>,
    /// Where it is being moved (status `moving`, once a host with room was found).
    pub move_to: Option<TaskHost>,
    pub image: TaskImage,
}

/// The host a machine is placed on.
#[derive(Debug, Clone)]
pub struct TaskHost {
    pub id: String,
    pub name: String,
    pub address: String,
    pub reachable: bool,
    /// The generation of the host's credential once its agent joined (`None`: it joined
    /// before credentials existed and still takes the join token).
    pub credential_generation: Option<i64>,
}

/// The machine's image as registered.
#[derive(Debug, Clone)]
pub struct TaskImage {
    pub name: String,
    pub source: String,
    pub format: String,
    pub sha256: Option<String>,
    pub boot: Option<KernelBoot>,
}

pub use crate::model::MachineSnapshot;

/// The event written with a transition.
#[derive(Debug, Clone, Copy)]
pub struct NewEvent<'a> {
    /// What did it: a task kind, `reconcile`, `deadline`...
    pub action: &'a str,
    pub message: &'a str,
}

/// An observed transition (what an agent did, what the reconciler found, a deadline that
/// passed): `from` -> `to` if the machine is still in `from` at `expected_version`.
#[derive(Debug, Clone, Copy)]
pub struct MachineTransition<'a> {
    pub id: MachineId,
    pub from: MachineStatus,
    /// The version the writer read before it acted; anyone who wrote since wins.
    pub expected_version: i64,
    pub to: MachineStatus,
    /// The desired state to set with it (the reconciler matches it to what it found);
    /// `None` keeps the tenant's.
    pub desired: Option<DesiredState>,
    /// The machine's network as its agent reports it; `None` keeps the stored one.
    pub network: Option<&'a MachineNetwork>,
    /// Why the machine failed: given exactly when `to` is `failed`. Any other transition
    /// clears the stored reason.
    pub failure: Option<&'a str>,
    pub event: NewEvent<'a>,
}

impl<'a> MachineTransition<'a> {
    /// `from` -> `to` with nothing else changed but the status.
    pub fn new(
        id: MachineId,
        from: MachineStatus,
        expected_version: i64,
        to: MachineStatus,
        event: NewEvent<'a>,
    ) -> Self {
        Self {
            id,
            from,
            expected_version,
            to,
            desired: None,
            network: None,
            failure: None,
            event,
        }
    }

    /// `from` -> `failed`, the reason written both as the failure reason and in the log.
    pub fn failed(
        id: MachineId,
        from: MachineStatus,
        expected_version: i64,
        action: &'a str,
        reason: &'a str,
    ) -> Self {
        let event = NewEvent {
            action,
            message: reason,
        };
        Self {
            failure: Some(reason),
            ..Self::new(id, from, expected_version, MachineStatus::Failed, event)
        }
    }
}

/// What a transition write did.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionOutcome {
    /// Written with its event; the row is now at `version`.
    Applied { version: i64 },
    /// The machine had moved on (another status or version, or deleted): nothing written.
    Superseded,
}

impl TransitionOutcome {
    pub fn applied(self) -> bool {
        matches!(self, TransitionOutcome::Applied { .. })
    }
}

/// The columns a [`Machine`] is read from, in [`MachineColumns`]' field order, as the inner query
/// of [`machines_sql`] names them.
const COLUMNS: &str = "m.seq, m.id, m.owner_id, m.hostname, m.status, m.desired_state, \
    h.name AS host_name, h.state AS host_state, i.name AS image_name, m.vcpus, m.memory_mib, \
    m.disk_gib, m.network, m.failure_reason, m.restart_policy, m.labels, m.created_at, \
    m.updated_at \
    FROM machines m JOIN images i ON i.id = m.image_id LEFT JOIN hosts h ON h.id = m.host_id";

/// The same columns, as the outer query of [`machines_sql`] reads them.
const NAMES: &str = "seq, id, owner_id, hostname, status, desired_state, host_name, host_state, \
    image_name, vcpus, memory_mib, disk_gib, network, failure_reason, restart_policy, labels, \
    created_at, updated_at";

/// A statement answering the machines `rest` selects (`WHERE ... ORDER BY ... LIMIT ...`) as
/// one row holding one JSON array of [`MachineColumns`] (read back by [`machines_from`]).
///
/// One row, not one per machine: SQLite's driver steps every row on its connection thread and
/// hands each to the async side through a channel, and that hand-off (a futex wake per row)
/// cost as much as the query on a page of machines (issue 12). Aggregated, a page of ten costs
/// one hand-off; PostgreSQL sends one `DataRow` instead of ten. The inner query, and so its
/// plan, is what it was before.
fn machines_sql(backend: Backend, rest: &str) -> String {
    let outer = match backend {
        Backend::Sqlite => format!("json_group_array(json_array({NAMES}))"),
        Backend::Postgres => format!("json_agg(json_build_array({NAMES}))::text"),
    };
    format!("SELECT {outer} AS machines FROM (SELECT {COLUMNS} {rest}) page")
}

/// Writes an accepted request's transition `t` over the status and version `read` (the
/// state machine judged the request against them); a machine that changed since is a
/// conflict: the request was judged against what it no longer is.
pub(super) async fn swap_status_in_txn(
    tx: &mut Transaction<'static, Any>,
    id: MachineId,
    read: (MachineStatus, i64),
    t: machine_state::Transition,
    now: i64,
) -> Result<()> {
    let swapped = sqlx::query(
        "UPDATE machines SET status = $1, desired_state = $2, updated_at = $3, \
         status_changed_at = CASE WHEN status = $1 THEN status_changed_at ELSE $3 END, \
         version = version + 1 \
         WHERE id = $4 AND version = $5 AND status = $6 AND deleted_at IS NULL",
    )
    .bind(t.status.as_str())
    .bind(t.desired.as_str())
    .bind(now)
    .bind(id.to_string())
    .bind(read.1)
    .bind(read.0.as_str())
    .execute(&mut **tx)
    .await?;
    if swapped.rows_affected() == 0 {
        return Err(Error::Conflict(
            "the machine changed while this request was handled; look at it and retry".into(),
        ));
    }
    Ok(())
}

/// Machine `id` as `tx` sees it (deleted ones included).
pub(super) async fn machine_in_txn(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    id: MachineId,
) -> Result<Machine> {
    let sql = machines_sql(backend, "WHERE m.id = $1");
    let row = sqlx::query(&sql)
        .bind(id.to_string())
        .fetch_one(&mut **tx)
        .await?;
    machine_from(&row)?.ok_or(Error::NotFound("machine"))
}

/// One machine as [`machines_sql`] writes it: a JSON array, read by position in field order
/// (serde reads a struct from a sequence that way), which is [`NAMES`]' order.
#[derive(serde::Deserialize)]
struct MachineColumns {
    seq: i64,
    id: String,
    owner_id: String,
    hostname: String,
    status: String,
    desired_state: String,
    host_name: Option<String>,
    host_state: Option<String>,
    image_name: String,
    vcpus: i64,
    memory_mib: i64,
    disk_gib: i64,
    network: Option<String>,
    failure_reason: Option<String>,
    restart_policy: String,
    labels: String,
    created_at: i64,
    updated_at: i64,
}

impl MachineColumns {
    fn into_machine(self) -> Result<Machine> {
        Ok(Machine {
            seq: self.seq,
            id: parse_col(&self.id, "machines.id")?,
            owner_id: parse_col(&self.owner_id, "machines.owner_id")?,
            hostname: self.hostname,
            status: parse_col(&self.status, "machines.status")?,
            desired: parse_col(&self.desired_state, "machines.desired_state")?,
            host_name: self.host_name,
            host_state: self.host_state,
            image_name: self.image_name,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_gib: self.disk_gib,
            network: json_col(self.network, "machines.network")?,
            failure_reason: self.failure_reason,
            restart_policy: parse_col(&self.restart_policy, "machines.restart_policy")?,
            labels: serde_json::from_str(&self.labels)
                .map_err(|e| Error::Internal(format!("bad JSON in machines.labels: {e}")))?,
            created_at: from_micros(self.created_at),
            updated_at: from_micros(self.updated_at),
        })
    }
}

/// The machines of a [`machines_sql`] answer, newest first.
fn machines_from(row: &AnyRow) -> Result<Vec<Machine>> {
    // PostgreSQL aggregates nothing to NULL, SQLite to `[]`.
    let Some(text) = row.try_get::<Option<String>, _>("machines")? else {
        return Ok(Vec::new());
    };
    let rows: Vec<MachineColumns> = serde_json::from_str(&text)
        .map_err(|e| Error::Internal(format!("bad machines JSON: {e}")))?;
    let mut machines = rows
        .into_iter()
        .map(MachineColumns::into_machine)
        .collect::<Result<Vec<_>>>()?;
    // Neither aggregate promises its input's order (SQLite's keeps it in practice, PostgreSQL's
    // only with an ORDER BY inside it); every page is newest first, and seq says which is.
    machines.sort_unstable_by_key(|m| std::cmp::Reverse(m.seq));
    Ok(machines)
}

/// The one machine a [`machines_sql`] answer holds, if any.
fn machine_from(row: &AnyRow) -> Result<Option<Machine>> {
    Ok(machines_from(row)?.into_iter().next())
}

fn json_col<T: serde::de::DeserializeOwned>(text: Option<String>, col: &str) -> Result<Option<T>> {
    text.map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(|e| Error::Internal(format!("bad JSON in {col}: {e}")))
}

fn snapshot_of(r: &AnyRow) -> Result<MachineSnapshot> {
    Ok(MachineSnapshot {
        id: parse_col(&r.try_get::<String, _>("id")?, "machines.id")?,
        status: parse_col(&r.try_get::<String, _>("status")?, "machines.status")?,
        version: r.try_get("version")?,
        restart_policy: parse_col(
            &r.try_get::<String, _>("restart_policy")?,
            "machines.restart_policy",
        )?,
    })
}

impl Store {
    /// Creates a machine in `pending`, within the owner's quota and with a hostname unique
    /// among the owner's live machines, and writes its first event and its provision task.
    /// Creates without a key are written many per transaction (`machine_create`'s queue);
    /// with a claimed Idempotency-Key, the key records the new machine in the create's own
    /// transaction.
    pub async fn machine_create(
        &self,
        new: NewMachine,
        quota: &Quota,
        key: Option<ClaimedKey<'_>>,
    ) -> Result<Machine> {
        let Some(claimed) = key else {
            return self.creates.create(new, *quota).await;
        };
        let mut tx = self.begin_write().await?;
        let answers = creates_in_txn(&mut tx, self.backend(), &[(&new, quota)]).await?;
        let created = only(answers)?;
        complete_in_txn(&mut tx, claimed, created.id).await?;
        tx.commit().await?;
        Ok(created)
    }

    /// A live (not deleted) machine the caller may see.
    pub async fn machine_get(&self, id: MachineId, who: Visibility) -> Result<Option<Machine>> {
        let sql = machines_sql(
            self.backend(),
            "WHERE m.id = $1 AND m.deleted_at IS NULL AND ($2 IS NULL OR m.owner_id = $2)",
        );
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .bind(who.owner())
            .fetch_one(self.reader())
            .await?;
        machine_from(&row)
    }

    /// A machine whatever its state, deleted included: what an Idempotency-Key's request
    /// created is shown again on a replay even after it was deleted.
    pub async fn machine_history(&self, id: MachineId) -> Result<Option<Machine>> {
        let sql = machines_sql(self.backend(), "WHERE m.id = $1");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_one(self.reader())
            .await?;
        machine_from(&row)
    }

    /// Newest first, strictly older than `before_seq` when given, at most `limit`.
    ///
    /// The statement names only the filters in use (rather than `$n IS NULL OR ...`), so both
    /// back ends plan it against the `(owner_id, seq)` index even with cached prepared plans.
    pub async fn machine_list(
        &self,
        who: Visibility,
        status: Option<MachineStatus>,
        label: Option<(&str, &str)>,
        before_seq: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Machine>> {
        let mut filters = vec!["m.deleted_at IS NULL".to_owned()];
        let mut n = 0;
        let mut param = || {
            n += 1;
            format!("${n}")
        };
        let owner = who.owner();
        // A tenant's page is a range of the (owner_id, seq) index, said as a row comparison.
        // Said as `owner_id = $1 ... ORDER BY seq DESC`, PostgreSQL walked the primary key
        // backwards and filtered by owner instead, reading every newer machine of every other
        // tenant: a tenant whose machines were older than a big neighbour's listed at 900/s
        // (issue 12). This form keeps the owner in the order, so only that index serves it.
        let order = if owner.is_some() {
            let (o, before) = (param(), param());
            filters.push(format!(
                "(m.owner_id, m.seq) < ({o}, {before}) AND m.owner_id >= {o}"
            ));
            "m.owner_id DESC, m.seq DESC"
        } else {
            if before_seq.is_some() {
                filters.push(format!("m.seq < {}", param()));
            }
            "m.seq DESC"
        };
        if status.is_some() {
            filters.push(format!("m.status = {}", param()));
        }
        if label.is_some() {
            let (key, value) = (param(), param());
            // Said as a set the (key, value) index answers: the planner may start from it
            // (an administrator's list of every machine) or probe it per machine (a tenant's
            // page, read from its own index range).
            filters.push(format!(
                "m.id IN (SELECT l.machine_id FROM machine_labels l \
                 WHERE l.key = {key} AND l.value = {value})"
            ));
        }
        let sql = machines_sql(
            self.backend(),
            &format!(
                "WHERE {} ORDER BY {order} LIMIT {}",
                filters.join(" AND "),
                param()
            ),
        );
        let mut query = sqlx::query(&sql);
        if let Some(owner) = owner {
            query = query.bind(owner).bind(before_seq.unwrap_or(i64::MAX));
        } else if let Some(seq) = before_seq {
            query = query.bind(seq);
        }
        if let Some(status) = status {
            query = query.bind(status.as_str());
        }
        if let Some((key, value)) = label {
            query = query.bind(key).bind(value);
        }
        let row = query.bind(limit).fetch_one(self.reader()).await?;
        machines_from(&row)
    }

    /// Applies a tenant's request through the state machine; 409 when it makes no sense now.
    /// Returns the machine as the request left it.
    ///
    /// The write is a compare-and-swap on `version`, so two concurrent requests cannot both
    /// pass the state machine against the same status (the loser gets 409). A delete of a
    /// machine that was never placed on a host completes in the same transaction: there is
    /// nothing on a hypervisor to clean up, and no crash can leave it half-deleted.
    pub async fn machine_request(
        &self,
        id: MachineId,
        who: Visibility,
        action: Action,
    ) -> Result<Machine> {
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "SELECT status, desired_state, version, host_id FROM machines \
             WHERE id = $1 AND deleted_at IS NULL AND ($2 IS NULL OR owner_id = $2)",
        )
        .bind(id.to_string())
        .bind(who.owner())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(Error::NotFound("machine"))?;
        let status: MachineStatus = parse_col(&row.try_get::<String, _>("status")?, "status")?;
        let desired: DesiredState =
            parse_col(&row.try_get::<String, _>("desired_state")?, "desired_state")?;
        let version: i64 = row.try_get("version")?;
        let placed = row.try_get::<Option<String>, _>("host_id")?.is_some();
        let t = machine_state::request(action, status, desired)
            .map_err(|e| Error::Conflict(e.to_string()))?;
        swap_status_in_txn(&mut tx, id, (status, version), t, now).await?;
        let message = format!("{action} requested");
        event_in_txn(&mut tx, id, action.as_str(), t.status, &message, now).await?;
        let follow_up = tasks::follow_up(action, t.status, placed);
        if let FollowUp::Queue(kind) = follow_up {
            enqueue_in_txn(&mut tx, self.backend(), id, kind).await?;
        }
        let requested = machine_in_txn(&mut tx, self.backend(), id).await?;
        if follow_up == FollowUp::DeleteNow {
            sqlx::query(
                "UPDATE machines SET status = $1, deleted_at = $2, updated_at = $2, \
                 status_changed_at = $2, version = version + 1 WHERE id = $3",
            )
            .bind(MachineStatus::Deleted.as_str())
            .bind(now)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
            usage_release_in_txn(&mut tx, id).await?;
            event_in_txn(
                &mut tx,
                id,
                "delete",
                MachineStatus::Deleted,
                "deleted; it was never placed on a host, so nothing was left to clean up",
                now,
            )
            .await?;
        }
        tx.commit().await?;
        self.machine_changed(id);
        Ok(requested)
    }

    /// The machine a task acts on, deleted ones included (a late task must see that).
    pub async fn machine_for_task(&self, id: MachineId) -> Result<Option<TaskMachine>> {
        let row = sqlx::query(
            "SELECT m.id, m.status, m.desired_state, m.version, m.spec_generation, \
             m.disk_generation, m.status_changed_at, \
             m.hostname, m.vcpus, m.memory_mib, m.disk_gib, m.ssh_keys, m.user_data, \
             h.id AS host_id, h.name AS host_name, h.grpc_address AS host_address, \
             h.state AS host_state, h.credential_issued AS host_credential_issued, \
             h.credential_generation AS host_credential_generation, \
             t.id AS to_id, t.name AS to_name, t.grpc_address AS to_address, \
             t.state AS to_state, t.credential_issued AS to_credential_issued, \
             t.credential_generation AS to_credential_generation, \
             i.name AS image_name, i.source, i.format, i.sha256, i.boot \
             FROM machines m JOIN images i ON i.id = m.image_id LEFT JOIN hosts h ON h.id = m.host_id \
             LEFT JOIN hosts t ON t.id = m.move_to_host_id \
             WHERE m.id = $1",
        )
        .bind(id.to_string())
        .fetch_optional(self.reader())
        .await?;
        let Some(r) = row else { return Ok(None) };
        // The host joined as `{prefix}_...`, if any.
        let task_host = |prefix: &str| -> Result<Option<TaskHost>> {
            let col = |name: &str| format!("{prefix}_{name}");
            let Some(id) = r.try_get::<Option<String>, _>(col("id").as_str())? else {
                return Ok(None);
            };
            Ok(Some(TaskHost {
                id,
                name: r.try_get(col("name").as_str())?,
                address: r.try_get(col("address").as_str())?,
                reachable: r.try_get::<String, _>(col("state").as_str())? == "ready",
                credential_generation: (r.try_get::<i64, _>(col("credential_issued").as_str())?
                    != 0)
                    .then(|| r.try_get(col("credential_generation").as_str()))
                    .transpose()?,
            }))
        };
        let host = task_host("host")?;
        let move_to = task_host("to")?;
        Ok(Some(TaskMachine {
            id,
            status: parse_col(&r.try_get::<String, _>("status")?, "machines.status")?,
            desired: parse_col(
                &r.try_get::<String, _>("desired_state")?,
                "machines.desired_state",
            )?,
            version: r.try_get("version")?,
            spec_generation: r.try_get("spec_generation")?,
            disk_generation: r.try_get("disk_generation")?,
            status_changed_at: from_micros(r.try_get("status_changed_at")?),
            hostname: r.try_get("hostname")?,
            size: Resources {
                vcpus: r.try_get("vcpus")?,
                memory_mib: r.try_get("memory_mib")?,
                disk_gib: r.try_get("disk_gib")?,
            },
            ssh_keys: json_col(r.try_get("ssh_keys")?, "machines.ssh_keys")?.unwrap_or_default(),
            user_data: r.try_get("user_data")?,
            host,
            move_to,
            image: TaskImage {
                name: r.try_get("image_name")?,
                source: r.try_get("source")?,
                format: r.try_get("format")?,
                sha256: r.try_get("sha256")?,
                boot: json_col(r.try_get("boot")?, "images.boot")?,
            },
        }))
    }

    /// Writes an observed transition and its event in one transaction, if the machine is
    /// still in `t.from` at `t.expected_version` (a tenant's request meanwhile, such as a stop
    /// during provisioning, or a newer observation makes this [`TransitionOutcome::Superseded`]
    /// and the writer acts on what the machine is now). Reaching `deleted` stamps
    /// `deleted_at`, which frees the hostname and the host capacity.
    ///
    /// A transition the lifecycle does not allow is refused as a bug, not written.
    pub async fn machine_transition(&self, t: &MachineTransition<'_>) -> Result<TransitionOutcome> {
        machine_state::check_observed(t.from, t.to, t.failure.is_some()).map_err(|e| {
            Error::Internal(format!("refused to write a transition of {}: {e}", t.id))
        })?;
        let network = t
            .network
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| Error::Internal(format!("machine network to JSON: {e}")))?;
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let written = sqlx::query(
            "UPDATE machines SET status = $1, desired_state = COALESCE($2, desired_state), \
             network = COALESCE($3, network), failure_reason = $4, \
             status_changed_at = $5, updated_at = $5, version = version + 1, \
             deleted_at = CASE WHEN $1 = 'deleted' THEN $5 ELSE deleted_at END \
             WHERE id = $6 AND status = $7 AND version = $8 AND deleted_at IS NULL \
             RETURNING host_id, vcpus, memory_mib, disk_gib",
        )
        .bind(t.to.as_str())
        .bind(t.desired.map(DesiredState::as_str))
        .bind(network)
        .bind(t.failure)
        .bind(now)
        .bind(t.id.to_string())
        .bind(t.from.as_str())
        .bind(t.expected_version)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(written) = written else {
            return Ok(TransitionOutcome::Superseded);
        };
        if t.to == MachineStatus::Deleted {
            usage_release_in_txn(&mut tx, t.id).await?;
            if let Some(host) = written.try_get::<Option<String>, _>("host_id")? {
                let size = Resources {
                    vcpus: written.try_get("vcpus")?,
                    memory_mib: written.try_get("memory_mib")?,
                    disk_gib: written.try_get("disk_gib")?,
                };
                allocation_release_in_txn(&mut tx, &host, size).await?;
            }
            // Its host has room again.
            capacity_changed_in_txn(&mut tx, self.backend()).await?;
        }
        event_in_txn(&mut tx, t.id, t.event.action, t.to, t.event.message, now).await?;
        tx.commit().await?;
        self.machine_changed(t.id);
        Ok(TransitionOutcome::Applied {
            version: t.expected_version + 1,
        })
    }

    /// Applies a tenant's PATCH (restart policy, labels) to a live machine; `None` when the
    /// caller has no such machine. Nothing here needs the host: the next crash is judged by the
    /// new policy, and labels are the control plane's alone.
    pub async fn machine_patch(
        &self,
        id: MachineId,
        who: Visibility,
        patch: &MachinePatch,
    ) -> Result<Option<Machine>> {
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "UPDATE machines SET restart_policy = COALESCE($1, restart_policy), updated_at = $2, \
             version = version + 1 \
             WHERE id = $3 AND deleted_at IS NULL AND ($4 IS NULL OR owner_id = $4) \
             RETURNING status, labels",
        )
        .bind(patch.restart_policy.map(RestartPolicy::as_str))
        .bind(now)
        .bind(id.to_string())
        .bind(who.owner())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let status = parse_col(&row.try_get::<String, _>("status")?, "machines.status")?;
        let mut changes = Vec::new();
        if let Some(policy) = patch.restart_policy {
            changes.push(format!("restart policy set to {policy}"));
        }
        if let Some(changed) = &patch.labels {
            // Merged here, against the labels as this transaction sees them, so two PATCHes
            // naming different labels both keep theirs.
            let mut labels: BTreeMap<String, String> =
                serde_json::from_str(&row.try_get::<String, _>("labels")?)
                    .map_err(|e| Error::Internal(format!("bad JSON in machines.labels: {e}")))?;
            for (key, value) in changed {
                match value {
                    Some(v) => labels.insert(key.clone(), v.clone()),
                    None => labels.remove(key),
                };
            }
            crate::model::labels::validate(&labels).map_err(Error::Invalid)?;
            labels_write_in_txn(&mut tx, id, &labels).await?;
            changes.push(format!("labels changed ({} now)", labels.len()));
        }
        if !changes.is_empty() {
            event_in_txn(&mut tx, id, "update", status, &changes.join("; "), now).await?;
        }
        let sql = machines_sql(self.backend(), "WHERE m.id = $1");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        machine_from(&row)
    }

    /// Removes the label rows of deleted machines (lists never match them; this keeps the
    /// table the size of the live fleet). The JSON stays on the row, for history.
    pub async fn label_rows_purge_deleted(&self) -> Result<u64> {
        let res = sqlx::query(
            "DELETE FROM machine_labels WHERE EXISTS (SELECT 1 FROM machines m \
             WHERE m.id = machine_labels.machine_id AND m.deleted_at IS NOT NULL)",
        )
        .execute(&self.write)
        .await?;
        Ok(res.rows_affected())
    }

    /// Live machines placed on a host, as read now.
    pub async fn machines_on_host(&self, host_id: &str) -> Result<Vec<MachineSnapshot>> {
        // A machine being moved here counts too: its copy is not an orphan.
        let rows = sqlx::query(
            "SELECT id, status, version, restart_policy FROM machines \
             WHERE (host_id = $1 OR move_to_host_id = $1) AND deleted_at IS NULL",
        )
        .bind(host_id)
        .fetch_all(self.reader())
        .await?;
        rows.iter().map(snapshot_of).collect()
    }

    /// Machines whose transitional status has outlasted its deadline, as read now (the
    /// status and version to fail them from). `limits` says how long each status may last.
    pub async fn machines_past_deadline(
        &self,
        limits: &std::collections::HashMap<MachineStatus, chrono::Duration>,
    ) -> Result<Vec<MachineSnapshot>> {
        let now = self.clock().await?;
        let mut out = Vec::new();
        for (status, limit) in limits {
            let rows = sqlx::query(
                "SELECT id, status, version, restart_policy FROM machines WHERE status = $1 \
                 AND deleted_at IS NULL AND status_changed_at < $2",
            )
            .bind(status.as_str())
            .bind(to_micros(now - *limit))
            .fetch_all(self.reader())
            .await?;
            for r in &rows {
                out.push(snapshot_of(r)?);
            }
        }
        Ok(out)
    }

    /// Live machines per status (statuses without machines absent), for metrics. A pending
    /// machine has no host: placement moves it to `provisioning` in the write that gives it
    /// one, so the pending count is the placement backlog.
    pub async fn machine_count_by_status(
        &self,
    ) -> Result<std::collections::HashMap<MachineStatus, i64>> {
        let rows = sqlx::query(
            "SELECT status, COUNT(*) AS n FROM machines WHERE deleted_at IS NULL GROUP BY status",
        )
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    parse_col(&r.try_get::<String, _>("status")?, "status")?,
                    r.try_get("n")?,
                ))
            })
            .collect()
    }
}
