//! `skygate-host-agent`: the per-host agent. Parses flags, sets up logging and runs the
//! gRPC server until SIGINT/SIGTERM.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use host_agent::config::AgentArgs;
use tracing_subscriber::EnvFilter;

/// How long exiting waits for hypervisor calls still running on the blocking pool. A libvirt
/// call stuck on an unresponsive daemon must not keep a stopped agent alive.
const EXIT_GRACE: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(host_agent::server::run(args));
    runtime.shutdown_timeout(EXIT_GRACE);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "skygate-host-agent stopped");
            ExitCode::FAILURE
        }
    }
}
