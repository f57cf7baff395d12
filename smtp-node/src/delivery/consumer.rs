//! The durable JetStream pull consumer of a MailDomain and the loop that pulls from it.
//!
//! Every replica of a domain uses the same durable consumer
//! ([`kubemail_queue::consumer_name`], which the operator's finalizer deletes), filtered on
//! the domain's subject, so the server hands each queue entry to one worker at a time and
//! adding replicas adds delivery capacity. Settings: explicit acks,
//! a finite `max_deliver` (poison messages, see [`super::worker`]), a bounded
//! `max_ack_pending`, and an `ack_wait` that a long delivery extends with progress acks.
//!
//! **Upgrade from the legacy name.** Earlier versions named the consumer
//! [`kubemail_queue::legacy_consumer_name`] (dots as dashes, which let two domains share a
//! name). A work-queue stream refuses a second consumer whose filter overlaps, so creating
//! ours fails while that one exists. Then, and only if the overlapping consumer is the legacy
//! name of this domain with exactly this domain's subject as its filter, it is deleted and
//! ours created: work-queue retention keeps every unacknowledged entry in the stream, so the
//! new consumer delivers all of them (an entry in flight at an old node at that moment may
//! be delivered twice, never lost). Any other overlapping consumer is left alone and the
//! error reported.
//!
//! The loop only asks for as many entries as it has free delivery slots, so no entry waits
//! in a local buffer while its ack wait runs out (which would redeliver it to another
//! worker in parallel).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::stream::{ConsumerErrorKind, Stream};
use futures::StreamExt as _;
use kubemail_queue::names::consumer_filters;
use kubemail_queue::{consumer_name, is_legacy_consumer, legacy_consumer_name};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::DeliveryContext;
use crate::config::ConsumerConfig;
use crate::config::NatsConfig;

/// How long one pull request waits for entries before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Longest wait for the delivery pauses to be read before pulling anyway.
const PAUSES_LOAD_LIMIT: Duration = Duration::from_secs(10);
/// Longest pause between attempts to set up the consumer or to pull after errors.
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Why the consumer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("cannot look up stream {stream}: {source}")]
    GetStream {
        stream: String,
        #[source]
        source: async_nats::jetstream::context::GetStreamError,
    },
    #[error("cannot create consumer {name}: {source}")]
    CreateConsumer {
        name: String,
        #[source]
        source: async_nats::jetstream::stream::ConsumerError,
    },
    #[error("consumer {name} is not there (yet): {source}")]
    OpenConsumer {
        name: String,
        #[source]
        source: async_nats::jetstream::stream::ConsumerError,
    },
    #[error("cannot inspect the legacy consumer {name}: {source}")]
    InspectLegacyConsumer {
        name: String,
        #[source]
        source: async_nats::jetstream::context::ConsumerInfoError,
    },
    #[error("cannot delete the legacy consumer {name}: {source}")]
    DeleteLegacyConsumer {
        name: String,
        #[source]
        source: async_nats::jetstream::stream::ConsumerError,
    },
}

pub use kubemail_queue::streams::consumer_config;

/// Opens the consumer that someone else (the operator) created (`nats.manageStreams:
/// false`): the node's credentials may read it, not create it.
pub async fn open_consumer(
    js: &async_nats::jetstream::Context,
    nats: &NatsConfig,
    domain: &str,
) -> Result<PullConsumer, ConsumerError> {
    let name = consumer_name(domain);
    js.get_consumer_from_stream(&name, &nats.stream)
        .await
        .map_err(|source| ConsumerError::OpenConsumer { name, source })
}

/// Creates the consumer, or updates it to the current settings; replaces this domain's
/// consumer of the legacy name (see the module doc).
pub async fn ensure_consumer(
    js: &async_nats::jetstream::Context,
    nats: &NatsConfig,
    domain: &str,
    config: &ConsumerConfig,
) -> Result<PullConsumer, ConsumerError> {
    let stream = js
        .get_stream(&nats.stream)
        .await
        .map_err(|source| ConsumerError::GetStream {
            stream: nats.stream.clone(),
            source,
        })?;
    let create_error = |source| ConsumerError::CreateConsumer {
        name: consumer_name(domain),
        source,
    };
    match stream
        .create_consumer(consumer_config(nats, domain, config))
        .await
    {
        Ok(consumer) => return Ok(consumer),
        Err(error) if overlaps(&error) => {
            if !remove_legacy_consumer(&stream, nats, domain).await? {
                return Err(create_error(error));
            }
        }
        Err(error) => return Err(create_error(error)),
    }
    stream
        .create_consumer(consumer_config(nats, domain, config))
        .await
        .map_err(create_error)
}

/// Whether creating a consumer failed because another one on the work-queue stream filters
/// an overlapping subject.
fn overlaps(error: &async_nats::jetstream::stream::ConsumerError) -> bool {
    matches!(
        error.kind(),
        ConsumerErrorKind::JetStream(e)
            if e.error_code() == ErrorCode::CONSUMER_WQ_CONSUMER_NOT_UNIQUE
    )
}

/// Deletes the consumer an earlier version made for `domain`, if it exists under the legacy
/// name with exactly the domain's subject as its only filter. Returns whether it was
/// deleted (or vanished meanwhile, as when another replica deleted it first).
async fn remove_legacy_consumer(
    stream: &Stream,
    nats: &NatsConfig,
    domain: &str,
) -> Result<bool, ConsumerError> {
    let legacy = legacy_consumer_name(domain);
    if legacy == consumer_name(domain) {
        // A domain without dots has one name in both schemes: nothing to replace.
        return Ok(false);
    }
    let info = match stream.consumer_info(&legacy).await {
        Ok(info) => info,
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(ConsumerError::InspectLegacyConsumer {
                name: legacy,
                source,
            });
        }
    };
    let config = &info.config;
    let filters = consumer_filters(config);
    if !is_legacy_consumer(&info.name, &filters, &nats.subject_prefix, domain) {
        tracing::warn!(
            %domain,
            consumer = %info.name,
            ?filters,
            "a consumer of the legacy name filters other subjects; leaving it alone"
        );
        return Ok(false);
    }
    match stream.delete_consumer(&legacy).await {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                ConsumerErrorKind::JetStream(js) if js.error_code() == ErrorCode::CONSUMER_NOT_FOUND
            ) => {}
        Err(source) => {
            return Err(ConsumerError::DeleteLegacyConsumer {
                name: legacy,
                source,
            });
        }
    }
    tracing::info!(
        %domain,
        legacy = %legacy,
        consumer = %consumer_name(domain),
        pending = info.num_pending,
        unacknowledged = info.num_ack_pending,
        "replaced the consumer of the legacy name; its entries stay in the stream for the new one"
    );
    Ok(true)
}

/// Pulls entries of `domain` and hands each to [`super::worker::handle`], until the node
/// stops.
pub async fn run(ctx: Arc<DeliveryContext>, domain: String) {
    let stop = ctx.shutdown.stop_token().clone();
    run_until(ctx, domain, stop).await;
}

/// Like [`run`], until `stop` fires (a child of the node's stop signal, cancelled on its own
/// when the domain is removed by a config reload).
pub async fn run_until(ctx: Arc<DeliveryContext>, domain: String, stop: CancellationToken) {
    // No entry before the pauses in force are known (see `super::pause`).
    ctx.pauses.wait_loaded(PAUSES_LOAD_LIMIT).await;
    let slots = Arc::new(Semaphore::new(ctx.config.concurrency.max(1) as usize));
    let first_delay = Duration::from_millis(200);
    let mut delay = crate::backoff::delays(first_delay, RETRY_MAX);
    'setup: loop {
        let consumer = loop {
            let consumer = if ctx.nats.manage_streams {
                ensure_consumer(&ctx.js, &ctx.nats, &domain, &ctx.config.consumer).await
            } else {
                open_consumer(&ctx.js, &ctx.nats, &domain).await
            };
            match consumer {
                Ok(c) => {
                    tracing::info!(%domain, consumer = %consumer_name(&domain), "delivery consumer ready");
                    break c;
                }
                Err(error) => {
                    tracing::warn!(%domain, %error, "cannot set up the delivery consumer; retrying");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay.next_delay()) => {}
            }
        };
        delay = crate::backoff::delays(first_delay, RETRY_MAX);
        loop {
            // Wait for at least one free slot, then ask for as many entries as are free.
            let first = tokio::select! {
                _ = stop.cancelled() => return,
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let mut permits = vec![first];
            while let Ok(p) = slots.clone().try_acquire_owned() {
                permits.push(p);
            }
            let batch = consumer
                .batch()
                .max_messages(permits.len())
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(error) => {
                    tracing::warn!(%domain, %error, "pull request failed");
                    drop(permits);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay.next_delay()) => {}
                    }
                    continue 'setup;
                }
            };
            loop {
                let next = tokio::select! {
                    // Entries of an unfinished pull come back after their ack wait.
                    _ = stop.cancelled() => return,
                    next = batch.next() => next,
                };
                match next {
                    None => break,
                    Some(Ok(message)) => {
                        let Some(permit) = permits.pop() else {
                            // More than asked for cannot happen; nak so another worker gets it.
                            let _ = message
                                .ack_with(async_nats::jetstream::AckKind::Nak(None))
                                .await;
                            continue;
                        };
                        let tracker = ctx.shutdown.tracker().clone();
                        let ctx = ctx.clone();
                        let domain = domain.clone();
                        tracker.spawn(async move {
                            super::worker::handle(&ctx, &domain, message).await;
                            drop(permit);
                        });
                    }
                    Some(Err(error)) => {
                        // The consumer may be gone (deleted, or the stream was recreated):
                        // set it up again after a pause.
                        tracing::warn!(%domain, %error, "pulling entries failed");
                        drop(permits);
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(delay.next_delay()) => {}
                        }
                        continue 'setup;
                    }
                }
            }
            delay = crate::backoff::delays(first_delay, RETRY_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::consumer::AckPolicy;

    use super::*;

    #[test]
    fn consumer_settings_bound_redelivery_and_backlog() {
        let nats = NatsConfig::default();
        let c = consumer_config(&nats, "Mail.Example.com", &ConsumerConfig::default());
        assert_eq!(c.durable_name.as_deref(), Some("kubemail-mail_example_com"));
        assert_eq!(c.filter_subject, "kubemail.queue.mail.example.com");
        assert_eq!(c.ack_policy, AckPolicy::Explicit, "JS-CFG-06");
        assert!(c.max_deliver > 0, "JS-CFG-07: finite max_deliver");
        assert!(c.max_ack_pending > 0, "JS-CFG-08: bounded");
        assert_eq!(c.ack_wait, Duration::from_secs(30));
    }
}
