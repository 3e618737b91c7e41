//! Fault injection on real parts: a TCP link between the control plane and PostgreSQL that a
//! test can cut (every open connection reset, new ones refused) and restore, on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A proxy from a local port to `target`; the fake half of an outage, the database behind it
/// is real.
pub struct CuttableLink {
    pub addr: SocketAddr,
    target: SocketAddr,
    state: Arc<Mutex<LinkState>>,
}

#[derive(Default)]
struct LinkState {
    acceptor: Option<JoinHandle<()>>,
    pipes: Vec<JoinHandle<()>>,
}

impl CuttableLink {
    pub async fn new(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let link = Self {
            addr: listener.local_addr().unwrap(),
            target,
            state: Arc::default(),
        };
        link.serve(listener);
        link
    }

    fn serve(&self, listener: TcpListener) {
        let (target, state) = (self.target, Arc::clone(&self.state));
        let acceptor = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let pipe = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut s = state.lock().unwrap();
                s.pipes.retain(|p| !p.is_finished());
                s.pipes.push(pipe);
            }
        });
        self.state.lock().unwrap().acceptor = Some(acceptor);
    }

    /// The outage: the port stops listening (connections are refused) and every open
    /// connection is dropped.
    pub fn cut(&self) {
        let mut s = self.state.lock().unwrap();
        if let Some(a) = s.acceptor.take() {
            a.abort();
        }
        for p in s.pipes.drain(..) {
            p.abort();
        }
    }

    /// The database is back on the same port.
    pub async fn restore(&self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

impl Drop for CuttableLink {
    fn drop(&mut self) {
        self.cut();
    }
}
