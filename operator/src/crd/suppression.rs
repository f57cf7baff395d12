//! `Suppression`: manual entries of a MailDomain's suppression list, and removals of entries
//! by hand. The operator writes them into the JetStream KV bucket every node reads
//! (`kubemail_queue::suppression`).
//!
//! * `action: Suppress` (default): the addresses stay suppressed (no expiry) while the
//!   object exists; deleting it removes them.
//! * `action: Unsuppress`: the addresses are removed from the list once for every change of
//!   the spec (whatever put them there: a bounce, a complaint, another object); deleting it
//!   changes nothing.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{LocalObjectReference, conditions_schema};

/// Manual suppression list entries, or their removal.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubemail.io",
    version = "v1alpha1",
    kind = "Suppression",
    namespaced,
    status = "SuppressionStatus",
    derive = "PartialEq",
    shortname = "msupp",
    category = "kubemail",
    doc = "Addresses a MailDomain must not send to (or must send to again).",
    printcolumn(
        name = "MailDomain",
        type_ = "string",
        json_path = ".spec.mailDomainRef.name"
    ),
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SuppressionSpec {
    /// The MailDomain (in this namespace) whose list this is.
    pub mail_domain_ref: LocalObjectReference,
    /// The addresses.
    // The length caps in the schema (RFC 5321 4.5.3.1.3: a path is at most 256 octets; 320
    // leaves room) bound the rule's CEL cost: without them the API server refuses the CRD.
    #[schemars(length(min = 1, max = 1000), inner(length(max = 320)))]
    #[x_kube(validation = Rule::new("self.all(a, a.contains('@'))")
        .message("spec.addresses must be e-mail addresses"))]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub action: SuppressionAction,
    /// Why (kept in the entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 500))]
    pub note: Option<String>,
}

/// What to do with the addresses.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum SuppressionAction {
    /// Keep them on the list while this object exists.
    #[default]
    Suppress,
    /// Take them off the list (once per spec change).
    Unsuppress,
}

/// What the operator did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SuppressionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Addresses written (Suppress) or removed (Unsuppress) for this generation.
    #[serde(default)]
    pub applied: i64,
    /// `Ready`: the list has the spec's effect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}
