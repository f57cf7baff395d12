//! Creation and checking of the JetStream stream and object store bucket that hold the queue.
//!
//! The configurations are the queue contract's (`kubemail_queue::streams`); the node creates
//! the objects only with `nats.manageStreams` (else the operator does, and the node only
//! checks that they exist). The settings are chosen so that queued mail is never dropped
//! silently:
//! * file storage, work-queue retention (a message leaves the stream when a worker acks it);
//! * `discard: new`: a full stream refuses the publish, the client gets `452 4.3.1` and keeps
//!   the message; `discard: old` would delete the oldest queued mail;
//! * `max_age: 0`: nothing expires inside NATS (the 5-day queue lifetime and its bounce are
//!   the delivery side's job; an age limit here would lose mail without a bounce);
//! * a duplicate window for `Nats-Msg-Id`;
//! * atomic batch publishes allowed (`allow_atomic`, nats-server 2.12+): the group commit of
//!   [`super::commit`] writes many sessions' entries as one batch, synced once.
//!
//! An existing stream is updated to these settings where NATS allows it; one whose retention
//! or storage differs (both fixed at creation) is refused with a clear error.

use std::time::Duration;

use async_nats::jetstream::object_store::ObjectStore;
use async_nats::jetstream::stream::{RetentionPolicy, StorageType};
use async_nats::jetstream::{Context, ErrorCode};

use crate::config::NatsConfig;

/// The queue lifetime the delivery side enforces (RFC 5321 4.5.4.1 "at least 4-5 days"); a
/// stream `max_age` shorter than this would expire mail before it can bounce.
pub const QUEUE_LIFETIME: Duration = Duration::from_secs(5 * 24 * 3600);

/// Why the stream or bucket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot look up stream {stream}: {source}")]
    GetStream {
        stream: String,
        #[source]
        source: async_nats::jetstream::context::GetStreamError,
    },
    #[error("cannot create stream {stream}: {source}")]
    CreateStream {
        stream: String,
        #[source]
        source: async_nats::jetstream::context::CreateStreamError,
    },
    #[error("cannot update stream {stream}: {source}")]
    UpdateStream {
        stream: String,
        #[source]
        source: async_nats::jetstream::context::UpdateStreamError,
    },
    #[error(
        "stream {stream} exists with {what}; it cannot be changed in place: delete it or set nats.stream to another name"
    )]
    IncompatibleStream { stream: String, what: String },
    #[error("stream {stream} has no leader yet")]
    NoLeader { stream: String },
    #[error("cannot create object store bucket {bucket}: {source}")]
    CreateBucket {
        bucket: String,
        #[source]
        source: async_nats::jetstream::context::CreateObjectStoreError,
    },
    #[error("object store bucket {bucket} is not there (yet): {source}")]
    OpenBucket {
        bucket: String,
        #[source]
        source: async_nats::jetstream::context::ObjectStoreError,
    },
    #[error("delivery consumer {consumer} is not there (yet): {source}")]
    MissingConsumer {
        consumer: String,
        #[source]
        source: async_nats::jetstream::stream::ConsumerError,
    },
}

pub use kubemail_queue::streams::{body_bucket_config, queue_stream_config};

/// Creates the queue stream, or brings an existing one to the required settings. Returns
/// whether the stream takes atomic batches (a server older than 2.12 ignores the setting).
pub async fn ensure_queue_stream(js: &Context, nats: &NatsConfig) -> Result<bool, SetupError> {
    let desired = queue_stream_config(nats);
    let existing = match js.get_stream(&desired.name).await {
        Ok(mut s) => Some(
            s.info()
                .await
                .map(|i| i.config.clone())
                .unwrap_or_else(|_| s.cached_info().config.clone()),
        ),
        Err(e) if is_not_found(&e) => None,
        Err(source) => {
            return Err(SetupError::GetStream {
                stream: desired.name,
                source,
            });
        }
    };
    let atomic = match existing {
        None => {
            let created = js.create_stream(desired.clone()).await.map_err(|source| {
                SetupError::CreateStream {
                    stream: desired.name.clone(),
                    source,
                }
            })?;
            tracing::info!(stream = %desired.name, "created queue stream");
            created.cached_info().config.allow_atomic_publish
        }
        Some(current) => {
            if current.retention != RetentionPolicy::WorkQueue {
                return Err(SetupError::IncompatibleStream {
                    stream: desired.name,
                    what: format!("retention {:?} (needs WorkQueue)", current.retention),
                });
            }
            if current.storage != StorageType::File {
                return Err(SetupError::IncompatibleStream {
                    stream: desired.name,
                    what: format!("storage {:?} (needs File)", current.storage),
                });
            }
            if kubemail_queue::streams::queue_stream_differs(&current, &desired) {
                let mut update = desired.clone();
                // Keep subjects other tools added; add ours.
                for s in &current.subjects {
                    if !update.subjects.contains(s) {
                        update.subjects.push(s.clone());
                    }
                }
                let updated =
                    js.update_stream(update)
                        .await
                        .map_err(|source| SetupError::UpdateStream {
                            stream: desired.name.clone(),
                            source,
                        })?;
                tracing::info!(stream = %desired.name, "updated queue stream settings");
                updated.config.allow_atomic_publish
            } else {
                current.allow_atomic_publish
            }
        }
    };
    // A replicated stream takes a moment after creation (or a server's loss) to elect its
    // leader; publishes meanwhile find no stream. Not ready until it has one.
    let mut stream =
        js.get_stream(&desired.name)
            .await
            .map_err(|source| SetupError::GetStream {
                stream: desired.name.clone(),
                source,
            })?;
    let led = stream
        .info()
        .await
        .map(|i| i.cluster.as_ref().is_none_or(|c| c.leader.is_some()))
        .unwrap_or(false);
    if !led {
        return Err(SetupError::NoLeader {
            stream: desired.name,
        });
    }
    Ok(atomic)
}

/// Opens `domain`'s body bucket, creating it when missing.
pub async fn ensure_body_bucket(
    js: &Context,
    nats: &NatsConfig,
    domain: &str,
) -> Result<ObjectStore, SetupError> {
    let config = body_bucket_config(nats, domain);
    if let Ok(store) = js.get_object_store(&config.bucket).await {
        return Ok(store);
    }
    let bucket = config.bucket.clone();
    js.create_object_store(config)
        .await
        .map_err(|source| SetupError::CreateBucket { bucket, source })
}

/// Opens `domain`'s body bucket, which someone else (the operator) creates
/// (`nats.manageStreams: false`).
pub async fn open_body_bucket(
    js: &Context,
    nats: &NatsConfig,
    domain: &str,
) -> Result<ObjectStore, SetupError> {
    let bucket = kubemail_queue::body_bucket(&nats.body_bucket, domain);
    js.get_object_store(&bucket)
        .await
        .map_err(|source| SetupError::OpenBucket { bucket, source })
}

/// Checks that `domain`'s durable consumer exists, which someone else (the operator) creates
/// (`nats.manageStreams: false`): it exists only on the queue stream, so this also says the
/// stream is there, asked with the one request a domain's credentials may make about it.
pub async fn check_consumer(
    js: &Context,
    nats: &NatsConfig,
    domain: &str,
) -> Result<(), SetupError> {
    let consumer = kubemail_queue::consumer_name(domain);
    js.get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
        &consumer,
        &nats.stream,
    )
    .await
    .map(drop)
    .map_err(|source| SetupError::MissingConsumer { consumer, source })
}

fn is_not_found(e: &async_nats::jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        async_nats::jetstream::context::GetStreamErrorKind::JetStream(js)
            if js.error_code() == ErrorCode::STREAM_NOT_FOUND
    )
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::stream::DiscardPolicy;

    use super::*;
    use crate::config::ByteSize;

    #[test]
    fn stream_settings_never_drop_queued_mail() {
        let nats = NatsConfig {
            max_bytes: Some(ByteSize(1 << 30)),
            ..Default::default()
        };
        let c = queue_stream_config(&nats);
        assert_eq!(c.name, "KUBEMAIL");
        assert_eq!(c.subjects, vec!["kubemail.queue.>".to_owned()]);
        assert_eq!(c.retention, RetentionPolicy::WorkQueue);
        assert_eq!(c.storage, StorageType::File);
        assert_eq!(c.discard, DiscardPolicy::New, "JS-CFG-02");
        assert!(
            c.max_age.is_zero() || c.max_age > QUEUE_LIFETIME,
            "JS-CFG-03"
        );
        assert!(c.duplicate_window >= Duration::from_secs(120), "JS-CFG-04");
        assert!(c.allow_atomic_publish, "group commit writes atomic batches");
        assert_eq!(c.max_bytes, 1 << 30);
        let b = body_bucket_config(&nats, "example.com");
        assert_eq!(b.bucket, "KUBEMAIL_BODIES-example_com");
        assert!(b.max_age.is_zero());
        assert_eq!(b.storage, StorageType::File);
    }
}
