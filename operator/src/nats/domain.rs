//! The NATS step of a MailDomain's reconcile, after `build` and before `apply`: with
//! authenticated NATS, create or update the JetStream objects the domain's nodes use and mint
//! or renew their credentials; write the credentials and the CA into the domain's NATS Secret
//! (owned by the MailDomain, so deleting the domain deletes them); and apply the domain's
//! NetworkPolicy. The rest of the pipeline only mounts the Secret and renders the paths.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, ResourceExt};
use kubemail_config::NodeConfig;
use kubemail_queue::{QueueNames, node_permissions};

use super::credentials::{self, CA_KEY, CREDENTIALS_KEY};
use crate::controller::mail_domain::build::owner_reference;
use crate::controller::mail_domain::names::{self, NODE_CONFIG_KEY};
use crate::controller::{Context, Error, FIELD_MANAGER};
use crate::crd::mail_domain::MailDomain;
use crate::timestamps::UnixSeconds;

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
    let domains: Vec<String> = node.domains.iter().map(|d| d.name.clone()).collect();
    let owner = owner_reference(md).ok_or(Error::Build(
        crate::controller::mail_domain::build::BuildError::MissingUid,
    ))?;
    let meta = |object: String| ObjectMeta {
        name: Some(object),
        namespace: Some(ns.clone()),
        labels: Some(names::labels(&name)),
        owner_references: Some(vec![owner.clone()]),
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
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            let secret_name = names::nats_secret(&name);
            let stored = secrets
                .get_opt(&secret_name)
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
            let permissions = node_permissions(&QueueNames::from(&node.nats), &domains);
            let creds = match credentials::renewal(stored.as_deref(), account, &permissions, now) {
                Ok(renew_at) => {
                    due = Some(renew_at);
                    stored.unwrap_or_default()
                }
                Err(reason) => {
                    let validity = i64::try_from(settings.credentials_validity.as_secs())
                        .unwrap_or(i64::MAX / 4);
                    let minted = credentials::node_credentials(
                        account,
                        &QueueNames::from(&node.nats),
                        &domains,
                        now,
                        validity,
                    )
                    .map_err(Error::MintCredentials)?;
                    tracing::info!(user = %minted.user, expires = minted.expires, reason = reason.describe(), "minted NATS credentials for the domain's nodes");
                    due = Some(credentials::renew_after(minted.not_before, minted.expires));
                    minted.creds
                }
            };
            data.insert(CREDENTIALS_KEY.to_owned(), creds);
        }
        let secret = Secret {
            metadata: meta(names::nats_secret(&name)),
            data: Some(
                data.into_iter()
                    .map(|(k, v)| (k, ByteString(v.into_bytes())))
                    .collect(),
            ),
            ..Default::default()
        };
        apply(&Api::<Secret>::namespaced(ctx.client.clone(), &ns), &secret).await?;
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
            meta(names::network_policy(&name)),
            names::selector_labels(&name),
            &node,
            policy_settings,
            &extra,
        );
        apply(
            &Api::<NetworkPolicy>::namespaced(ctx.client.clone(), &ns),
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
