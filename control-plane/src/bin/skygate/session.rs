//! The CLI's connection to the API: where it is, the saved tokens (in the user's config dir,
//! mode 0600), refreshing them when the access token has expired, and turning problem
//! documents into one clear line with the request id.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

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

/// An HTTP client for `api` (`http://host:port`), with the saved session if any.
pub struct Api {
    pub base: String,
    client: reqwest::Client,
    creds: Option<Credentials>,
}

/// One line for a failed call: the problem's title and detail and the request id.
fn problem_line(status: StatusCode, request_id: Option<String>, body: &str) -> String {
    let doc: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let title = doc["title"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
    let mut line = match doc["detail"].as_str() {
        Some(detail) if !detail.is_empty() && detail != title => format!("{title}: {detail}"),
        _ => title,
    };
    line.push_str(&format!(" (HTTP {}", status.as_u16()));
    if let Some(id) = doc["request_id"].as_str().map(str::to_owned).or(request_id) {
        line.push_str(&format!(", request id {id}"));
    }
    line.push(')');
    line
}

impl Api {
    /// `api` from the flag, else the saved session's, else the default.
    pub fn new(api: Option<String>) -> CliResult<Api> {
        let creds = load_credentials()?;
        let base = api
            .or_else(|| creds.as_ref().map(|c| c.api.clone()))
            .unwrap_or_else(|| "http://127.0.0.1:8080".into());
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|e| CliError(format!("HTTP client: {e}")))?;
        Ok(Api {
            base: base.trim_end_matches('/').to_owned(),
            client,
            creds,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    /// Calls the API without a session (login, register).
    pub async fn anonymous(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> CliResult<Value> {
        let (status, rid, text) = self.send(method, path, body, None).await?;
        if !status.is_success() {
            return fail(problem_line(status, rid, &text));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> CliResult<(StatusCode, Option<String>, String)> {
        let mut req = self.client.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| CliError(format!("cannot reach {}: {e}", self.base)))?;
        let status = resp.status();
        let rid = resp
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp.text().await.unwrap_or_default();
        Ok((status, rid, text))
    }

    /// Calls the API as the logged-in user; an expired access token is refreshed once (and
    /// the new pair saved) before giving up.
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> CliResult<Value> {
        let text = self.call_text(method, path, body).await?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Like [`Api::call`], returning the body as text (the console).
    pub async fn call_text(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> CliResult<String> {
        let Some(creds) = self.creds.clone() else {
            return fail("not logged in: run `skygate login` first");
        };
        let (mut status, mut rid, mut text) = self
            .send(
                method.clone(),
                path,
                body.clone(),
                Some(&creds.access_token),
            )
            .await?;
        if status == StatusCode::UNAUTHORIZED {
            self.refresh().await?;
            let token = self.creds.as_ref().map(|c| c.access_token.clone());
            (status, rid, text) = self.send(method, path, body, token.as_deref()).await?;
        }
        if !status.is_success() {
            return fail(problem_line(status, rid, &text));
        }
        Ok(text)
    }

    async fn refresh(&mut self) -> CliResult<()> {
        let Some(mut creds) = self.creds.clone() else {
            return fail("not logged in: run `skygate login` first");
        };
        let body = serde_json::json!({ "refresh_token": creds.refresh_token });
        let (status, rid, text) = self
            .send(Method::POST, "/auth/refresh", Some(body), None)
            .await?;
        if !status.is_success() {
            return fail(format!(
                "the session has expired; run `skygate login` again ({})",
                problem_line(status, rid, &text)
            ));
        }
        let pair: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        match (
            pair["access_token"].as_str(),
            pair["refresh_token"].as_str(),
        ) {
            (Some(a), Some(r)) => {
                creds.access_token = a.to_owned();
                creds.refresh_token = r.to_owned();
            }
            _ => return fail("the refresh answer had no tokens"),
        }
        save_credentials(&creds)?;
        self.creds = Some(creds);
        Ok(())
    }

    /// Logs in and saves the session.
    pub async fn login(&mut self, username: &str, password: &str) -> CliResult<()> {
        let body = serde_json::json!({ "username": username, "password": password });
        let pair = self
            .anonymous(Method::POST, "/auth/login", Some(body))
            .await?;
        let creds = Credentials {
            api: self.base.clone(),
            username: username.to_owned(),
            access_token: pair["access_token"].as_str().unwrap_or_default().to_owned(),
            refresh_token: pair["refresh_token"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        };
        save_credentials(&creds)?;
        self.creds = Some(creds);
        Ok(())
    }

    /// Revokes the session's refresh tokens and forgets them locally.
    pub async fn logout(&mut self) -> CliResult<()> {
        if let Some(c) = self.creds.take() {
            let body = serde_json::json!({ "refresh_token": c.refresh_token });
            // Forgetting locally matters most; a server that already dropped it is fine.
            let _ = self
                .send(Method::POST, "/auth/logout", Some(body), None)
                .await;
        }
        forget_credentials()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_read_as_one_line_with_the_request_id() {
        let body = r#"{"type":"urn:skygate:problem:conflict","title":"Conflict","status":409,
            "detail":"cannot stop a machine that is stopped","request_id":"req-1"}"#;
        assert_eq!(
            problem_line(StatusCode::CONFLICT, None, body),
            "Conflict: cannot stop a machine that is stopped (HTTP 409, request id req-1)"
        );
        assert_eq!(
            problem_line(StatusCode::BAD_GATEWAY, Some("r2".into()), "<html>"),
            "Bad Gateway (HTTP 502, request id r2)"
        );
    }
}
