//! DATA, and the end of every transaction (DATA or the last BDAT chunk): refuse or strip NUL
//! bytes, check a submitted message's `From:` against the user, remove forged
//! `Authentication-Results`, check inbound mail (SPF/DKIM/DMARC into `Authentication-Results`,
//! DMARC enforcement, the sender's verdict into the queue entries), add our headers,
//! DKIM-sign submitted mail for the user's domain, hand the message to the queue, and answer
//! `250` only once the queue acknowledged it.
//!
//! End-of-data detection, dot-unstuffing, line and size limits and the bare CR/LF policy are
//! [`crate::protocol::DataReceiver`]'s; the receiver reads to the real `<CRLF>.<CRLF>` even
//! after a violation, so the session stays in step and nothing of a refused message is
//! queued.

use std::time::SystemTime;

use bytes::BytesMut;

use kubemail_queue::SenderAuth;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::Instrument;

use super::body::{self, Assembled};
use super::spill::{self, Spill};
use super::{End, Next, Session, Transaction};
use crate::config::{ListenerKind, NulBytes};
use crate::memory::Reservation;
use crate::message::{ReceivedInfo, header_value, new_message_id, received_header};
use crate::metrics::{ListenerLabels, ReasonLabels};
use crate::protocol::{BodyType, DataProgress, DataReceiver, EnhancedCode, MAX_TEXT_LINE, Reply};
use crate::queue::{ContentId, Direction, EnqueueError, QueueEntry, QueuedMessage};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn handle_data(&mut self) -> Result<Next, End> {
        match &self.tx {
            None => {
                self.error_reply(Reply::bad_sequence("Need MAIL before DATA"))?;
                return Ok(Next::Continue);
            }
            Some(tx) if tx.bdat.is_some() => {
                self.error_reply(Reply::bad_sequence("DATA after BDAT"))?;
                return Ok(Next::Continue);
            }
            Some(tx) if tx.recipients.is_empty() => {
                self.error_reply(Reply::bad_sequence("Need RCPT before DATA"))?;
                return Ok(Next::Continue);
            }
            Some(_) => {}
        }
        let limit = self.size_limit();
        let memory = self.ctx.memory.clone();
        let mut held = memory.reservation();
        let first = body::first_capacity(limit);
        if held
            .grow_to(first as u64, Instant::now() + memory.wait())
            .await
            .is_err()
        {
            self.reject_message(insufficient_storage(), "memory_full");
            return Ok(Next::Continue);
        }
        self.reply(Reply::start_mail_input());
        let mut receiver = DataReceiver::with_buffer(
            self.bare_eol_policy(),
            limit,
            MAX_TEXT_LINE,
            body::buffer(first),
        );
        let mut budget = self.data_budget(self.ctx.config.timeouts.data_init.0);
        // Set when the budget had no room for the rest: the data is still read to its end
        // (the session stays in step), but not stored, and the answer is `452 4.3.1`.
        let mut short_of_memory = false;
        // A large message's body on its way to the object store, and its header section: the
        // receiver's buffer then holds only body octets not yet handed on.
        let threshold = self.ctx.queue.streaming_threshold();
        let mut spilling: Option<(Spill, BytesMut)> = None;
        // How much of the message was searched for the end of its header section; `None` once
        // the spill was tried (it is tried once).
        let mut scanned = Some(0);
        loop {
            // One feed stores at most twice what it consumes (see `stored_mut`).
            let spare = 2 * self.rbuf.len();
            if let Some((spill, _)) = spilling.as_mut() {
                let stored = receiver.stored_mut();
                if stored.len() >= spill::CHUNK || stored.capacity() - stored.len() < spare {
                    let chunk = stored.split().freeze();
                    *stored = BytesMut::with_capacity(spill::CHUNK + spare);
                    spill.write(chunk).await;
                }
            } else if !short_of_memory {
                let grown = body::ensure_spare(
                    receiver.stored_mut(),
                    spare,
                    body::ceiling(limit, spare),
                    &mut held,
                    Instant::now() + memory.wait(),
                )
                .await;
                if grown.is_err() {
                    tracing::info!(held = held.bytes(), "no room in the message memory budget");
                    short_of_memory = true;
                    *receiver.stored_mut() = bytes::BytesMut::new();
                    held.shrink_to(0);
                }
            }
            let done = receiver.feed(&mut self.rbuf) == DataProgress::Done;
            if short_of_memory {
                receiver.stored_mut().clear();
            } else if receiver.error().is_some() {
                // The receiver dropped the message on a violation (dropping a spill deletes
                // what it stored).
                spilling = None;
                held.shrink_to(receiver.stored_mut().capacity() as u64);
            } else if spilling.is_none()
                && let Some(threshold) = threshold
                && receiver.stored_mut().len().saturating_sub(body::HEADROOM) > threshold
            {
                spilling = self
                    .start_spill(receiver.stored_mut(), threshold, &mut scanned, &mut held)
                    .await;
            }
            if done {
                break;
            }
            self.fill_data(&mut budget).await?;
        }
        match (receiver.finish_buffer(), spilling) {
            (Ok(_), _) if short_of_memory => {
                self.reject_message(insufficient_storage(), "memory_full");
                Ok(Next::Continue)
            }
            (Ok(rest), Some((mut spill, head))) => {
                spill.write(rest.freeze()).await;
                let message = Assembled::new(head, body::HEADROOM);
                Box::pin(self.complete_transaction(message, held, Some(spill))).await
            }
            // Boxed: inbound checks and the queue publish make this the largest future of a
            // session; inline, every idle session's task would carry its space.
            (Ok(buf), None) => {
                let message = Assembled::new(buf, body::HEADROOM);
                Box::pin(self.complete_transaction(message, held, None)).await
            }
            (Err(error), _) => {
                self.reject_message(error.reply(), reason_of(&error));
                Ok(Next::Continue)
            }
        }
    }

    /// Starts storing the body of the message in `stored` (after the headroom) while it
    /// arrives, once its header section is complete: `stored` keeps only body octets from then
    /// on, and the header section (with the headroom) is returned beside the spill. `None`
    /// (the message stays whole) while the header section goes on; and for good (`scanned`
    /// becomes `None`) when the header section is longer than what an entry carries inline
    /// (`threshold`), when the budget has no room for the spill's buffers, or when the object
    /// store cannot be written.
    async fn start_spill(
        &self,
        stored: &mut BytesMut,
        threshold: usize,
        scanned: &mut Option<usize>,
        held: &mut Reservation,
    ) -> Option<(Spill, BytesMut)> {
        let message = &stored[body::HEADROOM..];
        let Some(offset) = spill::body_offset(message, (*scanned)?) else {
            *scanned = Some(message.len());
            return None;
        };
        *scanned = None;
        if offset > threshold {
            return None;
        }
        let spare = 2 * self.rbuf.len();
        let head_len = body::HEADROOM + offset;
        let (mut spill, needed) = self
            .open_spill(&stored[body::HEADROOM..head_len], stored.capacity(), held)
            .await?;
        let head = BytesMut::from(&stored[..head_len]);
        let whole = std::mem::replace(stored, BytesMut::with_capacity(spill::CHUNK + spare));
        // In chunks (the spill's room holds those on their way), so the buffer of the whole
        // message so far is gone when `held` shrinks.
        for piece in whole[head_len..].chunks(spill::CHUNK) {
            spill.write(bytes::Bytes::copy_from_slice(piece)).await;
        }
        drop(whole);
        held.shrink_to(needed);
        Some((spill, head))
    }

    /// Refuses the message of the current transaction (after its data was read) and resets.
    pub(super) fn reject_message(&mut self, reply: Reply, reason: &'static str) {
        if let Some(tx) = &self.tx {
            let (count, rcpts) = span_recipients(tx);
            crate::telemetry::record_all(
                &tx.span,
                [
                    ("smtp.rcpt_count", &count),
                    ("smtp.rcpt_to", &rcpts.as_str()),
                    ("smtp.reply_code", &i64::from(reply.code)),
                    ("smtp.outcome", &reason),
                ],
            );
            tracing::info!(parent: &tx.span, reason, code = reply.code, "message refused");
        }
        self.ctx
            .metrics
            .messages_rejected
            .get_or_create(&ReasonLabels {
                listener: self.conn.listener.name.clone(),
                reason,
            })
            .inc();
        self.reset_transaction();
        self.reply(reply);
    }

    /// Queues the complete message and answers. The transaction ends either way. `held` is
    /// the message's share of the memory budget, given back once the queue has answered.
    /// With `spill`, `message` is the header section and the body is on its way to the object
    /// store.
    pub(super) async fn complete_transaction(
        &mut self,
        mut message: Assembled,
        held: Reservation,
        mut spill: Option<Spill>,
    ) -> Result<Next, End> {
        let Some(tx) = self.tx.take() else {
            self.reply(Reply::bad_sequence("No transaction"));
            return Ok(Next::Continue);
        };
        let span = tx.span.clone();
        let stored_size = spill.as_ref().map_or(0, Spill::size);
        let (count, rcpts) = span_recipients(&tx);
        crate::telemetry::record_all(
            &span,
            [
                ("smtp.rcpt_count", &count),
                ("smtp.rcpt_to", &rcpts.as_str()),
                (
                    "smtp.message_size",
                    &(message.message().len() as u64 + stored_size),
                ),
            ],
        );
        // No NUL passes as it is (RFC 5322 3.5 allows none): a downstream that drops NUL bytes
        // would read `<CRLF><NUL>.<CRLF>` as the end of the data. Only a message that has
        // some is copied (a stored body was checked on its way).
        let head_nul = memchr::memchr(0, message.message()).is_some();
        if head_nul || spill.as_ref().is_some_and(Spill::refuses_nul) {
            if self.conn.listener.nul_bytes == NulBytes::Strip {
                message = Assembled::copy_without_nul(message.message());
            } else {
                self.tx = Some(tx);
                self.reject_message(
                    Reply::new(
                        554,
                        EnhancedCode(5, 6, 0),
                        "Message contains NUL characters",
                    ),
                    "nul_bytes",
                );
                return Ok(Next::Continue);
            }
        }
        if crate::message::received_count(message.message()) > crate::message::MAX_RECEIVED_HEADERS
        {
            self.tx = Some(tx);
            self.reject_message(
                Reply::new(
                    554,
                    EnhancedCode(5, 4, 6),
                    "Too many hops: routing loop detected",
                ),
                "mail_loop",
            );
            return Ok(Next::Continue);
        }
        if let Some(reply) = self.check_author(message.message()) {
            self.tx = Some(tx);
            self.reject_message(reply, "from_not_allowed");
            return Ok(Next::Continue);
        }
        // Before anything is added: what the client sent is what its retry sends again.
        let content = self.content_id(&tx, message.message(), spill.as_ref().map(Spill::tail));
        let body_hashes = spill.as_mut().map(Spill::take_verify_hashes);
        let sender_auth = match self
            .check_inbound(&tx, &mut message, body_hashes.as_deref())
            .instrument(span.clone())
            .await
        {
            Ok(sender_auth) => sender_auth,
            Err(reply) => {
                self.tx = Some(tx);
                self.reject_message(reply, "dmarc_reject");
                return Ok(Next::Continue);
            }
        };
        // A copy made above (NUL bytes or a stripped field removed, a field larger than the
        // headroom) replaced the buffer it was made from, so `held` still covers the message.
        let generation = self.ctx.content.generation(&content);
        let limit = self.ctx.config.timeouts.data_termination.0;
        let started = Instant::now();
        let stored = match spill {
            Some(mut spill) => {
                let sign = spill.take_sign_hash();
                let result = tokio::time::timeout(limit, spill.store())
                    .instrument(span.clone())
                    .await
                    .unwrap_or_else(|_| Err(EnqueueError::Unavailable("timed out".to_owned())));
                match result {
                    Ok(bodies) => Some(StoredTail {
                        bodies,
                        size: stored_size,
                        sign,
                    }),
                    Err(error) => {
                        tracing::warn!(parent: &span, %error, "storing the body failed");
                        let (reply, reason) = refusal(error);
                        self.tx = Some(tx);
                        self.reject_message(reply, reason);
                        return Ok(Next::Continue);
                    }
                }
            }
            None => None,
        };
        let queue = self.ctx.queue.clone();
        let result = match self.build_entries(
            &tx,
            message,
            &content,
            generation,
            sender_auth,
            stored.as_ref(),
        ) {
            Ok(entries) => {
                let size = entries
                    .first()
                    .map_or(0, |e| e.entry.body_size.unwrap_or(e.body.len() as u64));
                let left = limit.saturating_sub(started.elapsed());
                tokio::time::timeout(left, queue.enqueue(entries))
                    .instrument(span.clone())
                    .await
                    .unwrap_or_else(|_| Err(EnqueueError::Unavailable("timed out".to_owned())))
                    .map(|()| size)
            }
            Err(error) => Err(error),
        };
        // The queue has the message (or refused it): its memory may go to another session.
        drop(held);
        let listener = self.conn.listener.name.clone();
        match result {
            Ok(size) => {
                self.ctx.content.accepted(&content);
                let m = &self.ctx.metrics;
                m.messages_accepted
                    .get_or_create(&ListenerLabels { listener })
                    .inc();
                m.message_bytes.inc_by(size);
                crate::telemetry::record_all(
                    &span,
                    [("smtp.reply_code", &250), ("smtp.outcome", &"queued")],
                );
                tracing::info!(parent: &span, size, recipients = tx.recipients.len(), "queued");
                // A message got through: the client is not just holding its slot.
                self.junk = 0;
                self.reply(Reply::ok(format!("Ok: queued as {}", tx.queue_id)));
            }
            Err(error) => {
                tracing::warn!(parent: &span, %error, "queueing failed");
                let (reply, reason) = refusal(error);
                self.tx = Some(tx);
                self.reject_message(reply, reason);
            }
        }
        Ok(Next::Continue)
    }

    /// Submission: every `From:` mailbox must be an address the user may send as (the same
    /// rule as MAIL FROM), or the message would carry our DKIM signature for someone else's
    /// address. `Some` is the refusal. A message without `From:` claims no author.
    fn check_author(&self, message: &[u8]) -> Option<Reply> {
        let user = self.user.as_ref()?;
        let refuse = |text: String| {
            tracing::info!(user = %user.name, "From: header not allowed for the user");
            Some(Reply::new(550, EnhancedCode(5, 7, 1), text))
        };
        match crate::dkim::author_addresses(message) {
            None => refuse("From: header cannot be read; send one address per mailbox".to_owned()),
            Some(addresses) => addresses
                .iter()
                .find(|a| !self.sender_allowed(a))
                .and_then(|a| {
                    refuse(format!(
                        "From: header address <{a}> is not one the authenticated user may send as"
                    ))
                }),
        }
    }

    /// Removes `Authentication-Results` headers that claim to be ours from every message
    /// (MX and submission); for mail arriving on an MX listener also evaluates SPF, DKIM and
    /// DMARC and adds our own header. Returns, when the checks ran, how the envelope sender
    /// was authenticated. `Err` is the refusal when DMARC is enforced and fails with a
    /// `reject` policy.
    async fn check_inbound(
        &self,
        tx: &Transaction,
        message: &mut Assembled,
        body_hashes: Option<&[crate::dkim::BodyHashValue]>,
    ) -> Result<Option<SenderAuth>, Reply> {
        let hostname = &self.ctx.config.hostname;
        // Only a message with such a field is copied; most have none.
        if let Some(stripped) = crate::authres::without_forged(message.message(), hostname) {
            *message = Assembled::copy_of(&stripped);
        }
        let Some(verifier) = self.ctx.checks.inbound_auth.clone() else {
            return Ok(None);
        };
        if self.user.is_some() || self.conn.listener.kind != ListenerKind::Mx || !verifier.enabled()
        {
            return Ok(None);
        }
        let mail_from = tx.from.to_string();
        let helo = self.helo.as_ref().map_or("", |h| h.name.as_str());
        let check = tracing::info_span!("inbound.auth_check", dmarc = tracing::field::Empty);
        let verdict = verifier
            .verify(
                message.message(),
                body_hashes,
                crate::authres::Transaction {
                    client_ip: self.conn.remote.ip(),
                    helo,
                    mail_from: &mail_from,
                },
            )
            .instrument(check.clone())
            .await;
        check.record("dmarc", verdict.dmarc);
        tracing::info!(
            dmarc = verdict.dmarc,
            sender_auth = verdict.sender_auth.as_str(),
            "inbound authentication checked"
        );
        if let Some(reply) = verdict.reject {
            return Err(reply);
        }
        message.prepend(verdict.header.as_bytes());
        Ok(Some(verdict.sender_auth))
    }

    /// The digest a retry of this transaction shares with it (see [`ContentId`]); `tail`, the
    /// body stored while it arrived when `message` is the header section.
    fn content_id(&self, tx: &Transaction, message: &[u8], tail: Option<spill::Tail>) -> ContentId {
        let mut params: Vec<&str> = Vec::new();
        if tx.params.body == Some(BodyType::EightBitMime) {
            params.push("BODY=8BITMIME");
        }
        if tx.params.smtputf8 {
            params.push("SMTPUTF8");
        }
        if let Some(envid) = &tx.params.envid {
            params.push("ENVID");
            params.push(envid);
        }
        if let Some(ret) = &tx.params.ret {
            params.push("RET");
            params.push(ret);
        }
        let from = tx.from.to_string();
        let content = ContentId::new(
            self.user.as_ref().map(|u| u.name.as_str()),
            &from,
            &params,
            message,
        );
        match tail {
            Some(tail) => content.with_stored_body(tail.size, &tail.digest),
            None => content,
        }
    }

    /// The queue entries of a transaction: one outbound entry on the user's domain, or one
    /// inbound entry per recipient domain (see [`crate::queue`]). Our header fields go into
    /// the message's headroom; the entries share the one buffer. With `stored`, the message
    /// is the header section and each entry refers to its domain's body object.
    fn build_entries(
        &self,
        tx: &Transaction,
        mut message: Assembled,
        content: &ContentId,
        generation: u32,
        sender_auth: Option<SenderAuth>,
        stored: Option<&StoredTail>,
    ) -> Result<Vec<QueuedMessage>, EnqueueError> {
        let config = &self.ctx.config;
        let submission = self.user.is_some();
        let single = (tx.recipients.len() == 1).then(|| tx.recipients[0].to_string());
        let received = received_header(&ReceivedInfo {
            helo: self.helo.as_ref().map_or("unknown", |h| h.name.as_str()),
            client_ip: self.conn.remote.ip(),
            hostname: &config.hostname,
            esmtp: self.esmtp(),
            authenticated: submission,
            smtputf8: tx.params.smtputf8,
            tls: self.tls.as_ref(),
            queue_id: tx.queue_id.as_str(),
            trace_id: crate::telemetry::propagation::trace_id_of(&tx.traceparent),
            single_recipient: single.as_deref(),
            date: SystemTime::now(),
        });
        let mut message_id = header_value(message.message(), "Message-ID");
        // RFC 8689 5: `TLS-Required: No` asks for delivery even where a policy would hold the
        // message back; REQUIRETLS on the same message wins over it.
        let tls_optional = !tx.params.requiretls
            && header_value(message.message(), "TLS-Required")
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("no"));
        if submission && message_id.is_none() {
            let id = new_message_id(&config.hostname);
            message.prepend(format!("Message-ID: {id}\r\n").as_bytes());
            message_id = Some(id);
        }
        message.prepend(received.as_bytes());
        let body_hash = stored.and_then(|s| s.sign.as_ref());
        if let (Some(user), Some(signer)) = (&self.user, &self.ctx.checks.dkim)
            && let Some(signatures) =
                sign(signer, message.message(), body_hash, &user.domain, &tx.span)
        {
            message.prepend(signatures.as_bytes());
        }
        let full = message.freeze();
        if let Some(id) = &message_id {
            tx.span.record("message_id", id.as_str());
        }

        let base = QueueEntry {
            queue_id: tx.queue_id.clone(),
            mail_from: tx.from.to_string(),
            recipients: Vec::new(),
            direction: Direction::Inbound,
            domain: String::new(),
            accepted_at: SystemTime::now(),
            message_id,
            traceparent: Some(tx.traceparent.clone()),
            auth_user: self.user.as_ref().map(|u| u.name.clone()),
            client_ip: Some(self.conn.remote.ip()),
            helo: self.helo.as_ref().map(|h| h.name.clone()),
            sender_auth,
            eight_bit: tx.params.body == Some(BodyType::EightBitMime),
            smtputf8: tx.params.smtputf8,
            dsn_envid: tx.params.envid.clone(),
            dsn_ret: tx.params.ret.clone(),
            body_ref: None,
            body_size: None,
            require_tls: tx.params.requiretls,
            tls_optional,
            attempts: 0,
            not_before: None,
            last_error: None,
            delay_warned: false,
            admin: Default::default(),
        };
        let head_len = full.len() as u64;
        // The entry of `domain` refers to its body object, if the body was stored.
        let with_body = |mut entry: QueueEntry| -> Result<QueueEntry, EnqueueError> {
            if let Some(stored) = stored {
                let body = stored
                    .bodies
                    .iter()
                    .find(|b| b.domain == entry.domain)
                    .ok_or_else(|| {
                        EnqueueError::Unavailable(format!("no body stored for {}", entry.domain))
                    })?;
                entry.body_ref = Some(body.reference.clone());
                entry.body_size = Some(head_len + stored.size);
            }
            Ok(entry)
        };
        if let Some(user) = &self.user {
            let all: Vec<String> = tx.recipients.iter().map(|r| r.to_string()).collect();
            let msg_id = content.msg_id(&user.domain, &all, generation);
            return Ok(vec![QueuedMessage {
                entry: with_body(QueueEntry {
                    recipients: all,
                    domain: user.domain.clone(),
                    direction: Direction::Outbound,
                    ..base
                })?,
                body: full,
                msg_id,
            }]);
        }
        // Inbound: group by recipient domain (lower case already), in order of first
        // appearance.
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for r in &tx.recipients {
            let domain = r.domain().to_owned();
            match groups.iter_mut().find(|(d, _)| *d == domain) {
                Some((_, list)) => list.push(r.to_string()),
                None => groups.push((domain, vec![r.to_string()])),
            }
        }
        groups
            .into_iter()
            .map(|(domain, recipients)| {
                Ok(QueuedMessage {
                    msg_id: content.msg_id(&domain, &recipients, generation),
                    entry: with_body(QueueEntry {
                        recipients,
                        domain,
                        ..base.clone()
                    })?,
                    body: full.clone(),
                })
            })
            .collect()
    }
}

/// Most recipients named in a span attribute (the count is always there).
const SPAN_RECIPIENTS: usize = 20;

/// The recipients as the transaction's span shows them: their count and the first
/// [`SPAN_RECIPIENTS`] of them, comma separated.
fn span_recipients(tx: &Transaction) -> (u64, String) {
    use std::fmt::Write as _;
    let mut rcpts = String::new();
    for (i, r) in tx.recipients.iter().take(SPAN_RECIPIENTS).enumerate() {
        let separator = if i == 0 { "" } else { "," };
        let _ = write!(rcpts, "{separator}{r}");
    }
    if tx.recipients.len() > SPAN_RECIPIENTS {
        rcpts.push_str(",...");
    }
    (tx.recipients.len() as u64, rcpts)
}

/// The DKIM signatures of the user's own domain to put in front of a submitted message (never
/// of another domain, whatever `From:` says). A signing failure (a broken key) is logged and
/// the message goes out unsigned: that hurts its reception, losing it would be worse.
fn sign(
    signer: &crate::dkim::DkimSigner,
    message: &[u8],
    stored_body: Option<&crate::dkim::BodyHashValue>,
    user_domain: &str,
    span: &tracing::Span,
) -> Option<String> {
    let _signing = tracing::info_span!(parent: span, "dkim.sign", domain = user_domain).entered();
    let signed = match stored_body {
        Some(body) => signer.sign_head_for(message, body, user_domain),
        None => signer.sign_for(message, user_domain),
    };
    match signed {
        Ok(headers) => headers,
        Err(error) => {
            tracing::error!(parent: span, %error, "DKIM signing failed; queueing the message unsigned");
            None
        }
    }
}

/// The body of a message stored while it arrived: its objects, its size, and the body hash of
/// our signature.
struct StoredTail {
    bodies: Vec<crate::queue::upload::StoredBody>,
    size: u64,
    sign: Option<crate::dkim::BodyHashValue>,
}

/// The answer when the queue (or the object store) did not take the message.
fn refusal(error: EnqueueError) -> (Reply, &'static str) {
    match error {
        EnqueueError::Full(_) => (insufficient_storage(), "queue_full"),
        EnqueueError::Unavailable(_) => (
            Reply::local_error("Queue unavailable, try again later"),
            "queue_unavailable",
        ),
    }
}

/// `452 4.3.1`: the queue is full, or the node has no memory left for the message (RFC 3463
/// X.3.1 "mail system full"); the client keeps the message and tries again later.
pub(super) fn insufficient_storage() -> Reply {
    Reply::new(
        452,
        EnhancedCode(4, 3, 1),
        "Insufficient system storage, try again later",
    )
}

/// Metric label for a refused message.
pub(super) fn reason_of(error: &crate::protocol::DataError) -> &'static str {
    use crate::protocol::DataError;
    match error {
        DataError::BareLineEnding => "bare_line_ending",
        DataError::LineTooLong => "line_too_long",
        DataError::TooLarge => "too_large",
        DataError::Incomplete => "incomplete",
    }
}
