//! One SMTP conversation: the state machine between the sans-IO [`crate::protocol`] layer and
//! the policy of this node. Generic over the stream so tests drive it over an in-memory pipe.
//!
//! Layout: [`io`] reads lines and data under timeouts and shutdown, writes replies;
//! one file per verb ([`ehlo`], [`mail`], [`rcpt`], [`data`], [`bdat`], [`auth`],
//! [`starttls`]); the headers added at the end of data come from [`crate::message`].
//!
//! State: `helo` (none until HELO/EHLO), `user` (after AUTH), `tx` (a mail transaction after
//! MAIL, holding its recipients), `tls` (set on a TLS stream). STARTTLS ends a plaintext
//! [`Session`] and a new one starts on the TLS stream with all of that reset (RFC 3207 4.2),
//! so nothing learnt or buffered before the handshake survives it.
//!
//! Policy decisions in brief: PIPELINING is allowed everywhere (only `<CRLF>.<CRLF>` ends DATA,
//! so a pipelined second transaction is just a second transaction); replies carry enhanced
//! status codes after EHLO (and a closing `421` always); every 5xx answer to a command counts towards
//! `maxErrorsPerSession`; commands that do not move a transaction forward (NOOP, RSET, HELP,
//! VRFY, a repeated HELO/EHLO, a duplicate RCPT, a RCPT over the limit) count towards
//! `maxJunkCommands` until a message is accepted, so an idle client cannot keep its slot
//! with them forever; bare CR/LF in a command is always refused (the listener's
//! `bareLineEndings: normalize` applies to message content only).

mod auth;
mod bdat;
mod body;
mod data;
mod ehlo;
mod io;
mod mail;
mod rcpt;
mod spill;
mod starttls;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::auth::AuthenticatedUser;
use crate::config::{BareLineEndings, DomainConfig};
use crate::connection::ConnectionInfo;
use crate::connection::prefixed::PrefixedStream;
use crate::context::ServerContext;
use crate::protocol::{
    Address, BareEolPolicy, Command, EnhancedCode, LineReader, MailParams, Reply, ReversePath,
    parse_command,
};
use crate::queue::QueueId;
use crate::tls::TlsInfo;

pub use starttls::{serve, serve_implicit_tls};

/// Client greeting state.
#[derive(Debug, Clone)]
struct Helo {
    name: String,
    /// EHLO (extensions, enhanced status codes) rather than HELO.
    esmtp: bool,
}

/// A mail transaction in progress (after MAIL).
struct Transaction {
    queue_id: QueueId,
    from: ReversePath,
    params: MailParams,
    recipients: Vec<Address>,
    /// W3C trace context of `span`: the root of this message's trace, written into the
    /// queue entry and (its trace id) into our `Received` header.
    traceparent: String,
    span: tracing::Span,
    /// BDAT chunks received so far (`None` until the first BDAT).
    bdat: Option<bdat::Chunks>,
}

/// What the command loop decided.
enum Next {
    Continue,
    /// Close after flushing (QUIT, fatal errors).
    Close,
    /// The client asked for TLS and got `220`: hand over the stream. The bytes are a TLS
    /// ClientHello that arrived with the command (to be fed to rustls); anything else that was
    /// pipelined after STARTTLS has been discarded.
    StartTls(BytesMut),
}

/// Why the session ended abnormally (the reply, if any, has been written).
#[derive(Debug)]
enum End {
    /// The client closed the connection.
    PeerClosed,
    /// Read or write failed.
    Io(std::io::Error),
    /// A timeout, shutdown abort or error limit closed it (after a 421).
    Closed,
}

impl From<std::io::Error> for End {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// One SMTP session over `S`.
pub(crate) struct Session<S> {
    /// Boxed: a TLS stream is about 1.3 KB, and the future that serves a connection reserves
    /// space for its TLS session whether or not the client starts TLS; behind a box, a
    /// plaintext connection does not pay for it (memory per idle connection).
    stream: Box<S>,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    lines: LineReader,
    ctx: Arc<ServerContext>,
    conn: ConnectionInfo,
    tls: Option<TlsInfo>,
    helo: Option<Helo>,
    user: Option<AuthenticatedUser>,
    tx: Option<Transaction>,
    errors: u32,
    /// Commands since the last accepted message that did not move a transaction forward.
    junk: u32,
    auth_failures: u32,
    /// The first command is timed by `timeouts.greeting`, later ones by `timeouts.command`.
    commands_seen: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    fn new(stream: S, conn: ConnectionInfo, ctx: Arc<ServerContext>, tls: Option<TlsInfo>) -> Self {
        Self {
            stream: Box::new(stream),
            // Allocated on first use and sized by what is read (see `io::fill`).
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
            lines: LineReader::new(),
            ctx,
            conn,
            tls,
            helo: None,
            user: None,
            tx: None,
            errors: 0,
            junk: 0,
            auth_failures: 0,
            commands_seen: false,
        }
    }

    /// Queues the `220` greeting.
    fn greet(&mut self) {
        let text = format!("{} ESMTP kubemail", self.ctx.config.hostname);
        self.reply(Reply::plain(220, text));
    }

    /// Runs commands until the session ends. Returns the read-ahead bytes when the client
    /// started TLS.
    async fn run(&mut self) -> Option<BytesMut> {
        let outcome = self.command_loop().await;
        let flushed = self.flush().await;
        match outcome {
            Ok(Next::StartTls(rest)) if flushed.is_ok() => {
                // The caller keeps what is left of this session (its stream) for the whole TLS
                // session: free the buffers now, and hand over the read-ahead (usually empty)
                // in an allocation of its own rather than one that pins the read buffer.
                let rest = BytesMut::from(&rest[..]);
                self.release_buffers();
                return Some(rest);
            }
            Ok(_) => {}
            Err(End::PeerClosed) => tracing::debug!("client closed the connection"),
            Err(End::Io(error)) => tracing::debug!(%error, "connection error"),
            Err(End::Closed) => {}
        }
        self.close().await;
        None
    }

    async fn command_loop(&mut self) -> Result<Next, End> {
        loop {
            let Some(line) = self.read_command().await? else {
                continue;
            };
            let next = match parse_command(&line) {
                Ok(command) => {
                    let limit = command_line_limit(&command, self.esmtp());
                    if line.len() + 2 > limit {
                        self.error_reply(Reply::line_too_long())?;
                        Next::Continue
                    } else {
                        tracing::trace!(verb = command.verb(), "command");
                        self.dispatch(command).await?
                    }
                }
                Err(e) => {
                    let reply = e.reply();
                    if e.closes_connection() {
                        self.reply(reply);
                        Next::Close
                    } else {
                        self.error_reply(reply)?;
                        Next::Continue
                    }
                }
            };
            match next {
                Next::Continue => {}
                other => return Ok(other),
            }
        }
    }

    async fn dispatch(&mut self, command: Command) -> Result<Next, End> {
        match command {
            Command::Ehlo(name) => self.handle_ehlo(name, true),
            Command::Helo(name) => self.handle_ehlo(name, false),
            Command::Mail { from, params } => self.handle_mail(from, params),
            // Boxed like the other verbs that may wait (a suppression lookup, a recipient
            // check): an unboxed wait here made every idle session's future 6 KiB larger.
            Command::Rcpt { to, params } => {
                if let Some(reply) = Box::pin(self.suppression_refusal(&to)).await {
                    self.error_reply(reply)?;
                    return Ok(Next::Continue);
                }
                Box::pin(self.handle_rcpt(to, params)).await
            }
            // The verbs that wait for more input or for other tasks run boxed, so that the
            // future of an idle session stays small (memory per idle connection).
            Command::Data => Box::pin(self.handle_data()).await,
            Command::Bdat { size, last } => Box::pin(self.handle_bdat(size, last)).await,
            Command::Rset => {
                self.junk_command()?;
                self.reset_transaction();
                self.reply(Reply::ok("Ok"));
                Ok(Next::Continue)
            }
            Command::Noop => {
                self.junk_command()?;
                self.reply(Reply::ok("Ok"));
                Ok(Next::Continue)
            }
            Command::Quit => {
                self.reply(Reply::closing(format!(
                    "{} closing connection",
                    self.ctx.config.hostname
                )));
                Ok(Next::Close)
            }
            Command::Vrfy(_) => {
                self.junk_command()?;
                self.reply(Reply::cannot_vrfy());
                Ok(Next::Continue)
            }
            Command::Help(_) => {
                self.junk_command()?;
                self.reply(Reply::new(
                    214,
                    EnhancedCode(2, 0, 0),
                    "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH",
                ));
                Ok(Next::Continue)
            }
            Command::StartTls => self.handle_starttls(),
            Command::Auth {
                mechanism,
                initial_response,
            } => Box::pin(self.handle_auth(mechanism, initial_response)).await,
        }
    }

    /// Whether the client said EHLO (enhanced status codes are in effect).
    fn esmtp(&self) -> bool {
        self.helo.as_ref().is_some_and(|h| h.esmtp)
    }

    fn reset_transaction(&mut self) {
        self.tx = None;
    }

    fn bare_eol_policy(&self) -> BareEolPolicy {
        match self.conn.listener.bare_line_endings {
            BareLineEndings::Reject => BareEolPolicy::Reject,
            BareLineEndings::Normalize => BareEolPolicy::Normalize,
        }
    }

    /// Whether the authenticated user may use `address` as a sender (MAIL FROM, `From:`):
    /// its domain's `allowedSenders` say, else its own domain only.
    fn sender_allowed(&self, address: &str) -> bool {
        let Some(user) = &self.user else {
            return true;
        };
        match self.user_domain() {
            Some(domain) => domain.sender_allowed(&user.name, address),
            None => address
                .rsplit_once('@')
                .is_some_and(|(_, d)| user.may_send_as(d)),
        }
    }

    /// The configured domain the authenticated user belongs to.
    fn user_domain(&self) -> Option<&DomainConfig> {
        self.user
            .as_ref()
            .and_then(|u| self.ctx.config.domain(&u.domain))
    }

    /// Size limit for the current transaction: the user's domain on submission; on MX the
    /// smallest limit of the recipients' domains; before any recipient, the largest of all.
    fn size_limit(&self) -> u64 {
        if let Some(d) = self.user_domain() {
            return d.limits.max_message_size.0;
        }
        let recipients = self
            .tx
            .as_ref()
            .map(|t| t.recipients.as_slice())
            .unwrap_or(&[]);
        recipients
            .iter()
            .filter_map(|r| self.ctx.config.domain(r.domain()))
            .map(|d| d.limits.max_message_size.0)
            .min()
            .unwrap_or_else(|| self.ctx.config.max_message_size())
    }
}

/// The longest command line accepted for `command`, including CRLF. AUTH may carry an
/// initial response up to RFC 4954's limit; MAIL and RCPT may be lengthened by the ESMTP
/// parameters we advertise (RFC 5321 4.5.3.1.4); everything else gets RFC 5321's 512.
fn command_line_limit(command: &Command, esmtp: bool) -> usize {
    use crate::protocol::{MAX_AUTH_LINE, MAX_COMMAND_LINE, MAX_ESMTP_COMMAND_LINE};
    match command {
        Command::Auth { .. } => MAX_AUTH_LINE,
        Command::Mail { .. } | Command::Rcpt { .. } if esmtp => MAX_ESMTP_COMMAND_LINE,
        _ => MAX_COMMAND_LINE,
    }
}

/// A plaintext session's stream, as handed to STARTTLS.
type Plain<T> = PrefixedStream<T>;
