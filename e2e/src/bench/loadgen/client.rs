//! One SMTP client connection of the load generator: connect, greeting, EHLO, STARTTLS or
//! implicit TLS, AUTH PLAIN, mail transactions (pipelined when the server offers PIPELINING),
//! NOOP and QUIT. Every read and write is bounded by the I/O timeout; replies are parsed from
//! untrusted bytes without panicking.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest reply line accepted; RFC 5321 4.5.3.1.5 allows 512 octets, servers send less.
const MAX_REPLY_LINE: usize = 4096;
/// Lines of one multi-line reply accepted (an EHLO reply has about a dozen).
const MAX_REPLY_LINES: usize = 100;
/// Read buffer per connection: replies are short; 4 KiB holds any pipelined group.
const READ_CHUNK: usize = 4096;

/// How the connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Security {
    /// Plain text (port 25 style).
    Plain,
    /// STARTTLS after the first EHLO (port 587 style).
    StartTls,
    /// TLS from the first byte (port 465, RFC 8314).
    ImplicitTls,
}

/// What a connection needs to reach and greet a server.
#[derive(Clone)]
pub struct ConnectSpec {
    pub target: SocketAddr,
    pub security: Security,
    /// Client TLS settings; required unless `security` is `Plain`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Name the server certificate must carry.
    pub server_name: ServerName<'static>,
    /// Our EHLO name.
    pub ehlo_name: String,
    /// AUTH PLAIN credentials (user, password), sent after EHLO (after TLS when TLS is used).
    pub auth: Option<(String, String)>,
    /// Bound on each connect, read and write.
    pub io_timeout: Duration,
}

/// Why a connection or a command failed (the connection is unusable afterwards).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to {target}: {source}")]
    Connect {
        target: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("server closed the connection during {what}")]
    Closed { what: &'static str },
    #[error("malformed reply during {what}: {line:?}")]
    Malformed { what: &'static str, line: String },
    #[error("unexpected reply to {what}: {reply}")]
    Unexpected { what: &'static str, reply: String },
    #[error("TLS requested but no client TLS settings were given")]
    NoTlsConfig,
    #[error("server does not offer STARTTLS")]
    NoStartTls,
    #[error("server sent data after its STARTTLS reply (possible injection)")]
    DataAfterStartTls,
}

/// A parsed SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" / "))
    }
}

/// Outcome of one mail transaction on a healthy connection.
#[derive(Debug, Clone)]
pub struct Transaction {
    /// The final reply (to the end of data, or the first refusal).
    pub reply: Reply,
    /// Whether the message was accepted (2xx after the end of data).
    pub accepted: bool,
    /// From the end of the data (after `CRLF.CRLF` was written) to the reply; `None` when the
    /// transaction was refused before the data.
    pub data_latency: Option<Duration>,
}

/// Anything a connection can run over: TCP or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open, greeted SMTP connection.
pub struct Connection {
    stream: Box<dyn Io>,
    buf: Vec<u8>,
    start: usize,
    io_timeout: Duration,
    pipelining: bool,
    /// Messages sent over this connection.
    pub messages: u64,
}

impl Connection {
    /// Connects, reads the greeting, says EHLO, sets up TLS and authenticates as `spec` asks.
    pub async fn open(spec: &ConnectSpec) -> Result<Self, ClientError> {
        let tcp = tokio::time::timeout(spec.io_timeout, TcpStream::connect(spec.target))
            .await
            .map_err(|_| ClientError::Timeout {
                what: "connect",
                after: spec.io_timeout,
            })?
            .map_err(|source| ClientError::Connect {
                target: spec.target,
                source,
            })?;
        // Commands are small and answered one group at a time; Nagle would add delay.
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Io> = if spec.security == Security::ImplicitTls {
            Box::new(tls_handshake(spec, tcp).await?)
        } else {
            Box::new(tcp)
        };
        let mut conn = Self {
            stream,
            buf: Vec::with_capacity(READ_CHUNK),
            start: 0,
            io_timeout: spec.io_timeout,
            pipelining: false,
            messages: 0,
        };
        conn.expect("greeting", &[220]).await?;
        let mut caps = conn.ehlo(&spec.ehlo_name).await?;
        if spec.security == Security::StartTls {
            if !caps.iter().any(|c| c.eq_ignore_ascii_case("STARTTLS")) {
                return Err(ClientError::NoStartTls);
            }
            conn.write("STARTTLS", b"STARTTLS\r\n").await?;
            conn.expect("STARTTLS", &[220]).await?;
            if conn.start < conn.buf.len() {
                return Err(ClientError::DataAfterStartTls);
            }
            conn = conn.upgrade(spec).await?;
            caps = conn.ehlo(&spec.ehlo_name).await?;
        }
        conn.pipelining = caps.iter().any(|c| c.eq_ignore_ascii_case("PIPELINING"));
        if let Some((user, password)) = &spec.auth {
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
            conn.write("AUTH", format!("AUTH PLAIN {token}\r\n").as_bytes())
                .await?;
            conn.expect("AUTH", &[235]).await?;
        }
        Ok(conn)
    }

    /// Whether the server offered PIPELINING.
    pub fn pipelining(&self) -> bool {
        self.pipelining
    }

    /// Sends one message. `message` is the complete data including the final `CRLF.CRLF`.
    /// Refusals (4xx/5xx) leave the connection usable; I/O and protocol errors do not.
    pub async fn send(
        &mut self,
        from: &str,
        to: &str,
        message: &[u8],
        pipelining: bool,
    ) -> Result<Transaction, ClientError> {
        let mail = format!("MAIL FROM:<{from}>\r\n");
        let rcpt = format!("RCPT TO:<{to}>\r\n");
        let (mail_reply, rcpt_reply, data_reply) = if pipelining && self.pipelining {
            // RFC 2920: MAIL, RCPT and DATA in one group, DATA last.
            let mut group = Vec::with_capacity(mail.len() + rcpt.len() + 6);
            group.extend_from_slice(mail.as_bytes());
            group.extend_from_slice(rcpt.as_bytes());
            group.extend_from_slice(b"DATA\r\n");
            self.write("MAIL/RCPT/DATA", &group).await?;
            let m = self.read_reply("MAIL").await?;
            let r = self.read_reply("RCPT").await?;
            let d = self.read_reply("DATA").await?;
            (m, r, d)
        } else {
            self.write("MAIL", mail.as_bytes()).await?;
            let m = self.read_reply("MAIL").await?;
            if m.code != 250 {
                return Ok(refused(m));
            }
            self.write("RCPT", rcpt.as_bytes()).await?;
            let r = self.read_reply("RCPT").await?;
            if !matches!(r.code, 250 | 251) {
                self.reset().await?;
                return Ok(refused(r));
            }
            self.write("DATA", b"DATA\r\n").await?;
            let d = self.read_reply("DATA").await?;
            (m, r, d)
        };
        if data_reply.code != 354 {
            if mail_reply.code != 250 {
                return Ok(refused(mail_reply));
            }
            if !matches!(rcpt_reply.code, 250 | 251) {
                self.reset().await?;
                return Ok(refused(rcpt_reply));
            }
            self.reset().await?;
            return Ok(refused(data_reply));
        }
        if mail_reply.code != 250 || !matches!(rcpt_reply.code, 250 | 251) {
            // A server that says 354 without a valid envelope is broken; do not feed it data.
            return Err(ClientError::Unexpected {
                what: "DATA",
                reply: format!("354 after MAIL {mail_reply} / RCPT {rcpt_reply}"),
            });
        }
        self.write("message data", message).await?;
        let sent = Instant::now();
        let reply = self.read_reply("end of data").await?;
        let data_latency = sent.elapsed();
        self.messages += 1;
        Ok(Transaction {
            accepted: (200..300).contains(&reply.code),
            reply,
            data_latency: Some(data_latency),
        })
    }

    /// Sends NOOP and reads the reply.
    pub async fn noop(&mut self) -> Result<Reply, ClientError> {
        self.write("NOOP", b"NOOP\r\n").await?;
        self.read_reply("NOOP").await
    }

    /// Sends QUIT and waits (bounded) for the reply; errors are ignored, the connection ends.
    pub async fn quit(mut self) {
        if self.write("QUIT", b"QUIT\r\n").await.is_ok() {
            let _ = self.read_reply("QUIT").await;
        }
        let _ = tokio::time::timeout(self.io_timeout, self.stream.shutdown()).await;
    }

    async fn reset(&mut self) -> Result<(), ClientError> {
        self.write("RSET", b"RSET\r\n").await?;
        self.expect("RSET", &[250]).await.map(|_| ())
    }

    async fn ehlo(&mut self, name: &str) -> Result<Vec<String>, ClientError> {
        self.write("EHLO", format!("EHLO {name}\r\n").as_bytes())
            .await?;
        let reply = self.expect("EHLO", &[250]).await?;
        // The first line is the greeting; the rest are keywords with parameters.
        Ok(reply
            .lines
            .iter()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect())
    }

    async fn upgrade(self, spec: &ConnectSpec) -> Result<Self, ClientError> {
        let stream = tls_handshake(spec, self.stream).await?;
        Ok(Self {
            stream: Box::new(stream),
            buf: self.buf,
            start: 0,
            io_timeout: self.io_timeout,
            pipelining: false,
            messages: 0,
        })
    }

    async fn expect(&mut self, what: &'static str, codes: &[u16]) -> Result<Reply, ClientError> {
        let reply = self.read_reply(what).await?;
        if codes.contains(&reply.code) {
            Ok(reply)
        } else {
            Err(ClientError::Unexpected {
                what,
                reply: reply.to_string(),
            })
        }
    }

    async fn write(&mut self, what: &'static str, bytes: &[u8]) -> Result<(), ClientError> {
        let io = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(self.io_timeout, io).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(ClientError::Io { what, source }),
            Err(_) => Err(ClientError::Timeout {
                what,
                after: self.io_timeout,
            }),
        }
    }

    /// Reads one (possibly multi-line) reply.
    pub async fn read_reply(&mut self, what: &'static str) -> Result<Reply, ClientError> {
        let mut lines = Vec::new();
        loop {
            let line = self.read_line(what).await?;
            let (code, last, text) =
                parse_reply_line(&line).ok_or_else(|| ClientError::Malformed {
                    what,
                    line: String::from_utf8_lossy(&line).into_owned(),
                })?;
            lines.push(text);
            if last {
                return Ok(Reply { code, lines });
            }
            if lines.len() >= MAX_REPLY_LINES {
                return Err(ClientError::Malformed {
                    what,
                    line: format!("more than {MAX_REPLY_LINES} reply lines"),
                });
            }
        }
    }

    async fn read_line(&mut self, what: &'static str) -> Result<Vec<u8>, ClientError> {
        loop {
            if let Some(pos) = self.buf[self.start..].iter().position(|&b| b == b'\n') {
                let end = self.start + pos;
                let mut line = self.buf[self.start..end].to_vec();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.start = end + 1;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                return Ok(line);
            }
            if self.buf.len() - self.start > MAX_REPLY_LINE {
                return Err(ClientError::Malformed {
                    what,
                    line: format!("reply line longer than {MAX_REPLY_LINE} bytes"),
                });
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let old = self.buf.len();
            self.buf.resize(old + READ_CHUNK, 0);
            let read =
                tokio::time::timeout(self.io_timeout, self.stream.read(&mut self.buf[old..])).await;
            let n = match read {
                Ok(Ok(n)) => n,
                Ok(Err(source)) => {
                    self.buf.truncate(old);
                    return Err(ClientError::Io { what, source });
                }
                Err(_) => {
                    self.buf.truncate(old);
                    return Err(ClientError::Timeout {
                        what,
                        after: self.io_timeout,
                    });
                }
            };
            self.buf.truncate(old + n);
            if n == 0 {
                return Err(ClientError::Closed { what });
            }
        }
    }
}

/// Parses `250-text` / `250 text` / `250`: (code, is the last line, text).
pub fn parse_reply_line(line: &[u8]) -> Option<(u16, bool, String)> {
    let digits = line.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let code = digits
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    let (last, text) = match line.get(3) {
        None => (true, &[][..]),
        Some(b' ') => (true, &line[4..]),
        Some(b'-') => (false, &line[4..]),
        Some(_) => return None,
    };
    Some((code, last, String::from_utf8_lossy(text).into_owned()))
}

fn refused(reply: Reply) -> Transaction {
    Transaction {
        reply,
        accepted: false,
        data_latency: None,
    }
}

async fn tls_handshake<S: Io + 'static>(
    spec: &ConnectSpec,
    io: S,
) -> Result<tokio_rustls::client::TlsStream<S>, ClientError> {
    let config = spec.tls.clone().ok_or(ClientError::NoTlsConfig)?;
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout(
        spec.io_timeout,
        connector.connect(spec.server_name.clone(), io),
    )
    .await
    {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(ClientError::Io {
            what: "TLS handshake",
            source,
        }),
        Err(_) => Err(ClientError::Timeout {
            what: "TLS handshake",
            after: spec.io_timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines_parse_without_trusting_the_input() {
        assert_eq!(
            parse_reply_line(b"250-PIPELINING"),
            Some((250, false, "PIPELINING".to_owned()))
        );
        assert_eq!(
            parse_reply_line(b"354 go ahead"),
            Some((354, true, "go ahead".to_owned()))
        );
        assert_eq!(parse_reply_line(b"221"), Some((221, true, String::new())));
        for bad in [&b""[..], b"25", b"2x0 ok", b"250x", b"\xff\xfe\xfd"] {
            assert_eq!(parse_reply_line(bad), None, "{bad:?}");
        }
    }
}
