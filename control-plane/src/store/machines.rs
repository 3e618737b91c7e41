//! Machines and their event log: the `machines` and `machine_events` tables. Every status change is
//! written together with its event row in one transaction.

use super::idempotency::{complete_in_txn, ClaimedKey, StoredResponse};
use super::tasks::{enqueue_in_txn, TaskKind};
use super::{from_micros, is_unique_violation, parse_col, to_micros, Store};
use crate::error::{Error, Result};
use crate::model::machine_state::{self, Action};
use crate::model::{
    DesiredState, Hostname, ImageId, MachineId, MachineNetwork, MachineStatus, Quota, Usage, UserId,
};
use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

/// A stored machine (not deleted, unless a caller asked for history).
#[derive(Debug, Clone)]
pub struct MachineRecord {
    /// Strictly increasing creation order; the keyset for pagination.
    pub seq: i64,
    pub id: MachineId,
    pub owner_id: UserId,
    pub hostname: String,
    pub status: MachineStatus,
    pub desired: DesiredState,
    pub host_name: Option<String>,
    /// `ready` or `unreachable`, once placed.
    pub host_state: Option<String>,
    pub image_name: String,
    pub vcpus: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
    pub ssh_keys: Vec<String>,
    pub user_data: Option<String>,
    pub network: Option<MachineNetwork>,
    pub failure_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A validated request for a new machine.
#[derive(Debug, Clone)]
pub struct NewMachine {
    pub owner_id: UserId,
    pub hostname: Hostname,
    pub image_id: ImageId,
    pub vcpus: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
    pub ssh_keys: Vec<String>,
    pub user_data: Option<String>,
}

/// Turns the created machine into the answer an Idempotency-Key replays.
pub type Render = dyn Fn(&MachineRecord) -> Result<StoredResponse> + Send + Sync;

/// One line of a machine's log.
#[derive(Debug, Clone)]
pub struct EventRecord {
    pub seq: i64,
    pub action: String,
    pub status: MachineStatus,
    pub message: String,
    pub created_at: DateTime<Utc>,
}

/// Which machines a caller may see: a tenant its own, an administrator all.
#[derive(Debug, Clone, Copy)]
pub enum Visibility {
    Owner(UserId),
    All,
}

impl Visibility {
    fn owner(&self) -> Option<String> {
        match self {
            Visibility::Owner(u) => Some(u.to_string()),
            Visibility::All => None,
        }
    }
}

const SELECT: &str = "SELECT v.seq, v.id, v.owner_id, v.hostname, v.status, v.desired_state, \
    h.name AS host_name, h.state AS host_state, i.name AS image_name, v.vcpus, v.memory_mib, v.disk_gib, v.ssh_keys, \
    v.user_data, v.network, v.failure_reason, v.created_at, v.updated_at \
    FROM machines v JOIN images i ON i.id = v.image_id LEFT JOIN hosts h ON h.id = v.host_id";

fn json_col<T: serde::de::DeserializeOwned>(text: Option<String>, col: &str) -> Result<Option<T>> {
    text.map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(|e| Error::Internal(format!("bad JSON in {col}: {e}")))
}

fn from_row(row: &AnyRow) -> Result<MachineRecord> {
    Ok(MachineRecord {
        seq: row.try_get("seq")?,
        id: parse_col(&row.try_get::<String, _>("id")?, "machines.id")?,
        owner_id: parse_col(&row.try_get::<String, _>("owner_id")?, "machines.owner_id")?,
        hostname: row.try_get("hostname")?,
        status: parse_col(&row.try_get::<String, _>("status")?, "machines.status")?,
        desired: parse_col(
            &row.try_get::<String, _>("desired_state")?,
            "machines.desired_state",
        )?,
        host_name: row.try_get("host_name")?,
        host_state: row.try_get("host_state")?,
        image_name: row.try_get("image_name")?,
        vcpus: row.try_get("vcpus")?,
        memory_mib: row.try_get("memory_mib")?,
        disk_gib: row.try_get("disk_gib")?,
        ssh_keys: json_col(row.try_get("ssh_keys")?, "machines.ssh_keys")?.unwrap_or_default(),
        user_data: row.try_get("user_data")?,
        network: json_col(row.try_get("network")?, "machines.network")?,
        failure_reason: row.try_get("failure_reason")?,
        created_at: from_micros(row.try_get("created_at")?),
        updated_at: from_micros(row.try_get("updated_at")?),
    })
}

pub(crate) async fn event_in_txn(
    tx: &mut Transaction<'static, Any>,
    id: MachineId,
    action: &str,
    status: MachineStatus,
    message: &str,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO machine_events (machine_id, action, status, message, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id.to_string())
    .bind(action)
    .bind(status.as_str())
    .bind(message)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn live_by_hostname_in_txn(
    tx: &mut Transaction<'static, Any>,
    owner: UserId,
    hostname: &str,
) -> Result<Option<MachineId>> {
    let row = sqlx::query(
        "SELECT id FROM machines WHERE owner_id = $1 AND hostname = $2 AND deleted_at IS NULL",
    )
    .bind(owner.to_string())
    .bind(hostname)
    .fetch_optional(&mut **tx)
    .await?;
    row.map(|r| parse_col(&r.try_get::<String, _>("id")?, "machines.id"))
        .transpose()
}

impl Store {
    /// Creates a machine in `pending`, within the owner's quota and with a hostname unique
    /// among the owner's live machines, and writes its first event. With an Idempotency-Key,
    /// the answer `render` makes is stored in the same transaction.
    pub async fn machine_create(
        &self,
        new: &NewMachine,
        quota: &Quota,
        idempotency: Option<(ClaimedKey<'_>, &Render)>,
    ) -> Result<MachineRecord> {
        let now = to_micros(self.clock().await?);
        let id = MachineId::new();
        let owner = new.owner_id.to_string();
        let mut tx = self.begin_write().await?;
        // Serialises this owner's creations on PostgreSQL (a row lock; a no-op write on
        // SQLite, whose single writer serialises already), so quota checks cannot race.
        sqlx::query("UPDATE users SET updated_at = updated_at WHERE id = $1")
            .bind(&owner)
            .execute(&mut *tx)
            .await?;
        if let Some(existing) =
            live_by_hostname_in_txn(&mut tx, new.owner_id, new.hostname.as_str()).await?
        {
            return Err(Error::HostnameTaken {
                hostname: new.hostname.to_string(),
                existing,
            });
        }
        let usage = sqlx::query(
            "SELECT COUNT(*) AS machines, CAST(COALESCE(SUM(vcpus), 0) AS BIGINT) AS vcpus, \
             CAST(COALESCE(SUM(memory_mib), 0) AS BIGINT) AS memory_mib \
             FROM machines WHERE owner_id = $1 AND deleted_at IS NULL",
        )
        .bind(&owner)
        .fetch_one(&mut *tx)
        .await?;
        let current = Usage {
            machines: usage.try_get("machines")?,
            vcpus: usage.try_get("vcpus")?,
            memory_mib: usage.try_get("memory_mib")?,
        };
        let asked = Usage {
            machines: 1,
            vcpus: new.vcpus,
            memory_mib: new.memory_mib,
        };
        quota.admits(current, asked).map_err(Error::QuotaExceeded)?;
        let keys = serde_json::to_string(&new.ssh_keys)
            .map_err(|e| Error::Internal(format!("ssh keys to JSON: {e}")))?;
        let res = sqlx::query(
            "INSERT INTO machines (id, owner_id, hostname, status, desired_state, image_id, vcpus, \
             memory_mib, disk_gib, ssh_keys, user_data, created_at, updated_at, \
             status_changed_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $12)",
        )
        .bind(id.to_string())
        .bind(&owner)
        .bind(new.hostname.as_str())
        .bind(MachineStatus::Pending.as_str())
        .bind(DesiredState::Running.as_str())
        .bind(new.image_id.to_string())
        .bind(new.vcpus)
        .bind(new.memory_mib)
        .bind(new.disk_gib)
        .bind(keys)
        .bind(new.user_data.as_deref())
        .bind(now)
        .execute(&mut *tx)
        .await;
        if let Err(e) = res {
            // Only reachable if the lock above were bypassed; still answer 409, not 500.
            if is_unique_violation(&e) {
                return Err(Error::Conflict(format!(
                    "a machine named '{}' already exists",
                    new.hostname
                )));
            }
            return Err(e.into());
        }
        event_in_txn(
            &mut tx,
            id,
            "create",
            MachineStatus::Pending,
            "machine requested; waiting for a host",
            now,
        )
        .await?;
        enqueue_in_txn(&mut tx, self.backend(), id, TaskKind::Provision).await?;
        let sql = format!("{SELECT} WHERE v.id = $1");
        let created = from_row(
            &sqlx::query(&sql)
                .bind(id.to_string())
                .fetch_one(&mut *tx)
                .await?,
        )?;
        if let Some((claimed, render)) = idempotency {
            complete_in_txn(&mut tx, claimed, &render(&created)?).await?;
        }
        tx.commit().await?;
        Ok(created)
    }

    /// A live (not deleted) machine the caller may see.
    pub async fn machine_get(
        &self,
        id: MachineId,
        who: Visibility,
    ) -> Result<Option<MachineRecord>> {
        let sql = format!(
            "{SELECT} WHERE v.id = $1 AND v.deleted_at IS NULL AND ($2 IS NULL OR v.owner_id = $2)"
        );
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .bind(who.owner())
            .fetch_optional(self.reader())
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Newest first, strictly older than `before_seq` when given, at most `limit`.
    ///
    /// The statement names only the filters in use (rather than `$n IS NULL OR ...`), so both
    /// back ends plan it against the `(owner_id, seq)` index even with cached prepared plans.
    pub async fn machine_list(
        &self,
        who: Visibility,
        status: Option<MachineStatus>,
        before_seq: Option<i64>,
        limit: i64,
    ) -> Result<Vec<MachineRecord>> {
        let mut filters = vec!["v.deleted_at IS NULL".to_owned()];
        let mut n = 0;
        let mut param = || {
            n += 1;
            format!("${n}")
        };
        let owner = who.owner();
        if owner.is_some() {
            filters.push(format!("v.owner_id = {}", param()));
        }
        if status.is_some() {
            filters.push(format!("v.status = {}", param()));
        }
        if before_seq.is_some() {
            filters.push(format!("v.seq < {}", param()));
        }
        let sql = format!(
            "{SELECT} WHERE {} ORDER BY v.seq DESC LIMIT {}",
            filters.join(" AND "),
            param()
        );
        let mut query = sqlx::query(&sql);
        if let Some(owner) = owner {
            query = query.bind(owner);
        }
        if let Some(status) = status {
            query = query.bind(status.as_str());
        }
        if let Some(seq) = before_seq {
            query = query.bind(seq);
        }
        let rows = query.bind(limit).fetch_all(self.reader()).await?;
        rows.iter().map(from_row).collect()
    }

    /// Applies a tenant's request through the state machine; 409 when it makes no sense now.
    /// Returns the machine as the request left it.
    ///
    /// The write is a compare-and-swap on `generation`, so two concurrent requests cannot both
    /// pass the state machine against the same status (the loser gets 409). A delete of a
    /// machine that was never placed on a host completes in the same transaction: there is
    /// nothing on a hypervisor to clean up, and no crash can leave it half-deleted.
    pub async fn machine_request(
        &self,
        id: MachineId,
        who: Visibility,
        action: Action,
    ) -> Result<MachineRecord> {
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "SELECT status, desired_state, generation, host_id FROM machines \
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
        let generation: i64 = row.try_get("generation")?;
        let placed = row.try_get::<Option<String>, _>("host_id")?.is_some();
        let t = machine_state::request(action, status, desired)
            .map_err(|e| Error::Conflict(e.to_string()))?;
        let swapped = sqlx::query(
            "UPDATE machines SET status = $1, desired_state = $2, updated_at = $3, \
             status_changed_at = CASE WHEN status = $1 THEN status_changed_at ELSE $3 END, \
             generation = generation + 1 \
             WHERE id = $4 AND generation = $5 AND status = $6 AND deleted_at IS NULL",
        )
        .bind(t.status.as_str())
        .bind(t.desired.as_str())
        .bind(now)
        .bind(id.to_string())
        .bind(generation)
        .bind(status.as_str())
        .execute(&mut *tx)
        .await?;
        if swapped.rows_affected() == 0 {
            return Err(Error::Conflict(
                "the machine changed while this request was handled; look at it and retry".into(),
            ));
        }
        let message = format!("{action} requested");
        event_in_txn(&mut tx, id, action.as_str(), t.status, &message, now).await?;
        // The workflow that carries the request out, unless the machine was never built (a
        // start or stop of a pending machine only changes what its provisioning will build).
        let task = match (action, t.status) {
            (Action::Start, MachineStatus::Starting) => Some(TaskKind::Start),
            (Action::Stop, MachineStatus::Stopping) => Some(TaskKind::Stop),
            (Action::Reboot, MachineStatus::Rebooting) => Some(TaskKind::Reboot),
            (Action::Delete, _) if placed => Some(TaskKind::Delete),
            _ => None,
        };
        if let Some(kind) = task {
            enqueue_in_txn(&mut tx, self.backend(), id, kind).await?;
        }
        let sql = format!("{SELECT} WHERE v.id = $1");
        let requested = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        let requested = from_row(&requested)?;
        if action == Action::Delete && !placed {
            sqlx::query(
                "UPDATE machines SET status = $1, deleted_at = $2, updated_at = $2, \
                 status_changed_at = $2, generation = generation + 1 WHERE id = $3",
            )
            .bind(MachineStatus::Deleted.as_str())
            .bind(now)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
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
        Ok(requested)
    }

    /// A machine's log, oldest first, after `after_seq` when given. Deleted machines have none
    /// to show (they are gone for the tenant).
    pub async fn machine_events(
        &self,
        id: MachineId,
        after_seq: Option<i64>,
        limit: i64,
    ) -> Result<Vec<EventRecord>> {
        let rows = sqlx::query(
            "SELECT seq, action, status, message, created_at FROM machine_events \
             WHERE machine_id = $1 AND ($2 IS NULL OR seq > $2) ORDER BY seq LIMIT $3",
        )
        .bind(id.to_string())
        .bind(after_seq)
        .bind(limit)
        .fetch_all(self.reader())
        .await?;
        rows.iter()
            .map(|r| {
                Ok(EventRecord {
                    seq: r.try_get("seq")?,
                    action: r.try_get("action")?,
                    status: parse_col(&r.try_get::<String, _>("status")?, "machine_events.status")?,
                    message: r.try_get("message")?,
                    created_at: from_micros(r.try_get("created_at")?),
                })
            })
            .collect()
    }

    /// Live machines per status, for metrics.
    pub async fn machine_count_by_status(&self) -> Result<Vec<(MachineStatus, i64)>> {
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
