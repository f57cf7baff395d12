//! The webhook dispatcher of one event sink: a durable JetStream pull consumer on the events
//! stream, filtered on the sink's domain (and event types), and an HTTP client that POSTs
//! each event to the sink's URL, signed ([`super::signature`]).
//!
//! * **Nothing lost.** The consumer is durable and an event is acknowledged only after the
//!   receiver answered `2xx`, so a receiver that is down for an hour (or an operator that
//!   restarts) gets everything the stream still holds (`events.maxAge`, 7 days by default).
//! * **Ordered.** One event at a time (`max_ack_pending: 1`): the next is not sent before
//!   the current one was accepted, so events arrive in stream order, which is per recipient
//!   the order they happened in.
//! * **Retried with backoff.** Any other answer (and a timeout or a refused connection) is
//!   retried after [`MIN_BACKOFF`], doubling up to the sink's maximum; the event is held
//!   meanwhile (progress acknowledgements keep it with this dispatcher).
//! * **Exactly once, as far as HTTP allows.** A receiver sees an event again only when its
//!   `2xx` was lost (or the operator died before acknowledging it): it drops repeats by the
//!   event `id` (also in `Kubemail-Event-Id`).
//! * **`410 Gone`** pauses the sink: the dispatcher stops with the event unacknowledged, the
//!   sink's status says `Healthy=False` (`Gone`), and a change of the sink's spec resumes it.

use backon::{BackoffBuilder as _, ExponentialBuilder};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, AckKind, consumer};
use futures::StreamExt as _;
use kubemail_queue::events::{EVENTS_STREAM, EventType, events_domain_filter};
use tokio_util::sync::CancellationToken;

use super::signature;

/// First pause before retrying a failed POST.
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// How long the server waits for an acknowledgement before it would hand the event out
/// again; progress acknowledgements are sent every third of it while retrying.
const ACK_WAIT: Duration = Duration::from_secs(60);
/// How long one pull waits for a new event.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// Where and how a sink's events go.
#[derive(Clone)]
pub struct WebhookTarget {
    pub url: String,
    /// The HMAC key (the Secret's value). Never logged.
    pub secret: Vec<u8>,
    /// Deadline of one POST.
    pub timeout: Duration,
    /// Longest pause between retries.
    pub max_backoff: Duration,
}

impl std::fmt::Debug for WebhookTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookTarget")
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .field("max_backoff", &self.max_backoff)
            .finish_non_exhaustive()
    }
}

/// Which events a sink's consumer takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The durable consumer's name ([`consumer_name`]).
    pub consumer: String,
    /// The MailDomain's domain.
    pub domain: String,
    /// Only these types; empty: all.
    pub types: Vec<EventType>,
}

impl Subscription {
    /// The consumer's filter subjects.
    pub fn filters(&self) -> Vec<String> {
        if self.types.is_empty() {
            vec![events_domain_filter(&self.domain)]
        } else {
            self.types
                .iter()
                .map(|t| kubemail_queue::events::event_subject(&self.domain, *t))
                .collect()
        }
    }
}

/// The durable consumer name of the sink `name` in `namespace` (one NATS name token).
pub fn consumer_name(namespace: &str, name: &str, uid: &str) -> String {
    // Names are DNS labels/subdomains (no `_`), so `_` separates them unambiguously; the uid
    // keeps a re-created sink from inheriting its predecessor's position.
    let short_uid: String = uid.chars().filter(|c| *c != '-').take(12).collect();
    format!(
        "kubemail-sink_{namespace}_{}_{short_uid}",
        name.replace('.', "-")
    )
}

/// What the dispatcher knows about its sink, for the sink's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    pub last_success: Option<SystemTime>,
    pub last_error: Option<(SystemTime, String)>,
    /// Events delivered since the dispatcher started.
    pub delivered: u64,
    /// Events waiting (pending plus unacknowledged), when last looked at.
    pub backlog: Option<u64>,
    /// The receiver answered `410 Gone`; the dispatcher stopped.
    pub gone: bool,
    /// The dispatcher is running (false after it stopped or failed).
    pub running: bool,
}

/// Shared between a dispatcher and the controller that reports it.
#[derive(Debug, Clone, Default)]
pub struct SharedHealth(Arc<Mutex<Health>>);

impl SharedHealth {
    pub fn get(&self) -> Health {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut Health)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Why the dispatcher could not run.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("cannot open the events stream {EVENTS_STREAM}")]
    GetStream(#[source] async_nats::jetstream::context::GetStreamError),
    #[error("cannot create the consumer {0}")]
    CreateConsumer(
        String,
        #[source] async_nats::jetstream::stream::ConsumerError,
    ),
    #[error("cannot pull from the consumer")]
    Pull(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot build the HTTP client")]
    HttpClient(#[source] reqwest::Error),
}

/// Creates (or updates) the sink's durable consumer.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    subscription: &Subscription,
) -> Result<consumer::PullConsumer, DispatchError> {
    let stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(DispatchError::GetStream)?;
    let filters = subscription.filters();
    let config = consumer::pull::Config {
        durable_name: Some(subscription.consumer.clone()),
        description: Some(format!("kubemail event sink of {}", subscription.domain)),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_ack_pending: 1,
        // From when the sink was made; the durable position survives restarts.
        deliver_policy: consumer::DeliverPolicy::New,
        filter_subjects: filters,
        ..Default::default()
    };
    stream
        .create_consumer(config)
        .await
        .map_err(|e| DispatchError::CreateConsumer(subscription.consumer.clone(), e))
}

/// Deletes the sink's consumer (the sink was deleted); a missing one is fine.
pub async fn delete_consumer(js: &jetstream::Context, name: &str) -> Result<(), String> {
    let stream = match js.get_stream(EVENTS_STREAM).await {
        Ok(s) => s,
        Err(_) => return Ok(()),
    };
    match stream.delete_consumer(name).await {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("not found") => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs until `stop` fires or the receiver answers `410 Gone`, POSTing every event of the
/// subscription to `target` in order.
pub async fn run(
    js: jetstream::Context,
    subscription: Subscription,
    target: WebhookTarget,
    health: SharedHealth,
    stop: CancellationToken,
) -> Result<(), DispatchError> {
    let http = reqwest::Client::builder()
        .timeout(target.timeout)
        .user_agent(concat!("kubemail-operator/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(DispatchError::HttpClient)?;
    let consumer = ensure_consumer(&js, &subscription).await?;
    health.update(|h| h.running = true);
    let result = async {
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            update_backlog(&js, &subscription.consumer, &health).await;
            let mut messages = consumer
                .fetch()
                .max_messages(1)
                .expires(PULL_EXPIRES)
                .messages()
                .await
                .map_err(|e| DispatchError::Pull(Box::new(e)))?;
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    n = messages.next() => n,
                };
                let Some(message) = next else { break };
                let message = match message {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!(error = %e, "pull ended");
                        break;
                    }
                };
                let watch = (&js, subscription.consumer.as_str());
                match deliver(&http, &target, &message, &health, &stop, watch).await {
                    Delivered::Yes => {
                        if let Err(error) = message.double_ack().await {
                            tracing::warn!(%error, "acknowledgement not confirmed; the event may be sent again");
                        }
                    }
                    Delivered::Gone => {
                        health.update(|h| h.gone = true);
                        tracing::warn!(url = %target.url, "the sink answered 410 Gone; pausing it");
                        return Ok(());
                    }
                    Delivered::Stopped => return Ok(()),
                }
            }
        }
    }
    .await;
    update_backlog(&js, &subscription.consumer, &health).await;
    health.update(|h| h.running = false);
    result
}

enum Delivered {
    Yes,
    Gone,
    Stopped,
}

/// POSTs one event until the receiver takes it (or is gone, or we are told to stop).
async fn deliver(
    http: &reqwest::Client,
    target: &WebhookTarget,
    message: &jetstream::Message,
    health: &SharedHealth,
    stop: &CancellationToken,
    (js, consumer): (&jetstream::Context, &str),
) -> Delivered {
    let body = message.payload.clone();
    let id = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["id"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut delays = ExponentialBuilder::new()
        .with_min_delay(MIN_BACKOFF)
        .with_max_delay(target.max_backoff.max(MIN_BACKOFF))
        .without_max_times()
        .build();
    loop {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let result = http
            .post(&target.url)
            .header("Content-Type", "application/cloudevents+json")
            .header("Kubemail-Event-Id", &id)
            .header(
                signature::HEADER,
                signature::sign(&target.secret, now, &body),
            )
            .body(body.clone())
            .send()
            .await;
        let error = match result {
            Ok(response) if response.status().is_success() => {
                health.update(|h| {
                    h.last_success = Some(SystemTime::now());
                    h.delivered += 1;
                });
                return Delivered::Yes;
            }
            Ok(response) if response.status() == reqwest::StatusCode::GONE => {
                health.update(|h| {
                    h.last_error = Some((SystemTime::now(), "the sink answered 410 Gone".into()))
                });
                return Delivered::Gone;
            }
            Ok(response) => format!("the sink answered {}", response.status()),
            Err(e) => format!("cannot reach the sink: {}", without_url(&e)),
        };
        let backoff = delays.next().unwrap_or(target.max_backoff.max(MIN_BACKOFF));
        tracing::info!(event = %id, error = %error, retry_in = ?backoff, "event not delivered; retrying");
        health.update(|h| h.last_error = Some((SystemTime::now(), error)));
        // While an event is stuck the backlog is what the sink's owner looks at.
        update_backlog(js, consumer, health).await;
        if !wait_holding(message, backoff, stop).await {
            return Delivered::Stopped;
        }
    }
}

/// Waits `pause` while keeping the event with this dispatcher; false when stopped.
async fn wait_holding(
    message: &jetstream::Message,
    pause: Duration,
    stop: &CancellationToken,
) -> bool {
    let deadline = tokio::time::Instant::now() + pause;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return true;
        }
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(left.min(ACK_WAIT / 3)) => {
                if let Err(error) = message.ack_with(AckKind::Progress).await {
                    tracing::debug!(%error, "progress acknowledgement failed");
                }
            }
        }
    }
}

/// A reqwest error's text without the URL (it may carry credentials in its query).
fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(url.as_str(), "<sink url>");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

async fn update_backlog(js: &jetstream::Context, consumer: &str, health: &SharedHealth) {
    let Ok(stream) = js.get_stream(EVENTS_STREAM).await else {
        return;
    };
    if let Ok(info) = stream.consumer_info(consumer).await {
        let backlog = info.num_pending + info.num_ack_pending as u64;
        health.update(|h| h.backlog = Some(backlog));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_names_are_tokens_and_filters_follow_the_types() {
        let name = consumer_name(
            "team-a",
            "hooks.prod",
            "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        );
        assert_eq!(name, "kubemail-sink_team-a_hooks-prod_1b4e28ba2fa1");
        assert!(!name.contains(['.', '*', '>', ' ']));
        let mut s = Subscription {
            consumer: name,
            domain: "Example.com".into(),
            types: vec![],
        };
        assert_eq!(s.filters(), vec!["kubemail.events.example_com.>"]);
        s.types = vec![EventType::Bounced, EventType::Complaint];
        assert_eq!(
            s.filters(),
            vec![
                "kubemail.events.example_com.bounced",
                "kubemail.events.example_com.complaint"
            ]
        );
    }
}
