//! The MailPool controller (shared SMTP nodes): collects the MailDomains attached to a pool,
//! copies their key material into the pool's namespace and renders one node config for all of
//! them; the nodes reload it without a restart. With authenticated NATS the pool's nodes get
//! one credential for all attached domains, and the operator makes the domains' JetStream
//! objects, before the config that names them (`crate::nats::domain::reconcile_nodes`).
//!
//! ```text
//! MailDomains with poolRef ─► attach rules ─► <md>-pool hand-over + Secrets ─► build (pure)
//!  (operator's store)          (attach.rs)      (read, in their namespaces)      (build.rs)
//!                                                                                   │
//!                       status (attached domains, replicas) ◄─ apply (SSA) ◄────────┘
//! ```

pub mod attach;
pub mod build;
pub mod contract;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field, info_span, instrument};

use self::build::{PoolMaterial, PooledDomain};
use self::contract::{DOMAIN_KEY, FILES_KEY, Files};
use crate::controller::mail_domain::build::load_balancer_addresses;
use crate::controller::mail_domain::names::DOMAIN_LABEL;
use crate::controller::mail_domain::ownership::{self, Ownership};
use crate::controller::mail_domain::provision;
use crate::controller::{Context, Error, FIELD_MANAGER, api_for, condition};
use crate::crd::mail_domain::MailDomain;
use crate::crd::mail_pool::{MailPool, MailPoolStatus};
use crate::timestamps;
use crate::users::{self, USERNAME_KEY_KEY};

/// Metric label of this controller.
pub const CONTROLLER: &str = "mailpool";
/// A burst of attaching domains (500 applied at once) becomes a few reconciles, not one each.
const DEBOUNCE: Duration = Duration::from_secs(2);

/// Runs the MailPool controller until `stop` fires, one controller per watched namespace.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    ctx.in_every_scope(&stop, run_in).await;
}

async fn run_in(ctx: Arc<Context>, ns: Option<String>, stop: CancellationToken) {
    let client = ctx.client.clone();
    let owned = || watcher::Config::default().labels(&crate::controller::managed_by_selector());
    let domain_ctx = ctx.clone();
    // A MailDomain change (attach, detach, its hand-over rewritten) reconciles its pool; the
    // domains may live in any watched namespace, not only the pool's.
    let domains = futures::stream::select_all(ctx.scopes().into_iter().map(|scope| {
        watcher(
            api_for::<MailDomain>(&client, scope.as_deref()),
            watcher::Config::default(),
        )
        .default_backoff()
        .touched_objects()
        .boxed()
    }));
    // So does a change of a domain's key material (a renewed certificate, a rotated DKIM key).
    let secrets = futures::stream::select_all(ctx.scopes().into_iter().map(|scope| {
        watcher(
            api_for::<PartialObjectMeta<Secret>>(&client, scope.as_deref()),
            watcher::Config::default().labels(DOMAIN_LABEL),
        )
        .default_backoff()
        .touched_objects()
        .boxed()
    }));
    Controller::new(
        api_for::<MailPool>(&client, ns.as_deref()),
        watcher::Config::default().any_semantic(),
    )
    .with_config(
        kube::runtime::controller::Config::default()
            .concurrency(ctx.config.reconcile_concurrency)
            .debounce(DEBOUNCE),
    )
    .owns(api_for::<Deployment>(&client, ns.as_deref()), owned())
    .owns(api_for::<ConfigMap>(&client, ns.as_deref()), owned())
    .watches_stream(domains, move |md: MailDomain| {
        pool_of(&md).into_iter().collect::<Vec<_>>()
    })
    .watches_stream(secrets, move |secret: PartialObjectMeta<Secret>| {
        let Some(md_name) = secret.labels().get(DOMAIN_LABEL).cloned() else {
            return Vec::new();
        };
        let namespace = secret.namespace();
        domain_ctx
            .domains
            .snapshot()
            .iter()
            .filter(|md| md.namespace() == namespace && md.name_any() == md_name)
            .filter_map(|md| pool_of(md))
            .collect()
    })
    .graceful_shutdown_on(stop.cancelled_owned())
    .run(reconcile, error_policy, ctx)
    .for_each(|_| async {})
    .instrument(info_span!(
        "mailpools.kubemail.io",
        namespace = ns.as_deref().unwrap_or("*")
    ))
    .await;
}

/// The pool a MailDomain names, as an object reference.
fn pool_of(md: &MailDomain) -> Option<ObjectRef<MailPool>> {
    let pool_ref = md.spec.pool_ref.as_ref()?;
    let (ns, name) = attach::pool_key(md, pool_ref);
    Some(ObjectRef::new(&name).within(&ns))
}

/// One reconcile of one MailPool.
#[instrument(
    parent = None,
    skip(pool, ctx),
    fields(
        otel.name = "mailpool.reconcile",
        controller = CONTROLLER,
        namespace = field::Empty,
        name = %pool.name_any(),
        domains = field::Empty,
    )
)]
pub async fn reconcile(pool: Arc<MailPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _slot = ctx.reconcile_slot().await;
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let ns = pool.namespace().ok_or(Error::MissingNamespace)?;
    tracing::Span::current().record("namespace", field::display(&ns));
    let now = timestamps::now();
    let domains = attached_domains(&ctx, &pool, &ns).await?;
    tracing::Span::current().record("domains", domains.len());
    let material = pool_material(&ctx, &pool, &ns, now).await?;
    let children = match build::build(&pool, &domains, &material, &ctx.config.build) {
        Ok(c) => c,
        Err(e) => {
            let message = crate::controller::chain(&e);
            publish_status(&ctx, &pool, not_ready(&pool, e.reason(), &message, now)).await?;
            return Ok(Action::await_change());
        }
    };
    let ssa = PatchParams::apply(FIELD_MANAGER).force();
    let apply = |kind: &'static str, name: String, result: Result<(), kube::Error>| {
        result.map_err(|source| Error::ApplyChild {
            kind: kind.into(),
            name,
            source,
        })
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    // Key material first: the config that names it comes after.
    for s in std::iter::once(&children.node_secret).chain(&children.shards) {
        let name = s.name_any();
        apply(
            "Secret",
            name.clone(),
            secrets
                .patch(&name, &ssa, &Patch::Apply(s))
                .await
                .map(|_| ()),
        )?;
    }
    // The nodes' NATS objects, credentials and NetworkPolicy before the config that names a
    // new domain: by the time a node serves it, its consumer and body bucket exist and the
    // mounted credentials (one for every attached domain) cover it.
    let nats_due = crate::nats::domain::reconcile_nodes(
        &ctx,
        &crate::nats::domain::Nodes {
            namespace: ns.clone(),
            labels: build::labels(&pool.name_any()),
            owner: pool_owner(&pool)?,
            secret: contract::nats_secret(&pool.name_any()),
            network_policy: contract::network_policy(&pool.name_any()),
            selector: build::selector(&pool.name_any()),
            user: format!("kubemail-pool:{ns}/{}", pool.name_any()),
            node: &children.node,
        },
        now,
    )
    .await?;
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let name = children.config_map.name_any();
    apply(
        "ConfigMap",
        name.clone(),
        config_maps
            .patch(&name, &ssa, &Patch::Apply(&children.config_map))
            .await
            .map(|_| ()),
    )?;
    let name = children.service.name_any();
    let service = Api::<Service>::namespaced(ctx.client.clone(), &ns)
        .patch(&name, &ssa, &Patch::Apply(&children.service))
        .await
        .map_err(|source| Error::ApplyChild {
            kind: "Service".into(),
            name: name.clone(),
            source,
        })?;
    apply(
        "PodDisruptionBudget",
        name.clone(),
        Api::<PodDisruptionBudget>::namespaced(ctx.client.clone(), &ns)
            .patch(&name, &ssa, &Patch::Apply(&children.pdb))
            .await
            .map(|_| ()),
    )?;
    let deployment = Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
        .patch(&name, &ssa, &Patch::Apply(&children.deployment))
        .await
        .map_err(|source| Error::ApplyChild {
            kind: "Deployment".into(),
            name: name.clone(),
            source,
        })?;

    let d = deployment.status.unwrap_or_default();
    let ready_replicas = d.ready_replicas.unwrap_or(0);
    let prev = pool.status.clone().unwrap_or_default();
    let ready = ready_replicas > 0 || pool.spec.replicas == 0;
    let status = MailPoolStatus {
        observed_generation: pool.metadata.generation,
        replicas: d.replicas.unwrap_or(0),
        ready_replicas,
        addresses: load_balancer_addresses(Some(&service))
            .iter()
            .map(ToString::to_string)
            .collect(),
        selector: Some(build::selector_string(&pool.name_any())),
        attached_domains: i32::try_from(children.attached.len()).unwrap_or(i32::MAX),
        domains: children.attached,
        conditions: vec![condition(
            &prev.conditions,
            "Ready",
            ready,
            if ready { "Ready" } else { "PodsNotReady" },
            format!(
                "{ready_replicas} of {} SMTP node pods ready, serving {} domain(s)",
                pool.spec.replicas,
                domains.len()
            ),
            pool.metadata.generation,
            now,
        )],
    };
    publish_status(&ctx, &pool, status).await?;
    ctx.backoff.reset(&format!(
        "mp/{}",
        pool.object_ref(&()).uid.unwrap_or_default()
    ));
    // Wake up for the credentials' renewal, at the latest after the resync interval.
    let next = nats_due.map_or(ctx.config.resync, |t| {
        ctx.config.resync.min(Duration::from_secs(
            u64::try_from((t - now).max(1)).unwrap_or(1),
        ))
    });
    Ok(Action::requeue(next))
}

/// The owner reference the pool's children carry.
fn pool_owner(
    pool: &MailPool,
) -> Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference, Error> {
    let mut owner = pool.controller_owner_ref(&()).ok_or(Error::Build(
        crate::controller::mail_domain::build::BuildError::MissingUid,
    ))?;
    owner.block_owner_deletion = Some(true);
    Ok(owner)
}

/// Transient errors retry with a growing delay; the failure is counted.
pub fn error_policy(pool: Arc<MailPool>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failed(CONTROLLER, error.metric_label());
    tracing::warn!(name = %pool.name_any(), error = %crate::controller::chain(error), "reconcile failed");
    Action::requeue(ctx.backoff.next(&format!(
        "mp/{}",
        pool.object_ref(&()).uid.unwrap_or_default()
    )))
}

/// The MailDomains this pool serves: those naming it, allowed by its rules, first claims of
/// their domains, not being deleted, whose hand-over exists; with their files read from their
/// namespaces (one list of the operator's ConfigMaps and Secrets per namespace).
async fn attached_domains(
    ctx: &Context,
    pool: &MailPool,
    pool_ns: &str,
) -> Result<Vec<PooledDomain>, Error> {
    let pool_name = pool.name_any();
    let claims = ctx.domains.all().await?;
    let mut labels_of: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    let mut candidates = Vec::new();
    for md in &claims {
        let Some(pool_ref) = &md.spec.pool_ref else {
            continue;
        };
        if attach::pool_key(md, pool_ref) != (pool_ns.to_owned(), pool_name.clone())
            || md.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let md_ns = md.namespace().unwrap_or_default();
        if !labels_of.contains_key(&md_ns) {
            let labels = namespace_labels(ctx, &md_ns).await?;
            labels_of.insert(md_ns.clone(), labels);
        }
        let decision = attach::decide(Some(pool), pool_ns, &pool_name, &md_ns, &labels_of[&md_ns]);
        if decision.accepted
            && ownership::decide(md, claims.iter().map(AsRef::as_ref)) == Ownership::Owner
        {
            candidates.push(md.clone());
        }
    }
    let mut by_namespace: BTreeMap<String, Vec<Arc<MailDomain>>> = BTreeMap::new();
    for md in candidates {
        by_namespace
            .entry(md.namespace().unwrap_or_default())
            .or_default()
            .push(md);
    }
    let mut out = Vec::new();
    for (ns, mds) in by_namespace {
        let params = ListParams::default().labels(DOMAIN_LABEL);
        let config_maps: BTreeMap<String, ConfigMap> =
            Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
                .list(&params)
                .await
                .map_err(|source| Error::ReadObject {
                    kind: "ConfigMap",
                    name: format!("{ns}/*"),
                    source,
                })?
                .items
                .into_iter()
                .map(|c| (c.name_any(), c))
                .collect();
        let mut secrets: BTreeMap<String, Secret> =
            Api::<Secret>::namespaced(ctx.client.clone(), &ns)
                .list(&params)
                .await
                .map_err(|source| Error::ReadObject {
                    kind: "Secret",
                    name: format!("{ns}/*"),
                    source,
                })?
                .items
                .into_iter()
                .map(|s| (s.name_any(), s))
                .collect();
        for md in mds {
            let Some(handover) = config_maps.get(&contract::pool_domain(&md.name_any())) else {
                continue;
            };
            let data = handover.data.clone().unwrap_or_default();
            let (Some(domain), Some(files)) = (data.get(DOMAIN_KEY), data.get(FILES_KEY)) else {
                continue;
            };
            let (Ok(config), Ok(files)) = (
                serde_yaml::from_str::<kubemail_config::DomainConfig>(domain),
                serde_yaml::from_str::<Files>(files),
            ) else {
                tracing::warn!(maildomain = %md.name_any(), "unreadable pool hand-over; not attaching it");
                continue;
            };
            let mut bytes = BTreeMap::new();
            let mut complete = true;
            for (file, source) in &files {
                if !secrets.contains_key(&source.secret) {
                    // A Secret of the user's (relay credentials): read it on its own.
                    if let Some(s) = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
                        .get_opt(&source.secret)
                        .await
                        .map_err(|e| Error::ReadObject {
                            kind: "Secret",
                            name: format!("{ns}/{}", source.secret),
                            source: e,
                        })?
                    {
                        secrets.insert(source.secret.clone(), s);
                    }
                }
                match secrets
                    .get(&source.secret)
                    .and_then(|s| s.data.as_ref())
                    .and_then(|d| d.get(&source.key))
                {
                    Some(ByteString(b)) => {
                        bytes.insert(file.clone(), b.clone());
                    }
                    None => complete = false,
                }
            }
            // Not yet complete (a Secret still being written): attach at the next pass.
            if complete {
                out.push(PooledDomain {
                    namespace: ns.clone(),
                    name: md.name_any(),
                    config,
                    files: bytes,
                });
            }
        }
    }
    Ok(out)
}

/// The labels of namespace `ns` (for `from: Selector`).
pub async fn namespace_labels(ctx: &Context, ns: &str) -> Result<BTreeMap<String, String>, Error> {
    Ok(Api::<Namespace>::all(ctx.client.clone())
        .get_opt(ns)
        .await
        .map_err(|source| Error::ReadObject {
            kind: "Namespace",
            name: ns.to_owned(),
            source,
        })?
        .map(|n| n.labels().clone())
        .unwrap_or_default())
}

/// The pool's default certificate (from the operator's CA, kept until renewal) and the key
/// of its nodes' shared AUTH failure count (made once).
async fn pool_material(
    ctx: &Context,
    pool: &MailPool,
    ns: &str,
    now: timestamps::UnixSeconds,
) -> Result<PoolMaterial, Error> {
    let name = contract::node_secret(&pool.name_any());
    let existing = Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .get_opt(&name)
        .await
        .map_err(|source| Error::ReadObject {
            kind: "Secret",
            name: name.clone(),
            source,
        })?;
    let ca = provision::ensure_ca(ctx, now).await?;
    let leaf = provision::operator_leaf(
        &ca,
        &pool.spec.hostname,
        existing.as_ref(),
        now,
        ctx.config.certificate_validity,
    )?;
    let text = |key: &str| {
        existing
            .as_ref()
            .and_then(|s| s.data.as_ref())
            .and_then(|d| d.get(key))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    Ok(PoolMaterial {
        cert_pem: leaf.cert_pem.clone(),
        key_pem: leaf.key_pem.expose().to_owned(),
        username_key: users::username_key(text(USERNAME_KEY_KEY).as_deref()),
    })
}

fn not_ready(
    pool: &MailPool,
    reason: &str,
    message: &str,
    now: timestamps::UnixSeconds,
) -> MailPoolStatus {
    let mut status = pool.status.clone().unwrap_or_default();
    status.conditions = vec![condition(
        &status.conditions,
        "Ready",
        false,
        reason,
        message.to_owned(),
        pool.metadata.generation,
        now,
    )];
    status.observed_generation = pool.metadata.generation;
    status
}

async fn publish_status(
    ctx: &Context,
    pool: &MailPool,
    status: MailPoolStatus,
) -> Result<(), Error> {
    crate::controller::apply_status(ctx, pool, pool.status.as_ref(), &status)
        .await
        .map(|_| ())
}
