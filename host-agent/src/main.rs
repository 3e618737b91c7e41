//! `skygate-host-agent`: the per-host agent. Parses flags, sets up logging and runs the
//! gRPC server until SIGINT/SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use host_agent::config::AgentArgs;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let args = AgentArgs::parse();
    let filter = EnvFilter::try_from_env("SKYGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if args.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    match host_agent::server::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "skygate-host-agent stopped");
            ExitCode::FAILURE
        }
    }
}
