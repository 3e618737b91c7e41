//! `skygate-host-agent`: the per-host agent. Parses flags, sets up logging and runs the
//! gRPC server until SIGINT/SIGTERM.
//!
//! When it cannot start (or stops on an error) it prints exactly one line to stderr,
//! `skygate-host-agent: <what is wrong>`, and exits non-zero: 2 for a bad command line or an
//! unfit host (preflight.rs), 1 otherwise. Not a tracing event: an operator reading
//! `systemctl status` or a terminal gets the reason, not a log record to pick apart.

use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::Parser;
use host_agent::config::{AgentArgs, SimulateArgs};
use host_agent::preflight::{error_line, usage_error_line};
use tracing_subscriber::EnvFilter;

/// How long exiting waits for hypervisor calls still running on the blocking pool. A libvirt
/// call stuck on an unresponsive daemon must not keep a stopped agent alive.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// Exit code of a bad command line or an unfit host (clap's code for usage errors).
const EXIT_USAGE: u8 = 2;

/// The one failure line.
fn fail(what: &str, code: u8) -> ExitCode {
    eprintln!("skygate-host-agent: {what}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == "simulate") {
        return simulate();
    }
    let args = match AgentArgs::try_parse() {
        Ok(args) => args,
        // --help and --version print as clap means them, to stdout, exit 0.
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => return fail(&usage_error_line(&e), EXIT_USAGE),
    };
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
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("starting the async runtime: {e}"), 1),
    };
    let result = runtime.block_on(host_agent::server::run(args));
    runtime.shutdown_timeout(EXIT_GRACE);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&error_line(&e), e.exit_code()),
    }
}

/// `skygate-host-agent simulate ...`: the simulated fleet (host_agent::simulate). Logs go to
/// stderr at `warn` unless `SKYGATE_LOG` says otherwise: a thousand hosts logging each
/// registration at `info` would bury the one line a script waits for.
fn simulate() -> ExitCode {
    let args = match SimulateArgs::try_parse_from(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => return fail(&usage_error_line(&e), EXIT_USAGE),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("SKYGATE_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("starting the async runtime: {e}"), 1),
    };
    let result = runtime.block_on(host_agent::simulate::run_cli(args));
    runtime.shutdown_timeout(EXIT_GRACE);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&error_line(&e), e.exit_code()),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}
