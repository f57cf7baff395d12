//! Apply: server-side applies every built child under the one field manager
//! (`kubemail-operator`), Secrets and ConfigMaps before the Deployment that mounts them, and
//! deletes the children the spec no longer asks for (the users Secret when submission is
//! turned off, the cert-manager Certificate when the domain goes back to the operator CA).
//! An apply that changes nothing is a no-op on the server: the resourceVersion stays.

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::build::Children;
use super::dereference::Dereferenced;
use super::names::{self, certificate_resource, dns_endpoint_resource};
use crate::controller::mail_pool::contract as pool_contract;
use crate::controller::{Context, Error, FIELD_MANAGER};
use crate::crd::mail_domain::MailDomain;

/// What the API server returned for the children whose status matters.
#[derive(Debug, Clone)]
pub struct Applied {
    pub deployment: Deployment,
    pub service: Service,
}

/// Applies the children and prunes the ones no longer wanted.
pub async fn apply(
    ctx: &Context,
    md: &MailDomain,
    children: &Children,
    refs: &Dereferenced,
) -> Result<Applied, Error> {
    let ns = md.namespace().ok_or(Error::MissingNamespace)?;
    let client = &ctx.client;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    ssa(&config_maps, &children.node_config).await?;
    apply_material(ctx, md, children, refs).await?;
    // Back from a pool (its status still says how the pool took it): the hand-over goes.
    let was_pooled = md.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == super::status::ACCEPTED)
    });
    if was_pooled {
        delete(&config_maps, &pool_contract::pool_domain(&md.name_any())).await?;
    }
    let service = ssa(
        &Api::<Service>::namespaced(client.clone(), &ns),
        &children.service,
    )
    .await?;
    ssa(
        &Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns),
        &children.pdb,
    )
    .await?;
    let deployment = ssa(
        &Api::<Deployment>::namespaced(client.clone(), &ns),
        &children.deployment,
    )
    .await?;
    Ok(Applied {
        deployment,
        service,
    })
}

/// A pooled MailDomain's children: its key material, DNS and the hand-over to its pool (the
/// pool's nodes serve it). Children of a dedicated past (Deployment, Service, PDB, node
/// config, NATS Secret, NetworkPolicy) are deleted.
pub async fn apply_pooled(
    ctx: &Context,
    md: &MailDomain,
    children: &Children,
    refs: &Dereferenced,
) -> Result<(), Error> {
    let ns = md.namespace().ok_or(Error::MissingNamespace)?;
    let client = &ctx.client;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    apply_material(ctx, md, children, refs).await?;
    match &children.pool_domain {
        Some(handover) => {
            ssa(&config_maps, handover).await?;
        }
        None => delete(&config_maps, &pool_contract::pool_domain(&md.name_any())).await?,
    }
    if let Some(service) = &refs.service
        && owned_by(service.owner_references(), md)
    {
        let name = md.name_any();
        delete(
            &Api::<Deployment>::namespaced(client.clone(), &ns),
            &names::deployment(&name),
        )
        .await?;
        delete(
            &Api::<Service>::namespaced(client.clone(), &ns),
            &names::service(&name),
        )
        .await?;
        delete(
            &Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns),
            &names::pdb(&name),
        )
        .await?;
        delete(&config_maps, &names::node_config(&name)).await?;
        delete(
            &Api::<Secret>::namespaced(client.clone(), &ns),
            &names::nats_secret(&name),
        )
        .await?;
        delete(
            &Api::<NetworkPolicy>::namespaced(client.clone(), &ns),
            &names::network_policy(&name),
        )
        .await?;
    }
    Ok(())
}

/// Takes a pooled MailDomain off its pool (the pool stops serving it at its next pass).
pub async fn detach(ctx: &Context, md: &MailDomain) -> Result<(), Error> {
    let ns = md.namespace().ok_or(Error::MissingNamespace)?;
    delete(
        &Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns),
        &pool_contract::pool_domain(&md.name_any()),
    )
    .await
}

/// The Secrets (or cert-manager Certificate) and the DNS children both kinds share.
async fn apply_material(
    ctx: &Context,
    md: &MailDomain,
    children: &Children,
    refs: &Dereferenced,
) -> Result<(), Error> {
    let ns = md.namespace().ok_or(Error::MissingNamespace)?;
    let client = &ctx.client;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    ssa(&secrets, &children.dkim_secret).await?;
    if let Some(tls) = &children.tls_secret {
        ssa(&secrets, tls).await?;
    }
    let certificates = certificate_resource();
    match &children.certificate {
        Some(cert) => {
            ssa_dynamic(ctx, &ns, &certificates, cert).await?;
        }
        None => {
            if let Some(existing) = &refs.certificate
                && owned_by(existing.owner_references(), md)
            {
                delete_dynamic(ctx, &ns, &certificates, &names::certificate(&md.name_any()))
                    .await?;
            }
        }
    }
    match &children.users_secret {
        Some(users) => {
            ssa(&secrets, users).await?;
        }
        None => {
            if let Some(existing) = &refs.users_rendered
                && owned_by(existing.owner_references(), md)
            {
                delete(&secrets, &existing.name_any()).await?;
                ctx.users_cache.forget(&format!("{ns}/{}", md.name_any()));
            }
        }
    }
    ssa(&config_maps, &children.dns_config).await?;
    if let Some(endpoint) = &children.dns_endpoint {
        ssa_dynamic(ctx, &ns, &dns_endpoint_resource(), endpoint).await?;
    }
    Ok(())
}

/// Whether `refs` holds a controller reference to `md`.
pub fn owned_by(
    refs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference],
    md: &MailDomain,
) -> bool {
    let uid = md.metadata.uid.as_deref();
    refs.iter()
        .any(|r| Some(r.uid.as_str()) == uid && r.controller == Some(true))
}

async fn ssa<K>(api: &Api<K>, obj: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope> + Serialize + DeserializeOwned + Clone + Debug,
    K::DynamicType: Default,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|source| Error::ApplyChild {
        kind: K::kind(&K::DynamicType::default()).into_owned(),
        name,
        source,
    })
}

async fn ssa_dynamic(
    ctx: &Context,
    ns: &str,
    resource: &ApiResource,
    obj: &DynamicObject,
) -> Result<DynamicObject, Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, resource);
    let name = obj.name_any();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|source| Error::ApplyChild {
        kind: resource.kind.clone(),
        name,
        source,
    })
}

async fn delete<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource + DeserializeOwned + Clone + Debug,
    K::DynamicType: Default,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(Error::DeleteChild {
            kind: K::kind(&K::DynamicType::default()).into_owned(),
            name: name.to_owned(),
            source,
        }),
    }
}

async fn delete_dynamic(
    ctx: &Context,
    ns: &str,
    resource: &ApiResource,
    name: &str,
) -> Result<(), Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, resource);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(Error::DeleteChild {
            kind: resource.kind.clone(),
            name: name.to_owned(),
            source,
        }),
    }
}
