//! This agent's Node: registration (labels, addresses, capacity, system info, an annotation
//! telling tests where the agent keeps pod logs and volumes), the heartbeat (the node Lease in
//! `kube-node-lease` and the Ready condition, as the kubelet keeps them), and NotReady on exit.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::env::Allocatable;

/// Annotation with the agent's state directory (pod logs under `pods/<ns>_<name>/`, volumes
/// under `pods/<uid>/volumes/`), so tests find them from the pod's node.
pub const STATE_DIR_ANNOTATION: &str = "kubemail.io/agent-state-dir";
/// Annotation with the agent's image store directory (absent without one), so tests can add
/// images of their own.
pub const IMAGE_STORE_ANNOTATION: &str = "kubemail.io/agent-image-store";
/// The kubelet's version line this agent stands in for (the control plane is v1.36.3).
pub const KUBELET_VERSION: &str = "v1.36.3";
const LEASE_NAMESPACE: &str = "kube-node-lease";
/// The kubelet's default node lease duration.
const LEASE_DURATION_SECONDS: i32 = 40;
/// The kubelet renews its lease every 10 s (a quarter of the duration) and reports status as often.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// The kubelet's default `--max-pods`.
const MAX_PODS: &str = "110";

/// A Node API call failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("register node {node}")]
    Register {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("update status of node {node}")]
    UpdateStatus {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("renew lease of node {node}")]
    RenewLease {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// What the host offers, reported as capacity and allocatable.
pub fn host_allocatable() -> Allocatable {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let memory_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(4 << 20);
    Allocatable {
        cpu_millis: cpus * 1000,
        memory_bytes: memory_kib * 1024,
    }
}

/// The Node's status: Ready (or not), with heartbeat `now` and transition time `since`.
pub fn node_status(
    host_ip: IpAddr,
    node: &str,
    ready: bool,
    now: Timestamp,
    since: Timestamp,
) -> NodeStatus {
    let alloc = host_allocatable();
    let resources: BTreeMap<String, Quantity> = [
        ("cpu", format!("{}m", alloc.cpu_millis)),
        ("memory", format!("{}", alloc.memory_bytes)),
        ("pods", MAX_PODS.to_string()),
        ("ephemeral-storage", "100Gi".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), Quantity(v)))
    .collect();
    let condition = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: Some(Time(since)),
    };
    let (ready_status, ready_reason, ready_msg) = if ready {
        (
            "True",
            "KubeletReady",
            "kubemail node agent is posting ready status",
        )
    } else {
        ("False", "KubeletNotReady", "kubemail node agent stopped")
    };
    NodeStatus {
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: host_ip.to_string(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: node.to_string(),
            },
        ]),
        conditions: Some(vec![
            condition(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "no memory pressure",
            ),
            condition(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "no disk pressure",
            ),
            condition(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "no PID pressure",
            ),
            condition("Ready", ready_status, ready_reason, ready_msg),
        ]),
        node_info: Some(system_info()),
        ..Default::default()
    }
}

/// Creates or updates the Node and reports it Ready.
pub async fn register(
    client: &Client,
    node: &str,
    host_ip: IpAddr,
    state_dir: &Path,
    image_store: Option<&Path>,
) -> Result<Timestamp, NodeError> {
    let api: Api<Node> = Api::all(client.clone());
    let reg_err = |source| NodeError::Register {
        node: node.to_string(),
        source,
    };
    let labels: BTreeMap<String, String> = [
        ("kubernetes.io/hostname", node.to_string()),
        ("kubernetes.io/os", "linux".to_string()),
        ("kubernetes.io/arch", arch().to_string()),
        ("node.kubemail.io/process-agent", "true".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut annotations = BTreeMap::from([(
        STATE_DIR_ANNOTATION.to_string(),
        state_dir.display().to_string(),
    )]);
    if let Some(store) = image_store {
        annotations.insert(
            IMAGE_STORE_ANNOTATION.to_string(),
            store.display().to_string(),
        );
    }
    let existing = api.get_opt(node).await.map_err(reg_err)?;
    let since = match &existing {
        None => {
            let fresh = Node {
                metadata: ObjectMeta {
                    name: Some(node.to_string()),
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..Default::default()
                },
                ..Default::default()
            };
            api.create(&PostParams::default(), &fresh)
                .await
                .map_err(reg_err)?;
            Timestamp::now()
        }
        Some(existing) => {
            let mut patched: serde_json::Map<String, serde_json::Value> = annotations
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
                .collect();
            // A merge patch removes the store annotation of an earlier run with null.
            patched
                .entry(IMAGE_STORE_ANNOTATION)
                .or_insert(serde_json::Value::Null);
            let patch = serde_json::json!({"metadata": {"labels": labels, "annotations": patched}});
            api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(reg_err)?;
            // Keep the transition time when the node already was Ready.
            existing
                .status
                .iter()
                .flat_map(|s| s.conditions.iter().flatten())
                .find(|c| c.type_ == "Ready" && c.status == "True")
                .and_then(|c| c.last_transition_time.clone())
                .map_or_else(Timestamp::now, |t| t.0)
        }
    };
    patch_status(client, node, host_ip, true, since).await?;
    renew_lease(client, node).await?;
    Ok(since)
}

/// Renews the Lease and refreshes the Ready condition every [`HEARTBEAT_INTERVAL`] until
/// `cancel`; failures are logged and retried on the next beat.
pub async fn heartbeat(
    client: Client,
    node: String,
    host_ip: IpAddr,
    since: Timestamp,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
        }
        if let Err(e) = renew_lease(&client, &node).await {
            tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "node heartbeat failed");
        }
        if let Err(e) = patch_status(&client, &node, host_ip, true, since).await {
            tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "node status update failed");
        }
    }
}

/// Reports the node NotReady (the agent is going away).
pub async fn mark_not_ready(client: &Client, node: &str, host_ip: IpAddr) -> Result<(), NodeError> {
    patch_status(client, node, host_ip, false, Timestamp::now()).await
}

async fn patch_status(
    client: &Client,
    node: &str,
    host_ip: IpAddr,
    ready: bool,
    since: Timestamp,
) -> Result<(), NodeError> {
    let api: Api<Node> = Api::all(client.clone());
    let status = node_status(host_ip, node, ready, Timestamp::now(), since);
    let patch = serde_json::json!({"status": status});
    api.patch_status(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| NodeError::UpdateStatus {
            node: node.to_string(),
            source,
        })?;
    Ok(())
}

async fn renew_lease(client: &Client, node: &str) -> Result<(), NodeError> {
    let api: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let err = |source| NodeError::RenewLease {
        node: node.to_string(),
        source,
    };
    let now = MicroTime(Timestamp::now());
    let patch = serde_json::json!({"spec": {"holderIdentity": node, "renewTime": now,
        "leaseDurationSeconds": LEASE_DURATION_SECONDS}});
    match api
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let lease = lease_object(client, node, now).await;
            api.create(&PostParams::default(), &lease)
                .await
                .map(drop)
                .map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}

async fn lease_object(client: &Client, node: &str, now: MicroTime) -> Lease {
    // The kubelet makes its Node the Lease's owner so the Lease goes when the Node does.
    let owner = Api::<Node>::all(client.clone())
        .get_opt(node)
        .await
        .ok()
        .flatten()
        .and_then(|n| {
            Some(OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: node.to_string(),
                uid: n.metadata.uid?,
                ..Default::default()
            })
        });
    Lease {
        metadata: ObjectMeta {
            name: Some(node.to_string()),
            namespace: Some(LEASE_NAMESPACE.into()),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.to_string()),
            lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
            renew_time: Some(now),
            ..Default::default()
        }),
    }
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn system_info() -> NodeSystemInfo {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let os_image = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into());
    NodeSystemInfo {
        architecture: arch().into(),
        boot_id: read("/proc/sys/kernel/random/boot_id"),
        container_runtime_version: "proc://kubemail-node-agent".into(),
        kernel_version: read("/proc/sys/kernel/osrelease"),
        kube_proxy_version: String::new(),
        kubelet_version: KUBELET_VERSION.into(),
        machine_id: read("/etc/machine-id"),
        operating_system: "linux".into(),
        os_image,
        system_uuid: String::new(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn ready_status_carries_addresses_capacity_and_times() {
        let now = Timestamp::from_second(1_800_000_100).unwrap();
        let since = Timestamp::from_second(1_800_000_000).unwrap();
        let s = node_status(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "local-node",
            true,
            now,
            since,
        );
        let ready = s
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(ready.last_heartbeat_time, Some(Time(now)));
        assert_eq!(ready.last_transition_time, Some(Time(since)));
        let addresses = s.addresses.unwrap();
        assert_eq!(
            (addresses[0].type_.as_str(), addresses[0].address.as_str()),
            ("InternalIP", "127.0.0.1")
        );
        assert_eq!(s.allocatable.unwrap()["pods"], Quantity("110".into()));
        let info = s.node_info.unwrap();
        assert_eq!(
            (
                info.operating_system.as_str(),
                info.kubelet_version.as_str()
            ),
            ("linux", KUBELET_VERSION)
        );
        let not_ready = node_status(IpAddr::V4(Ipv4Addr::LOCALHOST), "n", false, now, now);
        assert!(
            not_ready
                .conditions
                .unwrap()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "False")
        );
    }
}
