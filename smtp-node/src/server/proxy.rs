//! Reading the PROXY protocol header (v1 text or v2 binary, parsed by
//! [`crate::protocol::proxy`]) at the start of a connection from a load balancer.
//!
//! Bytes after the header belong to the client (on the implicit-TLS port: its ClientHello), so
//! they are put back in front of the stream.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::connection::prefixed::PrefixedStream;
use crate::protocol::{ProxyError, ProxyHeader, parse_proxy_header};

/// A v2 header is 16 octets plus at most 65535 of addresses and TLVs; a v1 line 107 octets.
const MAX_PROXY_HEADER: usize = 16 + 65535;

/// Why the header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadProxyError {
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before the PROXY header was complete")]
    Closed,
    #[error("cannot read the PROXY header")]
    Io(#[from] std::io::Error),
    #[error("invalid PROXY header: {0}")]
    Invalid(#[from] ProxyError),
    #[error("PROXY header longer than {MAX_PROXY_HEADER} octets")]
    TooLong,
}

/// Reads the header. `Ok(Some(addr))` is the real client; `Ok(None)` is a `LOCAL` header
/// (a health check from the balancer itself): use the socket peer.
pub async fn read_proxy_header<S: AsyncRead + Unpin>(
    stream: &mut PrefixedStream<S>,
    timeout: Duration,
) -> Result<Option<SocketAddr>, ReadProxyError> {
    tokio::time::timeout(timeout, read(stream))
        .await
        .map_err(|_| ReadProxyError::Timeout(timeout))?
}

async fn read<S: AsyncRead + Unpin>(
    stream: &mut PrefixedStream<S>,
) -> Result<Option<SocketAddr>, ReadProxyError> {
    let mut buf = BytesMut::with_capacity(512);
    loop {
        if let Some((header, consumed)) = parse_proxy_header(&buf)? {
            stream.unread(&buf[consumed..]);
            return Ok(match header {
                ProxyHeader::Local => None,
                ProxyHeader::Proxied { source, .. } => Some(source),
            });
        }
        if buf.len() >= MAX_PROXY_HEADER {
            return Err(ReadProxyError::TooLong);
        }
        buf.reserve(512);
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(ReadProxyError::Closed);
        }
    }
}
