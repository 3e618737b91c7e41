//! Command-line flags and environment variables (API.md, "Running it"), turned into settings.

use crate::agents::AgentTls;
use crate::api::serve::ConnectionLimits;
use crate::api::HttpSettings;
use crate::app::password_work::PasswordWorkSettings;
use crate::app::{AuditRetention, LoginLimits, MachineLimits, Settings};
use crate::model::{Quota, RestartLimits};
use crate::server::ProvisioningConfig;
use crate::timing::WorkflowSettings;
use axum::http::HeaderValue;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `skygate-control-plane`: the SkyGate control plane.
#[derive(Debug, Parser)]
#[command(name = "skygate-control-plane", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the REST API, the agent registry, the workflows and the host monitor.
    Serve(Box<ServeArgs>),
    /// Administrative tasks against the same database.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create an administrator account.
    Create(AdminCreateArgs),
    /// Retire a host's credential (its agent lost it) so that its agent can join again with
    /// the join token.
    ResetHostCredential(ResetHostCredentialArgs),
}

/// Where the database is and how to reach it; shared by `serve` and `admin`.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// `sqlite://PATH` or `postgres://...`; default: a SQLite file in the data dir.
    #[arg(long, env = "SKYGATE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// State lives here: the SQLite file and the generated JWT secret.
    #[arg(long, env = "SKYGATE_DATA_DIR", default_value = "/var/lib/skygate")]
    pub data_dir: PathBuf,
    /// Database connections per pool.
    #[arg(long, env = "SKYGATE_DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,
}

impl DatabaseArgs {
    /// The configured URL, or the embedded SQLite file in the data dir.
    pub fn url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("skygate.db").display()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// REST API listen address.
    #[arg(long, env = "SKYGATE_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// gRPC listen address where host agents register (served when --agent-token is set).
    #[arg(long, env = "SKYGATE_GRPC_ADDR", default_value = "127.0.0.1:9090")]
    pub grpc_addr: SocketAddr,
    /// HS256 secret for access tokens (at least 32 bytes); generated on first start if absent.
    #[arg(long, env = "SKYGATE_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// Shared secret host agents join with.
    #[arg(long, env = "SKYGATE_AGENT_TOKEN", hide_env_values = true)]
    pub agent_token: Option<String>,
    /// Access log and diagnostics format.
    #[arg(long, env = "SKYGATE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Browser origins allowed by CORS (comma-separated); none by default.
    #[arg(long, env = "SKYGATE_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Seconds before a request is abandoned with 408.
    #[arg(long, env = "SKYGATE_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,
    /// HTTP connections served at once (lowered to fit the descriptor limit); more are
    /// answered 503 and closed.
    #[arg(long, env = "SKYGATE_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,
    /// Seconds a connection has to send a request's headers once it is waiting for one; an
    /// idle keep-alive connection is closed after this too.
    #[arg(long, env = "SKYGATE_HEADER_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout_secs: u64,
    /// Threads computing password hashes (19 MiB each); default: one per core.
    #[arg(long, env = "SKYGATE_PASSWORD_THREADS", value_parser = clap::value_parser!(u64).range(1..=256))]
    pub password_threads: Option<u64>,
    /// Password checks that may wait for a thread; more are refused with 503 at once.
    /// Default: eight per thread.
    #[arg(long, env = "SKYGATE_PASSWORD_QUEUE", value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub password_queue: Option<u64>,
    /// Largest vCPU count of one machine.
    #[arg(long, env = "SKYGATE_MAX_VCPUS", default_value_t = MachineLimits::default().max_vcpus)]
    pub max_vcpus: i64,
    /// Largest memory of one machine, MiB.
    #[arg(long, env = "SKYGATE_MAX_MEMORY_MIB", default_value_t = MachineLimits::default().max_memory_mib)]
    pub max_memory_mib: i64,
    /// Largest disk of one machine, GiB.
    #[arg(long, env = "SKYGATE_MAX_DISK_GIB", default_value_t = MachineLimits::default().max_disk_gib)]
    pub max_disk_gib: i64,
    /// Per-user quota: machines (not deleted).
    #[arg(long, env = "SKYGATE_QUOTA_MACHINES", default_value_t = Quota::default().max_machines)]
    pub quota_machines: i64,
    /// Per-user quota: vCPUs over all machines.
    #[arg(long, env = "SKYGATE_QUOTA_VCPUS", default_value_t = Quota::default().max_vcpus)]
    pub quota_vcpus: i64,
    /// Per-user quota: memory over all machines, MiB.
    #[arg(long, env = "SKYGATE_QUOTA_MEMORY_MIB", default_value_t = Quota::default().max_memory_mib)]
    pub quota_memory_mib: i64,
    /// Login attempts per client address per minute.
    #[arg(long, env = "SKYGATE_LOGIN_PER_IP_PER_MINUTE", default_value_t = LoginLimits::default().per_ip_per_minute)]
    pub login_per_ip_per_minute: u32,
    /// Workflow workers in this process.
    #[arg(long, env = "SKYGATE_WORKERS", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub workers: u64,
    /// Seconds a claimed task is held without renewal; a crashed control plane's tasks are
    /// taken over after this.
    #[arg(long, env = "SKYGATE_TASK_LEASE_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..=3600))]
    pub task_lease_secs: u64,
    /// Seconds a machine may wait for capacity before it fails.
    #[arg(long, env = "SKYGATE_PLACEMENT_TIMEOUT_SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub placement_timeout_secs: u64,
    /// Seconds any other transitional status may last before the machine fails.
    #[arg(long, env = "SKYGATE_TRANSITION_TIMEOUT_SECS", default_value_t = 900, value_parser = clap::value_parser!(u64).range(10..=86_400))]
    pub transition_timeout_secs: u64,
    /// Seconds between agent heartbeats (told to agents when they register).
    #[arg(long, env = "SKYGATE_HEARTBEAT_INTERVAL_SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub heartbeat_interval_secs: u64,
    /// Seconds without a heartbeat after which a host is unreachable.
    #[arg(long, env = "SKYGATE_HOST_UNREACHABLE_AFTER_SECS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub host_unreachable_after_secs: u64,
    /// Seconds a stop waits for the guest before the agent forces it off.
    #[arg(long, env = "SKYGATE_STOP_TIMEOUT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub stop_timeout_secs: u64,
    /// PEM certificate chain: serve the agent registry (--grpc-addr) over TLS.
    #[arg(long, env = "SKYGATE_GRPC_TLS_CERT", requires = "grpc_tls_key")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// PEM private key of `--grpc-tls-cert`.
    #[arg(long, env = "SKYGATE_GRPC_TLS_KEY", requires = "grpc_tls_cert")]
    pub grpc_tls_key: Option<PathBuf>,
    /// PEM CA bundle that signed the agents' certificates: call agents over TLS.
    #[arg(long, env = "SKYGATE_AGENT_CA")]
    pub agent_ca: Option<PathBuf>,
    /// PEM certificate the control plane presents to agents (mutual TLS).
    #[arg(long, env = "SKYGATE_AGENT_CLIENT_CERT", requires_all = ["agent_client_key", "agent_ca"])]
    pub agent_client_cert: Option<PathBuf>,
    /// PEM key of `--agent-client-cert`.
    #[arg(long, env = "SKYGATE_AGENT_CLIENT_KEY", requires = "agent_client_cert")]
    pub agent_client_key: Option<PathBuf>,
    /// Seconds between reconciliation passes over every host.
    #[arg(long, env = "SKYGATE_RECONCILE_INTERVAL_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub reconcile_interval_secs: u64,
    /// Seconds a domain no machine owns must be seen before it is removed.
    #[arg(long, env = "SKYGATE_ORPHAN_GRACE_SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub orphan_grace_secs: u64,
    /// Days audit events are kept; older ones are removed by housekeeping.
    #[arg(long, env = "SKYGATE_AUDIT_RETENTION_DAYS", default_value_t = 90, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub audit_retention_days: u32,
    /// Restart policy `on-failure`: most automatic restarts of one machine within
    /// `--restart-window-secs`; past it a crashed machine stays stopped.
    #[arg(long, env = "SKYGATE_RESTART_MAX", default_value_t = RestartLimits::default().max, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub restart_max: u32,
    /// The window `--restart-max` counts restarts in, seconds.
    #[arg(long, env = "SKYGATE_RESTART_WINDOW_SECS", default_value_t = RestartLimits::default().window.as_secs(), value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub restart_window_secs: u64,
    /// Wait before the first automatic restart in a window, seconds; each next one waits
    /// twice as long (at most 300 s).
    #[arg(long, env = "SKYGATE_RESTART_BACKOFF_SECS", default_value_t = RestartLimits::default().backoff.as_secs(), value_parser = clap::value_parser!(u64).range(0..=300))]
    pub restart_backoff_secs: u64,
    /// Login attempts one client address may make on one account per window before that
    /// client is paused on that account (the owner elsewhere is not).
    #[arg(long, env = "SKYGATE_LOGIN_MAX_FAILURES", default_value_t = LoginLimits::default().max_failures)]
    pub login_max_failures: i64,
    /// Login attempts one account takes from all clients per window; past it, clients that
    /// already tried the account wait for their window, new clients are still checked.
    #[arg(long, env = "SKYGATE_LOGIN_ACCOUNT_BUDGET", default_value_t = LoginLimits::default().account_budget)]
    pub login_account_budget: i64,
    /// Length of the failed-login window, seconds.
    #[arg(long, env = "SKYGATE_LOGIN_FAILURE_WINDOW_SECS", default_value_t = 900)]
    pub login_failure_window_secs: i64,
}

impl ServeArgs {
    /// Where the JWT secret lives: the flag, or `jwt-secret` in the data dir.
    pub fn jwt_secret_path(&self) -> PathBuf {
        self.jwt_secret_file
            .clone()
            .unwrap_or_else(|| self.db.data_dir.join("jwt-secret"))
    }

    pub fn settings(&self) -> Settings {
        Settings {
            machine_limits: MachineLimits {
                max_vcpus: self.max_vcpus,
                max_memory_mib: self.max_memory_mib,
                max_disk_gib: self.max_disk_gib,
                ..MachineLimits::default()
            },
            quota: Quota {
                max_machines: self.quota_machines,
                max_vcpus: self.quota_vcpus,
                max_memory_mib: self.quota_memory_mib,
            },
            login: LoginLimits {
                per_ip_per_minute: self.login_per_ip_per_minute,
                max_failures: self.login_max_failures,
                account_budget: self.login_account_budget,
                failure_window: chrono::Duration::seconds(self.login_failure_window_secs),
            },
            password_work: self.password_work(),
            audit_retention: AuditRetention(chrono::Duration::days(i64::from(
                self.audit_retention_days,
            ))),
        }
    }

    fn password_work(&self) -> PasswordWorkSettings {
        let threads = self.password_threads.map_or_else(
            || PasswordWorkSettings::default().threads,
            |n| usize::try_from(n).unwrap_or(1),
        );
        let queue = self
            .password_queue
            .map_or(threads * crate::app::password_work::QUEUE_PER_THREAD, |n| {
                usize::try_from(n).unwrap_or(0)
            });
        PasswordWorkSettings { threads, queue }
    }

    /// The agent link and workflows, when an agent token is configured. Hosts must get at
    /// least two heartbeats into the unreachable window, or they would flap.
    pub fn provisioning(&self) -> anyhow::Result<Option<ProvisioningConfig>> {
        let Some(token) = self.agent_token.clone().filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        // The same rule as the agents': a short shared token opens every host.
        if token.len() < proto::bearer::MIN_TOKEN_BYTES {
            anyhow::bail!(
                "--agent-token (SKYGATE_AGENT_TOKEN) is {} bytes; at least {} are required \
                 (e.g. head -c 32 /dev/urandom | base64)",
                token.len(),
                proto::bearer::MIN_TOKEN_BYTES
            );
        }
        if self.host_unreachable_after_secs < 2 * self.heartbeat_interval_secs {
            anyhow::bail!(
                "--host-unreachable-after-secs ({}) must be at least twice \
                 --heartbeat-interval-secs ({})",
                self.host_unreachable_after_secs,
                self.heartbeat_interval_secs
            );
        }
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
        let agent_tls = match &self.agent_ca {
            Some(ca) => Some(AgentTls {
                ca: read(ca)?,
                identity: match (&self.agent_client_cert, &self.agent_client_key) {
                    (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                    _ => None,
                },
            }),
            None => None,
        };
        let registry_tls = match (&self.grpc_tls_cert, &self.grpc_tls_key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        Ok(Some(ProvisioningConfig {
            agent_tls,
            registry_tls,
            grpc_addr: self.grpc_addr,
            agent_token: token,
            workflows: WorkflowSettings {
                workers: usize::try_from(self.workers).unwrap_or(4),
                lease: Duration::from_secs(self.task_lease_secs),
                placement_timeout: Duration::from_secs(self.placement_timeout_secs),
                transition_timeout: Duration::from_secs(self.transition_timeout_secs),
                heartbeat_interval: Duration::from_secs(self.heartbeat_interval_secs),
                unreachable_after: Duration::from_secs(self.host_unreachable_after_secs),
                stop_timeout: Duration::from_secs(self.stop_timeout_secs),
                reconcile_interval: Duration::from_secs(self.reconcile_interval_secs),
                orphan_grace: Duration::from_secs(self.orphan_grace_secs),
                restart: RestartLimits {
                    max: self.restart_max,
                    window: Duration::from_secs(self.restart_window_secs),
                    backoff: Duration::from_secs(self.restart_backoff_secs),
                    ..RestartLimits::default()
                }
                .within(Duration::from_secs(self.transition_timeout_secs)),
            },
        }))
    }

    /// Gateway settings; an origin that is not a valid header value is an error.
    pub fn http_settings(&self) -> anyhow::Result<HttpSettings> {
        let cors_origins = self
            .cors_origins
            .iter()
            .filter(|o| !o.is_empty())
            .map(|o| {
                HeaderValue::from_str(o).map_err(|_| anyhow::anyhow!("invalid CORS origin {o:?}"))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(HttpSettings {
            cors_origins,
            request_timeout: Duration::from_secs(self.request_timeout_secs.max(1)),
            connections: ConnectionLimits {
                max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
                header_timeout: Duration::from_secs(self.header_timeout_secs),
            },
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct ResetHostCredentialArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// The host's name (as its agent registers it, `--name`).
    #[arg(long)]
    pub name: String,
}

#[derive(Debug, Clone, Args)]
pub struct AdminCreateArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,
    #[arg(long)]
    pub username: String,
    #[arg(long)]
    pub email: String,
    /// Read the password from standard input (the only way: never on the command line).
    #[arg(long, required = true)]
    pub password_stdin: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["skygate-control-plane", "serve"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Serve(args)) => *args,
            other => panic!("not serve args: {other:?}"),
        }
    }

    #[test]
    fn the_agent_token_follows_the_agents_rule() {
        let short = serve(&["--agent-token", "change-me"]).provisioning();
        let message = short.unwrap_err().to_string();
        assert!(message.contains("is 9 bytes; at least 16"), "{message}");
        let good = serve(&["--agent-token", "0123456789abcdef"]).provisioning();
        assert!(good.unwrap().is_some());
        assert!(serve(&["--agent-token", ""])
            .provisioning()
            .unwrap()
            .is_none());
    }
}
