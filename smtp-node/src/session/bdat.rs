//! BDAT (CHUNKING, RFC 3030). The announced octets are always consumed, even when the
//! command is refused, so chunk content is never read as commands. The
//! assembled message gets the same line-ending and line-length checks as DATA, so BDAT is no
//! way around the smuggling defence.
//!
//! A single chunk larger than the message size limit is answered with `552 5.3.4` and the
//! connection is closed: reading up to 2^64 announced octets just to stay in step is not an
//! option (EXT-15). A transaction whose chunks add up past the limit is refused with
//! `552 5.3.4` once the chunk that crossed it has been read.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::body::{self, Assembled};
use super::data::insufficient_storage;
use super::{End, Next, Session};
use crate::memory::Reservation;
use crate::protocol::{
    BdatReceiver, DataError, DataProgress, EnhancedCode, MAX_TEXT_LINE, Reply, check_bdat_message,
};

/// The chunks of one BDAT transaction received so far, in a buffer with headroom (see
/// [`body`]), and their share of the memory budget.
pub(super) struct Chunks {
    body: BytesMut,
    held: Reservation,
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
        let so_far = chunks
            .as_ref()
            .map_or(0, |c| (c.body.len() - body::HEADROOM) as u64);
        let too_large = refusal.is_none() && so_far + size > limit;
        let mut store = refusal.is_none() && !too_large;
        // Room for the whole chunk before any of it is read: its size is announced.
        let mut short_of_memory = false;
        if store {
            let memory = self.ctx.memory.clone();
            let c = chunks.get_or_insert_with(|| Chunks {
                body: body::buffer(0),
                held: memory.reservation(),
            });
            // `size <= limit`, so it fits in usize wherever the limit does.
            let spare = usize::try_from(size).unwrap_or(usize::MAX);
            let first = c.held.bytes() == 0;
            let deadline = Instant::now() + memory.wait();
            let room = if first {
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
        loop {
            let progress = match chunks.as_mut() {
                Some(c) if store => receiver.feed(&mut self.rbuf, &mut c.body),
                _ => receiver.feed_discard(&mut self.rbuf),
            };
            if progress == DataProgress::Done {
                break;
            }
            self.fill_data(&mut budget).await?;
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
}
