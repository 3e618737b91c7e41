//! The test harness: a real control plane on 127.0.0.1 (port 0) over a fresh database, either
//! a SQLite file in a temp dir or a new PostgreSQL database that is dropped afterwards.

#![allow(dead_code)]

pub mod faults;
pub mod process;
pub mod provisioning;

use control_plane::api::HttpSettings;
use control_plane::app::Settings;
use control_plane::server::{self, ProvisioningConfig, Running};
use control_plane::store::Store;
use reqwest::{Client, Method, RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};
use sqlx::{Connection, Executor, PgConnection};
use std::sync::Arc;
use tempfile::TempDir;

/// Which store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs each named `async fn name(Backend)` once per store, as `name::sqlite` and `name::postgres`.
#[macro_export]
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => { $(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::common::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::common::Backend::Postgres).await
            }
        }
    )* };
}

pub const PASSWORD: &str = "correct horse battery staple";
pub const SECRET: &[u8] = b"test secret that is long enough for HS256 use";
pub const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHHMwgk2GeZHV5tJNdEm1PU426kKnbe2RG0vww37WOHz alice@laptop";

fn admin_pg_url() -> String {
    std::env::var("SKYGATE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A PostgreSQL database made for one test; dropped (forcibly) when the guard goes, even if
/// the test panicked.
pub struct PgDatabase {
    name: String,
    pub url: String,
}

impl PgDatabase {
    async fn create() -> Self {
        let admin = admin_pg_url();
        let name = format!("skygate_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin)
            .await
            .expect("PostgreSQL must listen at SKYGATE_TEST_POSTGRES_URL (default 127.0.0.1:5432)");
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap();
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap().to_owned();
        Self {
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime; do the async cleanup on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect(&admin_pg_url()).await {
                    let _ = conn
                        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                        .await;
                }
            });
        })
        .join();
    }
}

/// Where a test's database lives; shared by several servers to act as replicas.
pub struct TestDb {
    pub url: String,
    pub dir: TempDir,
    _pg: Option<PgDatabase>,
}

impl TestDb {
    /// The PostgreSQL host and port of this database's URL.
    pub fn postgres_addr(&self) -> std::net::SocketAddr {
        use std::net::ToSocketAddrs;
        self.postgres_host_port()
            .to_socket_addrs()
            .unwrap()
            .next()
            .unwrap()
    }

    fn postgres_host_port(&self) -> &str {
        let rest = self
            .url
            .split_once('@')
            .map_or(self.url.as_str(), |(_, r)| r);
        rest.split('/').next().unwrap()
    }

    /// The same PostgreSQL database reached through `via` (a fault-injecting link); the
    /// database stays owned by `self`.
    pub fn rerouted(&self, via: std::net::SocketAddr) -> Self {
        Self {
            url: self
                .url
                .replacen(self.postgres_host_port(), &via.to_string(), 1),
            dir: tempfile::tempdir().unwrap(),
            _pg: None,
        }
    }

    pub async fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        match backend {
            Backend::Sqlite => Self {
                url: format!("sqlite://{}", dir.path().join("skygate.db").display()),
                dir,
                _pg: None,
            },
            Backend::Postgres => {
                let pg = PgDatabase::create().await;
                Self {
                    url: pg.url.clone(),
                    dir,
                    _pg: Some(pg),
                }
            }
        }
    }
}

/// A running control plane and an HTTP client for it.
pub struct TestApp {
    pub base: String,
    pub client: Client,
    pub store: Store,
    pub app: Arc<control_plane::app::App>,
    running: Option<Running>,
    pub db: Arc<TestDb>,
    /// Where agents register, when the server runs provisioning.
    pub grpc: Option<std::net::SocketAddr>,
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(backend, Settings::default(), HttpSettings::default()).await
    }

    pub async fn spawn_with(backend: Backend, settings: Settings, http: HttpSettings) -> Self {
        let db = Arc::new(TestDb::new(backend).await);
        Self::spawn_on(db, settings, http).await
    }

    /// Another server on the same database: a second replica.
    pub async fn spawn_on(db: Arc<TestDb>, settings: Settings, http: HttpSettings) -> Self {
        Self::spawn_full(db, settings, http, None).await
    }

    /// A server that also serves the agent registry and runs the workflows.
    pub async fn spawn_provisioning(backend: Backend, config: ProvisioningConfig) -> Self {
        let db = Arc::new(TestDb::new(backend).await);
        Self::spawn_full(
            db,
            Settings::default(),
            HttpSettings::default(),
            Some(config),
        )
        .await
    }

    pub async fn spawn_full(
        db: Arc<TestDb>,
        settings: Settings,
        http: HttpSettings,
        provisioning: Option<ProvisioningConfig>,
    ) -> Self {
        let store = server::open_store(&db.url, db.dir.path(), 8).await.unwrap();
        let running = server::start(
            store.clone(),
            SECRET,
            settings,
            &http,
            "127.0.0.1:0".parse().unwrap(),
            provisioning.as_ref(),
        )
        .await
        .unwrap();
        Self {
            base: format!("http://{}", running.addr),
            client: Client::builder().build().unwrap(),
            store,
            app: running.app.clone(),
            grpc: running.grpc_addr,
            running: Some(running),
            db,
        }
    }

    /// Stops the server and closes its pools (the database itself goes with the last `db`).
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.unwrap();
        }
        self.store.close().await;
    }

    pub fn url(&self, path: &str) -> String {
        if path.starts_with("/api/") || !path.starts_with('/') || is_ops(path) {
            format!("{}{path}", self.base)
        } else {
            format!("{}/api/v1{path}", self.base)
        }
    }

    pub fn req(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, self.url(path))
    }

    /// A request authenticated as `who`.
    pub fn as_user(&self, who: &Session, method: Method, path: &str) -> RequestBuilder {
        self.req(method, path).bearer_auth(&who.access)
    }

    /// GET as `who`, asserting 200, and the JSON body.
    pub async fn get_json(&self, who: &Session, path: &str) -> Value {
        let res = self.as_user(who, Method::GET, path).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "GET {path}");
        res.json().await.unwrap()
    }

    /// POSTs a request head announcing `content_length` bytes of JSON, sends only a few of
    /// them, and reads the answer over a raw socket. A server that refuses by the announced
    /// length answers at once; a client streaming the whole body could instead race the
    /// server's early close, so reqwest is not used here. Returns status, content type, body.
    pub async fn announce_oversized_post(
        &self,
        who: &Session,
        path: &str,
        content_length: usize,
    ) -> (u16, String, Value) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.base.trim_start_matches("http://");
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
             content-type: application/json\r\ncontent-length: {content_length}\r\n\r\n{{\"user_data\": \"",
            who.access
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let mut buf = [0u8; 4096];
            loop {
                let n = conn.read(&mut buf).await.unwrap_or(0);
                raw.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&raw);
                let complete = text.split_once("\r\n\r\n").is_some_and(|(h, b)| {
                    h.lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .is_some_and(|len| b.len() >= len)
                });
                if n == 0 || complete {
                    break;
                }
            }
        });
        read.await.expect("no answer to an oversized request");
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let content_type = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-type: ")
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        (status, content_type, serde_json::from_str(body).unwrap())
    }

    pub async fn register(&self, username: &str) -> Response {
        self.req(Method::POST, "/auth/register")
            .json(&json!({"username": username, "email": format!("{username}@example.com"), "password": PASSWORD}))
            .send()
            .await
            .unwrap()
    }

    pub async fn login(&self, username: &str, password: &str) -> Response {
        self.req(Method::POST, "/auth/login")
            .json(&json!({"username": username, "password": password}))
            .send()
            .await
            .unwrap()
    }

    /// Registers and logs in a tenant.
    pub async fn user(&self, username: &str) -> Session {
        assert_eq!(self.register(username).await.status(), StatusCode::CREATED);
        self.session(username).await
    }

    /// Creates an administrator (as the admin CLI does) and logs in.
    pub async fn admin(&self, username: &str) -> Session {
        self.app
            .register(
                username,
                &format!("{username}@example.com"),
                PASSWORD,
                auth::Role::Admin,
            )
            .await
            .unwrap();
        self.session(username).await
    }

    async fn session(&self, username: &str) -> Session {
        let res = self.login(username, PASSWORD).await;
        assert_eq!(res.status(), StatusCode::OK);
        let body: Value = res.json().await.unwrap();
        Session {
            access: body["access_token"].as_str().unwrap().to_owned(),
            refresh: body["refresh_token"].as_str().unwrap().to_owned(),
        }
    }

    /// Registers the image "tiny" as an administrator.
    pub async fn tiny_image(&self) {
        let admin = self.admin(&format!("root{}", rand_suffix())).await;
        let res = self
            .as_user(&admin, Method::POST, "/images")
            .json(&json!({"name": "tiny", "source": "file:///var/lib/skygate/images/tiny.qcow2", "format": "qcow2"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
    }

    /// POST /machines with a small valid body for `hostname`.
    pub async fn create_machine(&self, who: &Session, hostname: &str) -> Response {
        self.as_user(who, Method::POST, "/machines")
            .json(&machine_body(hostname))
            .send()
            .await
            .unwrap()
    }
}

fn is_ops(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

pub fn rand_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

pub fn machine_body(hostname: &str) -> Value {
    json!({"hostname": hostname, "image": "tiny", "vcpus": 1, "memory_mib": 256, "disk_gib": 1})
}

/// The hash the server binds an Idempotency-Key to for this POST /machines body.
pub fn idempotency_hash(body: &Value) -> String {
    let params: control_plane::api::params::CreateMachineParams =
        serde_json::from_value(body.clone()).unwrap();
    control_plane::app::idempotency::request_hash(&serde_json::to_vec(&params).unwrap())
}

/// A logged-in user's tokens.
#[derive(Debug, Clone)]
pub struct Session {
    pub access: String,
    pub refresh: String,
}

/// Asserts `res` is a problem document with `status`, carrying the response's request id;
/// returns the document.
pub async fn problem(res: Response, status: StatusCode) -> Value {
    assert_eq!(res.status(), status, "status");
    let content_type = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert_eq!(content_type, "application/problem+json");
    let request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    assert_eq!(body["request_id"], request_id.as_str());
    assert!(!request_id.is_empty());
    assert!(body["type"]
        .as_str()
        .unwrap()
        .starts_with("urn:skygate:problem:"));
    assert!(!body["title"].as_str().unwrap().is_empty());
    assert!(!body["detail"].as_str().unwrap().is_empty());
    body
}
