//! The CLI's connection to the API: where it is, the saved tokens (in the user's config dir,
//! mode 0600), saved again when the client refreshed them, and every client error as one
//! clear line (a problem document with its request id).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use skygate_api_types::LoginParams;
use skygate_client::{Client, ClientError, Tokens};

/// A failure the CLI reports as one line and a non-zero exit status.
#[derive(Debug)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub type CliResult<T> = Result<T, CliError>;

pub fn fail<T>(message: impl Into<String>) -> CliResult<T> {
    Err(CliError(message.into()))
}

/// What `login` saves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    pub api: String,
    pub username: String,
    pub access_token: String,
    pub refresh_token: String,
}

/// Where credentials live: `$SKYGATE_CONFIG_DIR`, else `$XDG_CONFIG_HOME/skygate`, else
/// `~/.config/skygate`.
pub fn config_dir() -> CliResult<PathBuf> {
    if let Some(dir) = std::env::var_os("SKYGATE_CONFIG_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME") {
        return Ok(PathBuf::from(dir).join("skygate"));
    }
    match std::env::var_os("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".config/skygate")),
        None => fail("cannot find a config directory: set SKYGATE_CONFIG_DIR or HOME"),
    }
}

fn credentials_path() -> CliResult<PathBuf> {
    Ok(config_dir()?.join("credentials.json"))
}

pub fn load_credentials() -> CliResult<Option<Credentials>> {
    let path = credentials_path()?;
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| CliError(format!("{}: {e} (log in again)", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => fail(format!("{}: {e}", path.display())),
    }
}

/// Writes the credentials readable by the user only (the directory 0700, the file 0600),
/// through a temporary file renamed into place.
pub fn save_credentials(c: &Credentials) -> CliResult<()> {
    let dir = config_dir()?;
    std::fs::create_dir_all(&dir).map_err(|e| CliError(format!("{}: {e}", dir.display())))?;
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    let path = credentials_path()?;
    let text = serde_json::to_string_pretty(c).unwrap_or_default();
    write_private(&path, text.as_bytes())
        .map_err(|e| CliError(format!("writing {}: {e}", path.display())))
}

/// Replaces `path` with `bytes`, readable by the user only (0600), through `<path>.tmp` renamed
/// into place: a reader never sees half a file, and a crash leaves the old one.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // An existing temporary file keeps its mode through open(): set it again.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

pub fn forget_credentials() -> CliResult<()> {
    let path = credentials_path()?;
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => fail(format!("{}: {e}", path.display())),
    }
}

/// The API client with the saved session, if any; a session the client renews is saved.
pub struct Api {
    client: Client,
    creds: Option<Credentials>,
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        CliError(match e {
            ClientError::NotLoggedIn => "not logged in: run `skygate login` first".to_owned(),
            ClientError::SessionExpired { source } => {
                format!("the session has expired; run `skygate login` again ({source})")
            }
            ClientError::Api(problem) => problem.to_string(),
            other => error_chain(&other),
        })
    }
}

/// An error and its causes, each once: "cannot reach http://...: error sending request: ...".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
}

impl Api {
    /// `api` from the flag, else the saved session's, else the default. With `SKYGATE_TOKEN`
    /// set (an API token, for scripts), requests carry it instead of the saved session.
    pub fn new(api: Option<String>) -> CliResult<Api> {
        let creds = load_credentials()?;
        if let Some(token) = std::env::var("SKYGATE_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
        {
            let base = api
                .or_else(|| creds.as_ref().map(|c| c.api.clone()))
                .unwrap_or_else(|| "http://127.0.0.1:8080".into());
            let tokens = Tokens {
                access_token: token,
                refresh_token: String::new(),
            };
            return Ok(Api {
                client: Client::new(&base, Some(tokens))?,
                creds: None,
            });
        }
        let base = api
            .or_else(|| creds.as_ref().map(|c| c.api.clone()))
            .unwrap_or_else(|| "http://127.0.0.1:8080".into());
        let tokens = creds.as_ref().map(|c| Tokens {
            access_token: c.access_token.clone(),
            refresh_token: c.refresh_token.clone(),
        });
        Ok(Api {
            client: Client::new(&base, tokens)?,
            creds,
        })
    }

    pub fn base(&self) -> &str {
        self.client.base()
    }

    /// The typed client, for one call.
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// Saves the session again if a call refreshed it (the old refresh token is spent).
    pub fn save_renewed(&mut self) -> CliResult<()> {
        let (Some(creds), Some(tokens)) = (&mut self.creds, self.client.tokens()) else {
            return Ok(());
        };
        if creds.access_token == tokens.access_token && creds.refresh_token == tokens.refresh_token
        {
            return Ok(());
        }
        creds.access_token = tokens.access_token.clone();
        creds.refresh_token = tokens.refresh_token.clone();
        save_credentials(creds)
    }

    /// Logs in and saves the session.
    pub async fn login(&mut self, username: &str, password: &str) -> CliResult<()> {
        let pair = self
            .client
            .login(&LoginParams {
                username: username.to_owned(),
                password: password.to_owned(),
            })
            .await?;
        let creds = Credentials {
            api: self.client.base().to_owned(),
            username: username.to_owned(),
            access_token: pair.access_token,
            refresh_token: pair.refresh_token,
        };
        save_credentials(&creds)?;
        self.creds = Some(creds);
        Ok(())
    }

    /// Revokes the session's refresh tokens and forgets them locally.
    pub async fn logout(&mut self) -> CliResult<()> {
        // Forgetting locally matters most; a server that already dropped it is fine.
        let _ = self.client.logout().await;
        self.creds = None;
        forget_credentials()
    }
}
