//! `DeliveryPause`: stop delivery to a destination (recipient domains, MX hosts, networks) or
//! from MailDomains, until it is deleted or expires. The operator writes it into the JetStream
//! KV bucket every node watches; paused mail stays queued (no attempt counted, no bounce) and
//! goes out again within a minute of the end.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::conditions_schema;

/// CEL: a host or domain name, or `*.` and one (lower case).
const NAME_PATTERN_RULE: &str = "self.all(n, n.matches('^(\\\\*\\\\.)?([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\\\\.)*[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$'))";

/// A pause of delivery.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "kubemail.io",
    version = "v1alpha1",
    kind = "DeliveryPause",
    namespaced,
    status = "DeliveryPauseStatus",
    derive = "PartialEq",
    shortname = "mpause",
    category = "kubemail",
    doc = "Pauses delivery to a destination or from MailDomains until deleted or expired; paused mail stays queued.",
    printcolumn(
        name = "Recipients",
        type_ = "string",
        json_path = ".spec.recipientDomains"
    ),
    printcolumn(name = "MX", type_ = "string", json_path = ".spec.mxHosts"),
    printcolumn(name = "From", type_ = "string", json_path = ".spec.fromDomains"),
    printcolumn(name = "Until", type_ = "string", json_path = ".status.expiresAt"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Held", type_ = "integer", json_path = ".status.heldMessages"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "(has(self.recipientDomains) && size(self.recipientDomains) > 0) || (has(self.fromDomains) && size(self.fromDomains) > 0) || (has(self.mxHosts) && size(self.mxHosts) > 0) || (has(self.networks) && size(self.networks) > 0)"
).message("name at least one of spec.recipientDomains, spec.fromDomains, spec.mxHosts and spec.networks"))]
#[x_kube(validation = Rule::new("!(has(self.until) && has(self.duration))").message(
    "give spec.until or spec.duration, not both"
))]
pub struct DeliveryPauseSpec {
    /// Recipient domains to stop delivering to (`example.com`, or `*.example.com` for its
    /// subdomains).
    #[serde(default)]
    #[schemars(length(max = 100), inner(length(max = 255)))]
    #[x_kube(validation = Rule::new(NAME_PATTERN_RULE).message(
        "spec.recipientDomains must be lower-case domain names such as gmail.com or *.example.com"
    ))]
    pub recipient_domains: Vec<String>,
    /// MailDomains (their `spec.domain`) whose outgoing mail is paused.
    #[serde(default)]
    #[schemars(length(max = 100), inner(length(max = 255)))]
    #[x_kube(validation = Rule::new(NAME_PATTERN_RULE).message(
        "spec.fromDomains must be lower-case domain names"
    ))]
    pub from_domains: Vec<String>,
    /// MX hosts (or relay hosts) not to connect to (`*.google.com` is every Gmail MX).
    #[serde(default)]
    #[schemars(length(max = 100), inner(length(max = 255)))]
    #[x_kube(validation = Rule::new(NAME_PATTERN_RULE).message(
        "spec.mxHosts must be lower-case host names such as mx.example.com or *.google.com"
    ))]
    pub mx_hosts: Vec<String>,
    /// Addresses not to connect to (CIDR, IPv4 or IPv6: `192.0.2.0/24`).
    #[serde(default)]
    #[schemars(length(max = 100), inner(length(max = 64)))]
    pub networks: Vec<String>,
    /// End of the pause (RFC 3339). Absent (and no duration): until deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("timestamp(self) > timestamp('2000-01-01T00:00:00Z')").message(
        "spec.until must be an RFC 3339 time such as 2026-12-24T18:00:00Z"
    ))]
    pub until: Option<String>,
    /// Length of the pause from its creation (`2h`, `30m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(d|h|m|s))+$')").message(
        "spec.duration must be a duration such as 2h or 1d12h"
    ))]
    pub duration: Option<String>,
    /// Why (shown in node logs and `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 500))]
    pub reason: Option<String>,
}

/// What the operator observed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryPauseStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the pause ends (RFC 3339); absent: when deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Queued messages it holds back (counted at `heldCountedAt`).
    #[serde(default)]
    pub held_messages: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_counted_at: Option<String>,
    /// `Ready`: in force on every node (written to the pause bucket); `False` with reason
    /// `Expired` after its end, or the reason it could not be written.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}
