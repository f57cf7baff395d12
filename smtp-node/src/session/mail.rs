//! MAIL FROM: starts a transaction once the session may send mail (greeted; TLS and AUTH
//! where the listener requires them), the declared SIZE fits, the parameters are ones we
//! advertised, an authenticated user uses a sender of its own domain and is within its
//! message rate.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{End, Next, Session, Transaction};
use crate::metrics::{self, ResultLabels};
use crate::protocol::{BodyType, EnhancedCode, MailParams, Reply, ReversePath};
use crate::queue::QueueId;

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
        if params.envid.is_some() || params.ret.is_some() {
            self.error_reply(Reply::param_not_recognized("DSN parameters not supported"))?;
            return Ok(Next::Continue);
        }
        if (params.smtputf8 || params.size.is_some() || params.body.is_some()) && !self.esmtp() {
            self.error_reply(Reply::param_not_recognized("ESMTP parameters need EHLO"))?;
            return Ok(Next::Continue);
        }
        if params.size.is_some_and(|size| size > self.size_limit()) {
            self.error_reply(Reply::message_too_large())?;
            return Ok(Next::Continue);
        }
        if let Some(user) = &self.user {
            if let ReversePath::Address(a) = &from
                && !user.may_send_as(a.domain())
            {
                tracing::info!(user = %user.name, "sender domain not owned by the user");
                self.error_reply(Reply::new(
                    553,
                    EnhancedCode(5, 7, 1),
                    format!("Sender address <{a}> not owned by the authenticated user"),
                ))?;
                return Ok(Next::Continue);
            }
            if !self.ctx.auth.allow_message(user) {
                tracing::info!(user = %user.name, "message rate limit reached");
                metrics::global()
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
        }
        let queue_id = QueueId::new();
        let traceparent = new_traceparent();
        let span = tracing::info_span!(
            "transaction",
            queue_id = %queue_id,
            trace_id = &traceparent[3..35],
            message_id = tracing::field::Empty,
        );
        span.in_scope(|| tracing::debug!(from = %from, "mail from"));
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

/// A fresh W3C trace context (`00-<trace id>-<span id>-01`) for a message: the root of the
/// message's trace, carried in the queue entry to the delivery attempts.
fn new_traceparent() -> String {
    let trace: u128 = rand::random::<u128>().max(1);
    let span: u64 = rand::random::<u64>().max(1);
    format!("00-{trace:032x}-{span:016x}-01")
}
