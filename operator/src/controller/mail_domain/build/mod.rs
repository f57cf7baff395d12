//! Build: the desired children of a MailDomain, computed from the validated spec, the
//! provisioned key material and a few observed facts (load-balancer addresses, installed CRDs).
//! Pure: no client, no clock (the time comes in as `now`), no randomness, so the same inputs
//! give byte-identical objects and a second reconcile writes nothing.
//!
//! ```text
//! MailDomain example-com ─┬─ ConfigMap  example-com-config   node.yaml (NodeConfig, every field)
//!                         ├─ Secret     example-com-dkim     <selector>.pem, schedule annotation
//!                         ├─ Secret     example-com-tls      tls.crt/tls.key/ca.crt (operator CA)
//!                         │  or Certificate example-com      cert-manager, writes example-com-tls
//!                         ├─ Secret     example-com-users-hashed  users file (argon2), if submission
//!                         ├─ Deployment example-com          smtp-node pods
//!                         ├─ Service    example-com          25/465/587
//!                         ├─ PDB        example-com          maxUnavailable 1
//!                         ├─ ConfigMap  example-com-dns      zone fragment (+ mta-sts.txt)
//!                         └─ DNSEndpoint example-com         external-dns, if its CRD exists
//! ```
//!
//! One file per kind of child: [`config`] (the node configuration), `secrets.rs`,
//! `deployment.rs` (and the PDB), `service.rs`, `dns.rs`. Their names, labels and mount paths
//! are in [`names`], which every step of the pipeline shares.

pub mod config;
mod deployment;
mod dns;
#[cfg(test)]
mod pod_tests;
mod pooled;
mod secrets;
mod service;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use kube::api::{DynamicObject, ObjectMeta};
use kubemail_config::NodeConfigOverlay;
use sha2::{Digest, Sha256};

pub use self::config::{OverlayError, base_node_config, load_node_overlay, node_config};
pub use self::deployment::{NodePods, SecretMount, node_deployment, node_pdb};
pub use self::service::node_service;
use crate::controller::mail_domain::names::{self, NODE_CONFIG_KEY, labels};
use crate::controller::mail_domain::provision::Provisioned;
use crate::controller::mail_domain::validate::ValidatedDomain;
use crate::controller::mail_pool::contract as pool_contract;
use crate::crd::mail_domain::{DnsRecord, MailDomain};
use crate::dkim;
use crate::timestamps::UnixSeconds;

/// Operator-wide settings that shape the children.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildConfig {
    /// SMTP node image.
    pub node_image: String,
    /// Address the node binds (`0.0.0.0` in a pod with its own network namespace).
    pub listen_host: String,
    /// Start nodes with `--listen-ip $(POD_IP)`: for clusters whose pods share one network
    /// namespace (the local process-kubelet cluster), so replicas do not fight over ports.
    pub bind_pod_ip: bool,
    /// Site-wide settings merged into every node config (see [`load_node_overlay`]).
    pub node_overlay: Option<NodeConfigOverlay>,
    /// Site-wide defaults of `spec.pod` (`--node-pod-defaults`): each field applies where
    /// the MailDomain or MailPool leaves it unset.
    pub pod_defaults: crate::crd::PodShape,
    /// OTLP endpoint passed to the nodes as `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub otlp_endpoint: Option<String>,
    /// NATS URL(s) the nodes use.
    pub nats_url: String,
    /// JetStream stream of the queue.
    pub nats_stream: String,
    /// Queue subjects are `<prefix>.<domain>`.
    pub nats_subject_prefix: String,
    /// Replicas of the queue's JetStream objects.
    pub nats_replicas: u32,
    /// NATS is authenticated: nodes get credentials from the domain's NATS Secret and leave
    /// the JetStream objects to the operator.
    pub nats_auth: bool,
    /// NATS connections use TLS: nodes verify the server with `ca.crt` of that Secret.
    pub nats_tls: bool,
    /// A NetworkPolicy for the domain's pods.
    pub network_policy: Option<crate::nats::NetworkPolicySettings>,
}

/// Observed facts the children depend on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Load-balancer addresses of the Service.
    pub addresses: Vec<IpAddr>,
    /// external-dns's DNSEndpoint CRD is installed.
    pub external_dns: bool,
}

/// Every desired child plus the records they carry.
#[derive(Debug, Clone)]
pub struct Children {
    pub node_config: ConfigMap,
    pub dkim_secret: Secret,
    /// Operator-CA certificate; `None` with cert-manager.
    pub tls_secret: Option<Secret>,
    /// cert-manager Certificate; `None` with the operator CA.
    pub certificate: Option<DynamicObject>,
    pub users_secret: Option<Secret>,
    pub deployment: Deployment,
    pub service: Service,
    pub pdb: PodDisruptionBudget,
    pub dns_config: ConfigMap,
    pub dns_endpoint: Option<DynamicObject>,
    pub dns_records: Vec<DnsRecord>,
    /// With `spec.poolRef`: the hand-over to the pool (`None` while the relay is unusable);
    /// the node ConfigMap, Deployment, Service and PDB above are then not applied.
    pub pool_domain: Option<ConfigMap>,
    /// Selectors the nodes sign with now.
    pub signing_selectors: Vec<String>,
    pub checksum: String,
}

/// Why the children cannot be built (a spec the node or Kubernetes would refuse).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("the node configuration would be invalid: {0}")]
    NodeConfig(String),
    #[error("the MailDomain has no uid yet")]
    MissingUid,
    #[error("{0}")]
    PodResources(String),
    #[error("{0}")]
    Service(String),
}

impl BuildError {
    /// The CamelCase reason of the `Ready=False` condition that reports it.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NodeConfig(_) | Self::MissingUid => "InvalidSpec",
            Self::PodResources(_) => "InvalidPodResources",
            Self::Service(_) => "InvalidLoadBalancerSourceRanges",
        }
    }
}

/// Load-balancer IP addresses of a Service, sorted. Host-name ingress points (some clouds)
/// cannot be an MX target's A record and are left out.
pub fn load_balancer_addresses(service: Option<&Service>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = service
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Builds every child.
pub fn build(
    md: &MailDomain,
    v: &ValidatedDomain,
    p: &Provisioned,
    observed: &Observed,
    config: &BuildConfig,
    now: UnixSeconds,
) -> Result<Children, BuildError> {
    let owner = owner_reference(md).ok_or(BuildError::MissingUid)?;
    let meta = |name: String| ObjectMeta {
        name: Some(name),
        namespace: Some(v.namespace.clone()),
        labels: Some(labels(&v.name)),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    };

    let state = dkim::state_json(&p.dkim.keys);
    let records: Vec<dkim::KeyRecord> = p.dkim.keys.iter().map(|k| k.record.clone()).collect();
    let signing: Vec<String> = dkim::signing_keys(&records, &v.dkim.algorithms, now)
        .into_iter()
        .map(|k| k.selector.clone())
        .collect();
    let node = config::node_config(v, p.users_file.is_some(), &signing, config)?;
    let node_yaml = config::node_yaml(v, &node)?;
    let checksum = checksum(&[
        node_yaml.as_str(),
        p.users_file.as_deref().unwrap_or_default(),
        state.as_str(),
        &signing.join(","),
    ]);

    let node_config = ConfigMap {
        metadata: meta(names::node_config(&v.name)),
        data: Some(BTreeMap::from([(NODE_CONFIG_KEY.to_owned(), node_yaml)])),
        ..Default::default()
    };
    let dkim_secret = secrets::dkim_secret(meta(names::dkim_secret(&v.name)), p, state, &signing);
    let (tls_secret, certificate) = secrets::tls(v, p, meta);
    let users_secret = secrets::users_secret(p, meta(names::users_secret(&v.name)));
    let deployment = deployment::deployment(
        v,
        meta(names::deployment(&v.name)),
        &checksum,
        &node,
        config,
    )?;
    let service = service::service(v, meta(names::service(&v.name)))?;
    let pdb = deployment::pdb(v, meta(names::pdb(&v.name)));
    // A pool's nodes do not serve MTA-STS policies: a pooled domain publishes none, rather
    // than a record whose policy cannot be fetched.
    let dns = dns::dns(v, p, observed, md.spec.pool_ref.is_none(), meta);
    let pool_domain = match &md.spec.pool_ref {
        Some(_) => pooled::pool_domain(v, &node, meta(pool_contract::pool_domain(&v.name)))?,
        None => None,
    };

    Ok(Children {
        node_config,
        dkim_secret,
        tls_secret,
        certificate,
        users_secret,
        deployment,
        service,
        pdb,
        dns_config: dns.config,
        dns_endpoint: dns.endpoint,
        dns_records: dns.records,
        pool_domain,
        signing_selectors: signing,
        checksum,
    })
}

/// The owner reference every child carries: the controller reference, blocking foreground
/// deletion of the MailDomain until the child is gone (needs `update` on
/// `maildomains/finalizers` in RBAC).
pub fn owner_reference(md: &MailDomain) -> Option<OwnerReference> {
    let mut owner = md.controller_owner_ref(&())?;
    owner.block_owner_deletion = Some(true);
    Some(owner)
}

/// Hex SHA-256 over `parts`, each ended by a NUL so that moving text between parts changes it.
fn checksum(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.finalize().iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
