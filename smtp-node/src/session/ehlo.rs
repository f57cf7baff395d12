//! EHLO and HELO: greet the client, reset any transaction (RFC 5321 4.1.4), and list the
//! extensions this session offers. STARTTLS is listed only on a plaintext connection with a
//! certificate; AUTH only on submission listeners, and there only once TLS is up when the
//! listener requires TLS (RFC 4954 4; Postfix `smtpd_tls_auth_only`); REQUIRETLS only inside
//! TLS (RFC 8689).

use tokio::io::{AsyncRead, AsyncWrite};

use super::{End, Helo, Next, Session};
use crate::protocol::Reply;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) fn handle_ehlo(&mut self, name: String, esmtp: bool) -> Result<Next, End> {
        if self.helo.is_some() {
            self.junk_command()?;
        }
        self.reset_transaction();
        let hostname = self.ctx.config.hostname.clone();
        self.helo = Some(Helo {
            name: name.clone(),
            esmtp,
        });
        if !esmtp {
            self.reply(Reply::plain(250, hostname));
            return Ok(Next::Continue);
        }
        let mut lines = vec![format!("{hostname} greets {name}")];
        lines.extend(self.capabilities());
        self.reply(Reply::multiline(250, None, lines));
        Ok(Next::Continue)
    }

    /// The extension keywords for this session's EHLO reply.
    fn capabilities(&self) -> Vec<String> {
        let mut caps = vec![
            "PIPELINING".to_owned(),
            format!("SIZE {}", self.ctx.config.max_message_size()),
            "8BITMIME".to_owned(),
            "SMTPUTF8".to_owned(),
            "ENHANCEDSTATUSCODES".to_owned(),
            "CHUNKING".to_owned(),
        ];
        if self.tls.is_none() && self.ctx.tls.is_some() {
            caps.push("STARTTLS".to_owned());
        }
        // RFC 8689 4.1: offered only where the session itself is protected by TLS.
        if self.tls.is_some() {
            caps.push("REQUIRETLS".to_owned());
        }
        if self.auth_offered() {
            caps.push("AUTH PLAIN LOGIN".to_owned());
        }
        caps
    }

    /// Whether AUTH may be used now on this listener.
    pub(super) fn auth_offered(&self) -> bool {
        let listener = &self.conn.listener;
        listener.requires_auth() && (self.tls.is_some() || !listener.requires_tls())
    }
}
