//! The node's side of the suppression list (the bucket, its keys and the library API are in
//! [`kubemail_queue::suppression`]):
//!
//! * before an attempt, the recipients of an *outbound* entry that are on the sending
//!   domain's list are taken out; they fail with `5.7.1` (the sender's DSN says why) and
//!   produce a `suppressed` event instead of a delivery;
//! * a hard bounce of class `invalid-recipient` reported by the remote server (not one of
//!   our own diagnostics), an inbound DSN saying the same, and a complaint add an entry that
//!   expires after `events.suppression.expireAfter`;
//! * submission may refuse a suppressed recipient at `RCPT TO` (`refuseAtRcpt`);
//! * a sampler keeps `kubemail_smtp_suppression_entries{domain}` current (keys under the
//!   domain's prefix: expired entries count until they are removed).
//!
//! The list is advisory for availability: when it cannot be read in time, mail is sent as if
//! it were empty (logged), rather than held back.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use kubemail_queue::suppression::{SuppressionEntry, SuppressionList, SuppressionReason};
use tokio_util::sync::CancellationToken;

use crate::config::{BounceClass, SuppressionConfig};
use crate::delivery::outcome::{Diagnostic, RecipientOutcome};
use crate::metrics::Metrics;
use crate::protocol::EnhancedCode;
use crate::queue::{Direction, QueueEntry};

/// Longest wait for the list before mail goes on without it.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The suppression list as the node uses it.
pub struct Suppression {
    js: jetstream::Context,
    config: SuppressionConfig,
    list: tokio::sync::OnceCell<SuppressionList>,
    metrics: Arc<Metrics>,
}

impl Suppression {
    /// Touches no network: the bucket is opened (or created) at first use.
    pub fn new(js: jetstream::Context, config: SuppressionConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            js,
            config,
            list: tokio::sync::OnceCell::new(),
            metrics,
        }
    }

    pub fn config(&self) -> &SuppressionConfig {
        &self.config
    }

    async fn list(&self) -> Option<&SuppressionList> {
        if !self.config.enabled {
            return None;
        }
        match tokio::time::timeout(
            LOOKUP_TIMEOUT,
            self.list
                .get_or_try_init(|| SuppressionList::open(&self.js)),
        )
        .await
        {
            Ok(Ok(list)) => Some(list),
            Ok(Err(error)) => {
                tracing::warn!(%error, "suppression list unavailable; sending as if it were empty");
                None
            }
            Err(_) => {
                tracing::warn!(
                    "suppression list did not open in time; sending as if it were empty"
                );
                None
            }
        }
    }

    /// The live entry of `address` in `domain`'s list, if any (none when the list cannot be
    /// read in time).
    pub async fn lookup(&self, domain: &str, address: &str) -> Option<SuppressionEntry> {
        let list = self.list().await?;
        match tokio::time::timeout(LOOKUP_TIMEOUT, list.get(domain, address, SystemTime::now()))
            .await
        {
            Ok(Ok(entry)) => entry,
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot read the suppression list; sending");
                None
            }
            Err(_) => {
                tracing::warn!("suppression lookup timed out; sending");
                None
            }
        }
    }

    /// Splits an entry's recipients: the entry to attempt (the others), and the suppressed
    /// recipients with their entries. Only outbound entries are checked.
    pub async fn split(&self, entry: &QueueEntry) -> (QueueEntry, Vec<(String, SuppressionEntry)>) {
        if entry.direction != Direction::Outbound || !self.config.enabled {
            return (entry.clone(), Vec::new());
        }
        let mut keep = Vec::with_capacity(entry.recipients.len());
        let mut suppressed = Vec::new();
        // One lookup per recipient, all at once: a message to many recipients waits for one
        // round trip, not one each.
        let found = futures::future::join_all(
            entry
                .recipients
                .iter()
                .map(|rcpt| self.lookup(&entry.domain, rcpt)),
        )
        .await;
        for (rcpt, found) in entry.recipients.iter().zip(found) {
            match found {
                Some(found) => suppressed.push((rcpt.clone(), found)),
                None => keep.push(rcpt.clone()),
            }
        }
        if !suppressed.is_empty() {
            self.metrics
                .events
                .suppressed
                .get_or_create(&crate::events::metrics::DomainLabels {
                    domain: entry.domain.clone(),
                })
                .inc_by(suppressed.len() as u64);
            for (rcpt, found) in &suppressed {
                tracing::info!(recipient = %rcpt, reason = found.reason.as_str(), since = %found.created_at, "recipient is suppressed; not attempted");
            }
        }
        let attempt = QueueEntry {
            recipients: keep,
            ..entry.clone()
        };
        (attempt, suppressed)
    }

    /// Adds `address` to `domain`'s list (bounded in time; a failure is logged).
    pub async fn add(
        &self,
        domain: &str,
        address: &str,
        reason: SuppressionReason,
        class: Option<BounceClass>,
        source_event: Option<String>,
        note: Option<String>,
    ) {
        let Some(list) = self.list().await else {
            return;
        };
        let mut entry = SuppressionEntry::new(
            domain,
            address,
            reason,
            SystemTime::now(),
            Some(self.config.expire_after.0),
        );
        entry.class = class;
        entry.source_event = source_event;
        entry.note = note.map(|n| crate::delivery::outcome::one_line(&n));
        match tokio::time::timeout(LOOKUP_TIMEOUT, list.put(&entry)).await {
            Ok(Ok(())) => {
                tracing::info!(recipient = %address, reason = reason.as_str(), "added to the suppression list");
                self.metrics
                    .events
                    .suppression_added
                    .get_or_create(&crate::events::metrics::ReasonLabels {
                        domain: domain.to_ascii_lowercase(),
                        reason: reason.as_str(),
                    })
                    .inc();
            }
            Ok(Err(error)) => tracing::warn!(%error, "cannot add to the suppression list"),
            Err(_) => tracing::warn!("adding to the suppression list timed out"),
        }
    }

    /// Samples the size of each domain's list every `interval` until `stop`.
    pub async fn run_sampler(
        self: std::sync::Arc<Self>,
        domains: Vec<String>,
        interval: Duration,
        stop: CancellationToken,
    ) {
        if !self.config.enabled {
            return;
        }
        let mut tick = tokio::time::interval(interval.max(Duration::from_secs(1)));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(list) = self.list().await else {
                continue;
            };
            for domain in &domains {
                match tokio::time::timeout(interval, list.count(domain)).await {
                    Ok(Ok(n)) => {
                        self.metrics
                            .events
                            .suppression_entries
                            .get_or_create(&crate::events::metrics::DomainLabels {
                                domain: domain.to_ascii_lowercase(),
                            })
                            .set(i64::try_from(n).unwrap_or(i64::MAX));
                    }
                    Ok(Err(error)) => tracing::debug!(%error, "cannot sample the suppression list"),
                    Err(_) => tracing::debug!("sampling the suppression list timed out"),
                }
            }
        }
    }
}

/// The outcome of a suppressed recipient: failed with `5.7.1`, so the sender's DSN says why.
pub fn outcome(entry: &SuppressionEntry) -> RecipientOutcome {
    RecipientOutcome::Failed(Diagnostic::local(
        EnhancedCode(5, 7, 1),
        format!(
            "not sent: the address is on this domain's suppression list since {} ({})",
            entry.created_at,
            entry.reason.as_str()
        ),
    ))
}
