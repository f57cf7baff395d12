//! The real [`Queue`]: NATS JetStream through async-nats.
//!
//! The node starts even while NATS is down (a liveness probe must not restart pods because
//! the queue is away): the client keeps reconnecting in the background, a setup task creates
//! or checks the stream and the body bucket once connected, and until both are done
//! `/readyz` fails and every DATA gets `451 4.3.0`. A publish is only attempted while the
//! connection is up; otherwise the client would buffer it and send it after a reconnect, long
//! after the client was told `451` (a certain duplicate when it retries).
//!
//! A body past the inline limit that the session stored while it arrived
//! ([`Queue::upload`]) comes with its object already written; the entry carries the header
//! section in front of it. An enqueue stores other large bodies in the object store first (in
//! the session's task), then hands its entries to the [`commit`](super::commit) task, which
//! publishes them with the entries of other sessions in one atomic batch. Body objects that
//! no entry refers to are removed: at once when the entry is known not to be stored (an
//! error answer, or never sent, and no earlier batch of it went unanswered); otherwise (a
//! timeout, a crash, an entry the stream already had) by the [`sweeper`](super::sweeper),
//! which looks at the entries. An object whose entry is stored is marked so (its
//! description), so the sweeper need not look for it. Once [`JetStreamQueue::attach_events`] was called, the committer publishes the
//! `received` events of every group it stored before the sessions answer `250`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::object_store::ObjectStore;
use async_nats::jetstream::{self, ErrorCode};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::commit::{Committer, Outgoing, Stored};
use super::setup::StreamSetup;
use super::stream::{check_consumer, ensure_body_bucket, ensure_queue_stream, open_body_bucket};
use super::upload::BodyUpload;
use super::{EnqueueError, Queue, QueuedMessage, sweeper};
use crate::config::NatsConfig;
use crate::metrics::{Metrics, ResultLabels};

/// Room left for NATS headers (envelope with up to a few hundred recipients) when deciding
/// whether a body fits into one message of the server's `max_payload`.
const HEADER_HEADROOM: usize = 64 * 1024;

/// JetStream error codes that mean "no room": the client should try again later (452 4.3.1).
const FULL_CODES: [ErrorCode; 5] = [
    ErrorCode::STREAM_STORE_FAILED,
    ErrorCode::STORAGE_RESOURCES_EXCEEDED,
    ErrorCode::INSUFFICIENT_RESOURCES,
    ErrorCode::ACCOUNT_RESOURCES_EXCEEDED,
    ErrorCode::MEMORY_RESOURCES_EXCEEDED,
];

/// Why the NATS client could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot set up the NATS connection")]
    Options(#[from] super::connect::OptionsError),
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
}

/// The longest pause between attempts to set up an added domain's body bucket.
const DOMAIN_SETUP_RETRY_MAX: Duration = Duration::from_secs(10);

/// The JetStream-backed queue.
pub struct JetStreamQueue {
    client: async_nats::Client,
    js: jetstream::Context,
    nats: NatsConfig,
    /// The domains this node serves (lower case): one body bucket each. A config reload
    /// replaces the list ([`JetStreamQueue::set_domains`]).
    domains: RwLock<Vec<String>>,
    bodies: RwLock<HashMap<String, ObjectStore>>,
    setup: Arc<StreamSetup>,
    /// Whether the stream takes atomic batches (known after set-up).
    atomic: Arc<AtomicBool>,
    committer: Committer,
    /// Publishes the `received` events of accepted messages (set once at start-up; read by
    /// the committer).
    events: Arc<OnceLock<Arc<crate::events::Events>>>,
    metrics: Arc<Metrics>,
}

impl JetStreamQueue {
    /// Creates the client. Returns at once; the connection is made (and re-made) in the
    /// background. Call [`JetStreamQueue::run_setup`] to create the stream.
    pub async fn connect(
        nats: &NatsConfig,
        domains: &[String],
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, ConnectError> {
        let connected = metrics.nats_connected.clone();
        let client = super::connect::options(nats, "kubemail-smtp-node")?
            .retry_on_initial_connect()
            .event_callback(move |event| {
                let connected = connected.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            connected.set(1);
                            tracing::info!("connected to NATS");
                        }
                        async_nats::Event::Disconnected => {
                            connected.set(0);
                            tracing::warn!("disconnected from NATS");
                        }
                        other => tracing::info!(event = %other, "NATS event"),
                    }
                }
            })
            // `nats.url` may list several servers ("nats://a:4222,nats://b:4222"); the client
            // parses a plain string as one URL, so hand it the list.
            .connect(
                nats.url
                    .split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .collect::<Vec<_>>(),
            )
            .await
            .map_err(|source| ConnectError::Connect {
                url: nats.url.clone(),
                source,
            })?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(nats.publish_timeout.0);
        let setup = Arc::new(StreamSetup::new());
        let atomic = Arc::new(AtomicBool::new(false));
        let events = Arc::new(OnceLock::new());
        let committer = Committer::start(
            client.clone(),
            js.clone(),
            atomic.clone(),
            events.clone(),
            metrics.clone(),
        );
        Ok(Arc::new(Self {
            client,
            js,
            nats: nats.clone(),
            domains: RwLock::new(domains.iter().map(|d| d.to_ascii_lowercase()).collect()),
            bodies: RwLock::new(HashMap::new()),
            setup,
            atomic,
            committer,
            events,
            metrics,
        }))
    }

    /// Creates or checks the stream and the body bucket, retrying until it works or `cancel`
    /// fires. An incompatible existing stream is logged and retried (an operator can fix it
    /// without restarting the node).
    ///
    /// Runs until `cancel`: when a publish finds no stream (a NATS server that lost its
    /// store), the setup is done again.
    pub async fn run_setup(self: Arc<Self>, cancel: CancellationToken) {
        self.setup
            .run(
                &self.client,
                &cancel,
                || self.setup_once(),
                || tracing::info!(stream = %self.nats.stream, buckets = %self.nats.body_bucket, managed = self.nats.manage_streams, "queue ready"),
                |error| tracing::error!(%error, "queue setup failed; retrying"),
            )
            .await;
    }

    /// With `nats.manageStreams`, creates or updates the stream and every domain's body
    /// bucket; without, only opens what the operator made, so the node is not ready (and
    /// answers `451`) until the objects exist.
    async fn setup_once(&self) -> Result<(), super::stream::SetupError> {
        let atomic = if self.nats.manage_streams {
            let atomic = ensure_queue_stream(&self.js, &self.nats).await?;
            if !atomic && self.nats.group_commit {
                tracing::warn!(stream = %self.nats.stream, "the stream takes no atomic batches (nats-server before 2.12?): every message is its own write");
            }
            atomic
        } else {
            // The operator creates the stream with `allow_atomic`; should the server refuse a
            // batch after all, the committer publishes the group message by message.
            true
        };
        self.atomic
            .store(atomic && self.nats.group_commit, Ordering::Relaxed);
        let mut bodies = HashMap::new();
        for domain in self.domains() {
            let bucket = self.domain_bucket(&domain).await?;
            bodies.insert(domain, bucket);
        }
        *self.bodies.write().unwrap_or_else(|e| e.into_inner()) = bodies;
        Ok(())
    }

    /// `domain`'s body bucket: created (or updated) with `nats.manageStreams`, else opened
    /// after checking that the operator made the domain's consumer.
    async fn domain_bucket(&self, domain: &str) -> Result<ObjectStore, super::stream::SetupError> {
        if self.nats.manage_streams {
            ensure_body_bucket(&self.js, &self.nats, domain).await
        } else {
            check_consumer(&self.js, &self.nats, domain).await?;
            open_body_bucket(&self.js, &self.nats, domain).await
        }
    }

    /// The domains this node serves now (lower case).
    fn domains(&self) -> Vec<String> {
        self.domains
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The node's domains changed (a config reload): removed domains' buckets are let go, and
    /// added domains' buckets are set up in the background, retried (with a growing pause, at
    /// most [`DOMAIN_SETUP_RETRY_MAX`]) until they work or `cancel` fires: their objects may
    /// not exist yet, or the node's credentials may not cover them until the next
    /// reconnection. Mail for an added domain is refused with a temporary error until then;
    /// the other domains are not touched.
    pub fn set_domains(self: &Arc<Self>, domains: &[String], cancel: CancellationToken) {
        let wanted: Vec<String> = domains.iter().map(|d| d.to_ascii_lowercase()).collect();
        let added: Vec<String> = {
            let mut current = self.domains.write().unwrap_or_else(|e| e.into_inner());
            let added = wanted
                .iter()
                .filter(|d| !current.contains(d))
                .cloned()
                .collect();
            *current = wanted.clone();
            added
        };
        self.bodies
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|domain, _| wanted.contains(domain));
        for domain in added {
            let queue = self.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let mut pause =
                    crate::backoff::delays(Duration::from_millis(200), DOMAIN_SETUP_RETRY_MAX);
                loop {
                    // Detached again before it was set up: nothing to do.
                    if !queue.domains().contains(&domain) {
                        return;
                    }
                    match queue.domain_bucket(&domain).await {
                        Ok(bucket) => {
                            if queue.domains().contains(&domain) {
                                queue
                                    .bodies
                                    .write()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .insert(domain.clone(), bucket);
                                tracing::info!(%domain, "body bucket of an added domain ready");
                            }
                            return;
                        }
                        Err(error) => {
                            tracing::warn!(%domain, %error, "cannot set up an added domain's body bucket; retrying");
                        }
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(pause.next_delay()) => {}
                    }
                }
            });
        }
    }

    /// Removes body objects no entry refers to, every `interval`, until `cancel`. Only with
    /// `nats.manageStreams`: reading the entries needs more than a node's own credentials, so
    /// with the operator's credentials the operator sweeps (`operator/src/nats/sweep.rs`).
    pub async fn run_sweeper(self: Arc<Self>, interval: Duration, cancel: CancellationToken) {
        if !self.nats.manage_streams {
            return;
        }
        sweeper::run(
            &self.js,
            &self.nats,
            || self.all_bodies(),
            interval,
            &cancel,
            &self.metrics.queue_orphan_bodies_deleted,
        )
        .await;
    }

    /// Every set-up body bucket, by domain.
    fn all_bodies(&self) -> Vec<(String, ObjectStore)> {
        self.bodies
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(domain, store)| (domain.clone(), store.clone()))
            .collect()
    }

    /// `domain`'s body bucket, once set up.
    fn bodies_of(&self, domain: &str) -> Option<ObjectStore> {
        self.bodies
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&domain.to_ascii_lowercase())
            .cloned()
    }

    /// The NATS client (for tests and the delivery side).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context (for the queue metrics sampler).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Publishes a `received` event per recipient of every accepted entry from now on.
    pub fn attach_events(&self, events: Arc<crate::events::Events>) {
        let _ = self.events.set(events);
    }

    /// Largest body published inline; larger ones go to the object store.
    fn inline_limit(&self) -> usize {
        let server = self
            .client
            .server_info()
            .max_payload
            .saturating_sub(HEADER_HEADROOM);
        let configured = usize::try_from(self.nats.inline_body_limit.0).unwrap_or(usize::MAX);
        configured.min(server)
    }

    /// The NATS message of one entry; a large body goes to the object store first (its
    /// object name is returned with the message).
    async fn prepare(
        &self,
        message: QueuedMessage,
    ) -> Result<(Outgoing, Option<(String, String)>), EnqueueError> {
        let QueuedMessage {
            mut entry,
            body,
            msg_id,
        } = message;
        let stored = entry
            .body_ref
            .as_deref()
            .and_then(kubemail_queue::split_body_ref)
            .map(|(_, object)| object.to_owned());
        let (payload, object) = if let Some(object) = stored {
            // Stored while it arrived: the entry carries the part in front of the object.
            (body, Some((entry.domain.clone(), object)))
        } else if body.len() > self.inline_limit() {
            entry.body_size = Some(body.len() as u64);
            let store = self.bodies_of(&entry.domain).ok_or_else(|| {
                EnqueueError::Unavailable(format!("body bucket of {} not set up", entry.domain))
            })?;
            let object = entry.body_object_name();
            let mut reader: &[u8] = &body;
            store
                .put(object.as_str(), &mut reader)
                .await
                .map_err(|e| classify(&e, "store body"))?;
            entry.body_ref = Some(kubemail_queue::body_ref(
                &kubemail_queue::body_bucket(&self.nats.body_bucket, &entry.domain),
                &object,
            ));
            (bytes::Bytes::new(), Some((entry.domain.clone(), object)))
        } else {
            entry.body_size = Some(body.len() as u64);
            (body, None)
        };
        let subject = kubemail_queue::subject(&self.nats.subject_prefix, &entry.domain);
        Ok((Outgoing::new(subject, entry, msg_id, payload), object))
    }

    /// Publishes the entries of one transaction; `Ok` once every one is stored.
    async fn publish(&self, entries: Vec<QueuedMessage>) -> Result<(), EnqueueError> {
        if self.client.connection_state() != State::Connected {
            return Err(EnqueueError::Unavailable(
                "not connected to NATS".to_owned(),
            ));
        }
        if !self.setup.is_done() {
            return Err(EnqueueError::Unavailable(
                "queue stream not set up yet".to_owned(),
            ));
        }
        let mut outgoing = Vec::with_capacity(entries.len());
        let mut objects = Vec::with_capacity(entries.len());
        for entry in entries {
            match self.prepare(entry).await {
                Ok((message, object)) => {
                    outgoing.push(message);
                    objects.push(object);
                }
                Err(error) => {
                    self.forget_bodies(objects.into_iter().flatten().collect());
                    return Err(error);
                }
            }
        }
        // The committer's own waits are bounded by the publish timeout; this bounds the
        // queueing in front of it too.
        let limit = self.nats.publish_timeout.0 * 2;
        let outcomes = self.committer.commit(outgoing, limit).await;
        let mut first_error = None;
        let mut no_stream = false;
        let mut orphans = Vec::new();
        let mut stored = Vec::new();
        for (outcome, object) in outcomes.into_iter().zip(objects) {
            match outcome {
                // The stream had the entry already. Usually that is an earlier attempt's entry,
                // which refers to that attempt's body and leaves this one an orphan; but it
                // may be this very entry, stored by a batch whose answer was lost. Only the
                // sweeper, which reads the entries, can tell.
                Ok(Stored { duplicate: true }) => {}
                Ok(Stored { duplicate: false }) => stored.extend(object),
                Err(failure) => {
                    if !failure.maybe_stored {
                        orphans.extend(object);
                    }
                    no_stream |= failure.no_stream;
                    first_error.get_or_insert(failure.error);
                }
            }
        }
        self.forget_bodies(orphans);
        self.mark_bodies(stored);
        // "No stream" is also what a replicated stream answers while it elects a new leader:
        // set up again only when the server says the stream is gone.
        if no_stream && self.stream_gone().await {
            tracing::error!(stream = %self.nats.stream, "queue stream missing; setting it up again");
            self.setup.lost();
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Deletes body objects no entry refers to (in the background: the client's answer does
    /// not wait for it; what fails here is left to the sweeper).
    fn forget_bodies(&self, objects: Vec<(String, String)>) {
        let deleted = self.metrics.queue_orphan_bodies_deleted.clone();
        self.per_bucket(objects, move |store, object| {
            let deleted = deleted.clone();
            async move {
                if sweeper::delete_orphan(&store, &object).await {
                    deleted.inc();
                }
            }
        });
    }

    /// Marks body objects whose entry is stored, so the sweeper leaves them alone.
    fn mark_bodies(&self, objects: Vec<(String, String)>) {
        self.per_bucket(objects, |store, object| async move {
            sweeper::mark_referenced(&store, &object).await;
        });
    }

    /// Runs `action` on each `(domain, object)` with the domain's bucket, in the background.
    fn per_bucket<F, Fut>(&self, objects: Vec<(String, String)>, action: F)
    where
        F: Fn(ObjectStore, String) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let work: Vec<(ObjectStore, String)> = objects
            .into_iter()
            .filter_map(|(domain, object)| Some((self.bodies_of(&domain)?, object)))
            .collect();
        if work.is_empty() {
            return;
        }
        tokio::spawn(async move {
            for (store, object) in work {
                action(store, object).await;
            }
        });
    }

    /// Whether the server says the queue stream does not exist (not merely unreachable or
    /// without a leader). A node that may not read the stream (`nats.manageStreams: false`)
    /// asks for its first domain's consumer instead, which exists only on the stream.
    async fn stream_gone(&self) -> bool {
        use async_nats::jetstream::context::GetStreamErrorKind;
        use async_nats::jetstream::stream::ConsumerErrorKind;
        if self.nats.manage_streams {
            return matches!(
                self.js.get_stream(&self.nats.stream).await.map_err(|e| e.kind()),
                Err(GetStreamErrorKind::JetStream(e)) if e.error_code() == ErrorCode::STREAM_NOT_FOUND
            );
        }
        let Some(domain) = self.domains().into_iter().next() else {
            return false;
        };
        matches!(
            self.js
                .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                    kubemail_queue::consumer_name(&domain),
                    &self.nats.stream,
                )
                .await
                .map_err(|e| e.kind()),
            Err(ConsumerErrorKind::JetStream(e))
                if e.error_code() == ErrorCode::STREAM_NOT_FOUND
                    || e.error_code() == ErrorCode::CONSUMER_NOT_FOUND
        )
    }
}

impl Queue for JetStreamQueue {
    fn enqueue(&self, entries: Vec<QueuedMessage>) -> BoxFuture<'_, Result<(), EnqueueError>> {
        Box::pin(async move {
            let started = Instant::now();
            let span = match entries.first() {
                Some(first) => tracing::info_span!(
                    "queue.publish",
                    otel.kind = "producer",
                    messaging.system = "nats",
                    messaging.destination.name = %kubemail_queue::subject(&self.nats.subject_prefix, &first.entry.domain),
                    messaging.batch.message_count = entries.len(),
                    queue_id = %first.entry.queue_id,
                    domain = %first.entry.domain,
                    size = first.body.len(),
                ),
                None => tracing::Span::none(),
            };
            let result = self.publish(entries).instrument(span).await;
            let m = &self.metrics;
            m.queue_publish_seconds
                .observe(started.elapsed().as_secs_f64());
            let label = match &result {
                Ok(()) => "ok",
                Err(EnqueueError::Full(_)) => "full",
                Err(EnqueueError::Unavailable(_)) => "unavailable",
            };
            m.queue_publish
                .get_or_create(&ResultLabels { result: label })
                .inc();
            result
        })
    }

    fn is_ready(&self) -> bool {
        self.setup.is_done() && self.client.connection_state() == State::Connected
    }

    fn streaming_threshold(&self) -> Option<usize> {
        Some(self.inline_limit())
    }

    fn upload(&self, domain: &str, entry_id: String) -> Result<BodyUpload, EnqueueError> {
        if !self.is_ready() {
            return Err(EnqueueError::Unavailable(
                "queue not connected or not set up".to_owned(),
            ));
        }
        let store = self.bodies_of(domain).ok_or_else(|| {
            EnqueueError::Unavailable(format!("body bucket of {domain} not set up"))
        })?;
        let reference = kubemail_queue::body_ref_after_head(
            &kubemail_queue::body_bucket(&self.nats.body_bucket, domain),
            &entry_id,
        );
        Ok(BodyUpload::start(
            store,
            domain,
            entry_id,
            reference,
            self.metrics.queue_orphan_bodies_deleted.clone(),
        ))
    }
}

/// Maps an async-nats error to the reply class: "no room" is `452`, everything else `451`.
pub(super) fn classify(error: &(dyn std::error::Error + 'static), action: &str) -> EnqueueError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let mut text = String::new();
    while let Some(e) = source {
        if let Some(js) = e.downcast_ref::<jetstream::Error>()
            && FULL_CODES.contains(&js.error_code())
        {
            return EnqueueError::Full(format!("{action}: {js}"));
        }
        text.push_str(&e.to_string());
        text.push_str(": ");
        source = e.source();
    }
    let lower = text.to_ascii_lowercase();
    if lower.contains("maximum bytes")
        || lower.contains("maximum messages")
        || lower.contains("insufficient")
    {
        return EnqueueError::Full(format!("{action}: {text}"));
    }
    EnqueueError::Unavailable(format!("{action}: {}", text.trim_end_matches(": ")))
}
