//! `EventSink`: where a MailDomain's delivery events go beyond the events stream: an HTTP
//! webhook the operator POSTs every event to (signed, ordered, retried), or, without
//! `webhook`, a durable NATS consumer of the domain's events for a client of your own.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{LocalObjectReference, conditions_schema};

/// Where a MailDomain's delivery events go.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubemail.io",
    version = "v1alpha1",
    kind = "EventSink",
    namespaced,
    status = "EventSinkStatus",
    derive = "PartialEq",
    shortname = "msink",
    category = "kubemail",
    doc = "Where a MailDomain's delivery events (CloudEvents) go: a signed HTTP webhook or a durable NATS consumer.",
    printcolumn(
        name = "MailDomain",
        type_ = "string",
        json_path = ".spec.mailDomainRef.name"
    ),
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.webhook.url"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Healthy",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Healthy\")].status"
    ),
    printcolumn(name = "Backlog", type_ = "integer", json_path = ".status.backlog"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EventSinkSpec {
    /// The MailDomain (in this namespace) whose events this sink receives.
    pub mail_domain_ref: LocalObjectReference,
    /// Only these event types; empty: every type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 9))]
    pub types: Vec<SinkEventType>,
    /// POST every event to this URL. Absent: the operator only keeps a durable NATS
    /// consumer (named in the status) for a client of your own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSpec>,
}

/// An event type (the last token of its subject and CloudEvents type).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SinkEventType {
    Received,
    Delivered,
    Deferred,
    Bounced,
    Expired,
    Suppressed,
    Complaint,
    DsnSent,
    QueueAction,
}

impl SinkEventType {
    /// The contract's event type.
    pub fn event_type(self) -> kubemail_queue::events::EventType {
        use kubemail_queue::events::EventType as T;
        match self {
            Self::Received => T::Received,
            Self::Delivered => T::Delivered,
            Self::Deferred => T::Deferred,
            Self::Bounced => T::Bounced,
            Self::Expired => T::Expired,
            Self::Suppressed => T::Suppressed,
            Self::Complaint => T::Complaint,
            Self::DsnSent => T::DsnSent,
            Self::QueueAction => T::QueueAction,
        }
    }
}

/// An HTTP webhook.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSpec {
    /// The receiver's URL (`https://`, or `http://` inside the cluster).
    #[schemars(length(min = 8, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')")
        .message("spec.webhook.url must be an http:// or https:// URL"))]
    pub url: String,
    /// The Secret (this namespace) whose key holds the HMAC-SHA256 signing key of the
    /// `Kubemail-Signature` header.
    pub secret_ref: SecretKeyRef,
    /// Deadline of one POST.
    #[serde(default = "default_timeout")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(h|m|s))+$')").message(
        "spec.webhook.timeout must be a duration such as 10s"
    ))]
    pub timeout: String,
    /// Longest pause between retries of a failed POST (they start at 1s and double).
    #[serde(default = "default_max_backoff")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(h|m|s))+$')").message(
        "spec.webhook.maxBackoff must be a duration such as 5m"
    ))]
    pub max_backoff: String,
}

/// A key of a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key holding the signing key.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// What the operator knows about a sink.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventSinkStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The events stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// The durable consumer of this sink (for `webhook`-less sinks: the one to pull from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Its filter subjects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filter_subjects: Vec<String>,
    /// Events waiting for the sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<i64>,
    /// The last event the webhook accepted (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<String>,
    /// The last failure (RFC 3339) and what it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The webhook answered `410 Gone` and is not sent to until the spec changes.
    #[serde(default)]
    pub paused: bool,
    /// `Ready` (spec resolved: MailDomain, Secret, consumer) and `Healthy` (the webhook
    /// takes events).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

fn default_timeout() -> String {
    "10s".to_owned()
}
fn default_max_backoff() -> String {
    "5m".to_owned()
}
fn default_secret_key() -> String {
    "secret".to_owned()
}
