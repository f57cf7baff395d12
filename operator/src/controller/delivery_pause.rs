//! The DeliveryPause controller: writes each pause into the JetStream KV bucket every node
//! watches ([`kubemail_queue::PAUSES_BUCKET`], key `<namespace>.<name>`), removes it when the
//! resource is deleted (finalizer) or expires, and reports `Ready` and how many queued
//! messages it holds back.
//!
//! ```text
//! validate (pure: spec → pause record and expiry) ─► write or remove the record ─► count ─► status
//! ```
//!
//! `Ready=True` means the record is in the bucket: every node's watch has it within a round
//! trip, so no delivery it matches starts after that. The count comes from one pass over the
//! queue stream's entry headers (`Kubemail-Paused-By`) and is refreshed every
//! [`COUNT_EVERY`]; an expiring pause is looked at again at its end.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use kubemail_queue::pause::Pause;
use kubemail_queue_admin::{Queue, pauses};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field, info_span, instrument};

use crate::controller::{Context, Error, api_for, apply_status, condition};
use crate::crd::MailDomain;
use crate::crd::delivery_pause::{DeliveryPause, DeliveryPauseStatus};
use crate::timestamps::{self, UnixSeconds, parse_duration, parse_rfc3339, rfc3339};

/// Metric label of this controller.
pub const CONTROLLER: &str = "delivery_pause";
/// Removes the record from the bucket before the resource goes.
pub const FINALIZER: &str = "deliverypauses.kubemail.io";
/// How often the held count is refreshed.
pub const COUNT_EVERY: Duration = Duration::from_secs(30);
/// Who the operator is in the queue's audit log.
const ACTOR: &str = "kubemail-operator";

/// Runs the DeliveryPause controller until `stop` fires, one controller per watched namespace.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    ctx.in_every_scope(&stop, run_in).await;
}

async fn run_in(ctx: Arc<Context>, ns: Option<String>, stop: CancellationToken) {
    let client = ctx.client.clone();
    Controller::new(
        api_for::<DeliveryPause>(&client, ns.as_deref()),
        watcher::Config::default().any_semantic(),
    )
    .with_config(
        kube::runtime::controller::Config::default().concurrency(ctx.config.reconcile_concurrency),
    )
    .graceful_shutdown_on(stop.cancelled_owned())
    .run(reconcile, error_policy, ctx.clone())
    .for_each(|_| async {})
    .instrument(info_span!(
        "deliverypauses.kubemail.io",
        namespace = ns.as_deref().unwrap_or("*")
    ))
    .await;
}

/// What a pause may hold back. The platform team's pauses (in the operator's namespace) reach
/// every MailDomain; a pause in any other namespace only that namespace's MailDomains, so a
/// tenant who may create DeliveryPauses cannot stop other tenants' mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Every MailDomain of the cluster.
    Cluster,
    /// These domains (`spec.domain` of the MailDomains in the pause's namespace).
    Namespace(&'a [String]),
}

/// The pause record of `dp` and its end (Unix seconds); `Err` holds the reason and message
/// of `Ready=False`. A namespace-scoped pause names the sending domains it holds back. Pure.
pub fn to_pause(
    dp: &DeliveryPause,
    scope: Scope<'_>,
) -> Result<(Pause, Option<UnixSeconds>), (&'static str, String)> {
    let ns = dp.namespace().unwrap_or_default();
    let spec = &dp.spec;
    let from_domains = match scope {
        Scope::Cluster => spec.from_domains.clone(),
        Scope::Namespace(own) => {
            let outside: Vec<&String> = spec
                .from_domains
                .iter()
                .filter(|p| {
                    !own.iter()
                        .any(|d| kubemail_queue::pause::name_matches(p, d))
                })
                .collect();
            if !outside.is_empty() {
                return Err((
                    "NotInNamespace",
                    format!(
                        "spec.fromDomains {outside:?} match no MailDomain of namespace {ns}; a pause outside the operator's namespace holds back only its own namespace's MailDomains"
                    ),
                ));
            }
            let held: Vec<String> = own
                .iter()
                .filter(|d| {
                    spec.from_domains.is_empty()
                        || spec
                            .from_domains
                            .iter()
                            .any(|p| kubemail_queue::pause::name_matches(p, d))
                })
                .cloned()
                .collect();
            if held.is_empty() {
                return Err((
                    "NoMailDomains",
                    format!(
                        "namespace {ns} has no MailDomain; a pause outside the operator's namespace holds back only its own namespace's MailDomains"
                    ),
                ));
            }
            held
        }
    };
    let expires = match (&spec.until, &spec.duration) {
        (Some(until), _) => Some(parse_rfc3339(until).ok_or((
            "InvalidUntil",
            format!("spec.until: {until:?} is not an RFC 3339 time"),
        ))?),
        (None, Some(d)) => {
            let d = parse_duration(d)
                .map_err(|e| ("InvalidDuration", format!("spec.duration: {e}")))?;
            let created = dp
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
                .unwrap_or_else(timestamps::now);
            Some(created + timestamps::seconds(d))
        }
        (None, None) => None,
    };
    let mut pause = Pause {
        key: kubemail_queue::pause_key(&ns, &dp.name_any()),
        reason: spec.reason.clone(),
        expires_at: None,
        recipient_domains: spec.recipient_domains.clone(),
        from_domains,
        mx_hosts: spec.mx_hosts.clone(),
        networks: spec.networks.clone(),
    };
    pause.set_expiry(expires.map(at));
    pause
        .validate()
        .map_err(|e| ("InvalidSpec", e.to_string()))?;
    Ok((pause, expires))
}

fn at(seconds: UnixSeconds) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

#[instrument(
    parent = None,
    skip(dp, ctx),
    fields(
        otel.name = "deliverypause.reconcile",
        controller = CONTROLLER,
        namespace = field::Empty,
        name = %dp.name_any(),
        trace_id = field::Empty,
    )
)]
async fn reconcile(dp: Arc<DeliveryPause>, ctx: Arc<Context>) -> Result<Action, Error> {
    crate::telemetry::record_trace_id();
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let ns = dp.namespace().ok_or(Error::MissingNamespace)?;
    tracing::Span::current().record("namespace", field::display(&ns));
    let api: Api<DeliveryPause> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, dp, |event| async {
        match event {
            Finalizer::Apply(dp) => apply(&dp, &ctx).await,
            Finalizer::Cleanup(dp) => cleanup(&dp, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

async fn apply(dp: &DeliveryPause, ctx: &Context) -> Result<Action, Error> {
    let now = timestamps::now();
    let previous = dp.status.clone().unwrap_or_default();
    let generation = dp.metadata.generation;
    let ns = dp.namespace().ok_or(Error::MissingNamespace)?;
    let own = if ns == ctx.config.operator_namespace {
        None
    } else {
        let domains: Api<MailDomain> = Api::namespaced(ctx.client.clone(), &ns);
        let list = domains
            .list(&Default::default())
            .await
            .map_err(|source| Error::ReadObject {
                kind: "MailDomain",
                name: format!("list in {ns}"),
                source,
            })?;
        let mut names: Vec<String> = list
            .items
            .iter()
            .map(|md| md.spec.domain.to_ascii_lowercase())
            .collect();
        names.sort();
        names.dedup();
        Some(names)
    };
    let scope = own.as_deref().map_or(Scope::Cluster, Scope::Namespace);
    let (pause, expires) = match to_pause(dp, scope) {
        Ok(p) => p,
        Err((reason, message)) => {
            // A record written while the spec (or the namespace's MailDomains) allowed it must
            // not stay in force.
            if previous
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
            {
                let access = ctx.nats_access().await?;
                let client = access.connect().await.map_err(Error::ManageNats)?;
                let js = async_nats::jetstream::new(client);
                let store = pauses::open_bucket(&js, ctx.config.build.nats_replicas)
                    .await
                    .map_err(Error::Pause)?;
                pauses::delete(&store, &kubemail_queue::pause_key(&ns, &dp.name_any()))
                    .await
                    .map_err(Error::Pause)?;
            }
            let status = DeliveryPauseStatus {
                observed_generation: generation,
                expires_at: None,
                held_messages: 0,
                held_counted_at: None,
                conditions: vec![condition(
                    &previous.conditions,
                    "Ready",
                    false,
                    reason,
                    message,
                    generation,
                    now,
                )],
            };
            publish(ctx, dp, &previous, status).await?;
            // A MailDomain created later in the namespace changes the answer.
            return Ok(if own.is_some() {
                Action::requeue(COUNT_EVERY)
            } else {
                Action::await_change()
            });
        }
    };
    let access = ctx.nats_access().await?;
    let client = access.connect().await.map_err(Error::ManageNats)?;
    let js = async_nats::jetstream::new(client);
    let store = pauses::open_bucket(&js, ctx.config.build.nats_replicas)
        .await
        .map_err(Error::Pause)?;
    if expires.is_some_and(|end| now >= end) {
        pauses::delete(&store, &pause.key)
            .await
            .map_err(Error::Pause)?;
        tracing::info!(pause = %pause.key, "delivery pause expired; removed from the nodes");
        let status = DeliveryPauseStatus {
            observed_generation: generation,
            expires_at: expires.map(rfc3339),
            held_messages: 0,
            held_counted_at: Some(rfc3339(now)),
            conditions: vec![condition(
                &previous.conditions,
                "Ready",
                false,
                "Expired",
                format!(
                    "ended at {}; delivery resumed",
                    expires.map(rfc3339).unwrap_or_default()
                ),
                generation,
                now,
            )],
        };
        publish(ctx, dp, &previous, status).await?;
        return Ok(Action::await_change());
    }
    pauses::put(&store, &pause).await.map_err(Error::Pause)?;
    let held = match Queue::open(
        js,
        &ctx.config.build.nats_stream,
        &ctx.config.build.nats_subject_prefix,
        ACTOR,
    )
    .await
    {
        Ok(queue) => match queue.paused_counts().await {
            Ok(counts) => Some(counts.get(&pause.key).copied().unwrap_or(0)),
            Err(error) => {
                tracing::warn!(%error, "cannot count the paused messages");
                None
            }
        },
        Err(error) => {
            tracing::warn!(%error, "cannot open the queue to count paused messages");
            None
        }
    };
    let status = DeliveryPauseStatus {
        observed_generation: generation,
        expires_at: expires.map(rfc3339),
        held_messages: held.map_or(previous.held_messages, |n| {
            i64::try_from(n).unwrap_or(i64::MAX)
        }),
        held_counted_at: held
            .map(|_| rfc3339(now))
            .or(previous.held_counted_at.clone()),
        conditions: vec![condition(
            &previous.conditions,
            "Ready",
            true,
            "Active",
            match expires {
                Some(end) => format!("in force on every node until {}", rfc3339(end)),
                None => "in force on every node until deleted".to_owned(),
            },
            generation,
            now,
        )],
    };
    publish(ctx, dp, &previous, status).await?;
    ctx.backoff.reset(&key(dp));
    let next = match expires {
        Some(end) => {
            Duration::from_secs(u64::try_from((end - now).max(1)).unwrap_or(1)).min(COUNT_EVERY)
        }
        None => COUNT_EVERY,
    };
    Ok(Action::requeue(next))
}

async fn cleanup(dp: &DeliveryPause, ctx: &Context) -> Result<Action, Error> {
    let key = kubemail_queue::pause_key(&dp.namespace().unwrap_or_default(), &dp.name_any());
    let access = ctx.nats_access().await?;
    let client = access.connect().await.map_err(Error::ManageNats)?;
    let js = async_nats::jetstream::new(client);
    let store = pauses::open_bucket(&js, ctx.config.build.nats_replicas)
        .await
        .map_err(Error::Pause)?;
    pauses::delete(&store, &key).await.map_err(Error::Pause)?;
    tracing::info!(pause = %key, "delivery pause deleted; removed from the nodes");
    Ok(Action::await_change())
}

async fn publish(
    ctx: &Context,
    dp: &DeliveryPause,
    previous: &DeliveryPauseStatus,
    status: DeliveryPauseStatus,
) -> Result<(), Error> {
    if !apply_status(ctx, dp, dp.status.as_ref(), &status).await? {
        return Ok(());
    }
    for c in &status.conditions {
        let before = previous.conditions.iter().find(|p| p.type_ == c.type_);
        if before.map(|b| (b.status.as_str(), b.reason.as_str()))
            == Some((c.status.as_str(), c.reason.as_str()))
        {
            continue;
        }
        let event = Event {
            type_: if c.status == "True" || c.reason == "Expired" {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: c.reason.clone(),
            note: Some(c.message.clone()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &dp.object_ref(&())).await {
            tracing::warn!(error = %e, "cannot publish an event");
        }
    }
    Ok(())
}

fn key(dp: &DeliveryPause) -> String {
    format!("pause/{}", dp.metadata.uid.clone().unwrap_or_default())
}

fn error_policy(dp: Arc<DeliveryPause>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failed(CONTROLLER, error.metric_label());
    tracing::warn!(name = %dp.name_any(), error = %crate::controller::chain(error), "delivery pause reconcile failed");
    Action::requeue(ctx.backoff.next(&key(&dp)))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::crd::delivery_pause::DeliveryPauseSpec;

    fn dp(spec: DeliveryPauseSpec) -> DeliveryPause {
        let mut d = DeliveryPause::new("remote-421", spec);
        d.metadata.namespace = Some("mail".into());
        d.metadata.creation_timestamp = Some(Time(
            Timestamp::from_second(1_800_000_000).unwrap_or(Timestamp::UNIX_EPOCH),
        ));
        d
    }

    #[test]
    fn the_record_names_the_pause_and_its_end() {
        let (pause, expires) = to_pause(
            &dp(DeliveryPauseSpec {
                recipient_domains: vec!["remote.test".into()],
                duration: Some("2h".into()),
                reason: Some("421s".into()),
                ..DeliveryPauseSpec::default()
            }),
            Scope::Cluster,
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(pause.key, "mail.remote-421");
        assert_eq!(expires, Some(1_800_000_000 + 7200));
        assert_eq!(pause.expires_at.as_deref(), Some("2027-01-15T10:00:00Z"));
        assert_eq!(pause.reason.as_deref(), Some("421s"));
        let (_, until) = to_pause(
            &dp(DeliveryPauseSpec {
                mx_hosts: vec!["*.google.com".into()],
                until: Some("2030-01-01T00:00:00Z".into()),
                ..DeliveryPauseSpec::default()
            }),
            Scope::Cluster,
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(until, parse_rfc3339("2030-01-01T00:00:00Z"));
    }

    #[test]
    fn invalid_pauses_are_reported() {
        let empty = to_pause(&dp(DeliveryPauseSpec::default()), Scope::Cluster).unwrap_err();
        assert_eq!(empty.0, "InvalidSpec");
        let bad_net = to_pause(
            &dp(DeliveryPauseSpec {
                networks: vec!["10.0.0.0/40".into()],
                ..DeliveryPauseSpec::default()
            }),
            Scope::Cluster,
        )
        .unwrap_err();
        assert!(bad_net.1.contains("10.0.0.0/40"), "{}", bad_net.1);
    }

    #[test]
    fn a_tenant_pause_holds_back_only_its_namespace_domains() {
        let own = ["shop.example".to_owned(), "news.shop.example".to_owned()];
        // Everything to gmail.com, from this namespace's domains only.
        let (pause, _) = to_pause(
            &dp(DeliveryPauseSpec {
                recipient_domains: vec!["gmail.com".into()],
                ..DeliveryPauseSpec::default()
            }),
            Scope::Namespace(&own),
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(pause.from_domains, own);
        assert!(pause.matches_envelope("shop.example", "gmail.com"));
        assert!(!pause.matches_envelope("victim.example", "gmail.com"));
        // A pattern narrows it to the domains it matches.
        let (pause, _) = to_pause(
            &dp(DeliveryPauseSpec {
                from_domains: vec!["*.shop.example".into()],
                ..DeliveryPauseSpec::default()
            }),
            Scope::Namespace(&own),
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(pause.from_domains, ["news.shop.example"]);
        // Another tenant's domain is refused, and so is a namespace without MailDomains.
        let other = to_pause(
            &dp(DeliveryPauseSpec {
                from_domains: vec!["victim.example".into()],
                ..DeliveryPauseSpec::default()
            }),
            Scope::Namespace(&own),
        )
        .unwrap_err();
        assert_eq!(other.0, "NotInNamespace");
        let none = to_pause(
            &dp(DeliveryPauseSpec {
                recipient_domains: vec!["gmail.com".into()],
                ..DeliveryPauseSpec::default()
            }),
            Scope::Namespace(&[]),
        )
        .unwrap_err();
        assert_eq!(none.0, "NoMailDomains");
        // The platform team's pause reaches every domain.
        let (pause, _) = to_pause(
            &dp(DeliveryPauseSpec {
                recipient_domains: vec!["gmail.com".into()],
                ..DeliveryPauseSpec::default()
            }),
            Scope::Cluster,
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(pause.matches_envelope("victim.example", "gmail.com"));
    }
}
