//! What operators' actions on the queue (`kubectl kubemail queue ...`, see the queue
//! contract's "Operators' actions") mean to a delivery worker:
//!
//! * an entry deleted *with a notice* (`Kubemail-Cancel: bounce`) is not attempted: every
//!   recipient fails with `5.0.0` and the sender gets one DSN, DKIM-signed like every bounce;
//! * held entries wait on a subject no consumer reads, so workers never see them;
//! * retried and released entries are ordinary entries without `Kubemail-Not-Before`;
//! * an action replaces the entry in the stream. A worker that attempted the old entry
//!   meanwhile checks, before it republishes the recipients left, that the old entry is
//!   still there ([`still_queued`]); if not, the operator's replacement stands and nothing is
//!   republished (so a held message never comes back through a retry).

use async_nats::jetstream::Message;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use kubemail_queue::QueueEntry;

use super::DeliveryContext;
use super::outcome::{Diagnostic, RecipientOutcome};
use crate::protocol::EnhancedCode;

/// The outcome of every recipient of an entry an operator deleted with a notice.
pub fn cancelled_outcomes(entry: &QueueEntry) -> Vec<(String, RecipientOutcome)> {
    tracing::info!(queue_id = %entry.queue_id, recipients = entry.recipients.len(), "deleted from the queue by an operator; returning it to the sender");
    // RFC 3463 has no code for an administrator's deletion; X.0.0 is "other".
    let d = Diagnostic::local(
        EnhancedCode(5, 0, 0),
        "the message was deleted from the queue by an administrator",
    );
    entry
        .recipients
        .iter()
        .map(|r| (r.clone(), RecipientOutcome::Failed(d.clone())))
        .collect()
}

/// Whether the stream still holds `message` (no operator replaced or deleted it). When the
/// answer is unknown (NATS trouble) it is taken as yes: republishing then can at worst repeat
/// a delivery, never lose a recipient.
pub async fn still_queued(ctx: &DeliveryContext, message: &Message) -> bool {
    let Ok(info) = message.info() else {
        return true;
    };
    let sequence = info.stream_sequence;
    let stream = match ctx.js.get_stream_no_info(&ctx.nats.stream).await {
        Ok(s) => s,
        Err(_) => return true,
    };
    match stream.get_raw_message(sequence).await {
        Ok(_) => true,
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => false,
        Err(error) => {
            tracing::debug!(%error, sequence, "cannot check the entry; assuming it is still queued");
            true
        }
    }
}
