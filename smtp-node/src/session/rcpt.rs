//! RCPT TO and the relay policy.
//!
//! * Authenticated clients (submission) may send to any domain.
//! * Everyone else may only send to recipients that exist in a local domain: the domain must
//!   be configured (else `554 5.7.1 Relay access denied`), have an inbound target (else
//!   `550 5.1.1`: nothing would ever deliver the mail, which would wait in the queue and
//!   bounce days later), and the local part be listed (else `550 5.1.1`) or, on a catch-all
//!   domain, be accepted by the inbound target when asked ([`crate::recipient_check`]:
//!   `550 5.1.1` when it refuses, `451 4.4.3` when it cannot say now). Recipients are checked
//!   here so that mail for nobody is refused in the dialogue, never accepted and bounced to a
//!   sender address that may be forged (backscatter). Address literals are never local. A
//!   local part that
//!   carries sender-specified routing (`%`, `!`, or a quoted `@`) is refused with `554 5.7.1`
//!   even on a catch-all domain, so none of the classic relay tricks (percent hack, bang
//!   paths, quoted local parts, source routes, trailing dots) can reach another host: the
//!   parser already drops source routes and the trailing dot, and we never rewrite `%`/`!`.
//! * On submission, a recipient on the user's domain's suppression list is refused with
//!   `550 5.7.1` and `events.suppression.refuseText` when `refuseAtRcpt` is set (otherwise
//!   the message is accepted and the recipient reported `suppressed` by delivery).
//! * `RCPT TO:<Postmaster>` (no domain, RFC 5321 4.1.1.3) is the postmaster of the first
//!   configured domain.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{End, Next, Session};
use crate::protocol::{Address, EnhancedCode, RcptParams, Reply};
use crate::recipient_check::Verdict;

/// Characters that would route a local part onward if anything interpreted them.
const ROUTING_CHARACTERS: [char; 3] = ['%', '!', '@'];

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn handle_rcpt(
        &mut self,
        to: Address,
        params: RcptParams,
    ) -> Result<Next, End> {
        let Some(tx) = &self.tx else {
            self.error_reply(Reply::bad_sequence("Need MAIL before RCPT"))?;
            return Ok(Next::Continue);
        };
        if tx.bdat.is_some() {
            self.error_reply(Reply::bad_sequence("RCPT after BDAT"))?;
            return Ok(Next::Continue);
        }
        if params.notify.is_some() || params.orcpt.is_some() {
            self.error_reply(Reply::param_not_recognized("DSN parameters not supported"))?;
            return Ok(Next::Continue);
        }
        if to.is_utf8() && !tx.params.smtputf8 {
            self.error_reply(Reply::non_ascii_address(
                "Recipient address rejected: non-ASCII address requires SMTPUTF8",
            ))?;
            return Ok(Next::Continue);
        }
        let to = match self.resolve_bare_postmaster(to) {
            Some(to) => to,
            None => {
                self.error_reply(relay_denied())?;
                return Ok(Next::Continue);
            }
        };
        if self.user.is_none()
            && let Some(reply) = self.inbound_policy(&to).await
        {
            if reply.code >= 500 {
                self.error_reply(reply)?;
            } else {
                self.reply(reply);
            }
            return Ok(Next::Continue);
        }
        let limit = self.recipient_limit(&to);
        let Some(tx) = &mut self.tx else {
            return Ok(Next::Continue);
        };
        if tx.recipients.contains(&to) {
            self.junk_command()?;
            self.reply(Reply::new(
                250,
                EnhancedCode(2, 1, 5),
                "Ok (duplicate recipient)",
            ));
            return Ok(Next::Continue);
        }
        if tx.recipients.len() >= limit {
            // RFC 5321 4.5.3.1.10: 452, and the recipients so far stay valid. Not counted as an
            // error (a client with many recipients is expected to hit it), but as junk.
            self.junk_command()?;
            self.reply(Reply::too_many_recipients());
            return Ok(Next::Continue);
        }
        tx.recipients.push(to);
        self.reply(Reply::new(250, EnhancedCode(2, 1, 5), "Ok"));
        Ok(Next::Continue)
    }

    /// The refusal of a suppressed recipient on submission, when the domain asks for it.
    pub(super) async fn suppression_refusal(&self, to: &Address) -> Option<Reply> {
        let settings = &self.ctx.config.events.suppression;
        if !settings.enabled || !settings.refuse_at_rcpt || self.tx.is_none() {
            return None;
        }
        let domain = self.user_domain()?;
        let list = self.ctx.checks.suppression.as_ref()?;
        let address = to.to_string();
        let found = list.lookup(&domain.name, &address).await?;
        tracing::info!(recipient = %address, reason = found.reason.as_str(), "suppressed recipient refused at RCPT");
        Some(Reply::new(
            550,
            EnhancedCode(5, 7, 1),
            settings.refuse_text.clone(),
        ))
    }

    /// Maps the domain-less `<Postmaster>` to the first configured domain.
    fn resolve_bare_postmaster(&self, to: Address) -> Option<Address> {
        if !to.is_bare_postmaster() {
            return Some(to);
        }
        let domain = self.ctx.config.domains.first()?;
        Address::new("postmaster", &domain.name).ok()
    }

    /// Unauthenticated (MX) recipients: local, deliverable and existing only. `None` means
    /// accepted.
    async fn inbound_policy(&self, to: &Address) -> Option<Reply> {
        if to.ip_literal().is_some() {
            return Some(relay_denied());
        }
        if to.local_part().contains(ROUTING_CHARACTERS) {
            tracing::info!("sender-specified routing in recipient refused");
            return Some(relay_denied());
        }
        let Some(domain) = self.ctx.config.domain(to.domain()) else {
            return Some(relay_denied());
        };
        let Some(target) = &domain.inbound else {
            return Some(Reply::new(
                550,
                EnhancedCode(5, 1, 1),
                format!(
                    "Recipient address rejected: {} does not receive mail here (no inbound target)",
                    domain.name
                ),
            ));
        };
        if !domain.has_recipient(to.local_part()) {
            return Some(user_unknown());
        }
        let declared = self.tx.as_ref().and_then(|t| t.params.size);
        if declared.is_some_and(|size| size > domain.limits.max_message_size.0) {
            return Some(Reply::message_too_large());
        }
        if domain.catch_all
            && !domain.lists_recipient(to.local_part())
            && let Some(check) = self.ctx.checks.recipients.as_ref().filter(|c| c.enabled())
        {
            return match check.verify(target, &to.to_string()).await {
                Verdict::Exists => None,
                Verdict::Unknown => Some(user_unknown()),
                Verdict::TryLater(_) => Some(Reply::new(
                    451,
                    EnhancedCode(4, 4, 3),
                    "Recipient address verification failed temporarily, try again later",
                )),
            };
        }
        None
    }

    /// Recipients allowed in this transaction: the user's domain limit on submission; on MX
    /// the smallest limit among the recipients' domains.
    fn recipient_limit(&self, new: &Address) -> usize {
        let config = &self.ctx.config;
        let limit = match self.user_domain() {
            Some(d) => d.limits.max_recipients,
            None => self
                .tx
                .iter()
                .flat_map(|t| t.recipients.iter())
                .chain(std::iter::once(new))
                .filter_map(|r| config.domain(r.domain()))
                .map(|d| d.limits.max_recipients)
                .min()
                .unwrap_or(crate::config::DEFAULT_MAX_RECIPIENTS),
        };
        limit as usize
    }
}

fn user_unknown() -> Reply {
    Reply::new(
        550,
        EnhancedCode(5, 1, 1),
        "Recipient address rejected: User unknown",
    )
}

fn relay_denied() -> Reply {
    Reply::new(554, EnhancedCode(5, 7, 1), "Relay access denied")
}
