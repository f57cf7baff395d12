//! Creation and checking of the JetStream stream and object store bucket that hold the queue.
//!
//! The settings are chosen so that queued mail is never dropped silently
//! (catalogue JS-CFG-01..05):
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

use async_nats::jetstream::object_store::{self, ObjectStore};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
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
    #[error("cannot create object store bucket {bucket}: {source}")]
    CreateBucket {
        bucket: String,
        #[source]
        source: async_nats::jetstream::context::CreateObjectStoreError,
    },
}

/// The stream configuration the queue needs.
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

/// The object store configuration for large bodies.
pub fn body_bucket_config(nats: &NatsConfig) -> object_store::Config {
    object_store::Config {
        bucket: nats.body_bucket.clone(),
        description: Some("kubemail message bodies too large for one NATS message".to_owned()),
        max_age: Duration::ZERO,
        storage: StorageType::File,
        num_replicas: nats.replicas as usize,
        ..Default::default()
    }
}

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
    match existing {
        None => {
            let created = js.create_stream(desired.clone()).await.map_err(|source| {
                SetupError::CreateStream {
                    stream: desired.name.clone(),
                    source,
                }
            })?;
            tracing::info!(stream = %desired.name, "created queue stream");
            Ok(created.cached_info().config.allow_atomic_publish)
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
            let differs = current.discard != desired.discard
                || current.allow_atomic_publish != desired.allow_atomic_publish
                || current.max_age != desired.max_age
                || current.duplicate_window != desired.duplicate_window
                || current.max_bytes != desired.max_bytes
                || !desired
                    .subjects
                    .iter()
                    .all(|s| current.subjects.contains(s));
            if differs {
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
                Ok(updated.config.allow_atomic_publish)
            } else {
                Ok(current.allow_atomic_publish)
            }
        }
    }
}

/// Opens the body bucket, creating it when missing.
pub async fn ensure_body_bucket(
    js: &Context,
    nats: &NatsConfig,
) -> Result<ObjectStore, SetupError> {
    if let Ok(store) = js.get_object_store(&nats.body_bucket).await {
        return Ok(store);
    }
    js.create_object_store(body_bucket_config(nats))
        .await
        .map_err(|source| SetupError::CreateBucket {
            bucket: nats.body_bucket.clone(),
            source,
        })
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
        let b = body_bucket_config(&nats);
        assert_eq!(b.bucket, "KUBEMAIL_BODIES");
        assert!(b.max_age.is_zero());
        assert_eq!(b.storage, StorageType::File);
    }
}
