//! The Suppression controller: writes a `Suppression`'s addresses into the MailDomain's
//! suppression list (the KV bucket the nodes read, through the library API of
//! [`kubemail_queue::suppression`]) or removes them, and reports `Ready`.
//!
//! * `Suppress`: every reconcile makes sure each address has a `manual` entry without expiry
//!   (an automatic entry is replaced: the object's intent wins); the finalizer removes the
//!   object's addresses again, but only entries that are still `manual`.
//! * `Unsuppress`: the addresses are removed once per generation (`status.observedGeneration`
//!   records that it was done), so a later bounce can suppress them again.

use std::sync::Arc;
use std::time::SystemTime;

use futures::StreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use kubemail_queue::suppression::{SuppressionEntry, SuppressionList, SuppressionReason};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field, info_span, instrument};

use crate::controller::{Context, Error, api_for, condition, referrers};
use crate::crd::MailDomain;
use crate::crd::suppression::{Suppression, SuppressionAction, SuppressionStatus};
use crate::timestamps;

/// Metric label of this controller.
pub const CONTROLLER: &str = "suppression";
/// The finalizer: the entries live in NATS, out of reach of owner references.
pub const FINALIZER: &str = "suppressions.kubemail.io";

/// Runs the Suppression controller until `stop` fires, one controller per watched namespace.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    if !crate::controller::wait_for_crd(&ctx, "suppressions.kubemail.io", &stop).await {
        return;
    }
    ctx.in_every_scope(&stop, run_in).await;
}

async fn run_in(ctx: Arc<Context>, ns: Option<String>, stop: CancellationToken) {
    let client = ctx.client.clone();
    let controller = Controller::new(
        api_for::<Suppression>(&client, ns.as_deref()),
        watcher::Config::default().any_semantic(),
    )
    .with_config(
        kube::runtime::controller::Config::default().concurrency(ctx.config.reconcile_concurrency),
    );
    let store = controller.store();
    controller
        .watches(
            api_for::<MailDomain>(&client, ns.as_deref()),
            watcher::Config::default(),
            move |md: MailDomain| {
                referrers(&store, &md, |s: &Suppression, name| {
                    s.spec.mail_domain_ref.name == name
                })
            },
        )
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|_| async {})
        .instrument(info_span!(
            "suppressions.kubemail.io",
            namespace = ns.as_deref().unwrap_or("*")
        ))
        .await;
}

#[instrument(
    parent = None,
    skip(object, ctx),
    fields(
        otel.name = "suppression.reconcile",
        controller = CONTROLLER,
        namespace = field::Empty,
        name = %object.name_any(),
        trace_id = field::Empty,
    )
)]
async fn reconcile(object: Arc<Suppression>, ctx: Arc<Context>) -> Result<Action, Error> {
    crate::telemetry::record_trace_id();
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let ns = object.namespace().ok_or(Error::MissingNamespace)?;
    tracing::Span::current().record("namespace", field::display(&ns));
    let api: Api<Suppression> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, object, |event| async {
        match event {
            Finalizer::Apply(o) => apply(&o, &ctx, &ns).await,
            Finalizer::Cleanup(o) => cleanup(&o, &ctx, &ns).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// The addresses as the list keys them.
pub fn addresses(spec_addresses: &[String]) -> Vec<String> {
    let mut out: Vec<String> = spec_addresses
        .iter()
        .map(|a| a.trim().to_ascii_lowercase())
        .filter(|a| a.contains('@'))
        .collect();
    out.sort();
    out.dedup();
    out
}

async fn domain_of(ctx: &Context, ns: &str, name: &str) -> Result<Option<String>, Error> {
    Ok(Api::<MailDomain>::namespaced(ctx.client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|source| Error::ReadObject {
            kind: "MailDomain",
            name: name.to_owned(),
            source,
        })?
        .map(|md| md.spec.domain))
}

async fn list(ctx: &Context) -> Result<SuppressionList, Error> {
    let js = super::event_sink::connect(ctx).await?;
    tokio::time::timeout(ctx.config.nats_timeout, SuppressionList::open(&js))
        .await
        .map_err(|_| Error::Nats {
            action: "open the suppression bucket",
            source: "NATS did not answer in time".into(),
        })?
        .map_err(|e| Error::Nats {
            action: "open the suppression bucket",
            source: Box::new(e),
        })
}

fn nats_error(
    action: &'static str,
) -> impl Fn(kubemail_queue::suppression::SuppressionError) -> Error {
    move |e| Error::Nats {
        action,
        source: Box::new(e),
    }
}

async fn apply(object: &Suppression, ctx: &Context, ns: &str) -> Result<Action, Error> {
    let generation = object.metadata.generation;
    let previous = object.status.clone().unwrap_or_default();
    let now = timestamps::now();
    let md_name = &object.spec.mail_domain_ref.name;
    let Some(domain) = domain_of(ctx, ns, md_name).await? else {
        let status = SuppressionStatus {
            observed_generation: previous.observed_generation,
            applied: previous.applied,
            conditions: vec![condition(
                &previous.conditions,
                "Ready",
                false,
                "MailDomainNotFound",
                format!(
                    "spec.mailDomainRef names MailDomain {md_name}, which does not exist in this namespace"
                ),
                generation,
                now,
            )],
        };
        publish(ctx, object, status).await?;
        return Ok(Action::requeue(ctx.config.resync));
    };
    let addresses = addresses(&object.spec.addresses);
    let list = list(ctx).await?;
    let (applied, message) = match object.spec.action {
        SuppressionAction::Suppress => {
            let mut written = 0;
            for address in &addresses {
                let current = list
                    .get(&domain, address, SystemTime::now())
                    .await
                    .map_err(nats_error("read a suppression entry"))?;
                if current.as_ref().is_some_and(|e| {
                    e.reason == SuppressionReason::Manual && e.expires_at.is_none()
                }) {
                    continue;
                }
                let mut entry = SuppressionEntry::new(
                    &domain,
                    address,
                    SuppressionReason::Manual,
                    SystemTime::now(),
                    None,
                );
                entry.note = object.spec.note.clone();
                entry.source_event = Some(format!("Suppression/{ns}/{}", object.name_any()));
                list.put(&entry)
                    .await
                    .map_err(nats_error("write a suppression entry"))?;
                written += 1;
            }
            if written > 0 {
                tracing::info!(%domain, written, "suppressed addresses by hand");
            }
            (
                i64::try_from(addresses.len()).unwrap_or(i64::MAX),
                format!("{} address(es) suppressed for {domain}", addresses.len()),
            )
        }
        SuppressionAction::Unsuppress => {
            if previous.observed_generation != generation {
                for address in &addresses {
                    list.remove(&domain, address)
                        .await
                        .map_err(nats_error("remove a suppression entry"))?;
                }
                tracing::info!(%domain, removed = addresses.len(), "removed addresses from the suppression list by hand");
            }
            (
                i64::try_from(addresses.len()).unwrap_or(i64::MAX),
                format!(
                    "{} address(es) removed from the suppression list of {domain}",
                    addresses.len()
                ),
            )
        }
    };
    let status = SuppressionStatus {
        observed_generation: generation,
        applied,
        conditions: vec![condition(
            &previous.conditions,
            "Ready",
            true,
            "Applied",
            message,
            generation,
            now,
        )],
    };
    publish(ctx, object, status).await?;
    Ok(Action::requeue(ctx.config.resync))
}

async fn cleanup(object: &Suppression, ctx: &Context, ns: &str) -> Result<Action, Error> {
    if object.spec.action != SuppressionAction::Suppress {
        return Ok(Action::await_change());
    }
    let Some(domain) = domain_of(ctx, ns, &object.spec.mail_domain_ref.name).await? else {
        return Ok(Action::await_change());
    };
    let list = list(ctx).await?;
    for address in addresses(&object.spec.addresses) {
        let current = list
            .get(&domain, &address, SystemTime::now())
            .await
            .map_err(nats_error("read a suppression entry"))?;
        // Only what this kind of object wrote: a bounce since then stays.
        if current.is_some_and(|e| e.reason == SuppressionReason::Manual) {
            list.remove(&domain, &address)
                .await
                .map_err(nats_error("remove a suppression entry"))?;
        }
    }
    Ok(Action::await_change())
}

async fn publish(
    ctx: &Context,
    object: &Suppression,
    status: SuppressionStatus,
) -> Result<(), Error> {
    crate::controller::apply_status(ctx, object, object.status.as_ref(), &status)
        .await
        .map(|_| ())
}

fn error_policy(object: Arc<Suppression>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failed(CONTROLLER, error.metric_label());
    tracing::warn!(name = %object.name_any(), error = %crate::controller::chain(error), "suppression reconcile failed");
    Action::requeue(ctx.backoff.next(&format!(
        "suppression/{}",
        object.metadata.uid.clone().unwrap_or_default()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_lower_cased_and_deduplicated() {
        let spec = vec![
            "Bob@Example.org".to_owned(),
            " bob@example.org".to_owned(),
            "carol@example.org".to_owned(),
        ];
        assert_eq!(
            addresses(&spec),
            vec!["bob@example.org", "carol@example.org"]
        );
    }
}
