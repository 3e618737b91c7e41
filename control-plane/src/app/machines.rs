//! Machines: create (validated, within quota, once per Idempotency-Key), read, list,
//! lifecycle requests, delete, events, console. What the requests start is carried out by
//! the workers; a delete of a machine never placed on a host completes at once.

use super::idempotency::{IdempotencyKey, KeyedStart};
use super::{App, Page, Principal};
use crate::agents::{AgentCallError, AgentTarget};
use crate::error::{Error, Result};
use crate::model::machine_state::Action;
use crate::model::ssh_key::{InvalidSshKey, SshPublicKey};
use crate::model::{Hostname, Machine, MachineEvent, MachineId, MachineStatus, RestartPolicy};
use crate::store::idempotency::ClaimedKey;
use crate::store::machine_reshape::{RebuildImage, Resize, Resized};
use crate::store::machines::{MachinePatch, NewMachine, Visibility};
use auth::Role;
use std::collections::BTreeMap;

/// Largest user_data accepted, in bytes (cloud-init's own practical limit is of this order).
pub const MAX_USER_DATA_BYTES: usize = 64 * 1024;
/// Most SSH keys one machine may carry.
pub const MAX_SSH_KEYS: usize = 32;

/// A tenant's request for a machine, as received.
#[derive(Debug, Clone)]
pub struct CreateMachine {
    pub hostname: String,
    pub image: String,
    pub vcpus: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
    /// Each entry is an OpenSSH public key or the name of one of the tenant's saved keys.
    pub ssh_keys: Vec<String>,
    pub user_data: Option<String>,
    pub restart_policy: RestartPolicy,
    pub labels: BTreeMap<String, String>,
}

/// What a create answered: the machine, and whether it was created by an earlier request
/// with the same Idempotency-Key (then it is shown as it is now).
#[derive(Debug, Clone)]
pub struct Created {
    pub machine: Machine,
    pub replayed: bool,
}

fn visibility(who: Principal) -> Visibility {
    match who.role {
        Role::Admin => Visibility::All,
        Role::User => Visibility::Owner(who.user_id),
    }
}

fn deprecated(image: &str) -> Error {
    Error::Invalid(format!(
        "image '{image}' is deprecated: new machines cannot use it (GET /images lists the others)"
    ))
}

fn check_range(what: &str, value: i64, min: i64, max: i64) -> Result<()> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{what} must be between {min} and {max}"
        )))
    }
}

impl App {
    /// Validates and records a new machine in `pending`. With an Idempotency-Key, the key
    /// records the machine in the same transaction, and a retry is answered with that machine
    /// instead of creating another; a failed attempt gives the key up for the next one.
    pub async fn machine_create(
        &self,
        who: Principal,
        req: CreateMachine,
        key: Option<IdempotencyKey<'_>>,
    ) -> Result<Created> {
        let Some(key) = key else {
            let machine = self.machine_create_once(who, req, None).await?;
            return Ok(Created {
                machine,
                replayed: false,
            });
        };
        let claim_id = match self
            .idempotency_start(who, key.key, &key.request_hash)
            .await?
        {
            KeyedStart::Replay { machine_id } => {
                // Deleted ones included: the key's request did create it.
                let machine = self
                    .store
                    .machine_history(machine_id)
                    .await?
                    .ok_or_else(|| {
                        Error::Internal(format!(
                            "idempotency key names unknown machine {machine_id}"
                        ))
                    })?;
                return Ok(Created {
                    machine,
                    replayed: true,
                });
            }
            KeyedStart::Run { claim_id } => claim_id,
        };
        let claimed = ClaimedKey {
            user: who.user_id,
            key: key.key,
            claim_id: &claim_id,
        };
        match self.machine_create_once(who, req, Some(claimed)).await {
            Ok(machine) => Ok(Created {
                machine,
                replayed: false,
            }),
            Err(e) => {
                self.idempotency_abandon(who, key.key, &claim_id).await;
                Err(e)
            }
        }
    }

    async fn machine_create_once(
        &self,
        who: Principal,
        req: CreateMachine,
        key: Option<ClaimedKey<'_>>,
    ) -> Result<Machine> {
        let hostname = Hostname::parse(&req.hostname).map_err(|e| Error::Invalid(e.to_string()))?;
        let l = self.settings.machine_limits;
        check_range("vcpus", req.vcpus, 1, l.max_vcpus)?;
        check_range(
            "memory_mib",
            req.memory_mib,
            l.min_memory_mib,
            l.max_memory_mib,
        )?;
        check_range("disk_gib", req.disk_gib, 1, l.max_disk_gib)?;
        if let Some(data) = &req.user_data {
            if data.contains('\0') {
                return Err(Error::Invalid(
                    "user_data must not contain NUL characters".into(),
                ));
            }
            if data.len() > MAX_USER_DATA_BYTES {
                return Err(Error::Invalid(format!(
                    "user_data must be at most {MAX_USER_DATA_BYTES} bytes"
                )));
            }
        }
        crate::model::labels::validate(&req.labels).map_err(Error::Invalid)?;
        if req.ssh_keys.len() > MAX_SSH_KEYS {
            return Err(Error::Invalid(format!("at most {MAX_SSH_KEYS} ssh_keys")));
        }
        let mut ssh_keys = Vec::with_capacity(req.ssh_keys.len());
        for entry in &req.ssh_keys {
            ssh_keys.push(self.resolve_ssh_key(who, entry).await?);
        }
        let image = self.image_for_machines(&req.image).await?;
        if image.deprecated_at.is_some() {
            return Err(deprecated(&image.name));
        }
        let new = NewMachine {
            owner_id: who.user_id,
            hostname,
            image_id: image.id,
            image_name: image.name.clone(),
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            disk_gib: req.disk_gib,
            ssh_keys,
            user_data: req.user_data,
            restart_policy: req.restart_policy,
            labels: req.labels,
        };
        // The owner's row is in this replica's account cache (authentication just read it).
        let quota = self
            .store
            .user_get(who.user_id)
            .await?
            .ok_or(Error::NotFound("user"))?
            .quota
            .over(self.settings.quota);
        let machine = self.store.machine_create(new, &quota, key).await?;
        self.shown_usage.forget(who.user_id);
        tracing::info!(machine_id = %machine.id, owner = %who.user_id, "machine created");
        Ok(machine)
    }

    /// A literal OpenSSH key, or a saved key of the caller's by name.
    async fn resolve_ssh_key(&self, who: Principal, entry: &str) -> Result<String> {
        let shown = entry
            .chars()
            .take(40)
            .collect::<String>()
            .escape_debug()
            .to_string();
        match SshPublicKey::parse(entry) {
            Ok(key) => return Ok(key.as_openssh().to_owned()),
            // A key that parses as one but breaks the line rule: say which rule.
            Err(InvalidSshKey::Line(rule)) if !super::ssh_keys::is_key_name(entry) => {
                return Err(Error::Invalid(format!("ssh_keys: '{shown}': {rule}")));
            }
            Err(_) => {}
        }
        if super::ssh_keys::is_key_name(entry) {
            if let Some(saved) = self.store.ssh_key_by_name(who.user_id, entry).await? {
                return Ok(saved.public_key);
            }
        }
        Err(Error::Invalid(format!(
            "ssh_keys: '{shown}' is neither an OpenSSH public key nor the name of one of your keys"
        )))
    }

    pub async fn machine_get(&self, who: Principal, id: MachineId) -> Result<Machine> {
        self.store
            .machine_get(id, visibility(who))
            .await?
            .ok_or(Error::NotFound("machine"))
    }

    /// Forgets a machine without its host's word (administrators): for a machine whose host
    /// is gone for good. Answers the machine as it is now, deleted.
    pub async fn machine_forget(&self, who: Principal, id: MachineId) -> Result<Machine> {
        who.require_admin()?;
        if !self.store.machine_forget(id).await? {
            return Err(Error::NotFound("machine"));
        }
        tracing::warn!(target: "skygate::audit", admin = %who.user_id, machine_id = %id, "machine forgotten");
        let machine = self
            .store
            .machine_history(id)
            .await?
            .ok_or(Error::NotFound("machine"))?;
        self.shown_usage.forget(machine.owner_id);
        Ok(machine)
    }

    /// Changes a machine's settings that need nothing of its host: restart policy, labels.
    pub async fn machine_patch(
        &self,
        who: Principal,
        id: MachineId,
        patch: MachinePatch,
    ) -> Result<Machine> {
        if let Some(labels) = &patch.labels {
            // What is set is checked here; the merged set's size in the store, which sees it.
            let set: BTreeMap<String, String> = labels
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
                .collect();
            crate::model::labels::validate(&set).map_err(Error::Invalid)?;
            if let Some(key) = labels.keys().find(|k| !crate::model::labels::is_key(k)) {
                return Err(Error::Invalid(format!(
                    "label key '{}' is not a valid key",
                    key.chars().take(64).collect::<String>().escape_debug()
                )));
            }
        }
        if patch.restart_policy.is_none() && patch.labels.is_none() {
            return self.machine_get(who, id).await;
        }
        self.store
            .machine_patch(id, visibility(who), &patch)
            .await?
            .ok_or(Error::NotFound("machine"))
    }

    /// Waits until machine `id` reaches `status` (or a status it cannot leave on its own:
    /// `failed`, `deleted`) and answers it; `None` at `timeout`. Sleeps between changes: it is
    /// woken by the machine's events (see `store::machine_watch`), never by a timer.
    pub async fn machine_wait(
        &self,
        who: Principal,
        id: MachineId,
        status: MachineStatus,
        timeout: std::time::Duration,
    ) -> Result<Option<Machine>> {
        let _open = self.long_requests.open(who.user_id)?;
        let deadline = tokio::time::Instant::now() + timeout;
        let changed = self.store.watch.subscribe(id);
        loop {
            // Armed before the read: a change between the read and the sleep still wakes it.
            let woken = changed.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let machine = match self.store.machine_get(id, visibility(who)).await? {
                Some(m) => m,
                // Gone from the live machines: deleted since (if it was ever the caller's).
                None => {
                    let gone = self
                        .store
                        .machine_history(id)
                        .await?
                        .filter(|m| who.role == Role::Admin || m.owner_id == who.user_id);
                    return gone.map(Some).ok_or(Error::NotFound("machine"));
                }
            };
            if machine.status == status
                || matches!(
                    machine.status,
                    MachineStatus::Failed | MachineStatus::Deleted
                )
            {
                return Ok(Some(machine));
            }
            tokio::select! {
                () = &mut woken => {}
                () = tokio::time::sleep_until(deadline) => return Ok(None),
            }
        }
    }

    /// One page, newest first.
    pub async fn machine_list(
        &self,
        who: Principal,
        status: Option<MachineStatus>,
        label: Option<&(String, String)>,
        before_seq: Option<i64>,
        limit: i64,
    ) -> Result<Page<Machine>> {
        let label = label.map(|(k, v)| (k.as_str(), v.as_str()));
        let rows = self
            .store
            .machine_list(visibility(who), status, label, before_seq, limit + 1)
            .await?;
        Ok(Page::from_overfetch(rows, limit))
    }

    /// Resizes a stopped machine (the parts given; the disk only grows), within its owner's
    /// quota and its host's room. `Unchanged` when it already has that size.
    pub async fn machine_resize(
        &self,
        who: Principal,
        id: MachineId,
        asked: Resize,
    ) -> Result<Resized> {
        let l = self.settings.machine_limits;
        if asked == Resize::default() {
            return Err(Error::Invalid(
                "name at least one of vcpus, memory_mib, disk_gib".into(),
            ));
        }
        if let Some(v) = asked.vcpus {
            check_range("vcpus", v, 1, l.max_vcpus)?;
        }
        if let Some(m) = asked.memory_mib {
            check_range("memory_mib", m, l.min_memory_mib, l.max_memory_mib)?;
        }
        if let Some(d) = asked.disk_gib {
            check_range("disk_gib", d, 1, l.max_disk_gib)?;
        }
        // The owner's limits (an administrator may resize a tenant's machine).
        let owner = self.machine_get(who, id).await?.owner_id;
        let quota = self
            .store
            .user_get(owner)
            .await?
            .ok_or(Error::NotFound("user"))?
            .quota
            .over(self.settings.quota);
        let resized = self
            .store
            .machine_resize(id, visibility(who), asked, &quota)
            .await?;
        self.shown_usage.forget(owner);
        Ok(resized)
    }

    /// Rebuilds a running or stopped machine from `image` (its own when `None`).
    pub async fn machine_rebuild(
        &self,
        who: Principal,
        id: MachineId,
        image: Option<&str>,
    ) -> Result<Machine> {
        let image = match image {
            None => None,
            Some(name) => {
                let image = self.image_for_machines(name).await?;
                let current = self.machine_get(who, id).await?;
                // Its own image stays usable for it: deprecation keeps new machines away.
                if image.deprecated_at.is_some() && image.name != current.image_name {
                    return Err(deprecated(&image.name));
                }
                Some(RebuildImage {
                    id: image.id.to_string(),
                    name: image.name,
                })
            }
        };
        self.store.machine_rebuild(id, visibility(who), image).await
    }

    /// The registered image named `name`, or 422 naming it.
    async fn image_for_machines(&self, name: &str) -> Result<crate::model::Image> {
        let unknown_image = || {
            let shown: String = name.chars().take(64).collect();
            Error::Invalid(format!("image '{shown}' does not exist"))
        };
        if !super::images::is_image_name(name) {
            return Err(unknown_image());
        }
        self.store
            .image_by_name(name)
            .await?
            .ok_or_else(unknown_image)
    }

    /// start / stop / reboot / delete. Without a host, a delete finishes at once.
    pub async fn machine_request(
        &self,
        who: Principal,
        id: MachineId,
        action: Action,
    ) -> Result<Machine> {
        self.store
            .machine_request(id, visibility(who), action)
            .await
    }

    /// A page of the machine's log, oldest first.
    pub async fn machine_events(
        &self,
        who: Principal,
        id: MachineId,
        after_seq: Option<i64>,
        limit: i64,
    ) -> Result<Page<MachineEvent>> {
        // Administrators read a deleted machine's log too: how it ended (forgotten, its
        // leftovers removed) is what they look for.
        let exists = match who.role {
            Role::Admin => self.store.machine_history(id).await?.is_some(),
            Role::User => self.store.machine_get(id, visibility(who)).await?.is_some(),
        };
        if !exists {
            return Err(Error::NotFound("machine"));
        }
        let rows = self.store.machine_events(id, after_seq, limit + 1).await?;
        Ok(Page::from_overfetch(rows, limit))
    }

    /// The tail of a machine's serial console, read from its host's agent.
    pub async fn machine_console(&self, who: Principal, id: MachineId) -> Result<Vec<u8>> {
        self.machine_get(who, id).await?;
        let m = self
            .store
            .machine_for_task(id)
            .await?
            .ok_or(Error::NotFound("machine"))?;
        let Some(host) = m.host else {
            return Err(Error::Conflict(
                "the machine is not on a host yet, so it has no console".into(),
            ));
        };
        let agents = self.agents.as_ref().ok_or(Error::Unavailable(
            "this control plane has no agent token configured",
        ))?;
        let tail = match agents.client(&AgentTarget::from(&host)) {
            Ok(client) => client.console(id).await,
            Err(e) => Err(e),
        };
        match tail {
            Ok(data) => Ok(data),
            Err(e) if e.is_gone() => Err(Error::Conflict(
                "the machine has no domain on its host (yet)".into(),
            )),
            Err(e @ AgentCallError::Setup { .. }) => {
                tracing::error!(host = %host.name, error = ?e, "no client for the machine's host");
                Err(Error::Internal(e.to_string()))
            }
            Err(e @ AgentCallError::Unreachable { .. }) => {
                tracing::warn!(host = %host.name, error = ?e, "console read failed");
                Err(Error::Unavailable(
                    "the machine's host did not answer; try again",
                ))
            }
            Err(e) => {
                // The agent answered with an error: the log has its words, the tenant a hint.
                tracing::warn!(host = %host.name, error = ?e, "console read failed");
                Err(Error::Unavailable(
                    "the machine's host could not read its console; try again",
                ))
            }
        }
    }
}
