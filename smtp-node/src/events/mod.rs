//! Delivery events on the node: building them from what the session and the delivery
//! workers know, and publishing them to the events stream (the contract, stream and
//! guarantee are in [`kubemail_queue::events`]).
//!
//! * [`Events::publish`]: publishes a batch and waits for the stream's acknowledgements at
//!   most `events.publishTimeout`; never fails and never blocks mail for longer. Events not
//!   confirmed in time (or refused) are counted as dropped in
//!   `kubemail_smtp_events_total{result="dropped"}`. The events of every caller waiting at
//!   the same moment (the group commits of sessions, concurrent delivery workers) go to the
//!   stream together, through the same loop as the queue's group commit
//!   ([`crate::queue::commit::gather`]). On the asynchronous stream of one replica (see
//!   [`kubemail_queue::streams::events_stream_config`]) each event is a write of its own
//!   that the server acknowledges before writing it, so none waits for an fsync. On a
//!   synchronous stream (replicated, or made by an earlier release) the group goes as one
//!   atomic batch (one write, one fsync with `sync_interval: always`) when `nats.groupCommit`
//!   is on and the group is large enough to pay for the batch's staging
//!   ([`MIN_BATCH_EVENTS`]); otherwise the events are published together with the
//!   acknowledgements awaited at once. A batch the server
//!   refuses (an event it has already, from a repeated attempt) is published again event by
//!   event; the ids make that safe.
//! * [`Batch`]: the events of one delivery attempt, collected while the worker decides and
//!   published once, just before the queue entry is acknowledged;
//! * [`inbound`]: DSNs (RFC 3464) and feedback reports (RFC 5965) arriving for our domains,
//!   turned into `bounced`/`complaint` events about the original message;
//! * [`metrics`]: events published and dropped, failures by bounce class.

pub mod attempt;
pub mod inbound;
pub mod metrics;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use kubemail_queue::StaticNames;
use kubemail_queue::events::{
    CloudEvent, EventData, EventType, RemoteInfo, TlsDetails, event_subject,
};
use tokio::sync::{mpsc, oneshot};

use crate::config::{BounceClass, EventsConfig};
use crate::delivery::classify::Classifier;
use crate::delivery::outcome::{Diagnostic, Peer};
use crate::metrics::Metrics;
use crate::queue::commit::{self, Grouped};
use crate::queue::{Direction, QueueEntry};
use crate::telemetry::propagation;

/// The node's event publisher, shared by the session and every delivery worker.
pub struct Events {
    js: jetstream::Context,
    hostname: String,
    config: EventsConfig,
    classifier: Classifier,
    stream: tokio::sync::OnceCell<()>,
    /// Whether atomic batches may be used at all (`nats.groupCommit`).
    group_commit: bool,
    /// Whether this node manages its JetStream objects (`nats.manageStreams`): it then turns
    /// on atomic batches on an events stream made by an earlier release.
    manage_streams: bool,
    /// Whether they are: allowed, and the events stream takes them (read when it is looked
    /// up).
    atomic: Arc<AtomicBool>,
    /// The publishing task's queue, started at the first publish.
    publisher: OnceLock<mpsc::Sender<Job>>,
    metrics: Arc<Metrics>,
}

/// Events waiting to go out: subject, headers and payload of each, and who waits.
struct Job {
    messages: Vec<(String, HeaderMap, Bytes)>,
    /// Events of the job (`messages` is emptied when the group is published).
    count: usize,
    bytes: usize,
    reply: oneshot::Sender<Vec<bool>>,
}

impl Grouped for Job {
    fn messages(&self) -> usize {
        self.count
    }

    fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Callers waiting for the publishing task before they wait on the channel too.
const QUEUE_DEPTH: usize = 4096;
/// Fewest events written as one atomic batch. The server stages a batch before it stores
/// it, which for a batch of a few events costs more than the fsyncs it saves: with every
/// group batched, the latency benchmark (`e2e/bench/run.sh --scenarios latency`) spent
/// about 1.5 times the server CPU per message of publishing them one by one. Large groups
/// (sessions finishing together under load) are where the shared fsync wins.
pub const MIN_BATCH_EVENTS: usize = 16;
/// Groups under way at once: small groups go out one by one, and a caller should not
/// wait behind them for long.
const MAX_IN_FLIGHT: usize = 8;

impl Events {
    /// Touches no network: the stream is created at the first publish. `group_commit`
    /// (`nats.groupCommit`) allows atomic batches: they pay where the server syncs every
    /// write, and only cost the batch's staging where it does not. `manage_streams`
    /// (`nats.manageStreams`): the node may update the stream.
    pub fn new(
        js: jetstream::Context,
        hostname: String,
        config: EventsConfig,
        group_commit: bool,
        manage_streams: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            group_commit,
            manage_streams,
            metrics,
            classifier: Classifier::new(&config.classification),
            js,
            hostname,
            config,
            stream: tokio::sync::OnceCell::new(),
            atomic: Arc::new(AtomicBool::new(false)),
            publisher: OnceLock::new(),
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
        let kinds: Vec<Option<EventType>> = events.iter().map(CloudEvent::event_type).collect();
        // The events that can go out, and where each one's result belongs.
        let mut messages = Vec::with_capacity(events.len());
        let mut at = Vec::with_capacity(events.len());
        for (i, event) in events.iter().enumerate() {
            let Some(kind) = kinds[i] else { continue };
            let Ok(payload) = serde_json::to_vec(event) else {
                continue;
            };
            let mut headers = StaticNames(HeaderMap::new());
            headers.insert(kubemail_queue::headers::NATS_MSG_ID, event.id.as_str());
            headers.insert("Content-Type", "application/cloudevents+json");
            messages.push((
                event_subject(&event.data.domain, kind),
                headers.0,
                Bytes::from(payload),
            ));
            at.push(i);
        }
        let n = messages.len();
        let work = async {
            if let Err(error) = self.ensure_stream().await {
                tracing::warn!(%error, "no events stream; events are dropped");
                return vec![false; n];
            }
            let (reply, answer) = oneshot::channel();
            let bytes = messages.iter().map(|(_, _, p)| p.len()).sum();
            let job = Job {
                messages,
                count: n,
                bytes,
                reply,
            };
            if self.publisher().send(job).await.is_err() {
                return vec![false; n];
            }
            answer.await.unwrap_or_else(|_| vec![false; n])
        };
        let sent = match tokio::time::timeout(deadline, work).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(timeout = ?deadline, "events not confirmed in time; counted as dropped");
                vec![false; n]
            }
        };
        let mut published = vec![false; events.len()];
        for (i, ok) in at.into_iter().zip(sent) {
            published[i] = ok;
        }
        for (kind, ok) in kinds.into_iter().zip(published) {
            m.count_event(kind.unwrap_or(EventType::Received), ok);
        }
    }

    /// The publishing task's queue; starts the task the first time.
    fn publisher(&self) -> &mpsc::Sender<Job> {
        self.publisher.get_or_init(|| {
            let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
            let shared = Arc::new(Publisher {
                client: self.js.client(),
                js: self.js.clone(),
                atomic: self.atomic.clone(),
                metrics: self.metrics.clone(),
            });
            tokio::spawn(commit::gather(rx, MAX_IN_FLIGHT, move |group| {
                publish_group(shared.clone(), group)
            }));
            jobs
        })
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
                let atomic = kubemail_queue::streams::ensure_events_stream(
                    &self.js,
                    config,
                    self.manage_streams,
                )
                .await
                .map_err(|e| match std::error::Error::source(&e) {
                    Some(cause) => format!("{e}: {cause}"),
                    None => e.to_string(),
                })?;
                self.atomic
                    .store(self.group_commit && atomic, Ordering::Relaxed);
                Ok::<(), String>(())
            })
            .await
            .map(|_| ())
    }
}

/// What the publishing task needs.
struct Publisher {
    client: async_nats::Client,
    js: jetstream::Context,
    atomic: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

/// Publishes the events of one group and answers each caller: one atomic batch when the
/// stream takes them and the group has at least [`MIN_BATCH_EVENTS`], else (or when the
/// batch is refused) every event on its own, all sent before any acknowledgement is awaited.
async fn publish_group(shared: Arc<Publisher>, mut group: Vec<Job>) {
    let messages: Vec<(String, HeaderMap, Bytes)> = group
        .iter_mut()
        .flat_map(|j| std::mem::take(&mut j.messages))
        .collect();
    let total = messages.len();
    let batched = total >= MIN_BATCH_EVENTS && shared.atomic.load(Ordering::Relaxed);
    let sent = if batched {
        match commit::atomic_batch(&shared.client, &shared.js, messages.clone()).await {
            Ok(()) => {
                shared.metrics.events.commit_events.observe(total as f64);
                vec![true; total]
            }
            Err(reason) => {
                tracing::debug!(%reason, events = total, "events batch not committed; publishing one by one");
                one_by_one(&shared, messages).await
            }
        }
    } else {
        one_by_one(&shared, messages).await
    };
    let mut sent = sent.into_iter();
    for job in group {
        let mine: Vec<bool> = sent.by_ref().take(job.count).collect();
        // A caller that gave up waiting has dropped its receiver.
        let _ = job.reply.send(mine);
    }
}

/// Publishes every event on its own (each is one write), all sent before any
/// acknowledgement is awaited; whether each was stored.
async fn one_by_one(shared: &Publisher, messages: Vec<(String, HeaderMap, Bytes)>) -> Vec<bool> {
    let mut pending = Vec::with_capacity(messages.len());
    for (subject, headers, payload) in messages {
        match shared
            .js
            .publish_with_headers(subject, headers, payload)
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
        let stored = match ack {
            Some(ack) => ack.await.is_ok(),
            None => false,
        };
        if stored {
            shared.metrics.events.commit_events.observe(1.0);
        }
        results.push(stored);
    }
    results
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
