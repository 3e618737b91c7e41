//! Start-up and shutdown: open the store, run migrations, load the secret, serve HTTP until
//! a signal, with housekeeping in the background.

use crate::api::{self, HttpSettings};
use crate::app::{App, Settings};
use crate::store::Store;
use anyhow::Context;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Opens the database (creating the data dir for SQLite) and applies migrations.
pub async fn open_store(url: &str, data_dir: &Path, max_connections: u32) -> anyhow::Result<Store> {
    if url.starts_with("sqlite:") {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    }
    let store = Store::connect(url, max_connections)
        .await
        .context("connecting to the database")?;
    store.migrate().await.context("applying migrations")?;
    Ok(store)
}

/// A running HTTP server; dropping the handle does not stop it, `shutdown` does.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish, and waits.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.task.await.context("server task")??;
        Ok(())
    }
}

/// Binds `addr` and serves the API; housekeeping runs every few minutes beside it.
pub async fn start(
    store: Store,
    secret: &[u8],
    settings: Settings,
    http: &HttpSettings,
    addr: SocketAddr,
) -> anyhow::Result<Running> {
    // Install the metrics recorder before the first request records anything.
    crate::metrics::handle();
    let app = Arc::new(App::new(store, secret, settings).context("token self-test")?);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let addr = listener.local_addr()?;
    let router = api::router(app.clone(), http);
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let housekeeping = {
        let app = app.clone();
        let mut rx = rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(300));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = app.purge_expired().await {
                            tracing::warn!(error = ?e, "housekeeping failed");
                        }
                    }
                    _ = rx.changed() => break,
                }
            }
        })
    };
    let task = tokio::spawn(async move {
        let served = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = rx.changed().await;
        })
        .await;
        housekeeping.abort();
        served
    });
    Ok(Running {
        addr,
        app,
        shutdown: tx,
        task,
    })
}
