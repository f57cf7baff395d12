//! The NATS step of a dedicated MailDomain's or a MailPool's reconcile, after `build` and
//! before `apply`: with authenticated NATS, create or update the JetStream objects the nodes
//! use and mint or renew their credentials (one for every domain the nodes serve); write the
//! credentials and the CA into the nodes' NATS Secret (owned by the MailDomain or MailPool, so
//! deleting it deletes them); and apply the nodes' NetworkPolicy. The rest of the pipeline
//! only mounts the Secret and renders the paths. A pooled MailDomain has no step of its own:
//! its pool's covers it.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, ResourceExt};
use kubemail_config::NodeConfig;
use kubemail_queue::{QueueNames, node_permissions_with_inbox};

use super::credentials::{self, CA_KEY, CREDENTIALS_KEY};
use crate::controller::mail_domain::build::owner_reference;
use crate::controller::mail_domain::names::{self, NODE_CONFIG_KEY};
use crate::controller::{Context, Error, FIELD_MANAGER};
use crate::crd::mail_domain::MailDomain;
use crate::timestamps::UnixSeconds;

/// The SMTP nodes the step is for: a dedicated MailDomain's or a MailPool's.
pub struct Nodes<'a> {
    pub namespace: String,
    /// Labels of the Secret and the NetworkPolicy.
    pub labels: BTreeMap<String, String>,
    pub owner: OwnerReference,
    /// The Secret the pods mount at the NATS directory.
    pub secret: String,
    pub network_policy: String,
    /// Labels that select the pods.
    pub selector: BTreeMap<String, String>,
    /// The NATS user name in the credentials (for the server's logs).
    pub user: String,
    /// What the nodes run: their domains, queue names and reply inbox.
    pub node: &'a NodeConfig,
}

/// Runs the step for `md`, whose nodes run the configuration in `node_config` (the built
/// ConfigMap). Returns when the credentials are due for renewal.
pub async fn reconcile(
    ctx: &Context,
    md: &MailDomain,
    node_config: &ConfigMap,
    now: UnixSeconds,
) -> Result<Option<UnixSeconds>, Error> {
    let settings = &ctx.config.nats;
    if !settings.authenticated() && !settings.tls() && settings.network_policy.is_none() {
        return Ok(None);
    }
    let ns = md.namespace().ok_or(Error::MissingNamespace)?;
    let name = md.name_any();
    let node: NodeConfig = node_config
        .data
        .as_ref()
        .and_then(|d| d.get(NODE_CONFIG_KEY))
        .and_then(|yaml| serde_yaml::from_str(yaml).ok())
        .ok_or_else(|| {
            Error::Build(
                crate::controller::mail_domain::build::BuildError::NodeConfig(
                    "the rendered node configuration does not read back".to_owned(),
                ),
            )
        })?;
    let owner = owner_reference(md).ok_or(Error::Build(
        crate::controller::mail_domain::build::BuildError::MissingUid,
    ))?;
    let domains: Vec<&str> = node.domains.iter().map(|d| d.name.as_str()).collect();
    let nodes = Nodes {
        namespace: ns,
        labels: names::labels(&name),
        owner,
        secret: names::nats_secret(&name),
        network_policy: names::network_policy(&name),
        selector: names::selector_labels(&name),
        user: format!("kubemail-nodes:{}", domains.join(",")),
        node: &node,
    };
    reconcile_nodes(ctx, &nodes, now).await
}

/// Runs the step for `nodes`: their JetStream objects, one credential covering every domain
/// they serve (re-minted when that list changes, so a pool's mounted Secret changes content
/// and never name), and their NetworkPolicy. Returns when the credentials are due for
/// renewal.
pub async fn reconcile_nodes(
    ctx: &Context,
    nodes: &Nodes<'_>,
    now: UnixSeconds,
) -> Result<Option<UnixSeconds>, Error> {
    let settings = &ctx.config.nats;
    if !settings.authenticated() && !settings.tls() && settings.network_policy.is_none() {
        return Ok(None);
    }
    let ns = &nodes.namespace;
    let node = nodes.node;
    let domains: Vec<String> = node.domains.iter().map(|d| d.name.clone()).collect();
    let meta = |object: String| ObjectMeta {
        name: Some(object),
        namespace: Some(ns.clone()),
        labels: Some(nodes.labels.clone()),
        owner_references: Some(vec![nodes.owner.clone()]),
        ..Default::default()
    };

    let mut due = None;
    if settings.authenticated() || settings.tls() {
        let access = ctx.nats_access().await?;
        let mut data = BTreeMap::new();
        if let Some(ca) = &access.ca_pem {
            data.insert(CA_KEY.to_owned(), ca.clone());
        }
        if let Some(account) = &access.account {
            access
                .ensure(&node.nats, &node.auth, &node.delivery.consumer, &domains)
                .await
                .map_err(Error::ManageNats)?;
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
            let secret_name = &nodes.secret;
            let stored = secrets
                .get_opt(secret_name)
                .await
                .map_err(|source| Error::ReadObject {
                    kind: "Secret",
                    name: format!("{ns}/{secret_name}"),
                    source,
                })?
                .as_ref()
                .and_then(|s| {
                    crate::controller::mail_domain::provision::secret_text(s, CREDENTIALS_KEY)
                });
            // The inbox the nodes subscribe to is the one in their config.
            let inbox = node
                .nats
                .inbox_prefix
                .clone()
                .unwrap_or_else(|| kubemail_queue::inbox_prefix(&domains));
            let permissions =
                node_permissions_with_inbox(&QueueNames::from(&node.nats), &domains, &inbox);
            let creds = match credentials::renewal(stored.as_deref(), account, &permissions, now) {
                Ok(renew_at) => {
                    due = Some(renew_at);
                    stored.unwrap_or_default()
                }
                Err(reason) => {
                    let validity = i64::try_from(settings.credentials_validity.as_secs())
                        .unwrap_or(i64::MAX / 4);
                    let minted =
                        credentials::mint_user(account, &nodes.user, &permissions, now, validity)
                            .map_err(Error::MintCredentials)?;
                    tracing::info!(user = %minted.user, domains = domains.len(), expires = minted.expires, reason = reason.describe(), "minted NATS credentials for the nodes");
                    due = Some(credentials::renew_after(minted.not_before, minted.expires));
                    minted.creds
                }
            };
            data.insert(CREDENTIALS_KEY.to_owned(), creds);
        }
        let secret = Secret {
            metadata: meta(nodes.secret.clone()),
            data: Some(
                data.into_iter()
                    .map(|(k, v)| (k, ByteString(v.into_bytes())))
                    .collect(),
            ),
            ..Default::default()
        };
        apply(&Api::<Secret>::namespaced(ctx.client.clone(), ns), &secret).await?;
    }

    if let Some(policy_settings) = &settings.network_policy {
        let extra: Vec<u16> = ctx
            .config
            .build
            .otlp_endpoint
            .as_deref()
            .and_then(|u| u.rsplit_once(':'))
            .and_then(|(_, p)| p.trim_end_matches('/').parse().ok())
            .into_iter()
            .collect();
        let policy = super::network_policy::node_policy(
            meta(nodes.network_policy.clone()),
            nodes.selector.clone(),
            node,
            policy_settings,
            &extra,
        );
        apply(
            &Api::<NetworkPolicy>::namespaced(ctx.client.clone(), ns),
            &policy,
        )
        .await?;
    }
    Ok(due)
}

async fn apply<K>(api: &Api<K>, obj: &K) -> Result<(), Error>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + serde::Serialize
        + serde::de::DeserializeOwned
        + Clone
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map(drop)
    .map_err(|source| Error::ApplyChild {
        kind: K::kind(&K::DynamicType::default()).into_owned(),
        name,
        source,
    })
}
