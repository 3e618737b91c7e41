//! The agent's flags (each also an environment variable where API.md gives one). clap checks
//! their syntax; the rules across flags and the environment are in preflight.rs, run before
//! anything is served.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::Parser;

use crate::machines::{CreateStep, NetworkMode};
use crate::ports::PortRange;
use crate::probe::HypervisorChoice;

/// Flags of `skygate-host-agent`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "skygate-host-agent",
    version,
    about,
    after_help = "`skygate-host-agent simulate --help`: many simulated hosts in one process."
)]
pub struct AgentArgs {
    /// Address the gRPC server listens on (port 0 picks a free port, printed at start).
    #[arg(long, env = "SKYGATE_AGENT_LISTEN", default_value = "127.0.0.1:9091")]
    pub listen: String,
    /// Address the control plane dials to reach this agent (used by registration): `host:port`,
    /// or `http(s)://host:port`, which is reduced to `host:port`.
    #[arg(long, env = "SKYGATE_AGENT_ADVERTISE")]
    pub advertise: Option<String>,
    /// gRPC URL of the control plane (used by registration); `https://` with
    /// `--control-plane-ca`.
    #[arg(long, env = "SKYGATE_CONTROL_PLANE")]
    pub control_plane: Option<String>,
    /// PEM CA bundle that signed the control plane's registry certificate
    /// (its `--grpc-tls-cert`).
    #[arg(long, env = "SKYGATE_AGENT_CONTROL_PLANE_CA")]
    pub control_plane_ca: Option<PathBuf>,
    /// Shared secret: every call must carry `authorization: Bearer <token>`; also the join
    /// token the agent first registers with (then it uses the host's own credential, kept in
    /// the data dir as `host-credential`). Visible ASCII, at least 16 bytes. Prefer the
    /// environment variable; a flag shows in the process list.
    #[arg(long, env = "SKYGATE_AGENT_TOKEN", hide_env_values = true)]
    pub agent_token: Option<String>,
    /// Host name reported to the control plane (default: the system host name).
    #[arg(long, env = "SKYGATE_AGENT_NAME")]
    pub name: Option<String>,
    /// Image cache, overlays, seeds and console logs live here.
    #[arg(
        long,
        env = "SKYGATE_AGENT_DATA_DIR",
        default_value = "/var/lib/skygate-agent"
    )]
    pub data_dir: PathBuf,
    /// A directory `file://` image sources may come from; repeat it for more (the variable
    /// takes a comma-separated list). Without one, no `file://` source is accepted. Sources
    /// are checked with symlinks and `..` resolved.
    #[arg(
        long = "image-dir",
        env = "SKYGATE_AGENT_IMAGE_DIRS",
        value_delimiter = ','
    )]
    pub image_dirs: Vec<PathBuf>,
    /// libvirt connection URI.
    #[arg(
        long,
        env = "SKYGATE_AGENT_LIBVIRT_URI",
        default_value = "qemu:///system"
    )]
    pub libvirt_uri: String,
    /// `user`, `libvirt:NAME` or `bridge:NAME`.
    #[arg(long, env = "SKYGATE_AGENT_NETWORK", default_value = "user")]
    pub network: NetworkMode,
    /// Only domains named `<prefix><uuid>` are ever touched.
    #[arg(long, env = "SKYGATE_AGENT_DOMAIN_PREFIX", default_value = "skygate-")]
    pub domain_prefix: String,
    /// `auto` uses KVM only when kvm_intel/kvm_amd is loaded and libvirt offers kvm.
    #[arg(
        long,
        env = "SKYGATE_AGENT_HYPERVISOR",
        value_enum,
        default_value = "auto"
    )]
    pub hypervisor: HypervisorChoice,
    /// With `--network user`: host address forwarded ports listen on.
    #[arg(
        long,
        env = "SKYGATE_AGENT_FORWARD_ADDRESS",
        default_value = "127.0.0.1"
    )]
    pub forward_address: Ipv4Addr,
    /// With `--network user`: host ports forwarded ports are taken from (1024 and above).
    #[arg(
        long,
        env = "SKYGATE_AGENT_FORWARD_PORTS",
        default_value = "20000-29999",
        value_parser = crate::ports::parse_forward_ports
    )]
    pub forward_ports: PortRange,
    /// How long StopMachine waits for the guest's ACPI shutdown before forcing it off, when the
    /// call does not say.
    #[arg(
        long,
        env = "SKYGATE_AGENT_GRACEFUL_TIMEOUT_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub graceful_timeout_secs: u64,
    /// How often domains are polled for changes (crashes, guest power-offs); events reach
    /// watchers within this interval.
    #[arg(
        long,
        env = "SKYGATE_AGENT_POLL_INTERVAL_MS",
        default_value_t = 2000,
        value_parser = clap::value_parser!(u64).range(100..=60_000)
    )]
    pub poll_interval_ms: u64,
    /// Cached images (bases, kernels) no machine on this host uses are removed once nothing
    /// has asked for them for this long, seconds (at least 600: a creation between fetching
    /// its image and making its disk must never lose it); 0 keeps them forever.
    #[arg(
        long,
        env = "SKYGATE_AGENT_IMAGE_GRACE_SECS",
        default_value_t = 86_400,
        value_parser = image_grace
    )]
    pub image_grace_secs: u64,
    /// PEM certificate chain: serve TLS.
    #[arg(long, env = "SKYGATE_AGENT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "SKYGATE_AGENT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: require client certificates signed by it (mutual TLS).
    #[arg(long, env = "SKYGATE_AGENT_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// vCPUs to offer before overcommit (default: the host's CPUs).
    #[arg(long, env = "SKYGATE_AGENT_CAPACITY_VCPUS")]
    pub capacity_vcpus: Option<u32>,
    /// Memory to offer before overcommit, in MiB (default: the host's memory).
    #[arg(long, env = "SKYGATE_AGENT_CAPACITY_MEMORY_MIB")]
    pub capacity_memory_mib: Option<u64>,
    /// Disk to offer, in GiB (default: the size of the data directory's file system).
    #[arg(long, env = "SKYGATE_AGENT_CAPACITY_DISK_GIB")]
    pub capacity_disk_gib: Option<u64>,
    /// vCPUs offered per CPU.
    #[arg(long, env = "SKYGATE_AGENT_CPU_OVERCOMMIT", default_value = "4.0", value_parser = crate::registration::parse_ratio)]
    pub cpu_overcommit: f64,
    /// Memory offered per MiB of memory.
    #[arg(long, env = "SKYGATE_AGENT_MEMORY_OVERCOMMIT", default_value = "1.0", value_parser = crate::registration::parse_ratio)]
    pub memory_overcommit: f64,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "SKYGATE_AGENT_LOG_JSON")]
    pub log_json: bool,
    /// Test only: sleep forever before this creation step so a test can kill the agent
    /// there.
    #[arg(long, env = "SKYGATE_AGENT_TEST_PAUSE_BEFORE", value_enum, hide = true)]
    pub test_pause_before: Option<CreateStep>,
}

impl AgentArgs {
    /// The network mode with the forward address and range applied.
    pub fn network_mode(&self) -> NetworkMode {
        match &self.network {
            NetworkMode::User { .. } => NetworkMode::User {
                address: self.forward_address,
                ports: self.forward_ports.clone(),
            },
            other => other.clone(),
        }
    }
}

/// Certificate files for TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle; when set, clients must present a certificate it signed.
    pub client_ca: Option<PathBuf>,
}

/// Flags of `skygate-host-agent simulate`: many simulated hosts in this process (simulate.rs).
///
/// A mode of its own, parsed apart from [`AgentArgs`] (main.rs looks at the first argument):
/// none of the real agent's flags (libvirt, TLS, network, overcommit) means anything to a
/// simulated host, and a clap subcommand on [`AgentArgs`] would have made them all accepted,
/// and checked by preflight, beside `simulate` too.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "skygate-host-agent simulate",
    bin_name = "skygate-host-agent simulate",
    version,
    // The doc comment above is for readers of the code, not of --help.
    long_about = None,
    about = "Runs many simulated hosts (real gRPC servers over a fake hypervisor) against a \
             control plane. Faults from stdin, one per line: `silence NAME`, `resume NAME`, \
             `crash NAME MACHINE_ID`, `slow NAME MS`, `refuse NAME`, `accept NAME`."
)]
pub struct SimulateArgs {
    /// How many hosts.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub hosts: u32,
    /// Host names: this prefix and a four-digit number from 0001.
    #[arg(long, default_value = "sim-")]
    pub name_prefix: String,
    /// gRPC URL of the control plane.
    #[arg(
        long,
        env = "SKYGATE_CONTROL_PLANE",
        default_value = "http://127.0.0.1:9090"
    )]
    pub control_plane: String,
    /// The join token, as the real agent takes it. Prefer the environment variable or
    /// `--join-token-file`; a flag shows in the process list.
    #[arg(
        long,
        env = "SKYGATE_AGENT_TOKEN",
        hide_env_values = true,
        conflicts_with = "join_token_file"
    )]
    pub agent_token: Option<String>,
    /// A file holding the join token (surrounding whitespace ignored).
    #[arg(long)]
    pub join_token_file: Option<PathBuf>,
    /// vCPUs each host offers.
    #[arg(long, default_value_t = 8)]
    pub vcpus: u32,
    /// Memory each host offers, MiB.
    #[arg(long, default_value_t = 16384)]
    pub memory_mib: u64,
    /// Disk each host offers, GiB.
    #[arg(long, default_value_t = 200)]
    pub disk_gib: u64,
    /// Milliseconds a domain definition takes.
    #[arg(long, default_value_t = 20)]
    pub define_ms: u64,
    /// Milliseconds a start takes.
    #[arg(long, default_value_t = 50)]
    pub start_ms: u64,
    /// Milliseconds a stop's shutdown request takes.
    #[arg(long, default_value_t = 50)]
    pub stop_ms: u64,
    /// Each host's data directory is `<data-dir>/<name>`.
    #[arg(long, default_value = "/tmp/skygate-simulate")]
    pub data_dir: PathBuf,
    /// A directory `file://` image sources may come from; repeat it for more.
    #[arg(long = "image-dir")]
    pub image_dirs: Vec<PathBuf>,
}

/// `--image-grace-secs`: 0, or 600 s to a year.
fn image_grace(text: &str) -> Result<u64, String> {
    let secs: u64 = text
        .parse()
        .map_err(|_| format!("expected seconds, not {text:?}"))?;
    if secs == 0 || (600..=31_536_000).contains(&secs) {
        Ok(secs)
    } else {
        Err("must be 0 (keep cached images) or 600 to 31536000 seconds".into())
    }
}
