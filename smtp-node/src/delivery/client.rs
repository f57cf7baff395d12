//! The SMTP / LMTP client the delivery workers speak to remote MX hosts, relays and inbound
//! targets.
//!
//! One [`SmtpClient`] is one connection: greeting, EHLO (LHLO for LMTP; HELO when a plain
//! SMTP server refuses EHLO), STARTTLS when offered or required, AUTH PLAIN/LOGIN for relays,
//! then any number of transactions ([`SmtpClient::send`]) until it is closed. Behaviour that
//! matters for safety:
//!
//! * **Timeouts per phase** (RFC 5321 4.5.3.2): greeting 5 min, MAIL and RCPT 5 min each,
//!   DATA initiation 2 min, each data write 3 min, the reply after the final dot 10 min
//!   (all configurable, [`ClientTimeouts`]).
//! * **Replies are untrusted** ([`crate::protocol::client::reply`]): a malformed, endless or
//!   mixed-code reply is a temporary error of that host, never a panic.
//! * **STARTTLS** (RFC 3207): after `220` to STARTTLS nothing may be buffered; plaintext
//!   bytes that arrived with the `220` would otherwise be read as the post-TLS EHLO reply
//!   (a response injection), so the connection is dropped. EHLO is sent
//!   again inside TLS and the old capabilities are forgotten. When TLS is required and not
//!   offered, refused or failing, the host is given up (deferred), never used in plaintext
//!   (TLS-CLI-02/03). Credentials are sent only inside TLS (TLS-CLI-05).
//! * **PIPELINING** (RFC 2920): MAIL, every RCPT and DATA go out in one write; the replies
//!   are read in order.
//! * **SIZE / 8BITMIME / SMTPUTF8**: a message larger than the advertised SIZE, 8-bit data
//!   to a server without 8BITMIME, or an internationalised envelope to a server without
//!   SMTPUTF8 fails permanently instead of being sent in a form the server did not agree to
//!   (an 8-bit body cannot be downgraded without breaking its DKIM signature).
//! * **Data transparency**: the message is written with CRLF line endings only (a stray
//!   bare CR or LF becomes CRLF) and every line starting with `.` is dot-stuffed, so nothing
//!   in the message can end the data early downstream.
//! * **Results per recipient**: RCPT replies decide for each recipient; the reply after the
//!   data decides for all accepted ones (LMTP: one reply per accepted recipient, RFC 2033).
//!
//! The wire syntax (reply parsing, EHLO capabilities, command and DATA encoding) is the sans-IO
//! [`crate::protocol::client`]; this module owns the socket, the timeouts and the decisions.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::Instrument as _;

use super::mx::Target;
use super::outcome::{Diagnostic, RecipientOutcome};
use super::policy::{self, Check, verify::TlsFailure};
use super::tls::{ClientTls, server_name};
use crate::config::ClientTimeouts;
use crate::protocol::client::{
    Capabilities, ClientCommand, EncodeError, ReplyError, encode_data, parse_reply, status_of,
};
use crate::protocol::{BodyType, EnhancedCode, MailParams, RcptParams, Reply};

/// Size of one read from the socket.
const READ_CHUNK: usize = 8 * 1024;
/// Size of one write of message data; each write gets the `dataBlock` timeout.
const WRITE_CHUNK: usize = 64 * 1024;

/// Protocol spoken on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Smtp,
    /// RFC 2033: LHLO instead of EHLO, one reply per recipient after the data.
    Lmtp,
}

/// How the connection uses TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    /// Never start TLS.
    None,
    /// STARTTLS when offered; continue in plaintext when it is not.
    Opportunistic,
    /// STARTTLS must succeed.
    Required,
    /// TLS from the first byte (RFC 8314, port 465).
    Implicit,
}

/// Credentials for AUTH. `Debug` does not show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Everything needed to open a connection.
pub struct ConnectOptions<'a> {
    pub target: &'a Target,
    /// Our host name, sent in EHLO.
    pub helo: &'a str,
    pub protocol: Protocol,
    pub tls: TlsPolicy,
    /// Verify the certificate (for `Required` and `Implicit`); opportunistic TLS never
    /// verifies.
    pub verify_certificate: bool,
    pub credentials: Option<&'a Credentials>,
    pub timeouts: &'a ClientTimeouts,
    pub tls_config: &'a ClientTls,
    /// What the server's chain must satisfy after the handshake (MTA-STS, DANE).
    pub check: &'a Check,
    /// A failed `check` refuses the host (`false`: record it and carry on).
    pub enforce: bool,
    /// The recipient domain: DANE-TA's second reference identifier (RFC 7672 3.2.2).
    pub next_hop: &'a str,
}

/// Why a connection or a command failed. Every variant is temporary for the message: the
/// next host is tried, and the recipients are deferred when none is left.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out waiting for the {phase} reply")]
    Timeout { phase: &'static str },
    #[error("connection lost during {phase}: {source}")]
    Io {
        phase: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("connection closed by the server during {phase}")]
    Closed { phase: &'static str },
    #[error("invalid reply during {phase}: {source}")]
    BadReply {
        phase: &'static str,
        #[source]
        source: ReplyError,
    },
    #[error("cannot write the {phase} command: {source}")]
    Encode {
        phase: &'static str,
        #[source]
        source: EncodeError,
    },
    #[error("{phase} refused: {reply}")]
    Rejected { phase: &'static str, reply: Reply },
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("TLS is required but {0}")]
    TlsUnavailable(String),
    #[error("TLS policy not met: {0}")]
    TlsPolicy(TlsFailure),
    #[error("the server sent plaintext after its STARTTLS reply (response injection)")]
    StartTlsInjection,
    #[error("authentication failed: {0}")]
    Auth(String),
}

impl ClientError {
    /// The diagnostic for deferring recipients because of this error.
    pub fn diagnostic(&self, remote_mta: &str) -> Diagnostic {
        let status = match self {
            Self::Connect { .. } => EnhancedCode(4, 4, 1),
            Self::Timeout { .. } | Self::Io { .. } | Self::Closed { .. } => EnhancedCode(4, 4, 2),
            Self::BadReply { .. } => EnhancedCode(4, 5, 0),
            // Our own host name does not fit in a command: a configuration error (X.3.5).
            Self::Encode { .. } => EnhancedCode(4, 3, 5),
            Self::Rejected { reply, .. } => {
                let e = status_of(reply);
                // A session-level refusal of one host is temporary for the message.
                EnhancedCode(4, e.1, e.2)
            }
            Self::Tls(_) | Self::StartTlsInjection => EnhancedCode(4, 7, 5),
            Self::TlsUnavailable(_) => EnhancedCode(4, 7, 10),
            Self::TlsPolicy(_) => EnhancedCode(4, 7, 5),
            Self::Auth(_) => EnhancedCode(4, 7, 8),
        };
        let mut d = Diagnostic::local(status, self.to_string());
        if let Self::Rejected { reply, .. } = self {
            d.reply = Some(reply.clone());
            d.text = String::new();
        }
        d.remote_mta = Some(remote_mta.to_owned());
        d
    }

    /// Whether the session itself is gone (closed, broken, or a 421 "closing the channel"),
    /// rather than a server answering or a timeout: what a pooled connection that the
    /// server closed while it was idle gives at its next command.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            Self::Closed { .. } | Self::Io { .. } => true,
            Self::Rejected { reply, .. } => reply.code == 421,
            _ => false,
        }
    }
}

/// A pooled connection back from a transaction more recently than this is reused without
/// the RSET round trip that checks it first: every transaction leaves the session clean
/// (a failed one ends with RSET, see [`SmtpClient::send`]), and a server that closed it
/// meanwhile fails the next MAIL before anything is committed
/// ([`ClientError::is_connection_lost`]), as a failed RSET would. Receiving MTAs keep an
/// idle session for minutes (RFC 5321 4.5.3.2.7 asks for 5); Postfix keeps its cached
/// connections for 2 s.
pub const UNCHECKED_REUSE: Duration = Duration::from_secs(2);

/// One message to send.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// Reverse path without brackets; empty for the null sender.
    pub mail_from: &'a str,
    pub recipients: &'a [String],
    /// The message: CRLF line endings, not dot-stuffed.
    pub body: &'a [u8],
    /// `BODY=8BITMIME` was declared at acceptance.
    pub eight_bit: bool,
    /// `SMTPUTF8` was declared at acceptance.
    pub smtputf8: bool,
    /// `REQUIRETLS` was declared at acceptance (passed on where the server supports it).
    pub require_tls: bool,
}

/// A plaintext or TLS stream.
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Transient state while upgrading to TLS.
    Gone,
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Gone => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Gone => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Gone => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Gone => Poll::Ready(Ok(())),
        }
    }
}

/// One connection to an SMTP or LMTP server.
pub struct SmtpClient {
    io: Io,
    rbuf: BytesMut,
    caps: Capabilities,
    target: Target,
    protocol: Protocol,
    helo: String,
    timeouts: ClientTimeouts,
    tls: Option<crate::tls::TlsInfo>,
    /// The server's certificate was verified (WebPKI or DANE), so the connection may carry
    /// mail that must only travel verified.
    verified: bool,
    /// The chain check failed without being enforced (MTA-STS testing).
    tls_failure: Option<TlsFailure>,
    /// Messages sent (for the reuse limit).
    messages: u32,
    /// False after an error left the session in an unknown state.
    usable: bool,
    /// While [`SmtpClient::send`] runs: the transaction's replies, which go on its span
    /// instead of a span each.
    transcript: Option<Transcript>,
}

/// The replies of one transaction, for the `smtp.client.send` span.
#[derive(Default)]
struct Transcript {
    /// `MAIL: 250 2.1.0 Ok; RCPT: ...`, in order.
    replies: String,
    /// The code of the last reply other than an RSET's (the one that decided).
    code: Option<u16>,
}

impl SmtpClient {
    /// Connects, reads the greeting, says EHLO, starts TLS and authenticates as `options`
    /// say.
    #[tracing::instrument(
        name = "smtp.client.connect",
        skip_all,
        fields(otel.kind = "client", host = %options.target.host, addr = %options.target.addr)
    )]
    pub async fn connect(options: &ConnectOptions<'_>) -> Result<Self, ClientError> {
        let t = options.timeouts;
        let addr = options.target.addr;
        let tcp = tokio::time::timeout(t.connect.0, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout { phase: "connect" })?
            .map_err(|source| ClientError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let mut client = Self {
            io: Io::Plain(tcp),
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            caps: Capabilities::default(),
            target: options.target.clone(),
            protocol: options.protocol,
            helo: options.helo.to_owned(),
            timeouts: t.clone(),
            tls: None,
            verified: false,
            tls_failure: None,
            messages: 0,
            usable: true,
            transcript: None,
        };
        if options.tls == TlsPolicy::Implicit {
            client.start_tls(options, true).await?;
        }
        let greeting = client.read_reply(t.greeting.0, "greeting").await?;
        if greeting.code != 220 {
            return Err(ClientError::Rejected {
                phase: "greeting",
                reply: greeting,
            });
        }
        client.hello().await?;
        match options.tls {
            TlsPolicy::Opportunistic if client.caps.starttls => {
                client.starttls(options).await?;
            }
            TlsPolicy::Required if client.caps.starttls => {
                client.starttls(options).await?;
            }
            TlsPolicy::Required => {
                return Err(ClientError::TlsUnavailable(
                    "the server does not offer STARTTLS".to_owned(),
                ));
            }
            _ => {}
        }
        if let Some(credentials) = options.credentials {
            client.authenticate(credentials).await?;
        }
        tracing::debug!(
            tls = client.tls.is_some(),
            pipelining = client.caps.pipelining,
            "connected"
        );
        Ok(client)
    }

    /// The announced extensions.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The host this connection goes to.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// TLS details when TLS is active.
    pub fn tls_info(&self) -> Option<&crate::tls::TlsInfo> {
        self.tls.as_ref()
    }

    /// Whether the server's certificate was verified (a verified handshake, or the policy
    /// check passed).
    pub fn is_verified(&self) -> bool {
        self.verified
    }

    /// The failed, not enforced, policy check of this connection.
    pub fn tls_failure(&self) -> Option<&TlsFailure> {
        self.tls_failure.as_ref()
    }

    /// Whether the connection can carry another transaction.
    pub fn is_usable(&self) -> bool {
        self.usable
    }

    /// Messages sent over this connection.
    pub fn messages_sent(&self) -> u32 {
        self.messages
    }

    /// Makes a pooled connection that has been idle for `idle` ready for the next
    /// transaction: RSET (which checks that it still works) unless it came back within
    /// [`UNCHECKED_REUSE`]. Whether the RSET was skipped.
    pub async fn prepare_reuse(&mut self, idle: Duration) -> Result<bool, ClientError> {
        if idle < UNCHECKED_REUSE {
            return Ok(true);
        }
        self.reset().await.map(|()| false)
    }

    /// RSET: checks that a reused connection still works and clears any state.
    pub async fn reset(&mut self) -> Result<(), ClientError> {
        let reply = self
            .command(&ClientCommand::Rset, self.timeouts.command.0, "RSET")
            .await?;
        if reply.code == 250 {
            Ok(())
        } else {
            self.usable = false;
            Err(ClientError::Rejected {
                phase: "RSET",
                reply,
            })
        }
    }

    /// Asks whether the server would take mail for `recipient`: `MAIL FROM:<>`,
    /// `RCPT TO:<recipient>`, then `RSET` (no data is ever sent). The reply to RCPT, or to
    /// MAIL when that was refused. Used for recipient verification at RCPT time
    /// ([`crate::recipient_check`]).
    pub async fn probe_recipient(&mut self, recipient: &str) -> Result<Reply, ClientError> {
        let params = MailParams::default();
        let mail = ClientCommand::Mail {
            from: "",
            params: &params,
        };
        let mail_reply = self.command(&mail, self.timeouts.mail.0, "MAIL").await?;
        if mail_reply.code != 250 {
            let _ = self.reset().await;
            return Ok(mail_reply);
        }
        let no_params = RcptParams::default();
        let rcpt = ClientCommand::Rcpt {
            to: recipient,
            params: &no_params,
        };
        let reply = self.command(&rcpt, self.timeouts.rcpt.0, "RCPT").await?;
        let _ = self.reset().await;
        Ok(reply)
    }

    /// QUIT and close; errors are irrelevant at this point.
    pub async fn quit(mut self) {
        if self.usable {
            let limit = self.timeouts.command.0.min(Duration::from_secs(10));
            let _ = self.command(&ClientCommand::Quit, limit, "QUIT").await;
        }
        let _ = self.io.shutdown().await;
    }

    /// Sends one message. `Err` means nothing was committed (the transaction failed before
    /// the data was sent): try another host. `Ok` has one outcome per recipient, in order.
    /// The span has the transaction's replies in order, in `smtp.replies` (`MAIL: 250 2.1.0
    /// Ok; RCPT: 250 ...; DATA: 354 ...; end of data: 250 ...`), and in `smtp.reply_code`
    /// the code of the last one other than an RSET's.
    #[tracing::instrument(
        name = "smtp.client.send",
        skip_all,
        fields(
            otel.kind = "client",
            host = %self.target.host,
            recipients = msg.recipients.len(),
            smtp.replies = tracing::field::Empty,
            smtp.reply_code = tracing::field::Empty,
        )
    )]
    pub async fn send(&mut self, msg: &Outgoing<'_>) -> Result<Vec<RecipientOutcome>, ClientError> {
        self.transcript = Some(Transcript::default());
        let result = self.transaction(msg).await;
        if let Some(t) = self.transcript.take() {
            // Each recorded once: a field recorded again is another attribute, not a new value.
            let span = tracing::Span::current();
            span.record("smtp.replies", t.replies.trim_end_matches("; "));
            if let Some(code) = t.code {
                span.record("smtp.reply_code", i64::from(code));
            }
        }
        result
    }

    async fn transaction(
        &mut self,
        msg: &Outgoing<'_>,
    ) -> Result<Vec<RecipientOutcome>, ClientError> {
        let host = self.target.host.clone();
        if let Some(refusal) = refusal(&self.caps, &self.target.host, msg) {
            return Ok(msg
                .recipients
                .iter()
                .map(|_| RecipientOutcome::Failed(refusal.clone()))
                .collect());
        }
        let (mail, rcpts) = match envelope_commands(&self.caps, msg) {
            Ok(lines) => lines,
            Err(mut d) => {
                d.remote_mta = Some(host);
                return Ok(msg
                    .recipients
                    .iter()
                    .map(|_| RecipientOutcome::Failed(d.clone()))
                    .collect());
            }
        };

        let (mail_reply, rcpt_replies, data_reply) = if self.caps.pipelining {
            let mut batch = mail;
            for r in &rcpts {
                batch.extend_from_slice(r);
            }
            ClientCommand::Data
                .encode(&mut batch)
                .map_err(|source| ClientError::Encode {
                    phase: "DATA",
                    source,
                })?;
            self.write_all(&batch, self.timeouts.mail.0, "MAIL").await?;
            let mail_reply = self.read_reply(self.timeouts.mail.0, "MAIL").await?;
            let mut rcpt_replies = Vec::with_capacity(rcpts.len());
            for _ in &rcpts {
                rcpt_replies.push(self.read_reply(self.timeouts.rcpt.0, "RCPT").await?);
            }
            let data_reply = self.read_reply(self.timeouts.data_init.0, "DATA").await?;
            (mail_reply, rcpt_replies, Some(data_reply))
        } else {
            let mail_reply = self.line(&mail, self.timeouts.mail.0, "MAIL").await?;
            let mut rcpt_replies = Vec::new();
            if mail_reply.code == 250 {
                for r in &rcpts {
                    rcpt_replies.push(self.line(r, self.timeouts.rcpt.0, "RCPT").await?);
                }
            }
            let any_accepted = rcpt_replies.iter().any(|r| (200..300).contains(&r.code));
            let data_reply = if any_accepted {
                Some(
                    self.command(&ClientCommand::Data, self.timeouts.data_init.0, "DATA")
                        .await?,
                )
            } else {
                None
            };
            (mail_reply, rcpt_replies, data_reply)
        };

        if mail_reply.code != 250 {
            self.abandon_transaction(data_reply.as_ref()).await;
            if mail_reply.is_permanent() {
                let d = Diagnostic::from_reply(mail_reply, Some(host));
                return Ok(msg
                    .recipients
                    .iter()
                    .map(|_| RecipientOutcome::Failed(d.clone()))
                    .collect());
            }
            return Err(ClientError::Rejected {
                phase: "MAIL",
                reply: mail_reply,
            });
        }

        // Per-recipient results of RCPT; accepted ones wait for the data reply.
        let mut outcomes: Vec<Option<RecipientOutcome>> = rcpt_replies
            .into_iter()
            .map(|reply| {
                if (200..300).contains(&reply.code) {
                    None
                } else if reply.code == 552 {
                    // RFC 5321 4.5.3.1.10: "552 too many recipients" is to be treated as
                    // temporary.
                    Some(RecipientOutcome::Deferred(Diagnostic::from_reply(
                        reply,
                        Some(host.clone()),
                    )))
                } else {
                    Some(RecipientOutcome::from_reply(reply, &host))
                }
            })
            .collect();
        let accepted: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| o.is_none())
            .map(|(i, _)| i)
            .collect();
        if accepted.is_empty() {
            self.abandon_transaction(data_reply.as_ref()).await;
            return Ok(outcomes
                .into_iter()
                .map(|o| o.unwrap_or_else(|| unreachable_outcome(&host)))
                .collect());
        }
        let Some(data_reply) = data_reply else {
            return Err(ClientError::Closed { phase: "DATA" });
        };
        if data_reply.code != 354 {
            let outcome = if data_reply.is_permanent() {
                RecipientOutcome::Failed(Diagnostic::from_reply(data_reply, Some(host.clone())))
            } else {
                RecipientOutcome::Deferred(Diagnostic::from_reply(data_reply, Some(host.clone())))
            };
            for &i in &accepted {
                outcomes[i] = Some(outcome.clone());
            }
            let _ = self.reset().await;
            return Ok(outcomes
                .into_iter()
                .map(|o| o.unwrap_or_else(|| unreachable_outcome(&host)))
                .collect());
        }

        // From here the message may reach the recipients: errors no longer mean "try
        // another host" (that could deliver twice) but "deferred, unknown state".
        let final_replies = self.transmit_data(msg.body, accepted.len()).await;
        self.messages += 1;
        match final_replies {
            Ok(replies) => {
                for (&i, reply) in accepted.iter().zip(replies) {
                    outcomes[i] = Some(RecipientOutcome::from_reply(reply, &host));
                }
            }
            Err(e) => {
                self.usable = false;
                tracing::warn!(error = %e, "connection failed after the data was sent; the message may have been delivered");
                let d = e.diagnostic(&host);
                for &i in &accepted {
                    if outcomes[i].is_none() {
                        outcomes[i] = Some(RecipientOutcome::Deferred(d.clone()));
                    }
                }
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| unreachable_outcome(&host)))
            .collect())
    }

    /// Gets the session back to a clean state after a transaction that will not send data:
    /// a pipelined DATA that got 354 anyway is ended with an empty message's dot (RFC 2920
    /// 3.1), then RSET.
    async fn abandon_transaction(&mut self, data_reply: Option<&Reply>) {
        if data_reply.is_some_and(|r| r.code == 354) {
            let ok = self
                .write_all(&encode_data(&[]), self.timeouts.data_block.0, "DATA")
                .await
                .is_ok()
                && self
                    .read_reply(self.timeouts.data_termination.0, "end of data")
                    .await
                    .is_ok();
            if !ok {
                self.usable = false;
                return;
            }
        }
        if self.reset().await.is_err() {
            self.usable = false;
        }
    }

    /// Writes the message and reads the reply (SMTP) or replies (LMTP, one per accepted
    /// recipient).
    async fn transmit_data(
        &mut self,
        body: &[u8],
        accepted: usize,
    ) -> Result<Vec<Reply>, ClientError> {
        let wire = encode_data(body);
        for chunk in wire.chunks(WRITE_CHUNK) {
            self.write_all(chunk, self.timeouts.data_block.0, "DATA")
                .await?;
        }
        let n = match self.protocol {
            Protocol::Smtp => 1,
            Protocol::Lmtp => accepted,
        };
        let mut replies = Vec::with_capacity(n);
        for _ in 0..n {
            replies.push(
                self.read_reply(self.timeouts.data_termination.0, "end of data")
                    .await?,
            );
        }
        if self.protocol == Protocol::Smtp {
            let reply = replies
                .pop()
                .unwrap_or_else(|| Reply::plain(451, "no reply"));
            replies = vec![reply; accepted];
        }
        Ok(replies)
    }

    /// EHLO (LHLO), with a HELO fallback for plain SMTP servers.
    async fn hello(&mut self) -> Result<(), ClientError> {
        let helo = self.helo.clone();
        let hello = match self.protocol {
            Protocol::Smtp => ClientCommand::Ehlo(&helo),
            Protocol::Lmtp => ClientCommand::Lhlo(&helo),
        };
        let reply = self
            .command(&hello, self.timeouts.command.0, "EHLO")
            .await?;
        if reply.code == 250 {
            self.caps = Capabilities::parse(&reply);
            return Ok(());
        }
        if self.protocol == Protocol::Smtp && reply.is_permanent() {
            let helo = self
                .command(&ClientCommand::Helo(&helo), self.timeouts.command.0, "HELO")
                .await?;
            if helo.code == 250 {
                self.caps = Capabilities::default();
                return Ok(());
            }
            return Err(ClientError::Rejected {
                phase: "HELO",
                reply: helo,
            });
        }
        Err(ClientError::Rejected {
            phase: "EHLO",
            reply,
        })
    }

    async fn starttls(&mut self, options: &ConnectOptions<'_>) -> Result<(), ClientError> {
        let reply = self
            .command(
                &ClientCommand::StartTls,
                self.timeouts.command.0,
                "STARTTLS",
            )
            .await?;
        if reply.code != 220 {
            if options.tls == TlsPolicy::Required {
                return Err(ClientError::TlsUnavailable(format!(
                    "STARTTLS was refused: {reply}"
                )));
            }
            // Opportunistic: carry on in plaintext, as if STARTTLS had not been offered.
            tracing::info!(%reply, "STARTTLS refused; continuing without TLS");
            return Ok(());
        }
        if !self.rbuf.is_empty() {
            self.usable = false;
            return Err(ClientError::StartTlsInjection);
        }
        let verify = options.tls == TlsPolicy::Required && options.verify_certificate;
        self.start_tls(options, verify).await?;
        // RFC 3207 4.2: forget everything learned before TLS and say EHLO again.
        self.caps = Capabilities::default();
        self.hello().await
    }

    #[tracing::instrument(
        name = "smtp.client.tls",
        skip_all,
        fields(verify, tls.protocol.version = tracing::field::Empty, tls.cipher = tracing::field::Empty)
    )]
    async fn start_tls(
        &mut self,
        options: &ConnectOptions<'_>,
        verify: bool,
    ) -> Result<(), ClientError> {
        let result = self.handshake(options, verify).await;
        let version = self.tls.as_ref().map(|t| t.version.as_str());
        options
            .tls_config
            .count_handshake(version.filter(|_| result.is_ok()));
        if let (Ok(()), Some(tls)) = (&result, &self.tls) {
            let span = tracing::Span::current();
            span.record("tls.protocol.version", tls.version.as_str());
            span.record("tls.cipher", tls.cipher.as_str());
        }
        result
    }

    async fn handshake(
        &mut self,
        options: &ConnectOptions<'_>,
        verify: bool,
    ) -> Result<(), ClientError> {
        let verify = verify && options.verify_certificate;
        let Io::Plain(tcp) = std::mem::replace(&mut self.io, Io::Gone) else {
            return Err(ClientError::Tls("TLS is already active".to_owned()));
        };
        let connector = TlsConnector::from(options.tls_config.config(verify));
        let name = server_name(&self.target.host, self.target.addr.ip());
        let stream = tokio::time::timeout(self.timeouts.command.0, connector.connect(name, tcp))
            .await
            .map_err(|_| ClientError::Timeout {
                phase: "TLS handshake",
            })?
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let (_, conn) = stream.get_ref();
        self.verified = verify;
        if *options.check != Check::None {
            let certs = conn.peer_certificates().unwrap_or_default();
            let host = self.target.host.as_str();
            let result = match options.check {
                Check::None => Ok(()),
                Check::WebPki => policy::verify::webpki(options.tls_config, certs, host),
                Check::Dane(records) => policy::verify::dane(
                    options.tls_config,
                    records,
                    certs,
                    &[host, options.next_hop],
                ),
            };
            match result {
                Ok(()) => self.verified = true,
                Err(failure) if options.enforce => {
                    self.usable = false;
                    return Err(ClientError::TlsPolicy(failure));
                }
                Err(failure) => {
                    tracing::info!(reason = %failure, "TLS policy check failed (not enforced)");
                    self.tls_failure = Some(failure);
                }
            }
        }
        self.tls = Some(crate::tls::TlsInfo {
            version: crate::tls::version_name(conn.protocol_version()),
            cipher: conn
                .negotiated_cipher_suite()
                .and_then(|c| c.suite().as_str())
                .unwrap_or("unknown")
                .to_owned(),
        });
        self.io = Io::Tls(Box::new(stream));
        Ok(())
    }

    async fn authenticate(&mut self, credentials: &Credentials) -> Result<(), ClientError> {
        if self.tls.is_none() {
            return Err(ClientError::Auth(
                "refusing to send credentials without TLS".to_owned(),
            ));
        }
        let timeout = self.timeouts.command.0;
        let reply = if self.caps.offers_auth("PLAIN") {
            let plain = ClientCommand::AuthPlain {
                username: &credentials.username,
                password: &credentials.password,
            };
            self.command(&plain, timeout, "AUTH").await?
        } else if self.caps.offers_auth("LOGIN") {
            let r = self
                .command(&ClientCommand::AuthLogin, timeout, "AUTH")
                .await?;
            if r.code != 334 {
                return Err(ClientError::Auth(r.to_string()));
            }
            let username = ClientCommand::AuthLoginResponse(&credentials.username);
            let r = self.command(&username, timeout, "AUTH").await?;
            if r.code != 334 {
                return Err(ClientError::Auth(r.to_string()));
            }
            let password = ClientCommand::AuthLoginResponse(&credentials.password);
            self.command(&password, timeout, "AUTH").await?
        } else {
            return Err(ClientError::Auth(format!(
                "the server offers no usable mechanism (offered: {})",
                self.caps.auth.join(" ")
            )));
        };
        if reply.code == 235 {
            Ok(())
        } else {
            Err(ClientError::Auth(reply.to_string()))
        }
    }

    /// Writes one command and reads its reply.
    async fn command(
        &mut self,
        command: &ClientCommand<'_>,
        timeout: Duration,
        phase: &'static str,
    ) -> Result<Reply, ClientError> {
        let line = command
            .to_bytes()
            .map_err(|source| ClientError::Encode { phase, source })?;
        self.line(&line, timeout, phase).await
    }

    /// Writes one encoded command line and reads its reply.
    async fn line(
        &mut self,
        line: &[u8],
        timeout: Duration,
        phase: &'static str,
    ) -> Result<Reply, ClientError> {
        self.write_all(line, timeout, phase).await?;
        self.read_reply(timeout, phase).await
    }

    async fn write_all(
        &mut self,
        bytes: &[u8],
        timeout: Duration,
        phase: &'static str,
    ) -> Result<(), ClientError> {
        let result = tokio::time::timeout(timeout, async {
            self.io.write_all(bytes).await?;
            self.io.flush().await
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => {
                self.usable = false;
                Err(ClientError::Io { phase, source })
            }
            Err(_) => {
                self.usable = false;
                Err(ClientError::Timeout { phase })
            }
        }
    }

    /// Reads one complete reply within `timeout`, in a span of its own (the phase and the
    /// code: never the command line, which may carry credentials).
    async fn read_reply(
        &mut self,
        timeout: Duration,
        phase: &'static str,
    ) -> Result<Reply, ClientError> {
        if let Some(mut t) = self.transcript.take() {
            // Inside a transaction: on the `smtp.client.send` span (a span per reply would
            // cost about as much as the rest of the delivery's tracing together).
            let result = self.read_reply_inner(timeout, phase).await;
            let _ = match &result {
                Ok(reply) => {
                    // The reply that decided, not the RSET after a refusal.
                    if phase != "RSET" {
                        t.code = Some(reply.code);
                    }
                    write!(t.replies, "{phase}: {}; ", first_line(reply))
                }
                Err(e) => write!(t.replies, "{phase}: {e}; "),
            };
            self.transcript = Some(t);
            return result;
        }
        let span = tracing::info_span!(
            "smtp.client.reply",
            smtp.phase = phase,
            smtp.reply_code = tracing::field::Empty,
            smtp.reply = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        let result = self
            .read_reply_inner(timeout, phase)
            .instrument(span.clone())
            .await;
        match &result {
            Ok(reply) => {
                span.record("smtp.reply_code", i64::from(reply.code));
                span.record("smtp.reply", first_line(reply).as_str());
            }
            Err(e) => {
                span.record("error", e.to_string().as_str());
            }
        }
        result
    }

    async fn read_reply_inner(
        &mut self,
        timeout: Duration,
        phase: &'static str,
    ) -> Result<Reply, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match parse_reply(&self.rbuf) {
                Ok(Some((reply, used))) => {
                    self.rbuf.advance(used);
                    if reply.code == 421 {
                        // RFC 5321 3.8: the server is closing the channel.
                        self.usable = false;
                    }
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(source) => {
                    self.usable = false;
                    return Err(ClientError::BadReply { phase, source });
                }
            }
            self.rbuf.reserve(READ_CHUNK);
            let read = tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.rbuf)).await;
            match read {
                Ok(Ok(0)) => {
                    self.usable = false;
                    return Err(ClientError::Closed { phase });
                }
                Ok(Ok(_)) => {}
                Ok(Err(source)) => {
                    self.usable = false;
                    return Err(ClientError::Io { phase, source });
                }
                Err(_) => {
                    self.usable = false;
                    return Err(ClientError::Timeout { phase });
                }
            }
        }
    }
}

/// The first line of a reply (code, enhanced code, text), as a span shows it.
fn first_line(reply: &Reply) -> String {
    let text = reply.to_string();
    let line = text.lines().next().unwrap_or_default();
    // A reply line is at most 512 octets (RFC 5321 4.5.3.1.5); a hostile server may send
    // more, which a span attribute does not need.
    line.chars().take(200).collect()
}

/// A reason not to send `msg` to a server with `caps` at all (it would have to be changed
/// in a way the server did not agree to), or `None`.
pub fn refusal(caps: &Capabilities, host: &str, msg: &Outgoing<'_>) -> Option<Diagnostic> {
    let refuse = |status: EnhancedCode, text: String| {
        let mut d = Diagnostic::local(status, text);
        d.remote_mta = Some(host.to_owned());
        Some(d)
    };
    if needs_smtputf8(msg) && !caps.smtputf8 {
        return refuse(
            EnhancedCode(5, 6, 7),
            "the server does not support SMTPUTF8, which this message needs (RFC 6531)".to_owned(),
        );
    }
    if is_eight_bit(msg) && !caps.eight_bit_mime {
        return refuse(
            EnhancedCode(5, 6, 3),
            "the server does not support 8BITMIME and the message has 8-bit content".to_owned(),
        );
    }
    if let Some(limit) = caps.size.filter(|l| *l > 0)
        && msg.body.len() as u64 > limit
    {
        return refuse(
            EnhancedCode(5, 3, 4),
            format!(
                "message size {} exceeds the server's limit of {limit} bytes",
                msg.body.len()
            ),
        );
    }
    None
}

/// The MAIL parameters for `msg`, as far as the server announced support for them.
pub fn mail_params(caps: &Capabilities, msg: &Outgoing<'_>) -> MailParams {
    MailParams {
        size: caps.size.map(|_| msg.body.len() as u64),
        body: (is_eight_bit(msg) && caps.eight_bit_mime).then_some(BodyType::EightBitMime),
        smtputf8: needs_smtputf8(msg) && caps.smtputf8,
        requiretls: msg.require_tls && caps.requiretls,
        ..MailParams::default()
    }
}

/// The MAIL line and one RCPT line per recipient, encoded; or, when an envelope address cannot
/// be written as a command (it would inject one: only a queue entry that did not come through
/// our own parser can have such an address), the permanent failure of the whole message.
fn envelope_commands(
    caps: &Capabilities,
    msg: &Outgoing<'_>,
) -> Result<(Vec<u8>, Vec<Vec<u8>>), Diagnostic> {
    let fail = |status: EnhancedCode, e: EncodeError| Diagnostic::local(status, e.to_string());
    let params = mail_params(caps, msg);
    let mail = ClientCommand::Mail {
        from: msg.mail_from,
        params: &params,
    }
    .to_bytes()
    // RFC 3463: X.1.7 bad sender's mailbox address syntax.
    .map_err(|e| fail(EnhancedCode(5, 1, 7), e))?;
    let no_params = RcptParams::default();
    let rcpts = msg
        .recipients
        .iter()
        .map(|to| {
            ClientCommand::Rcpt {
                to,
                params: &no_params,
            }
            .to_bytes()
            // RFC 3463: X.1.3 bad destination mailbox address syntax.
            .map_err(|e| fail(EnhancedCode(5, 1, 3), e))
        })
        .collect::<Result<_, _>>()?;
    Ok((mail, rcpts))
}

fn needs_smtputf8(msg: &Outgoing<'_>) -> bool {
    msg.smtputf8 || !msg.mail_from.is_ascii() || msg.recipients.iter().any(|r| !r.is_ascii())
}

fn is_eight_bit(msg: &Outgoing<'_>) -> bool {
    msg.eight_bit || !msg.body.is_ascii()
}

/// Every accepted recipient gets an outcome before the result is returned; this fills the
/// impossible gap without a panic.
fn unreachable_outcome(host: &str) -> RecipientOutcome {
    let mut d = Diagnostic::local(
        EnhancedCode(4, 3, 0),
        "internal error: recipient without a result",
    );
    d.remote_mta = Some(host.to_owned());
    RecipientOutcome::Deferred(d)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use tokio::io::AsyncBufReadExt as _;
    use tokio::net::TcpListener;

    use super::*;

    /// A one-connection scripted SMTP server on loopback: sends `greeting`, then answers each
    /// command line with `respond(line)` (`None` closes); after a `354` it collects message
    /// data up to the dot and answers with `respond(".")`. Returns everything it received.
    async fn fake_server(
        greeting: &'static str,
        respond: fn(&str) -> Option<String>,
    ) -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(read).lines();
            let mut seen = Vec::new();
            write.write_all(greeting.as_bytes()).await.unwrap();
            let mut in_data = false;
            while let Ok(Some(line)) = lines.next_line().await {
                seen.push(line.clone());
                // In the data only the final dot gets an answer.
                if in_data && line != "." {
                    continue;
                }
                let key = if in_data { "." } else { line.as_str() };
                match respond(key) {
                    Some(reply) => {
                        in_data = reply.starts_with("354");
                        if write.write_all(reply.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                }
            }
            seen
        });
        (addr, task)
    }

    fn target(addr: SocketAddr) -> Target {
        Target {
            host: "mx.fake.test".into(),
            addr,
        }
    }

    fn timeouts() -> ClientTimeouts {
        let five = crate::config::HumanDuration::from_secs(5);
        ClientTimeouts {
            connect: five,
            greeting: five,
            command: five,
            mail: five,
            rcpt: five,
            data_init: five,
            data_block: five,
            data_termination: five,
        }
    }

    async fn connect_to(
        addr: SocketAddr,
        protocol: Protocol,
        tls: TlsPolicy,
        credentials: Option<&Credentials>,
    ) -> Result<SmtpClient, ClientError> {
        let target = target(addr);
        let timeouts = timeouts();
        let tls_config = ClientTls::new(None).unwrap();
        SmtpClient::connect(&ConnectOptions {
            target: &target,
            helo: "mx.example.test",
            protocol,
            tls,
            verify_certificate: true,
            credentials,
            timeouts: &timeouts,
            tls_config: &tls_config,
            check: &Check::None,
            enforce: false,
            next_hop: "fake.test",
        })
        .await
    }

    fn message<'a>(rcpts: &'a [String], body: &'a [u8]) -> Outgoing<'a> {
        Outgoing {
            mail_from: "alice@example.test",
            recipients: rcpts,
            body,
            eight_bit: false,
            smtputf8: false,
            require_tls: false,
        }
    }

    #[tokio::test]
    async fn pipelined_transaction_with_results_per_recipient() {
        let (addr, server) = fake_server("220 fake ESMTP\r\n", |line| {
            Some(match line {
                l if l.starts_with("EHLO") => {
                    "250-fake\r\n250-PIPELINING\r\n250 SIZE 100000\r\n".into()
                }
                l if l.starts_with("MAIL") => "250 2.1.0 ok\r\n".into(),
                "RCPT TO:<carol@remote.test>" => "250 2.1.5 ok\r\n".into(),
                l if l.starts_with("RCPT") => "550 5.1.1 no such user\r\n".into(),
                "DATA" => "354 go\r\n".into(),
                "." => "250 2.0.0 queued\r\n".into(),
                "QUIT" => "221 bye\r\n".into(),
                _ => "500 what\r\n".into(),
            })
        })
        .await;
        let mut client = connect_to(addr, Protocol::Smtp, TlsPolicy::Opportunistic, None)
            .await
            .unwrap();
        assert!(client.capabilities().pipelining);
        let rcpts = vec![
            "carol@remote.test".to_owned(),
            "nobody@remote.test".to_owned(),
        ];
        let outcomes = client
            .send(&message(&rcpts, b"Subject: x\r\n\r\n.dot\r\n"))
            .await
            .unwrap();
        assert_eq!(outcomes[0].label(), "delivered");
        let RecipientOutcome::Failed(d) = &outcomes[1] else {
            panic!("{outcomes:?}")
        };
        assert_eq!(d.status, EnhancedCode(5, 1, 1));
        assert!(client.is_usable());
        client.quit().await;
        let seen = server.await.unwrap();
        assert!(
            seen.contains(&"MAIL FROM:<alice@example.test> SIZE=20".to_owned()),
            "{seen:?}"
        );
        assert!(seen.contains(&"..dot".to_owned()), "dot-stuffed: {seen:?}");
    }

    #[tokio::test]
    async fn lmtp_reports_each_recipient_after_the_data() {
        let (addr, _server) = fake_server("220 lmtp\r\n", |line| {
            Some(match line {
                l if l.starts_with("LHLO") => "250-lmtp\r\n250 8BITMIME\r\n".into(),
                l if l.starts_with("MAIL") || l.starts_with("RCPT") => "250 ok\r\n".into(),
                "DATA" => "354 go\r\n".into(),
                "." => "250 2.0.0 delivered\r\n452 4.2.2 mailbox full\r\n".into(),
                _ => "221 bye\r\n".into(),
            })
        })
        .await;
        let mut client = connect_to(addr, Protocol::Lmtp, TlsPolicy::None, None)
            .await
            .unwrap();
        let rcpts = vec![
            "bob@example.test".to_owned(),
            "full@example.test".to_owned(),
        ];
        let outcomes = client
            .send(&message(&rcpts, b"Subject: x\r\n\r\nhi\r\n"))
            .await
            .unwrap();
        let labels: Vec<&str> = outcomes.iter().map(RecipientOutcome::label).collect();
        assert_eq!(labels, ["delivered", "deferred"]);
    }

    #[tokio::test]
    async fn starttls_response_injection_is_refused() {
        // Plaintext "EHLO reply" lines sent with the 220.
        let (addr, _server) = fake_server("220 fake ESMTP\r\n", |line| {
            Some(match line {
                l if l.starts_with("EHLO") => "250-fake\r\n250 STARTTLS\r\n".into(),
                "STARTTLS" => "220 go ahead\r\n250-injected\r\n250 AUTH PLAIN\r\n".into(),
                _ => "500 what\r\n".into(),
            })
        })
        .await;
        let err = connect_to(addr, Protocol::Smtp, TlsPolicy::Opportunistic, None)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ClientError::StartTlsInjection), "{err}");
    }

    #[tokio::test]
    async fn required_tls_without_starttls_defers_and_never_sends_credentials() {
        // A server hiding STARTTLS gets neither mail nor secrets.
        let (addr, server) = fake_server("220 fake ESMTP\r\n", |line| {
            Some(match line {
                l if l.starts_with("EHLO") => "250-fake\r\n250 AUTH PLAIN LOGIN\r\n".into(),
                _ => "500 what\r\n".into(),
            })
        })
        .await;
        let err = connect_to(addr, Protocol::Smtp, TlsPolicy::Required, None)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ClientError::TlsUnavailable(_)), "{err}");
        assert_eq!(err.diagnostic("mx.fake.test").status.0, 4, "temporary");
        drop(server);

        let (addr, server) = fake_server("220 fake ESMTP\r\n", |line| {
            Some(match line {
                l if l.starts_with("EHLO") => "250-fake\r\n250 AUTH PLAIN LOGIN\r\n".into(),
                _ => "500 what\r\n".into(),
            })
        })
        .await;
        let creds = Credentials {
            username: "u".into(),
            password: "secret".into(),
        };
        let err = connect_to(addr, Protocol::Smtp, TlsPolicy::Opportunistic, Some(&creds))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ClientError::Auth(_)), "{err}");
        let seen = server.await.unwrap();
        assert!(seen.iter().all(|l| !l.starts_with("AUTH")), "{seen:?}");
    }

    #[tokio::test]
    async fn odd_greetings_and_garbage_are_temporary_errors() {
        for greeting in [
            "554 go away\r\n",
            "421 busy\r\n",
            "hello there\r\n",
            "220-a\r\n221 b\r\n",
        ] {
            let greeting: &'static str = Box::leak(greeting.to_owned().into_boxed_str());
            let (addr, _server) = fake_server(greeting, |_| None).await;
            let err = connect_to(addr, Protocol::Smtp, TlsPolicy::Opportunistic, None)
                .await
                .err()
                .unwrap();
            let d = err.diagnostic("mx.fake.test");
            assert_eq!(d.status.0, 4, "{greeting:?}: {err}");
        }
    }

    fn accepting_server(line: &str) -> Option<String> {
        Some(match line {
            l if l.starts_with("EHLO") => "250-fake\r\n250 PIPELINING\r\n".into(),
            "DATA" => "354 go\r\n".into(),
            "QUIT" => "221 bye\r\n".into(),
            _ => "250 ok\r\n".into(),
        })
    }

    #[tokio::test]
    async fn a_connection_back_from_a_transaction_moments_ago_is_reused_without_rset() {
        let (addr, server) = fake_server("220 fake ESMTP\r\n", accepting_server).await;
        let mut client = connect_to(addr, Protocol::Smtp, TlsPolicy::Opportunistic, None)
            .await
            .unwrap();
        async fn send(client: &mut SmtpClient) -> &'static str {
            let rcpts = vec!["carol@remote.test".to_owned()];
            client.send(&message(&rcpts, b"x\r\n")).await.unwrap()[0].label()
        }
        assert_eq!(send(&mut client).await, "delivered");
        assert!(
            client.prepare_reuse(Duration::ZERO).await.unwrap(),
            "skipped"
        );
        assert_eq!(send(&mut client).await, "delivered");
        // Idle for longer: checked with RSET first.
        assert!(!client.prepare_reuse(UNCHECKED_REUSE).await.unwrap());
        assert_eq!(send(&mut client).await, "delivered");
        client.quit().await;
        let seen = server.await.unwrap();
        let commands: Vec<&str> = seen
            .iter()
            .map(String::as_str)
            .filter(|l| ["MAIL", "RSET", "QUIT"].iter().any(|c| l.starts_with(c)))
            .map(|l| &l[..4])
            .collect();
        assert_eq!(commands, ["MAIL", "MAIL", "RSET", "MAIL", "QUIT"]);
    }

    #[tokio::test]
    async fn a_pooled_connection_the_server_closed_fails_before_anything_is_committed() {
        // Closed, or closing with a 421 the client reads as the reply to its MAIL.
        for farewell in [None, Some("421 4.4.2 idle too long, closing\r\n")] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
            let server = tokio::spawn(async move {
                let (stream, _) = listener.accept().await.unwrap();
                let (read, mut write) = stream.into_split();
                let mut lines = tokio::io::BufReader::new(read).lines();
                write.write_all(b"220 fake ESMTP\r\n").await.unwrap();
                let mut in_data = false;
                while let Ok(Some(line)) = lines.next_line().await {
                    if in_data && line != "." {
                        continue;
                    }
                    let key = if in_data { "." } else { line.as_str() };
                    let reply = accepting_server(key).unwrap();
                    in_data = reply.starts_with("354");
                    write.write_all(reply.as_bytes()).await.unwrap();
                    if key == "." {
                        break;
                    }
                }
                // The first transaction is done: the server ends the idle session.
                if let Some(farewell) = farewell {
                    write.write_all(farewell.as_bytes()).await.unwrap();
                }
                drop((lines, write));
                let _ = closed_tx.send(());
            });
            let mut client = connect_to(addr, Protocol::Smtp, TlsPolicy::Opportunistic, None)
                .await
                .unwrap();
            let rcpts = vec!["carol@remote.test".to_owned()];
            let first = client.send(&message(&rcpts, b"x\r\n")).await.unwrap();
            assert_eq!(first[0].label(), "delivered");
            assert!(client.is_usable());
            closed_rx.await.unwrap();
            server.await.unwrap();
            assert!(client.prepare_reuse(Duration::ZERO).await.unwrap());
            let err = client
                .send(&message(&rcpts, b"x\r\n"))
                .await
                .err()
                .unwrap_or_else(|| panic!("{farewell:?}: sent over a closed connection"));
            assert!(err.is_connection_lost(), "{farewell:?}: {err}");
            assert!(!client.is_usable(), "{farewell:?}");
        }
    }

    #[tokio::test]
    async fn a_server_closing_mid_transaction_is_an_error_not_a_panic() {
        let (addr, _server) = fake_server("220 fake ESMTP\r\n", |line| match line {
            l if l.starts_with("EHLO") => Some("250-fake\r\n250 PIPELINING\r\n".into()),
            l if l.starts_with("MAIL") => Some("250 ok\r\n".into()),
            // RCPT: the server goes away without a word.
            _ => None,
        })
        .await;
        let mut client = connect_to(addr, Protocol::Smtp, TlsPolicy::Opportunistic, None)
            .await
            .unwrap();
        let rcpts = vec!["carol@remote.test".to_owned()];
        let err = client.send(&message(&rcpts, b"x\r\n")).await.err().unwrap();
        assert!(
            matches!(err, ClientError::Closed { .. } | ClientError::Io { .. }),
            "{err}"
        );
        assert!(!client.is_usable());
    }

    /// The MAIL line the client writes for `msg`, without its CRLF.
    fn mail_command(caps: &Capabilities, msg: &Outgoing<'_>) -> String {
        let (mail, _) = envelope_commands(caps, msg).unwrap();
        String::from_utf8(mail).unwrap().trim_end().to_owned()
    }

    #[tokio::test]
    async fn an_envelope_address_that_would_inject_a_command_fails_before_anything_is_sent() {
        let (addr, server) = fake_server("220 fake ESMTP\r\n", |line| {
            Some(match line {
                l if l.starts_with("EHLO") => "250-fake\r\n250 PIPELINING\r\n".into(),
                "QUIT" => "221 bye\r\n".into(),
                _ => "250 ok\r\n".into(),
            })
        })
        .await;
        let mut client = connect_to(addr, Protocol::Smtp, TlsPolicy::Opportunistic, None)
            .await
            .unwrap();
        let rcpts = vec![
            "carol@remote.test".to_owned(),
            "bob@remote.test>\r\nRCPT TO:<victim@elsewhere.test".to_owned(),
        ];
        let outcomes = client.send(&message(&rcpts, b"x\r\n")).await.unwrap();
        for outcome in &outcomes {
            let RecipientOutcome::Failed(d) = outcome else {
                panic!("{outcomes:?}")
            };
            assert_eq!(d.status, EnhancedCode(5, 1, 3));
        }
        assert!(client.is_usable());
        client.quit().await;
        let seen = server.await.unwrap();
        assert!(
            seen.iter()
                .all(|l| !l.starts_with("MAIL") && !l.starts_with("RCPT")),
            "{seen:?}"
        );
    }

    #[test]
    fn size_8bitmime_and_smtputf8_are_respected() {
        let caps = Capabilities {
            esmtp: true,
            size: Some(10),
            ..Capabilities::default()
        };
        let rcpts = vec!["carol@remote.test".to_owned()];
        let ascii = message(&rcpts, b"short");
        assert!(refusal(&caps, "mx", &ascii).is_none());
        assert_eq!(
            mail_command(&caps, &ascii),
            "MAIL FROM:<alice@example.test> SIZE=5"
        );
        let big = message(&rcpts, b"more than ten bytes");
        assert_eq!(
            refusal(&caps, "mx", &big).unwrap().status,
            EnhancedCode(5, 3, 4)
        );
        let eight = message(&rcpts, "caf\u{e9}".as_bytes());
        assert_eq!(
            refusal(&caps, "mx", &eight).unwrap().status,
            EnhancedCode(5, 6, 3)
        );
        let intl = vec!["j\u{f6}rg@remote.test".to_owned()];
        let utf8 = message(&intl, b"x");
        assert_eq!(
            refusal(&caps, "mx", &utf8).unwrap().status,
            EnhancedCode(5, 6, 7)
        );
        let capable = Capabilities {
            esmtp: true,
            eight_bit_mime: true,
            smtputf8: true,
            ..Capabilities::default()
        };
        assert!(refusal(&capable, "mx", &utf8).is_none());
        assert_eq!(
            mail_command(&capable, &message(&intl, "caf\u{e9}".as_bytes())),
            "MAIL FROM:<alice@example.test> BODY=8BITMIME SMTPUTF8"
        );
    }

    #[test]
    fn credentials_are_not_debug_printed() {
        let c = Credentials {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
