//! The Deployment of a domain's SMTP nodes and the PodDisruptionBudget that keeps all but
//! one of them up during voluntary disruptions. `spec.pod` shapes where the pods run (node
//! selection, tolerations, affinity, priority, topology spread: by default over hosts and
//! zones) and their resources, merged over defaults whose memory limit holds the node's
//! message memory budget.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, Lifecycle, LifecycleHandler, LocalObjectReference,
    ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SeccompProfile, SecretVolumeSource, SecurityContext, SleepAction, TopologySpreadConstraint,
    Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use kubemail_config::NodeConfig;

use super::{BuildConfig, BuildError};
use crate::controller::mail_domain::names::{
    self, ADMIN_PORT, CHECKSUM_ANNOTATION, CONFIG_DIR, DKIM_DIR, MTA_STS_PORT, NODE_CONFIG_KEY,
    RELAY_DIR, SMTP_PORT, SUBMISSION_PORT, SUBMISSIONS_PORT, TLS_DIR, USERS_DIR, labels,
    selector_labels,
};
use crate::controller::mail_domain::validate::{RelayResolution, ValidatedDomain};
use crate::crd::pod::PodShape;

/// Non-root user and group of the node (the distroless `nonroot` ids).
const NODE_UID: i64 = 65532;
/// Seconds the pod keeps serving after SIGTERM is decided, so endpoint removal reaches every
/// load balancer before the node stops accepting.
const PRE_STOP_SLEEP_SECONDS: i64 = 5;
/// Slack on top of the node's drain deadline before the kubelet kills it.
const GRACE_SLACK_SECONDS: i64 = 10;
/// Secret files readable by owner and group (fsGroup) only.
const SECRET_MODE: i32 = 0o440;
/// Memory of a node besides message bodies: the process, idle connections, TLS sessions, the
/// NATS client's buffers, delivery. The container's limit is this plus the node's budget for
/// message bytes, so the budget keeps the node below its limit.
const NODE_BASE_MEMORY: u64 = 256 << 20;
/// Requests of the node container unless `spec.pod.resources` says otherwise: an idle node
/// needs little, and the memory limit (not the request) is what holds the message budget.
const DEFAULT_CPU_REQUEST: &str = "100m";
const DEFAULT_MEMORY_REQUEST: &str = "128Mi";
/// The failure domains the pods spread over by default: nodes, then zones.
const DEFAULT_SPREAD_KEYS: [&str; 2] = ["kubernetes.io/hostname", "topology.kubernetes.io/zone"];

/// What differs between the pods of a MailDomain and those of a MailPool.
#[derive(Debug, Clone)]
pub struct NodePods {
    pub replicas: i32,
    /// Labels of the pods (a superset of `selector`).
    pub labels: BTreeMap<String, String>,
    pub selector: BTreeMap<String, String>,
    /// Pod template annotations (a checksum that rolls the pods when it changes).
    pub annotations: BTreeMap<String, String>,
    /// The ConfigMap holding `node.yaml`, mounted at [`CONFIG_DIR`].
    pub config_map: String,
    pub secrets: Vec<SecretMount>,
    /// Scheduling and resources (`spec.pod`).
    pub shape: PodShape,
}

/// A Secret the pods mount read-only.
#[derive(Debug, Clone)]
pub struct SecretMount {
    pub volume: String,
    pub secret: String,
    pub path: String,
    /// The pod starts without it (a pool's shards that hold no domain yet).
    pub optional: bool,
}

/// The Deployment of the domain's nodes; `checksum` rolls the pods when what they read at
/// start-up changes.
pub(super) fn deployment(
    v: &ValidatedDomain,
    metadata: ObjectMeta,
    checksum: &str,
    node: &NodeConfig,
    config: &BuildConfig,
) -> Result<Deployment, BuildError> {
    let secret = |volume: &str, secret: String, path: &str| SecretMount {
        volume: volume.to_owned(),
        secret,
        path: path.to_owned(),
        optional: false,
    };
    let mut secrets = vec![
        secret("tls", names::tls_secret(&v.name), TLS_DIR),
        secret("dkim", names::dkim_secret(&v.name), DKIM_DIR),
    ];
    if v.users.is_some() {
        secrets.push(secret("users", names::users_secret(&v.name), USERS_DIR));
    }
    if let RelayResolution::Resolved { spec, .. } = &v.relay
        && let Some(auth) = &spec.auth
    {
        secrets.push(secret("relay", auth.secret_ref.name.clone(), RELAY_DIR));
    }
    if config.nats_auth || config.nats_tls {
        secrets.push(secret("nats", names::nats_secret(&v.name), names::NATS_DIR));
    }
    let pods = NodePods {
        replicas: v.replicas,
        labels: labels(&v.name),
        selector: selector_labels(&v.name),
        annotations: BTreeMap::from([(CHECKSUM_ANNOTATION.to_owned(), checksum.to_owned())]),
        config_map: names::node_config(&v.name),
        secrets,
        shape: v.pod.clone(),
    };
    node_deployment(&pods, metadata, node, config)
}

/// The Deployment of SMTP node pods described by `pods`; an error when `pods.shape` asks
/// for resources the node cannot run in.
pub fn node_deployment(
    pods: &NodePods,
    metadata: ObjectMeta,
    node: &NodeConfig,
    config: &BuildConfig,
) -> Result<Deployment, BuildError> {
    let shape = pods.shape.or(&config.pod_defaults);
    let resources = resources(node, shape.resources.as_ref())?;
    // The node's own drain deadline, the preStop sleep before it, and some slack.
    let grace_seconds = i64::try_from(node.shutdown.drain_timeout.0.as_secs())
        .unwrap_or(i64::MAX / 2)
        + PRE_STOP_SLEEP_SECONDS
        + GRACE_SLACK_SECONDS;
    let field_env = |name: &str, path: &str| EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let port = |name: &str, port: u16| ContainerPort {
        name: Some(name.to_owned()),
        container_port: i32::from(port),
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    };
    let http_probe = |path: &str, period: i32, initial: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("admin".to_owned()),
            ..Default::default()
        }),
        initial_delay_seconds: Some(initial),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Default::default()
    };
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(true),
        ..Default::default()
    };
    let secret_volume = |name: &str, secret: String| Volume {
        name: name.to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            default_mode: Some(SECRET_MODE),
            ..Default::default()
        }),
        ..Default::default()
    };

    let mut mounts = vec![mount("config", CONFIG_DIR)];
    let mut volumes = vec![Volume {
        name: "config".to_owned(),
        config_map: Some(ConfigMapVolumeSource {
            name: pods.config_map.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }];
    for m in &pods.secrets {
        mounts.push(mount(&m.volume, &m.path));
        let mut volume = secret_volume(&m.volume, m.secret.clone());
        if m.optional
            && let Some(source) = volume.secret.as_mut()
        {
            source.optional = Some(true);
        }
        volumes.push(volume);
    }
    mounts.push(VolumeMount {
        name: "tmp".to_owned(),
        mount_path: "/tmp".to_owned(),
        ..Default::default()
    });
    volumes.push(Volume {
        name: "tmp".to_owned(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity("64Mi".to_owned())),
            ..Default::default()
        }),
        ..Default::default()
    });

    let container = Container {
        name: "smtp-node".to_owned(),
        image: Some(config.node_image.clone()),
        image_pull_policy: Some("IfNotPresent".to_owned()),
        args: Some({
            let mut args = vec![
                "--config".to_owned(),
                format!("{CONFIG_DIR}/{NODE_CONFIG_KEY}"),
            ];
            if config.bind_pod_ip {
                // Expanded by the kubelet from the container's POD_IP env var.
                args.extend(["--listen-ip".to_owned(), "$(POD_IP)".to_owned()]);
            }
            args
        }),
        env: Some({
            let mut env = vec![
                field_env("POD_IP", "status.podIP"),
                field_env("POD_NAME", "metadata.name"),
                field_env("POD_NAMESPACE", "metadata.namespace"),
                EnvVar {
                    name: kubemail_telemetry::LOG_FORMAT_ENV.to_owned(),
                    value: Some("json".to_owned()),
                    ..Default::default()
                },
            ];
            if let Some(endpoint) = &config.otlp_endpoint {
                let var = |name: &str, value: &str| EnvVar {
                    name: name.to_owned(),
                    value: Some(value.to_owned()),
                    ..Default::default()
                };
                env.push(var("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint));
                env.push(var("OTEL_SERVICE_NAME", "kubemail-smtp-node"));
            }
            env
        }),
        ports: Some({
            let mut ports = vec![
                port("smtp", SMTP_PORT),
                port("submission", SUBMISSION_PORT),
                port("submissions", SUBMISSIONS_PORT),
                port("admin", ADMIN_PORT),
            ];
            if node.mta_sts_server.is_some() {
                ports.push(port("mta-sts", MTA_STS_PORT));
            }
            ports
        }),
        readiness_probe: Some(http_probe("/readyz", 5, 0)),
        liveness_probe: Some(http_probe("/healthz", 10, 10)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRE_STOP_SLEEP_SECONDS,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        ..Default::default()
    };

    Ok(Deployment {
        metadata,
        spec: Some(DeploymentSpec {
            replicas: Some(pods.replicas),
            selector: LabelSelector {
                match_labels: Some(pods.selector.clone()),
                ..Default::default()
            },
            // Surge first: a rolling update never lowers the number of nodes taking mail.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pods.labels.clone()),
                    annotations: (!pods.annotations.is_empty()).then(|| pods.annotations.clone()),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(grace_seconds),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(NODE_UID),
                        run_as_group: Some(NODE_UID),
                        fs_group: Some(NODE_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    node_selector: (!shape.node_selector.is_empty())
                        .then(|| shape.node_selector.clone()),
                    tolerations: (!shape.tolerations.is_empty()).then(|| shape.tolerations.clone()),
                    affinity: shape.affinity.clone(),
                    priority_class_name: shape.priority_class_name.clone(),
                    image_pull_secrets: (!shape.image_pull_secrets.is_empty()).then(|| {
                        shape
                            .image_pull_secrets
                            .iter()
                            .map(|r| LocalObjectReference {
                                name: r.name.clone(),
                            })
                            .collect()
                    }),
                    topology_spread_constraints: topology_spread(&shape, &pods.selector),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The pods' topology spread: the default over [`DEFAULT_SPREAD_KEYS`], none for an explicit
/// empty list, or the constraints given, each without a `labelSelector` selecting these pods.
fn topology_spread(
    shape: &PodShape,
    selector: &BTreeMap<String, String>,
) -> Option<Vec<TopologySpreadConstraint>> {
    let own_pods = || LabelSelector {
        match_labels: Some(selector.clone()),
        ..Default::default()
    };
    let constraints: Vec<TopologySpreadConstraint> = match &shape.topology_spread_constraints {
        None => DEFAULT_SPREAD_KEYS
            .iter()
            .map(|key| TopologySpreadConstraint {
                max_skew: 1,
                topology_key: (*key).to_owned(),
                // Soft: a single-node or single-zone cluster still runs every replica.
                when_unsatisfiable: "ScheduleAnyway".to_owned(),
                label_selector: Some(own_pods()),
                // Spread each rollout's ReplicaSet on its own, so the old pods being
                // replaced do not skew where the new ones go.
                match_label_keys: Some(vec!["pod-template-hash".to_owned()]),
                ..Default::default()
            })
            .collect(),
        Some(given) => given
            .iter()
            .cloned()
            .map(|mut c| {
                c.label_selector.get_or_insert_with(own_pods);
                c
            })
            .collect(),
    };
    (!constraints.is_empty()).then_some(constraints)
}

/// The node container's requests and limits: `wanted` (from `spec.pod.resources`) merged
/// over the defaults, whose memory limit is the node's message memory budget plus
/// [`NODE_BASE_MEMORY`]. Refused: a quantity Kubernetes cannot read, a memory limit below
/// that sum (the node would be OOM-killed before its budget makes it refuse mail), and a
/// request above its limit. A default request above a limit given is lowered to the limit.
fn resources(
    node: &NodeConfig,
    wanted: Option<&ResourceRequirements>,
) -> Result<ResourceRequirements, BuildError> {
    let budget = node
        .limits
        .message_bytes_in_memory
        .map_or(kubemail_config::DEFAULT_MESSAGE_BYTES_IN_MEMORY, |b| b.0);
    let needed = budget + NODE_BASE_MEMORY;
    let needed_mib = needed.div_ceil(1 << 20);
    let given_requests = wanted.and_then(|w| w.requests.clone()).unwrap_or_default();
    let given_limits = wanted.and_then(|w| w.limits.clone()).unwrap_or_default();
    let value = |field: &str, name: &str, q: &Quantity| {
        parse_quantity(&q.0).ok_or_else(|| {
            BuildError::PodResources(format!(
                "spec.pod.resources.{field}.{name} ({:?}) is not a Kubernetes quantity such as 512Mi, 1Gi or 250m",
                q.0
            ))
        })
    };
    for (name, q) in &given_requests {
        value("requests", name, q)?;
    }
    for (name, q) in &given_limits {
        value("limits", name, q)?;
    }

    let mut requests = BTreeMap::from([
        ("cpu".to_owned(), Quantity(DEFAULT_CPU_REQUEST.to_owned())),
        (
            "memory".to_owned(),
            Quantity(DEFAULT_MEMORY_REQUEST.to_owned()),
        ),
    ]);
    requests.extend(given_requests.clone());
    let mut limits = BTreeMap::from([("memory".to_owned(), Quantity(format!("{needed_mib}Mi")))]);
    limits.extend(given_limits);

    if let Some(limit) = limits.get("memory")
        && value("limits", "memory", limit)? < needed as f64
    {
        return Err(BuildError::PodResources(format!(
            "spec.pod.resources.limits.memory ({}) is below {needed_mib}Mi: the node keeps up to {}Mi of message data in memory (4 times spec.limits.maxMessageSize, at least 256Mi, or the site's limits.messageBytesInMemory) and needs {}Mi besides; raise the limit or lower spec.limits.maxMessageSize",
            limit.0,
            budget.div_ceil(1 << 20),
            NODE_BASE_MEMORY >> 20
        )));
    }
    for (name, request) in &mut requests {
        let Some(limit) = limits.get(name) else {
            continue;
        };
        if value("requests", name, request)? <= value("limits", name, limit)? {
            continue;
        }
        if given_requests.contains_key(name) {
            return Err(BuildError::PodResources(format!(
                "spec.pod.resources.requests.{name} ({}) is above limits.{name} ({}); Kubernetes refuses a request above its limit",
                request.0, limit.0
            )));
        }
        *request = limit.clone();
    }
    Ok(ResourceRequirements {
        requests: Some(requests),
        limits: Some(limits),
        claims: wanted.and_then(|w| w.claims.clone()),
    })
}

/// The value of a Kubernetes quantity (`512Mi`, `1.5G`, `250m`, `1e9`) in base units, or
/// `None` when Kubernetes would not read it. A float is exact enough to compare limits.
fn parse_quantity(text: &str) -> Option<f64> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits_end);
    let unsigned = number.strip_prefix(['+', '-']).unwrap_or(number);
    if unsigned.is_empty()
        || unsigned == "."
        || unsigned.contains(['+', '-'])
        || unsigned.matches('.').count() > 1
    {
        return None;
    }
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent => {
            let power: i32 = exponent.strip_prefix(['e', 'E'])?.parse().ok()?;
            10f64.powi(power)
        }
    };
    Some(number * factor)
}

/// One pod at a time may be disrupted: drains proceed, and the rest keep receiving mail.
pub(super) fn pdb(v: &ValidatedDomain, metadata: ObjectMeta) -> PodDisruptionBudget {
    node_pdb(selector_labels(&v.name), metadata)
}

/// The PodDisruptionBudget of the nodes selected by `selector`.
pub fn node_pdb(selector: BTreeMap<String, String>, metadata: ObjectMeta) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::parse_quantity;

    #[test]
    fn quantities_read_as_kubernetes_reads_them() {
        for (text, value) in [
            ("512Mi", 512.0 * 1024.0 * 1024.0),
            ("1.5Gi", 1.5 * 1024.0 * 1024.0 * 1024.0),
            ("250m", 0.25),
            ("2", 2.0),
            ("1k", 1e3),
            ("1G", 1e9),
            ("1E", 1e18),
            ("1e9", 1e9),
            ("5E-1", 0.5),
            ("+3", 3.0),
            ("536870912", 536_870_912.0),
        ] {
            assert_eq!(parse_quantity(text), Some(value), "{text}");
        }
        for bad in ["", "Mi", "1.2.3", "1MB", "1e", "1 Gi", "lots", "--1", "."] {
            assert_eq!(parse_quantity(bad), None, "{bad}");
        }
    }
}
