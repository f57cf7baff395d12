//! BDAT (CHUNKING, RFC 3030). The announced octets are always consumed, even when the
//! command is refused, so chunk content is never read as commands (catalogue EXT-13). The
//! assembled message gets the same line-ending and line-length checks as DATA, so BDAT is no
//! way around the smuggling defence.
//!
//! A single chunk larger than the message size limit is answered with `552 5.3.4` and the
//! connection is closed: reading up to 2^64 announced octets just to stay in step is not an
//! option (EXT-15). A transaction whose chunks add up past the limit is refused with
//! `552 5.3.4` once the chunk that crossed it has been read.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{End, Next, Session};
use crate::protocol::{
    BdatReceiver, DataError, DataProgress, EnhancedCode, MAX_TEXT_LINE, Reply, check_bdat_message,
};

/// The chunks of one BDAT transaction received so far.
pub(super) struct Chunks {
    body: BytesMut,
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
        let so_far = self
            .tx
            .as_ref()
            .and_then(|t| t.bdat.as_ref())
            .map_or(0, |c| c.body.len() as u64);
        let too_large = refusal.is_none() && so_far + size > limit;
        let store = refusal.is_none() && !too_large;

        let mut receiver = BdatReceiver::new(size);
        let mut budget = self.data_budget(self.ctx.config.timeouts.data_block.0);
        let mut chunk = BytesMut::new();
        loop {
            let progress = if store {
                receiver.feed(&mut self.rbuf, &mut chunk)
            } else {
                receiver.feed_discard(&mut self.rbuf)
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
        let Some(tx) = self.tx.as_mut() else {
            return Ok(Next::Continue);
        };
        let chunks = tx.bdat.get_or_insert_with(|| Chunks {
            body: BytesMut::new(),
        });
        chunks.body.extend_from_slice(&chunk);
        if !last {
            self.reply(Reply::new(
                250,
                EnhancedCode(2, 0, 0),
                format!("{size} octets received"),
            ));
            return Ok(Next::Continue);
        }
        let body = std::mem::take(&mut chunks.body).freeze();
        match check_bdat_message(body, self.bare_eol_policy(), MAX_TEXT_LINE) {
            // Boxed for the reason given at the DATA call site.
            Ok(message) => Box::pin(self.complete_transaction(message)).await,
            Err(error) => {
                self.reject_message(error.reply(), super::data::reason_of(&error));
                Ok(Next::Continue)
            }
        }
    }
}
