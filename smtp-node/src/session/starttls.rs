//! STARTTLS (RFC 3207) and the life of a connection across it.
//!
//! After `220 2.0.0 Ready to start TLS` the plaintext [`Session`] ends. Whatever the client
//! pipelined after `STARTTLS` is still in the read buffer: plaintext there is discarded
//! unseen (CVE-2011-0411), while bytes that start a TLS record (a
//! ClientHello sent without waiting, TLS-INJ-02) go to rustls. A new session on the TLS
//! stream starts with nothing of the old one: no HELO, no AUTH, no transaction.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{End, Next, Plain, Session};
use crate::connection::ConnectionInfo;
use crate::connection::prefixed::PrefixedStream;
use crate::context::ServerContext;
use crate::protocol::Reply;
use crate::tls::connection_info;

/// First octet of a TLS handshake record (RFC 8446 5.1, content type 22).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) fn handle_starttls(&mut self) -> Result<Next, End> {
        if self.tls.is_some() {
            self.error_reply(Reply::bad_sequence("TLS already active"))?;
            return Ok(Next::Continue);
        }
        if self.ctx.tls.is_none() {
            self.reply(Reply::tls_not_available());
            return Ok(Next::Continue);
        }
        if self.tx.is_some() {
            self.error_reply(Reply::bad_sequence(
                "STARTTLS not allowed during a mail transaction",
            ))?;
            return Ok(Next::Continue);
        }
        self.reply(Reply::ready_to_start_tls());
        let pending = self.rbuf.split();
        if pending.first() == Some(&TLS_HANDSHAKE_RECORD) {
            return Ok(Next::StartTls(pending));
        }
        if !pending.is_empty() {
            tracing::warn!(
                bytes = pending.len(),
                "discarding plaintext pipelined after STARTTLS"
            );
        }
        Ok(Next::StartTls(BytesMut::new()))
    }
}

/// Serves a plaintext connection (MX, submission): greeting, commands, and after STARTTLS
/// the TLS session.
pub async fn serve<T>(stream: PrefixedStream<T>, conn: ConnectionInfo, ctx: Arc<ServerContext>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut session: Session<Plain<T>> = Session::new(stream, conn, ctx.clone(), None);
    session.greet();
    let Some(read_ahead) = session.run().await else {
        return;
    };
    let Session {
        mut stream, conn, ..
    } = session;
    stream.unread(&read_ahead);
    // Boxed: the handshake and the TLS session are several KiB of future that a plaintext
    // session, idle or not, should not carry (memory per idle connection).
    Box::pin(serve_after_starttls(*stream, conn, ctx)).await;
}

/// The TLS part of a plaintext connection, after `220 Ready to start TLS`.
async fn serve_after_starttls<T>(
    stream: PrefixedStream<T>,
    conn: ConnectionInfo,
    ctx: Arc<ServerContext>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Some(tls) = &ctx.tls else {
        return;
    };
    let handshake = ctx.config.timeouts.tls_handshake.0;
    match tokio::time::timeout(handshake, tls.acceptor().accept(stream)).await {
        Ok(Ok(tls_stream)) => {
            let info = connection_info(tls_stream.get_ref().1);
            ctx.metrics.tls_handshake("server", Some(&info.version));
            tracing::debug!(version = %info.version, cipher = %info.cipher, "STARTTLS done");
            let mut session = Session::new(tls_stream, conn, ctx, Some(info));
            session.run().await;
        }
        Ok(Err(error)) => {
            ctx.metrics.tls_handshake("server", None);
            tracing::info!(%error, "STARTTLS handshake failed");
        }
        Err(_) => {
            ctx.metrics.tls_handshake("server", None);
            tracing::info!("STARTTLS handshake timed out");
        }
    }
}

/// Serves an implicit-TLS connection (port 465, RFC 8314): the handshake comes first, the
/// greeting inside TLS.
pub async fn serve_implicit_tls<T>(
    stream: PrefixedStream<T>,
    conn: ConnectionInfo,
    ctx: Arc<ServerContext>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Some(tls) = &ctx.tls else {
        tracing::error!("implicit TLS listener without a certificate");
        return;
    };
    let handshake = ctx.config.timeouts.tls_handshake.0;
    match tokio::time::timeout(handshake, tls.acceptor().accept(stream)).await {
        Ok(Ok(tls_stream)) => {
            let info = connection_info(tls_stream.get_ref().1);
            ctx.metrics.tls_handshake("server", Some(&info.version));
            let mut session = Session::new(tls_stream, conn, ctx.clone(), Some(info));
            session.greet();
            session.run().await;
        }
        Ok(Err(error)) => {
            ctx.metrics.tls_handshake("server", None);
            tracing::info!(%error, "TLS handshake failed");
        }
        Err(_) => {
            ctx.metrics.tls_handshake("server", None);
            tracing::info!("TLS handshake timed out");
        }
    }
}
