//! Prometheus metrics of the operator (prometheus-client, OpenMetrics text on `/metrics`):
//! reconcile runs, failures by error kind, reconcile durations, whether this replica leads, the
//! ready SMTP node pods of each MailDomain (for a "no ready nodes" alert) and the trace spans
//! the OTLP exporter sent or dropped, and the DNS records of each MailDomain not published as
//! computed.
//!
//! ```text
//! kubemail_operator_reconciles_total{controller="maildomain"}
//! kubemail_operator_reconcile_errors_total{controller="maildomain",error="apply_child"}
//! kubemail_operator_reconcile_duration_seconds_bucket{controller="maildomain",le="..."}
//! kubemail_operator_leader
//! kubemail_operator_maildomain_ready_replicas{maildomain_namespace="mail",maildomain="example-com"}
//! kubemail_operator_otel_spans_dropped_total{reason="export_failed"}
//! kubemail_operator_maildomain_dns_records_not_as_expected{maildomain_namespace="mail",maildomain="example-com"}
//! kubemail_operator_maildomain_certificate_expiry_timestamp_seconds{maildomain_namespace="mail",maildomain="example-com"}
//! kubemail_operator_orphan_bodies_deleted_total
//! ```
//!
//!
//! The certificate expiry gauge is the serving certificate's notAfter, for an expiry alert
//! that does not depend on who issues the certificate (the operator's CA or cert-manager).

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::timestamps::UnixSeconds;

/// Labels of per-controller metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

/// Labels naming a MailDomain. Not `namespace`: Prometheus gives the scraped pod's namespace
/// that name, and would rename ours to `exported_namespace`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DomainLabels {
    pub maildomain_namespace: String,
    pub maildomain: String,
}

/// Labels of the failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: String,
    pub error: String,
}

type HistogramFamily = Family<ControllerLabels, Histogram, fn() -> Histogram>;

/// Every metric of the operator and the registry that serves them.
pub struct Metrics {
    registry: Registry,
    certificate_expiry: Family<DomainLabels, Gauge>,
    reconciles: Family<ControllerLabels, Counter>,
    failures: Family<ErrorLabels, Counter>,
    duration: HistogramFamily,
    leader: Gauge,
    ready_replicas: Family<DomainLabels, Gauge>,
    dns_not_as_expected: Family<DomainLabels, Gauge>,
    orphan_bodies_deleted: Counter,
}

/// Observes one reconcile's duration when dropped.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

// 5 ms to about 40 s in 12 doublings: a reconcile is a handful of API calls, or a few seconds
// when an RSA key is generated.
fn reconcile_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kubemail_operator");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let duration: HistogramFamily =
            Family::new_with_constructor(reconcile_histogram as fn() -> Histogram);
        let leader = Gauge::default();
        let ready_replicas = Family::<DomainLabels, Gauge>::default();
        registry.register("reconciles", "Reconcile runs", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by controller and error kind",
            failures.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Time spent in one reconcile",
            Unit::Seconds,
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease and runs the controllers",
            leader.clone(),
        );
        registry.register(
            "maildomain_ready_replicas",
            "Ready SMTP node pods of each MailDomain, as last reconciled (leader only)",
            ready_replicas.clone(),
        );
        crate::telemetry::export_metrics().register(&mut registry);
        let certificate_expiry = Family::<DomainLabels, Gauge>::default();
        registry.register_with_unit(
            "maildomain_certificate_expiry_timestamp",
            "End of validity (notAfter) of each MailDomain's serving certificate, in seconds since the epoch (leader only)",
            Unit::Seconds,
            certificate_expiry.clone(),
        );
        let dns_not_as_expected = Family::<DomainLabels, Gauge>::default();
        registry.register(
            "maildomain_dns_records_not_as_expected",
            "DNS records of each MailDomain that the last DNS check found missing, drifted, conflicting or unresolvable (leader only)",
            dns_not_as_expected.clone(),
        );
        let orphan_bodies_deleted = Counter::default();
        registry.register(
            "orphan_bodies_deleted",
            "Body objects no queue entry referred to, deleted by the operator's sweep (leader only)",
            orphan_bodies_deleted.clone(),
        );
        Self {
            registry,
            orphan_bodies_deleted,
            certificate_expiry,
            reconciles,
            failures,
            duration,
            leader,
            ready_replicas,
            dns_not_as_expected,
        }
    }

    /// Counts body objects the sweep deleted.
    pub fn orphan_bodies_deleted(&self, deleted: usize) {
        self.orphan_bodies_deleted.inc_by(deleted as u64);
    }

    /// Counts a reconcile and returns the timer that measures it.
    pub fn reconcile_started(&self, controller: &str) -> ReconcileTimer {
        let labels = ControllerLabels {
            controller: controller.to_owned(),
        };
        self.reconciles.get_or_create(&labels).inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.duration.get_or_create(&labels).clone(),
        }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, controller: &str, error: &str) {
        self.failures
            .get_or_create(&ErrorLabels {
                controller: controller.to_owned(),
                error: error.to_owned(),
            })
            .inc();
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Records the ready node pods of a MailDomain whose nodes (its own, or its pool's) are
    /// meant to run `wanted` replicas. A domain scaled to zero on purpose has no series, so
    /// "no ready nodes" never alerts for it, with or without kube-state-metrics.
    pub fn set_ready_replicas(&self, namespace: &str, maildomain: &str, ready: i32, wanted: i32) {
        let labels = DomainLabels {
            maildomain_namespace: namespace.to_owned(),
            maildomain: maildomain.to_owned(),
        };
        if wanted == 0 {
            self.ready_replicas.remove(&labels);
        } else {
            self.ready_replicas
                .get_or_create(&labels)
                .set(i64::from(ready));
        }
    }

    /// Records when the serving certificate of a MailDomain expires; `None` (not known yet,
    /// e.g. cert-manager has not issued it) drops the series.
    pub fn set_certificate_expiry(
        &self,
        namespace: &str,
        maildomain: &str,
        not_after: Option<UnixSeconds>,
    ) {
        let labels = DomainLabels {
            maildomain_namespace: namespace.to_owned(),
            maildomain: maildomain.to_owned(),
        };
        match not_after {
            Some(t) => {
                self.certificate_expiry.get_or_create(&labels).set(t);
            }
            None => {
                self.certificate_expiry.remove(&labels);
            }
        }
    }

    /// Drops the series of a deleted MailDomain.
    pub fn forget_domain(&self, namespace: &str, maildomain: &str) {
        let labels = DomainLabels {
            maildomain_namespace: namespace.to_owned(),
            maildomain: maildomain.to_owned(),
        };
        self.ready_replicas.remove(&labels);
        self.dns_not_as_expected.remove(&labels);
        self.certificate_expiry.remove(&labels);
    }

    /// Records how many DNS records of a MailDomain the last check found not as expected.
    pub fn set_dns_not_as_expected(&self, namespace: &str, maildomain: &str, records: usize) {
        self.dns_not_as_expected
            .get_or_create(&DomainLabels {
                maildomain_namespace: namespace.to_owned(),
                maildomain: maildomain.to_owned(),
            })
            .set(i64::try_from(records).unwrap_or(i64::MAX));
    }

    /// OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counts_durations_and_leadership() {
        let m = Metrics::new();
        drop(m.reconcile_started("maildomain"));
        m.reconcile_failed("maildomain", "apply_child");
        m.set_leader(true);
        let text = m.encode();
        assert!(
            text.contains("kubemail_operator_reconciles_total{controller=\"maildomain\"} 1"),
            "{text}"
        );
        assert!(text.contains("kubemail_operator_reconcile_errors_total{controller=\"maildomain\",error=\"apply_child\"} 1"), "{text}");
        assert!(
            text.contains(
                "kubemail_operator_reconcile_duration_seconds_count{controller=\"maildomain\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("kubemail_operator_leader 1"), "{text}");
        m.set_ready_replicas("mail", "example-com", 2, 3);
        m.set_ready_replicas("mail", "parked", 0, 3);
        m.set_ready_replicas("mail", "parked", 0, 0);
        let text = m.encode();
        assert!(
            text.contains("kubemail_operator_maildomain_ready_replicas{maildomain_namespace=\"mail\",maildomain=\"example-com\"} 2"),
            "{text}"
        );
        // Scaled to zero after it had nodes: the series goes, so no alert waits on it.
        assert!(!text.contains("maildomain=\"parked\""), "{text}");
        assert!(
            text.contains("kubemail_operator_otel_spans_dropped_total"),
            "{text}"
        );
        m.set_dns_not_as_expected("mail", "example-com", 3);
        assert!(
            m.encode().contains("kubemail_operator_maildomain_dns_records_not_as_expected{maildomain_namespace=\"mail\",maildomain=\"example-com\"} 3"),
            "{}",
            m.encode()
        );
        m.forget_domain("mail", "example-com");
        assert!(!m.encode().contains("maildomain=\"example-com\""));
    }

    /// The gauge carries the notAfter of the certificate in the domain's TLS Secret, as
    /// cert-manager or the operator's CA wrote it, and goes with the domain.
    #[test]
    fn certificate_expiry_is_the_served_certificates_not_after() {
        use std::collections::BTreeMap;
        use std::time::Duration;

        use k8s_openapi::ByteString;
        use k8s_openapi::api::core::v1::Secret;

        use crate::certs::{self, TLS_CERT_KEY};
        use crate::controller::mail_domain::provision::TlsMaterial;

        const NOW: i64 = 1_800_000_000;
        let ca = certs::new_ca(NOW).unwrap();
        let leaf =
            certs::issue_leaf(&ca, "mx.example.com", NOW, Duration::from_secs(90 * 86400)).unwrap();
        let expected = NOW + 90 * 86400;
        assert_eq!(leaf.not_after, expected);
        // cert-manager's Secret: the leaf followed by its issuer, as cert-manager writes it.
        let secret = Secret {
            data: Some(BTreeMap::from([(
                TLS_CERT_KEY.to_owned(),
                ByteString(format!("{}{}", leaf.cert_pem, ca.cert_pem).into_bytes()),
            )])),
            ..Default::default()
        };
        let cert_manager = TlsMaterial::CertManager {
            ready: true,
            reason: "Ready".into(),
            message: String::new(),
            not_after: None,
        };
        assert_eq!(cert_manager.not_after(Some(&secret)), Some(expected));
        assert_eq!(cert_manager.not_after(None), None, "not issued yet");
        let operator_ca = TlsMaterial::OperatorCa {
            leaf,
            ca_cert_pem: ca.cert_pem.clone(),
            issued: None,
        };
        assert_eq!(operator_ca.not_after(None), Some(expected));

        let m = Metrics::new();
        m.set_certificate_expiry("mail", "example-com", cert_manager.not_after(Some(&secret)));
        let text = m.encode();
        assert!(
            text.contains(&format!(
                "kubemail_operator_maildomain_certificate_expiry_timestamp_seconds{{maildomain_namespace=\"mail\",maildomain=\"example-com\"}} {expected}"
            )),
            "{text}"
        );
        assert!(
            text.contains(
                "# TYPE kubemail_operator_maildomain_certificate_expiry_timestamp_seconds gauge"
            ),
            "{text}"
        );
        assert_eq!(text.matches("# EOF").count(), 1, "one exposition: {text}");
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
        // A certificate that is not known (any more) leaves no stale series.
        m.set_certificate_expiry("mail", "example-com", None);
        assert!(
            !m.encode()
                .contains("kubemail_operator_maildomain_certificate_expiry_timestamp_seconds{")
        );
        m.set_certificate_expiry("mail", "example-com", Some(expected));
        m.forget_domain("mail", "example-com");
        assert!(
            !m.encode()
                .contains("kubemail_operator_maildomain_certificate_expiry_timestamp_seconds{")
        );
    }
}
