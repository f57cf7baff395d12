//! The EventSink controller: resolves a sink's MailDomain and signing Secret, runs its
//! webhook dispatcher ([`crate::events::dispatcher`]) in the operator (the leader), or keeps
//! the durable consumer of a webhook-less sink, and reports the sink's health.
//!
//! ```text
//! dereference (MailDomain, Secret) ─► dispatcher (start / keep / restart / pause) ─► status
//! ```
//!
//! A dispatcher runs per sink and spec (generation and Secret version): a change restarts
//! it with the new settings, which is also how a sink paused by `410 Gone` resumes. The pause
//! is kept in the status, so a new leader does not send to a gone sink again. The finalizer
//! stops the dispatcher and deletes the sink's consumer. The status is refreshed every
//! [`STATUS_REFRESH`] while a dispatcher runs: last success, last error, backlog.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field, info_span, instrument};

use crate::controller::{Context, Error, api_for, condition, condition_with, referrers};
use crate::crd::MailDomain;
use crate::crd::event_sink::{EventSink, EventSinkStatus};
use crate::events::dispatcher::{
    self, Health, SharedHealth, Subscription, WebhookTarget, consumer_name,
};
use crate::timestamps::{self, UnixSeconds, parse_duration, rfc3339};

/// Metric label of this controller.
pub const CONTROLLER: &str = "eventsink";
/// The finalizer: the sink's consumer lives in NATS, out of reach of owner references.
pub const FINALIZER: &str = "eventsinks.kubemail.io";
/// How often the status of a sink with a running dispatcher is refreshed.
pub const STATUS_REFRESH: Duration = Duration::from_secs(10);
/// Pause before a dispatcher that failed (NATS away, no events stream yet) starts again.
const RESTART_DELAY: Duration = Duration::from_secs(10);

/// The running dispatchers, by sink uid.
#[derive(Default)]
pub struct Dispatchers(Mutex<HashMap<String, Running>>);

struct Running {
    /// The spec version it runs with (generation and Secret version).
    version: String,
    stop: CancellationToken,
    health: SharedHealth,
}

impl Dispatchers {
    fn health(&self, uid: &str) -> Option<(String, Health)> {
        self.lock()
            .get(uid)
            .map(|r| (r.version.clone(), r.health.get()))
    }

    fn stop(&self, uid: &str) {
        if let Some(r) = self.lock().remove(uid) {
            r.stop.cancel();
        }
    }

    /// Stops every dispatcher (leadership lost, shutdown).
    pub fn stop_all(&self) {
        for (_, r) in self.lock().drain() {
            r.stop.cancel();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs the EventSink controller until `stop` fires (one controller per watched namespace);
/// then stops every dispatcher.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    if !crate::controller::wait_for_crd(&ctx, "eventsinks.kubemail.io", &stop).await {
        return;
    }
    ctx.in_every_scope(&stop, run_in).await;
    ctx.sinks.stop_all();
}

async fn run_in(ctx: Arc<Context>, ns: Option<String>, stop: CancellationToken) {
    let client = ctx.client.clone();
    let controller = Controller::new(
        api_for::<EventSink>(&client, ns.as_deref()),
        watcher::Config::default().any_semantic(),
    )
    .with_config(
        kube::runtime::controller::Config::default().concurrency(ctx.config.reconcile_concurrency),
    );
    let secrets = controller.store();
    let domains = controller.store();
    // Metadata only, like the MailDomain controller: a name is all the mapping needs, and no
    // Secret's data is cached.
    let secret_events = watcher(
        api_for::<PartialObjectMeta<Secret>>(&client, ns.as_deref()),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects();
    controller
        .watches_stream(secret_events, move |secret: PartialObjectMeta<Secret>| {
            referrers(&secrets, &secret, |s: &EventSink, name| {
                s.spec
                    .webhook
                    .as_ref()
                    .is_some_and(|w| w.secret_ref.name == name)
            })
        })
        .watches(
            api_for::<MailDomain>(&client, ns.as_deref()),
            watcher::Config::default(),
            move |md: MailDomain| {
                referrers(&domains, &md, |s: &EventSink, name| {
                    s.spec.mail_domain_ref.name == name
                })
            },
        )
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|_| async {})
        .instrument(info_span!(
            "eventsinks.kubemail.io",
            namespace = ns.as_deref().unwrap_or("*")
        ))
        .await;
}

#[instrument(
    parent = None,
    skip(sink, ctx),
    fields(
        otel.name = "eventsink.reconcile",
        controller = CONTROLLER,
        namespace = field::Empty,
        name = %sink.name_any(),
        trace_id = field::Empty,
    )
)]
async fn reconcile(sink: Arc<EventSink>, ctx: Arc<Context>) -> Result<Action, Error> {
    crate::telemetry::record_trace_id();
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let ns = sink.namespace().ok_or(Error::MissingNamespace)?;
    tracing::Span::current().record("namespace", field::display(&ns));
    let api: Api<EventSink> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, sink, |event| async {
        match event {
            Finalizer::Apply(sink) => apply(&sink, &ctx, &ns).await,
            Finalizer::Cleanup(sink) => cleanup(&sink, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// What the spec resolves to.
struct Resolved {
    subscription: Subscription,
    webhook: Option<(WebhookTarget, String)>,
}

async fn apply(sink: &EventSink, ctx: &Arc<Context>, ns: &str) -> Result<Action, Error> {
    let uid = sink.metadata.uid.clone().unwrap_or_default();
    let generation = sink.metadata.generation;
    let previous = sink.status.clone().unwrap_or_default();
    let now = timestamps::now();
    let resolved = match resolve(sink, ctx, ns, &uid).await? {
        Ok(r) => r,
        Err((reason, message)) => {
            ctx.sinks.stop(&uid);
            let status = EventSinkStatus {
                observed_generation: generation,
                conditions: vec![
                    condition(
                        &previous.conditions,
                        "Ready",
                        false,
                        reason,
                        message,
                        generation,
                        now,
                    ),
                    condition_with(
                        &previous.conditions,
                        "Healthy",
                        "Unknown",
                        "NotReady",
                        "the sink is not ready".to_owned(),
                        generation,
                        now,
                    ),
                ],
                ..EventSinkStatus::default()
            };
            publish(ctx, sink, status).await?;
            return Ok(Action::requeue(ctx.config.resync));
        }
    };
    let filters = resolved.subscription.filters();
    let Some((target, version)) = resolved.webhook else {
        // A consumer for the user's own NATS client.
        ctx.sinks.stop(&uid);
        let js = connect(ctx).await?;
        let consumer = tokio::time::timeout(
            ctx.config.nats_timeout,
            dispatcher::ensure_consumer(&js, &resolved.subscription),
        )
        .await;
        let (ok, reason, message) = match consumer {
            Ok(Ok(_)) => (
                true,
                "ConsumerReady",
                format!(
                    "pull from the durable consumer {} of stream {}",
                    resolved.subscription.consumer,
                    kubemail_queue::events::EVENTS_STREAM
                ),
            ),
            Ok(Err(e)) => (false, "ConsumerFailed", crate::controller::chain(&e)),
            Err(_) => (
                false,
                "ConsumerFailed",
                "NATS did not answer in time".to_owned(),
            ),
        };
        let backlog = backlog(&js, &resolved.subscription.consumer).await;
        let status = EventSinkStatus {
            observed_generation: generation,
            stream: Some(kubemail_queue::events::EVENTS_STREAM.to_owned()),
            consumer: Some(resolved.subscription.consumer.clone()),
            filter_subjects: filters,
            backlog,
            conditions: vec![
                condition(
                    &previous.conditions,
                    "Ready",
                    ok,
                    reason,
                    message,
                    generation,
                    now,
                ),
                condition_with(
                    &previous.conditions,
                    "Healthy",
                    "Unknown",
                    "NatsConsumer",
                    "events are pulled by a client of your own".to_owned(),
                    generation,
                    now,
                ),
            ],
            ..EventSinkStatus::default()
        };
        publish(ctx, sink, status).await?;
        return Ok(Action::requeue(ctx.config.resync));
    };

    // A pause outlives the operator: a new leader does not send to a gone sink again.
    let paused_before = previous.paused && previous.observed_generation == generation;
    let health = match ctx.sinks.health(&uid) {
        Some((v, h)) if v == version => Some(h),
        _ if paused_before => None,
        _ => {
            ctx.sinks.stop(&uid);
            let access = ctx.nats_access().await?;
            Some(start(
                ctx,
                access,
                &uid,
                version,
                resolved.subscription.clone(),
                target,
            ))
        }
    };
    let status = compute_status(
        &previous,
        generation,
        &resolved.subscription.consumer,
        filters,
        health.as_ref(),
        paused_before,
        now,
    );
    publish(ctx, sink, status).await?;
    Ok(Action::requeue(STATUS_REFRESH))
}

/// The MailDomain's domain and the webhook settings; `Ok(Err(..))`: not ready, why.
async fn resolve(
    sink: &EventSink,
    ctx: &Context,
    ns: &str,
    uid: &str,
) -> Result<Result<Resolved, (&'static str, String)>, Error> {
    let md_name = &sink.spec.mail_domain_ref.name;
    let md = Api::<MailDomain>::namespaced(ctx.client.clone(), ns)
        .get_opt(md_name)
        .await
        .map_err(|source| Error::ReadObject {
            kind: "MailDomain",
            name: md_name.clone(),
            source,
        })?;
    let Some(md) = md else {
        return Ok(Err((
            "MailDomainNotFound",
            format!(
                "spec.mailDomainRef names MailDomain {md_name}, which does not exist in this namespace"
            ),
        )));
    };
    let subscription = Subscription {
        consumer: consumer_name(ns, &sink.name_any(), uid),
        domain: md.spec.domain.clone(),
        types: sink.spec.types.iter().map(|t| t.event_type()).collect(),
    };
    let Some(webhook) = &sink.spec.webhook else {
        return Ok(Ok(Resolved {
            subscription,
            webhook: None,
        }));
    };
    let secret_name = &webhook.secret_ref.name;
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .get_opt(secret_name)
        .await
        .map_err(|source| Error::ReadObject {
            kind: "Secret",
            name: secret_name.clone(),
            source,
        })?;
    let Some(secret) = secret else {
        return Ok(Err((
            "SecretNotFound",
            format!("spec.webhook.secretRef names Secret {secret_name}, which does not exist"),
        )));
    };
    let key = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&webhook.secret_ref.key))
        .map(|v| v.0.clone())
        .filter(|v| !v.is_empty());
    let Some(key) = key else {
        return Ok(Err((
            "SecretKeyMissing",
            format!(
                "Secret {secret_name} has no non-empty key {}",
                webhook.secret_ref.key
            ),
        )));
    };
    let duration =
        |text: &str, fallback: u64| parse_duration(text).unwrap_or(Duration::from_secs(fallback));
    let version = format!(
        "{}/{}",
        sink.metadata.generation.unwrap_or(0),
        secret.metadata.resource_version.clone().unwrap_or_default()
    );
    Ok(Ok(Resolved {
        subscription,
        webhook: Some((
            WebhookTarget {
                url: webhook.url.clone(),
                secret: key,
                timeout: duration(&webhook.timeout, 10),
                max_backoff: duration(&webhook.max_backoff, 300),
            },
            version,
        )),
    }))
}

/// Starts a dispatcher that restarts itself after failures until stopped or gone.
fn start(
    ctx: &Arc<Context>,
    access: crate::nats::NatsAccess,
    uid: &str,
    version: String,
    subscription: Subscription,
    target: WebhookTarget,
) -> Health {
    let stop = CancellationToken::new();
    let health = SharedHealth::default();
    let task_stop = stop.clone();
    let task_health = health.clone();
    tracing::info!(consumer = %subscription.consumer, url = %target.url, "starting the webhook dispatcher");
    tokio::spawn(async move {
        loop {
            let result = match access.connect().await {
                Ok(client) => {
                    dispatcher::run(
                        async_nats::jetstream::new(client),
                        subscription.clone(),
                        target.clone(),
                        task_health.clone(),
                        task_stop.clone(),
                    )
                    .await
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot connect to NATS for the dispatcher");
                    Ok(())
                }
            };
            if let Err(e) = result {
                tracing::warn!(error = %crate::controller::chain(&e), "the dispatcher stopped; restarting");
            }
            if task_stop.is_cancelled() || task_health.get().gone {
                return;
            }
            tokio::select! {
                _ = task_stop.cancelled() => return,
                _ = tokio::time::sleep(RESTART_DELAY) => {}
            }
        }
    });
    ctx.sinks.lock().insert(
        uid.to_owned(),
        Running {
            version,
            stop,
            health: health.clone(),
        },
    );
    health.get()
}

/// The status of a webhook sink. Pure.
pub fn compute_status(
    previous: &EventSinkStatus,
    generation: Option<i64>,
    consumer: &str,
    filters: Vec<String>,
    health: Option<&Health>,
    paused_before: bool,
    now: UnixSeconds,
) -> EventSinkStatus {
    let secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    };
    let paused = paused_before || health.is_some_and(|h| h.gone);
    let last_success = health
        .and_then(|h| h.last_success.map(|t| rfc3339(secs(t))))
        .or_else(|| previous.last_success.clone());
    let (last_error_time, last_error) = match health.and_then(|h| h.last_error.clone()) {
        Some((t, e)) => (Some(rfc3339(secs(t))), Some(e)),
        None => (
            previous.last_error_time.clone(),
            previous.last_error.clone(),
        ),
    };
    let backlog = health
        .and_then(|h| h.backlog)
        .map(|b| i64::try_from(b).unwrap_or(i64::MAX))
        .or(previous.backlog);
    let failing = match (
        health.and_then(|h| h.last_error.as_ref()),
        health.and_then(|h| h.last_success),
    ) {
        (Some((e, _)), Some(s)) => *e > s,
        (Some(_), None) => true,
        _ => false,
    };
    let healthy = if paused {
        condition(
            &previous.conditions,
            "Healthy",
            false,
            "Gone",
            format!(
                "the webhook answered 410 Gone; sending is paused with {} event(s) waiting; change the spec to resume",
                backlog.unwrap_or(0)
            ),
            generation,
            now,
        )
    } else if failing {
        condition(
            &previous.conditions,
            "Healthy",
            false,
            "Failing",
            format!("retrying: {}", last_error.clone().unwrap_or_default()),
            generation,
            now,
        )
    } else if last_success.is_some() && health.is_some_and(|h| h.last_success.is_some()) {
        condition(
            &previous.conditions,
            "Healthy",
            true,
            "Delivering",
            "the webhook takes events".to_owned(),
            generation,
            now,
        )
    } else {
        condition_with(
            &previous.conditions,
            "Healthy",
            "Unknown",
            "NoEventsYet",
            "no event was sent since the dispatcher started".to_owned(),
            generation,
            now,
        )
    };
    let ready = condition(
        &previous.conditions,
        "Ready",
        true,
        "DispatcherRunning",
        format!("events are sent to the webhook through consumer {consumer}"),
        generation,
        now,
    );
    EventSinkStatus {
        observed_generation: generation,
        stream: Some(kubemail_queue::events::EVENTS_STREAM.to_owned()),
        consumer: Some(consumer.to_owned()),
        filter_subjects: filters,
        backlog,
        last_success,
        last_error_time,
        last_error,
        paused,
        conditions: vec![ready, healthy],
    }
}

/// A JetStream context on the operator's NATS (its credentials and TLS), within the NATS
/// deadline.
pub async fn connect(ctx: &Context) -> Result<async_nats::jetstream::Context, Error> {
    let access = ctx.nats_access().await?;
    let client = access.connect().await.map_err(|source| Error::Nats {
        action: "connect",
        source: Box::new(source),
    })?;
    let mut js = async_nats::jetstream::new(client);
    js.set_timeout(ctx.config.nats_timeout);
    Ok(js)
}

async fn backlog(js: &async_nats::jetstream::Context, consumer: &str) -> Option<i64> {
    let stream = js
        .get_stream(kubemail_queue::events::EVENTS_STREAM)
        .await
        .ok()?;
    let info = stream.consumer_info(consumer).await.ok()?;
    i64::try_from(info.num_pending + info.num_ack_pending as u64).ok()
}

async fn cleanup(sink: &EventSink, ctx: &Arc<Context>) -> Result<Action, Error> {
    let uid = sink.metadata.uid.clone().unwrap_or_default();
    ctx.sinks.stop(&uid);
    let ns = sink.namespace().ok_or(Error::MissingNamespace)?;
    let name = consumer_name(&ns, &sink.name_any(), &uid);
    let js = connect(ctx).await?;
    dispatcher::delete_consumer(&js, &name)
        .await
        .map_err(|e| Error::Nats {
            action: "delete the event sink's consumer",
            source: e.into(),
        })?;
    tracing::info!(consumer = %name, "deleted the event sink's consumer");
    Ok(Action::await_change())
}

async fn publish(ctx: &Context, sink: &EventSink, status: EventSinkStatus) -> Result<(), Error> {
    crate::controller::apply_status(ctx, sink, sink.status.as_ref(), &status)
        .await
        .map(|_| ())
}

fn error_policy(sink: Arc<EventSink>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failed(CONTROLLER, error.metric_label());
    tracing::warn!(name = %sink.name_any(), error = %crate::controller::chain(error), "event sink reconcile failed");
    Action::requeue(ctx.backoff.next(&format!(
        "sink/{}",
        sink.metadata.uid.clone().unwrap_or_default()
    )))
}

/// The conditions a test or a person reads first.
pub fn healthy(status: &EventSinkStatus) -> Option<&Condition> {
    status.conditions.iter().find(|c| c.type_ == "Healthy")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn health_becomes_conditions() {
        let previous = EventSinkStatus::default();
        let mut h = Health {
            last_error: Some((at(10), "the sink answered 500 Internal Server Error".into())),
            backlog: Some(3),
            running: true,
            ..Health::default()
        };
        let s = compute_status(&previous, Some(1), "c", vec![], Some(&h), false, 100);
        let c = healthy(&s).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Failing"));
        assert!(c.message.contains("500"));
        assert_eq!(s.backlog, Some(3));

        h.last_success = Some(at(20));
        let s = compute_status(&s, Some(1), "c", vec![], Some(&h), false, 100);
        let c = healthy(&s).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "Delivering")
        );
        assert_eq!(s.last_success.as_deref(), Some("1970-01-01T00:00:20Z"));
        assert_eq!(
            s.last_error.as_deref(),
            Some("the sink answered 500 Internal Server Error")
        );

        h.gone = true;
        let s = compute_status(&s, Some(1), "c", vec![], Some(&h), false, 100);
        let c = healthy(&s).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Gone"));
        assert!(s.paused);
        // A new leader keeps the pause without a dispatcher.
        let s = compute_status(&s, Some(1), "c", vec![], None, true, 200);
        assert!(s.paused);
        assert_eq!(healthy(&s).unwrap().reason, "Gone");
    }
}
