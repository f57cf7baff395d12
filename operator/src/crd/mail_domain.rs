//! `MailDomain`: one mail domain served by its own SMTP node Deployment. The spec says what a
//! person wants (domain, host name, replicas, TLS, DKIM, SPF/DMARC/MTA-STS policy, relay,
//! inbound routing, submission users, limits); the status says what the operator made of it
//! (conditions, the DKIM selectors in DNS, the DNS records to publish).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::pod::PodShape;
use super::{DOMAIN_NAME_RULE, LocalObjectReference, conditions_schema};

/// CEL for a list of DMARC/TLS-RPT report URIs: `mailto:` or `https://`, comma separated.
const REPORT_URI_RULE: &str =
    "self.matches('^(mailto:|https://)[^,;\\\\s]+(,\\\\s*(mailto:|https://)[^,;\\\\s]+)*$')";
/// CEL for a duration written with units (`90d`, `48h`, `1h30m`); parsed by the operator.
const DURATION_RULE: &str = "self.matches('^([0-9]+(d|h|m|s))+$')";

/// A mail domain: the operator runs SMTP nodes for it and provisions its TLS certificate,
/// DKIM keys and DNS records.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubemail.io",
    version = "v1alpha1",
    kind = "MailDomain",
    namespaced,
    status = "MailDomainStatus",
    derive = "PartialEq",
    shortname = "mdomain",
    shortname = "maildomain",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    category = "kubemail",
    doc = "A mail domain served by kubemail SMTP nodes.",
    printcolumn(name = "Domain", type_ = "string", json_path = ".spec.domain"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "DNS",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"DnsPublished\")].status"
    ),
    printcolumn(name = "Address", type_ = "string", json_path = ".status.addresses[0]"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Ready Replicas",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        priority = 1
    ),
    printcolumn(
        name = "Hostname",
        type_ = "string",
        json_path = ".spec.hostname",
        priority = 1
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        priority = 1
    ),
    // A string, not a date: kubectl shows a date column as the time since, and a future one
    // as `<invalid>`.
    printcolumn(
        name = "Certificate Expiry",
        type_ = "string",
        json_path = ".status.certificate.notAfter",
        priority = 1
    ),
    validation = Rule::new(
        "size(self.metadata.name) <= 50 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"
    ).message(
        "metadata.name must be a DNS label of at most 50 characters that starts with a letter, e.g. example-com: it also names the domain's Service, Deployment and Secrets"
    ),
    validation = Rule::new(
        "!has(self.spec.mtaSts) || self.spec.mtaSts.mode != 'enforce' || (has(self.spec.tls) && has(self.spec.tls.issuerRef))"
    ).message(
        "spec.mtaSts.mode enforce needs spec.tls.issuerRef: senders cannot verify a certificate of the operator's own CA, so an enforced policy would stop mail to this domain"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MailDomainSpec {
    /// The mail domain (RFC 1035 name, lower case, no trailing dot), e.g. `example.com`.
    /// Immutable: create a new MailDomain to serve another domain.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(
        validation = Rule::new(DOMAIN_NAME_RULE).message(
            "spec.domain must be a lower-case domain name such as example.com: labels of a-z, 0-9 and '-', separated by dots, no trailing dot"
        ),
        validation = Rule::new("self == oldSelf").message(
            "spec.domain is immutable; create a new MailDomain for another domain and delete this one"
        )
    )]
    pub domain: String,

    /// Host name of the SMTP nodes: EHLO name, MX target and certificate name.
    /// Default: `mx.<domain>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(DOMAIN_NAME_RULE).message(
        "spec.hostname must be a lower-case host name such as mx.example.com (no trailing dot)"
    ))]
    pub hostname: Option<String>,

    /// Number of SMTP node pods. Also set through the scale subresource (`kubectl scale
    /// maildomain/<name> --replicas=N`, a HorizontalPodAutoscaler); scale the MailDomain, not
    /// its Deployment, which the operator keeps at this number.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 50))]
    pub replicas: i32,

    /// The Service in front of the nodes.
    #[serde(default)]
    pub service: ServiceSpec,

    /// Scheduling and resources of the SMTP node pods.
    #[serde(default)]
    pub pod: PodShape,

    /// TLS certificate. Absent or without `issuerRef`: issued by the operator's own CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,

    /// DKIM signing keys and their rotation.
    #[serde(default)]
    pub dkim: DkimSpec,

    /// The SPF record of the domain.
    #[serde(default)]
    pub spf: SpfSpec,

    /// The DMARC record of the domain.
    #[serde(default)]
    pub dmarc: DmarcSpec,

    /// MTA-STS (RFC 8461). Absent: no MTA-STS record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mta_sts: Option<MtaStsSpec>,

    /// SMTP TLS reporting (RFC 8460). Absent: no TLS-RPT record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_rpt: Option<TlsRptSpec>,

    /// Outbound mail goes through this Relay (same namespace). Absent: direct MX delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_ref: Option<LocalObjectReference>,

    /// Where mail for the domain's recipients goes.
    #[serde(default)]
    pub inbound: InboundSpec,

    /// Authenticated submission (587 with STARTTLS, 465).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submission: Option<SubmissionSpec>,

    /// Message limits.
    #[serde(default)]
    pub limits: LimitsSpec,

    /// DNS record settings.
    #[serde(default)]
    pub dns: DnsSpec,

    /// Outbound TLS: fixed policies for recipient domains that need them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_tls: Option<OutboundTlsSpec>,

    /// Delivery of this domain's queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliverySpec>,
    /// Serve the domain on this MailPool's shared nodes instead of a Deployment of its own.
    /// The pool decides which namespaces may attach (`Accepted` condition); `replicas`,
    /// `service` and `pod` are then the pool's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_ref: Option<PoolRef>,
}

/// A MailPool, by name and namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolRef {
    /// Name of the MailPool.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Its namespace; absent: the MailDomain's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

/// How the domain's queued mail is delivered.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliverySpec {
    /// The waits between delivery attempts of a deferred message, in order (`[5m, 15m, 1h,
    /// 4h]`), the last one repeating until the queue lifetime ends. Empty: the node default
    /// (the message's age, between 5 minutes and about an hour).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50), inner(length(max = 32)))]
    #[x_kube(validation = Rule::new("self.all(d, d.matches('^([0-9]+(d|h|m|s))+$'))").message(
        "spec.delivery.retryIntervals must be durations such as 5m, 1h or 1h30m"
    ))]
    pub retry_intervals: Vec<String>,
}

/// Outbound TLS settings of the domain's nodes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboundTlsSpec {
    /// Fixed TLS policies for recipient domains, instead of what their DNS says (MTA-STS,
    /// DANE): e.g. a partner that must always get verified TLS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 500))]
    pub policies: Vec<TlsPolicyRule>,
}

/// A fixed TLS policy for one recipient domain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsPolicyRule {
    /// The recipient domain (lower case, no trailing dot).
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(DOMAIN_NAME_RULE).message(
        "spec.outboundTls.policies[].domain must be a lower-case domain name such as partner.example"
    ))]
    pub domain: String,
    /// `verify`: STARTTLS with a certificate valid for the MX host name, else defer. `dane`:
    /// only MX hosts with matching DNSSEC-signed TLSA records (needs DANE enabled on the
    /// nodes). `none`: opportunistic TLS, no MTA-STS or DANE.
    pub mode: TlsPolicyRuleMode,
}

/// Mode of a [`TlsPolicyRule`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TlsPolicyRuleMode {
    Verify,
    Dane,
    None,
}

/// The Service exposing ports 25, 465 and 587.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Extra annotations for the Service (load-balancer settings of the cloud provider).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// PROXY protocol from the load balancer in front of the Service (when it sends one,
    /// e.g. with the cloud provider's proxy-protocol annotation): the nodes then see the
    /// real client address on ports 25, 465 and 587.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocolSpec>,
    /// The load-balancer implementation that serves the Service (`spec.loadBalancerClass`,
    /// e.g. `service.k8s.aws/nlb`); absent: the cluster's default. Immutable once set on the
    /// Service (Kubernetes refuses a change; delete the Service to move it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub load_balancer_class: Option<String>,
    /// Client networks the load balancer admits (CIDR, e.g. `198.51.100.0/24`); empty: any.
    /// Usually empty for port 25, which the whole Internet must reach; useful for a
    /// submission-only domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c))").message(
        "spec.service.loadBalancerSourceRanges entries must be CIDR ranges such as 198.51.100.0/24 or 2001:db8::/48"
    ))]
    pub load_balancer_source_ranges: Vec<String>,
    /// `Local` (the default) keeps the client address, which SPF checks and per-client
    /// limits depend on, by sending traffic only to nodes that run a pod. `Cluster` spreads
    /// it over every node but hides the client address: use it only with `proxyProtocol`.
    /// Not used with `type: ClusterIP`.
    #[serde(default)]
    pub external_traffic_policy: ExternalTrafficPolicy,
}

/// `externalTrafficPolicy` of the Service.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ExternalTrafficPolicy {
    #[default]
    Local,
    Cluster,
}

/// The PROXY protocol settings of the nodes' SMTP ports.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.enabled || (has(self.trustedCidrs) && size(self.trustedCidrs) > 0)").message(
    "spec.service.proxyProtocol.trustedCidrs must list the load balancer's networks when enabled is true: anyone else reaching the ports could claim any client address"
))]
pub struct ProxyProtocolSpec {
    /// Expect a PROXY protocol v1 or v2 header on every connection.
    #[serde(default)]
    pub enabled: bool,
    /// The networks the load balancer connects from (CIDR, e.g. `10.0.0.0/8`, or single
    /// addresses). A connection from anywhere else is closed without a greeting.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub trusted_cidrs: Vec<String>,
}

/// Kubernetes Service type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ServiceType {
    #[default]
    LoadBalancer,
    NodePort,
    ClusterIP,
}

/// TLS certificate source.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A cert-manager issuer. Needs cert-manager's CRDs in the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ref: Option<IssuerRef>,
}

/// A cert-manager `Issuer` or `ClusterIssuer`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// Issuer name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// `Issuer` (same namespace) or `ClusterIssuer`.
    #[serde(default)]
    pub kind: IssuerKind,
    /// API group of the issuer.
    #[serde(default = "default_issuer_group")]
    #[schemars(length(min = 1, max = 253))]
    pub group: String,
}

/// Kind of a cert-manager issuer.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum IssuerKind {
    #[default]
    Issuer,
    ClusterIssuer,
}

/// DKIM keys. Each algorithm gets its own selector (`<selector>` for RSA,
/// `<selector>-ed25519` for Ed25519; rotated keys add `-g<N>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.algorithms.exists(a, a == 'rsa-sha256')").message(
    "spec.dkim.algorithms must contain rsa-sha256: many verifiers cannot check ed25519-sha256 yet, so it may only be added next to RSA (RFC 8463)"
))]
pub struct DkimSpec {
    /// Base selector name (a DNS label).
    #[serde(default = "default_selector")]
    #[schemars(length(min = 1, max = 40))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message(
        "spec.dkim.selector must be a DNS label of a-z, 0-9 and '-' (at most 40 characters, leaving room for rotation suffixes)"
    ))]
    pub selector: String,
    /// Signing algorithms; keys are RSA-2048 and Ed25519.
    #[serde(default = "default_algorithms")]
    #[schemars(length(min = 1, max = 2))]
    #[x_kube(validation = Rule::new("self.all(a, self.exists_one(b, b == a))").message(
        "spec.dkim.algorithms must not list an algorithm twice"
    ))]
    pub algorithms: Vec<DkimAlgorithm>,
    /// Rotate the keys this often (e.g. `90d`). Absent: never rotate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(
        "spec.dkim.rotateEvery must be a duration such as 90d, 2160h or 30d12h"
    ))]
    pub rotate_every: Option<String>,
    /// How long a new key is published in DNS before it signs (DNS propagation).
    #[serde(default = "default_publish_ahead")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(
        "spec.dkim.publishAhead must be a duration such as 48h or 2d"
    ))]
    pub publish_ahead: String,
    /// How long a replaced key stays in DNS after it stopped signing, so that mail in flight
    /// still verifies (at least 7 days is recommended).
    #[serde(default = "default_retain_after")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(
        "spec.dkim.retainAfter must be a duration such as 7d or 168h"
    ))]
    pub retain_after: String,
}

/// DKIM signing algorithm.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub enum DkimAlgorithm {
    #[serde(rename = "rsa-sha256")]
    RsaSha256,
    #[serde(rename = "ed25519-sha256")]
    Ed25519Sha256,
}

/// SPF record contents besides the nodes' own addresses.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpfSpec {
    /// Extra `include:` domains (each costs DNS lookups; RFC 7208 allows 10 in total).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(max = 253)))]
    #[x_kube(validation = Rule::new(
        "self.all(d, size(d) <= 253 && d.matches('^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\\\\.)+[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$'))"
    ).message("spec.spf.include entries must be lower-case domain names such as _spf.example.net"))]
    pub include: Vec<String>,
    /// Extra IPv4 addresses or CIDR ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new(
        "self.all(a, (isIP(a) && ip(a).family() == 4) || (isCIDR(a) && cidr(a).ip().family() == 4))"
    ).message("spec.spf.ip4 entries must be IPv4 addresses or CIDR ranges such as 192.0.2.10 or 198.51.100.0/24"))]
    pub ip4: Vec<String>,
    /// Extra IPv6 addresses or CIDR ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new(
        "self.all(a, (isIP(a) && ip(a).family() == 6) || (isCIDR(a) && cidr(a).ip().family() == 6))"
    ).message("spec.spf.ip6 entries must be IPv6 addresses or CIDR ranges such as 2001:db8::1 or 2001:db8::/48"))]
    pub ip6: Vec<String>,
    /// What to say about all other senders.
    #[serde(default)]
    pub policy: SpfPolicy,
}

/// The SPF `all` term.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum SpfPolicy {
    /// `-all`: other senders fail.
    #[default]
    #[serde(rename = "-all")]
    Fail,
    /// `~all`: other senders soft-fail.
    #[serde(rename = "~all")]
    SoftFail,
}

/// DMARC policy (RFC 7489).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DmarcSpec {
    /// Policy for mail that fails DMARC (`p=`). Start with `none` and tighten.
    #[serde(default)]
    pub policy: DmarcPolicy,
    /// Policy for subdomains (`sp=`); absent: same as `policy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subdomain_policy: Option<DmarcPolicy>,
    /// Aggregate report URIs (`rua=`), e.g. `mailto:dmarc@example.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new(REPORT_URI_RULE).message(
        "spec.dmarc.rua must be mailto: or https:// URIs separated by commas, e.g. mailto:dmarc@example.com"
    ))]
    pub rua: Option<String>,
    /// Failure report URIs (`ruf=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new(REPORT_URI_RULE).message(
        "spec.dmarc.ruf must be mailto: or https:// URIs separated by commas"
    ))]
    pub ruf: Option<String>,
    /// DKIM identifier alignment (`adkim=`).
    #[serde(default)]
    pub adkim: Alignment,
    /// SPF identifier alignment (`aspf=`).
    #[serde(default)]
    pub aspf: Alignment,
}

/// DMARC `p=` / `sp=` values.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DmarcPolicy {
    #[default]
    None,
    Quarantine,
    Reject,
}

/// DMARC identifier alignment mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Alignment {
    /// Same organisational domain (`r`).
    #[default]
    Relaxed,
    /// Exactly the same domain (`s`).
    Strict,
}

/// MTA-STS policy (RFC 8461).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MtaStsSpec {
    /// `enforce`, `testing` or `none`.
    pub mode: MtaStsMode,
    /// Policy lifetime (`max_age`), at most one year; RFC 8461 recommends weeks.
    #[serde(default = "default_mta_sts_max_age")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(DURATION_RULE).message(
        "spec.mtaSts.maxAge must be a duration such as 7d (at most 365d)"
    ))]
    pub max_age: String,
}

/// MTA-STS mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MtaStsMode {
    Enforce,
    Testing,
    None,
}

/// SMTP TLS reporting (RFC 8460).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsRptSpec {
    /// Report URIs (`rua=`), e.g. `mailto:tls-reports@example.com`.
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new(REPORT_URI_RULE).message(
        "spec.tlsRpt.rua must be mailto: or https:// URIs separated by commas"
    ))]
    pub rua: String,
}

/// Inbound mail for the domain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InboundSpec {
    /// Recipients that exist: local parts (`bob`) or full addresses in this domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10000), inner(length(max = 320)))]
    pub recipients: Vec<String>,
    /// Accept every local part the forward server accepts: the nodes ask it about each
    /// recipient at RCPT time (cached), so mail for nobody is refused, not bounced later.
    #[serde(default)]
    pub catch_all: bool,
    /// Hand inbound mail to this server. Absent: the domain receives no mail; its recipients
    /// are refused at RCPT (`550 5.1.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<ForwardSpec>,
}

/// A downstream mail store (Dovecot LMTP, another MTA).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForwardSpec {
    /// Host name or address.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// Port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// `lmtp` or `smtp`.
    #[serde(default)]
    pub protocol: ForwardProtocol,
    /// STARTTLS towards the server: `Opportunistic`, `Required` or `None`.
    #[serde(default)]
    pub tls: ForwardTls,
}

/// TLS towards a downstream mail store.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ForwardTls {
    /// STARTTLS when offered (an in-cluster store often has none).
    #[default]
    Opportunistic,
    Required,
    None,
}

/// Protocol of a downstream mail store.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ForwardProtocol {
    #[default]
    Lmtp,
    Smtp,
}

/// Submission users.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubmissionSpec {
    /// A Secret whose keys are user names (local parts) and whose values are passwords
    /// (hashed by the operator with argon2) or argon2/bcrypt hashes.
    pub users_secret_ref: LocalObjectReference,
}

/// Message limits.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Largest message accepted (SIZE), a quantity such as `25Mi`; at most `1Gi`.
    #[serde(default = "default_max_message_size")]
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new(
        "self.matches('^[0-9]+(Ki|Mi|Gi)?$') && quantity(self).compareTo(quantity('1Ki')) >= 0 && quantity(self).compareTo(quantity('1Gi')) <= 0"
    ).message("spec.limits.maxMessageSize must be a size between 1Ki and 1Gi such as 25Mi (units Ki, Mi, Gi)"))]
    pub max_message_size: String,
    /// Recipients per message (RFC 5321 asks servers to take at least 100).
    #[serde(default = "default_max_recipients")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_recipients: i32,
    /// Messages an authenticated user may submit per minute (per node).
    #[serde(default = "default_messages_per_minute")]
    #[schemars(range(min = 1, max = 100000))]
    pub messages_per_minute_per_user: i32,
}

/// DNS record settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DnsSpec {
    /// TTL of every generated record, in seconds.
    #[serde(default = "default_ttl")]
    #[schemars(range(min = 60, max = 86400))]
    pub ttl: i32,
}

/// What the operator made of a MailDomain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MailDomainStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// SMTP node pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// SMTP node pods that exist (the scale subresource's `status.replicas`).
    #[serde(default)]
    pub replicas: i32,
    /// The load-balancer IP addresses of the Service the domain's mail arrives on (the
    /// pool's with `spec.poolRef`): the MX host's A/AAAA records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Label selector of the domain's pods (the scale subresource's `status.selector`, which
    /// a HorizontalPodAutoscaler uses to find the pods' metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// DKIM selectors published in DNS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selectors: Vec<String>,
    /// DKIM selectors the nodes sign with (one per algorithm).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signing_selectors: Vec<String>,
    /// The TLS certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateStatus>,
    /// Exactly the DNS records to publish.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_records: Vec<DnsRecord>,
    /// `Ready`, `DkimKeyReady`, `CertificateReady`, `DnsRecordsReady` (computed),
    /// `DnsPublished` (DNS answers with them; does not affect `Ready`), `RelayResolved`, and
    /// `Accepted` (whether the MailPool of `spec.poolRef` lets it attach).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// The certificate the nodes serve.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    /// The `kubernetes.io/tls` Secret the pods mount.
    pub secret_name: String,
    /// `operator-ca` or `cert-manager`.
    pub source: String,
    /// End of validity (RFC 3339), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// When the operator renews it (RFC 3339), for operator-issued certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_after: Option<String>,
}

/// One DNS resource record, with absolute names (trailing dot).
#[derive(
    Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct DnsRecord {
    /// Owner name, absolute (`example.com.`).
    pub name: String,
    /// Record type: `MX`, `A`, `AAAA`, `TXT`.
    #[serde(rename = "type")]
    pub type_: String,
    /// TTL in seconds.
    pub ttl: i32,
    /// Record data in presentation form; TXT data unquoted and unsplit.
    pub value: String,
}

fn default_replicas() -> i32 {
    2
}
fn default_issuer_group() -> String {
    "cert-manager.io".to_owned()
}
fn default_selector() -> String {
    "kubemail1".to_owned()
}
fn default_algorithms() -> Vec<DkimAlgorithm> {
    vec![DkimAlgorithm::RsaSha256, DkimAlgorithm::Ed25519Sha256]
}
// DNS propagation: a TTL of an hour plus caches that ignore it; two days is generous.
fn default_publish_ahead() -> String {
    "48h".to_owned()
}
// RFC 6376 gives no number; 7 days covers queued and retried mail.
fn default_retain_after() -> String {
    "7d".to_owned()
}
// RFC 8461 3.2 suggests weeks; one week keeps policy changes quick.
fn default_mta_sts_max_age() -> String {
    "7d".to_owned()
}
fn default_max_message_size() -> String {
    "25Mi".to_owned()
}
fn default_max_recipients() -> i32 {
    100
}
fn default_messages_per_minute() -> i32 {
    60
}
// One hour: short enough for a changed record to spread within a working session.
fn default_ttl() -> i32 {
    3600
}

impl Default for DkimSpec {
    fn default() -> Self {
        Self {
            selector: default_selector(),
            algorithms: default_algorithms(),
            rotate_every: None,
            publish_ahead: default_publish_ahead(),
            retain_after: default_retain_after(),
        }
    }
}

impl Default for LimitsSpec {
    fn default() -> Self {
        Self {
            max_message_size: default_max_message_size(),
            max_recipients: default_max_recipients(),
            messages_per_minute_per_user: default_messages_per_minute(),
        }
    }
}

impl Default for DnsSpec {
    fn default() -> Self {
        Self { ttl: default_ttl() }
    }
}

impl MailDomainSpec {
    /// The node host name: `spec.hostname` or `mx.<domain>`.
    pub fn effective_hostname(&self) -> String {
        self.hostname
            .clone()
            .unwrap_or_else(|| format!("mx.{}", self.domain))
    }
}
