//! Delivery metrics: recipients by result, attempt latency, retries, DSNs and poison
//! messages, per MailDomain (a label from the config), and recipients by result per remote
//! domain — the one label that comes from mail, so it is bounded: the first
//! [`MAX_REMOTE_DOMAINS`] distinct domains a process sees get their own series, later ones
//! are counted as `other`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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

/// A domain, a remote (recipient) domain and a result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RemoteLabels {
    pub domain: String,
    pub remote_domain: String,
    pub result: &'static str,
}

/// A TLS policy type and an RFC 8460 result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsResultLabels {
    pub policy: &'static str,
    pub result: &'static str,
}

/// A result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultOnlyLabels {
    pub result: &'static str,
}

/// Distinct remote domains with a series of their own, per process. Enough for the
/// destinations that matter (the big mailbox providers and regular partners) while keeping
/// the series count of a bulk sender bounded.
pub const MAX_REMOTE_DOMAINS: usize = 200;

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
    /// Entries republished for a later attempt (recipients deferred).
    pub retries: Family<DomainLabels, Counter>,
    /// Recipients by result and remote domain.
    pub remote: Family<RemoteLabels, Counter>,
    /// Outbound TLS sessions by policy type and RFC 8460 result.
    pub tls_results: Family<TlsResultLabels, Counter>,
    /// TLS-RPT report mails: `sent`, `failed`.
    pub tls_reports: Family<ResultOnlyLabels, Counter>,
    /// Recipients held back by a delivery pause (counted at every check).
    pub paused: Family<DomainLabels, Counter>,
    /// Messages per minute in force per shaping destination (0: no limit).
    pub shaping_rate: Family<super::shaping::DestinationLabels, Gauge>,
    /// `421` / `4.7.x` answers per shaping destination.
    pub shaping_throttled: Family<super::shaping::DestinationLabels, Counter>,
    remote_domains: RemoteDomains,
}

fn attempt_histogram() -> Histogram {
    // 5 ms .. ~20 min: a loopback delivery takes milliseconds, a slow remote minutes.
    Histogram::new(exponential_buckets(0.005, 2.0, 18))
}

/// The remote domains that have series of their own, shared by the delivery and events
/// families so that both stay within one bound.
#[derive(Clone, Default)]
pub struct RemoteDomains(Arc<Mutex<HashSet<String>>>);

impl RemoteDomains {
    /// `remote` itself while fewer than [`MAX_REMOTE_DOMAINS`] were seen, else `other`.
    pub fn bounded(&self, remote: String) -> String {
        let Ok(mut seen) = self.0.lock() else {
            return "other".to_owned();
        };
        if seen.contains(&remote) {
            return remote;
        }
        if seen.len() < MAX_REMOTE_DOMAINS {
            seen.insert(remote.clone());
            return remote;
        }
        "other".to_owned()
    }
}

impl Default for DeliveryMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl DeliveryMetrics {
    /// Unregistered families; [`crate::metrics::Metrics::new`] registers them.
    pub fn new() -> Self {
        Self {
            recipients: Family::default(),
            attempt_seconds: Family::new_with_constructor(attempt_histogram),
            dsns: Family::default(),
            poison: Family::default(),
            malformed: Family::default(),
            retries: Family::default(),
            remote: Family::default(),
            tls_results: Family::default(),
            tls_reports: Family::default(),
            paused: Family::default(),
            shaping_rate: Family::default(),
            shaping_throttled: Family::default(),
            remote_domains: RemoteDomains::default(),
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
        registry.register(
            "delivery_retries",
            "Queue entries republished for a later attempt because recipients were deferred",
            self.retries.clone(),
        );
        registry.register(
            "delivery_remote_recipients",
            "Recipients by delivery result and recipient domain (bounded; later domains count as other)",
            self.remote.clone(),
        );
        registry.register(
            "tls_policy_results",
            "Outbound TLS sessions by policy type (sts, tlsa, no-policy-found) and RFC 8460 result",
            self.tls_results.clone(),
        );
        registry.register(
            "tls_reports",
            "TLS-RPT (RFC 8460) report mails queued or failed",
            self.tls_reports.clone(),
        );
        registry.register(
            "delivery_paused_recipients",
            "Recipients held back by a delivery pause, counted at every check",
            self.paused.clone(),
        );
        registry.register(
            "delivery_shaping_messages_per_minute",
            "Messages per minute in force per shaping destination after back-off (0: no limit)",
            self.shaping_rate.clone(),
        );
        registry.register(
            "delivery_shaping_throttled",
            "421 and 4.7.x answers per shaping destination",
            self.shaping_throttled.clone(),
        );
    }

    /// Counts one outbound TLS session outcome.
    pub fn count_tls_result(&self, policy: &'static str, result: &'static str) {
        self.tls_results
            .get_or_create(&TlsResultLabels { policy, result })
            .inc();
    }

    /// Counts one TLS-RPT report mail.
    pub fn count_tls_report(&self, result: &'static str) {
        self.tls_reports
            .get_or_create(&ResultOnlyLabels { result })
            .inc();
    }

    /// Creates the series of `domain` at zero, so that they exist (for rates and alerts)
    /// before the first delivery.
    pub fn init_domain(&self, domain: &str) {
        let labels = DomainLabels {
            domain: domain.to_owned(),
        };
        for result in ["delivered", "deferred", "bounced", "dropped"] {
            let _ = self.recipients.get_or_create(&DomainResultLabels {
                domain: domain.to_owned(),
                result,
            });
        }
        for kind in ["failure", "delay"] {
            let _ = self.dsns.get_or_create(&DomainResultLabels {
                domain: domain.to_owned(),
                result: kind,
            });
        }
        let _ = self.poison.get_or_create(&labels);
        let _ = self.malformed.get_or_create(&labels);
        let _ = self.retries.get_or_create(&labels);
        let _ = self.attempt_seconds.get_or_create(&labels);
    }

    /// Counts one recipient's result under its (bounded) remote domain.
    pub fn count_remote(&self, domain: &str, recipient: &str, result: &'static str) {
        let remote = recipient
            .rsplit_once('@')
            .map_or("", |(_, d)| d)
            .to_ascii_lowercase();
        let remote_domain = self.bounded_remote(remote);
        self.remote
            .get_or_create(&RemoteLabels {
                domain: domain.to_owned(),
                remote_domain,
                result,
            })
            .inc();
    }

    /// `remote` itself while fewer than [`MAX_REMOTE_DOMAINS`] were seen, else `other`.
    pub fn bounded_remote(&self, remote: String) -> String {
        self.remote_domains.bounded(remote)
    }

    /// The bound on remote-domain series, for the events side to share.
    pub fn remote_domains(&self) -> RemoteDomains {
        self.remote_domains.clone()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_and_encodes() {
        let m = DeliveryMetrics::new();
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

    #[test]
    fn remote_domains_are_bounded() {
        let m = DeliveryMetrics::new();
        for i in 0..MAX_REMOTE_DOMAINS + 5 {
            m.count_remote("example.test", &format!("a@d{i}.test"), "delivered");
        }
        m.count_remote("example.test", "b@D0.TEST", "delivered");
        let get = |remote: &str| {
            m.remote
                .get_or_create(&RemoteLabels {
                    domain: "example.test".into(),
                    remote_domain: remote.into(),
                    result: "delivered",
                })
                .get()
        };
        assert_eq!(get("d0.test"), 2);
        assert_eq!(get("other"), 5);
    }
}
