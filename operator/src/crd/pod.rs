//! `spec.pod` of a MailDomain and a MailPool: where and how the SMTP node pods run (node
//! selection, tolerations, affinity, priority, image pull Secrets, topology spread, resources).
//! The Kubernetes types are embedded as they are (k8s-openapi's schemas), so the fields read
//! and validate exactly like those of a Deployment's pod template.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::LocalObjectReference;

/// Scheduling and resources of the SMTP node pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodShape {
    /// Run the pods only on nodes with these labels (the pod's `nodeSelector`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate, e.g. those of a node pool reserved for mail.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod (anti-)affinity of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// The PriorityClass of the pods: mail nodes often deserve more than batch work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
    /// Secrets (same namespace) with the registry credentials for the node image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// How the pods spread over failure domains. Absent: across `kubernetes.io/hostname` and
    /// `topology.kubernetes.io/zone`, `maxSkew: 1`, `whenUnsatisfiable: ScheduleAnyway`. An
    /// empty list: no spread constraints. A constraint without `labelSelector` selects these
    /// nodes' pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    /// Requests and limits of the node container, merged over the defaults (`cpu: 100m`,
    /// `memory: 128Mi` requested; a memory limit of the node's message memory budget plus
    /// 256Mi). A memory limit below that sum is refused (`Ready=False`, reason
    /// `InvalidPodResources`): the node would be killed before it refuses mail for memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl PodShape {
    /// This shape with every field it leaves unset taken from `defaults` (the operator's
    /// site-wide `--node-pod-defaults`). Field by field, not deep: `resources` given here
    /// replaces the default `resources` as a whole.
    pub fn or(&self, defaults: &PodShape) -> PodShape {
        fn pick<T: Clone>(own: &T, default: &T, unset: impl Fn(&T) -> bool) -> T {
            if unset(own) { default } else { own }.clone()
        }
        PodShape {
            node_selector: pick(
                &self.node_selector,
                &defaults.node_selector,
                BTreeMap::is_empty,
            ),
            tolerations: pick(&self.tolerations, &defaults.tolerations, Vec::is_empty),
            affinity: pick(&self.affinity, &defaults.affinity, Option::is_none),
            priority_class_name: pick(
                &self.priority_class_name,
                &defaults.priority_class_name,
                Option::is_none,
            ),
            image_pull_secrets: pick(
                &self.image_pull_secrets,
                &defaults.image_pull_secrets,
                Vec::is_empty,
            ),
            topology_spread_constraints: pick(
                &self.topology_spread_constraints,
                &defaults.topology_spread_constraints,
                Option::is_none,
            ),
            resources: pick(&self.resources, &defaults.resources, Option::is_none),
        }
    }
}
