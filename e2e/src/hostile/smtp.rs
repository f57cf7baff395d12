//! A raw SMTP client for hostile cases: writes exactly the bytes a case chooses (bare LFs,
//! trickles, gigabytes), reads whole replies with a time limit, and prints the dialogue as
//! `C:` / `S:` lines with its label, so every case shows what it sent and what it got.
//! Connections can come from any 127.x source address, and speak implicit TLS or STARTTLS
//! (trusting the node's development certificate).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

use super::process::smtp_node_dir;

/// Longest stretch of a sent or received chunk that is printed.
const SHOW_MAX: usize = 300;

/// `bytes` for a transcript: escaped, shortened to [`SHOW_MAX`] with the full length noted.
pub fn show(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(SHOW_MAX)];
    let mut s: String = cut
        .iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect();
    if bytes.len() > SHOW_MAX {
        s.push_str(&format!("... ({} bytes)", bytes.len()));
    }
    s
}

/// One SMTP connection with a printed transcript.
pub struct Smtp<S> {
    io: S,
    buf: Vec<u8>,
    label: String,
    /// Print the dialogue (off for the bulk connections of load cases).
    pub verbose: bool,
}

pub type SmtpTcp = Smtp<TcpStream>;
pub type SmtpTls = Smtp<TlsStream<TcpStream>>;

impl SmtpTcp {
    /// Connects from 127.0.0.1 (the kernel's choice).
    pub async fn connect(addr: SocketAddr, label: &str) -> std::io::Result<Self> {
        let io = TcpStream::connect(addr).await?;
        io.set_nodelay(true)?;
        Ok(Self::new(io, label))
    }

    /// Connects from `source` (any 127.x address: they all reach loopback listeners).
    pub async fn connect_from(
        source: IpAddr,
        addr: SocketAddr,
        label: &str,
    ) -> std::io::Result<Self> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let io = socket.connect(addr).await?;
        io.set_nodelay(true)?;
        Ok(Self::new(io, label))
    }

    /// `STARTTLS`, expecting `220`, then a TLS handshake (the buffer must be empty).
    pub async fn starttls(mut self) -> std::io::Result<SmtpTls> {
        let reply = self.cmd("STARTTLS", Duration::from_secs(10)).await;
        if !reply.as_deref().unwrap_or("").starts_with("220") {
            return Err(std::io::Error::other(format!(
                "STARTTLS refused: {reply:?}"
            )));
        }
        let label = self.label.clone();
        let verbose = self.verbose;
        let tls = tls_handshake(self.io).await?;
        let mut s = Smtp::new(tls, &label);
        s.verbose = verbose;
        Ok(s)
    }
}

impl SmtpTls {
    /// Implicit TLS (port 465) from `source`.
    pub async fn connect_tls(
        source: IpAddr,
        addr: SocketAddr,
        label: &str,
    ) -> std::io::Result<Self> {
        let tcp = SmtpTcp::connect_from(source, addr, label).await?;
        let tls = tls_handshake(tcp.io).await?;
        Ok(Smtp::new(tls, label))
    }
}

/// A TLS client handshake trusting the development certificate, for the name `localhost`.
pub async fn tls_handshake<S>(io: S) -> std::io::Result<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("server name");
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(dev_tls_client()).connect(name, io),
    )
    .await
    .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

fn dev_tls_client() -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let pem = smtp_node_dir().join("examples").join("dev-cert.pem");
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(&pem).expect("dev cert") {
        roots.add(cert.expect("dev cert")).expect("add root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

impl<S: AsyncRead + AsyncWrite + Unpin> Smtp<S> {
    pub fn new(io: S, label: &str) -> Self {
        Self {
            io,
            buf: Vec::new(),
            label: label.to_owned(),
            verbose: true,
        }
    }

    fn print(&self, dir: &str, text: &str) {
        if self.verbose {
            println!("  [{}] {dir} {text}", self.label);
        }
    }

    /// Writes `bytes` and prints them.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.print("C:", &show(bytes));
        self.send_quiet(bytes).await
    }

    /// Writes `bytes` without printing (bulk data; the case prints a summary).
    pub async fn send_quiet(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// The next complete reply within `limit`; `None` (printed as closed or timeout) when
    /// the server closed the connection or said nothing in time.
    pub async fn reply(&mut self, limit: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(end) = reply_end(&self.buf) {
                let r: Vec<u8> = self.buf.drain(..end).collect();
                let text = String::from_utf8_lossy(&r).into_owned();
                self.print("S:", &show(text.trim_end().as_bytes()));
                return Some(text);
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                Ok(_) => {
                    self.print("S:", "<connection closed>");
                    return None;
                }
                Err(_) => {
                    self.print("S:", &format!("<no reply within {limit:?}>"));
                    return None;
                }
            }
        }
    }

    /// Sends `line` + CRLF and reads the reply.
    pub async fn cmd(&mut self, line: &str, limit: Duration) -> Option<String> {
        if self.send(format!("{line}\r\n").as_bytes()).await.is_err() {
            self.print("S:", "<write failed: connection closed>");
            return None;
        }
        self.reply(limit).await
    }

    /// Sends `line` and panics unless the reply starts with `prefix`.
    pub async fn expect(&mut self, line: &str, prefix: &str) -> String {
        let reply = self.cmd(line, Duration::from_secs(30)).await;
        match reply {
            Some(r) if r.starts_with(prefix) => r,
            other => panic!(
                "[{}] {line:?}: expected {prefix:?}, got {other:?}",
                self.label
            ),
        }
    }

    /// Reads the greeting and panics unless it starts with `prefix`.
    pub async fn greeting(&mut self, prefix: &str) -> String {
        match self.reply(Duration::from_secs(30)).await {
            Some(r) if r.starts_with(prefix) => r,
            other => panic!(
                "[{}] greeting: expected {prefix:?}, got {other:?}",
                self.label
            ),
        }
    }

    /// True when the server closed the connection within `limit`, with nothing more to say.
    pub async fn closed(&mut self, limit: Duration) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut chunk = [0u8; 256];
        let closed = matches!(
            tokio::time::timeout(limit, self.io.read(&mut chunk)).await,
            Ok(Ok(0)) | Ok(Err(_))
        );
        self.print(
            "S:",
            if closed {
                "<connection closed>"
            } else {
                "<still open>"
            },
        );
        closed
    }

    /// MAIL, RCPT, DATA, the message and the final dot; returns the reply to the dot
    /// (`None`: connection lost). Panics when MAIL, RCPT or DATA are refused.
    pub async fn send_mail(&mut self, from: &str, to: &str, message: &str) -> Option<String> {
        self.expect(&format!("MAIL FROM:<{from}>"), "250").await;
        self.expect(&format!("RCPT TO:<{to}>"), "250").await;
        self.expect("DATA", "354").await;
        if self.send(message.as_bytes()).await.is_err() {
            return None;
        }
        if self.send(b"\r\n.\r\n").await.is_err() {
            return None;
        }
        self.reply(Duration::from_secs(30)).await
    }

    pub fn into_inner(self) -> S {
        self.io
    }
}

/// The end of the first complete (possibly multi-line) reply in `buf`.
fn reply_end(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(pos) = buf[start..].windows(2).position(|w| w == b"\r\n") {
        let line = &buf[start..start + pos];
        let end = start + pos + 2;
        if line.len() < 4 || line[3] == b' ' {
            return Some(end);
        }
        start = end;
    }
    None
}

/// `AUTH PLAIN` initial response for `user` / `password`.
pub fn auth_plain(user: &str, password: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

/// A small test message with `subject` (used as the case's token to find it again).
pub fn message(subject: &str) -> String {
    format!(
        "From: <alice@example.test>\r\nTo: <bob@example.test>\r\nSubject: {subject}\r\n\
         Date: Sat, 28 Nov 2026 00:00:00 +0000\r\nMessage-ID: <{subject}@hostile.test>\r\n\r\n\
         hostile suite message {subject}\r\n"
    )
}

/// Submits `message` as alice@example.test over implicit TLS + AUTH PLAIN to `to`; returns
/// the reply to the final dot (`None`: the connection was lost, or a step was refused).
pub async fn submit(addr: SocketAddr, to: &str, message: &str, label: &str) -> Option<String> {
    let source: IpAddr = [127, 0, 0, 1].into();
    let mut c = SmtpTls::connect_tls(source, addr, label).await.ok()?;
    c.reply(Duration::from_secs(10))
        .await
        .filter(|r| r.starts_with("220"))?;
    c.cmd("EHLO hostile.test", Duration::from_secs(10))
        .await
        .filter(|r| r.starts_with("250"))?;
    let auth = format!(
        "AUTH PLAIN {}",
        auth_plain(super::node::USER, super::node::PASSWORD)
    );
    c.cmd(&auth, Duration::from_secs(10))
        .await
        .filter(|r| r.starts_with("235"))?;
    c.cmd(
        &format!("MAIL FROM:<{}>", super::node::USER),
        Duration::from_secs(10),
    )
    .await
    .filter(|r| r.starts_with("250"))?;
    c.cmd(&format!("RCPT TO:<{to}>"), Duration::from_secs(10))
        .await
        .filter(|r| r.starts_with("250"))?;
    c.cmd("DATA", Duration::from_secs(10))
        .await
        .filter(|r| r.starts_with("354"))?;
    c.send(message.as_bytes()).await.ok()?;
    c.send(b"\r\n.\r\n").await.ok()?;
    let reply = c.reply(Duration::from_secs(30)).await;
    let _ = c.cmd("QUIT", Duration::from_secs(5)).await;
    reply
}
