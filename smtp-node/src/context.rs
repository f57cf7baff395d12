//! What every session shares ([`ServerContext`]) and the cell that hands the current one to
//! new connections across config reloads ([`ContextCell`]). A leaf below both the listeners
//! ([`crate::server`]) and the sessions ([`crate::session`]), so neither imports the other's
//! state: the server hands connections to sessions, sessions know nothing of the server.

use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::auth::Authenticator;
use crate::authres::InboundVerifier;
use crate::config::NodeConfig;
use crate::connection::limits::ConnectionLimits;
use crate::dkim::DkimSigner;
use crate::memory::MessageMemory;
use crate::metrics::Metrics;
use crate::queue::{ContentHistory, Queue};
use crate::recipient_check::RecipientCheck;
use crate::shutdown::Shutdown;
use crate::tls::TlsServer;

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
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
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
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Self::with_checks(
            config,
            tls,
            auth,
            queue,
            shutdown,
            MessageChecks::default(),
            metrics,
        )
    }

    /// A context whose sessions also DKIM-sign and check mail as `checks` say.
    pub fn with_checks(
        config: Arc<NodeConfig>,
        tls: Option<TlsServer>,
        auth: Arc<Authenticator>,
        queue: Arc<dyn Queue>,
        shutdown: Shutdown,
        checks: MessageChecks,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let limits = ConnectionLimits::new(
            config.max_connections,
            config.max_connections_per_ip,
            config.client_ipv6_prefix,
        );
        let memory = MessageMemory::from_config(&config, metrics.message_memory_bytes.clone());
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
            metrics,
            next_session: Arc::new(AtomicU64::new(1)),
        })
    }

    /// The next generation after a config reload: `config`, users and message checks are new;
    /// the TLS server (whose domain table is swapped in place), the queue, shutdown, the
    /// connection counts, the memory budget, the content history, the metrics and the session numbering
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
            metrics: self.metrics.clone(),
            next_session: self.next_session.clone(),
        })
    }

    /// A short id for logs, unique within this process.
    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }
}
