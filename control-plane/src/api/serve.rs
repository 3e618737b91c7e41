//! The HTTP connection loop: a cap on open connections, a deadline for request headers that
//! also closes idle keep-alive connections, survival at the descriptor limit, and graceful
//! shutdown.
//!
//! `axum::serve` has none of the first three: a socket that never sent a byte (or sent one
//! every second) stayed open for good, and a few hundred of them exhausted the descriptors so
//! that `/healthz` and logins failed (issue 10). HTTP/1.1 only: every client of the API
//! (reqwest, curl, browsers without TLS) speaks it, and hyper's header deadline, which starts
//! when the connection is waiting for a request, applies to it alone.

use super::problem::{Problem, PROBLEM_JSON};
use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Limits of the connection loop.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// A connection must send a request's headers within this long of waiting for one (so an
    /// idle keep-alive connection is closed after it too).
    pub header_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Connections over the cap being told so at once; further ones are closed unanswered.
const MAX_REFUSING: usize = 32;

/// Descriptors kept free of connections for the database pools, agent channels and files.
const RESERVED_DESCRIPTORS: u64 = 128;

/// The connection cap for a process allowed `nofile` descriptors: the configured cap, or fewer
/// when the descriptor limit would be reached first (but at least 16, or nothing would work).
pub fn effective_cap(configured: usize, nofile: u64) -> usize {
    let fit = nofile.saturating_sub(RESERVED_DESCRIPTORS).max(16);
    usize::try_from(fit).map_or(configured, |fit| configured.min(fit))
}

/// Raises the soft descriptor limit to the hard one (what a server is expected to do; the
/// soft default is often 1024) and returns the limit now in force.
pub fn raise_descriptor_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

/// What a connection over the cap is told before it is closed: a problem document like every
/// other error, with no request id (no request was read).
fn over_cap_response() -> Arc<[u8]> {
    let problem = Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "too many open connections; retry shortly",
    );
    let body = serde_json::to_string(&problem).unwrap_or_default();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: {PROBLEM_JSON}\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
    .into()
}

/// Serves `router` on `listener` until `stop` resolves, then lets open requests finish (up to
/// `drain`) and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    drain: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let over_cap = over_cap_response();
    let refusals = Arc::new(Semaphore::new(MAX_REFUSING));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors (or another transient accept error): serving the
                    // connections we have frees them, so wait a little instead of spinning.
                    metrics::counter!("skygate_http_accept_errors_total").increment(1);
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            metrics::counter!("skygate_http_connections_refused_total").increment(1);
            // Answering takes a descriptor for up to 250 ms: only a few at once, so that a
            // flood cannot eat the descriptors kept for the database; beyond them, close.
            if let Ok(refusing) = Arc::clone(&refusals).try_acquire_owned() {
                let over_cap = Arc::clone(&over_cap);
                tokio::spawn(async move {
                    refuse(stream, over_cap).await;
                    drop(refusing);
                });
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(request)
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // Errors here are the client's doing (a reset, a header deadline missed).
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, %peer, "connection ended");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain period; closing them");
    }
}

/// Answers 503 to a connection over the cap and closes it. What the client sent is read and
/// dropped for a moment after the answer: closing a socket with unread data resets it, and the
/// client would see a reset instead of the 503.
async fn refuse(mut stream: TcpStream, response: Arc<[u8]>) {
    let _ = tokio::time::timeout(Duration::from_millis(250), async {
        stream.write_all(&response).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_fits_the_descriptor_limit() {
        assert_eq!(effective_cap(1024, 1_048_576), 1024);
        assert_eq!(effective_cap(1024, 256), 128);
        assert_eq!(effective_cap(1024, 100), 16);
        assert_eq!(effective_cap(10, 256), 10);
    }

    #[test]
    fn the_refusal_is_a_well_formed_problem() {
        let response = over_cap_response();
        let text = std::str::from_utf8(&response).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let problem: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(problem["status"], 503);
    }
}
