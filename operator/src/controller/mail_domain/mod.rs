//! The MailDomain controller. A reconcile runs inside the finalizer (`Apply` / `Cleanup`) and,
//! for `Apply`, runs the pipeline one file per step:
//!
//! ```text
//! dereference ─► validate ─► provision ─► build ─► apply ─► status
//!  (reads)        (pure)     (keys, certs,  (pure)   (SSA)    (SSA status,
//!                             users file)                      events)
//! ```
//!
//! Before the pipeline, [`ownership`] decides whether this MailDomain is the domain's first
//! claim; a later claim gets `Ready=False` reason `DomainConflict` and nothing else.
//! An invalid spec stops after `validate` with `Ready=False` and the reason, and waits for a
//! change; any other failure is reported on `Ready` and retried with backoff. `Cleanup`
//! removes the domain's JetStream consumer (only the owner's); owned children go by garbage
//! collection.

pub mod apply;
pub mod build;
pub mod dereference;
pub mod names;
pub mod ownership;
pub mod pooled;
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
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field, info_span, instrument};

use self::build::{Observed, load_balancer_addresses};
use self::ownership::Ownership;
use crate::controller::{Context, Error, api_for, referrers};
use crate::crd::mail_domain::MailDomain;
use crate::crd::mail_pool::MailPool;
use crate::crd::relay::Relay;
use crate::queue;
use crate::timestamps;

/// Finalizer name, `<plural>.<group>`.
pub const FINALIZER: &str = "maildomains.kubemail.io";
/// Metric label of this controller.
pub const CONTROLLER: &str = "maildomain";
/// How often a claim in conflict looks again whether the earlier claim is gone (its deletion
/// is not an event of this object).
const CONFLICT_RECHECK: Duration = Duration::from_secs(15);
/// While cert-manager has not issued the certificate, look again this often (in case its
/// Certificate is not watched because cert-manager was installed after the operator started).
const CERT_MANAGER_POLL_SECONDS: i64 = 30;

/// Runs the MailDomain controller until `stop` fires: one controller per watched namespace
/// (or one for the whole cluster), all feeding the shared [`DomainIndex`].
///
/// [`DomainIndex`]: crate::controller::DomainIndex
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    ctx.in_every_scope(&stop, run_in).await;
}

async fn run_in(ctx: Arc<Context>, ns: Option<String>, stop: CancellationToken) {
    let client = ctx.client.clone();
    let domains: Api<MailDomain> = api_for(&client, ns.as_deref());
    let mut controller = Controller::new(domains, watcher::Config::default().any_semantic())
        .with_config(
            kube::runtime::controller::Config::default()
                .concurrency(ctx.config.reconcile_concurrency),
        );
    let store = controller.store();
    ctx.domains.add(store.clone());
    let relay_store = store.clone();
    let secret_store = store.clone();
    // Only the operator's own children are listed and cached, not every ConfigMap, Service,
    // Deployment or PDB of the namespace.
    let owned = || watcher::Config::default().labels(&crate::controller::managed_by_selector());
    // cert-manager's Certificate status drives CertificateReady: watch it when cert-manager
    // is installed (a later install is picked up by the periodic resync and the requeue of
    // domains waiting for a certificate).
    if ctx
        .crd_installed(dereference::CERT_MANAGER_CRD)
        .await
        .unwrap_or(false)
    {
        let resource = names::certificate_resource();
        let api: Api<DynamicObject> = match ns.as_deref() {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        controller = controller.owns_with(api, resource, owned());
    }
    // Secrets: the ones a domain owns (DKIM, TLS, users) and the ones it refers to (the
    // submission users), so an edit of either re-renders the domain. Metadata only: the
    // operator never holds every Secret's data in memory, and reads a Secret's data only
    // when a reconcile needs it.
    let secrets = watcher(
        api_for::<PartialObjectMeta<Secret>>(&client, ns.as_deref()),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects();
    // A pool's status (which domains its nodes serve, ready nodes) drives its domains' Ready;
    // pools may sit in any watched namespace.
    let pools = futures::stream::select_all(ctx.scopes().into_iter().map(|scope| {
        watcher(
            api_for::<MailPool>(&client, scope.as_deref()),
            watcher::Config::default(),
        )
        .default_backoff()
        .touched_objects()
        .boxed()
    }));
    let pool_store = store.clone();
    controller
        // Only the domains whose standing changed: a pool of 500 domains updates its status
        // often while they attach, and each of those must not reconcile all of them.
        .watches_stream(pools, move |pool: MailPool| {
            let key = (pool.namespace().unwrap_or_default(), pool.name_any());
            let status = pool.status.clone().unwrap_or_default();
            pool_store
                .state()
                .into_iter()
                .filter(|md| {
                    md.spec.pool_ref.as_ref().is_some_and(|r| {
                        crate::controller::mail_pool::attach::pool_key(md, r) == key
                    })
                })
                .filter(|md| {
                    let (ns, name) = (md.namespace().unwrap_or_default(), md.name_any());
                    let served = status.ready_replicas > 0
                        && status
                            .domains
                            .iter()
                            .any(|d| d.namespace == ns && d.name == name);
                    let ready = md.status.as_ref().is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|c| c.type_ == status::READY && c.status == "True")
                    });
                    served != ready
                })
                .map(|md| kube::runtime::reflector::ObjectRef::from_obj(&*md))
                .collect::<Vec<_>>()
        })
        .owns(api_for::<ConfigMap>(&client, ns.as_deref()), owned())
        .owns(api_for::<Deployment>(&client, ns.as_deref()), owned())
        .owns(api_for::<Service>(&client, ns.as_deref()), owned())
        .owns(
            api_for::<PodDisruptionBudget>(&client, ns.as_deref()),
            owned(),
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
        .watches_stream(secrets, move |secret: PartialObjectMeta<Secret>| {
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
        })
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(name = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile loop"),
            }
        })
        .instrument(info_span!(
            "maildomains.kubemail.io",
            namespace = ns.as_deref().unwrap_or("*")
        ))
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
    let _slot = ctx.reconcile_slot().await;
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
    tracing::warn!(name = %md.name_any(), error = %ctx.explain(error), "reconcile failed");
    Action::requeue(ctx.backoff.next(&format!(
        "md/{}",
        md.object_ref(&()).uid.unwrap_or_default()
    )))
}

async fn apply_domain(md: &MailDomain, ctx: &Context) -> Result<Action, Error> {
    let now = timestamps::now();
    let claims = ctx.domains.all().await?;
    if let Ownership::Conflict { message } = ownership::decide(md, claims.iter().map(AsRef::as_ref))
    {
        return report_conflict(ctx, md, &message, now).await;
    }
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
                reason: e.reason(),
                message: e.to_string(),
                retry_after: None,
            };
            report_invalid(ctx, md, &invalid, now).await
        }
        Err(e) => {
            let (status, events) = status::failed(md, &ctx.explain(&e), now);
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
    // A pooled domain: is it allowed on its pool, and where does the pool's Service stand?
    let pool = match &md.spec.pool_ref {
        Some(pool_ref) => match pooled::resolve(ctx, md, pool_ref).await? {
            pooled::Resolved::Accepted(pool) => Some(pool),
            pooled::Resolved::Refused(decision) => {
                apply::detach(ctx, md).await?;
                let (status, events) =
                    status::not_accepted(md, decision.reason, &decision.message, now);
                status::publish(ctx, md, status, events).await?;
                return Ok(Action::requeue(ctx.config.resync));
            }
        },
        None => None,
    };
    let provisioned = provision::provision(ctx, v, refs, now).await?;
    let service = match &pool {
        Some(p) => p.service.as_ref(),
        None => refs.service.as_ref(),
    };
    let observed = Observed {
        addresses: load_balancer_addresses(service),
        external_dns: refs.external_dns_installed,
    };
    let children = build::build(md, v, &provisioned, &observed, &ctx.config.build, now)
        .map_err(Error::Build)?;
    let (deployment, observed, nats_due) = match &pool {
        // The pool's nodes serve it: their NATS credentials, objects and NetworkPolicy are
        // the pool's.
        Some(_) => {
            apply::apply_pooled(ctx, md, &children, refs).await?;
            (Deployment::default(), observed, None)
        }
        None => {
            // NATS objects, credentials and NetworkPolicy first: the Deployment mounts the
            // Secret.
            let nats_due =
                crate::nats::domain::reconcile(ctx, md, &children.node_config, now).await?;
            let applied = apply::apply(ctx, md, &children, refs).await?;
            // The Service may have just been created: use the addresses the server reports now.
            let observed = Observed {
                addresses: load_balancer_addresses(Some(&applied.service)),
                ..observed
            };
            (applied.deployment, observed, nats_due)
        }
    };
    let pool_view = pool.as_ref().map(|p| p.view(md));
    let (new_status, events) = status::compute(
        md,
        &status::StatusInputs {
            v,
            provisioned: &provisioned,
            children: &children,
            deployment: &deployment,
            observed: &observed,
            pool: pool_view.as_ref(),
        },
        now,
    );
    let ready_replicas = new_status.ready_replicas;
    status::publish(ctx, md, new_status, events).await?;
    let wanted = pool
        .as_ref()
        .map_or(md.spec.replicas, |p| p.pool.spec.replicas);
    ctx.metrics.set_ready_replicas(
        &md.namespace().unwrap_or_default(),
        &md.name_any(),
        ready_replicas,
        wanted,
    );
    ctx.metrics.set_certificate_expiry(
        &md.namespace().unwrap_or_default(),
        &md.name_any(),
        provisioned.tls.not_after(refs.tls_secret.as_ref()),
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
    consider(nats_due);
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

/// A later claim of a domain: its own Deployment goes (it has one only if it once owned the
/// domain, e.g. before the operator watched the earlier claim's namespace), nothing else is
/// made, and the status says why without naming the other claim.
async fn report_conflict(
    ctx: &Context,
    md: &MailDomain,
    message: &str,
    now: timestamps::UnixSeconds,
) -> Result<Action, Error> {
    ctx.metrics
        .reconcile_failed(CONTROLLER, ownership::DOMAIN_CONFLICT);
    tracing::info!(domain = %md.spec.domain, "the domain is claimed by an earlier MailDomain");
    let ns = md.namespace().ok_or(Error::MissingNamespace)?;
    delete_own_deployment(ctx, &ns, &md.name_any()).await?;
    let (status, events) = status::conflict(md, message, now);
    status::publish(ctx, md, status, events).await?;
    Ok(Action::requeue(CONFLICT_RECHECK))
}

async fn delete_own_deployment(ctx: &Context, ns: &str, name: &str) -> Result<(), Error> {
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    match deployments
        .delete(&names::deployment(name), &DeleteParams::background())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(Error::DeleteChild {
            kind: "Deployment".into(),
            name: names::deployment(name),
            source,
        }),
    }
}

/// Removes what ownership cannot: the domain's JetStream consumer. The nodes' delivery
/// workers would create it again, so their Deployment goes first and the consumer only once no
/// pod of the domain runs any more (until then the finalizer stays and this is retried).
/// Idempotent, and a no-op when nothing was ever made (an invalid domain). A claim in
/// conflict never touches the consumer: it belongs to the domain's owner.
async fn cleanup(md: &MailDomain, ctx: &Context) -> Result<Action, Error> {
    let ns = md.namespace().ok_or(Error::MissingNamespace)?;
    let name = md.name_any();
    let claims = ctx.domains.all().await?;
    let owner = ownership::decide(md, claims.iter().map(AsRef::as_ref)) == Ownership::Owner;
    let result = async {
        delete_own_deployment(ctx, &ns, &name).await?;
        if let Some(pool_ref) = &md.spec.pool_ref {
            // The pool's nodes pull from the domain's consumer until the pool stops serving
            // the domain: take it off, and wait for that.
            apply::detach(ctx, md).await?;
            if let pooled::Resolved::Accepted(pool) = pooled::resolve(ctx, md, pool_ref).await?
                && pool.view(md).attached
            {
                return Err(Error::CleanupPending(format!(
                    "waiting for MailPool {} to stop serving the domain before removing the JetStream consumer {}",
                    pool.view(md).pool,
                    queue::consumer_name(&md.spec.domain)
                )));
            }
        }
        let selector = names::selector_string(&name);
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
        if !owner {
            return Ok(false);
        }
        queue::delete_consumer(
            &ctx.nats_access().await?,
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
                owner,
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
                _ => status::cleanup_failed(md, &ctx.explain(&e), now),
            };
            if let Err(patch_error) = status::publish(ctx, md, status, events).await {
                tracing::warn!(error = %patch_error, "cannot report the cleanup state");
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use kubemail_test_support::module_graph::{PARENT, Source, find_cycle, module_graph, sources};

    const ABSOLUTE: &str = "crate::controller::mail_domain::";

    fn this_directory() -> Vec<Source> {
        sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src/controller/mail_domain"))
    }

    #[test]
    fn the_pipeline_modules_import_each_other_without_cycles() {
        let files = this_directory();
        let graph = module_graph(&files, ABSOLUTE);
        assert_eq!(
            find_cycle(&graph),
            None,
            "module graph of mail_domain: {graph:?}"
        );
        assert!(graph["names"].is_empty(), "names is a leaf: {graph:?}");
        assert!(graph["validate"].contains("names"), "{graph:?}");
        assert!(graph["build"].contains("validate"), "{graph:?}");
        assert!(graph[PARENT].contains("build"), "{graph:?}");

        // The check sees a back edge, written either way, and names the cycle.
        for edge in [
            format!("use {}::build::Children;", "super"),
            format!("use crate::controller::mail_domain::{{{}}};", "build, dkim"),
        ] {
            let mut with_back_edge = files.clone();
            let names = with_back_edge
                .iter_mut()
                .find(|(m, _)| m == &["names"])
                .unwrap();
            names.1.insert_str(0, &format!("{edge}\n"));
            let cycle = find_cycle(&module_graph(&with_back_edge, ABSOLUTE)).expect(&edge);
            assert!(cycle.contains(&"names".to_owned()), "{cycle:?}");
        }
        let mut nested = files.clone();
        let config = nested
            .iter_mut()
            .find(|(m, _)| m == &["build", "config"])
            .unwrap();
        config
            .1
            .insert_str(0, &format!("use {}::status;\n", "super::super"));
        assert!(
            find_cycle(&module_graph(&nested, ABSOLUTE)).is_some(),
            "build -> status -> build"
        );
    }
}
