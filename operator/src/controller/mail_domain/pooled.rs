//! The MailPool side of a pooled MailDomain (one with `spec.poolRef`): reads the pool, decides
//! with the pool's attach rules whether the domain may attach, and says how the pool stands
//! with it (attached, ready nodes, its Service for the DNS records). Reads only.

use k8s_openapi::api::core::v1::Service;
use kube::{Api, ResourceExt};

use super::status::PoolView;
use crate::controller::mail_pool::{attach, build as pool_build, contract, namespace_labels};
use crate::controller::{Context, Error};
use crate::crd::mail_domain::{MailDomain, PoolRef};
use crate::crd::mail_pool::{FromNamespaces, MailPool};

/// A pool that accepts the domain, with its Service.
#[derive(Debug, Clone)]
pub struct Pool {
    pub pool: MailPool,
    pub service: Option<Service>,
}

/// The outcome of [`resolve`].
#[derive(Debug, Clone)]
pub enum Resolved {
    Accepted(Box<Pool>),
    Refused(attach::Decision),
}

impl Pool {
    /// How the pool stands with `md`.
    pub fn view(&self, md: &MailDomain) -> PoolView {
        let status = self.pool.status.clone().unwrap_or_default();
        let (ns, name) = (md.namespace().unwrap_or_default(), md.name_any());
        PoolView {
            pool: format!(
                "{}/{}",
                self.pool.namespace().unwrap_or_default(),
                self.pool.name_any()
            ),
            attached: status
                .domains
                .iter()
                .any(|d| d.namespace == ns && d.name == name && d.domain == md.spec.domain),
            ready_replicas: status.ready_replicas,
            replicas: status.replicas,
            selector: Some(pool_build::selector_string(&self.pool.name_any())),
        }
    }
}

/// Reads the pool `pool_ref` names and applies its attach rules to `md`.
pub async fn resolve(
    ctx: &Context,
    md: &MailDomain,
    pool_ref: &PoolRef,
) -> Result<Resolved, Error> {
    let (pool_ns, pool_name) = attach::pool_key(md, pool_ref);
    let md_ns = md.namespace().ok_or(Error::MissingNamespace)?;
    let pool = Api::<MailPool>::namespaced(ctx.client.clone(), &pool_ns)
        .get_opt(&pool_name)
        .await
        .map_err(|source| Error::ReadObject {
            kind: "MailPool",
            name: format!("{pool_ns}/{pool_name}"),
            source,
        })?;
    let labels = match &pool {
        Some(p) if p.spec.allowed_domains.namespaces.from == FromNamespaces::Selector => {
            namespace_labels(ctx, &md_ns).await?
        }
        _ => Default::default(),
    };
    let decision = attach::decide(pool.as_ref(), &pool_ns, &pool_name, &md_ns, &labels);
    let Some(pool) = pool.filter(|_| decision.accepted) else {
        return Ok(Resolved::Refused(decision));
    };
    let service = Api::<Service>::namespaced(ctx.client.clone(), &pool_ns)
        .get_opt(&contract::nodes(&pool_name))
        .await
        .map_err(|source| Error::ReadObject {
            kind: "Service",
            name: contract::nodes(&pool_name),
            source,
        })?;
    Ok(Resolved::Accepted(Box::new(Pool { pool, service })))
}
