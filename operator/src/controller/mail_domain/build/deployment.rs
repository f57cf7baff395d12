//! The Deployment of a domain's SMTP nodes and the PodDisruptionBudget that keeps all but
//! one of them up during voluntary disruptions.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile,
    SecretVolumeSource, SecurityContext, SleepAction, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use kubemail_config::NodeConfig;

use super::BuildConfig;
use crate::controller::mail_domain::names::{
    self, ADMIN_PORT, CHECKSUM_ANNOTATION, CONFIG_DIR, DKIM_DIR, MTA_STS_PORT, NODE_CONFIG_KEY,
    RELAY_DIR, SMTP_PORT, SUBMISSION_PORT, SUBMISSIONS_PORT, TLS_DIR, USERS_DIR, labels,
    selector_labels,
};
use crate::controller::mail_domain::validate::{RelayResolution, ValidatedDomain};

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

/// The Deployment of the domain's nodes; `checksum` rolls the pods when what they read at
/// start-up changes.
pub(super) fn deployment(
    v: &ValidatedDomain,
    metadata: ObjectMeta,
    checksum: &str,
    node: &NodeConfig,
    config: &BuildConfig,
) -> Deployment {
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

    let mut mounts = vec![
        mount("config", CONFIG_DIR),
        mount("tls", TLS_DIR),
        mount("dkim", DKIM_DIR),
    ];
    let mut volumes = vec![
        Volume {
            name: "config".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::node_config(&v.name),
                ..Default::default()
            }),
            ..Default::default()
        },
        secret_volume("tls", names::tls_secret(&v.name)),
        secret_volume("dkim", names::dkim_secret(&v.name)),
    ];
    if v.users.is_some() {
        mounts.push(mount("users", USERS_DIR));
        volumes.push(secret_volume("users", names::users_secret(&v.name)));
    }
    if let RelayResolution::Resolved { spec, .. } = &v.relay
        && let Some(auth) = &spec.auth
    {
        mounts.push(mount("relay", RELAY_DIR));
        volumes.push(secret_volume("relay", auth.secret_ref.name.clone()));
    }
    if config.nats_auth || config.nats_tls {
        mounts.push(mount("nats", names::NATS_DIR));
        volumes.push(secret_volume("nats", names::nats_secret(&v.name)));
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
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("100m".to_owned())),
                ("memory".to_owned(), Quantity("128Mi".to_owned())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_owned(),
                Quantity(memory_limit(node)),
            )])),
            ..Default::default()
        }),
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

    let pod_labels = labels(&v.name);
    Deployment {
        metadata,
        spec: Some(DeploymentSpec {
            replicas: Some(v.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&v.name)),
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
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([(
                        CHECKSUM_ANNOTATION.to_owned(),
                        checksum.to_owned(),
                    )])),
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
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One pod at a time may be disrupted: drains proceed, and the rest keep receiving mail.
/// The container's memory limit: the node's message memory budget plus the rest.
fn memory_limit(node: &NodeConfig) -> String {
    let budget = node
        .limits
        .message_bytes_in_memory
        .map_or(kubemail_config::DEFAULT_MESSAGE_BYTES_IN_MEMORY, |b| b.0);
    format!("{}Mi", (budget + NODE_BASE_MEMORY).div_ceil(1 << 20))
}

pub(super) fn pdb(v: &ValidatedDomain, metadata: ObjectMeta) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&v.name)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}
