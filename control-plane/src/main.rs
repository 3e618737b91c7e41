//! `skygate-control-plane`: `serve` runs the API; `admin create` makes an administrator.

use anyhow::Context;
use clap::Parser;
use control_plane::config::{
    AdminCommand, AdminCreateArgs, Cli, Command, LogFormat, ResetHostCredentialArgs, ServeArgs,
};
use control_plane::{app::App, server};
use std::io::Read;
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let store = server::open_store(
        &args.db.url(),
        &args.db.data_dir,
        args.db.database_max_connections,
    )
    .await?;
    let secret_path = args.jwt_secret_path();
    if let Some(dir) = secret_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let secret = auth::token::load_or_create_secret(&secret_path)
        .with_context(|| format!("JWT secret {}", secret_path.display()))?;
    let running = server::start(
        store,
        &secret,
        args.settings(),
        &args.http_settings()?,
        args.http_addr,
        args.provisioning()?.as_ref(),
    )
    .await?;
    match running.grpc_addr {
        Some(grpc) => tracing::info!(%grpc, "agent registry listening; workflows running"),
        None => tracing::warn!(
            "no --agent-token (SKYGATE_AGENT_TOKEN): agents cannot register and machines stay pending"
        ),
    }
    tracing::info!(addr = %running.addr, backend = ?running.app.store.backend(), "control plane listening");
    shutdown_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or_default(),
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or_default();
}

async fn admin_create(args: AdminCreateArgs) -> anyhow::Result<()> {
    init_logging(LogFormat::Text);
    let mut password = String::new();
    std::io::stdin()
        .read_to_string(&mut password)
        .context("reading the password from standard input")?;
    // One trailing newline is how shells end input; anything else is part of the password.
    let password = password.strip_suffix('\n').unwrap_or(&password);
    let password = password.strip_suffix('\r').unwrap_or(password);
    let store = server::open_store(&args.db.url(), &args.db.data_dir, 2).await?;
    // Registration rules are the same as for tenants; only the role differs. The token
    // machinery is not used here, but App needs a valid secret to exist.
    let app = App::new(store, &[0u8; 32], Default::default())?;
    let user = app
        .register(&args.username, &args.email, password, auth::Role::Admin)
        .await?;
    eprintln!("created administrator {} ({})", user.username, user.id);
    app.store.close().await;
    Ok(())
}

async fn reset_host_credential(args: ResetHostCredentialArgs) -> anyhow::Result<()> {
    init_logging(LogFormat::Text);
    let store = server::open_store(&args.db.url(), &args.db.data_dir, 2).await?;
    let found = store.host_credential_reset(&args.name).await?;
    store.close().await;
    if !found {
        anyhow::bail!("no host is named {:?}", args.name);
    }
    eprintln!(
        "host {}: its credential no longer works; the next agent to register the name with the \
         join token becomes the host (start its agent now)",
        args.name
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(args) => serve(*args).await,
        Command::Admin {
            command: AdminCommand::Create(args),
        } => admin_create(args).await,
        Command::Admin {
            command: AdminCommand::ResetHostCredential(args),
        } => reset_host_credential(args).await,
    }
}
