//! `Relay`: an outbound smarthost (SES, SendGrid, Office 365, a corporate relay) that
//! MailDomains may send through. The operator checks its spec and credentials Secret and, when
//! asked, probes the host (EHLO, STARTTLS) and reports whether it is reachable.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{LocalObjectReference, conditions_schema};

/// An outbound smarthost.
// The kube derive takes one `printcolumn(...)` per column; clippy reads repeated `type_`
// arguments as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubemail.io",
    version = "v1alpha1",
    kind = "Relay",
    namespaced,
    status = "RelayStatus",
    derive = "PartialEq",
    shortname = "mrelay",
    category = "kubemail",
    doc = "An outbound smarthost that MailDomains may send through.",
    printcolumn(name = "Host", type_ = "string", json_path = ".spec.host"),
    printcolumn(name = "Port", type_ = "integer", json_path = ".spec.port"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reachable",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Reachable\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.tls != 'Opportunistic' || !has(self.auth)").message(
    "spec.tls must be StartTlsRequired or Implicit when spec.auth is set: credentials must never cross the network in clear text"
))]
pub struct RelaySpec {
    /// Host name or IP address of the smarthost.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(
        "isIP(self) || self.matches('^([a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?\\\\.)*[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?$')"
    ).message("spec.host must be a host name such as smtp.sendgrid.net or an IP address"))]
    pub host: String,
    /// TCP port (587 submission, 465 implicit TLS, 25).
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// How TLS is used.
    #[serde(default)]
    pub tls: RelayTls,
    /// SMTP AUTH credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<RelayAuth>,
    /// Sending rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// The SPF `include:` domain the relay's operator asks senders to publish (e.g.
    /// `sendgrid.net`); added to the SPF record of every MailDomain using this Relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(super::DOMAIN_NAME_RULE).message(
        "spec.spfInclude must be a lower-case domain name such as sendgrid.net"
    ))]
    pub spf_include: Option<String>,
    /// Check periodically that the host answers (EHLO, STARTTLS). Absent: no probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<RelayProbe>,
}

/// TLS mode towards the relay.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum RelayTls {
    /// STARTTLS must be offered and succeed (port 587/25).
    #[default]
    StartTlsRequired,
    /// TLS from the first byte (port 465).
    Implicit,
    /// STARTTLS when offered, else plain text (no AUTH allowed).
    Opportunistic,
}

/// Credentials.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayAuth {
    /// A Secret with keys `username` and `password` (same namespace).
    pub secret_ref: LocalObjectReference,
}

/// Sending rate limit.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Messages per second over all nodes.
    #[schemars(range(min = 1, max = 100000))]
    pub messages_per_second: i32,
}

/// Reachability probe settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayProbe {
    /// How often to probe.
    #[serde(default = "default_probe_interval")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(d|h|m|s))+$')").message(
        "spec.probe.interval must be a duration such as 5m or 1h"
    ))]
    pub interval: String,
}

/// What the operator found out about a Relay.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The last probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe: Option<ProbeResult>,
    /// `Ready` (spec and credentials usable) and `Reachable` (last probe).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// Result of one probe.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProbeResult {
    /// When (RFC 3339).
    pub time: String,
    /// Whether the host answered as required.
    pub reachable: bool,
    /// Whether the host advertised STARTTLS.
    #[serde(default)]
    pub starttls: bool,
    /// What happened, for a person.
    pub message: String,
}

fn default_port() -> i32 {
    587
}
// Often enough to notice a dead relay before the queue backs up, rare enough to be polite.
fn default_probe_interval() -> String {
    "5m".to_owned()
}
