//! A stream that first yields bytes already read from the socket, then reads the socket.
//!
//! Needed wherever bytes were read ahead of a protocol switch and belong to the next layer:
//! after a PROXY header the client's first bytes (on implicit TLS, its ClientHello), and after
//! `STARTTLS` a ClientHello that arrived in the same segment. Such bytes must go to rustls,
//! never to the SMTP parser.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `inner`, preceded by `prefix`.
#[derive(Debug)]
pub struct PrefixedStream<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S> PrefixedStream<S> {
    pub fn new(inner: S) -> Self {
        Self {
            prefix: BytesMut::new(),
            inner,
        }
    }

    /// Puts `bytes` back in front of whatever is still unread.
    pub fn unread(&mut self, bytes: &[u8]) {
        let mut prefix = BytesMut::with_capacity(bytes.len() + self.prefix.len());
        prefix.extend_from_slice(bytes);
        prefix.extend_from_slice(&self.prefix);
        self.prefix = prefix;
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrefixedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PrefixedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    /// Forwarded rather than left to the default (which writes only the first buffer):
    /// rustls hands over a TLS flight as one buffer per record, and one `writev` instead of a
    /// `send` per record saves system calls and packets on every handshake.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn prefix_comes_first() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut s = PrefixedStream::new(a);
        s.unread(b"world");
        s.unread(b"hello ");
        b.write_all(b"!").await.unwrap();
        drop(b);
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world!");
    }
}
