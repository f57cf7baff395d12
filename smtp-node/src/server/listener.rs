//! The accept loop of one listener (mini-redis style): take a node-wide connection slot,
//! read the PROXY header when configured, take a slot for the client IP, then run the session
//! as a task the shutdown tracker waits for.
//!
//! Over a cap the client gets `421 4.7.0` and the connection is closed. On the implicit-TLS
//! port nothing is written before TLS, so an over-cap connection is just closed (a handshake
//! per refused connection would be the costliest answer under a flood). On a PROXY listener a
//! peer outside `trustedProxies` is closed before anything is read or written: its header
//! could name any client address, and a greeting would only invite it to try.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::BoundListener;
use crate::config::{ListenerConfig, ListenerKind};
use crate::connection::ConnectionInfo;
use crate::connection::prefixed::PrefixedStream;
use crate::context::{ContextCell, ServerContext};
use crate::metrics::{ListenerLabels, Metrics, ReasonLabels};
use crate::protocol::{EnhancedCode, Reply};

/// Longest pause after failing `accept()` (for example out of file descriptors).
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Time allowed to write a refusal before closing.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Accepts connections until shutdown; each one is served with the cell's context of the
/// moment it arrived.
pub async fn accept_loop(bound: BoundListener, cell: Arc<ContextCell>) {
    let BoundListener { config, socket } = bound;
    let stop = cell.current().shutdown.accept_token().clone();
    let first = Duration::from_millis(10);
    let mut backoff = crate::backoff::delays(first, ACCEPT_BACKOFF_MAX);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = socket.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => {
                backoff = crate::backoff::delays(first, ACCEPT_BACKOFF_MAX);
                x
            }
            Err(error) => {
                tracing::warn!(listener = %config.name, %error, "accept failed");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let ctx = cell.current();
        ctx.metrics
            .connections
            .get_or_create(&ListenerLabels {
                listener: config.name.clone(),
            })
            .inc();
        let Some(permit) = ctx.limits.try_total() else {
            refused(&ctx.metrics, &config, "max_connections");
            tracing::warn!(listener = %config.name, %peer, "maxConnections reached; refusing");
            ctx.shutdown
                .tracker()
                .spawn(refuse(tcp, config.clone(), ctx.clone()));
            continue;
        };
        let ctx2 = ctx.clone();
        let config2 = config.clone();
        ctx.shutdown
            .tracker()
            .spawn(handle_connection(tcp, peer, config2, ctx2, permit));
    }
    tracing::info!(listener = %config.name, "stopped accepting");
}

async fn handle_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    listener: Arc<ListenerConfig>,
    ctx: Arc<ServerContext>,
    permit: OwnedSemaphorePermit,
) {
    let local = tcp.local_addr().unwrap_or(listener.address);
    let mut stream = PrefixedStream::new(tcp);
    let remote = if listener.proxy_protocol {
        if !listener.trusts_proxy(peer.ip()) {
            refused(&ctx.metrics, &listener, "untrusted_proxy");
            tracing::warn!(listener = %listener.name, %peer, "PROXY header from a peer outside trustedProxies; closing");
            return;
        }
        let timeout = ctx.config.timeouts.tls_handshake.0;
        match super::proxy::read_proxy_header(&mut stream, timeout).await {
            Ok(Some(source)) => source,
            Ok(None) => peer,
            Err(error) => {
                refused(&ctx.metrics, &listener, "proxy_header");
                tracing::warn!(listener = %listener.name, %peer, %error, "bad PROXY header; closing");
                return;
            }
        }
    } else {
        peer
    };
    let Some(_slot) = ctx.limits.try_ip(remote.ip()) else {
        // The node-wide slot is given back before the client can read the refusal, so a client
        // that saw this 421 finds the slot free.
        drop(permit);
        refused(&ctx.metrics, &listener, "max_connections_per_ip");
        tracing::warn!(listener = %listener.name, remote_ip = %remote.ip(), "maxConnectionsPerIp reached; refusing");
        refuse_stream(stream, &listener, &ctx).await;
        return;
    };
    let conn = ConnectionInfo {
        session_id: ctx.next_session_id(),
        remote,
        local,
        listener: listener.clone(),
    };
    // Each session is a trace of its own; the transactions in it start their own traces
    // linked to it (see `crate::telemetry`).
    let span = tracing::info_span!(
        parent: None,
        "smtp.session",
        otel.kind = "server",
        id = conn.session_id,
        listener = %listener.name,
        remote_ip = %remote.ip(),
        remote_port = remote.port(),
        trace_id = tracing::field::Empty,
    );
    crate::telemetry::propagation::record_trace_id(&span, None);
    let active = ctx
        .metrics
        .sessions_active
        .get_or_create(&ListenerLabels {
            listener: listener.name.clone(),
        })
        .clone();
    active.inc();
    async {
        tracing::debug!("connected");
        match listener.kind {
            ListenerKind::ImplicitTls => {
                crate::session::serve_implicit_tls(stream, conn, ctx).await
            }
            ListenerKind::Mx | ListenerKind::Submission => {
                crate::session::serve(stream, conn, ctx).await
            }
        }
        tracing::debug!("disconnected");
    }
    .instrument(span)
    .await;
    active.dec();
    drop(permit);
}

fn refused(metrics: &Metrics, listener: &ListenerConfig, reason: &'static str) {
    metrics
        .connections_refused
        .get_or_create(&ReasonLabels {
            listener: listener.name.clone(),
            reason,
        })
        .inc();
}

fn too_many_connections(hostname: &str) -> Vec<u8> {
    Reply::new(
        421,
        EnhancedCode(4, 7, 0),
        format!("{hostname} Too many connections, try again later"),
    )
    .to_bytes(true)
}

async fn refuse(tcp: TcpStream, listener: Arc<ListenerConfig>, ctx: Arc<ServerContext>) {
    refuse_stream(PrefixedStream::new(tcp), &listener, &ctx).await;
}

async fn refuse_stream(
    mut stream: PrefixedStream<TcpStream>,
    listener: &ListenerConfig,
    ctx: &ServerContext,
) {
    if listener.kind != ListenerKind::ImplicitTls {
        ctx.metrics.reply(&listener.name, 421);
        let reply = too_many_connections(&ctx.config.hostname);
        let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
            let _ = stream.write_all(&reply).await;
            let _ = stream.shutdown().await;
        })
        .await;
    }
}
