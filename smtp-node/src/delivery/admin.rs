//! What operators' actions on the queue (`kubectl kubemail queue ...`, see the queue
//! contract's "Operators' actions") mean to a delivery worker:
//!
//! * an entry deleted *with a notice* (`Kubemail-Cancel: bounce`) is not attempted: every
//!   recipient fails with `5.0.0` and the sender gets one DSN, DKIM-signed like every bounce;
//! * held entries wait on a subject no consumer reads, so workers never see them;
//! * retried and released entries are ordinary entries without `Kubemail-Not-Before`;
//! * an action replaces the entry in the stream. A worker that attempted the old entry
//!   meanwhile looks, before it republishes the recipients left, for the action's mark
//!   ([`replaced_meanwhile`], the queue contract's "Operators' actions"); when it is there,
//!   the operator's replacement stands and nothing is republished (so a held message never
//!   comes back through a retry). The mark is in a bucket keyed by domain, so a node needs
//!   no access to other domains' entries to check it.

use async_nats::jetstream::Message;
use async_nats::jetstream::kv::{Operation, Store};
use kubemail_queue::QueueEntry;
use tokio::sync::OnceCell;

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

/// The replaced-entry marks ([`kubemail_queue::REPLACED_BUCKET`]), opened on first use.
#[derive(Default)]
pub struct ReplacedMarks {
    store: OnceCell<Store>,
}

impl ReplacedMarks {
    async fn store(&self, js: &async_nats::jetstream::Context) -> Option<&Store> {
        self.store
            .get_or_try_init(|| async {
                match js.get_key_value(kubemail_queue::REPLACED_BUCKET).await {
                    Ok(s) => Ok(s),
                    // Created by the operator; a node on its own makes it R1.
                    Err(_) => js
                        .create_key_value(kubemail_queue::streams::replaced_config(1))
                        .await
                        .map_err(|e| e.to_string()),
                }
            })
            .await
            .map_err(|error| tracing::debug!(%error, "no replaced-entry marks"))
            .ok()
    }
}

/// Whether an operator replaced or deleted `message` while it was attempted (its mark is
/// set): then the mark is answered with `yielded` and the caller republishes nothing. When the
/// answer is unknown (NATS trouble) it is no: republishing then can at worst repeat a
/// delivery, never lose a recipient.
pub async fn replaced_meanwhile(
    ctx: &DeliveryContext,
    message: &Message,
    entry: &QueueEntry,
) -> bool {
    let Ok(info) = message.info() else {
        return false;
    };
    let Some(store) = ctx.replaced.store(&ctx.js).await else {
        return false;
    };
    let key = kubemail_queue::replaced_key(&entry.domain, info.stream_sequence);
    match store.entry(&key).await {
        Ok(Some(mark)) if mark.operation == Operation::Put => {
            if let Err(error) = store.update(&key, "yielded".into(), mark.revision).await {
                tracing::debug!(%error, "cannot answer the replaced-entry mark");
            }
            true
        }
        Ok(_) => false,
        Err(error) => {
            tracing::debug!(%error, "cannot read the replaced-entry mark; assuming none");
            false
        }
    }
}
