//! Names, labels and shared constants of a MailDomain's children: what more than one step
//! of the pipeline needs to agree on (the paths where the pods mount what the operator
//! renders, the keys inside ConfigMaps and Secrets, the API resources of optional CRDs).
//!
//! A leaf: it uses nothing from its sibling modules, so every step can use it without the
//! steps depending on each other in a circle.

use std::collections::BTreeMap;

use kube::api::ApiResource;

use crate::controller::{MANAGED_BY, MANAGED_BY_LABEL};

/// Pod template annotation whose change rolls the pods: a digest of everything the node reads
/// only at start-up.
pub const CHECKSUM_ANNOTATION: &str = "kubemail.io/config-checksum";
/// DKIM Secret annotation: the selectors the nodes sign with now.
pub const SIGNING_ANNOTATION: &str = "kubemail.io/dkim-signing";
/// Label naming the MailDomain a child belongs to.
pub const DOMAIN_LABEL: &str = "kubemail.io/maildomain";
/// Key of the node configuration in its ConfigMap.
pub const NODE_CONFIG_KEY: &str = "node.yaml";
/// Key of the zone fragment in the DNS ConfigMap.
pub const ZONE_KEY: &str = "zone";
/// Key of the MTA-STS policy file in the DNS ConfigMap.
pub const MTA_STS_KEY: &str = "mta-sts.txt";

/// Container ports: unprivileged, so the pods run as non-root without `NET_BIND_SERVICE`;
/// the Service maps 25/465/587 onto them.
pub const SMTP_PORT: u16 = 2525;
pub const SUBMISSION_PORT: u16 = 2587;
pub const SUBMISSIONS_PORT: u16 = 2465;
/// The node's HTTPS port for its MTA-STS policy (the Service maps 443 onto it).
pub const MTA_STS_PORT: u16 = 8443;
/// The node's admin HTTP port (`/healthz`, `/readyz`, `/metrics`).
pub const ADMIN_PORT: u16 = 8080;
/// Where the pods mount what the operator renders.
pub const CONFIG_DIR: &str = "/etc/kubemail/config";
pub const TLS_DIR: &str = "/etc/kubemail/tls";
pub const DKIM_DIR: &str = "/etc/kubemail/dkim";
pub const USERS_DIR: &str = "/etc/kubemail/users";
pub const RELAY_DIR: &str = "/etc/kubemail/relay";
/// The NATS credentials file and CA of the nodes.
pub const NATS_DIR: &str = "/etc/kubemail/nats";

// The children's names, one place for all of them.

pub fn node_config(md: &str) -> String {
    format!("{md}-config")
}
pub fn dkim_secret(md: &str) -> String {
    format!("{md}-dkim")
}
pub fn tls_secret(md: &str) -> String {
    format!("{md}-tls")
}
pub fn users_secret(md: &str) -> String {
    // Not `<md>-users`: that is the natural name of the user's own source Secret.
    format!("{md}-users-hashed")
}
/// The nodes' NATS credentials and CA.
pub fn nats_secret(md: &str) -> String {
    format!("{md}-nats")
}

/// The NetworkPolicy of the domain's pods.
pub fn network_policy(md: &str) -> String {
    md.to_owned()
}

pub fn dns_config(md: &str) -> String {
    format!("{md}-dns")
}
pub fn deployment(md: &str) -> String {
    md.to_owned()
}
pub fn service(md: &str) -> String {
    md.to_owned()
}
pub fn pdb(md: &str) -> String {
    md.to_owned()
}
pub fn certificate(md: &str) -> String {
    md.to_owned()
}
pub fn dns_endpoint(md: &str) -> String {
    md.to_owned()
}

/// The API resource of cert-manager's `Certificate`.
pub fn certificate_resource() -> ApiResource {
    ApiResource {
        group: "cert-manager.io".to_owned(),
        version: "v1".to_owned(),
        api_version: "cert-manager.io/v1".to_owned(),
        kind: "Certificate".to_owned(),
        plural: "certificates".to_owned(),
    }
}

/// The API resource of external-dns's `DNSEndpoint`.
pub fn dns_endpoint_resource() -> ApiResource {
    ApiResource {
        group: "externaldns.k8s.io".to_owned(),
        version: "v1alpha1".to_owned(),
        api_version: "externaldns.k8s.io/v1alpha1".to_owned(),
        kind: "DNSEndpoint".to_owned(),
        plural: "dnsendpoints".to_owned(),
    }
}

/// Labels every child carries.
pub fn labels(md_name: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(md_name);
    l.insert(
        "app.kubernetes.io/component".to_owned(),
        "smtp-node".to_owned(),
    );
    l.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
    l.insert(DOMAIN_LABEL.to_owned(), md_name.to_owned());
    l
}

/// Labels that select a domain's pods.
pub fn selector_labels(md_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "kubemail-smtp-node".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), md_name.to_owned()),
    ])
}
