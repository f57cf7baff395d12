//! The events, metrics by class and suppression entries of one delivery attempt, from the
//! worker's plan: `delivered`, `deferred` (with the retry time), `bounced` or `expired`
//! (a failure whose status is transient can only be one whose lifetime ran out), and
//! `suppressed` for the recipients taken out before the attempt.

use kubemail_queue::events::EventType;
use kubemail_queue::suppression::{SuppressionEntry, SuppressionReason};

use super::Batch;
use crate::config::BounceClass;
use crate::delivery::DeliveryContext;
use crate::delivery::outcome::{Disposition, Peer, Plan, RecipientOutcome};
use crate::queue::{Direction, QueueEntry};

/// What events need of a delivered recipient (the plan keeps only its address).
#[derive(Debug, Clone)]
pub struct DeliveredInfo {
    pub recipient: String,
    pub reply: String,
    pub mx: String,
    pub peer: Option<Box<Peer>>,
}

/// The delivered recipients' replies and connections, before the plan consumes them.
pub fn delivered_of(outcomes: &[(String, RecipientOutcome)]) -> Vec<DeliveredInfo> {
    outcomes
        .iter()
        .filter_map(|(rcpt, o)| match o {
            RecipientOutcome::Delivered {
                reply,
                remote_mta,
                peer,
            } => Some(DeliveredInfo {
                recipient: rcpt.clone(),
                reply: reply.to_string(),
                mx: remote_mta.clone(),
                peer: peer.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// Adds the attempt's events to `batch`, counts failures by class and adds hard
/// `invalid-recipient` bounces of outbound mail to the suppression list.
pub async fn record(
    ctx: &DeliveryContext,
    batch: &mut Batch<'_>,
    entry: &QueueEntry,
    delivered: &[DeliveredInfo],
    plan: &Plan,
    suppressed: &[(String, SuppressionEntry)],
) {
    let m = &ctx.metrics.events;
    let domain = entry.domain.as_str();
    for d in delivered {
        batch.delivered(&d.recipient, &d.reply, d.peer.as_deref(), &d.mx);
    }
    let retry_at = match plan.disposition {
        Disposition::Deferred { retry_at, .. } => Some(retry_at),
        _ => None,
    };
    for (rcpt, d) in &plan.deferred {
        let class = ctx.events.classifier().diagnostic(d);
        m.count_failure(domain, rcpt, "deferred", class);
        batch.failure(EventType::Deferred, rcpt, d, class, retry_at);
    }
    for (rcpt, d) in &plan.failed {
        if let Some((_, found)) = suppressed.iter().find(|(r, _)| r == rcpt) {
            batch.suppressed(rcpt, found);
            continue;
        }
        let class = ctx.events.classifier().diagnostic(d);
        let (kind, result) = if d.status.0 == 4 {
            (EventType::Expired, "expired")
        } else {
            (EventType::Bounced, "bounced")
        };
        m.count_failure(domain, rcpt, result, class);
        let id = batch.failure(kind, rcpt, d, class, None);
        // Only the remote server's word that the address does not exist suppresses it.
        if kind == EventType::Bounced
            && class == BounceClass::InvalidRecipient
            && d.reply.is_some()
            && entry.direction == Direction::Outbound
        {
            ctx.suppression
                .add(
                    domain,
                    rcpt,
                    SuppressionReason::Bounce,
                    Some(class),
                    Some(id),
                    Some(d.summary()),
                )
                .await;
        }
    }
}
