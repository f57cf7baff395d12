//! Operating kubemail's queue: what `kubectl kubemail queue ...` and the operator do to the
//! one JetStream stream every node shares, so the answers and actions are cluster-wide.
//!
//! * [`Queue::scan`]: every entry of the stream (queued, deferred, paused, held) in stream
//!   order, streamed one at a time with the stream's message get API (`next_by_subj`), so
//!   memory stays the same for ten or ten million entries. A work-queue stream allows no
//!   consumer that overlaps the delivery consumers, so reading by sequence is the way to look
//!   without taking. A scan ends at the stream's last sequence when it started: entries that
//!   actions republish meanwhile are not visited twice.
//! * [`filter`]: which entries a command means (domain, recipient domain, sender, age, state,
//!   last error, queue id);
//! * [`actions`]: retry now, hold, release, delete (with a DSN or silently), each replacing
//!   the entry as the queue contract's "Operators' actions" says, with a dry run that only
//!   counts;
//! * [`stats`]: per destination (recipient domain) counts, the oldest entry, the last error;
//! * [`pauses`]: delivery pauses in the KV bucket the nodes watch, and how many entries each
//!   holds back.
//!
//! Every action is logged (target `kubemail::audit`) with who did it and published as a
//! `queue_action` delivery event of the message's domain.

pub mod actions;
pub mod filter;
pub mod pauses;
pub mod stats;

use std::time::SystemTime;

use async_nats::jetstream::Context;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use futures::stream::BoxStream;
use kubemail_queue::{QueueEntry, is_held_subject};

pub use filter::{Filter, State};

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot open stream {stream}: {source}")]
    OpenStream {
        stream: String,
        #[source]
        source: async_nats::jetstream::context::GetStreamError,
    },
    #[error("cannot read the state of stream {stream}: {source}")]
    StreamInfo {
        stream: String,
        #[source]
        source: async_nats::jetstream::stream::InfoError,
    },
    #[error("cannot read stream message {sequence}: {source}")]
    ReadMessage {
        sequence: u64,
        #[source]
        source: async_nats::jetstream::stream::RawMessageError,
    },
    #[error("cannot publish the replacement of stream message {sequence}: {reason}")]
    Publish { sequence: u64, reason: String },
    #[error("cannot delete stream message {sequence}: {source}")]
    DeleteMessage {
        sequence: u64,
        #[source]
        source: async_nats::jetstream::stream::DeleteMessageError,
    },
    #[error("cannot open the key-value bucket {bucket}: {reason}")]
    Bucket { bucket: String, reason: String },
    #[error("cannot write pause {key}: {reason}")]
    WritePause { key: String, reason: String },
    #[error("invalid pause: {0}")]
    InvalidPause(#[from] kubemail_queue::pause::PauseError),
}

/// The queue of one kubemail installation: its stream and subject prefix.
#[derive(Clone)]
pub struct Queue {
    js: Context,
    stream: Stream,
    name: String,
    prefix: String,
    actor: String,
}

/// One entry as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its stream sequence: what actions name and what a page continues after.
    pub sequence: u64,
    pub subject: String,
    /// When this entry (this version of it) was stored.
    pub stored_at: SystemTime,
    /// On the held subject.
    pub held: bool,
    pub entry: QueueEntry,
}

impl Listed {
    /// Its state at `now`.
    pub fn state(&self, now: SystemTime) -> State {
        State::of(&self.entry, self.held, now)
    }
}

impl Queue {
    /// Opens the queue stream `stream` whose subjects are `<prefix>.>`. `actor` names who
    /// acts, for the audit log.
    pub async fn open(
        js: Context,
        stream: &str,
        prefix: &str,
        actor: &str,
    ) -> Result<Self, AdminError> {
        let s = js
            .get_stream(stream)
            .await
            .map_err(|source| AdminError::OpenStream {
                stream: stream.to_owned(),
                source,
            })?;
        Ok(Self {
            js,
            stream: s,
            name: stream.to_owned(),
            prefix: prefix.to_owned(),
            actor: actor.to_owned(),
        })
    }

    pub fn jetstream(&self) -> &Context {
        &self.js
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Messages in the stream and its last sequence now.
    pub async fn extent(&self) -> Result<(u64, u64), AdminError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|source| AdminError::StreamInfo {
                stream: self.name.clone(),
                source,
            })?;
        Ok((info.state.messages, info.state.last_sequence))
    }

    /// Every entry after stream sequence `after` that `filter` selects, in stream order, up
    /// to the last sequence of the stream now. One entry in memory at a time; entries with
    /// unreadable headers are skipped (and logged). The queue moves while it is read: an
    /// entry a node rewrites during the scan (a retry, a pause check) moves past that last
    /// sequence and is not listed by this scan; the next one lists it.
    pub async fn scan(
        &self,
        after: u64,
        filter: Filter,
    ) -> Result<BoxStream<'static, Result<Listed, AdminError>>, AdminError> {
        let (_, last) = self.extent().await?;
        let stream = self.stream.clone();
        let all = format!("{}.>", self.prefix);
        let prefix = self.prefix.clone();
        let now = SystemTime::now();
        let items = futures::stream::try_unfold(after + 1, move |next| {
            let stream = stream.clone();
            let all = all.clone();
            let prefix = prefix.clone();
            let filter = filter.clone();
            async move {
                let mut next = next;
                loop {
                    if next > last {
                        return Ok(None);
                    }
                    let message = match stream
                        .raw_message_builder()
                        .sequence(next)
                        .next_by_subject(all.clone())
                        .send()
                        .await
                    {
                        Ok(m) => m,
                        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                            return Ok(None);
                        }
                        Err(source) => {
                            return Err(AdminError::ReadMessage {
                                sequence: next,
                                source,
                            });
                        }
                    };
                    if message.sequence > last {
                        return Ok(None);
                    }
                    next = message.sequence + 1;
                    let entry = match QueueEntry::from_headers(&message.headers) {
                        Ok(e) => e,
                        Err(error) => {
                            tracing::warn!(sequence = message.sequence, %error, "skipping an unreadable queue entry");
                            continue;
                        }
                    };
                    let listed = Listed {
                        sequence: message.sequence,
                        held: is_held_subject(&prefix, &message.subject),
                        subject: message.subject.to_string(),
                        stored_at: SystemTime::from(message.time),
                        entry,
                    };
                    if filter.matches(&listed, now) {
                        return Ok(Some((listed, next)));
                    }
                }
            }
        });
        Ok(Box::pin(items))
    }

    /// Every entry of the message `queue_id` (one per MailDomain it is queued for, plus a
    /// held one while an action runs).
    pub async fn find(&self, queue_id: &str) -> Result<Vec<Listed>, AdminError> {
        use futures::TryStreamExt as _;
        let filter = Filter {
            queue_ids: vec![queue_id.to_owned()],
            ..Filter::default()
        };
        self.scan(0, filter).await?.try_collect().await
    }
}
