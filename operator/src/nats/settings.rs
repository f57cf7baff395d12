//! The operator's NATS settings (from its flags) and what it derives from them at run time:
//! how to reach NATS ([`access`]) and, for the bundled NATS, the trust chain and the server
//! certificate it keeps in Secrets ([`bootstrap`]).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

use super::jetstream::NatsAccess;
use super::trust::{AccountKeys, Trust};
use crate::certs::{self, CA_CERT_KEY, TLS_CERT_KEY, TLS_KEY_KEY};
use crate::controller::{Context, Error, MANAGED_BY, MANAGED_BY_LABEL};
use crate::timestamps::UnixSeconds;

/// How the operator and the nodes reach NATS.
#[derive(Debug, Clone, Default)]
pub struct NatsSettings {
    /// Server URL(s), comma separated.
    pub url: String,
    /// CA certificate(s) (PEM) of the NATS server certificate (`--nats-ca-file`). `None` with
    /// a bundled NATS: the operator's own CA, which issued the server certificate.
    pub ca_pem: Option<String>,
    /// Secret (operator namespace) holding the account keys; `None`: NATS without
    /// authentication (the nodes then manage the JetStream objects themselves).
    pub account_secret: Option<String>,
    /// Directory with the account keys as files, instead of `account_secret`.
    pub account_dir: Option<std::path::PathBuf>,
    /// The bundled NATS: the operator makes the trust chain and the server certificate.
    pub bootstrap: Option<Bootstrap>,
    /// Lifetime of the nodes' user JWTs (renewed at half).
    pub credentials_validity: Duration,
    /// Replicas of the queue stream, its buckets and the AUTH-failure stream.
    pub replicas: u32,
    /// A NetworkPolicy per MailDomain for its pods.
    pub network_policy: Option<NetworkPolicySettings>,
}

/// What the operator makes for the bundled NATS.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// Secret (operator namespace) the NATS pods mount `tls.crt`/`tls.key`/`ca.crt` from.
    pub tls_secret: String,
    /// Names in the server certificate: the Service and each pod's name under the headless
    /// Service (clients and routes verify them). Empty: the operator issues no certificate
    /// (cert-manager does).
    pub server_names: Vec<String>,
    /// Lifetime of the server certificate (renewed at two thirds).
    pub certificate_validity: Duration,
}

/// Where the node pods may connect to, and who may scrape them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetworkPolicySettings {
    /// The NATS pods: their namespace and labels. `None`: NATS is outside the cluster, any
    /// address on the NATS port.
    pub nats_pods: Option<(String, BTreeMap<String, String>)>,
    /// NATS' client port.
    pub nats_port: u16,
    /// Peers allowed to reach the nodes' admin port (metrics).
    pub metrics_from: Vec<NetworkPolicyPeer>,
}

impl NatsSettings {
    /// Whether NATS is authenticated: the operator manages the JetStream objects and mints
    /// the nodes' credentials.
    pub fn authenticated(&self) -> bool {
        self.account_secret.is_some() || self.account_dir.is_some()
    }

    /// Whether the NATS connections use TLS (a CA is configured or the operator's is used).
    pub fn tls(&self) -> bool {
        self.ca_pem.is_some() || self.bootstrap.is_some()
    }
}

/// How to reach NATS now (see [`Context::nats_access`]).
pub async fn access(ctx: &Context) -> Result<NatsAccess, Error> {
    let settings = &ctx.config.nats;
    let account = match (&settings.account_secret, &settings.account_dir) {
        (Some(name), _) => Some(account_keys(ctx, name).await?),
        (None, Some(dir)) => Some(account_keys_from_dir(dir)?),
        (None, None) => None,
    };
    Ok(NatsAccess {
        url: settings.url.clone(),
        ca_pem: ca_pem(ctx).await?,
        account,
        timeout: ctx.config.nats_timeout,
    })
}

/// The CA the nodes and the operator verify NATS with, if any.
pub async fn ca_pem(ctx: &Context) -> Result<Option<String>, Error> {
    let settings = &ctx.config.nats;
    Ok(match (&settings.ca_pem, &settings.bootstrap) {
        (Some(pem), _) => Some(pem.clone()),
        (None, Some(_)) => Some(
            crate::controller::mail_domain::provision::ensure_ca(ctx, crate::timestamps::now())
                .await?
                .cert_pem,
        ),
        (None, None) => None,
    })
}

/// The account keys from files in `dir`.
fn account_keys_from_dir(dir: &std::path::Path) -> Result<AccountKeys, Error> {
    let data: BTreeMap<String, Vec<u8>> =
        [super::trust::ACCOUNT_KEY, super::trust::SIGNING_KEY_KEY]
            .into_iter()
            .filter_map(|k| std::fs::read(dir.join(k)).ok().map(|v| (k.to_owned(), v)))
            .collect();
    AccountKeys::from_secret_data(&data).map_err(|source| Error::NatsAccount {
        name: dir.display().to_string(),
        source,
    })
}

/// The account keys from their Secret in the operator's namespace.
async fn account_keys(ctx: &Context, name: &str) -> Result<AccountKeys, Error> {
    let ns = &ctx.config.operator_namespace;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let secret = api
        .get_opt(name)
        .await
        .map_err(|source| Error::ReadObject {
            kind: "Secret",
            name: format!("{ns}/{name}"),
            source,
        })?;
    let data: BTreeMap<String, Vec<u8>> = secret
        .and_then(|s| s.data)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    AccountKeys::from_secret_data(&data).map_err(|source| Error::NatsAccount {
        name: format!("{ns}/{name}"),
        source,
    })
}

/// For the bundled NATS: makes the trust chain (once; an existing Secret is kept as it is)
/// and issues or renews the server certificate from the operator's CA. Returns when the
/// certificate is due for renewal. Idempotent; run by the leader only.
pub async fn bootstrap(ctx: &Context, now: UnixSeconds) -> Result<Option<UnixSeconds>, Error> {
    let settings = &ctx.config.nats;
    let Some(bootstrap) = &settings.bootstrap else {
        return Ok(None);
    };
    let ns = &ctx.config.operator_namespace;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let read = |name: String| {
        let api = api.clone();
        async move {
            api.get_opt(&name)
                .await
                .map_err(|source| Error::ReadObject {
                    kind: "Secret",
                    name: format!("{}/{name}", api.namespace().unwrap_or_default()),
                    source,
                })
        }
    };
    if let Some(account_secret) = &settings.account_secret
        && read(account_secret.clone()).await?.is_none()
    {
        let trust = Trust::generate();
        let data = trust
            .secret_data(now)
            .map_err(|source| Error::NatsAccount {
                name: format!("{ns}/{account_secret}"),
                source,
            })?;
        create(&api, ns, account_secret, None, data).await?;
        tracing::info!(secret = %format!("{ns}/{account_secret}"), "created the NATS trust chain (operator, system account, kubemail account)");
    }

    if bootstrap.server_names.is_empty() {
        // The certificate comes from elsewhere (cert-manager).
        return Ok(None);
    }
    let ca = crate::controller::mail_domain::provision::ensure_ca(ctx, now).await?;
    let existing = read(bootstrap.tls_secret.clone()).await?;
    let stored = existing
        .as_ref()
        .and_then(|s| crate::controller::mail_domain::provision::secret_text(s, TLS_CERT_KEY));
    let leaf = stored
        .as_deref()
        .and_then(|pem| certs::inspect_leaf(pem, &ca.cert_pem));
    let current = leaf.as_ref().filter(|l| {
        l.signed_by_ca
            && l.dns_names
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                == bootstrap
                    .server_names
                    .iter()
                    .filter(|n| n.parse::<std::net::IpAddr>().is_err())
                    .collect()
            && now < certs::renew_after(l.not_before, l.not_after)
    });
    if let Some(leaf) = current {
        return Ok(Some(certs::renew_after(leaf.not_before, leaf.not_after)));
    }
    let issued = certs::issue_server_certificate(
        &ca,
        &bootstrap.server_names,
        now,
        bootstrap.certificate_validity,
        true,
    )
    .map_err(Error::IssueCertificate)?;
    let data = BTreeMap::from([
        (TLS_CERT_KEY.to_owned(), issued.cert_pem.clone()),
        (TLS_KEY_KEY.to_owned(), issued.key_pem.expose().to_owned()),
        (CA_CERT_KEY.to_owned(), ca.cert_pem.clone()),
    ]);
    let secret = secret(ns, &bootstrap.tls_secret, Some("kubernetes.io/tls"), data);
    api.patch(
        &bootstrap.tls_secret,
        &kube::api::PatchParams::apply(crate::controller::FIELD_MANAGER).force(),
        &kube::api::Patch::Apply(&secret),
    )
    .await
    .map_err(|source| Error::ApplyChild {
        kind: "Secret".to_owned(),
        name: format!("{ns}/{}", bootstrap.tls_secret),
        source,
    })?;
    tracing::info!(secret = %format!("{ns}/{}", bootstrap.tls_secret), "issued the NATS server certificate; NATS reads it at start (restart the NATS pods one by one after a renewal)");
    Ok(Some(certs::renew_after(
        issued.not_before,
        issued.not_after,
    )))
}

fn secret(ns: &str, name: &str, type_: Option<&str>, data: BTreeMap<String, String>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ns.to_owned()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                MANAGED_BY.to_owned(),
            )])),
            ..Default::default()
        },
        type_: type_.map(str::to_owned),
        data: Some(
            data.into_iter()
                .map(|(k, v)| (k, ByteString(v.into_bytes())))
                .collect(),
        ),
        ..Default::default()
    }
}

/// Creates a Secret; another replica having made it first is fine (theirs is kept).
async fn create(
    api: &Api<Secret>,
    ns: &str,
    name: &str,
    type_: Option<&str>,
    data: BTreeMap<String, String>,
) -> Result<(), Error> {
    match api
        .create(&PostParams::default(), &secret(ns, name, type_, data))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(source) => Err(Error::ApplyChild {
            kind: "Secret".to_owned(),
            name: format!("{ns}/{name}"),
            source,
        }),
    }
}

/// Runs [`bootstrap`] until `stop`: again when the certificate is due, after an error in 10 s.
pub async fn run_bootstrap(
    ctx: std::sync::Arc<Context>,
    stop: tokio_util::sync::CancellationToken,
) {
    if ctx.config.nats.bootstrap.is_none() {
        return;
    }
    // A lasting failure (a missing namespace, RBAC) is logged once, not every retry.
    let mut last_failure = String::new();
    loop {
        let now = crate::timestamps::now();
        let wait = match bootstrap(&ctx, now).await {
            Ok(next) => {
                last_failure.clear();
                next.map_or(Duration::from_secs(3600), |t| {
                    Duration::from_secs(u64::try_from((t - now).clamp(60, 3600)).unwrap_or(3600))
                })
            }
            Err(error) => {
                let message = ctx.explain(&error);
                if message == last_failure {
                    tracing::debug!(error = %message, "NATS bootstrap failed; retrying");
                } else {
                    tracing::warn!(error = %message, "NATS bootstrap failed; retrying every 10s");
                    last_failure = message;
                }
                Duration::from_secs(10)
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
