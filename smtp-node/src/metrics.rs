//! Prometheus metrics of the SMTP node, served as text on `/metrics` by [`crate::admin`].
//!
//! One [`Metrics`] with one [`Registry`] is built at start-up ([`Metrics::new`], in `main`)
//! and handed to the parts that count: the sessions through their
//! [`crate::context::ServerContext`], the queue, delivery, events and the admin endpoint
//! through their constructors. The delivery and events sides register their own families
//! ([`crate::delivery::metrics`], [`crate::events::metrics`]) into the same registry. Every
//! test builds its own, so no two tests share counts. Label values are small closed sets
//! (listener names from the config, reply classes, fixed reasons), never addresses or user
//! input.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels naming a listener.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

/// Labels naming a listener and a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub listener: String,
    pub reason: &'static str,
}

/// Labels for SMTP replies.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplyLabels {
    pub listener: String,
    /// `2xx`, `3xx`, `4xx` or `5xx`.
    pub class: &'static str,
}

/// Labels for an outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Labels of a TLS handshake.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    /// `server` (clients connecting to us) or `client` (our deliveries).
    pub side: &'static str,
    /// The negotiated version (`TLSv1.3`, `TLSv1.2`), `none` when the handshake failed.
    pub version: String,
    /// `ok` or `failed`.
    pub result: &'static str,
}

/// Labels of a DKIM signature.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DkimLabels {
    /// The signing domain (one of ours).
    pub domain: String,
    /// `rsa-sha256` or `ed25519-sha256`.
    pub algorithm: &'static str,
    /// `signed` or `failed`.
    pub result: &'static str,
}

/// A MailDomain (from the config).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DomainLabels {
    pub domain: String,
}

/// Every metric the node exports.
pub struct Metrics {
    registry: Registry,
    pub connections: Family<ListenerLabels, Counter>,
    pub connections_refused: Family<ReasonLabels, Counter>,
    pub sessions_active: Family<ListenerLabels, Gauge>,
    pub replies: Family<ReplyLabels, Counter>,
    pub messages_accepted: Family<ListenerLabels, Counter>,
    pub messages_rejected: Family<ReasonLabels, Counter>,
    pub message_bytes: Counter,
    /// Messages whose body started going to the object store while it arrived (refused ones
    /// too; see `session::spill`).
    pub message_bodies_streamed: Counter,
    pub auth: Family<ResultLabels, Counter>,
    /// Calls to the cluster-wide per-user AUTH failure count ([`crate::auth_limits`]) that
    /// failed; while it fails each node limits only the failures it saw itself.
    pub auth_shared_counter_errors: Counter,
    /// RCPT-time recipient checks of catch-all domains ([`crate::recipient_check`]).
    pub recipient_checks: Family<ResultLabels, Counter>,
    pub queue_publish: Family<ResultLabels, Counter>,
    pub queue_publish_seconds: Histogram,
    /// Messages per JetStream commit (an atomic batch, or one publish).
    pub queue_commit_messages: Histogram,
    /// Body objects deleted because no queue entry refers to them (a failed or duplicate
    /// publish, or found by the sweeper).
    pub queue_orphan_bodies_deleted: Counter,
    /// Message bytes held in memory now ([`crate::memory`]).
    pub message_memory_bytes: Gauge,
    pub nats_connected: Gauge,
    pub tls_reload_failures: Counter,
    /// Changed config files applied ([`crate::reload`]).
    pub config_reloads: Counter,
    /// Changed config files refused (the previous config stays).
    pub config_reload_failures: Counter,
    pub tls_handshakes: Family<TlsLabels, Counter>,
    pub dkim_signatures: Family<DkimLabels, Counter>,
    /// Entries in the queue per domain, sampled from JetStream ([`crate::queue::sampler`]).
    pub queue_messages: Family<DomainLabels, Gauge>,
    /// Age (since first acceptance) of the entry at the head of each domain's queue.
    pub queue_oldest_age_seconds: Family<DomainLabels, Gauge>,
    /// Spans exported and dropped by the OTLP exporter ([`crate::telemetry::export`]).
    pub otel: crate::telemetry::ExportMetrics,
    /// The delivery side's families.
    pub delivery: crate::delivery::metrics::DeliveryMetrics,
    /// Delivery events, bounce classes and suppression.
    pub events: crate::events::metrics::EventMetrics,
}

impl Metrics {
    /// Every metric of the node, registered in one new registry.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("kubemail_smtp");
        let delivery = crate::delivery::metrics::DeliveryMetrics::new();
        // Both sides count by remote domain within one bound.
        let events = crate::events::metrics::EventMetrics::new(delivery.remote_domains());
        let m = Self {
            connections: Family::default(),
            connections_refused: Family::default(),
            sessions_active: Family::default(),
            replies: Family::default(),
            messages_accepted: Family::default(),
            messages_rejected: Family::default(),
            message_bytes: Counter::default(),
            message_bodies_streamed: Counter::default(),
            auth: Family::default(),
            auth_shared_counter_errors: Counter::default(),
            recipient_checks: Family::default(),
            queue_publish: Family::default(),
            // 1 ms .. ~16 s: a publish on loopback takes about a millisecond, a timeout many seconds.
            queue_publish_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            // 1 .. 512 messages per commit.
            queue_commit_messages: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            queue_orphan_bodies_deleted: Counter::default(),
            message_memory_bytes: Gauge::default(),
            nats_connected: Gauge::default(),
            tls_reload_failures: Counter::default(),
            config_reloads: Counter::default(),
            config_reload_failures: Counter::default(),
            tls_handshakes: Family::default(),
            dkim_signatures: Family::default(),
            queue_messages: Family::default(),
            queue_oldest_age_seconds: Family::default(),
            otel: crate::telemetry::ExportMetrics::default(),
            delivery,
            events,
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "SMTP connections accepted",
            m.connections.clone(),
        );
        registry.register(
            "connections_refused",
            "SMTP connections refused at connect (limits, shutdown, PROXY errors, untrusted PROXY peers)",
            m.connections_refused.clone(),
        );
        registry.register(
            "sessions_active",
            "SMTP sessions in progress",
            m.sessions_active.clone(),
        );
        registry.register("replies", "SMTP replies sent by class", m.replies.clone());
        registry.register(
            "messages_accepted",
            "Messages queued and answered with 250",
            m.messages_accepted.clone(),
        );
        registry.register(
            "messages_rejected",
            "Transactions refused at end of data, by reason",
            m.messages_rejected.clone(),
        );
        registry.register(
            "message_bytes",
            "Bytes of accepted messages",
            m.message_bytes.clone(),
        );
        registry.register(
            "message_bodies_streamed",
            "Messages whose body started going to the object store while it arrived",
            m.message_bodies_streamed.clone(),
        );
        registry.register("auth", "AUTH attempts by result", m.auth.clone());
        registry.register(
            "auth_shared_counter_errors",
            "Failed calls to the cluster-wide per-user AUTH failure count in JetStream",
            m.auth_shared_counter_errors.clone(),
        );
        registry.register(
            "recipient_checks",
            "RCPT-time recipient checks against catch-all domains' inbound targets, by result (exists, unknown, try_later, cached_exists, cached_unknown)",
            m.recipient_checks.clone(),
        );
        registry.register(
            "queue_publish",
            "JetStream publishes by result",
            m.queue_publish.clone(),
        );
        registry.register(
            "queue_publish_seconds",
            "Time from end of data to JetStream acknowledgement",
            m.queue_publish_seconds.clone(),
        );
        registry.register(
            "queue_commit_messages",
            "Messages per JetStream commit (group commit: one atomic batch, one fsync)",
            m.queue_commit_messages.clone(),
        );
        registry.register(
            "queue_orphan_bodies_deleted",
            "Body objects deleted because no queue entry refers to them",
            m.queue_orphan_bodies_deleted.clone(),
        );
        registry.register(
            "message_memory_bytes",
            "Message bytes held in memory by sessions and the publisher (limits.messageBytesInMemory)",
            m.message_memory_bytes.clone(),
        );
        registry.register(
            "nats_connected",
            "1 when the NATS connection is up",
            m.nats_connected.clone(),
        );
        registry.register(
            "tls_reload_failures",
            "Certificate changes that could not be loaded",
            m.tls_reload_failures.clone(),
        );
        registry.register(
            "config_reloads",
            "Changed config files applied without a restart",
            m.config_reloads.clone(),
        );
        registry.register(
            "config_reload_failures",
            "Changed config files that could not be applied (the previous config stays)",
            m.config_reload_failures.clone(),
        );
        registry.register(
            "tls_handshakes",
            "TLS handshakes by side (server, client), negotiated version and result",
            m.tls_handshakes.clone(),
        );
        registry.register(
            "dkim_signatures",
            "DKIM signatures made, by signing domain, algorithm and result",
            m.dkim_signatures.clone(),
        );
        registry.register(
            "queue_messages",
            "Queue entries waiting per domain (sampled from JetStream)",
            m.queue_messages.clone(),
        );
        registry.register(
            "queue_oldest_message_age_seconds",
            "Seconds since the entry at the head of the domain's queue was first accepted (sampled)",
            m.queue_oldest_age_seconds.clone(),
        );
        m.otel.register(&mut registry);
        m.delivery.register(&mut registry);
        m.events.register(&mut registry);
        Arc::new(Self { registry, ..m })
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a TLS handshake; `version` is `None` when it failed.
    pub fn tls_handshake(&self, side: &'static str, version: Option<&str>) {
        count_tls_handshake(&self.tls_handshakes, side, version);
    }

    /// Counts a reply by its class.
    pub fn reply(&self, listener: &str, code: u16) {
        let class = match code / 100 {
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        };
        self.replies
            .get_or_create(&ReplyLabels {
                listener: listener.to_owned(),
                class,
            })
            .inc();
    }
}

/// Counts a TLS handshake of `side` in `family`; `version` is `None` when it failed.
pub fn count_tls_handshake(
    family: &Family<TlsLabels, Counter>,
    side: &'static str,
    version: Option<&str>,
) {
    family
        .get_or_create(&TlsLabels {
            side,
            version: version.unwrap_or("none").to_owned(),
            result: if version.is_some() { "ok" } else { "failed" },
        })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_registered_metrics() {
        let m = Metrics::new();
        m.reply("mx", 250);
        m.auth
            .get_or_create(&ResultLabels { result: "success" })
            .inc();
        let text = m.encode();
        assert!(
            text.contains("kubemail_smtp_replies_total{listener=\"mx\",class=\"2xx\"}"),
            "{text}"
        );
        assert!(text.contains("kubemail_smtp_auth_total"), "{text}");
        assert!(text.contains("# EOF"), "{text}");
    }
}
