//! Hypervisor hosts: the `hosts` table. Agents register (keyed by name, so a restarted agent
//! keeps its identity and machines) and heartbeat; a host that stops heartbeating becomes
//! `unreachable`. What a host has allocated (`allocated_*`) is kept on its row by the
//! transactions that place a machine there (`allocation_claim_in_txn`) and that stamp one
//! deleted (`allocation_release_in_txn`); `Store::allocation_drift` compares it with the sum
//! of the live machines placed there.

use super::machine_events::note_machines_on_host_in_txn;
use super::tasks::capacity_changed_in_txn;
use super::{from_micros, is_unique_violation, to_micros, Backend, Store};
use crate::error::{Error, Result};
use crate::model::scheduler::{HostCandidate, Resources};
use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use std::time::Instant;

/// What a host's machines say when it answers again after being unreachable.
const REACHABLE_AGAIN: &str = "its host is reachable again";

/// A registered host as stored, with what its live machines are sized for.
#[derive(Debug, Clone)]
pub struct HostRecord {
    pub id: String,
    pub name: String,
    pub grpc_address: String,
    /// `ready` or `unreachable` (reachability only; see `cordoned`).
    pub state: String,
    pub cordoned: bool,
    pub hypervisor: String,
    pub agent_version: String,
    pub domain_prefix: String,
    /// What its agent's last heartbeat found wrong with the host; empty when healthy.
    pub problems: Vec<String>,
    pub capacity: Resources,
    pub allocated: Resources,
    pub machines: i64,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// The generation of the host's credential once its agent joined (`None`: the join token).
    pub credential_generation: Option<i64>,
    /// When an administrator asked to evacuate it.
    pub evacuation_requested_at: Option<DateTime<Utc>>,
}

/// Who a host is, as far as its credential goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIdentity {
    pub id: String,
    /// Whether an agent has joined with the join token and holds this host's credential.
    pub credential_issued: bool,
    /// Which credential is valid; a reset increments it.
    pub credential_generation: i64,
}

/// What a host's row says it last reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    pub ready: bool,
    /// One per line, as [`Store::host_heartbeat`] stores them.
    pub problems: String,
    pub capacity: Resources,
}

/// Hosts per statement of [`Store::host_heartbeats_record`]: well under the bound parameters
/// either back end allows in one statement (SQLite 32,766; PostgreSQL 65,535).
const HEARTBEATS_PER_STATEMENT: usize = 500;

/// What the registry decided about a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterDecision {
    /// The join token, for a name without a credential: register and issue one.
    Join,
    /// The host's own credential: register (a restarted agent, a new address).
    Rejoin,
    /// Neither.
    Refuse(Refusal),
}

/// Why a registration is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The join token was presented for a host that holds its own credential.
    HoldsCredential,
    /// The bearer is neither the join token nor the host's credential.
    Unauthenticated,
}

/// The outcome of `host_register`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    Accepted {
        id: String,
        was_unreachable: bool,
        /// The generation of the credential issued now (when the agent joined).
        issued_generation: Option<i64>,
    },
    Refused(Refusal),
}

/// What an agent says about itself when it registers.
#[derive(Debug, Clone)]
pub struct HostRegistration {
    pub name: String,
    pub grpc_address: String,
    pub hypervisor: String,
    pub agent_version: String,
    pub domain_prefix: String,
    pub capacity: Resources,
}

/// What a heartbeat changed about its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatChange {
    /// The host had been marked unreachable.
    pub was_unreachable: bool,
    /// The agent reports other problems than before (some appeared, or all went away).
    pub problems_changed: bool,
}

const SELECT: &str = "SELECT h.id, h.name, h.grpc_address, h.state, h.cordoned, h.hypervisor, \
    h.agent_version, h.domain_prefix, h.problems, h.vcpus, h.memory_mib, h.disk_gib, \
    h.last_heartbeat_at, h.created_at, h.credential_issued, h.credential_generation, \
    h.allocated_machines, h.allocated_vcpus, h.allocated_memory_mib, h.allocated_disk_gib, \
    h.evacuation_requested_at FROM hosts h";

fn select_sql(tail: &str) -> String {
    format!("{SELECT} {tail}")
}

fn from_row(r: &AnyRow) -> Result<HostRecord> {
    Ok(HostRecord {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        grpc_address: r.try_get("grpc_address")?,
        state: r.try_get("state")?,
        cordoned: r.try_get::<i64, _>("cordoned")? != 0,
        hypervisor: r.try_get("hypervisor")?,
        agent_version: r.try_get("agent_version")?,
        domain_prefix: r.try_get("domain_prefix")?,
        problems: r
            .try_get::<String, _>("problems")?
            .lines()
            .map(str::to_owned)
            .collect(),
        capacity: Resources {
            vcpus: r.try_get("vcpus")?,
            memory_mib: r.try_get("memory_mib")?,
            disk_gib: r.try_get("disk_gib")?,
        },
        allocated: Resources {
            vcpus: r.try_get("allocated_vcpus")?,
            memory_mib: r.try_get("allocated_memory_mib")?,
            disk_gib: r.try_get("allocated_disk_gib")?,
        },
        machines: r.try_get("allocated_machines")?,
        credential_generation: (r.try_get::<i64, _>("credential_issued")? != 0)
            .then(|| r.try_get("credential_generation"))
            .transpose()?,
        last_heartbeat_at: r
            .try_get::<Option<i64>, _>("last_heartbeat_at")?
            .map(from_micros),
        created_at: from_micros(r.try_get("created_at")?),
        evacuation_requested_at: r
            .try_get::<Option<i64>, _>("evacuation_requested_at")?
            .map(from_micros),
    })
}

impl HostRecord {
    /// The scheduler's view of this host.
    pub fn candidate(&self) -> HostCandidate {
        HostCandidate {
            id: self.id.clone(),
            name: self.name.clone(),
            reachable: self.state == "ready",
            cordoned: self.cordoned,
            degraded: !self.problems.is_empty(),
            capacity: self.capacity,
            allocated: self.allocated,
        }
    }
}

/// Every host with its allocation, read for a placement. Nothing is locked: the claim
/// (`allocation_claim_in_txn`) checks again, on the one row it spends.
pub(crate) async fn hosts_for_placement(
    tx: &mut Transaction<'static, Any>,
) -> Result<Vec<HostRecord>> {
    let rows = sqlx::query(&select_sql("ORDER BY h.name"))
        .fetch_all(&mut **tx)
        .await?;
    rows.iter().map(from_row).collect()
}

/// Spends `need` of host `host_id`'s capacity for `machines` machines, if it still fits there and the
/// host still takes machines (ready, not cordoned, no problems), as committed now: one
/// conditional update of one row, so two replicas placing on one host at once take turns on
/// that row only and the second sees what the first spent. False when it no longer fits.
pub(crate) async fn allocation_claim_in_txn(
    tx: &mut Transaction<'static, Any>,
    host_id: &str,
    machines: i64,
    need: Resources,
) -> Result<bool> {
    let claimed = sqlx::query(
        "UPDATE hosts SET allocated_machines = allocated_machines + $5, \
         allocated_vcpus = allocated_vcpus + $2, allocated_memory_mib = allocated_memory_mib + $3, \
         allocated_disk_gib = allocated_disk_gib + $4 \
         WHERE id = $1 AND state = 'ready' AND cordoned = 0 AND problems = '' \
         AND allocated_vcpus + $2 <= vcpus AND allocated_memory_mib + $3 <= memory_mib \
         AND allocated_disk_gib + $4 <= disk_gib",
    )
    .bind(host_id)
    .bind(need.vcpus)
    .bind(need.memory_mib)
    .bind(need.disk_gib)
    .bind(machines)
    .execute(&mut **tx)
    .await?;
    Ok(claimed.rows_affected() == 1)
}

/// Gives back what one machine of size `size` held on host `host_id` (it was stamped deleted).
pub(crate) async fn allocation_release_in_txn(
    tx: &mut Transaction<'static, Any>,
    host_id: &str,
    size: Resources,
) -> Result<()> {
    sqlx::query(
        "UPDATE hosts SET allocated_machines = allocated_machines - 1, \
         allocated_vcpus = allocated_vcpus - $2, allocated_memory_mib = allocated_memory_mib - $3, \
         allocated_disk_gib = allocated_disk_gib - $4 WHERE id = $1",
    )
    .bind(host_id)
    .bind(size.vcpus)
    .bind(size.memory_mib)
    .bind(size.disk_gib)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A host whose kept allocation differs from the sum of its live machines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationDrift {
    pub host_name: String,
    pub kept: (i64, Resources),
    pub placed: (i64, Resources),
}

impl Store {
    /// Every host, by name.
    pub async fn host_list(&self) -> Result<Vec<HostRecord>> {
        let rows = sqlx::query(&select_sql("ORDER BY h.name"))
            .fetch_all(self.reader())
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// Hosts whose kept allocation is not the sum of the live machines placed there; empty when
    /// the books balance. It reads every live machine: for tests, benchmarks and audits, not
    /// for a request path.
    pub async fn allocation_drift(&self) -> Result<Vec<AllocationDrift>> {
        let rows = sqlx::query(
            "SELECT h.name, h.allocated_machines, h.allocated_vcpus, h.allocated_memory_mib, \
             h.allocated_disk_gib, COALESCE(a.machines, 0) AS machines, \
             COALESCE(a.vcpus, 0) AS vcpus, COALESCE(a.memory_mib, 0) AS memory_mib, \
             COALESCE(a.disk_gib, 0) AS disk_gib FROM hosts h LEFT JOIN \
             (SELECT host_id, COUNT(*) AS machines, CAST(SUM(vcpus) AS BIGINT) AS vcpus, \
              CAST(SUM(memory_mib) AS BIGINT) AS memory_mib, \
              CAST(SUM(disk_gib) AS BIGINT) AS disk_gib FROM machines \
              WHERE host_id IS NOT NULL AND deleted_at IS NULL GROUP BY host_id) a \
             ON a.host_id = h.id ORDER BY h.name",
        )
        .fetch_all(self.reader())
        .await?;
        let mut drift = Vec::new();
        for r in &rows {
            let kept = (
                r.try_get("allocated_machines")?,
                Resources {
                    vcpus: r.try_get("allocated_vcpus")?,
                    memory_mib: r.try_get("allocated_memory_mib")?,
                    disk_gib: r.try_get("allocated_disk_gib")?,
                },
            );
            let placed = (
                r.try_get("machines")?,
                Resources {
                    vcpus: r.try_get("vcpus")?,
                    memory_mib: r.try_get("memory_mib")?,
                    disk_gib: r.try_get("disk_gib")?,
                },
            );
            if kept != placed {
                drift.push(AllocationDrift {
                    host_name: r.try_get("name")?,
                    kept,
                    placed,
                });
            }
        }
        Ok(drift)
    }

    /// One host.
    pub async fn host_get(&self, id: &str) -> Result<Option<HostRecord>> {
        let row = sqlx::query(&select_sql("WHERE h.id = $1"))
            .bind(id)
            .fetch_optional(self.reader())
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// A host by name.
    pub async fn host_by_name(&self, name: &str) -> Result<Option<HostRecord>> {
        let row = sqlx::query(&select_sql("WHERE h.name = $1"))
            .bind(name)
            .fetch_optional(self.reader())
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Registers a host or, when one with this name exists, updates it (address, capacity,
    /// versions) and marks it ready; its id, cordon and machines are kept.
    ///
    /// `authorize` decides, inside the transaction and with the host's row locked, whether
    /// the caller may register this name (see `agents::registry::decide_registration`); when
    /// it answers `Join`, a credential is issued with the registration, atomically, so two
    /// agents joining one name at once cannot both get one.
    pub async fn host_register(
        &self,
        reg: &HostRegistration,
        authorize: impl FnOnce(Option<&HostIdentity>) -> RegisterDecision,
    ) -> Result<Registered> {
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        // Locks the row on PostgreSQL; SQLite's single writer serialises anyway.
        sqlx::query("UPDATE hosts SET name = name WHERE name = $1")
            .bind(&reg.name)
            .execute(&mut *tx)
            .await?;
        let existing = sqlx::query(
            "SELECT id, state, credential_issued, credential_generation FROM hosts WHERE name = $1",
        )
        .bind(&reg.name)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| {
            Ok::<_, sqlx::Error>((
                HostIdentity {
                    id: r.try_get("id")?,
                    credential_issued: r.try_get::<i64, _>("credential_issued")? != 0,
                    credential_generation: r.try_get("credential_generation")?,
                },
                r.try_get::<String, _>("state")?,
            ))
        })
        .transpose()?;
        let decision = authorize(existing.as_ref().map(|(identity, _)| identity));
        let issue = match decision {
            RegisterDecision::Refuse(why) => return Ok(Registered::Refused(why)),
            RegisterDecision::Join => true,
            RegisterDecision::Rejoin => false,
        };
        let was_unreachable = existing.as_ref().is_some_and(|(_, s)| s == "unreachable");
        let generation = existing
            .as_ref()
            .map_or(0, |(identity, _)| identity.credential_generation);
        let id = match existing.map(|(identity, _)| identity.id) {
            Some(id) => {
                sqlx::query(
                    "UPDATE hosts SET grpc_address = $1, hypervisor = $2, agent_version = $3, \
                     domain_prefix = $4, vcpus = $5, memory_mib = $6, disk_gib = $7, \
                     state = 'ready', last_heartbeat_at = $8, updated_at = $8 WHERE id = $9",
                )
                .bind(&reg.grpc_address)
                .bind(&reg.hypervisor)
                .bind(&reg.agent_version)
                .bind(&reg.domain_prefix)
                .bind(reg.capacity.vcpus)
                .bind(reg.capacity.memory_mib)
                .bind(reg.capacity.disk_gib)
                .bind(now)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
                id
            }
            None => {
                let id = uuid::Uuid::now_v7().to_string();
                let inserted = sqlx::query(
                    "INSERT INTO hosts (id, name, grpc_address, state, hypervisor, vcpus, \
                     memory_mib, disk_gib, last_heartbeat_at, created_at, agent_version, \
                     domain_prefix, updated_at, cordoned) \
                     VALUES ($1, $2, $3, 'ready', $4, $5, $6, $7, $8, $8, $9, $10, $8, 0)",
                )
                .bind(&id)
                .bind(&reg.name)
                .bind(&reg.grpc_address)
                .bind(&reg.hypervisor)
                .bind(reg.capacity.vcpus)
                .bind(reg.capacity.memory_mib)
                .bind(reg.capacity.disk_gib)
                .bind(now)
                .bind(&reg.agent_version)
                .bind(&reg.domain_prefix)
                .execute(&mut *tx)
                .await;
                match inserted {
                    // Another agent inserted this name a moment ago, with the join token too.
                    Err(e) if is_unique_violation(&e) => {
                        return Ok(Registered::Refused(Refusal::HoldsCredential))
                    }
                    other => other?,
                };
                id
            }
        };
        if issue {
            sqlx::query("UPDATE hosts SET credential_issued = 1 WHERE id = $1")
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
        if was_unreachable {
            note_machines_on_host_in_txn(&mut tx, &id, "reconcile", REACHABLE_AGAIN, now).await?;
        }
        // A host joined, or came back with what it offers now.
        capacity_changed_in_txn(&mut tx, self.backend()).await?;
        tx.commit().await?;
        Ok(Registered::Accepted {
            id,
            was_unreachable,
            issued_generation: issue.then_some(generation),
        })
    }

    /// A host's credential state by id, for checking a heartbeat's bearer, and what its row
    /// says the host last reported: a heartbeat that reports the same of a ready host changes
    /// nothing but the time ([`Store::host_heartbeats_record`]).
    pub async fn host_for_heartbeat(&self, id: &str) -> Result<Option<(HostIdentity, HostReport)>> {
        let row = sqlx::query(
            "SELECT id, credential_issued, credential_generation, state, problems, \
             vcpus, memory_mib, disk_gib FROM hosts WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(self.reader())
        .await?;
        row.map(|r| {
            Ok((
                HostIdentity {
                    id: r.try_get("id")?,
                    credential_issued: r.try_get::<i64, _>("credential_issued")? != 0,
                    credential_generation: r.try_get("credential_generation")?,
                },
                HostReport {
                    ready: r.try_get::<String, _>("state")? == "ready",
                    problems: r.try_get("problems")?,
                    capacity: Resources {
                        vcpus: r.try_get("vcpus")?,
                        memory_mib: r.try_get("memory_mib")?,
                        disk_gib: r.try_get("disk_gib")?,
                    },
                },
            ))
        })
        .transpose()
    }

    /// Records heartbeats that change nothing but the time, for many hosts in a few
    /// statements (at most [`HEARTBEATS_PER_STATEMENT`] hosts each). Each host's time is when
    /// it was heard (`heard`, on this process's monotonic clock, placed on the database's
    /// clock), never later, and never moves a host's last heartbeat back. A host no longer
    /// ready (marked unreachable meanwhile) is left alone, and its next heartbeat goes through
    /// [`Store::host_heartbeat`]. Returns how many hosts were recorded.
    pub async fn host_heartbeats_record(&self, heard: &[(String, Instant)]) -> Result<u64> {
        let now = self.clock().await?;
        let read_at = Instant::now();
        let mut recorded = 0;
        for chunk in heard.chunks(HEARTBEATS_PER_STATEMENT) {
            // $1 is now; each host takes $2k (its id) and $2k+1 (when it was heard).
            let ids = (1..=chunk.len())
                .map(|k| format!("${}", 2 * k))
                .collect::<Vec<_>>()
                .join(", ");
            let times = (1..=chunk.len())
                .map(|k| format!("WHEN ${} THEN ${}", 2 * k, 2 * k + 1))
                .collect::<Vec<_>>()
                .join(" ");
            // On PostgreSQL the rows are locked first, in id order, as placement claims lock
            // them: an UPDATE alone locks in whatever order its scan takes, and could wait on
            // a claim that waits on it.
            let sql = match self.backend() {
                Backend::Postgres => format!(
                    "UPDATE hosts SET last_heartbeat_at = \
                     GREATEST(last_heartbeat_at, CASE id {times} END), updated_at = $1 \
                     WHERE id IN (SELECT id FROM hosts WHERE state = 'ready' \
                     AND id IN ({ids}) ORDER BY id FOR UPDATE) AND state = 'ready'"
                ),
                Backend::Sqlite => format!(
                    "UPDATE hosts SET last_heartbeat_at = \
                     MAX(COALESCE(last_heartbeat_at, 0), CASE id {times} END), updated_at = $1 \
                     WHERE state = 'ready' AND id IN ({ids})"
                ),
            };
            let mut q = sqlx::query(&sql).bind(to_micros(now));
            for (id, at) in chunk {
                let ago = chrono::Duration::from_std(read_at.saturating_duration_since(*at))
                    .unwrap_or_default();
                q = q.bind(id).bind(to_micros(now - ago));
            }
            recorded += q.execute(&self.write).await?.rows_affected();
        }
        Ok(recorded)
    }

    /// Retires the host's credential (its generation goes up) and lets the join token
    /// register the name again: for an operator whose agent lost its credential file.
    /// False when there is no such host.
    pub async fn host_credential_reset(&self, name: &str) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE hosts SET credential_generation = credential_generation + 1, \
             credential_issued = 0, updated_at = $2 WHERE name = $1",
        )
        .bind(name)
        .bind(to_micros(self.clock().await?))
        .execute(&self.write)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Records a heartbeat (with the capacity and the problems it reports); the host is ready
    /// again. `None` when there is no such host.
    pub async fn host_heartbeat(
        &self,
        id: &str,
        capacity: Resources,
        problems: &[String],
    ) -> Result<Option<HeartbeatChange>> {
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let Some(row) = sqlx::query(
            "SELECT state, problems, vcpus, memory_mib, disk_gib FROM hosts WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let state: String = row.try_get("state")?;
        let before: String = row.try_get("problems")?;
        let offered = Resources {
            vcpus: row.try_get("vcpus")?,
            memory_mib: row.try_get("memory_mib")?,
            disk_gib: row.try_get("disk_gib")?,
        };
        let problems = problems.join("\n");
        sqlx::query(
            "UPDATE hosts SET state = 'ready', last_heartbeat_at = $1, updated_at = $1, \
             vcpus = $2, memory_mib = $3, disk_gib = $4, problems = $5 WHERE id = $6",
        )
        .bind(now)
        .bind(capacity.vcpus)
        .bind(capacity.memory_mib)
        .bind(capacity.disk_gib)
        .bind(&problems)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if state == "unreachable" {
            note_machines_on_host_in_txn(&mut tx, id, "reconcile", REACHABLE_AGAIN, now).await?;
        }
        if state == "unreachable" || before != problems || offered != capacity {
            capacity_changed_in_txn(&mut tx, self.backend()).await?;
        }
        tx.commit().await?;
        Ok(Some(HeartbeatChange {
            was_unreachable: state == "unreachable",
            problems_changed: before != problems,
        }))
    }

    /// Marks ready hosts whose last heartbeat is older than `before` unreachable, in one
    /// statement (a heartbeat landing meanwhile is not overwritten, and of two replicas only
    /// one reports each host); returns their names. Each host's live machines get the
    /// event `note(host name)` in the same transaction.
    pub async fn host_mark_unreachable(
        &self,
        before: DateTime<Utc>,
        note: impl Fn(&str) -> String,
    ) -> Result<Vec<String>> {
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let rows = sqlx::query(
            "UPDATE hosts SET state = 'unreachable', updated_at = $1 WHERE state = 'ready' \
             AND (last_heartbeat_at IS NULL OR last_heartbeat_at < $2) RETURNING id, name",
        )
        .bind(now)
        .bind(to_micros(before))
        .fetch_all(&mut *tx)
        .await?;
        let mut names = Vec::with_capacity(rows.len());
        for r in &rows {
            let (id, name): (String, String) = (r.try_get("id")?, r.try_get("name")?);
            note_machines_on_host_in_txn(&mut tx, &id, "reconcile", &note(&name), now).await?;
            names.push(name);
        }
        tx.commit().await?;
        Ok(names)
    }

    /// Cordons (no new machines) or uncordons a host; uncordoning ends an evacuation (moves
    /// under way finish, none is started).
    pub async fn host_set_cordoned(&self, id: &str, cordoned: bool) -> Result<HostRecord> {
        let now = to_micros(self.clock().await?);
        let mut tx = self.begin_write().await?;
        let res = sqlx::query(
            "UPDATE hosts SET cordoned = $1, updated_at = $2, evacuation_requested_at = \
             CASE WHEN $1 = 0 THEN NULL ELSE evacuation_requested_at END WHERE id = $3",
        )
        .bind(i64::from(cordoned))
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if res.rows_affected() == 0 {
            return Err(Error::NotFound("host"));
        }
        if !cordoned {
            capacity_changed_in_txn(&mut tx, self.backend()).await?;
        }
        tx.commit().await?;
        self.host_get(id).await?.ok_or(Error::NotFound("host"))
    }
}
