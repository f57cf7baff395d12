//! Event and classification metrics: events published and dropped by type, failures by
//! bounce class (per MailDomain, and per remote domain with the same bound as
//! [`crate::delivery::metrics`]), the suppression list's additions, hits and size.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::config::BounceClass;
use crate::delivery::metrics::RemoteDomains;
use kubemail_queue::events::EventType;

/// An event type and whether it was stored.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub r#type: &'static str,
    pub result: &'static str,
}

/// A failure: domain, result (`deferred`, `bounced`, `expired`) and class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub domain: String,
    pub result: &'static str,
    pub class: &'static str,
}

/// A failure by remote domain and class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RemoteClassLabels {
    pub domain: String,
    pub remote_domain: String,
    pub class: &'static str,
}

/// A domain and a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub domain: String,
    pub reason: &'static str,
}

/// A domain.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DomainLabels {
    pub domain: String,
}

pub struct EventMetrics {
    /// Events by type and result (`published`, `dropped`).
    pub events: Family<EventLabels, Counter>,
    /// Events per write to the events stream (an atomic batch, or one publish).
    pub commit_events: Histogram,
    /// Deferrals, bounces and expiries by class.
    pub failures: Family<ClassLabels, Counter>,
    /// Deferrals, bounces and expiries by remote domain and class.
    pub remote_failures: Family<RemoteClassLabels, Counter>,
    /// Suppression entries added, by reason.
    pub suppression_added: Family<ReasonLabels, Counter>,
    /// Recipients not attempted because they are suppressed.
    pub suppressed: Family<DomainLabels, Counter>,
    /// Entries in the domain's suppression list (sampled).
    pub suppression_entries: Family<DomainLabels, Gauge>,
    /// Inbound reports (DSN, ARF) about our messages, by format.
    pub reports: Family<ReasonLabels, Counter>,
    remote_domains: RemoteDomains,
}

impl EventMetrics {
    /// Unregistered families whose remote-domain series share `remote_domains`' bound;
    /// [`crate::metrics::Metrics::new`] registers them.
    pub fn new(remote_domains: RemoteDomains) -> Self {
        Self {
            remote_domains,
            events: Family::default(),
            // 1 .. 512 events per write.
            commit_events: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            failures: Family::default(),
            remote_failures: Family::default(),
            suppression_added: Family::default(),
            suppressed: Family::default(),
            suppression_entries: Family::default(),
            reports: Family::default(),
        }
    }

    /// Adds the metrics to the node's registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "events",
            "Delivery events by type and result (published, dropped: not confirmed by the events stream in time)",
            self.events.clone(),
        );
        registry.register(
            "events_commit_events",
            "Events per write to the events stream (the events of concurrent sessions and deliveries go as one atomic batch, one fsync)",
            self.commit_events.clone(),
        );
        registry.register(
            "delivery_failures",
            "Deferred, bounced and expired recipients by bounce class",
            self.failures.clone(),
        );
        registry.register(
            "delivery_remote_failures",
            "Deferred, bounced and expired recipients by recipient domain (bounded; later domains count as other) and bounce class",
            self.remote_failures.clone(),
        );
        registry.register(
            "suppression_added",
            "Suppression list entries added automatically, by reason (bounce, complaint)",
            self.suppression_added.clone(),
        );
        registry.register(
            "suppressed_recipients",
            "Recipients not attempted because they are on the domain's suppression list",
            self.suppressed.clone(),
        );
        registry.register(
            "suppression_entries",
            "Entries in the domain's suppression list (sampled)",
            self.suppression_entries.clone(),
        );
        registry.register(
            "inbound_reports",
            "DSNs and feedback reports received about our messages, by format",
            self.reports.clone(),
        );
    }

    /// Creates `domain`'s series at zero, so rates and alerts have them from the start.
    pub fn init_domain(&self, domain: &str) {
        for result in ["deferred", "bounced", "expired"] {
            for class in BounceClass::ALL {
                let _ = self.failures.get_or_create(&ClassLabels {
                    domain: domain.to_owned(),
                    result,
                    class: class.as_str(),
                });
            }
        }
        let _ = self.suppressed.get_or_create(&DomainLabels {
            domain: domain.to_owned(),
        });
    }

    pub fn count_event(&self, kind: EventType, published: bool) {
        self.events
            .get_or_create(&EventLabels {
                r#type: kind.as_str(),
                result: if published { "published" } else { "dropped" },
            })
            .inc();
    }

    /// Counts one failed recipient by class, per domain and per (bounded) remote domain.
    pub fn count_failure(
        &self,
        domain: &str,
        recipient: &str,
        result: &'static str,
        class: BounceClass,
    ) {
        self.failures
            .get_or_create(&ClassLabels {
                domain: domain.to_owned(),
                result,
                class: class.as_str(),
            })
            .inc();
        let remote = recipient
            .rsplit_once('@')
            .map_or("", |(_, d)| d)
            .to_ascii_lowercase();
        self.remote_failures
            .get_or_create(&RemoteClassLabels {
                domain: domain.to_owned(),
                remote_domain: self.remote_domains.bounded(remote),
                class: class.as_str(),
            })
            .inc();
    }
}
