//! Scheduling without a scheduler: a pending pod with no `spec.nodeName` is bound to this node
//! through the `pods/binding` subresource, exactly what kube-scheduler would POST.

use k8s_openapi::api::core::v1::{Binding, ObjectReference, Pod};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// The scheduler name pods get by default; pods asking for another scheduler are left alone.
const DEFAULT_SCHEDULER: &str = "default-scheduler";

/// Binding a pod to the node failed.
#[derive(Debug, thiserror::Error)]
#[error("bind pod {namespace}/{name} to node {node}")]
pub struct BindError {
    pub namespace: String,
    pub name: String,
    pub node: String,
    #[source]
    pub source: kube::Error,
}

/// Whether this agent should bind `pod`: not yet bound, not being deleted, not finished, and
/// meant for the default scheduler.
pub fn wants_binding(pod: &Pod) -> bool {
    let Some(spec) = &pod.spec else { return false };
    let unbound = spec.node_name.as_deref().is_none_or(str::is_empty);
    let scheduler_ok = spec
        .scheduler_name
        .as_deref()
        .is_none_or(|s| s.is_empty() || s == DEFAULT_SCHEDULER);
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending");
    unbound && scheduler_ok && pod.metadata.deletion_timestamp.is_none() && phase == "Pending"
}

/// The Binding object for `pod` → `node`.
pub fn binding_for(pod: &Pod, node: &str) -> Binding {
    Binding {
        metadata: ObjectMeta {
            name: pod.metadata.name.clone(),
            namespace: pod.metadata.namespace.clone(),
            uid: pod.metadata.uid.clone(),
            ..Default::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.to_string()),
            ..Default::default()
        },
    }
}

/// POSTs the binding. A conflict (someone bound it first) counts as done: the pod watch shows
/// where it went.
pub async fn bind(client: &Client, pod: &Pod, node: &str) -> Result<(), BindError> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let result: Result<serde_json::Value, _> = api
        .create_subresource(
            "binding",
            &name,
            &PostParams::default(),
            &binding_for(pod, node),
        )
        .await;
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => Ok(()),
        Err(source) => Err(BindError {
            namespace,
            name,
            node: node.to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "p", "namespace": "n", "uid": "u"}, "spec": spec}),
        )
        .unwrap()
    }

    #[test]
    fn only_unbound_pending_default_scheduler_pods_are_bound() {
        assert!(wants_binding(&pod(json!({"containers": []}))));
        assert!(wants_binding(&pod(
            json!({"containers": [], "schedulerName": "default-scheduler"})
        )));
        assert!(!wants_binding(&pod(
            json!({"containers": [], "nodeName": "other"})
        )));
        assert!(!wants_binding(&pod(
            json!({"containers": [], "schedulerName": "volcano"})
        )));
        let mut deleting = pod(json!({"containers": []}));
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert!(!wants_binding(&deleting));
    }

    #[test]
    fn binding_targets_the_node() {
        let b = binding_for(&pod(json!({"containers": []})), "local-node");
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(
            v["target"],
            json!({"apiVersion": "v1", "kind": "Node", "name": "local-node"})
        );
        assert_eq!(v["metadata"]["name"], "p");
        assert_eq!(v["metadata"]["uid"], "u");
    }
}
