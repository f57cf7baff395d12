//! What the operator does in NATS JetStream: on MailDomain deletion it removes the domain's
//! durable delivery consumer, which no Kubernetes owner reference can clean up.
//!
//! Naming follows the node's queue contract (`smtp-node/src/queue/mod.rs`): one stream
//! (default `KUBEMAIL`) with one subject per domain, `<subjectPrefix>.<domain>`, and one
//! durable pull consumer per domain, `kubemail-<domain with dots as dashes>`, whose name comes
//! from the node's own `delivery::consumer::consumer_name` ([`consumer_name`]).

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::ConsumerErrorKind;

/// Why the consumer could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot connect to NATS at {url}")]
    ConnectNats {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("cannot look up stream {stream}")]
    GetStream {
        stream: String,
        #[source]
        source: async_nats::jetstream::context::GetStreamError,
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

/// The durable consumer of a domain, `kubemail-example-com` for `example.com`: the node's own
/// definition, so both sides name it alike.
pub fn consumer_name(domain: &str) -> String {
    kubemail_smtp_node::delivery::consumer::consumer_name(domain)
}

/// Deletes the domain's consumer. `Ok(false)` when there was nothing to delete (no stream,
/// no consumer), so the finalizer is idempotent.
pub async fn delete_consumer(
    url: &str,
    stream: &str,
    domain: &str,
    timeout: Duration,
) -> Result<bool, QueueError> {
    tokio::time::timeout(timeout, delete_consumer_inner(url, stream, domain, timeout))
        .await
        .map_err(|_| QueueError::TimedOut(timeout))?
}

async fn delete_consumer_inner(
    url: &str,
    stream_name: &str,
    domain: &str,
    timeout: Duration,
) -> Result<bool, QueueError> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(timeout)
        .name("kubemail-operator")
        .connect(url)
        .await
        .map_err(|source| QueueError::ConnectNats {
            url: url.to_owned(),
            source,
        })?;
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
    let consumer = consumer_name(domain);
    match stream.delete_consumer(&consumer).await {
        Ok(_) => Ok(true),
        Err(e) => {
            if let ConsumerErrorKind::JetStream(js_err) = e.kind()
                && js_err.error_code() == ErrorCode::CONSUMER_NOT_FOUND
            {
                return Ok(false);
            }
            Err(QueueError::DeleteConsumer {
                stream: stream_name.to_owned(),
                consumer,
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
        assert_eq!(consumer_name("example.com"), "kubemail-example-com");
        assert_eq!(consumer_name("a-b.c.example"), "kubemail-a-b-c-example");
    }
}
