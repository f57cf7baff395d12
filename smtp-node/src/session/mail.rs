//! MAIL FROM: starts a transaction once the session may send mail (greeted; TLS and AUTH
//! where the listener requires them), the declared SIZE fits, the parameters are ones we
//! advertised, an authenticated user uses a sender it may use (its domain's `allowedSenders`,
//! else any address of its own domain) and is within its message rate. REQUIRETLS (RFC 8689)
//! is taken only over TLS.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{End, Next, Session, Transaction};
use crate::metrics::ResultLabels;
use crate::protocol::{BodyType, EnhancedCode, MailParams, Reply, ReversePath};
use crate::queue::QueueId;
use crate::telemetry::propagation as telemetry;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) fn handle_mail(
        &mut self,
        from: ReversePath,
        params: MailParams,
    ) -> Result<Next, End> {
        if self.helo.is_none() {
            self.error_reply(Reply::bad_sequence("Send HELO or EHLO first"))?;
            return Ok(Next::Continue);
        }
        if self.tx.is_some() {
            self.error_reply(Reply::bad_sequence("Nested MAIL command"))?;
            return Ok(Next::Continue);
        }
        let listener = self.conn.listener.clone();
        if listener.requires_tls() && self.tls.is_none() {
            self.error_reply(Reply::new(
                530,
                EnhancedCode(5, 7, 0),
                "Must issue a STARTTLS command first",
            ))?;
            return Ok(Next::Continue);
        }
        if listener.requires_auth() && self.user.is_none() {
            self.error_reply(Reply::auth_required())?;
            return Ok(Next::Continue);
        }
        if params.body == Some(BodyType::BinaryMime) {
            self.error_reply(Reply::param_not_recognized("BODY=BINARYMIME not supported"))?;
            return Ok(Next::Continue);
        }
        if params.requiretls && self.tls.is_none() {
            // RFC 8689 4.1: REQUIRETLS is only offered, and only accepted, over TLS.
            self.error_reply(Reply::new(
                530,
                EnhancedCode(5, 7, 10),
                "REQUIRETLS needs an encrypted session",
            ))?;
            return Ok(Next::Continue);
        }
        if params.envid.is_some() || params.ret.is_some() {
            self.error_reply(Reply::param_not_recognized("DSN parameters not supported"))?;
            return Ok(Next::Continue);
        }
        if (params.smtputf8 || params.size.is_some() || params.body.is_some() || params.requiretls)
            && !self.esmtp()
        {
            self.error_reply(Reply::param_not_recognized("ESMTP parameters need EHLO"))?;
            return Ok(Next::Continue);
        }
        if params.size.is_some_and(|size| size > self.size_limit()) {
            self.error_reply(Reply::message_too_large())?;
            return Ok(Next::Continue);
        }
        if let ReversePath::Address(a) = &from
            && !self.sender_allowed(&a.to_string())
        {
            if let Some(user) = &self.user {
                tracing::info!(user = %user.name, "sender address not allowed for the user");
            }
            self.error_reply(Reply::new(
                553,
                EnhancedCode(5, 7, 1),
                format!("Sender address <{a}> not owned by the authenticated user"),
            ))?;
            return Ok(Next::Continue);
        }
        if let Some(user) = &self.user
            && !self.ctx.auth.allow_message(user)
        {
            tracing::info!(user = %user.name, "message rate limit reached");
            self.ctx
                .metrics
                .auth
                .get_or_create(&ResultLabels {
                    result: "message_rate_limited",
                })
                .inc();
            self.reply(Reply::new(
                451,
                EnhancedCode(4, 7, 1),
                "Message rate limit exceeded, try again later",
            ));
            return Ok(Next::Continue);
        }
        let queue_id = QueueId::new();
        let span = self.transaction_span(&queue_id, &from);
        let traceparent = telemetry::traceparent(&span);
        if let Some(id) = telemetry::trace_id_of(&traceparent) {
            span.record("trace_id", id);
        }
        tracing::debug!(parent: &span, from = %from, "mail from");
        self.tx = Some(Transaction {
            queue_id,
            from,
            params,
            recipients: Vec::new(),
            traceparent,
            span,
            bdat: None,
        });
        self.reply(Reply::new(250, EnhancedCode(2, 1, 0), "Ok"));
        Ok(Next::Continue)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// The span of a new transaction: the root of the message's trace, linked to the
    /// session's span (see [`crate::telemetry`]). It repeats the session facts (client,
    /// HELO, TLS, authenticated user id — never a credential) so the message's trace reads
    /// on its own; the rest is recorded when the transaction ends.
    fn transaction_span(&self, queue_id: &QueueId, from: &ReversePath) -> tracing::Span {
        let session = tracing::Span::current();
        let span = tracing::info_span!(
            "smtp.transaction",
            otel.kind = "server",
            queue_id = %queue_id,
            trace_id = tracing::field::Empty,
            message_id = tracing::field::Empty,
            smtp.listener = %self.conn.listener.name,
            client.address = %self.conn.remote.ip(),
            smtp.helo = self.helo.as_ref().map_or("", |h| h.name.as_str()),
            smtp.mail_from = %from,
            smtp.rcpt_count = tracing::field::Empty,
            smtp.rcpt_to = tracing::field::Empty,
            smtp.message_size = tracing::field::Empty,
            smtp.reply_code = tracing::field::Empty,
            smtp.outcome = tracing::field::Empty,
            tls.protocol.version = self.tls.as_ref().map_or("none", |t| t.version.as_str()),
            enduser.id = tracing::field::Empty,
        );
        if let Some(user) = &self.user {
            span.record("enduser.id", user.name.as_str());
        }
        telemetry::start_linked_trace(&span, &session);
        span
    }
}
