//! Group commit: many sessions finish their DATA at the same moment, and one JetStream write
//! (one fsync with `sync_interval: always`) serves all of them.
//!
//! Every enqueue hands its entries to one committer task per node. The committer takes the
//! first transaction that waits and everything else already waiting (up to
//! [`MAX_GROUP_MESSAGES`] and [`MAX_GROUP_BYTES`]; a transaction is never split), and writes
//! the group as one JetStream *atomic batch* (`Nats-Batch-Id`, `-Sequence`, `-Commit`:
//! nats-server 2.12+, stream setting `allow_atomic`): the server stages the messages and
//! stores them all or none, and on an R1 file store with `sync_interval: always` syncs once
//! for the whole batch. There is no timer: a message that finds the committer idle is
//! published at once (alone, as an ordinary publish); while [`MAX_IN_FLIGHT`] groups wait for
//! their acknowledgement, the next group fills up. So a lone message is not delayed, and
//! under load the groups grow with it.
//!
//! Each session is answered only from its own entries' outcome, after the server's
//! acknowledgement of the group that carried them: `250` still means durable. Between the two
//! the committer publishes the `received` delivery events of the group's stored entries, all
//! in one go and bounded by `events.publishTimeout` (see [`crate::events::Events::publish`]):
//! a delivery can then never overtake its `received` event, and the hot path pays one events
//! round trip per group, not per message.
//!
//! With `nats.groupCommit: false` (or a server without atomic batches) the committer still
//! takes the waiting transactions together, but publishes their entries one by one, the
//! acknowledgements awaited together: for a server that does not sync each write, where a
//! batch's staging costs more than it saves.
//!
//! When a batch fails (the stream does not allow atomic publishes, a message is a duplicate of
//! one already stored, too many batches in flight on the server, the connection dropped), the
//! group is published again message by message, acknowledgements awaited together. That is
//! safe because every entry carries a `Nats-Msg-Id` that JetStream de-duplicates: whatever
//! of the batch the server did store is acknowledged as a duplicate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::connection::State;
use async_nats::jetstream::{self, context::PublishErrorKind};
use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use kubemail_queue::StaticNames;
use kubemail_queue::events::CloudEvent;
use tokio::sync::{mpsc, oneshot};

use super::{EnqueueError, QueueEntry};
use crate::metrics::Metrics;

/// Most messages in one group. nats-server refuses atomic batches of more than 1000.
pub const MAX_GROUP_MESSAGES: usize = 500;
/// Most payload octets in one group (one transaction larger than this is a group of its own).
pub const MAX_GROUP_BYTES: usize = 8 << 20;
/// Groups waiting for their acknowledgement at once. Two let the next batch travel while the
/// server syncs the previous one; more would only make the groups smaller.
pub const MAX_IN_FLIGHT: usize = 2;
/// Transactions waiting for the committer before senders wait too.
const QUEUE_DEPTH: usize = 4096;

/// JetStream's atomic batch headers (ADR-50).
pub const BATCH_ID: &str = "Nats-Batch-Id";
pub const BATCH_SEQUENCE: &str = "Nats-Batch-Sequence";
pub const BATCH_COMMIT: &str = "Nats-Batch-Commit";

/// One NATS message of a queue entry, ready to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub subject: String,
    /// `entry`'s headers with `msg_id`; a batch adds its own to them.
    pub headers: HeaderMap,
    pub payload: Bytes,
    /// What the headers are made from, to make them again without the batch's.
    pub entry: QueueEntry,
    pub msg_id: String,
}

impl Outgoing {
    pub fn new(subject: String, entry: QueueEntry, msg_id: String, payload: Bytes) -> Self {
        Self {
            subject,
            headers: entry.to_headers(&msg_id),
            payload,
            entry,
            msg_id,
        }
    }
}

/// A message the stream holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// The stream had it already (same `Nats-Msg-Id` within the duplicate window).
    pub duplicate: bool,
}

/// A message that may not be in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub error: EnqueueError,
    /// The server may have stored it (no answer came: a timeout, a dropped connection).
    pub maybe_stored: bool,
    /// The server answered "no stream": the stream is gone, or a replicated stream is
    /// electing its leader (the queue tells them apart before setting up again).
    pub no_stream: bool,
}

/// The outcome of each message of a transaction, in order.
pub type Outcomes = Vec<Result<Stored, Failure>>;

struct Job {
    messages: Vec<Outgoing>,
    /// Messages of the transaction (`messages` is emptied when the group is published).
    count: usize,
    bytes: usize,
    reply: oneshot::Sender<Outcomes>,
}

/// What the committer task needs.
struct Shared {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Whether the stream takes atomic batches (set up with `allow_atomic`).
    atomic: Arc<AtomicBool>,
    /// Where the `received` events of stored entries go, once the node has attached it.
    events: Arc<OnceLock<Arc<crate::events::Events>>>,
    metrics: Arc<Metrics>,
}

/// The handle sessions commit through; the task ends when the last handle is dropped.
#[derive(Clone)]
pub struct Committer {
    jobs: mpsc::Sender<Job>,
}

impl Committer {
    /// Starts the committer task. `atomic` says whether groups may go as atomic batches;
    /// `events`, once set, receives the `received` events of every stored group.
    pub fn start(
        client: async_nats::Client,
        js: jetstream::Context,
        atomic: Arc<AtomicBool>,
        events: Arc<OnceLock<Arc<crate::events::Events>>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        let shared = Arc::new(Shared {
            client,
            js,
            atomic,
            events,
            metrics,
        });
        tokio::spawn(run(shared, rx));
        Self { jobs }
    }

    /// Publishes the messages of one transaction (together with whatever else is waiting) and
    /// returns the outcome of each, once the server has answered for all of them. `limit`
    /// bounds the whole wait, queueing behind other groups included.
    pub async fn commit(&self, messages: Vec<Outgoing>, limit: Duration) -> Outcomes {
        let n = messages.len();
        let unavailable = |why: &str, maybe_stored: bool| {
            vec![
                Err(Failure {
                    error: EnqueueError::Unavailable(why.to_owned()),
                    maybe_stored,
                    no_stream: false,
                });
                n
            ]
        };
        let bytes = messages.iter().map(|m| m.payload.len()).sum();
        let (reply, answer) = oneshot::channel();
        let job = Job {
            messages,
            count: n,
            bytes,
            reply,
        };
        let waited = tokio::time::timeout(limit, async {
            if self.jobs.send(job).await.is_err() {
                return Err(false);
            }
            answer.await.map_err(|_| true)
        })
        .await;
        match waited {
            Ok(Ok(outcomes)) => outcomes,
            Ok(Err(maybe_stored)) => unavailable("the queue publisher stopped", maybe_stored),
            // The group may be on the wire: its outcome is unknown.
            Err(_) => unavailable("timed out waiting for the queue", true),
        }
    }
}

impl Grouped for Job {
    fn messages(&self) -> usize {
        self.count
    }

    fn bytes(&self) -> usize {
        self.bytes
    }
}

async fn run(shared: Arc<Shared>, rx: mpsc::Receiver<Job>) {
    gather(rx, MAX_IN_FLIGHT, |group| {
        commit_group(shared.clone(), group)
    })
    .await;
}

/// What [`gather`] groups: a caller's messages, never split.
pub(crate) trait Grouped {
    fn messages(&self) -> usize;
    fn bytes(&self) -> usize;
}

/// The committer's loop, for the queue and the events stream alike: takes the first job that
/// waits and every other one already waiting (up to [`MAX_GROUP_MESSAGES`] and
/// [`MAX_GROUP_BYTES`]) and hands the group to `commit`, with at most `max_in_flight`
/// groups under way. Returns when every sender is gone and the last group is done.
pub(crate) async fn gather<J, F, Fut>(mut rx: mpsc::Receiver<J>, max_in_flight: usize, commit: F)
where
    J: Grouped,
    F: Fn(Vec<J>) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut in_flight = FuturesUnordered::new();
    // A job taken from the channel that did not fit the group before it.
    let mut carried: Option<J> = None;
    loop {
        if in_flight.len() >= max_in_flight {
            in_flight.next().await;
            continue;
        }
        let first = match carried.take() {
            Some(job) => job,
            None if in_flight.is_empty() => match rx.recv().await {
                Some(job) => job,
                None => return,
            },
            None => tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => job,
                    None => {
                        while in_flight.next().await.is_some() {}
                        return;
                    }
                },
                _ = in_flight.next() => continue,
            },
        };
        let mut count = first.messages();
        let mut bytes = first.bytes();
        let mut group = vec![first];
        while let Ok(job) = rx.try_recv() {
            if count + job.messages() > MAX_GROUP_MESSAGES || bytes + job.bytes() > MAX_GROUP_BYTES
            {
                carried = Some(job);
                break;
            }
            count += job.messages();
            bytes += job.bytes();
            group.push(job);
        }
        in_flight.push(commit(group));
    }
}

/// Publishes one group and answers each of its transactions.
async fn commit_group(shared: Arc<Shared>, mut group: Vec<Job>) {
    let mut messages: Vec<Outgoing> = group
        .iter_mut()
        .flat_map(|j| std::mem::take(&mut j.messages))
        .collect();
    let total = messages.len();
    // Made now: the publish paths consume the messages.
    let events = shared.events.get().filter(|e| e.enabled());
    let received: Vec<Vec<CloudEvent>> = match events {
        Some(events) => messages
            .iter()
            .map(|m| crate::events::received(events.hostname(), &m.entry))
            .collect(),
        None => Vec::new(),
    };
    shared.metrics.queue_commit_messages.observe(total as f64);
    let outcomes = if total > 1 && shared.atomic.load(Ordering::Relaxed) {
        let parts = messages
            .iter_mut()
            // Taken: a failed batch makes the headers again from the entry.
            .map(|m| {
                (
                    m.subject.clone(),
                    std::mem::take(&mut m.headers),
                    m.payload.clone(),
                )
            })
            .collect();
        match atomic_batch(&shared.client, &shared.js, parts).await {
            Ok(()) => vec![Ok(Stored { duplicate: false }); total],
            Err(reason) => {
                tracing::debug!(%reason, messages = total, "atomic batch not committed; publishing one by one");
                for m in &mut messages {
                    m.headers = m.entry.to_headers(&m.msg_id);
                }
                let mut outcomes = one_by_one(&shared, messages).await;
                // A commit that got no answer may have been stored: whatever fails now may
                // be in the stream all the same.
                if reason.unknown_outcome() {
                    for outcome in &mut outcomes {
                        if let Err(failure) = outcome {
                            failure.maybe_stored = true;
                        }
                    }
                }
                outcomes
            }
        }
    } else {
        one_by_one(&shared, messages).await
    };
    if let Some(events) = events {
        // A stored duplicate is a client's retry of an entry we have: its events have the
        // same ids, so the events stream drops them again if it has them.
        let stored = received
            .into_iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| outcome.is_ok())
            .flat_map(|(events, _)| events)
            .collect();
        events.publish(stored).await;
    }
    let mut outcomes = outcomes.into_iter();
    for job in group {
        let mine: Outcomes = outcomes.by_ref().take(job.count).collect();
        // A session that gave up waiting has dropped its receiver; nothing to tell it.
        let _ = job.reply.send(mine);
    }
}

/// Why an atomic batch was not committed (the group is then published one by one).
#[derive(Debug, thiserror::Error)]
pub(crate) enum BatchError {
    #[error("not connected to NATS")]
    NotConnected,
    #[error("cannot send: {0}")]
    Send(String),
    #[error("commit failed: {reason}")]
    Commit {
        reason: String,
        /// No answer came (a timeout, a lost connection): the server may have committed it.
        unknown: bool,
    },
    #[error("the server committed {got:?} of {sent} messages")]
    Count { sent: usize, got: Option<u64> },
}

impl BatchError {
    /// Whether the batch may have been stored although it failed.
    pub(crate) fn unknown_outcome(&self) -> bool {
        matches!(self, Self::Commit { unknown: true, .. })
    }
}

/// Publishes `messages` (subject, headers, payload) as one atomic batch: every message but
/// the last without a reply subject, the last with `Nats-Batch-Commit` and the batch's
/// acknowledgement.
pub(crate) async fn atomic_batch(
    client: &async_nats::Client,
    js: &jetstream::Context,
    messages: Vec<(String, HeaderMap, Bytes)>,
) -> Result<(), BatchError> {
    if client.connection_state() != State::Connected {
        return Err(BatchError::NotConnected);
    }
    let id = uuid::Uuid::now_v7().simple().to_string();
    let n = messages.len();
    let mut ack = None;
    for (i, (subject, headers, payload)) in messages.into_iter().enumerate() {
        let mut headers = StaticNames(headers);
        headers.insert(BATCH_ID, id.as_str());
        headers.insert(BATCH_SEQUENCE, (i + 1).to_string());
        if i + 1 < n {
            client
                .publish_with_headers(subject, headers.0, payload)
                .await
                .map_err(|e| BatchError::Send(e.to_string()))?;
        } else {
            headers.insert(BATCH_COMMIT, "1");
            ack = Some(
                js.publish_with_headers(subject, headers.0, payload)
                    .await
                    .map_err(|e| BatchError::Send(e.to_string()))?,
            );
        }
    }
    let Some(ack) = ack else {
        return Ok(());
    };
    let ack = ack.await.map_err(|e| BatchError::Commit {
        reason: e.to_string(),
        unknown: matches!(
            e.kind(),
            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe
        ),
    })?;
    if ack.batch_size != Some(n as u64) {
        return Err(BatchError::Count {
            sent: n,
            got: ack.batch_size,
        });
    }
    tracing::debug!(stream = %ack.stream, last = ack.sequence, messages = n, "batch committed");
    Ok(())
}

/// Publishes every message on its own, all sent before any acknowledgement is awaited.
async fn one_by_one(shared: &Shared, messages: Vec<Outgoing>) -> Outcomes {
    if shared.client.connection_state() != State::Connected {
        return vec![
            Err(Failure {
                error: EnqueueError::Unavailable("not connected to NATS".to_owned()),
                maybe_stored: false,
                no_stream: false,
            });
            messages.len()
        ];
    }
    let mut pending = Vec::with_capacity(messages.len());
    for m in messages {
        let sent = shared
            .js
            .publish_with_headers(m.subject, m.headers, m.payload)
            .await;
        pending.push(sent);
    }
    let acks = pending.into_iter().map(|sent| async move {
        let ack = match sent {
            Ok(ack) => ack,
            Err(e) => {
                return Err(Failure {
                    error: super::jetstream::classify(&e, "publish"),
                    maybe_stored: false,
                    no_stream: false,
                });
            }
        };
        match ack.await {
            Ok(ack) => {
                tracing::debug!(stream = %ack.stream, sequence = ack.sequence, duplicate = ack.duplicate, "stored");
                Ok(Stored {
                    duplicate: ack.duplicate,
                })
            }
            Err(e) => {
                let no_stream = e.kind() == PublishErrorKind::StreamNotFound;
                Err(Failure {
                    no_stream,
                    error: super::jetstream::classify(&e, "wait for acknowledgement"),
                    maybe_stored: matches!(
                        e.kind(),
                        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe
                    ),
                })
            }
        }
    });
    futures::future::join_all(acks).await
}
