//! A typed client of SkyGate's REST API (`/api/v1`, API.md): one method per call, the
//! request and response bodies of `skygate-api-types`, and one error type whose message is the
//! server's problem document in one line, with the request id to quote.
//!
//! The session (access and refresh token) is held here: a call answered 401 refreshes the
//! pair once and is sent again. Where the tokens are kept between runs is the caller's
//! business ([`Client::tokens`]).

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use skygate_api_types::{
    AddSshKeyParams, AuditEventPage, CreateMachineParams, CreateTokenParams, CreatedTokenView,
    EventPage, HostList, HostView, ImageList, ImageView, ListMachinesQuery, ListUsersQuery,
    LoginParams, MachinePage, MachinePatch, MachineStatus, MachineView, PageQuery, Problem,
    ProfileView, QuotaParams, QuotaView, RebuildParams, ReconcilerView, RefreshParams,
    RegisterImageParams, RegisterParams, ResizeParams, RoleName, SshKeyList, SshKeyView, TokenList,
    TokenPairView, UserList, UserPatch, UserView, WaitQuery,
};
use std::time::Duration;

/// A session: what `login` returns and `refresh` renews.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub access_token: String,
    pub refresh_token: String,
}

/// A machine's lifecycle request (`POST /machines/{id}/start|stop|reboot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineAction {
    Start,
    Stop,
    Reboot,
}

impl MachineAction {
    fn path(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Reboot => "reboot",
        }
    }
}

/// What went wrong with a call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer: the server is down, the address wrong, the connection cut.
    #[error("cannot reach {base}")]
    Unreachable {
        base: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server refused the call; the message is its problem document.
    #[error("{0}")]
    Api(ApiError),
    /// The answer is not what API.md says it is.
    #[error("the answer to {call} is not what the API documents")]
    Decode {
        call: String,
        #[source]
        source: serde_json::Error,
    },
    /// A call that needs a session, without one.
    #[error("not logged in")]
    NotLoggedIn,
    /// The refresh token was refused: logging in again is the only way on.
    #[error("the session has expired")]
    SessionExpired {
        #[source]
        source: ApiError,
    },
    /// The HTTP client could not be built (TLS roots).
    #[error("cannot build an HTTP client")]
    Build {
        #[source]
        source: reqwest::Error,
    },
}

impl ClientError {
    /// The HTTP status the server answered with, when it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api(e) | Self::SessionExpired { source: e } => Some(e.status),
            _ => None,
        }
    }
}

/// An error answer: its status, its problem document when it sent one, its request id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", problem_line(.status, .problem.as_deref(), .request_id.as_deref()))]
pub struct ApiError {
    pub status: u16,
    pub problem: Option<Box<Problem>>,
    /// From the problem, else the `x-request-id` header.
    pub request_id: Option<String>,
}

/// One line: the problem's title and detail, the status and the request id.
fn problem_line(status: &u16, problem: Option<&Problem>, request_id: Option<&str>) -> String {
    let title = problem.map(|p| p.title.clone()).unwrap_or_else(|| {
        StatusCode::from_u16(*status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("error")
            .to_owned()
    });
    let mut line = match problem.map(|p| p.detail.as_str()) {
        Some(detail) if !detail.is_empty() && detail != title => format!("{title}: {detail}"),
        _ => title,
    };
    line.push_str(&format!(" (HTTP {status}"));
    if let Some(id) = request_id {
        line.push_str(&format!(", request id {id}"));
    }
    line.push(')');
    line
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// A client of one SkyGate API.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    tokens: Option<Tokens>,
}

impl Client {
    /// A client of `base` (`http://host:port`), with a session if one is given.
    pub fn new(base: &str, tokens: Option<Tokens>) -> Result<Client> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|source| ClientError::Build { source })?;
        Ok(Client {
            base: base.trim_end_matches('/').to_owned(),
            http,
            tokens,
        })
    }

    /// The API's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The current session (renewed by a refresh during any call).
    pub fn tokens(&self) -> Option<&Tokens> {
        self.tokens.as_ref()
    }

    // --- accounts and sessions -------------------------------------------------------------

    /// `POST /auth/register`.
    pub async fn register(&self, params: &RegisterParams) -> Result<UserView> {
        self.anonymous(Method::POST, "/auth/register", Some(params))
            .await
    }

    /// `POST /auth/login`; the session is kept for the calls that follow.
    pub async fn login(&mut self, params: &LoginParams) -> Result<TokenPairView> {
        let pair: TokenPairView = self
            .anonymous(Method::POST, "/auth/login", Some(params))
            .await?;
        self.tokens = Some(Tokens {
            access_token: pair.access_token.clone(),
            refresh_token: pair.refresh_token.clone(),
        });
        Ok(pair)
    }

    /// `POST /auth/logout`: revokes the session's token family; the session is forgotten here
    /// whatever the answer.
    pub async fn logout(&mut self) -> Result<()> {
        let Some(tokens) = self.tokens.clone() else {
            return Ok(());
        };
        let body = RefreshParams {
            refresh_token: tokens.refresh_token,
        };
        let answer = self
            .authorized(Method::POST, "/auth/logout", Some(&body))
            .await;
        self.tokens = None;
        answer?.empty()
    }

    /// `POST /auth/refresh`: a new pair for the session's refresh token.
    pub async fn refresh(&mut self) -> Result<()> {
        let Some(tokens) = &self.tokens else {
            return Err(ClientError::NotLoggedIn);
        };
        let body = RefreshParams {
            refresh_token: tokens.refresh_token.clone(),
        };
        let answer = self
            .send(Method::POST, "/auth/refresh", Some(&body), None)
            .await?;
        let pair: TokenPairView = match answer.json("POST /auth/refresh") {
            Err(ClientError::Api(source)) => return Err(ClientError::SessionExpired { source }),
            other => other?,
        };
        self.tokens = Some(Tokens {
            access_token: pair.access_token,
            refresh_token: pair.refresh_token,
        });
        Ok(())
    }

    /// `GET /auth/profile`: the caller's account, limits and usage.
    pub async fn profile(&mut self) -> Result<ProfileView> {
        self.call(Method::GET, "/auth/profile", None::<&()>).await
    }

    // --- API tokens -----------------------------------------------------------------------

    /// `POST /tokens`: the answer holds the secret, once.
    pub async fn create_token(&mut self, params: &CreateTokenParams) -> Result<CreatedTokenView> {
        self.call(Method::POST, "/tokens", Some(params)).await
    }

    /// `GET /tokens`.
    pub async fn tokens_list(&mut self) -> Result<TokenList> {
        self.call(Method::GET, "/tokens", None::<&()>).await
    }

    /// `DELETE /tokens/{id}`.
    pub async fn delete_token(&mut self, id: &str) -> Result<()> {
        self.call_empty(Method::DELETE, &format!("/tokens/{}", segment(id)))
            .await
    }

    // --- accounts (administrators) ---------------------------------------------------------

    /// `GET /users`, one page.
    pub async fn users(&mut self, query: &ListUsersQuery) -> Result<UserList> {
        self.call(Method::GET, &with_query("/users", query), None::<&()>)
            .await
    }

    /// Every account matching `query`'s filters, page after page.
    pub async fn all_users(&mut self, query: &ListUsersQuery) -> Result<Vec<UserView>> {
        let mut items = Vec::new();
        let mut query = ListUsersQuery {
            limit: Some(MAX_PAGE),
            cursor: None,
            ..query.clone()
        };
        loop {
            let list = self.users(&query).await?;
            items.extend(list.items);
            match list.next_cursor {
                Some(c) => query.cursor = Some(c),
                None => return Ok(items),
            }
        }
    }

    /// `POST /users/{id}/disable` or `enable`.
    pub async fn set_user_disabled(&mut self, id: &str, disabled: bool) -> Result<UserView> {
        let verb = if disabled { "disable" } else { "enable" };
        let path = format!("/users/{}/{verb}", segment(id));
        self.call(Method::POST, &path, None::<&()>).await
    }

    /// `PATCH /users/{id}`.
    pub async fn set_user_role(&mut self, id: &str, role: RoleName) -> Result<UserView> {
        let body = UserPatch { role };
        self.call(
            Method::PATCH,
            &format!("/users/{}", segment(id)),
            Some(&body),
        )
        .await
    }

    /// `GET /users/{id}/quota`.
    pub async fn quota(&mut self, id: &str) -> Result<QuotaView> {
        let path = format!("/users/{}/quota", segment(id));
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// `PUT /users/{id}/quota`.
    pub async fn set_quota(&mut self, id: &str, limits: &QuotaParams) -> Result<QuotaView> {
        let path = format!("/users/{}/quota", segment(id));
        self.call(Method::PUT, &path, Some(limits)).await
    }

    // --- SSH keys --------------------------------------------------------------------------

    /// `GET /ssh-keys`, one page.
    pub async fn ssh_keys(&mut self, page: &PageQuery) -> Result<SshKeyList> {
        self.call(Method::GET, &with_query("/ssh-keys", page), None::<&()>)
            .await
    }

    /// Every saved key, page after page.
    pub async fn all_ssh_keys(&mut self) -> Result<Vec<SshKeyView>> {
        let mut items = Vec::new();
        let mut page = PageQuery {
            limit: Some(MAX_PAGE),
            cursor: None,
        };
        loop {
            let list = self.ssh_keys(&page).await?;
            items.extend(list.items);
            match list.next_cursor {
                Some(c) => page.cursor = Some(c),
                None => return Ok(items),
            }
        }
    }

    /// `POST /ssh-keys`.
    pub async fn add_ssh_key(&mut self, params: &AddSshKeyParams) -> Result<SshKeyView> {
        self.call(Method::POST, "/ssh-keys", Some(params)).await
    }

    /// `DELETE /ssh-keys/{id}`.
    pub async fn delete_ssh_key(&mut self, id: &str) -> Result<()> {
        self.call_empty(Method::DELETE, &format!("/ssh-keys/{}", segment(id)))
            .await
    }

    // --- images ----------------------------------------------------------------------------

    /// `GET /images`.
    pub async fn images(&mut self) -> Result<ImageList> {
        self.call(Method::GET, "/images", None::<&()>).await
    }

    /// `POST /images` (administrators).
    pub async fn register_image(&mut self, params: &RegisterImageParams) -> Result<ImageView> {
        self.call(Method::POST, "/images", Some(params)).await
    }

    /// `POST /images/{id}/deprecate` or `undeprecate` (administrators).
    pub async fn set_image_deprecated(&mut self, id: &str, deprecated: bool) -> Result<ImageView> {
        let verb = if deprecated {
            "deprecate"
        } else {
            "undeprecate"
        };
        let path = format!("/images/{}/{verb}", segment(id));
        self.call(Method::POST, &path, None::<&()>).await
    }

    // --- hosts (administrators) ------------------------------------------------------------

    /// `GET /hosts`.
    pub async fn hosts(&mut self) -> Result<HostList> {
        self.call(Method::GET, "/hosts", None::<&()>).await
    }

    /// `GET /hosts/{id}`: one host, with its evacuation's progress.
    pub async fn host(&mut self, id: &str) -> Result<HostView> {
        let path = format!("/hosts/{}", segment(id));
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// `POST /hosts/{id}/evacuate`: cordons the host and moves its machines elsewhere.
    pub async fn evacuate_host(&mut self, id: &str) -> Result<HostView> {
        let path = format!("/hosts/{}/evacuate", segment(id));
        self.call(Method::POST, &path, None::<&()>).await
    }

    /// `POST /hosts/{id}/cordon` or `uncordon`.
    pub async fn set_cordoned(&mut self, id: &str, cordoned: bool) -> Result<HostView> {
        let verb = if cordoned { "cordon" } else { "uncordon" };
        let path = format!("/hosts/{}/{verb}", segment(id));
        self.call(Method::POST, &path, None::<&()>).await
    }

    /// `DELETE /hosts/{id}`.
    pub async fn delete_host(&mut self, id: &str) -> Result<()> {
        self.call_empty(Method::DELETE, &format!("/hosts/{}", segment(id)))
            .await
    }

    /// `GET /audit-events`, one page (newest first): all of it for administrators, your own
    /// calls and the logins tried in your name otherwise.
    pub async fn audit_events(&mut self, page: &PageQuery) -> Result<AuditEventPage> {
        self.call(Method::GET, &with_query("/audit-events", page), None::<&()>)
            .await
    }

    /// `GET /admin/reconciler` (administrators): the reconciler's last pass.
    pub async fn reconciler(&mut self) -> Result<ReconcilerView> {
        self.call(Method::GET, "/admin/reconciler", None::<&()>)
            .await
    }

    // --- machines --------------------------------------------------------------------------

    /// `POST /machines`.
    pub async fn create_machine(&mut self, params: &CreateMachineParams) -> Result<MachineView> {
        self.call(Method::POST, "/machines", Some(params)).await
    }

    /// `GET /machines`, one page.
    pub async fn machines(&mut self, query: &ListMachinesQuery) -> Result<MachinePage> {
        self.call(Method::GET, &with_query("/machines", query), None::<&()>)
            .await
    }

    /// Every machine (in `status`, when given), page after page.
    pub async fn all_machines(&mut self, status: Option<&str>) -> Result<Vec<MachineView>> {
        let query = ListMachinesQuery {
            status: status.map(str::to_owned),
            ..ListMachinesQuery::default()
        };
        self.all_machines_matching(&query).await
    }

    /// Every machine `query`'s filters (status, label) keep, page after page.
    pub async fn all_machines_matching(
        &mut self,
        query: &ListMachinesQuery,
    ) -> Result<Vec<MachineView>> {
        let mut items = Vec::new();
        let mut query = ListMachinesQuery {
            limit: Some(MAX_PAGE),
            cursor: None,
            ..query.clone()
        };
        loop {
            let page = self.machines(&query).await?;
            items.extend(page.items);
            match page.next_cursor {
                Some(c) => query.cursor = Some(c),
                None => return Ok(items),
            }
        }
    }

    /// `GET /machines/{id}`.
    pub async fn machine(&mut self, id: &str) -> Result<MachineView> {
        self.call(Method::GET, &machine_path(id, ""), None::<&()>)
            .await
    }

    /// `POST /machines/{id}/start|stop|reboot`.
    pub async fn machine_action(&mut self, id: &str, action: MachineAction) -> Result<MachineView> {
        let path = machine_path(id, &format!("/{}", action.path()));
        self.call(Method::POST, &path, None::<&()>).await
    }

    /// `GET /machines/{id}/wait`: the machine once it reaches `status` (or `failed`/`deleted`);
    /// an API error with status 408 when `timeout` (`30s`) passes first. Keep `timeout` under
    /// this client's 60 s request limit (ask again for longer waits).
    pub async fn wait_machine(
        &mut self,
        id: &str,
        status: MachineStatus,
        timeout: &str,
    ) -> Result<MachineView> {
        let query = WaitQuery {
            status: status.as_str().to_owned(),
            timeout: Some(timeout.to_owned()),
        };
        let path = with_query(&format!("/machines/{}/wait", segment(id)), &query);
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// `POST /machines/{id}/resize` (a stopped machine; the disk only grows).
    pub async fn resize_machine(&mut self, id: &str, size: &ResizeParams) -> Result<MachineView> {
        self.call(Method::POST, &machine_path(id, "/resize"), Some(size))
            .await
    }

    /// `POST /machines/{id}/rebuild`: a fresh disk from its image, or `params.image`.
    pub async fn rebuild_machine(
        &mut self,
        id: &str,
        params: &RebuildParams,
    ) -> Result<MachineView> {
        self.call(Method::POST, &machine_path(id, "/rebuild"), Some(params))
            .await
    }

    /// `PATCH /machines/{id}`.
    pub async fn patch_machine(&mut self, id: &str, patch: &MachinePatch) -> Result<MachineView> {
        let path = format!("/machines/{}", segment(id));
        self.call(Method::PATCH, &path, Some(patch)).await
    }

    /// `DELETE /machines/{id}`.
    pub async fn delete_machine(&mut self, id: &str) -> Result<MachineView> {
        self.call(Method::DELETE, &machine_path(id, ""), None::<&()>)
            .await
    }

    /// `GET /machines/{id}/events`, one page.
    pub async fn machine_events(&mut self, id: &str, page: &PageQuery) -> Result<EventPage> {
        let path = with_query(&machine_path(id, "/events"), page);
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// `GET /machines/{id}/console`: the tail of the serial console, as text.
    pub async fn console(&mut self, id: &str) -> Result<String> {
        let answer = self
            .authorized(Method::GET, &machine_path(id, "/console"), None::<&()>)
            .await?;
        answer.text()
    }

    // --- plumbing --------------------------------------------------------------------------

    async fn anonymous<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let call = format!("{method} {path}");
        self.send(method, path, body, None).await?.json(&call)
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let call = format!("{method} {path}");
        self.authorized(method, path, body).await?.json(&call)
    }

    async fn call_empty(&mut self, method: Method, path: &str) -> Result<()> {
        self.authorized(method, path, None::<&()>).await?.empty()
    }

    /// Sends with the access token; a 401 refreshes the session once and sends again.
    async fn authorized<B: Serialize>(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Answer> {
        let Some(tokens) = &self.tokens else {
            return Err(ClientError::NotLoggedIn);
        };
        let access = tokens.access_token.clone();
        let answer = self.send(method.clone(), path, body, Some(&access)).await?;
        if answer.status != StatusCode::UNAUTHORIZED {
            return Ok(answer);
        }
        self.refresh().await?;
        let access = self.tokens.as_ref().map(|t| t.access_token.clone());
        self.send(method, path, body, access.as_deref()).await
    }

    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        token: Option<&str>,
    ) -> Result<Answer> {
        let mut req = self
            .http
            .request(method, format!("{}/api/v1{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let unreachable = |source| ClientError::Unreachable {
            base: self.base.clone(),
            source,
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let request_id = resp
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp.text().await.map_err(unreachable)?;
        Ok(Answer {
            status,
            request_id,
            body,
        })
    }
}

/// Largest page the API serves.
const MAX_PAGE: i64 = 200;

/// An answer as received.
struct Answer {
    status: StatusCode,
    request_id: Option<String>,
    body: String,
}

impl Answer {
    fn error(&self) -> Option<ApiError> {
        if self.status.is_success() {
            return None;
        }
        let problem: Option<Box<Problem>> = serde_json::from_str(&self.body).ok();
        let request_id = problem
            .as_ref()
            .map(|p| p.request_id.clone())
            .filter(|id| !id.is_empty())
            .or_else(|| self.request_id.clone());
        Some(ApiError {
            status: self.status.as_u16(),
            problem,
            request_id,
        })
    }

    fn json<T: DeserializeOwned>(self, call: &str) -> Result<T> {
        if let Some(e) = self.error() {
            return Err(ClientError::Api(e));
        }
        serde_json::from_str(&self.body).map_err(|source| ClientError::Decode {
            call: call.to_owned(),
            source,
        })
    }

    fn text(self) -> Result<String> {
        match self.error() {
            Some(e) => Err(ClientError::Api(e)),
            None => Ok(self.body),
        }
    }

    fn empty(self) -> Result<()> {
        self.text().map(drop)
    }
}

/// `path?query` (no `?` when the query is empty; absent options are left out).
fn with_query<Q: Serialize>(path: &str, query: &Q) -> String {
    match serde_urlencoded::to_string(query) {
        Ok(q) if !q.is_empty() => format!("{path}?{q}"),
        _ => path.to_owned(),
    }
}

/// What stays as it is in a path segment: RFC 3986's unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// One path segment: an id typed by a user goes in escaped, never as more path.
fn segment(id: &str) -> String {
    utf8_percent_encode(id, SEGMENT).to_string()
}

fn machine_path(id: &str, rest: &str) -> String {
    format!("/machines/{}{rest}", segment(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(body: &str) -> Option<Box<Problem>> {
        serde_json::from_str(body).ok()
    }

    #[test]
    fn problems_read_as_one_line_with_the_request_id() {
        let body = r#"{"type":"urn:skygate:problem:conflict","title":"Conflict","status":409,
            "detail":"cannot stop a machine that is stopped","request_id":"req-1"}"#;
        let e = Answer {
            status: StatusCode::CONFLICT,
            request_id: None,
            body: body.into(),
        }
        .error()
        .unwrap();
        assert_eq!(
            e.to_string(),
            "Conflict: cannot stop a machine that is stopped (HTTP 409, request id req-1)"
        );
        let e = Answer {
            status: StatusCode::BAD_GATEWAY,
            request_id: Some("r2".into()),
            body: "<html>".into(),
        }
        .error()
        .unwrap();
        assert_eq!(e.problem, problem("<html>"));
        assert_eq!(e.to_string(), "Bad Gateway (HTTP 502, request id r2)");
    }

    #[test]
    fn queries_leave_out_what_is_absent_and_ids_stay_one_segment() {
        let q = ListMachinesQuery {
            limit: Some(200),
            cursor: None,
            status: Some("running".into()),
            label: Some("env=prod".into()),
        };
        assert_eq!(
            with_query("/machines", &q),
            "/machines?limit=200&status=running&label=env%3Dprod"
        );
        assert_eq!(with_query("/ssh-keys", &PageQuery::default()), "/ssh-keys");
        assert_eq!(
            machine_path("../hosts", "/start"),
            "/machines/..%2Fhosts/start"
        );
    }
}
