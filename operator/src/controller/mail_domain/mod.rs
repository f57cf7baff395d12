//! The MailDomain controller. A reconcile runs inside the finalizer (`Apply` / `Cleanup`) and,
//! for `Apply`, runs the pipeline one file per step:
//!
//! ```text
//! dereference ─► validate ─► provision ─► build ─► apply ─► status
//!  (reads)        (pure)     (keys, certs,  (pure)   (SSA)    (SSA status,
//!                             users file)                      events)
//! ```
//!
//! An invalid spec stops after `validate` with `Ready=False` and the reason, and waits for a
//! change; any other failure is reported on `Ready` and retried with backoff. `Cleanup`
//! removes the domain's JetStream consumer; owned children go by garbage collection.

pub mod apply;
pub mod build;
pub mod dereference;
pub mod provision;
pub mod status;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, DynamicObject, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field, info_span, instrument};

use self::build::{Observed, load_balancer_addresses};
use crate::controller::{Context, Error, api_for, referrers};
use crate::crd::mail_domain::MailDomain;
use crate::crd::relay::Relay;
use crate::queue;
use crate::timestamps;

/// Finalizer name, `<plural>.<group>`.
pub const FINALIZER: &str = "maildomains.kubemail.io";
/// Metric label of this controller.
pub const CONTROLLER: &str = "maildomain";
/// While cert-manager has not issued the certificate, look again this often (in case its
/// Certificate is not watched because cert-manager was installed after the operator started).
const CERT_MANAGER_POLL_SECONDS: i64 = 30;

/// Runs the MailDomain controller until `stop` fires.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    let client = ctx.client.clone();
    let ns = ctx.config.watch_namespace.clone();
    let domains: Api<MailDomain> = api_for(&client, ns.as_deref());
    let mut controller = Controller::new(domains, watcher::Config::default().any_semantic());
    let store = controller.store();
    let relay_store = store.clone();
    let secret_store = store.clone();
    // cert-manager's Certificate status drives CertificateReady: watch it when cert-manager
    // is installed (a later install is picked up by the periodic resync and the requeue of
    // domains waiting for a certificate).
    if ctx
        .crd_installed(dereference::CERT_MANAGER_CRD)
        .await
        .unwrap_or(false)
    {
        let resource = build::certificate_resource();
        let api: Api<DynamicObject> = match ns.as_deref() {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        controller = controller.owns_with(api, resource, watcher::Config::default());
    }
    controller
        .owns(
            api_for::<ConfigMap>(&client, ns.as_deref()),
            watcher::Config::default(),
        )
        .owns(
            api_for::<Deployment>(&client, ns.as_deref()),
            watcher::Config::default(),
        )
        .owns(
            api_for::<Service>(&client, ns.as_deref()),
            watcher::Config::default(),
        )
        .owns(
            api_for::<PodDisruptionBudget>(&client, ns.as_deref()),
            watcher::Config::default(),
        )
        // A Relay change re-renders the domains that send through it.
        .watches(
            api_for::<Relay>(&client, ns.as_deref()),
            watcher::Config::default(),
            move |relay: Relay| {
                referrers(&relay_store, &relay, |md: &MailDomain, name| {
                    md.spec.relay_ref.as_ref().is_some_and(|r| r.name == name)
                })
            },
        )
        // Secrets: the ones a domain owns (DKIM, TLS, users) and the ones it refers to (the
        // submission users), so an edit of either re-renders the domain.
        .watches(
            api_for::<Secret>(&client, ns.as_deref()),
            watcher::Config::default(),
            move |secret: Secret| {
                let owners: Vec<String> = secret
                    .owner_references()
                    .iter()
                    .filter(|o| o.kind == "MailDomain" && o.controller == Some(true))
                    .map(|o| o.name.clone())
                    .collect();
                referrers(&secret_store, &secret, |md: &MailDomain, name| {
                    owners.contains(&md.name_any())
                        || md
                            .spec
                            .submission
                            .as_ref()
                            .is_some_and(|s| s.users_secret_ref.name == name)
                })
            },
        )
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(name = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile loop"),
            }
        })
        .instrument(info_span!("maildomains.kubemail.io"))
        .await;
}

/// One reconcile of one MailDomain.
// Each reconcile is the root of a trace of its own (not a child of the controller's
// long-lived span), with its trace id in every log line.
#[instrument(
    parent = None,
    skip(md, ctx),
    fields(
        otel.name = "maildomain.reconcile",
        controller = CONTROLLER,
        namespace = field::Empty,
        name = %md.name_any(),
        domain = %md.spec.domain,
        trace_id = field::Empty,
    )
)]
pub async fn reconcile(md: Arc<MailDomain>, ctx: Arc<Context>) -> Result<Action, Error> {
    crate::telemetry::record_trace_id();
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let ns = md.namespace().ok_or(Error::MissingNamespace)?;
    tracing::Span::current().record("namespace", field::display(&ns));
    let api: Api<MailDomain> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, md, |event| async {
        match event {
            Finalizer::Apply(md) => apply_domain(&md, &ctx).await,
            Finalizer::Cleanup(md) => cleanup(&md, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Transient errors retry with a growing delay; the failure is counted.
pub fn error_policy(md: Arc<MailDomain>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failed(CONTROLLER, error.metric_label());
    tracing::warn!(name = %md.name_any(), error = %crate::controller::chain(error), "reconcile failed");
    Action::requeue(ctx.backoff.next(&format!(
        "md/{}",
        md.object_ref(&()).uid.unwrap_or_default()
    )))
}

async fn apply_domain(md: &MailDomain, ctx: &Context) -> Result<Action, Error> {
    let now = timestamps::now();
    let refs = dereference::dereference(ctx, md).await?;
    let v = match validate::validate(md, &refs) {
        Ok(v) => v,
        Err(invalid) => return report_invalid(ctx, md, &invalid, now).await,
    };
    match run_pipeline(ctx, md, &v, &refs, now).await {
        Ok(action) => {
            ctx.backoff.reset(&format!(
                "md/{}",
                md.object_ref(&()).uid.unwrap_or_default()
            ));
            Ok(action)
        }
        Err(Error::Build(e)) => {
            let invalid = validate::Invalid {
                reason: "InvalidSpec",
                message: e.to_string(),
                retry_after: None,
            };
            report_invalid(ctx, md, &invalid, now).await
        }
        Err(e) => {
            let (status, events) = status::failed(md, &crate::controller::chain(&e), now);
            if let Err(patch_error) = status::publish(ctx, md, status, events).await {
                tracing::warn!(error = %patch_error, "cannot report the failure in the status");
            }
            Err(e)
        }
    }
}

async fn run_pipeline(
    ctx: &Context,
    md: &MailDomain,
    v: &validate::ValidatedDomain,
    refs: &dereference::Dereferenced,
    now: timestamps::UnixSeconds,
) -> Result<Action, Error> {
    let provisioned = provision::provision(ctx, v, refs, now).await?;
    let observed = Observed {
        addresses: load_balancer_addresses(refs.service.as_ref()),
        external_dns: refs.external_dns_installed,
    };
    let children = build::build(md, v, &provisioned, &observed, &ctx.config.build, now)
        .map_err(Error::Build)?;
    let applied = apply::apply(ctx, md, &children, refs).await?;
    // The Service may have just been created: use the addresses the server reports now.
    let observed = Observed {
        addresses: load_balancer_addresses(Some(&applied.service)),
        ..observed
    };
    let (new_status, events) = status::compute(
        md,
        &status::StatusInputs {
            v,
            provisioned: &provisioned,
            children: &children,
            deployment: &applied.deployment,
            observed: &observed,
        },
        now,
    );
    let ready_replicas = new_status.ready_replicas;
    status::publish(ctx, md, new_status, events).await?;
    ctx.metrics.set_ready_replicas(
        &md.namespace().unwrap_or_default(),
        &md.name_any(),
        ready_replicas,
    );

    // Wake up for the next scheduled change (key rotation, certificate renewal), at the
    // latest after the resync interval.
    let mut next = ctx.config.resync;
    let mut consider = |t: Option<timestamps::UnixSeconds>| {
        if let Some(t) = t {
            let wait = Duration::from_secs(u64::try_from((t - now).max(1)).unwrap_or(1));
            next = next.min(wait);
        }
    };
    consider(provisioned.dkim.next_event);
    match &provisioned.tls {
        provision::TlsMaterial::OperatorCa { leaf, .. } => {
            consider(Some(crate::certs::renew_after(
                leaf.not_before,
                leaf.not_after,
            )));
        }
        provision::TlsMaterial::CertManager { ready: false, .. } => {
            consider(Some(now + CERT_MANAGER_POLL_SECONDS));
        }
        provision::TlsMaterial::CertManager { .. } => {}
    }
    Ok(Action::requeue(next))
}

async fn report_invalid(
    ctx: &Context,
    md: &MailDomain,
    invalid: &validate::Invalid,
    now: timestamps::UnixSeconds,
) -> Result<Action, Error> {
    ctx.metrics.reconcile_failed(CONTROLLER, "invalid_spec");
    tracing::info!(reason = invalid.reason, message = %invalid.message, "invalid MailDomain");
    let (status, events) = status::invalid(md, invalid, now);
    status::publish(ctx, md, status, events).await?;
    Ok(invalid
        .retry_after
        .map_or_else(Action::await_change, Action::requeue))
}

/// Removes what ownership cannot: the domain's JetStream consumer. The nodes' delivery
/// workers would create it again, so their Deployment goes first and the consumer only once no
/// pod of the domain runs any more (until then the finalizer stays and this is retried).
/// Idempotent, and a no-op when nothing was ever made (an invalid domain).
async fn cleanup(md: &MailDomain, ctx: &Context) -> Result<Action, Error> {
    let ns = md.namespace().ok_or(Error::MissingNamespace)?;
    let name = md.name_any();
    let result = async {
        let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
        match deployments
            .delete(
                &build::names::deployment(&name),
                &DeleteParams::background(),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(Error::DeleteChild {
                    kind: "Deployment".into(),
                    name: build::names::deployment(&name),
                    source,
                });
            }
        }
        let selector = build::selector_labels(&name)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|source| Error::ReadObject {
                kind: "Pod",
                name: selector.clone(),
                source,
            })?;
        if !pods.items.is_empty() {
            return Err(Error::CleanupPending(format!(
                "waiting for {} SMTP node pod(s) to stop before removing the JetStream consumer {}",
                pods.items.len(),
                queue::consumer_name(&md.spec.domain)
            )));
        }
        queue::delete_consumer(
            &ctx.config.build.nats_url,
            &ctx.config.build.nats_stream,
            &md.spec.domain,
            ctx.config.nats_timeout,
        )
        .await
        .map_err(Error::DeleteConsumer)
    }
    .await;
    match result {
        Ok(deleted) => {
            tracing::info!(
                consumer = %queue::consumer_name(&md.spec.domain),
                deleted,
                "cleaned up the JetStream consumer"
            );
            ctx.users_cache.forget(&format!("{ns}/{name}"));
            ctx.metrics.forget_domain(&ns, &name);
            Ok(Action::await_change())
        }
        Err(e) => {
            let now = timestamps::now();
            let (status, events) = match &e {
                Error::CleanupPending(message) => status::terminating(md, message, now),
                _ => status::cleanup_failed(md, &crate::controller::chain(&e), now),
            };
            if let Err(patch_error) = status::publish(ctx, md, status, events).await {
                tracing::warn!(error = %patch_error, "cannot report the cleanup state");
            }
            Err(e)
        }
    }
}
