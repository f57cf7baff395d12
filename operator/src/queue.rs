//! What the operator does in NATS JetStream: on MailDomain deletion it removes the domain's
//! durable delivery consumer, which no Kubernetes owner reference can clean up.
//!
//! Naming is the queue contract's (the crate `kubemail_queue`, shared with the node): one
//! stream (default `KUBEMAIL`) with one subject per domain, `<subjectPrefix>.<domain>`, and
//! one durable pull consumer per domain, [`consumer_name`]. A domain last served by an
//! earlier node version may still have its consumer under the legacy name (dots as dashes),
//! so the finalizer deletes that name too, but only when its filter is the domain's subject:
//! the legacy scheme gave `mail.corp.com` and `mail-corp.com` the same name, and the other
//! domain's consumer must survive.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::ConsumerErrorKind;

use crate::nats::NatsAccess;

/// Why the consumer could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot connect to NATS")]
    ConnectNats(#[source] crate::nats::ManageError),
    #[error("cannot look up stream {stream}")]
    GetStream {
        stream: String,
        #[source]
        source: async_nats::jetstream::context::GetStreamError,
    },
    #[error("cannot inspect consumer {consumer} of stream {stream}")]
    InspectConsumer {
        stream: String,
        consumer: String,
        #[source]
        source: async_nats::jetstream::context::ConsumerInfoError,
    },
    #[error("cannot delete consumer {consumer} of stream {stream}")]
    DeleteConsumer {
        stream: String,
        consumer: String,
        #[source]
        source: async_nats::jetstream::stream::ConsumerError,
    },
    #[error("NATS did not answer within {0:?}")]
    TimedOut(Duration),
}

/// The durable consumer of a domain, `kubemail-example_com` for `example.com`: the queue
/// contract's definition, so the node and the operator name it alike.
pub fn consumer_name(domain: &str) -> String {
    kubemail_queue::consumer_name(domain)
}

/// Deletes the domain's consumer, and its consumer of the legacy name. `Ok(false)` when
/// there was nothing to delete (no stream, no consumer), so the finalizer is idempotent.
pub async fn delete_consumer(
    access: &NatsAccess,
    stream: &str,
    domain: &str,
    timeout: Duration,
) -> Result<bool, QueueError> {
    tokio::time::timeout(timeout, delete_consumers(access, stream, domain))
        .await
        .map_err(|_| QueueError::TimedOut(timeout))?
}

async fn delete_consumers(
    access: &NatsAccess,
    stream_name: &str,
    domain: &str,
) -> Result<bool, QueueError> {
    let client = access.connect().await.map_err(QueueError::ConnectNats)?;
    let js = jetstream::new(client);
    let stream = match js.get_stream(stream_name).await {
        Ok(s) => s,
        Err(e) => {
            if let GetStreamErrorKind::JetStream(js_err) = e.kind()
                && js_err.error_code() == ErrorCode::STREAM_NOT_FOUND
            {
                return Ok(false);
            }
            return Err(QueueError::GetStream {
                stream: stream_name.to_owned(),
                source: e,
            });
        }
    };
    let mut deleted = delete_one(&stream, stream_name, &consumer_name(domain)).await?;
    if let Some(legacy) = legacy_consumer_of(&stream, stream_name, domain).await? {
        deleted |= delete_one(&stream, stream_name, &legacy).await?;
    }
    Ok(deleted)
}

/// The domain's consumer of the legacy name, if the stream has one. The node's stream
/// takes `<subjectPrefix>.>`, so the prefixes come from the stream itself and the operator
/// needs no setting for them.
async fn legacy_consumer_of(
    stream: &jetstream::stream::Stream,
    stream_name: &str,
    domain: &str,
) -> Result<Option<String>, QueueError> {
    let legacy = kubemail_queue::legacy_consumer_name(domain);
    if legacy == consumer_name(domain) {
        return Ok(None);
    }
    let info = match stream.consumer_info(&legacy).await {
        Ok(info) => info,
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(QueueError::InspectConsumer {
                stream: stream_name.to_owned(),
                consumer: legacy,
                source,
            });
        }
    };
    let filters = kubemail_queue::names::consumer_filters(&info.config);
    let ours = stream
        .cached_info()
        .config
        .subjects
        .iter()
        .filter_map(|s| s.strip_suffix(".>"))
        .any(|prefix| kubemail_queue::is_legacy_consumer(&info.name, &filters, prefix, domain));
    if !ours {
        tracing::info!(
            consumer = %legacy,
            ?filters,
            "a consumer of the legacy name belongs to another domain; leaving it"
        );
        return Ok(None);
    }
    Ok(Some(legacy))
}

/// Deletes `domain`'s consumer of the legacy name when the stream has one with exactly the
/// domain's subject as its filter; whether it did.
pub async fn remove_legacy_consumer(
    stream: &jetstream::stream::Stream,
    stream_name: &str,
    domain: &str,
) -> Result<bool, QueueError> {
    match legacy_consumer_of(stream, stream_name, domain).await? {
        Some(legacy) => delete_one(stream, stream_name, &legacy).await,
        None => Ok(false),
    }
}

/// Deletes one consumer; `Ok(false)` when it did not exist.
async fn delete_one(
    stream: &jetstream::stream::Stream,
    stream_name: &str,
    consumer: &str,
) -> Result<bool, QueueError> {
    match stream.delete_consumer(consumer).await {
        Ok(_) => Ok(true),
        Err(e) => {
            if let ConsumerErrorKind::JetStream(js_err) = e.kind()
                && js_err.error_code() == ErrorCode::CONSUMER_NOT_FOUND
            {
                return Ok(false);
            }
            Err(QueueError::DeleteConsumer {
                stream: stream_name.to_owned(),
                consumer: consumer.to_owned(),
                source: e,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_names_are_valid_nats_names() {
        assert_eq!(consumer_name("example.com"), "kubemail-example_com");
        assert_eq!(consumer_name("a-b.c.example"), "kubemail-a-b_c_example");
        assert_ne!(
            consumer_name("mail.corp.com"),
            consumer_name("mail-corp.com")
        );
    }
}
