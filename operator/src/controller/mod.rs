//! The controllers and what they share: the [`Context`] (client, event recorder, metrics,
//! settings, caches), the reconcile [`Error`], condition bookkeeping, and [`run`], which runs
//! every controller (MailDomain, Relay, EventSink, Suppression) until told to stop (the leader
//! elector decides when), with the DNS check and the sweep of orphaned bodies.

pub mod delivery_pause;
pub mod dns_check;
pub mod event_sink;
pub mod mail_domain;
pub mod mail_pool;
pub mod relay;
pub mod suppression;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

use self::mail_domain::build::BuildConfig;
use crate::crd::mail_domain::MailDomain;
use crate::metrics::Metrics;
use crate::timestamps::UnixSeconds;
use crate::users::UsersCache;

/// The one field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "kubemail-operator";
/// `app.kubernetes.io/managed-by` on everything the operator makes.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "kubemail-operator";
/// How long a reconcile waits for the MailDomain stores' first complete lists.
const STORE_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a CRD lookup is trusted before asking the API server again.
const CRD_CACHE_TTL: Duration = Duration::from_secs(10);

/// Operator settings the controllers use.
#[derive(Debug, Clone)]
pub struct Config {
    /// Watch only these namespaces; empty: all namespaces.
    pub watch_namespaces: Vec<String>,
    /// Reconciles that may run at once, over every controller and namespace.
    pub reconcile_concurrency: u16,
    /// The operator's own namespace: the CA Secret lives there.
    pub operator_namespace: String,
    /// Name of the CA Secret.
    pub ca_secret_name: String,
    /// Lifetime of operator-issued certificates.
    pub certificate_validity: Duration,
    /// Reconcile every domain at least this often.
    pub resync: Duration,
    /// Deadline of NATS calls (finalizer).
    pub nats_timeout: Duration,
    /// Deadline of a status patch.
    pub status_patch_timeout: Duration,
    /// Deadline of a Relay probe.
    pub probe_timeout: Duration,
    /// EHLO name of Relay probes.
    pub probe_ehlo_name: String,
    /// What shapes the children.
    pub build: BuildConfig,
    /// How the operator and the nodes reach NATS (authentication, TLS, NetworkPolicy).
    pub nats: crate::nats::NatsSettings,
    /// The `DnsPublished` check.
    pub dns_check: dns_check::DnsCheckConfig,
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub config: Config,
    pub users_cache: UsersCache,
    pub backoff: Backoff,
    /// The webhook dispatchers of EventSinks.
    pub sinks: event_sink::Dispatchers,
    /// Every MailDomain the running controllers see (one store per watched namespace): what
    /// domain ownership is decided on.
    pub domains: DomainIndex,
    /// Bounds the reconciles running at once (see [`Config::reconcile_concurrency`]).
    reconcile_slots: Semaphore,
    crds: Mutex<HashMap<String, (bool, Instant)>>,
}

/// The MailDomain reflector stores of the running controllers, one per watched namespace (or
/// one for all namespaces), read together.
#[derive(Default)]
pub struct DomainIndex {
    stores: Mutex<Vec<Store<MailDomain>>>,
}

impl DomainIndex {
    /// Forgets the stores of a previous leadership term.
    pub fn clear(&self) {
        self.stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Adds the store of one running controller.
    pub fn add(&self, store: Store<MailDomain>) {
        self.stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(store);
    }

    /// Every MailDomain the stores hold now, without waiting (for watch mappers, which must
    /// not block).
    pub fn snapshot(&self) -> Vec<Arc<MailDomain>> {
        self.stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flat_map(|s| s.state())
            .collect()
    }

    /// Every MailDomain of every store, once each store has its first complete list (so a
    /// claim is never judged against a half-read cluster). A store that has no complete list
    /// within [`STORE_READY_TIMEOUT`] fails the reconcile (retried with backoff) rather than
    /// holding it, and its reconcile slot, indefinitely.
    pub async fn all(&self) -> Result<Vec<Arc<MailDomain>>, Error> {
        let stores = self
            .stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out = Vec::new();
        for store in stores {
            match tokio::time::timeout(STORE_READY_TIMEOUT, store.wait_until_ready()).await {
                Ok(Ok(())) => out.extend(store.state()),
                // A store whose writer is gone belongs to a stopped controller: skip it.
                Ok(Err(_)) => {}
                Err(_) => return Err(Error::StoresNotReady),
            }
        }
        Ok(out)
    }
}

/// Why a reconcile failed. Every message names the action that failed, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("object has no namespace")]
    MissingNamespace,
    #[error("cannot read {kind} {name}")]
    ReadObject {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot apply {kind} {name}")]
    ApplyChild {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot delete {kind} {name}")]
    DeleteChild {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot patch the status of {name}")]
    PatchStatus {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("the status patch of {0} timed out")]
    PatchStatusTimedOut(String),
    #[error("cannot provision the DKIM keys")]
    ProvisionDkim(#[source] crate::dkim::DkimError),
    #[error("cannot issue the TLS certificate")]
    IssueCertificate(#[source] crate::certs::CertError),
    #[error("cannot create the CA Secret {name}")]
    CreateCa {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the CA Secret {0} has no usable tls.crt and tls.key; fix or delete it (a new CA will be made)"
    )]
    InvalidCa(String),
    #[error("cannot render the submission users")]
    RenderUsers(#[source] crate::users::UsersError),
    #[error("cannot build the children")]
    Build(#[source] mail_domain::build::BuildError),
    #[error("cannot delete the JetStream consumer")]
    DeleteConsumer(#[source] crate::queue::QueueError),
    #[error("cannot use the NATS account Secret {name}")]
    NatsAccount {
        name: String,
        #[source]
        source: crate::nats::trust::TrustError,
    },
    #[error("cannot set up the domain's JetStream objects")]
    ManageNats(#[source] crate::nats::ManageError),
    #[error("cannot mint NATS credentials")]
    MintCredentials(#[source] crate::nats::jwt::JwtError),
    #[error("cannot write the delivery pause")]
    Pause(#[source] kubemail_queue_admin::AdminError),
    #[error("{0}")]
    CleanupPending(String),
    #[error("cannot {action} in NATS")]
    Nats {
        action: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the {0} task panicked")]
    BlockingTaskFailed(&'static str),
    #[error("the MailDomains of the watched namespaces are not all listed yet")]
    StoresNotReady,
    #[error("finalizer failed")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// The `error` label of the failure metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::MissingNamespace => "missing_namespace",
            Self::ReadObject { .. } => "read_object",
            Self::ApplyChild { .. } => "apply_child",
            Self::DeleteChild { .. } => "delete_child",
            Self::PatchStatus { .. } | Self::PatchStatusTimedOut(_) => "patch_status",
            Self::ProvisionDkim(_) => "provision_dkim",
            Self::IssueCertificate(_) | Self::CreateCa { .. } | Self::InvalidCa(_) => "certificate",
            Self::RenderUsers(_) => "render_users",
            Self::Build(_) => "build",
            Self::DeleteConsumer(_) => "delete_consumer",
            Self::NatsAccount { .. } => "nats_account",
            Self::ManageNats(_) => "manage_nats",
            Self::MintCredentials(_) => "mint_credentials",
            Self::Pause(_) => "pause",
            Self::CleanupPending(_) => "cleanup_pending",
            Self::Nats { .. } => "nats",
            Self::BlockingTaskFailed(_) => "blocking_task",
            Self::StoresNotReady => "stores_not_ready",
            Self::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
        }
    }
}

/// An error with its causes, `a: b: c`, for logs, conditions and events.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Per-object exponential retry delays: 5 s doubling up to 5 min, reset on success.
#[derive(Default)]
pub struct Backoff {
    attempts: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_secs(5);
    const MAX: Duration = Duration::from_secs(300);

    pub fn next(&self, key: &str) -> Duration {
        let mut attempts = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        let n = attempts.entry(key.to_owned()).or_insert(0);
        let delay = Self::FIRST
            .saturating_mul(2u32.saturating_pow(*n))
            .min(Self::MAX);
        *n = n.saturating_add(1);
        delay
    }

    pub fn reset(&self, key: &str) {
        self.attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

impl Context {
    pub fn new(client: Client, config: Config, metrics: Arc<Metrics>, instance: String) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.to_owned(),
                instance: Some(instance),
            },
        );
        Self {
            client,
            recorder,
            metrics,
            users_cache: UsersCache::default(),
            backoff: Backoff::default(),
            sinks: event_sink::Dispatchers::default(),
            domains: DomainIndex::default(),
            reconcile_slots: Semaphore::new(usize::from(config.reconcile_concurrency.max(1))),
            config,
            crds: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for one of the reconcile slots; the reconcile runs while the permit lives.
    pub async fn reconcile_slot(&self) -> Option<SemaphorePermit<'_>> {
        // The semaphore is never closed, so `None` does not happen; a reconcile without a
        // permit would only exceed the bound, never stall.
        self.reconcile_slots.acquire().await.ok()
    }

    /// The namespaces to watch, each as one controller scope: `[None]` for all namespaces.
    pub fn scopes(&self) -> Vec<Option<String>> {
        if self.config.watch_namespaces.is_empty() {
            vec![None]
        } else {
            self.config
                .watch_namespaces
                .iter()
                .cloned()
                .map(Some)
                .collect()
        }
    }

    /// Runs `run_in` once per watched namespace (once for all namespaces without a list)
    /// until every one has returned: how each controller starts.
    pub async fn in_every_scope<F, Fut>(self: &Arc<Self>, stop: &CancellationToken, run_in: F)
    where
        F: Fn(Arc<Context>, Option<String>, CancellationToken) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        futures::future::join_all(
            self.scopes()
                .into_iter()
                .map(|ns| run_in(self.clone(), ns, stop.clone())),
        )
        .await;
    }

    /// How to reach NATS now: the URL, the CA (the configured one, else with a bundled NATS
    /// the operator's own CA) and the account keys (read from their Secret at each call, so
    /// a rotated signing key is used at once).
    pub async fn nats_access(&self) -> Result<crate::nats::NatsAccess, Error> {
        crate::nats::access(self).await
    }

    /// An error with its causes and, when a cause is recognised, what to do about it
    /// (see [`crate::diagnose`]).
    pub fn explain(&self, error: &(dyn std::error::Error + 'static)) -> String {
        crate::diagnose::explain(error, &crate::diagnose::Hints::from_config(&self.config))
    }

    /// Whether a CRD is installed and established (cached briefly).
    pub async fn crd_installed(&self, name: &str) -> Result<bool, Error> {
        {
            let crds = self.crds.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((present, at)) = crds.get(name)
                && at.elapsed() < CRD_CACHE_TTL
            {
                return Ok(*present);
            }
        }
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let crd = api
            .get_opt(name)
            .await
            .map_err(|source| Error::ReadObject {
                kind: "CustomResourceDefinition",
                name: name.to_owned(),
                source,
            })?;
        let established = crd
            .and_then(|c| c.status)
            .and_then(|s| s.conditions)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
        self.crds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), (established, Instant::now()));
        Ok(established)
    }
}

/// Waits until the CRD `name` is installed (checking every minute), so a controller of an
/// optional resource does not fail its watch on a cluster whose CRDs predate it. False when
/// `stop` fired first.
pub async fn wait_for_crd(ctx: &Context, name: &str, stop: &CancellationToken) -> bool {
    let mut logged = false;
    loop {
        match ctx.crd_installed(name).await {
            Ok(true) => return true,
            Ok(false) if !logged => {
                tracing::warn!(
                    crd = name,
                    "CRD not installed; its controller waits for it (apply crds/ from this release)"
                );
                logged = true;
            }
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %chain(&e), "cannot look up a CRD"),
        }
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

/// Server-side applies `status` to `object`'s status subresource (field manager
/// [`FIELD_MANAGER`], within `status_patch_timeout`). Returns false, without a request, when
/// the object's `current` status already equals it.
pub async fn apply_status<K, S>(
    ctx: &Context,
    object: &K,
    current: Option<&S>,
    status: &S,
) -> Result<bool, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    S: serde::Serialize + PartialEq,
{
    if current == Some(status) {
        return Ok(false);
    }
    let ns = object.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    match tokio::time::timeout(
        ctx.config.status_patch_timeout,
        api.patch_status(
            &object.name_any(),
            &kube::api::PatchParams::apply(FIELD_MANAGER).force(),
            &kube::api::Patch::Apply(&patch),
        ),
    )
    .await
    {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(source)) => Err(Error::PatchStatus {
            name: object.name_any(),
            source,
        }),
        Err(_) => Err(Error::PatchStatusTimedOut(object.name_any())),
    }
}

/// Label selector of every child the operator makes: the watches of ConfigMaps, Deployments,
/// Services and PDBs list only these, not every such object of the cluster.
pub fn managed_by_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY}")
}

/// An API for `K` in one namespace or all.
pub fn api_for<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The objects in `store`, in `changed`'s namespace, that `refers` says point at `changed`
/// (given by name): what a watch of a referenced kind (a Relay, a Secret) maps an event to.
pub fn referrers<K, S>(
    store: &Store<K>,
    changed: &S,
    refers: impl Fn(&K, &str) -> bool,
) -> Vec<ObjectRef<K>>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    S: Resource,
{
    let namespace = changed.namespace();
    let name = changed.name_any();
    store
        .state()
        .into_iter()
        .filter(|obj| obj.namespace() == namespace && refers(obj, &name))
        .map(|obj| ObjectRef::from_obj(&*obj))
        .collect()
}

/// A condition of `type_`, keeping the previous `lastTransitionTime` while the status holds.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: UnixSeconds,
) -> Condition {
    condition_with(
        previous,
        type_,
        if ok { "True" } else { "False" },
        reason,
        message,
        generation,
        now,
    )
}

/// Like [`condition`], with any status (`True`, `False`, `Unknown`).
pub fn condition_with(
    previous: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: UnixSeconds,
) -> Condition {
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(Timestamp::from_second(now).unwrap_or(Timestamp::UNIX_EPOCH)));
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Runs every controller (and, for a bundled NATS, its bootstrap) until `stop` fires.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    ctx.domains.clear();
    tokio::join!(
        mail_domain::run(ctx.clone(), stop.clone()),
        mail_pool::run(ctx.clone(), stop.clone()),
        relay::run(ctx.clone(), stop.clone()),
        event_sink::run(ctx.clone(), stop.clone()),
        suppression::run(ctx.clone(), stop.clone()),
        delivery_pause::run(ctx.clone(), stop.clone()),
        dns_check::run(ctx.clone(), stop.clone()),
        crate::nats::sweep::run(ctx.clone(), stop.clone()),
        crate::nats::settings::run_bootstrap(ctx, stop),
    );
}
