//! Delivery metrics: recipients by result, attempt latency, DSNs and poison messages, per
//! MailDomain (a label from the config, never from mail).

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A domain.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DomainLabels {
    pub domain: String,
}

/// A domain and an outcome or kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DomainResultLabels {
    pub domain: String,
    pub result: &'static str,
}

type HistogramFamily = Family<DomainLabels, Histogram, fn() -> Histogram>;

/// The delivery side's metrics.
pub struct DeliveryMetrics {
    /// Recipients by result: `delivered`, `deferred`, `bounced` (failed and reported),
    /// `dropped` (failed with a null sender, or expired bounces).
    pub recipients: Family<DomainResultLabels, Counter>,
    /// Duration of delivery attempts (one queue entry, all its destinations).
    pub attempt_seconds: HistogramFamily,
    /// DSNs queued, by kind: `failure`, `delay`.
    pub dsns: Family<DomainResultLabels, Counter>,
    /// Entries given up after too many deliveries (a worker crashed on them each time).
    pub poison: Family<DomainLabels, Counter>,
    /// Entries whose headers were unusable (dropped with an error log).
    pub malformed: Family<DomainLabels, Counter>,
}

fn attempt_histogram() -> Histogram {
    // 5 ms .. ~20 min: a loopback delivery takes milliseconds, a slow remote minutes.
    Histogram::new(exponential_buckets(0.005, 2.0, 18))
}

impl DeliveryMetrics {
    fn new() -> Self {
        Self {
            recipients: Family::default(),
            attempt_seconds: Family::new_with_constructor(attempt_histogram),
            dsns: Family::default(),
            poison: Family::default(),
            malformed: Family::default(),
        }
    }

    /// Adds the metrics to `registry` (the node's, under its `kubemail_smtp` prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "delivery_recipients",
            "Recipients by delivery result (delivered, deferred, bounced, dropped)",
            self.recipients.clone(),
        );
        registry.register(
            "delivery_attempt_seconds",
            "Duration of one delivery attempt of a queue entry",
            self.attempt_seconds.clone(),
        );
        registry.register(
            "delivery_dsns",
            "Delivery status notifications queued, by kind",
            self.dsns.clone(),
        );
        registry.register(
            "delivery_poison_messages",
            "Queue entries bounced after repeated failed deliveries (worker crashes)",
            self.poison.clone(),
        );
        registry.register(
            "delivery_malformed_entries",
            "Queue entries dropped because their headers were unusable",
            self.malformed.clone(),
        );
    }

    pub fn count(&self, domain: &str, result: &'static str, n: usize) {
        if n > 0 {
            self.recipients
                .get_or_create(&DomainResultLabels {
                    domain: domain.to_owned(),
                    result,
                })
                .inc_by(n as u64);
        }
    }
}

/// The process-wide delivery metrics.
pub fn global() -> &'static DeliveryMetrics {
    static METRICS: OnceLock<DeliveryMetrics> = OnceLock::new();
    METRICS.get_or_init(DeliveryMetrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_encodes() {
        let m = global();
        m.count("example.test", "delivered", 2);
        m.attempt_seconds
            .get_or_create(&DomainLabels {
                domain: "example.test".into(),
            })
            .observe(0.01);
        let mut registry = Registry::with_prefix("kubemail_smtp");
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap_or_default();
        assert!(
            text.contains("kubemail_smtp_delivery_recipients_total{domain=\"example.test\",result=\"delivered\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("kubemail_smtp_delivery_attempt_seconds_bucket"),
            "{text}"
        );
    }
}
