//! `skygate-host-agent`: the per-host agent. This is the skeleton: it accepts the flags of the
//! public contract (API.md) so operators' unit files stay valid, and refuses to run until the
//! libvirt driver and gRPC service exist (issue 3).

use clap::Parser;
use std::process::ExitCode;

/// Flags of the host agent, each also an environment variable (see API.md).
#[derive(Debug, Parser)]
#[command(name = "skygate-host-agent", version, about)]
struct Args {
    /// Address the gRPC server listens on.
    #[arg(long, env = "SKYGATE_AGENT_LISTEN", default_value = "127.0.0.1:9091")]
    listen: String,
    /// Address the control plane dials to reach this agent.
    #[arg(long)]
    advertise: Option<String>,
    /// gRPC URL of the control plane.
    #[arg(long, env = "SKYGATE_CONTROL_PLANE")]
    control_plane: Option<String>,
    /// Shared secret agents join with.
    #[arg(long, env = "SKYGATE_AGENT_TOKEN", hide_env_values = true)]
    agent_token: Option<String>,
    /// Host name reported to the control plane.
    #[arg(long)]
    name: Option<String>,
    /// Image cache, overlays and seeds live here.
    #[arg(
        long,
        env = "SKYGATE_AGENT_DATA_DIR",
        default_value = "/var/lib/skygate-agent"
    )]
    data_dir: String,
    /// libvirt connection URI.
    #[arg(long, default_value = "qemu:///system")]
    libvirt_uri: String,
    /// `user`, `libvirt:NAME` or `bridge:NAME`.
    #[arg(long, default_value = "user")]
    network: String,
    /// Only domains whose name starts with this are ever touched.
    #[arg(long, default_value = "skygate-")]
    domain_prefix: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    eprintln!(
        "skygate-host-agent {}: the agent service is not built yet (package {}); \
         listen address {} was not opened",
        env!("CARGO_PKG_VERSION"),
        proto::AGENT_PACKAGE,
        args.listen
    );
    ExitCode::FAILURE
}
