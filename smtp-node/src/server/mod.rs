//! Listeners and the shared state of every session: binding the configured sockets, the
//! accept loops with their connection caps ([`listener`]), PROXY protocol ([`proxy`]) and
//! the hand-over of each connection to [`crate::session`].

pub mod listener;
pub mod proxy;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::{ListenerConfig, NodeConfig};
use crate::context::ContextCell;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind listener {name} to {address}")]
    BindListener {
        name: String,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A bound listener socket with its settings.
pub struct BoundListener {
    pub config: Arc<ListenerConfig>,
    pub socket: TcpListener,
}

impl BoundListener {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}

/// Binds every configured listener (all or nothing).
pub async fn bind_listeners(config: &NodeConfig) -> Result<Vec<BoundListener>, ServerError> {
    let mut bound = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        let socket =
            TcpListener::bind(l.address)
                .await
                .map_err(|source| ServerError::BindListener {
                    name: l.name.clone(),
                    address: l.address,
                    source,
                })?;
        tracing::info!(listener = %l.name, kind = ?l.kind, address = %l.address, "listening");
        bound.push(BoundListener {
            config: Arc::new(l.clone()),
            socket,
        });
    }
    Ok(bound)
}

/// Runs the accept loops until shutdown stops them; each connection gets the cell's current
/// context. Sessions keep running in the shutdown tracker; wait for them with
/// [`Shutdown::drain`].
pub async fn run(listeners: Vec<BoundListener>, cell: Arc<ContextCell>) {
    // Tracked, so that a graceful stop waits for every socket to be closed before it tells the
    // sessions (see `Shutdown::stop_gracefully`).
    let loops = cell.current().shutdown.listeners().clone();
    let mut handles = Vec::with_capacity(listeners.len());
    for l in listeners {
        handles.push(loops.spawn(listener::accept_loop(l, cell.clone())));
    }
    for handle in handles {
        let _ = handle.await;
    }
}
