//! Delivery events on the node: building them from what the session and the delivery
//! workers know, and publishing them to the events stream (the contract, stream and
//! guarantee are in [`kubemail_queue::events`]).
//!
//! * [`Events::publish`]: publishes a batch and waits for the stream's acknowledgements at
//!   most `events.publishTimeout`; never fails and never blocks mail for longer. Events not
//!   confirmed in time (or refused) are counted as dropped in
//!   `kubemail_smtp_events_total{result="dropped"}`.
//! * [`Batch`]: the events of one delivery attempt, collected while the worker decides and
//!   published once, just before the queue entry is acknowledged;
//! * [`inbound`]: DSNs (RFC 3464) and feedback reports (RFC 5965) arriving for our domains,
//!   turned into `bounced`/`complaint` events about the original message;
//! * [`metrics`]: events published and dropped, failures by bounce class.

pub mod attempt;
pub mod inbound;
pub mod metrics;

use std::sync::Arc;
use std::time::SystemTime;

use async_nats::jetstream;
use kubemail_queue::events::{
    CloudEvent, EventData, EventType, RemoteInfo, TlsDetails, event_subject,
};

use crate::config::{BounceClass, EventsConfig};
use crate::delivery::classify::Classifier;
use crate::delivery::outcome::{Diagnostic, Peer};
use crate::metrics::Metrics;
use crate::queue::{Direction, QueueEntry};
use crate::telemetry::propagation;

/// The node's event publisher, shared by the session and every delivery worker.
pub struct Events {
    js: jetstream::Context,
    hostname: String,
    config: EventsConfig,
    classifier: Classifier,
    stream: tokio::sync::OnceCell<()>,
    metrics: Arc<Metrics>,
}

impl Events {
    /// Touches no network: the stream is created at the first publish.
    pub fn new(
        js: jetstream::Context,
        hostname: String,
        config: EventsConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            metrics,
            classifier: Classifier::new(&config.classification),
            js,
            hostname,
            config,
            stream: tokio::sync::OnceCell::new(),
        }
    }

    /// The bounce classifier of this node's rules.
    pub fn classifier(&self) -> &Classifier {
        &self.classifier
    }

    /// Whether events are published at all (`events.enabled`).
    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// The node's host name (the events' `source`).
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// Publishes `events` and waits at most `events.publishTimeout` for the stream to
    /// confirm them. Counts what was published and what was dropped; never fails.
    pub async fn publish(&self, events: Vec<CloudEvent>) {
        if !self.config.enabled || events.is_empty() {
            return;
        }
        let m = &self.metrics.events;
        let deadline = self.config.publish_timeout.0;
        let kinds: Vec<EventType> = events
            .iter()
            .map(|e| e.event_type().unwrap_or(EventType::Received))
            .collect();
        let work = async {
            if let Err(error) = self.ensure_stream().await {
                tracing::warn!(%error, "no events stream; events are dropped");
                return vec![false; events.len()];
            }
            let mut pending = Vec::with_capacity(events.len());
            for event in &events {
                let Some(kind) = event.event_type() else {
                    pending.push(None);
                    continue;
                };
                let subject = event_subject(&event.data.domain, kind);
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", event.id.as_str());
                headers.insert("Content-Type", "application/cloudevents+json");
                let payload = match serde_json::to_vec(event) {
                    Ok(p) => p,
                    Err(_) => {
                        pending.push(None);
                        continue;
                    }
                };
                match self
                    .js
                    .publish_with_headers(subject, headers, payload.into())
                    .await
                {
                    Ok(ack) => pending.push(Some(ack)),
                    Err(error) => {
                        tracing::debug!(%error, "event publish failed");
                        pending.push(None);
                    }
                }
            }
            let mut results = Vec::with_capacity(pending.len());
            for ack in pending {
                results.push(match ack {
                    Some(ack) => ack.await.is_ok(),
                    None => false,
                });
            }
            results
        };
        let results = match tokio::time::timeout(deadline, work).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(timeout = ?deadline, "events not confirmed in time; counted as dropped");
                vec![false; kinds.len()]
            }
        };
        for (kind, ok) in kinds.into_iter().zip(results) {
            m.count_event(kind, ok);
        }
    }

    async fn ensure_stream(&self) -> Result<(), String> {
        self.stream
            .get_or_try_init(|| async {
                // Looked up first: with operator-managed JetStream objects the node may only
                // read the stream's info, and the operator has made it.
                let config = kubemail_queue::streams::events_stream_config(
                    1,
                    self.config.max_age.0,
                    self.config.max_bytes.0,
                );
                self.js
                    .get_or_create_stream(config)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .await
            .map(|_| ())
    }
}

/// The `data` every event of `entry` shares.
pub fn base_data(entry: &QueueEntry, recipient: &str, attempt: u32) -> EventData {
    EventData {
        domain: entry.domain.to_ascii_lowercase(),
        queue_id: entry.queue_id.as_str().to_owned(),
        message_id: entry.message_id.clone(),
        trace_id: entry
            .traceparent
            .as_deref()
            .and_then(propagation::trace_id_of)
            .map(str::to_owned),
        direction: Some(
            match entry.direction {
                Direction::Inbound => "inbound",
                Direction::Outbound => "outbound",
            }
            .to_owned(),
        ),
        sender: entry.mail_from.clone(),
        recipient: Some(recipient.to_owned()),
        attempt,
        ..EventData::default()
    }
}

/// The `received` events of an accepted entry, one per recipient.
pub fn received(hostname: &str, entry: &QueueEntry) -> Vec<CloudEvent> {
    entry
        .recipients
        .iter()
        .map(|r| {
            CloudEvent::new(
                EventType::Received,
                hostname,
                entry.accepted_at,
                base_data(entry, r, 0),
            )
        })
        .collect()
}

/// The remote part of an event.
pub fn remote_info(peer: Option<&Peer>, remote_mta: Option<&str>) -> Option<RemoteInfo> {
    match (peer, remote_mta) {
        (Some(p), _) => Some(RemoteInfo {
            mx: Some(p.host.clone()),
            ip: p.ip.map(|ip| ip.to_string()),
            tls: p.tls.as_ref().map(|t| TlsDetails {
                version: t.version.clone(),
                cipher: t.cipher.clone(),
                verified: p.verified,
            }),
        }),
        (None, Some(host)) => Some(RemoteInfo {
            mx: Some(host.to_owned()),
            ..RemoteInfo::default()
        }),
        (None, None) => None,
    }
}

/// The events of one delivery attempt of an entry, published together before the ack.
pub struct Batch<'a> {
    events: &'a Events,
    entry: &'a QueueEntry,
    now: SystemTime,
    list: Vec<CloudEvent>,
}

impl<'a> Batch<'a> {
    pub fn new(events: &'a Events, entry: &'a QueueEntry, now: SystemTime) -> Self {
        Self {
            events,
            entry,
            now,
            list: Vec::new(),
        }
    }

    /// The attempt number of these events (1 for the first attempt).
    fn attempt(&self) -> u32 {
        self.entry.attempts + 1
    }

    fn data(&self, recipient: &str) -> EventData {
        base_data(self.entry, recipient, self.attempt())
    }

    fn push(&mut self, kind: EventType, data: EventData) -> String {
        let event = CloudEvent::new(kind, &self.events.hostname, self.now, data);
        let id = event.id.clone();
        self.list.push(event);
        id
    }

    /// A recipient the remote server accepted.
    pub fn delivered(&mut self, recipient: &str, reply: &str, peer: Option<&Peer>, mx: &str) {
        let mut data = self.data(recipient);
        data.remote = remote_info(peer, Some(mx));
        data.reply = Some(reply.to_owned());
        data.status = Some("2.0.0".to_owned());
        self.push(EventType::Delivered, data);
    }

    /// A failure (`deferred`, `bounced`, `expired`) with its class; returns the event id.
    pub fn failure(
        &mut self,
        kind: EventType,
        recipient: &str,
        d: &Diagnostic,
        class: BounceClass,
        retry_at: Option<SystemTime>,
    ) -> String {
        let mut data = self.data(recipient);
        data.remote = remote_info(d.peer.as_deref(), d.remote_mta.as_deref());
        data.reply = Some(d.summary());
        data.status = Some(d.status.to_string());
        data.bounce_class = Some(class);
        data.retry_at = retry_at.map(kubemail_queue::rfc3339);
        self.push(kind, data)
    }

    /// A recipient not attempted because it is suppressed.
    pub fn suppressed(
        &mut self,
        recipient: &str,
        entry: &kubemail_queue::suppression::SuppressionEntry,
    ) {
        let mut data = self.data(recipient);
        data.bounce_class = entry.class;
        data.suppression = Some(kubemail_queue::events::SuppressionInfo {
            reason: entry.reason,
            since: entry.created_at.clone(),
            source_event: entry.source_event.clone(),
        });
        self.push(EventType::Suppressed, data);
    }

    /// A DSN we queued about `recipient` (`failure` or `delay`).
    pub fn dsn_sent(&mut self, recipient: &str, kind: &str) {
        let mut data = self.data(recipient);
        data.dsn_kind = Some(kind.to_owned());
        self.push(EventType::DsnSent, data);
    }

    /// Adds events built elsewhere (inbound reports).
    pub fn extend(&mut self, events: Vec<CloudEvent>) {
        self.list.extend(events);
    }

    /// Publishes the batch (bounded; never fails).
    pub async fn publish(self) {
        self.events.publish(self.list).await;
    }
}
