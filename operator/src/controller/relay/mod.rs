//! The Relay controller: validates a Relay's credentials Secret, probes the host when asked
//! (see [`probe`]), and reports `Ready` (usable by MailDomains) and `Reachable` (last probe).
//! MailDomains that use a Relay watch it, so their SPF record follows its `spfInclude` and
//! their `RelayResolved` condition its `Ready`.
//!
//! ```text
//! dereference (auth Secret) ─► validate (pure) ─► probe (when due) ─► status (SSA, events)
//! ```

pub mod probe;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field, info_span, instrument};

use crate::controller::{Context, Error, api_for, condition, condition_with, referrers};
use crate::crd::relay::{ProbeResult, Relay, RelayStatus};
use crate::timestamps::{self, UnixSeconds, parse_duration, parse_rfc3339, rfc3339};

/// Metric label of this controller.
pub const CONTROLLER: &str = "relay";

/// Runs the Relay controller until `stop` fires, one controller per watched namespace.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    ctx.in_every_scope(&stop, run_in).await;
}

async fn run_in(ctx: Arc<Context>, ns: Option<String>, stop: CancellationToken) {
    let client = ctx.client.clone();
    let controller = Controller::new(
        api_for::<Relay>(&client, ns.as_deref()),
        watcher::Config::default().any_semantic(),
    )
    .with_config(
        kube::runtime::controller::Config::default().concurrency(ctx.config.reconcile_concurrency),
    );
    let store = controller.store();
    // Metadata only, like the MailDomain controller: a name is all the mapping needs.
    let secrets = watcher(
        api_for::<PartialObjectMeta<Secret>>(&client, ns.as_deref()),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects();
    controller
        .watches_stream(secrets, move |secret: PartialObjectMeta<Secret>| {
            referrers(&store, &secret, |r: &Relay, name| {
                r.spec
                    .auth
                    .as_ref()
                    .is_some_and(|a| a.secret_ref.name == name)
            })
        })
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .instrument(info_span!(
            "relays.kubemail.io",
            namespace = ns.as_deref().unwrap_or("*")
        ))
        .await;
}

/// Checks a Relay's spec and credentials, which the probe does not need; `Err` holds the
/// reason and message of `Ready=False`. Pure.
pub fn validate(
    relay: &Relay,
    auth_secret: Option<&Secret>,
) -> Result<String, (&'static str, String)> {
    let Some(auth) = &relay.spec.auth else {
        return Ok(
            "no credentials: the relay must accept mail from the nodes without AUTH".to_owned(),
        );
    };
    let name = &auth.secret_ref.name;
    let Some(secret) = auth_secret else {
        return Err((
            "AuthSecretNotFound",
            format!(
                "spec.auth.secretRef names Secret {name}, which does not exist; create it with keys username and password"
            ),
        ));
    };
    let data = secret.data.clone().unwrap_or_default();
    let missing: Vec<&str> = ["username", "password"]
        .into_iter()
        .filter(|k| data.get(*k).is_none_or(|v| v.0.is_empty()))
        .collect();
    if !missing.is_empty() {
        return Err((
            "AuthSecretIncomplete",
            format!(
                "Secret {name} lacks non-empty key(s) {}",
                missing.join(", ")
            ),
        ));
    }
    Ok(format!("credentials from Secret {name}"))
}

// A trace of its own per reconcile, like the MailDomain controller's.
#[instrument(
    parent = None,
    skip(relay, ctx),
    fields(
        otel.name = "relay.reconcile",
        controller = CONTROLLER,
        namespace = field::Empty,
        name = %relay.name_any(),
        trace_id = field::Empty,
    )
)]
async fn reconcile(relay: Arc<Relay>, ctx: Arc<Context>) -> Result<Action, Error> {
    crate::telemetry::record_trace_id();
    let _slot = ctx.reconcile_slot().await;
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let ns = relay.namespace().ok_or(Error::MissingNamespace)?;
    tracing::Span::current().record("namespace", field::display(&ns));
    let now = timestamps::now();

    let auth_secret = match &relay.spec.auth {
        Some(a) => Api::<Secret>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&a.secret_ref.name)
            .await
            .map_err(|source| Error::ReadObject {
                kind: "Secret",
                name: a.secret_ref.name.clone(),
                source,
            })?,
        None => None,
    };
    let validity = validate(&relay, auth_secret.as_ref());

    let previous = relay.status.clone().unwrap_or_default();
    let generation = relay.metadata.generation;
    let interval = relay
        .spec
        .probe
        .as_ref()
        .map(|p| parse_duration(&p.interval).unwrap_or(Duration::from_secs(300)));
    let last = previous.last_probe.clone();
    let last_at = last.as_ref().and_then(|p| parse_rfc3339(&p.time));
    let due = interval.is_some()
        && (previous.observed_generation != generation
            || last_at
                .is_none_or(|t| now - t >= timestamps::seconds(interval.unwrap_or_default())));
    let last_probe = if due {
        let port = u16::try_from(relay.spec.port).unwrap_or(0);
        let outcome = probe::probe(
            &relay.spec.host,
            port,
            relay.spec.tls,
            &ctx.config.probe_ehlo_name,
            ctx.config.probe_timeout,
        )
        .await;
        tracing::info!(reachable = outcome.reachable, message = %outcome.message, "probed the relay");
        Some(ProbeResult {
            time: rfc3339(now),
            reachable: outcome.reachable,
            starttls: outcome.starttls,
            message: outcome.message,
        })
    } else if interval.is_some() {
        last
    } else {
        None
    };

    let status = compute_status(&previous.conditions, generation, &validity, last_probe, now);
    publish(&ctx, &relay, &previous, status).await?;

    let next = match (interval, last_at) {
        (Some(i), _) if due => i,
        (Some(i), Some(t)) => {
            let left = timestamps::seconds(i) - (now - t);
            Duration::from_secs(u64::try_from(left.max(1)).unwrap_or(1))
        }
        _ => ctx.config.resync,
    };
    Ok(Action::requeue(next.min(ctx.config.resync)))
}

/// The Relay status from the validation result and the last probe. Pure.
pub fn compute_status(
    previous: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    generation: Option<i64>,
    validity: &Result<String, (&'static str, String)>,
    last_probe: Option<ProbeResult>,
    now: UnixSeconds,
) -> RelayStatus {
    let ready = match validity {
        Ok(message) => condition(
            previous,
            "Ready",
            true,
            "Valid",
            message.clone(),
            generation,
            now,
        ),
        Err((reason, message)) => condition(
            previous,
            "Ready",
            false,
            reason,
            message.clone(),
            generation,
            now,
        ),
    };
    let reachable = match &last_probe {
        None => condition_with(
            previous,
            "Reachable",
            "Unknown",
            "ProbeDisabled",
            "spec.probe is not set".to_owned(),
            generation,
            now,
        ),
        Some(p) => condition(
            previous,
            "Reachable",
            p.reachable,
            if p.reachable {
                "ProbeSucceeded"
            } else {
                "ProbeFailed"
            },
            p.message.clone(),
            generation,
            now,
        ),
    };
    RelayStatus {
        observed_generation: generation,
        last_probe,
        conditions: vec![ready, reachable],
    }
}

async fn publish(
    ctx: &Context,
    relay: &Relay,
    previous: &RelayStatus,
    status: RelayStatus,
) -> Result<(), Error> {
    if !crate::controller::apply_status(ctx, relay, relay.status.as_ref(), &status).await? {
        return Ok(());
    }
    for c in &status.conditions {
        let before = previous.conditions.iter().find(|p| p.type_ == c.type_);
        let changed = before.map(|b| b.status.as_str()) != Some(c.status.as_str());
        if changed && c.status == "False" {
            let event = Event {
                type_: EventType::Warning,
                reason: c.reason.clone(),
                note: Some(c.message.clone()),
                action: "Reconcile".into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&event, &relay.object_ref(&())).await {
                tracing::warn!(error = %e, "cannot publish an event");
            }
        }
    }
    Ok(())
}

fn error_policy(relay: Arc<Relay>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failed(CONTROLLER, error.metric_label());
    tracing::warn!(name = %relay.name_any(), error = %crate::controller::chain(error), "relay reconcile failed");
    Action::requeue(ctx.backoff.next(&format!(
        "relay/{}",
        relay.metadata.uid.clone().unwrap_or_default()
    )))
}
