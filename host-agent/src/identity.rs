//! The host's identity towards the control plane: the join token it starts with, the host
//! credential it is issued on joining (kept in the data dir, 0600), and so which bearer the
//! agent's own gRPC server admits.
//!
//! Until the host has a credential the server admits the join token (an agent that has not
//! joined yet, or runs without a control plane); from the moment it has one it admits that
//! credential only, which the control plane derives per host. Whoever holds the shared join
//! token can then no longer drive this host's machines, read their consoles or stop them.

use proto::bearer::BearerAuth;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tonic::{Request, Status};

/// Shared by the server's interceptor and the registration loop; cheap to clone.
#[derive(Clone)]
pub struct Credentials {
    join: BearerAuth,
    own: Arc<RwLock<Option<Credential>>>,
    file: Option<PathBuf>,
}

#[derive(Clone)]
struct Credential {
    token: String,
    auth: BearerAuth,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("has_credential", &self.credential().is_some())
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Starts from `join_token`, and from the credential kept in `file` when there is one.
    /// `None` keeps a credential in memory only (tests).
    pub fn new(join_token: &str, file: Option<PathBuf>) -> Self {
        let identity = Self {
            join: BearerAuth::new(join_token),
            own: Arc::default(),
            file,
        };
        if let Some(token) = identity.file.as_deref().and_then(load) {
            identity.set(Some(token));
        }
        identity
    }

    /// The host's credential, once issued.
    pub fn credential(&self) -> Option<String> {
        self.read().as_ref().map(|c| c.token.clone())
    }

    /// Takes the credential the control plane issued: kept in the file first (so a restart
    /// is still this host), then admitted instead of the join token.
    pub fn adopt(&self, credential: &str) -> std::io::Result<()> {
        let stored = match &self.file {
            Some(path) => store(path, credential),
            None => Ok(()),
        };
        self.set(Some(credential.to_owned()));
        stored
    }

    /// Whether `header` (the raw `authorization` value) is what this agent admits now.
    pub fn admits(&self, header: &[u8]) -> bool {
        match self.read().as_ref() {
            Some(own) => own.auth.admits(header),
            None => self.join.admits(header),
        }
    }

    fn set(&self, token: Option<String>) {
        let credential = token.map(|token| Credential {
            auth: BearerAuth::new(&token),
            token,
        });
        *self.own.write().unwrap_or_else(|p| p.into_inner()) = credential;
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Option<Credential>> {
        self.own.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match request.metadata().get("authorization") {
            Some(v) if self.admits(v.as_bytes()) => Ok(request),
            // One answer for missing and wrong, like the REST API's 401.
            _ => Err(Status::unauthenticated(
                "missing or wrong bearer token in the authorization metadata",
            )),
        }
    }
}

/// The credential kept in `path`, if there is a usable one (visible ASCII, like any bearer).
fn load(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let token = text.trim();
    if !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic()) {
        Some(token.to_owned())
    } else {
        tracing::warn!(path = %path.display(), "ignoring an unusable host credential file");
        None
    }
}

/// Keeps the credential in `path` (0600, written whole and renamed into place).
fn store(path: &Path, credential: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(credential.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOIN: &str = "the shared join token";
    const OWN: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";

    fn bearer(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    #[test]
    fn the_join_token_is_admitted_only_until_a_credential_is_adopted() {
        let id = Credentials::new(JOIN, None);
        assert!(id.admits(&bearer(JOIN)));
        assert!(!id.admits(&bearer(OWN)));
        id.adopt(OWN).unwrap();
        assert!(id.admits(&bearer(OWN)));
        assert!(
            !id.admits(&bearer(JOIN)),
            "the join token no longer drives this host"
        );
        // A new credential (after an operator's reset) replaces the old one.
        let next = "ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210zyxwvut";
        id.adopt(next).unwrap();
        assert!(id.admits(&bearer(next)) && !id.admits(&bearer(OWN)));
        assert!(!id.admits(&bearer(JOIN)));
    }

    #[test]
    fn the_credential_is_kept_private_and_survives_a_restart() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host-credential");
        let first = Credentials::new(JOIN, Some(path.clone()));
        assert!(first.credential().is_none());
        first.adopt(OWN).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let restarted = Credentials::new(JOIN, Some(path.clone()));
        assert_eq!(restarted.credential().as_deref(), Some(OWN));
        assert!(!restarted.admits(&bearer(JOIN)));
        std::fs::write(&path, "bad\u{1}token").unwrap();
        assert!(Credentials::new(JOIN, Some(path)).credential().is_none());
    }
}
