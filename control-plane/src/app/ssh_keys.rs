//! Tenants' saved SSH keys, which machines may reference by name.

use super::{App, Page, Principal};
use crate::error::{Error, Result};
use crate::model::ssh_key::SshPublicKey;
use crate::model::SavedSshKey;
use uuid::Uuid;

/// Most keys one user may save: plenty for every device a person has, and it bounds what a
/// tenant can store (each key is at most `proto::ssh_key::MAX_KEY_LINE_BYTES`).
pub const MAX_SAVED_KEYS: i64 = 100;

/// Saved-key names: 1–64 of letters, digits, `-`, `_`, `.`, `@`.
pub fn is_key_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

impl App {
    pub async fn ssh_key_add(
        &self,
        who: Principal,
        name: &str,
        public_key: &str,
    ) -> Result<SavedSshKey> {
        let name_ok = is_key_name(name);
        if !name_ok {
            return Err(Error::Invalid(
                "name must be 1 to 64 characters of letters, digits, '-', '_', '.', '@'".into(),
            ));
        }
        let key = SshPublicKey::parse(public_key).map_err(|e| Error::Invalid(e.to_string()))?;
        self.store
            .ssh_key_create(
                who.user_id,
                name,
                key.as_openssh(),
                key.fingerprint(),
                MAX_SAVED_KEYS,
            )
            .await
    }

    /// One page in name order.
    pub async fn ssh_key_list(
        &self,
        who: Principal,
        after_name: Option<&str>,
        limit: i64,
    ) -> Result<Page<SavedSshKey>> {
        let rows = self
            .store
            .ssh_key_list(who.user_id, after_name, limit + 1)
            .await?;
        Ok(Page::from_overfetch(rows, limit))
    }

    pub async fn ssh_key_delete(&self, who: Principal, id: Uuid) -> Result<()> {
        if self.store.ssh_key_delete(who.user_id, id).await? {
            Ok(())
        } else {
            Err(Error::NotFound("ssh key"))
        }
    }
}
