//! `MailPool`: SMTP nodes shared by many MailDomains, owned by the platform team (the model is
//! Gateway API: a `Gateway` owned by the platform, `HTTPRoute`s owned by tenants, and
//! `allowedRoutes.namespaces` between them). The pool owns one Deployment, one Service (one
//! load balancer, one IP reputation) and one PodDisruptionBudget; a MailDomain attaches with
//! `spec.poolRef`, if the pool's `allowedDomains` lets its namespace in. Attaching and detaching
//! change only what the nodes reload (their config file and the domains' key material), never
//! the pod spec, so no pod restarts.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::mail_domain::ServiceSpec;
use super::pod::PodShape;
use super::{DOMAIN_NAME_RULE, conditions_schema};

/// SMTP nodes shared by the MailDomains that attach to them.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubemail.io",
    version = "v1alpha1",
    kind = "MailPool",
    namespaced,
    status = "MailPoolStatus",
    derive = "PartialEq",
    shortname = "mpool",
    shortname = "mailpool",
    category = "kubemail",
    doc = "SMTP nodes shared by many MailDomains (a platform team's Gateway for mail).",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Hostname", type_ = "string", json_path = ".spec.hostname"),
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
    printcolumn(name = "Address", type_ = "string", json_path = ".status.addresses[0]"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Domains", type_ = "integer", json_path = ".status.attachedDomains"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Ready Replicas",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        priority = 1
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        priority = 1
    ),
    validation = Rule::new(
        "size(self.metadata.name) <= 40 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"
    ).message(
        "metadata.name must be a DNS label of at most 40 characters that starts with a letter: it also names the pool's Deployment, Service and Secrets"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MailPoolSpec {
    /// Host name of the nodes: their EHLO name and the name of the default certificate
    /// (clients that ask for an attached domain's MX host by SNI get that domain's own).
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(DOMAIN_NAME_RULE).message(
        "spec.hostname must be a lower-case host name such as mx.mail.example.net (no trailing dot)"
    ))]
    pub hostname: String,

    /// Number of SMTP node pods (also through `kubectl scale mailpool/<name>` or an HPA).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 50))]
    pub replicas: i32,

    /// The Service in front of the nodes (one load balancer for every attached domain).
    #[serde(default)]
    pub service: ServiceSpec,

    /// Scheduling and resources of the SMTP node pods.
    #[serde(default)]
    pub pod: PodShape,

    /// Which MailDomains may attach.
    #[serde(default)]
    pub allowed_domains: AllowedDomains,
}

/// Which MailDomains may attach to a pool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowedDomains {
    /// The namespaces whose MailDomains may attach.
    #[serde(default)]
    pub namespaces: AllowedNamespaces,
}

/// Namespaces allowed to attach, as Gateway API's `allowedRoutes.namespaces`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.from != 'Selector' || has(self.selector)").message(
    "spec.allowedDomains.namespaces.selector is required when from is Selector"
))]
pub struct AllowedNamespaces {
    /// `Same` (the pool's namespace only, the default), `All`, or `Selector`.
    #[serde(default)]
    pub from: FromNamespaces,
    /// With `from: Selector`: the labels of the namespaces allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// A label selector (Kubernetes `metav1.LabelSelector`): every `matchLabels` pair and every
/// `matchExpressions` term must hold.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One `matchExpressions` term.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// Operator of a `matchExpressions` term.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// Where attaching MailDomains may live.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum FromNamespaces {
    #[default]
    Same,
    All,
    Selector,
}

/// What the operator made of a MailPool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MailPoolStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// SMTP node pods that exist (the scale subresource's `status.replicas`).
    #[serde(default)]
    pub replicas: i32,
    /// SMTP node pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// The load-balancer IP addresses of the pool's Service: the A/AAAA records of the
    /// attached domains' MX host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Label selector of the nodes (the scale subresource's `status.selector`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Number of MailDomains the nodes serve.
    #[serde(default)]
    pub attached_domains: i32,
    /// The MailDomains the nodes serve, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<AttachedDomain>,
    /// `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// A MailDomain served by a pool.
#[derive(
    Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct AttachedDomain {
    pub namespace: String,
    pub name: String,
    pub domain: String,
}

fn default_replicas() -> i32 {
    2
}
