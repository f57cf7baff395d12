//! The JetStream objects of the queue contract, as configurations: the queue stream, a
//! domain's durable consumer and body bucket, and the AUTH-failure stream. Whoever manages
//! them (the operator with authenticated NATS, else the node: `nats.manageStreams`) creates
//! them from these, so both make the same objects.
//!
//! The queue stream's settings never drop queued mail silently: file storage, work-queue
//! retention (an entry leaves when a worker acks it), `discard: new` (a full stream refuses
//! the publish and the client gets `452 4.3.1` instead of losing the oldest mail), no
//! `max_age` (the 5-day lifetime and its bounce are the delivery side's job), a duplicate
//! window for `Nats-Msg-Id`, and `nats.replicas` copies (R3 survives the loss of one server).

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::stream::{
    self, DiscardPolicy, PersistenceMode, RetentionPolicy, StorageType,
};
use async_nats::jetstream::{kv, object_store};
use kubemail_config::{AuthConfig, ConsumerConfig, NatsConfig};

use crate::names::{
    auth_failure_stream, auth_failure_subjects, body_bucket, consumer_name, subject,
};
use crate::permissions::QueueNames;

impl From<&NatsConfig> for QueueNames {
    fn from(nats: &NatsConfig) -> Self {
        Self {
            stream: nats.stream.clone(),
            subject_prefix: nats.subject_prefix.clone(),
            body_bucket_base: nats.body_bucket.clone(),
        }
    }
}

/// The queue stream.
pub fn queue_stream_config(nats: &NatsConfig) -> stream::Config {
    stream::Config {
        name: nats.stream.clone(),
        description: Some("kubemail mail queue: one subject per MailDomain".to_owned()),
        subjects: vec![format!("{}.>", nats.subject_prefix)],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        discard: DiscardPolicy::New,
        max_age: Duration::ZERO,
        max_bytes: nats
            .max_bytes
            .map_or(-1, |b| i64::try_from(b.0).unwrap_or(i64::MAX)),
        max_messages: -1,
        max_messages_per_subject: -1,
        max_message_size: -1,
        duplicate_window: nats.duplicate_window.0,
        num_replicas: nats.replicas as usize,
        allow_atomic_publish: true,
        ..Default::default()
    }
}

/// The object store bucket of `domain`'s large bodies.
pub fn body_bucket_config(nats: &NatsConfig, domain: &str) -> object_store::Config {
    object_store::Config {
        bucket: body_bucket(&nats.body_bucket, domain),
        description: Some(format!(
            "kubemail message bodies of {domain} too large for one NATS message"
        )),
        max_age: Duration::ZERO,
        storage: StorageType::File,
        num_replicas: nats.replicas as usize,
        ..Default::default()
    }
}

/// The durable pull consumer of `domain`: explicit acks, a finite
/// `max_deliver`, a bounded `max_ack_pending`, an `ack_wait` that workers extend with
/// progress acks, and the stream's replica count (`num_replicas: 0`).
pub fn consumer_config(nats: &NatsConfig, domain: &str, config: &ConsumerConfig) -> pull::Config {
    let name = consumer_name(domain);
    pull::Config {
        durable_name: Some(name.clone()),
        name: Some(name),
        description: Some(format!("kubemail delivery workers of {domain}")),
        filter_subject: subject(&nats.subject_prefix, domain),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: config.ack_wait.0,
        max_deliver: i64::from(config.max_deliver),
        max_ack_pending: i64::from(config.max_ack_pending),
        // 0: as many copies of its state as the stream has, following the stream when its
        // replica count changes (an R1 consumer on a lost server would stop delivery although
        // the R3 stream survived).
        num_replicas: 0,
        ..Default::default()
    }
}

/// The stream of failed AUTH attempts: one empty message per failure, one subject per domain
/// and keyed user hash, each message expiring after the window.
pub fn failure_stream_config(nats: &NatsConfig, auth: &AuthConfig) -> stream::Config {
    let window = auth.failures_per_user_window.0;
    stream::Config {
        name: auth_failure_stream(&nats.stream),
        description: Some(
            "kubemail failed AUTH attempts, one subject per domain and keyed hash of the user name"
                .to_owned(),
        ),
        subjects: vec![auth_failure_subjects(&nats.subject_prefix)],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        // A subject at its limit forgets its own oldest failure: the newest `limit` ones say
        // whether and until when the user is locked. No stream-wide cap: it would let a flood
        // evict other users' failures and shorten a real lockout. The stream stays bounded
        // because nodes write failures only for user names that exist (at most `limit` each
        // per domain).
        discard: DiscardPolicy::Old,
        max_age: window,
        max_messages_per_subject: i64::from(auth.failures_per_user.max(1)),
        max_messages: -1,
        max_bytes: -1,
        max_message_size: -1,
        // No message ids are sent; the smallest window keeps the server's dedupe table small.
        duplicate_window: window.min(Duration::from_secs(1)),
        num_replicas: nats.replicas as usize,
        ..Default::default()
    }
}

/// How long TLS-RPT session results are kept: the day itself, the day its report is sent,
/// and a spare.
pub const TLSRPT_RESULTS_MAX_AGE: Duration = Duration::from_secs(3 * 86_400);

/// The objects below serve the delivery side's TLS policy; `replicas` is the operator's
/// `nats.replicas` (a node that makes them itself uses 1, as before).
///
/// The cluster-wide cache of remote domains' MTA-STS policies
/// ([`crate::MTA_STS_CACHE_BUCKET`]).
pub fn mta_sts_cache_config(replicas: u32) -> kv::Config {
    kv::Config {
        bucket: crate::MTA_STS_CACHE_BUCKET.to_owned(),
        description: "MTA-STS policies of remote domains (RFC 8461)".to_owned(),
        history: 1,
        max_value_size: 128 * 1024,
        storage: StorageType::File,
        num_replicas: replicas as usize,
        ..Default::default()
    }
}

/// The stream of TLS-RPT session results ([`crate::TLSRPT_STREAM`]).
pub fn tlsrpt_stream_config(replicas: u32) -> stream::Config {
    stream::Config {
        name: crate::TLSRPT_STREAM.to_owned(),
        subjects: vec!["kubemail.tlsrpt.>".to_owned()],
        max_age: TLSRPT_RESULTS_MAX_AGE,
        storage: StorageType::File,
        num_replicas: replicas as usize,
        ..Default::default()
    }
}

/// The bucket of TLS-RPT report claims ([`crate::TLSRPT_CLAIMS_BUCKET`]).
pub fn tlsrpt_claims_config(replicas: u32) -> kv::Config {
    kv::Config {
        bucket: crate::TLSRPT_CLAIMS_BUCKET.to_owned(),
        description: "TLS-RPT report claims (RFC 8460)".to_owned(),
        history: 1,
        max_age: Duration::from_secs(7 * 86_400),
        storage: StorageType::File,
        num_replicas: replicas as usize,
        ..Default::default()
    }
}

/// The stream of delivery events ([`crate::events::EVENTS_STREAM`]): limits by age and size
/// (`events.maxAge`, `events.maxBytes`; the oldest go first) and a duplicate window that drops
/// a repeated event (same `Nats-Msg-Id`, the event id).
///
/// **Persistence.** With one replica the stream is written asynchronously (`persist_mode:
/// async`, nats-server 2.12+): the server acknowledges an event before it has written it, so
/// an event costs no fsync of its own where the server syncs every write (`sync_interval:
/// always`, which stays in force for the queue). A crash of the NATS server (not of a node)
/// can then lose the events it acknowledged in its last moments; mail is never at stake, and
/// neither is an event across a node's crash. Such a stream takes no atomic batches (the
/// server refuses both together). A replicated stream cannot be asynchronous: it keeps the
/// default persistence, where every event is on a quorum before it is acknowledged, and
/// takes atomic batches, so the events of concurrent publishers share one write.
pub fn events_stream_config(replicas: u32, max_age: Duration, max_bytes: u64) -> stream::Config {
    let asynchronous = replicas <= 1;
    stream::Config {
        name: crate::events::EVENTS_STREAM.to_owned(),
        description: Some("kubemail delivery events (CloudEvents)".to_owned()),
        subjects: vec![crate::events::EVENTS_SUBJECTS.to_owned()],
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        max_age,
        max_bytes: i64::try_from(max_bytes).unwrap_or(i64::MAX),
        duplicate_window: EVENTS_DUPLICATE_WINDOW,
        storage: StorageType::File,
        num_replicas: replicas as usize,
        persist_mode: asynchronous.then_some(PersistenceMode::Async),
        allow_atomic_publish: !asynchronous,
        ..Default::default()
    }
}

/// Whether a stream is written asynchronously (`persist_mode: async`).
pub fn is_asynchronous(config: &stream::Config) -> bool {
    config.persist_mode == Some(PersistenceMode::Async)
}

/// Why the events stream could not be ensured.
#[derive(Debug, thiserror::Error)]
pub enum EnsureEventsError {
    #[error("cannot create or look up the events stream")]
    Create(#[source] async_nats::jetstream::context::CreateStreamError),
    #[error("cannot turn on atomic batches on the events stream")]
    Update(#[source] async_nats::jetstream::context::UpdateStreamError),
}

/// Looks up the events stream, or creates it from `config`; whoever manages the JetStream
/// objects (the operator, a node with `nats.manageStreams`) also turns on atomic batches on
/// a synchronous one made by an earlier release (it changes nothing stored), since the nodes
/// would otherwise write and sync every event on its own. An asynchronous stream is left as
/// it is (it cannot take batches and needs none), and so is an earlier synchronous one: the
/// server does not change a stream's persistence. Returns whether the stream takes atomic
/// batches.
pub async fn ensure_events_stream(
    js: &async_nats::jetstream::Context,
    config: stream::Config,
    manage: bool,
) -> Result<bool, EnsureEventsError> {
    let stream = js
        .get_or_create_stream(config)
        .await
        .map_err(EnsureEventsError::Create)?;
    let current = &stream.cached_info().config;
    if current.allow_atomic_publish || !manage || is_asynchronous(current) {
        return Ok(current.allow_atomic_publish);
    }
    let update = stream::Config {
        allow_atomic_publish: true,
        ..current.clone()
    };
    js.update_stream(update)
        .await
        .map_err(EnsureEventsError::Update)?;
    Ok(true)
}

/// How long the events stream remembers an event id to drop a repeat.
pub const EVENTS_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The events stream's limits when the node config does not say (`events.maxAge`,
/// `events.maxBytes`): what the operator creates it with.
pub const EVENTS_DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 86_400);
pub const EVENTS_DEFAULT_MAX_BYTES: u64 = 1024 * 1024 * 1024;

/// The bucket of every domain's suppression list ([`crate::suppression::SUPPRESSION_BUCKET`]).
pub fn suppression_bucket_config(replicas: u32) -> kv::Config {
    kv::Config {
        bucket: crate::suppression::SUPPRESSION_BUCKET.to_owned(),
        description: "kubemail suppression lists".to_owned(),
        history: 1,
        max_value_size: 16 * 1024,
        storage: StorageType::File,
        num_replicas: replicas as usize,
        ..Default::default()
    }
}

/// The bucket of delivery pauses ([`crate::PAUSES_BUCKET`]).
pub fn pauses_config(replicas: u32) -> kv::Config {
    kv::Config {
        bucket: crate::PAUSES_BUCKET.to_owned(),
        description: "kubemail delivery pauses (DeliveryPause resources)".to_owned(),
        history: 1,
        storage: StorageType::File,
        num_replicas: replicas.max(1) as usize,
        ..Default::default()
    }
}

/// The bucket of connection leases ([`crate::SHAPING_LEASES_BUCKET`]): memory storage (a
/// lease outlives no server restart, and need not), entries expire after
/// [`crate::SHAPING_LEASE_TIME`].
pub fn shaping_leases_config(replicas: u32) -> kv::Config {
    kv::Config {
        bucket: crate::SHAPING_LEASES_BUCKET.to_owned(),
        description: "kubemail connection leases per destination".to_owned(),
        history: 1,
        max_age: crate::SHAPING_LEASE_TIME,
        storage: StorageType::Memory,
        num_replicas: replicas.max(1) as usize,
        ..Default::default()
    }
}

/// The bucket of rate and back-off state ([`crate::SHAPING_BUCKET`]), forgotten after a day
/// without use.
pub fn shaping_state_config(replicas: u32) -> kv::Config {
    kv::Config {
        bucket: crate::SHAPING_BUCKET.to_owned(),
        description: "kubemail rate and back-off state per destination".to_owned(),
        history: 1,
        max_age: Duration::from_secs(86_400),
        storage: StorageType::Memory,
        num_replicas: replicas.max(1) as usize,
        ..Default::default()
    }
}

/// The bucket of replaced-entry marks ([`crate::REPLACED_BUCKET`]), kept an hour (longer
/// than any attempt).
pub fn replaced_config(replicas: u32) -> kv::Config {
    kv::Config {
        bucket: crate::REPLACED_BUCKET.to_owned(),
        description: "kubemail queue entries replaced by an operator's action".to_owned(),
        history: 1,
        max_age: Duration::from_secs(3600),
        storage: StorageType::File,
        num_replicas: replicas.max(1) as usize,
        ..Default::default()
    }
}

/// Every KV bucket of the delivery side's pauses, shaping and operators' actions.
pub fn delivery_buckets(replicas: u32) -> [kv::Config; 4] {
    [
        pauses_config(replicas),
        shaping_leases_config(replicas),
        shaping_state_config(replicas),
        replaced_config(replicas),
    ]
}

/// Whether an existing queue stream `current` must be updated to `desired`: a setting we own
/// differs (replicas included: R1 → R3 is an update JetStream makes in place, copying the
/// stored entries to the new peers), or a subject of ours is missing.
pub fn queue_stream_differs(current: &stream::Config, desired: &stream::Config) -> bool {
    current.discard != desired.discard
        || current.allow_atomic_publish != desired.allow_atomic_publish
        || current.max_age != desired.max_age
        || current.duplicate_window != desired.duplicate_window
        || current.max_bytes != desired.max_bytes
        || current.num_replicas.max(1) != desired.num_replicas.max(1)
        || !desired
            .subjects
            .iter()
            .all(|s| current.subjects.contains(s))
}

#[cfg(test)]
mod tests {
    use kubemail_config::ByteSize;

    use super::*;

    #[test]
    fn stream_settings_never_drop_queued_mail() {
        let nats = NatsConfig {
            max_bytes: Some(ByteSize(1 << 30)),
            replicas: 3,
            ..Default::default()
        };
        let c = queue_stream_config(&nats);
        assert_eq!(c.name, "KUBEMAIL");
        assert_eq!(c.subjects, vec!["kubemail.queue.>".to_owned()]);
        assert_eq!(c.retention, RetentionPolicy::WorkQueue);
        assert_eq!(c.discard, DiscardPolicy::New);
        assert_eq!(c.num_replicas, 3);
        let b = body_bucket_config(&nats, "example.com");
        assert_eq!(b.bucket, "KUBEMAIL_BODIES-example_com");
        assert_eq!(b.num_replicas, 3);
        let f = failure_stream_config(&nats, &AuthConfig::default());
        assert_eq!(f.name, "KUBEMAIL_AUTH_FAILURES");
        assert_eq!(
            f.subjects,
            vec!["kubemail.queue-auth-failures.>".to_owned()]
        );
        assert_eq!(f.max_messages_per_subject, 20);
        // No stream-wide cap that could evict another user's failures.
        assert_eq!(f.max_messages, -1);
        assert_eq!(f.max_bytes, -1);
        let r1 = queue_stream_config(&NatsConfig::default());
        assert!(queue_stream_differs(&r1, &c), "R1 -> R3 is an update");
        assert!(!queue_stream_differs(&c, &c));
        // The queue is never written asynchronously, whatever the replicas.
        assert_eq!(c.persist_mode, None);
        assert_eq!(r1.persist_mode, None);
    }

    #[test]
    fn one_replica_of_the_events_stream_is_written_asynchronously_and_three_take_batches() {
        let r1 = events_stream_config(1, EVENTS_DEFAULT_MAX_AGE, EVENTS_DEFAULT_MAX_BYTES);
        assert!(is_asynchronous(&r1));
        assert!(
            !r1.allow_atomic_publish,
            "the server refuses async with batches"
        );
        assert_eq!(r1.storage, StorageType::File);
        let r3 = events_stream_config(3, EVENTS_DEFAULT_MAX_AGE, EVENTS_DEFAULT_MAX_BYTES);
        assert!(
            !is_asynchronous(&r3),
            "the server refuses async on replicas"
        );
        assert!(r3.allow_atomic_publish);
        assert_eq!(r3.num_replicas, 3);
    }
}
