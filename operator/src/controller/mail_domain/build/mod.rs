//! Build: the desired children of a MailDomain, computed from the validated spec, the
//! provisioned key material and a few observed facts (load-balancer addresses, installed CRDs).
//! Pure: no client, no clock (the time comes in as `now`), no randomness, so the same inputs
//! give byte-identical objects and a second reconcile writes nothing.
//!
//! ```text
//! MailDomain example-com ─┬─ ConfigMap  example-com-config   node.yaml (smtp-node's NodeConfig)
//!                         ├─ Secret     example-com-dkim     <selector>.pem, schedule annotation
//!                         ├─ Secret     example-com-tls      tls.crt/tls.key/ca.crt (operator CA)
//!                         │  or Certificate example-com      cert-manager, writes example-com-tls
//!                         ├─ Secret     example-com-users-hashed  users file (argon2), if submission
//!                         ├─ Deployment example-com          smtp-node pods
//!                         ├─ Service    example-com          25/465/587
//!                         ├─ PDB        example-com          maxUnavailable 1
//!                         ├─ ConfigMap  example-com-dns      zone fragment (+ mta-sts.txt)
//!                         └─ DNSEndpoint example-com         external-dns, if its CRD exists
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile,
    Secret, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, SleepAction,
    Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use kube::api::{ApiResource, DynamicObject, ObjectMeta};
use kubemail_smtp_node::config::NodeConfig;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::provision::{Provisioned, TlsMaterial};
use super::validate::{RelayResolution, TlsSource, ValidatedDomain};
use crate::certs::{CA_CERT_KEY, TLS_CERT_KEY, TLS_KEY_KEY};
use crate::controller::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::crd::mail_domain::{
    DnsRecord, ForwardProtocol, ForwardTls, IssuerKind, MailDomain, ServiceType,
};
use crate::crd::relay::RelayTls;
use crate::dkim::{self, STATE_ANNOTATION};
use crate::dns_records::{self, DnsInputs};
use crate::timestamps::UnixSeconds;
use crate::users::{USERNAME_KEY_KEY, USERS_FILE_KEY};

/// Pod template annotation whose change rolls the pods: a digest of everything the node reads
/// only at start-up.
pub const CHECKSUM_ANNOTATION: &str = "kubemail.io/config-checksum";
/// DKIM Secret annotation: the selectors the nodes sign with now.
pub const SIGNING_ANNOTATION: &str = "kubemail.io/dkim-signing";
/// Label naming the MailDomain a child belongs to.
pub const DOMAIN_LABEL: &str = "kubemail.io/maildomain";
/// Key of the node configuration in its ConfigMap.
pub const NODE_CONFIG_KEY: &str = "node.yaml";
/// Key of the zone fragment in the DNS ConfigMap.
pub const ZONE_KEY: &str = "zone";
/// Key of the MTA-STS policy file in the DNS ConfigMap.
pub const MTA_STS_KEY: &str = "mta-sts.txt";

/// Container ports: unprivileged, so the pods run as non-root without `NET_BIND_SERVICE`;
/// the Service maps 25/465/587 onto them.
pub const SMTP_PORT: i32 = 2525;
pub const SUBMISSION_PORT: i32 = 2587;
pub const SUBMISSIONS_PORT: i32 = 2465;
/// The node's admin HTTP port (`/healthz`, `/readyz`, `/metrics`).
pub const ADMIN_PORT: i32 = 8080;
/// Where the pods mount what the operator renders.
pub const CONFIG_DIR: &str = "/etc/kubemail/config";
pub const TLS_DIR: &str = "/etc/kubemail/tls";
pub const DKIM_DIR: &str = "/etc/kubemail/dkim";
pub const USERS_DIR: &str = "/etc/kubemail/users";
pub const RELAY_DIR: &str = "/etc/kubemail/relay";
/// Non-root user and group of the node (the distroless `nonroot` ids).
const NODE_UID: i64 = 65532;
/// Seconds the pod keeps serving after SIGTERM is decided, so endpoint removal reaches every
/// load balancer before the node stops accepting.
const PRE_STOP_SLEEP_SECONDS: i64 = 5;
/// Slack on top of the node's drain deadline before the kubelet kills it.
const GRACE_SLACK_SECONDS: i64 = 10;
/// Secret files readable by owner and group (fsGroup) only.
const SECRET_MODE: i32 = 0o440;

/// Names of the children, one place for all of them.
pub mod names {
    pub fn node_config(md: &str) -> String {
        format!("{md}-config")
    }
    pub fn dkim_secret(md: &str) -> String {
        format!("{md}-dkim")
    }
    pub fn tls_secret(md: &str) -> String {
        format!("{md}-tls")
    }
    pub fn users_secret(md: &str) -> String {
        // Not `<md>-users`: that is the natural name of the user's own source Secret.
        format!("{md}-users-hashed")
    }
    pub fn dns_config(md: &str) -> String {
        format!("{md}-dns")
    }
    pub fn deployment(md: &str) -> String {
        md.to_owned()
    }
    pub fn service(md: &str) -> String {
        md.to_owned()
    }
    pub fn pdb(md: &str) -> String {
        md.to_owned()
    }
    pub fn certificate(md: &str) -> String {
        md.to_owned()
    }
    pub fn dns_endpoint(md: &str) -> String {
        md.to_owned()
    }
}

/// Operator-wide settings that shape the children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildConfig {
    /// SMTP node image.
    pub node_image: String,
    /// Address the node binds (`0.0.0.0` in a pod with its own network namespace).
    pub listen_host: String,
    /// Start nodes with `--listen-ip $(POD_IP)`: for clusters whose pods share one network
    /// namespace (the local process-kubelet cluster), so replicas do not fight over ports.
    pub bind_pod_ip: bool,
    /// Site-wide settings merged into every node config (see [`load_node_overlay`]).
    pub node_overlay: Option<serde_json::Value>,
    /// OTLP endpoint passed to the nodes as `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub otlp_endpoint: Option<String>,
    /// NATS URL(s) the nodes use.
    pub nats_url: String,
    /// JetStream stream of the queue.
    pub nats_stream: String,
    /// Queue subjects are `<prefix>.<domain>`.
    pub nats_subject_prefix: String,
}

/// Observed facts the children depend on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Load-balancer addresses of the Service.
    pub addresses: Vec<IpAddr>,
    /// external-dns's DNSEndpoint CRD is installed.
    pub external_dns: bool,
}

/// Every desired child plus the records they carry.
#[derive(Debug, Clone)]
pub struct Children {
    pub node_config: ConfigMap,
    pub dkim_secret: Secret,
    /// Operator-CA certificate; `None` with cert-manager.
    pub tls_secret: Option<Secret>,
    /// cert-manager Certificate; `None` with the operator CA.
    pub certificate: Option<DynamicObject>,
    pub users_secret: Option<Secret>,
    pub deployment: Deployment,
    pub service: Service,
    pub pdb: PodDisruptionBudget,
    pub dns_config: ConfigMap,
    pub dns_endpoint: Option<DynamicObject>,
    pub dns_records: Vec<DnsRecord>,
    /// Selectors the nodes sign with now.
    pub signing_selectors: Vec<String>,
    pub checksum: String,
}

/// Why the children cannot be built (a spec the node would refuse).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("the node configuration would be invalid: {0}")]
    NodeConfig(String),
    #[error("the MailDomain has no uid yet")]
    MissingUid,
}

/// The API resource of cert-manager's `Certificate`.
pub fn certificate_resource() -> ApiResource {
    ApiResource {
        group: "cert-manager.io".to_owned(),
        version: "v1".to_owned(),
        api_version: "cert-manager.io/v1".to_owned(),
        kind: "Certificate".to_owned(),
        plural: "certificates".to_owned(),
    }
}

/// The API resource of external-dns's `DNSEndpoint`.
pub fn dns_endpoint_resource() -> ApiResource {
    ApiResource {
        group: "externaldns.k8s.io".to_owned(),
        version: "v1alpha1".to_owned(),
        api_version: "externaldns.k8s.io/v1alpha1".to_owned(),
        kind: "DNSEndpoint".to_owned(),
        plural: "dnsendpoints".to_owned(),
    }
}

/// Labels every child carries.
pub fn labels(md_name: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(md_name);
    l.insert(
        "app.kubernetes.io/component".to_owned(),
        "smtp-node".to_owned(),
    );
    l.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
    l.insert(DOMAIN_LABEL.to_owned(), md_name.to_owned());
    l
}

/// Labels that select a domain's pods.
pub fn selector_labels(md_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "kubemail-smtp-node".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), md_name.to_owned()),
    ])
}

/// Load-balancer IP addresses of a Service, sorted. Host-name ingress points (some clouds)
/// cannot be an MX target's A record and are left out.
pub fn load_balancer_addresses(service: Option<&Service>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = service
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Builds every child.
pub fn build(
    md: &MailDomain,
    v: &ValidatedDomain,
    p: &Provisioned,
    observed: &Observed,
    config: &BuildConfig,
    now: UnixSeconds,
) -> Result<Children, BuildError> {
    let owner = owner_reference(md).ok_or(BuildError::MissingUid)?;
    let meta = |name: String| ObjectMeta {
        name: Some(name),
        namespace: Some(v.namespace.clone()),
        labels: Some(labels(&v.name)),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    };

    let state = dkim::state_json(&p.dkim.keys);
    let records: Vec<dkim::KeyRecord> = p.dkim.keys.iter().map(|k| k.record.clone()).collect();
    let signing: Vec<String> = dkim::signing_keys(&records, &v.dkim.algorithms, now)
        .into_iter()
        .map(|k| k.selector.clone())
        .collect();
    let (node_value, node) = node_config(v, p.users_file.is_some(), &signing, config)?;
    let node_yaml = format!(
        "# Rendered by kubemail-operator from MailDomain {}/{}; do not edit.\n\
         # Settings not written here take the node's defaults.\n{}",
        v.namespace,
        v.name,
        serde_yaml::to_string(&node_value).map_err(|e| BuildError::NodeConfig(e.to_string()))?
    );
    let checksum = {
        let mut h = Sha256::new();
        for part in [
            node_yaml.as_str(),
            p.users_file.as_deref().unwrap_or_default(),
            state.as_str(),
            &signing.join(","),
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        h.finalize().iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    };

    let node_config = ConfigMap {
        metadata: meta(names::node_config(&v.name)),
        data: Some(BTreeMap::from([(NODE_CONFIG_KEY.to_owned(), node_yaml)])),
        ..Default::default()
    };

    let mut dkim_meta = meta(names::dkim_secret(&v.name));
    dkim_meta.annotations = Some(BTreeMap::from([
        (STATE_ANNOTATION.to_owned(), state),
        (SIGNING_ANNOTATION.to_owned(), signing.join(",")),
    ]));
    let dkim_secret = Secret {
        metadata: dkim_meta,
        type_: Some("Opaque".to_owned()),
        data: Some(
            p.dkim
                .keys
                .iter()
                .map(|k| {
                    (
                        dkim::secret_key(&k.record.selector),
                        ByteString(k.private_key.expose().as_bytes().to_vec()),
                    )
                })
                .collect(),
        ),
        ..Default::default()
    };

    let (tls_secret, certificate) = match (&v.tls, &p.tls) {
        (
            TlsSource::OperatorCa,
            TlsMaterial::OperatorCa {
                leaf, ca_cert_pem, ..
            },
        ) => (
            Some(Secret {
                metadata: meta(names::tls_secret(&v.name)),
                type_: Some("kubernetes.io/tls".to_owned()),
                data: Some(BTreeMap::from([
                    (
                        TLS_CERT_KEY.to_owned(),
                        ByteString(leaf.cert_pem.clone().into_bytes()),
                    ),
                    (
                        TLS_KEY_KEY.to_owned(),
                        ByteString(leaf.key_pem.expose().as_bytes().to_vec()),
                    ),
                    (
                        CA_CERT_KEY.to_owned(),
                        ByteString(ca_cert_pem.clone().into_bytes()),
                    ),
                ])),
                ..Default::default()
            }),
            None,
        ),
        (TlsSource::CertManager(issuer), _) => {
            let mut cert =
                DynamicObject::new(&names::certificate(&v.name), &certificate_resource())
                    .within(&v.namespace);
            cert.metadata = meta(names::certificate(&v.name));
            cert.data = json!({
                "spec": {
                    "secretName": names::tls_secret(&v.name),
                    "commonName": v.hostname,
                    "dnsNames": [v.hostname],
                    "issuerRef": {
                        "name": issuer.name,
                        "kind": match issuer.kind {
                            IssuerKind::Issuer => "Issuer",
                            IssuerKind::ClusterIssuer => "ClusterIssuer",
                        },
                        "group": issuer.group,
                    },
                    "privateKey": { "algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always" },
                    "usages": ["digital signature", "server auth"],
                    "secretTemplate": { "labels": labels(&v.name) },
                }
            });
            (None, Some(cert))
        }
        // validate and provision agree on the source; a mismatch cannot happen.
        (TlsSource::OperatorCa, TlsMaterial::CertManager { .. }) => (None, None),
    };

    let users_secret = p.users_file.as_ref().map(|text| {
        let mut data = BTreeMap::from([(
            USERS_FILE_KEY.to_owned(),
            ByteString(text.clone().into_bytes()),
        )]);
        if let Some(key) = &p.username_key {
            data.insert(
                USERNAME_KEY_KEY.to_owned(),
                ByteString(key.clone().into_bytes()),
            );
        }
        Secret {
            metadata: meta(names::users_secret(&v.name)),
            type_: Some("Opaque".to_owned()),
            data: Some(data),
            ..Default::default()
        }
    });

    let grace = i64::try_from(node.shutdown.drain_timeout.0.as_secs()).unwrap_or(i64::MAX / 2)
        + PRE_STOP_SLEEP_SECONDS
        + GRACE_SLACK_SECONDS;
    let deployment = deployment(
        v,
        meta(names::deployment(&v.name)),
        &checksum,
        grace,
        config,
    );
    let service = service(v, meta(names::service(&v.name)));
    let pdb = PodDisruptionBudget {
        metadata: meta(names::pdb(&v.name)),
        spec: Some(PodDisruptionBudgetSpec {
            // One pod at a time: drains proceed, and the rest keep receiving mail.
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&v.name)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };

    let relay_include = match &v.relay {
        RelayResolution::Resolved { spf_include, .. } => spf_include.as_deref(),
        _ => None,
    };
    let published = p.dkim.published();
    let dns_records = dns_records::records(&DnsInputs {
        domain: &v.domain,
        hostname: &v.hostname,
        ttl: v.ttl,
        addresses: &observed.addresses,
        spf: &v.spf,
        relay_include,
        dkim_keys: &published,
        dmarc: &v.dmarc,
        mta_sts: v.mta_sts.as_ref(),
        tls_rpt: v.tls_rpt.as_deref(),
    });
    let mut dns_data = BTreeMap::from([(
        ZONE_KEY.to_owned(),
        dns_records::zone_fragment(
            &v.domain,
            &format!("{}/{}", v.namespace, v.name),
            &dns_records,
        ),
    )]);
    if let Some(sts) = &v.mta_sts {
        dns_data.insert(
            MTA_STS_KEY.to_owned(),
            dns_records::mta_sts_policy(sts, &v.hostname),
        );
    }
    let dns_config = ConfigMap {
        metadata: meta(names::dns_config(&v.name)),
        data: Some(dns_data),
        ..Default::default()
    };
    let dns_endpoint = observed.external_dns.then(|| {
        let mut ep = DynamicObject::new(&names::dns_endpoint(&v.name), &dns_endpoint_resource())
            .within(&v.namespace);
        ep.metadata = meta(names::dns_endpoint(&v.name));
        ep.data = json!({ "spec": dns_records::dns_endpoints(&dns_records) });
        ep
    });

    Ok(Children {
        node_config,
        dkim_secret,
        tls_secret,
        certificate,
        users_secret,
        deployment,
        service,
        pdb,
        dns_config,
        dns_endpoint,
        dns_records,
        signing_selectors: signing,
        checksum,
    })
}

/// The node configuration: what the MailDomain decides, as the JSON/YAML the operator writes
/// (the node fills in its own defaults for the rest when it starts), and the same text parsed
/// into smtp-node's own [`NodeConfig`] and checked by the node's own validation.
pub fn node_config(
    v: &ValidatedDomain,
    has_users: bool,
    signing: &[String],
    config: &BuildConfig,
) -> Result<(serde_json::Value, NodeConfig), BuildError> {
    let host = if config.listen_host.contains(':') {
        format!("[{}]", config.listen_host)
    } else {
        config.listen_host.clone()
    };
    let mut domain = json!({
        "name": v.domain,
        "recipients": v.inbound.recipients,
        "catchAll": v.inbound.catch_all,
        "limits": {
            "maxMessageSize": v.limits.max_message_size,
            "maxRecipients": v.limits.max_recipients,
            "messagesPerMinutePerUser": v.limits.messages_per_minute_per_user,
        },
        "dkim": {
            "keys": signing
                .iter()
                .map(|s| json!({ "selector": s, "keyFile": format!("{DKIM_DIR}/{}", dkim::secret_key(s)) }))
                .collect::<Vec<_>>(),
        },
    });
    if has_users {
        domain["usersFile"] = json!(format!("{USERS_DIR}/{USERS_FILE_KEY}"));
    }
    if let Some(forward) = &v.inbound.forward {
        domain["inbound"] = json!({
            "host": forward.host,
            "port": forward.port,
            "protocol": match forward.protocol {
                ForwardProtocol::Lmtp => "lmtp",
                ForwardProtocol::Smtp => "smtp",
            },
            "tls": match forward.tls {
                ForwardTls::Opportunistic => "opportunistic",
                ForwardTls::Required => "required",
                ForwardTls::None => "none",
            },
        });
    }
    let mut value = json!({
        "hostname": v.hostname,
        "listeners": [
            { "name": "mx", "kind": "mx", "address": format!("{host}:{SMTP_PORT}") },
            { "name": "submission", "kind": "submission", "address": format!("{host}:{SUBMISSION_PORT}") },
            { "name": "submissions", "kind": "implicitTls", "address": format!("{host}:{SUBMISSIONS_PORT}") },
        ],
        "tls": {
            "certFile": format!("{TLS_DIR}/{TLS_CERT_KEY}"),
            "keyFile": format!("{TLS_DIR}/{TLS_KEY_KEY}"),
        },
        "nats": {
            "url": config.nats_url,
            "stream": config.nats_stream,
            "subjectPrefix": config.nats_subject_prefix,
        },
        "admin": { "address": format!("{host}:{ADMIN_PORT}") },
    });
    if has_users {
        // Set before the overlay, so a site-wide `auth` section can still choose its own key.
        value["auth"] = json!({ "usernameKeyFile": format!("{USERS_DIR}/{USERNAME_KEY_KEY}") });
    }
    if let Some(overlay) = &config.node_overlay {
        merge_json(&mut value, overlay);
    }
    match &v.relay {
        RelayResolution::Direct => {}
        RelayResolution::Resolved { name, spec, .. } => {
            let mut relay = json!({
                "name": name,
                "host": spec.host,
                "port": spec.port,
                "tls": match spec.tls {
                    RelayTls::StartTlsRequired => "startTlsRequired",
                    RelayTls::Implicit => "implicit",
                    RelayTls::Opportunistic => "opportunistic",
                },
                "verifyCertificate": true,
            });
            if spec.auth.is_some() {
                relay["auth"] = json!({
                    "usernameFile": format!("{RELAY_DIR}/username"),
                    "passwordFile": format!("{RELAY_DIR}/password"),
                });
            }
            if let Some(rate) = &spec.rate_limit {
                // The Relay's limit is for all nodes together; each node gets its share.
                let replicas = v.replicas.max(1);
                relay["messagesPerSecond"] =
                    json!((rate.messages_per_second + replicas - 1) / replicas);
            }
            domain["relay"] = relay;
        }
        // Outbound mail must not go direct when a relay was asked for: accept and queue it,
        // deliver nothing until the Relay is usable.
        RelayResolution::NotFound { .. } | RelayResolution::NotReady { .. } => {
            value["delivery"]["enabled"] = json!(false);
        }
    }
    value["domains"] = json!([domain]);
    let node: NodeConfig =
        serde_json::from_value(value.clone()).map_err(|e| BuildError::NodeConfig(e.to_string()))?;
    node.validate()
        .map_err(|e| BuildError::NodeConfig(e.to_string()))?;
    Ok((value, node))
}

/// Why a node config overlay file was refused.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("cannot read it")]
    Read(#[source] std::io::Error),
    #[error("it is not valid YAML")]
    Parse(#[source] serde_yaml::Error),
    #[error("it must be a YAML mapping of node config fields")]
    NotAMapping,
    #[error("it may not set `{0}`: that comes from each MailDomain and the operator's flags")]
    ReservedField(&'static str),
}

/// Reads the site-wide node config overlay (`--node-config-overlay`). Fields that each
/// MailDomain or the operator's flags own are refused here, at start-up, rather than silently
/// overridden; everything else is checked by the node's own validation when rendered.
pub fn load_node_overlay(path: &std::path::Path) -> Result<serde_json::Value, OverlayError> {
    let text = std::fs::read_to_string(path).map_err(OverlayError::Read)?;
    parse_node_overlay(&text)
}

fn parse_node_overlay(text: &str) -> Result<serde_json::Value, OverlayError> {
    let value: serde_json::Value = serde_yaml::from_str(text).map_err(OverlayError::Parse)?;
    let serde_json::Value::Object(map) = &value else {
        return Err(OverlayError::NotAMapping);
    };
    for reserved in ["domains", "hostname", "listeners", "tls", "nats"] {
        if map.contains_key(reserved) {
            return Err(OverlayError::ReservedField(reserved));
        }
    }
    Ok(value)
}

/// Deep merge: objects merge key by key, anything else in `overlay` replaces `base`.
fn merge_json(base: &mut serde_json::Value, overlay: &serde_json::Value) {
    match (base, overlay) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                merge_json(b.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

fn deployment(
    v: &ValidatedDomain,
    metadata: ObjectMeta,
    checksum: &str,
    grace_seconds: i64,
    config: &BuildConfig,
) -> Deployment {
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
    let port = |name: &str, port: i32| ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
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
                    name: kubemail_smtp_node::telemetry::LOG_FORMAT_ENV.to_owned(),
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
        ports: Some(vec![
            port("smtp", SMTP_PORT),
            port("submission", SUBMISSION_PORT),
            port("submissions", SUBMISSIONS_PORT),
            port("admin", ADMIN_PORT),
        ]),
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

fn service(v: &ValidatedDomain, mut metadata: ObjectMeta) -> Service {
    if !v.service_annotations.is_empty() {
        metadata.annotations = Some(v.service_annotations.clone());
    }
    let port = |name: &str, port: i32| ServicePort {
        name: Some(name.to_owned()),
        port,
        protocol: Some("TCP".to_owned()),
        target_port: Some(IntOrString::String(name.to_owned())),
        ..Default::default()
    };
    let (type_, external_policy) = match v.service_type {
        // Local keeps the client address, which SPF checks and abuse limits depend on.
        ServiceType::LoadBalancer => ("LoadBalancer", Some("Local".to_owned())),
        ServiceType::NodePort => ("NodePort", Some("Local".to_owned())),
        ServiceType::ClusterIP => ("ClusterIP", None),
    };
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(type_.to_owned()),
            selector: Some(selector_labels(&v.name)),
            external_traffic_policy: external_policy,
            ports: Some(vec![
                port("smtp", 25),
                port("submissions", 465),
                port("submission", 587),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The owner reference every child carries: the controller reference, blocking foreground
/// deletion of the MailDomain until the child is gone (needs `update` on
/// `maildomains/finalizers` in RBAC).
pub fn owner_reference(md: &MailDomain) -> Option<OwnerReference> {
    let mut owner = md.controller_owner_ref(&())?;
    owner.block_owner_deletion = Some(true);
    Some(owner)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Secret;
    use kubemail_smtp_node::config::ListenerKind;

    use super::*;
    use crate::certs::IssuedCert;
    use crate::controller::mail_domain::dereference::Dereferenced;
    use crate::controller::mail_domain::validate::validate;
    use crate::crd::mail_domain::DkimAlgorithm;
    use crate::dkim::{DkimKey, DkimKeys, KeyRecord, PrivateKeyPem};

    const NOW: i64 = 1_800_000_000;

    fn config() -> BuildConfig {
        BuildConfig {
            node_image: "kubemail/smtp-node:0.1.0".into(),
            listen_host: "0.0.0.0".into(),
            bind_pod_ip: false,
            node_overlay: None,
            otlp_endpoint: None,
            nats_url: "nats://nats.kubemail-system:4222".into(),
            nats_stream: "KUBEMAIL".into(),
            nats_subject_prefix: "kubemail.queue".into(),
        }
    }

    fn md(spec: &str) -> MailDomain {
        let mut md: MailDomain = serde_yaml::from_str(&format!(
            "apiVersion: kubemail.io/v1alpha1\nkind: MailDomain\nmetadata: {{name: example-com, namespace: mail, uid: uid-1, generation: 3}}\nspec:\n{spec}"
        ))
        .unwrap();
        md.metadata.generation = Some(3);
        md
    }

    const FULL: &str = "  domain: example.com
  replicas: 2
  spf: { include: [_spf.example.net] }
  dmarc: { policy: quarantine, rua: 'mailto:dmarc@example.com' }
  mtaSts: { mode: enforce }
  tlsRpt: { rua: 'mailto:tls@example.com' }
  inbound: { recipients: [postmaster, bob] }
  submission: { usersSecretRef: { name: example-com-users-src } }
  limits: { maxMessageSize: 10Mi, maxRecipients: 50 }
";

    fn refs() -> Dereferenced {
        Dereferenced {
            users_source: Some(Secret {
                metadata: ObjectMeta {
                    name: Some("example-com-users-src".into()),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([(
                    "alice".to_owned(),
                    ByteString(b"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g".to_vec()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn key(selector: &str, algorithm: DkimAlgorithm, public: &str) -> DkimKey {
        DkimKey {
            record: KeyRecord {
                selector: selector.into(),
                algorithm,
                base: "kubemail1".into(),
                generation: 1,
                created: NOW,
                sign_from: NOW,
                retire_at: None,
            },
            private_key: PrivateKeyPem::new(format!("PEM-{selector}")),
            public_key: public.into(),
        }
    }

    fn provisioned(users: bool) -> Provisioned {
        Provisioned {
            dkim: DkimKeys {
                keys: vec![
                    key("kubemail1", DkimAlgorithm::RsaSha256, "RSAKEY"),
                    key("kubemail1-ed25519", DkimAlgorithm::Ed25519Sha256, "EDKEY"),
                ],
                generated: vec![],
                retired: vec![],
                next_event: None,
            },
            tls: TlsMaterial::OperatorCa {
                leaf: IssuedCert {
                    cert_pem: "LEAF".into(),
                    key_pem: PrivateKeyPem::new("LEAFKEY".into()),
                    not_before: NOW,
                    not_after: NOW + 90 * 86400,
                },
                ca_cert_pem: "CA".into(),
                issued: None,
            },
            users_file: users.then(|| "alice@example.com:$argon2id$x\n".to_owned()),
            username_key: users.then(|| "ab".repeat(32)),
        }
    }

    fn observed() -> Observed {
        Observed {
            addresses: vec![
                "203.0.113.7".parse().unwrap(),
                "2001:db8::7".parse().unwrap(),
            ],
            external_dns: false,
        }
    }

    fn full() -> (MailDomain, ValidatedDomain, Children) {
        let md = md(FULL);
        let v = validate(&md, &refs()).unwrap();
        let c = build(&md, &v, &provisioned(true), &observed(), &config(), NOW).unwrap();
        (md, v, c)
    }

    fn data_text(cm: &ConfigMap, key: &str) -> String {
        cm.data.as_ref().unwrap()[key].clone()
    }

    #[test]
    fn every_child_is_named_labelled_and_owned_by_the_domain() {
        let (_, _, c) = full();
        let metas: Vec<(&str, &ObjectMeta)> = vec![
            ("example-com-config", &c.node_config.metadata),
            ("example-com-dkim", &c.dkim_secret.metadata),
            ("example-com-tls", &c.tls_secret.as_ref().unwrap().metadata),
            (
                "example-com-users-hashed",
                &c.users_secret.as_ref().unwrap().metadata,
            ),
            ("example-com", &c.deployment.metadata),
            ("example-com", &c.service.metadata),
            ("example-com", &c.pdb.metadata),
            ("example-com-dns", &c.dns_config.metadata),
        ];
        for (name, meta) in metas {
            assert_eq!(meta.name.as_deref(), Some(name));
            assert_eq!(
                meta.namespace.as_deref(),
                Some("mail"),
                "{name}: same namespace as its owner"
            );
            let owners = meta.owner_references.as_ref().unwrap();
            assert_eq!(owners.len(), 1);
            let o = &owners[0];
            assert_eq!(
                (o.kind.as_str(), o.name.as_str(), o.uid.as_str()),
                ("MailDomain", "example-com", "uid-1")
            );
            assert_eq!(o.api_version, "kubemail.io/v1alpha1");
            assert_eq!(
                (o.controller, o.block_owner_deletion),
                (Some(true), Some(true)),
                "{name}"
            );
            let labels = meta.labels.as_ref().unwrap();
            assert_eq!(labels[MANAGED_BY_LABEL], "kubemail-operator");
            assert_eq!(labels[DOMAIN_LABEL], "example-com");
        }
        assert!(c.certificate.is_none());
        assert!(c.dns_endpoint.is_none());
    }

    #[test]
    fn node_config_is_the_nodes_own_type_with_the_domain_settings() {
        let (_, _, c) = full();
        let yaml = data_text(&c.node_config, NODE_CONFIG_KEY);
        assert!(
            yaml.starts_with("# Rendered by kubemail-operator from MailDomain mail/example-com")
        );
        let node = NodeConfig::from_yaml(&yaml).unwrap();
        node.validate().unwrap();
        assert_eq!(node.hostname, "mx.example.com");
        let listeners: Vec<(ListenerKind, String)> = node
            .listeners
            .iter()
            .map(|l| (l.kind, l.address.to_string()))
            .collect();
        assert_eq!(
            listeners,
            [
                (ListenerKind::Mx, "0.0.0.0:2525".to_owned()),
                (ListenerKind::Submission, "0.0.0.0:2587".to_owned()),
                (ListenerKind::ImplicitTls, "0.0.0.0:2465".to_owned()),
            ]
        );
        let tls = node.tls.as_ref().unwrap();
        assert_eq!(tls.cert_file.to_str(), Some("/etc/kubemail/tls/tls.crt"));
        assert_eq!(tls.key_file.to_str(), Some("/etc/kubemail/tls/tls.key"));
        assert_eq!(node.nats.url, "nats://nats.kubemail-system:4222");
        assert_eq!(node.nats.stream, "KUBEMAIL");
        assert_eq!(node.admin.address.to_string(), "0.0.0.0:8080");
        let d = &node.domains[0];
        assert_eq!(d.name, "example.com");
        assert_eq!(d.recipients, ["postmaster", "bob"]);
        assert_eq!(
            d.users_file.as_ref().unwrap().to_str(),
            Some("/etc/kubemail/users/users")
        );
        assert_eq!(d.limits.max_message_size.0, 10 << 20);
        assert_eq!(d.limits.max_recipients, 50);
        assert_eq!(d.limits.messages_per_minute_per_user, 60);
        let dkim: Vec<(&str, &str)> = d
            .dkim
            .keys
            .iter()
            .map(|k| (k.selector.as_str(), k.key_file.to_str().unwrap()))
            .collect();
        assert_eq!(
            dkim,
            [
                ("kubemail1", "/etc/kubemail/dkim/kubemail1.pem"),
                (
                    "kubemail1-ed25519",
                    "/etc/kubemail/dkim/kubemail1-ed25519.pem"
                )
            ]
        );
        assert!(d.relay.is_none() && d.inbound.is_none());
        assert!(node.delivery.enabled);
        assert!(
            !yaml.contains("timeouts:"),
            "only what the MailDomain decides is written; the node fills in its defaults"
        );
    }

    fn relay_object(ready: bool) -> crate::crd::Relay {
        serde_json::from_value(json!({
            "apiVersion": "kubemail.io/v1alpha1", "kind": "Relay",
            "metadata": { "name": "sendgrid", "namespace": "mail" },
            "spec": {
                "host": "smtp.sendgrid.net", "port": 587,
                "auth": { "secretRef": { "name": "sendgrid-auth" } },
                "rateLimit": { "messagesPerSecond": 9 }, "spfInclude": "sendgrid.net",
            },
            "status": { "conditions": [{
                "type": "Ready", "status": if ready { "True" } else { "False" },
                "reason": "Valid", "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z",
            }] },
        }))
        .unwrap()
    }

    #[test]
    fn relay_and_inbound_target_are_rendered_and_an_unusable_relay_pauses_delivery() {
        let spec = format!(
            "{FULL}  relayRef: {{ name: sendgrid }}\n  inbound: {{ forward: {{ host: dovecot.mail.svc, port: 24 }} }}\n"
        )
        .replace("  inbound: { recipients: [postmaster, bob] }\n", "");
        let md = md(&spec);
        let mut r = refs();
        r.relay = Some(relay_object(true));
        let v = validate(&md, &r).unwrap();
        let c = build(&md, &v, &provisioned(true), &observed(), &config(), NOW).unwrap();
        let node = NodeConfig::from_yaml(&data_text(&c.node_config, NODE_CONFIG_KEY)).unwrap();
        let d = &node.domains[0];
        let relay = d.relay.as_ref().unwrap();
        assert_eq!(
            (relay.name.as_str(), relay.host.as_str(), relay.port),
            ("sendgrid", "smtp.sendgrid.net", 587)
        );
        assert!(relay.verify_certificate);
        let auth = relay.auth.as_ref().unwrap();
        assert_eq!(
            auth.password_file.to_str(),
            Some("/etc/kubemail/relay/password")
        );
        assert_eq!(
            relay.messages_per_second,
            Some(5),
            "9/s over 2 replicas, rounded up"
        );
        let inbound = d.inbound.as_ref().unwrap();
        assert_eq!(
            (inbound.host.as_str(), inbound.port),
            ("dovecot.mail.svc", 24)
        );
        let pod = c.deployment.spec.unwrap().template.spec.unwrap();
        assert!(
            pod.volumes.unwrap().iter().any(|v| v
                .secret
                .as_ref()
                .and_then(|s| s.secret_name.as_deref())
                == Some("sendgrid-auth"))
        );
        assert!(
            c.dns_records
                .iter()
                .any(|r| r.value.contains("include:sendgrid.net"))
        );

        // A Relay that is not ready (or missing): nothing leaves directly, mail waits queued.
        r.relay = Some(relay_object(false));
        let v = validate(&md, &r).unwrap();
        let c = build(&md, &v, &provisioned(true), &observed(), &config(), NOW).unwrap();
        let node = NodeConfig::from_yaml(&data_text(&c.node_config, NODE_CONFIG_KEY)).unwrap();
        assert!(!node.delivery.enabled);
        assert!(node.domains[0].relay.is_none());
        assert!(
            !c.dns_records
                .iter()
                .any(|r| r.value.contains("include:sendgrid.net"))
        );
    }

    #[test]
    fn node_overlay_merges_site_settings_and_refuses_domain_owned_fields() {
        let overlay = parse_node_overlay(
            "dns: {nameservers: ['127.0.0.1:15353']}\ndelivery: {mxPort: 1025, allowedNetworks: ['127.0.0.0/8']}\n",
        )
        .unwrap();
        let md = md(FULL);
        let v = validate(&md, &refs()).unwrap();
        let cfg = BuildConfig {
            node_overlay: Some(overlay),
            ..config()
        };
        let c = build(&md, &v, &provisioned(true), &observed(), &cfg, NOW).unwrap();
        let node = NodeConfig::from_yaml(&data_text(&c.node_config, NODE_CONFIG_KEY)).unwrap();
        assert_eq!(node.delivery.mx_port, 1025);
        assert_eq!(node.dns.nameservers.len(), 1);
        assert_eq!(node.domains[0].name, "example.com");
        let (_, _, plain) = full();
        assert_ne!(
            c.checksum, plain.checksum,
            "an overlay change rolls the nodes"
        );

        assert!(matches!(
            parse_node_overlay("domains: []"),
            Err(OverlayError::ReservedField("domains"))
        ));
        assert!(matches!(
            parse_node_overlay("- 1"),
            Err(OverlayError::NotAMapping)
        ));
        // A field the node does not know is refused by the node's own schema at build time.
        let cfg = BuildConfig {
            node_overlay: Some(parse_node_overlay("noSuchField: 1").unwrap()),
            ..config()
        };
        assert!(build(&md, &v, &provisioned(true), &observed(), &cfg, NOW).is_err());
    }

    #[test]
    fn nodes_get_the_otlp_endpoint_when_one_is_configured() {
        let env_of = |c: &Children| {
            let pod = c
                .deployment
                .spec
                .as_ref()
                .unwrap()
                .template
                .spec
                .as_ref()
                .unwrap();
            pod.containers[0].env.clone().unwrap()
        };
        let (_, v, plain) = full();
        assert!(env_of(&plain).iter().all(|e| !e.name.starts_with("OTEL_")));
        let md = md(FULL);
        let cfg = BuildConfig {
            otlp_endpoint: Some("http://otel-collector.observability:4317".into()),
            ..config()
        };
        let c = build(&md, &v, &provisioned(true), &observed(), &cfg, NOW).unwrap();
        let env = env_of(&c);
        let get = |n: &str| {
            env.iter()
                .find(|e| e.name == n)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(
            get("OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(),
            Some("http://otel-collector.observability:4317")
        );
        assert_eq!(
            get("OTEL_SERVICE_NAME").as_deref(),
            Some("kubemail-smtp-node")
        );
    }

    #[test]
    fn bind_pod_ip_starts_nodes_on_their_pod_ip_without_changing_the_config() {
        let md = md(FULL);
        let v = validate(&md, &refs()).unwrap();
        let cfg = BuildConfig {
            bind_pod_ip: true,
            ..config()
        };
        let c = build(&md, &v, &provisioned(true), &observed(), &cfg, NOW).unwrap();
        let pod = c
            .deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        assert_eq!(
            pod.containers[0].args.as_ref().unwrap(),
            &[
                "--config",
                "/etc/kubemail/config/node.yaml",
                "--listen-ip",
                "$(POD_IP)"
            ]
        );
        let (_, _, plain) = full();
        assert_eq!(c.checksum, plain.checksum, "the node config is the same");
    }

    #[test]
    fn deployment_runs_the_node_safely_with_probes_pod_ip_and_a_long_enough_grace() {
        let (_, _, c) = full();
        let spec = c.deployment.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(2));
        assert_eq!(
            spec.selector.match_labels.as_ref().unwrap(),
            &selector_labels("example-com")
        );
        let template = &spec.template;
        let annotations = template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap();
        assert_eq!(annotations[CHECKSUM_ANNOTATION], c.checksum);
        assert_eq!(c.checksum.len(), 64);
        let pod = template.spec.as_ref().unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        // node drain deadline (30 s default) + preStop 5 s + 10 s slack
        assert_eq!(pod.termination_grace_period_seconds, Some(45));
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(
            (psc.run_as_non_root, psc.run_as_user),
            (Some(true), Some(65532))
        );
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        let container = &pod.containers[0];
        assert_eq!(container.image.as_deref(), Some("kubemail/smtp-node:0.1.0"));
        assert_eq!(
            container.args.as_ref().unwrap(),
            &["--config", "/etc/kubemail/config/node.yaml"]
        );
        let sc = container.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(),
            &["ALL"]
        );
        let env = container.env.as_ref().unwrap();
        let pod_ip = env.iter().find(|e| e.name == "POD_IP").unwrap();
        assert_eq!(
            pod_ip
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "status.podIP"
        );
        let ready = container
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(
            (ready.path.as_deref(), &ready.port),
            (Some("/readyz"), &IntOrString::String("admin".into()))
        );
        let live = container
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(live.path.as_deref(), Some("/healthz"));
        let ports: Vec<(String, i32)> = container
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.clone().unwrap(), p.container_port))
            .collect();
        assert_eq!(
            ports,
            [
                ("smtp".into(), 2525),
                ("submission".into(), 2587),
                ("submissions".into(), 2465),
                ("admin".into(), 8080)
            ]
        );
        let mounts: Vec<(&str, &str)> = container
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert_eq!(
            mounts,
            [
                ("config", CONFIG_DIR),
                ("tls", TLS_DIR),
                ("dkim", DKIM_DIR),
                ("users", USERS_DIR),
                ("tmp", "/tmp")
            ]
        );
        let secrets: Vec<String> = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .filter_map(|v| v.secret.as_ref().and_then(|s| s.secret_name.clone()))
            .collect();
        assert_eq!(
            secrets,
            [
                "example-com-tls",
                "example-com-dkim",
                "example-com-users-hashed"
            ]
        );
    }

    #[test]
    fn service_maps_the_mail_ports_and_the_pdb_allows_one_down() {
        let (_, _, c) = full();
        let spec = c.service.spec.as_ref().unwrap();
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        let ports: Vec<(i32, IntOrString)> = spec
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.port, p.target_port.clone().unwrap()))
            .collect();
        assert_eq!(
            ports,
            [
                (25, IntOrString::String("smtp".into())),
                (465, IntOrString::String("submissions".into())),
                (587, IntOrString::String("submission".into())),
            ]
        );
        let pdb = c.pdb.spec.as_ref().unwrap();
        assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));

        let cluster_ip = md(&FULL.replace(
            "  replicas: 2\n",
            "  replicas: 2\n  service: { type: ClusterIP }\n",
        ));
        let v = validate(&cluster_ip, &refs()).unwrap();
        let c = build(
            &cluster_ip,
            &v,
            &provisioned(true),
            &observed(),
            &config(),
            NOW,
        )
        .unwrap();
        let spec = c.service.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.external_traffic_policy, None);
    }

    #[test]
    fn dns_records_are_exactly_what_the_domain_needs() {
        let (_, v, c) = full();
        let policy = dns_records::mta_sts_policy(v.mta_sts.as_ref().unwrap(), "mx.example.com");
        let id = dns_records::mta_sts_id(&policy);
        let got: Vec<(String, String, i32, String)> = c
            .dns_records
            .iter()
            .map(|r| (r.name.clone(), r.type_.clone(), r.ttl, r.value.clone()))
            .collect();
        let rr = |n: &str, t: &str, v: &str| (n.to_owned(), t.to_owned(), 3600, v.to_owned());
        assert_eq!(
            got,
            [
                rr("example.com.", "MX", "10 mx.example.com."),
                rr("mx.example.com.", "A", "203.0.113.7"),
                rr("mx.example.com.", "AAAA", "2001:db8::7"),
                rr(
                    "example.com.",
                    "TXT",
                    "v=spf1 ip4:203.0.113.7 ip6:2001:db8::7 include:_spf.example.net -all"
                ),
                rr(
                    "kubemail1._domainkey.example.com.",
                    "TXT",
                    "v=DKIM1; k=rsa; p=RSAKEY"
                ),
                rr(
                    "kubemail1-ed25519._domainkey.example.com.",
                    "TXT",
                    "v=DKIM1; k=ed25519; p=EDKEY"
                ),
                rr(
                    "_dmarc.example.com.",
                    "TXT",
                    "v=DMARC1; p=quarantine; rua=mailto:dmarc@example.com; adkim=r; aspf=r"
                ),
                rr("_mta-sts.example.com.", "TXT", &format!("v=STSv1; id={id}")),
                rr(
                    "_smtp._tls.example.com.",
                    "TXT",
                    "v=TLSRPTv1; rua=mailto:tls@example.com"
                ),
            ]
        );
        let zone = data_text(&c.dns_config, ZONE_KEY);
        assert!(
            zone.contains("\nexample.com.\t3600\tIN\tMX\t10 mx.example.com.\n"),
            "{zone}"
        );
        assert!(
            zone.contains("\n_dmarc.example.com.\t3600\tIN\tTXT\t\"v=DMARC1; p=quarantine;"),
            "{zone}"
        );
        assert_eq!(data_text(&c.dns_config, MTA_STS_KEY), policy);
    }

    #[test]
    fn secrets_hold_the_key_material_and_the_schedule() {
        let (_, _, c) = full();
        let dkim = &c.dkim_secret;
        let data = dkim.data.as_ref().unwrap();
        assert_eq!(
            data.keys().collect::<Vec<_>>(),
            ["kubemail1-ed25519.pem", "kubemail1.pem"]
        );
        assert_eq!(data["kubemail1.pem"].0, b"PEM-kubemail1");
        let ann = dkim.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann[SIGNING_ANNOTATION], "kubemail1,kubemail1-ed25519");
        let state: Vec<KeyRecord> = serde_json::from_str(&ann[STATE_ANNOTATION]).unwrap();
        assert_eq!(state.len(), 2);
        assert!(
            !ann[STATE_ANNOTATION].contains("PEM"),
            "no key material in annotations"
        );
        let tls = c.tls_secret.as_ref().unwrap();
        assert_eq!(tls.type_.as_deref(), Some("kubernetes.io/tls"));
        let tls_data = tls.data.as_ref().unwrap();
        assert_eq!(tls_data["tls.crt"].0, b"LEAF");
        assert_eq!(tls_data["ca.crt"].0, b"CA");
        let users = c.users_secret.as_ref().unwrap().data.as_ref().unwrap();
        assert_eq!(users["users"].0, b"alice@example.com:$argon2id$x\n");
        assert_eq!(users["username-key"].0, "ab".repeat(32).as_bytes());
        let node: NodeConfig =
            serde_yaml::from_str(&data_text(&c.node_config, "node.yaml")).unwrap();
        assert_eq!(
            node.auth.username_key_file.as_deref(),
            Some(std::path::Path::new("/etc/kubemail/users/username-key")),
            "the node hashes user names with the key the Secret mounts"
        );
    }

    #[test]
    fn the_same_inputs_give_the_same_children_and_a_config_change_a_new_checksum() {
        let (md1, v1, c1) = full();
        let again = build(
            &md1,
            &v1,
            &provisioned(true),
            &observed(),
            &config(),
            NOW + 3600,
        )
        .unwrap();
        assert_eq!(c1.deployment, again.deployment);
        assert_eq!(c1.node_config, again.node_config);
        assert_eq!(c1.dns_config, again.dns_config);
        assert_eq!(c1.checksum, again.checksum);

        let scaled = md(&FULL.replace("replicas: 2", "replicas: 5"));
        let v = validate(&scaled, &refs()).unwrap();
        let c = build(&scaled, &v, &provisioned(true), &observed(), &config(), NOW).unwrap();
        assert_eq!(c.deployment.spec.as_ref().unwrap().replicas, Some(5));
        assert_eq!(c.checksum, c1.checksum, "scaling does not roll the pods");

        let limited = md(&FULL.replace("maxRecipients: 50", "maxRecipients: 20"));
        let v = validate(&limited, &refs()).unwrap();
        let c = build(
            &limited,
            &v,
            &provisioned(true),
            &observed(),
            &config(),
            NOW,
        )
        .unwrap();
        assert_ne!(c.checksum, c1.checksum, "a config change rolls the pods");
    }

    #[test]
    fn cert_manager_and_external_dns_children_when_asked_for_and_installed() {
        let spec =
            format!("{FULL}  tls: {{ issuerRef: {{ name: letsencrypt, kind: ClusterIssuer }} }}\n");
        let md = md(&spec);
        let mut r = refs();
        r.cert_manager_installed = true;
        let v = validate(&md, &r).unwrap();
        let mut p = provisioned(true);
        p.tls = TlsMaterial::CertManager {
            ready: false,
            reason: "Issuing".into(),
            message: String::new(),
            not_after: None,
        };
        let obs = Observed {
            external_dns: true,
            ..observed()
        };
        let c = build(&md, &v, &p, &obs, &config(), NOW).unwrap();
        assert!(c.tls_secret.is_none());
        let cert = c.certificate.unwrap();
        assert_eq!(cert.types.as_ref().unwrap().kind, "Certificate");
        assert_eq!(
            cert.data["spec"],
            json!({
                "secretName": "example-com-tls",
                "commonName": "mx.example.com",
                "dnsNames": ["mx.example.com"],
                "issuerRef": { "name": "letsencrypt", "kind": "ClusterIssuer", "group": "cert-manager.io" },
                "privateKey": { "algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always" },
                "usages": ["digital signature", "server auth"],
                "secretTemplate": { "labels": labels("example-com") },
            })
        );
        let ep = c.dns_endpoint.unwrap();
        assert_eq!(
            ep.types.as_ref().unwrap().api_version,
            "externaldns.k8s.io/v1alpha1"
        );
        let endpoints = ep.data["spec"]["endpoints"].as_array().unwrap();
        assert_eq!(endpoints.len(), c.dns_records.len());
        assert_eq!(
            endpoints[0],
            json!({"dnsName": "example.com", "recordType": "MX", "recordTTL": 3600, "targets": ["10 mx.example.com"]})
        );

        r.cert_manager_installed = false;
        let invalid = validate(&md, &r).unwrap_err();
        assert_eq!(invalid.reason, "CertManagerNotInstalled");
        assert!(invalid.retry_after.is_some());
    }

    #[test]
    fn specs_the_node_would_refuse_are_build_errors() {
        let md = md(&FULL.replace("[postmaster, bob]", "[bob@other.example]"));
        let v = validate(&md, &refs()).unwrap();
        let err = build(&md, &v, &provisioned(true), &observed(), &config(), NOW).unwrap_err();
        assert!(err.to_string().contains("recipients[0]"), "{err}");
    }

    #[test]
    fn invalid_references_and_durations_are_reported_with_a_reason() {
        let md1 = md(FULL);
        let missing = validate(&md1, &Dereferenced::default()).unwrap_err();
        assert_eq!(missing.reason, "UsersSecretNotFound");
        assert!(missing.message.contains("example-com-users-src"));
        let short = md(&format!("{FULL}  dkim: {{ rotateEvery: 1h }}\n"));
        assert_eq!(
            validate(&short, &refs()).unwrap_err().reason,
            "DkimRotationTooShort"
        );
    }
}
