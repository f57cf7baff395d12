//! BDAT (CHUNKING, RFC 3030). The announced octets are always consumed, even when the
//! command is refused, so chunk content is never read as commands. The
//! assembled message gets the same line-ending and line-length checks as DATA, so BDAT is no
//! way around the smuggling defence.
//!
//! A single chunk larger than the message size limit is answered with `552 5.3.4` and the
//! connection is closed: reading up to 2^64 announced octets just to stay in step is not an
//! option (EXT-15). A transaction whose chunks add up past the limit is refused with
//! `552 5.3.4` once the chunk that crossed it has been read.
//!
//! A large message's body goes to the object store while it arrives, as with DATA (see
//! [`super::spill`]): once the message is past the queue's inline limit and its header section
//! (CRLF line endings) is complete, the chunks are checked piece by piece as the whole message
//! would be ([`BdatLineCheck`]) and handed on. Each chunk's announced size is taken from the
//! memory budget before it is read until then, and given back once its body goes on.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::body::{self, Assembled};
use super::data::insufficient_storage;
use super::spill::{self, Spill};
use super::{End, Next, Session};
use crate::memory::Reservation;
use crate::protocol::{
    BdatLineCheck, BdatReceiver, DataError, DataProgress, EnhancedCode, MAX_TEXT_LINE, Reply,
    check_bdat_message,
};

/// The chunks of one BDAT transaction received so far, in a buffer with headroom (see
/// [`body`]), and their share of the memory budget.
pub(super) struct Chunks {
    /// The message so far; once its body goes to the object store, only octets of the
    /// current chunk not yet checked and handed on.
    body: BytesMut,
    held: Reservation,
    /// Octets of all chunks so far.
    received: u64,
    spill: Option<Spilling>,
    /// Whether storing the body while it arrives was tried (once per transaction).
    tried: bool,
}

/// A BDAT message whose body goes to the object store while it arrives.
struct Spilling {
    spill: Spill,
    /// The header section, with the headroom in front.
    head: BytesMut,
    check: BdatLineCheck,
    /// Checked body octets not yet handed on.
    pending: BytesMut,
    /// The first line-ending or line-length violation: the message is refused.
    error: Option<DataError>,
}

impl Spilling {
    /// Checks the next octets of the message, and hands them on a chunk's worth at a time.
    async fn take(&mut self, raw: &[u8]) {
        if self.error.is_some() {
            return;
        }
        if let Err(error) = self.check.feed(raw, &mut self.pending) {
            self.error = Some(error);
            return;
        }
        if self.pending.len() >= spill::CHUNK {
            self.spill.write(self.pending.split().freeze()).await;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn handle_bdat(&mut self, size: u64, last: bool) -> Result<Next, End> {
        let limit = self.size_limit();
        let refusal = match &self.tx {
            None => Some(Reply::bad_sequence("Need MAIL before BDAT")),
            Some(tx) if tx.recipients.is_empty() => {
                Some(Reply::bad_sequence("Need RCPT before BDAT"))
            }
            Some(_) => None,
        };
        if size > limit {
            self.reject_message(
                Reply::new(
                    552,
                    EnhancedCode(5, 3, 4),
                    "Message size exceeds fixed maximum message size; closing",
                ),
                "too_large",
            );
            return Ok(Next::Close);
        }
        let mut chunks = self.tx.as_mut().and_then(|t| t.bdat.take());
        let so_far = chunks.as_ref().map_or(0, |c| c.received);
        let too_large = refusal.is_none() && so_far + size > limit;
        let mut store = refusal.is_none() && !too_large;
        // Room for the whole chunk before any of it is read: its size is announced.
        let mut short_of_memory = false;
        if store {
            let memory = self.ctx.memory.clone();
            let c = chunks.get_or_insert_with(|| Chunks {
                body: body::buffer(0),
                held: memory.reservation(),
                received: 0,
                spill: None,
                tried: false,
            });
            // `size <= limit`, so it fits in usize wherever the limit does.
            let spare = usize::try_from(size).unwrap_or(usize::MAX);
            let first = c.held.bytes() == 0;
            let deadline = Instant::now() + memory.wait();
            let room = if c.spill.is_some() {
                // The spill's room holds what is on its way.
                Ok(())
            } else if first {
                let capacity = body::HEADROOM.saturating_add(spare);
                match c.held.grow_to(capacity as u64, deadline).await {
                    Ok(()) => {
                        c.body = body::buffer(capacity);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            } else {
                body::ensure_spare(
                    &mut c.body,
                    spare,
                    body::ceiling(limit, 0),
                    &mut c.held,
                    deadline,
                )
                .await
            };
            if room.is_err() {
                short_of_memory = true;
                store = false;
            }
        }

        let mut receiver = BdatReceiver::new(size);
        let mut budget = self.data_budget(self.ctx.config.timeouts.data_block.0);
        let threshold = self.ctx.queue.streaming_threshold();
        loop {
            let progress = match chunks.as_mut() {
                Some(c) if store => {
                    let progress = receiver.feed(&mut self.rbuf, &mut c.body);
                    if let Some(spilling) = c.spill.as_mut() {
                        let raw = c.body.split();
                        spilling.take(&raw).await;
                    } else if !c.tried
                        && let Some(threshold) = threshold
                        && c.body.len() - body::HEADROOM > threshold
                    {
                        c.tried = true;
                        c.spill = self
                            .start_bdat_spill(&mut c.body, threshold, &mut c.held)
                            .await;
                    }
                    progress
                }
                _ => receiver.feed_discard(&mut self.rbuf),
            };
            if progress == DataProgress::Done {
                break;
            }
            self.fill_data(&mut budget).await?;
        }
        if store && let Some(c) = chunks.as_mut() {
            c.received += size;
        }

        if let Some(reply) = refusal {
            self.error_reply(reply)?;
            return Ok(Next::Continue);
        }
        if too_large {
            self.reject_message(DataError::TooLarge.reply(), "too_large");
            return Ok(Next::Continue);
        }
        if short_of_memory {
            // RFC 3030 3: after a 4xx to a chunk the client sends no more of this transaction.
            self.reject_message(insufficient_storage(), "memory_full");
            return Ok(Next::Continue);
        }
        let Some(mut c) = chunks else {
            return Ok(Next::Continue);
        };
        if let Some(error) = c.spill.as_mut().and_then(|s| s.error.take()) {
            // Dropping the chunks drops the spill, which deletes what it stored.
            self.reject_message(error.reply(), super::data::reason_of(&error));
            return Ok(Next::Continue);
        }
        if !last {
            if let Some(tx) = self.tx.as_mut() {
                tx.bdat = Some(c);
            }
            self.reply(Reply::new(
                250,
                EnhancedCode(2, 0, 0),
                format!("{size} octets received"),
            ));
            return Ok(Next::Continue);
        }
        if let Some(mut spilling) = c.spill.take() {
            if let Err(error) = spilling.check.finish(&mut spilling.pending) {
                self.reject_message(error.reply(), super::data::reason_of(&error));
                return Ok(Next::Continue);
            }
            spilling.spill.write(spilling.pending.freeze()).await;
            let message = Assembled::new(spilling.head, body::HEADROOM);
            return Box::pin(self.complete_transaction(message, c.held, Some(spilling.spill)))
                .await;
        }
        let whole = std::mem::take(&mut c.body).freeze();
        let message = whole.slice(body::HEADROOM..);
        match check_bdat_message(message, self.bare_eol_policy(), MAX_TEXT_LINE) {
            // Boxed for the reason given at the DATA call site.
            Ok(checked) => {
                let message = Assembled::from_checked(whole, checked);
                Box::pin(self.complete_transaction(message, c.held, None)).await
            }
            Err(error) => {
                self.reject_message(error.reply(), super::data::reason_of(&error));
                Ok(Next::Continue)
            }
        }
    }

    /// Starts storing the body of the BDAT message in `body` (after the headroom, as
    /// received) while it arrives, if its header section is complete with CRLF line endings
    /// and no longer than what an entry carries inline (`threshold`). `body` keeps only octets
    /// still to be checked from then on. `None`: the message stays whole, checked at its end.
    async fn start_bdat_spill(
        &self,
        body: &mut BytesMut,
        threshold: usize,
        held: &mut Reservation,
    ) -> Option<Spilling> {
        let offset = spill::body_offset(&body[body::HEADROOM..], 0)?;
        if offset > threshold {
            return None;
        }
        let head_len = body::HEADROOM + offset;
        let mut check = BdatLineCheck::new(self.bare_eol_policy(), MAX_TEXT_LINE);
        let mut head = BytesMut::with_capacity(head_len);
        head.extend_from_slice(&body[..body::HEADROOM]);
        // The header section ends in CRLF: nothing of it waits in the check.
        if check
            .feed(&body[body::HEADROOM..head_len], &mut head)
            .is_err()
        {
            return None;
        }
        let (spill, needed) = self
            .open_spill(&head[body::HEADROOM..], body.capacity(), held)
            .await?;
        let mut spilling = Spilling {
            spill,
            head,
            check,
            pending: BytesMut::new(),
            error: None,
        };
        // In chunks (the spill's room holds those on their way), so the buffer of the whole
        // message so far is gone when `held` shrinks.
        let whole = std::mem::take(body);
        for piece in whole[head_len..].chunks(spill::CHUNK) {
            spilling.take(piece).await;
        }
        drop(whole);
        held.shrink_to(needed);
        Some(spilling)
    }
}
