//! Listeners and the shared state of every session: binding the configured sockets, the
//! accept loops with their connection caps ([`listener`]), PROXY protocol ([`proxy`]) and
//! the hand-over of each connection to [`crate::session`].

pub mod limits;
pub mod listener;
pub mod prefixed;
pub mod proxy;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpListener;

use crate::auth::Authenticator;
use crate::authres::InboundVerifier;
use crate::config::{ListenerConfig, NodeConfig};
use crate::dkim::DkimSigner;
use crate::memory::MessageMemory;
use crate::queue::{ContentHistory, Queue};
use crate::recipient_check::RecipientCheck;
use crate::shutdown::Shutdown;
use crate::tls::TlsServer;
use limits::ConnectionLimits;

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

/// Checks and changes applied to every transaction: recipients at RCPT, messages at the end
/// of data.
#[derive(Default)]
pub struct MessageChecks {
    /// Signs submitted mail of our domains.
    pub dkim: Option<Arc<DkimSigner>>,
    /// Evaluates SPF/DKIM/DMARC of mail arriving on MX listeners.
    pub inbound_auth: Option<Arc<InboundVerifier>>,
    /// Refuses suppressed recipients at `RCPT TO` on submission (when configured).
    pub suppression: Option<Arc<crate::suppression::Suppression>>,
    /// Asks catch-all domains' inbound targets about each recipient at RCPT.
    pub recipients: Option<Arc<RecipientCheck>>,
}

/// What every session shares.
pub struct ServerContext {
    pub config: Arc<NodeConfig>,
    /// `None` when no certificate is configured: STARTTLS is then not offered.
    pub tls: Option<TlsServer>,
    pub auth: Arc<Authenticator>,
    pub queue: Arc<dyn Queue>,
    pub shutdown: Shutdown,
    pub limits: ConnectionLimits,
    pub checks: MessageChecks,
    /// Message bytes in memory, shared by every session ([`crate::memory`]).
    pub memory: MessageMemory,
    /// Contents accepted lately: the generation in each new entry's `Nats-Msg-Id`.
    pub content: Arc<ContentHistory>,
    next_session: Arc<AtomicU64>,
}

/// The context that new connections get. A config reload puts a new one in; sessions already
/// running keep the one they started with, so a reload never touches an open session.
pub struct ContextCell {
    current: RwLock<Arc<ServerContext>>,
}

impl ContextCell {
    pub fn new(ctx: Arc<ServerContext>) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(ctx),
        })
    }

    /// The context of the next connection.
    pub fn current(&self) -> Arc<ServerContext> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Makes `ctx` the context of every later connection.
    pub fn replace(&self, ctx: Arc<ServerContext>) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = ctx;
    }
}

impl ServerContext {
    pub fn new(
        config: Arc<NodeConfig>,
        tls: Option<TlsServer>,
        auth: Arc<Authenticator>,
        queue: Arc<dyn Queue>,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        Self::with_checks(config, tls, auth, queue, shutdown, MessageChecks::default())
    }

    /// A context whose sessions also DKIM-sign and check mail as `checks` say.
    pub fn with_checks(
        config: Arc<NodeConfig>,
        tls: Option<TlsServer>,
        auth: Arc<Authenticator>,
        queue: Arc<dyn Queue>,
        shutdown: Shutdown,
        checks: MessageChecks,
    ) -> Arc<Self> {
        let limits = ConnectionLimits::new(
            config.max_connections,
            config.max_connections_per_ip,
            config.client_ipv6_prefix,
        );
        let memory = MessageMemory::from_config(&config);
        let content = ContentHistory::new(config.nats.duplicate_window.0);
        Arc::new(Self {
            config,
            tls,
            auth,
            queue,
            shutdown,
            limits,
            checks,
            memory,
            content: Arc::new(content),
            next_session: Arc::new(AtomicU64::new(1)),
        })
    }

    /// The next generation after a config reload: `config`, users and message checks are new;
    /// the TLS server (whose domain table is swapped in place), the queue, shutdown, the
    /// connection counts, the memory budget, the content history and the session numbering
    /// carry over. The connection caps stay those
    /// of the first generation (a change of `maxConnections` needs a restart).
    pub fn successor(
        &self,
        config: Arc<NodeConfig>,
        auth: Arc<Authenticator>,
        checks: MessageChecks,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            tls: self.tls.clone(),
            auth,
            queue: self.queue.clone(),
            shutdown: self.shutdown.clone(),
            limits: self.limits.clone(),
            checks,
            memory: self.memory.clone(),
            content: self.content.clone(),
            next_session: self.next_session.clone(),
        })
    }

    /// A short id for logs, unique within this process.
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }
}

/// The addresses of one connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub session_id: u64,
    /// The client: from the PROXY header when the listener uses it, else the socket peer.
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub listener: Arc<ListenerConfig>,
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
