//! Dereference: reads everything a MailDomain refers to or already owns (its Relay, the users
//! Secret, the existing DKIM/TLS/users Secrets, the Service with its load-balancer addresses,
//! a cert-manager Certificate) and which optional CRDs the cluster has. Reads only.

use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::DynamicObject;
use kube::{Api, ResourceExt};

use super::names::{self, certificate_resource};
use crate::controller::{Context, Error};
use crate::crd::mail_domain::MailDomain;
use crate::crd::relay::Relay;

/// CRD of cert-manager's `Certificate`.
pub const CERT_MANAGER_CRD: &str = "certificates.cert-manager.io";
/// CRD of external-dns's `DNSEndpoint`.
pub const EXTERNAL_DNS_CRD: &str = "dnsendpoints.externaldns.k8s.io";

/// What a MailDomain refers to and already has.
#[derive(Debug, Clone, Default)]
pub struct Dereferenced {
    pub relay: Option<Relay>,
    pub users_source: Option<Secret>,
    pub users_rendered: Option<Secret>,
    pub dkim_secret: Option<Secret>,
    pub tls_secret: Option<Secret>,
    pub service: Option<Service>,
    pub certificate: Option<DynamicObject>,
    pub cert_manager_installed: bool,
    pub external_dns_installed: bool,
}

/// Reads the referenced and owned objects.
pub async fn dereference(ctx: &Context, md: &MailDomain) -> Result<Dereferenced, Error> {
    let ns = md.namespace().ok_or(Error::MissingNamespace)?;
    let name = md.name_any();
    let client = ctx.client.clone();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let get_secret = |n: String| {
        let secrets = secrets.clone();
        async move {
            secrets
                .get_opt(&n)
                .await
                .map_err(|source| Error::ReadObject {
                    kind: "Secret",
                    name: n,
                    source,
                })
        }
    };

    let relay = match &md.spec.relay_ref {
        Some(r) => Api::<Relay>::namespaced(client.clone(), &ns)
            .get_opt(&r.name)
            .await
            .map_err(|source| Error::ReadObject {
                kind: "Relay",
                name: r.name.clone(),
                source,
            })?,
        None => None,
    };
    let users_source = match &md.spec.submission {
        Some(s) => get_secret(s.users_secret_ref.name.clone()).await?,
        None => None,
    };
    let users_rendered = get_secret(names::users_secret(&name)).await?;
    let dkim_secret = get_secret(names::dkim_secret(&name)).await?;
    let tls_secret = get_secret(names::tls_secret(&name)).await?;
    let service = Api::<Service>::namespaced(client.clone(), &ns)
        .get_opt(&names::service(&name))
        .await
        .map_err(|source| Error::ReadObject {
            kind: "Service",
            name: names::service(&name),
            source,
        })?;
    let cert_manager_installed = ctx.crd_installed(CERT_MANAGER_CRD).await?;
    let external_dns_installed = ctx.crd_installed(EXTERNAL_DNS_CRD).await?;
    let certificate = if cert_manager_installed {
        Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &certificate_resource())
            .get_opt(&names::certificate(&name))
            .await
            .map_err(|source| Error::ReadObject {
                kind: "Certificate",
                name: names::certificate(&name),
                source,
            })?
    } else {
        None
    };
    Ok(Dereferenced {
        relay,
        users_source,
        users_rendered,
        dkim_secret,
        tls_secret,
        service,
        certificate,
        cert_manager_installed,
        external_dns_installed,
    })
}
