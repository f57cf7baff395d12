//! Tests of [`build`](super::build): the children of a MailDomain, as a user would see them.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use kubemail_config::{ListenerKind, NodeConfig};
use serde_json::json;

use super::config::parse_node_overlay;
use super::*;
use crate::certs::IssuedCert;
use crate::controller::MANAGED_BY_LABEL;
use crate::controller::mail_domain::dereference::Dereferenced;
use crate::controller::mail_domain::names::{
    CHECKSUM_ANNOTATION, CONFIG_DIR, DKIM_DIR, DOMAIN_LABEL, MTA_STS_KEY, NODE_CONFIG_KEY,
    SIGNING_ANNOTATION, TLS_DIR, USERS_DIR, ZONE_KEY, selector_labels,
};
use crate::controller::mail_domain::provision::TlsMaterial;
use crate::controller::mail_domain::validate::{ValidatedDomain, validate};
use crate::crd::mail_domain::DkimAlgorithm;
use crate::dkim::{DkimKey, DkimKeys, KeyRecord, PrivateKeyPem, STATE_ANNOTATION};
use crate::dns_records;

const NOW: i64 = 1_800_000_000;

pub(crate) fn config() -> BuildConfig {
    BuildConfig {
        node_image: "kubemail/smtp-node:0.1.0".into(),
        listen_host: "0.0.0.0".into(),
        bind_pod_ip: false,
        node_overlay: None,
        pod_defaults: Default::default(),
        otlp_endpoint: None,
        nats_url: "nats://nats.kubemail-system:4222".into(),
        nats_stream: "KUBEMAIL".into(),
        nats_subject_prefix: "kubemail.queue".into(),
        nats_replicas: 1,
        nats_auth: false,
        nats_tls: false,
        network_policy: None,
    }
}

pub(super) fn md(spec: &str) -> MailDomain {
    let mut md: MailDomain = serde_yaml::from_str(&format!(
        "apiVersion: kubemail.io/v1alpha1\nkind: MailDomain\nmetadata: {{name: example-com, namespace: mail, uid: uid-1, generation: 3}}\nspec:\n{spec}"
    ))
    .unwrap();
    md.metadata.generation = Some(3);
    md
}

pub(super) const FULL: &str = "  domain: example.com
  replicas: 2
  spf: { include: [_spf.example.net] }
  dmarc: { policy: quarantine, rua: 'mailto:dmarc@example.com' }
  mtaSts: { mode: testing }
  tlsRpt: { rua: 'mailto:tls@example.com' }
  inbound: { recipients: [postmaster, bob] }
  submission: { usersSecretRef: { name: example-com-users-src } }
  limits: { maxMessageSize: 10Mi, maxRecipients: 50 }
";

pub(super) fn refs() -> Dereferenced {
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

pub(super) fn provisioned(users: bool) -> Provisioned {
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

pub(super) fn observed() -> Observed {
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
    assert!(yaml.starts_with("# Rendered by kubemail-operator from MailDomain mail/example-com"));
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
    // Every setting is written, so what a node reads does not depend on its own defaults.
    assert!(yaml.contains("\ntimeouts:\n"), "{yaml}");
    assert_eq!(node.timeouts, kubemail_config::Timeouts::default());
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
    // A field the node does not know is refused when the overlay is loaded, naming the field.
    let err = parse_node_overlay("noSuchField: 1").unwrap_err();
    let OverlayError::Invalid(source) = &err else {
        panic!("{err:?}");
    };
    assert!(source.to_string().contains("noSuchField"), "{source}");
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
fn the_memory_limit_holds_the_nodes_message_memory_budget() {
    let (_, _, c) = full();
    let node = NodeConfig::from_yaml(&data_text(&c.node_config, NODE_CONFIG_KEY)).unwrap();
    node.validate().unwrap();
    let budget = node.limits.message_bytes_in_memory.expect("budget set").0;
    assert!(budget >= 2 * node.max_message_size(), "the node's own rule");
    let pod = c
        .deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let limits = pod.containers[0]
        .resources
        .as_ref()
        .unwrap()
        .limits
        .as_ref()
        .unwrap();
    assert_eq!(
        limits["memory"].0,
        format!("{}Mi", (budget >> 20) + 256),
        "budget plus the rest of the node"
    );
    // A site overlay that sizes the budget moves the limit with it.
    let md = md(FULL);
    let v = validate(&md, &refs()).unwrap();
    let cfg = BuildConfig {
        node_overlay: Some(parse_node_overlay("limits: {messageBytesInMemory: 1Gi}\n").unwrap()),
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
    let limits = pod.containers[0]
        .resources
        .as_ref()
        .unwrap()
        .limits
        .as_ref()
        .unwrap();
    assert_eq!(limits["memory"].0, "1280Mi");
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
            ("admin".into(), 8080),
            ("mta-sts".into(), 8443)
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
            (443, IntOrString::String("mta-sts".into())),
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
fn proxy_protocol_of_the_service_reaches_every_listener_with_its_trusted_networks() {
    let (_, _, c) = full();
    let node = NodeConfig::from_yaml(&data_text(&c.node_config, NODE_CONFIG_KEY)).unwrap();
    assert!(
        node.listeners
            .iter()
            .all(|l| !l.proxy_protocol && l.trusted_proxies.is_empty()),
        "off unless asked for"
    );
    let proxied = md(&FULL.replace(
        "  replicas: 2\n",
        "  replicas: 2\n  service: { proxyProtocol: { enabled: true, trustedCidrs: [10.0.0.0/8, \"2001:db8::/32\"] } }\n",
    ));
    let v = validate(&proxied, &refs()).unwrap();
    let c = build(
        &proxied,
        &v,
        &provisioned(true),
        &observed(),
        &config(),
        NOW,
    )
    .unwrap();
    let node = NodeConfig::from_yaml(&data_text(&c.node_config, NODE_CONFIG_KEY)).unwrap();
    node.validate().unwrap();
    assert_eq!(node.listeners.len(), 3);
    for l in &node.listeners {
        assert!(l.proxy_protocol, "{}", l.name);
        assert_eq!(
            l.trusted_proxies,
            ["10.0.0.0/8", "2001:db8::/32"],
            "{}",
            l.name
        );
    }
    for (bad, needle) in [
        ("{ enabled: true }", "must list the load balancer"),
        (
            "{ enabled: true, trustedCidrs: [10.0.0.0/33] }",
            "trustedCidrs[0]",
        ),
    ] {
        let md = md(&FULL.replace(
            "  replicas: 2\n",
            &format!("  replicas: 2\n  service: {{ proxyProtocol: {bad} }}\n"),
        ));
        let err = validate(&md, &refs()).unwrap_err();
        assert_eq!(err.reason, "InvalidProxyProtocol");
        assert!(err.message.contains(needle), "{}", err.message);
    }
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
            rr("mta-sts.example.com.", "A", "203.0.113.7"),
            rr("mta-sts.example.com.", "AAAA", "2001:db8::7"),
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
    let node: NodeConfig = serde_yaml::from_str(&data_text(&c.node_config, "node.yaml")).unwrap();
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
            "dnsNames": ["mx.example.com", "mta-sts.example.com"],
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

#[test]
fn authenticated_nats_gives_nodes_credentials_tls_and_no_stream_management() {
    let (_, v, plain) = full();
    let plain_node: NodeConfig =
        serde_yaml::from_str(&data_text(&plain.node_config, NODE_CONFIG_KEY)).unwrap();
    assert!(
        plain_node.nats.manage_streams,
        "a bare NATS: the nodes manage"
    );
    assert!(plain_node.nats.credentials_file.is_none());

    let md = md(FULL);
    let cfg = BuildConfig {
        nats_auth: true,
        nats_tls: true,
        nats_replicas: 3,
        ..config()
    };
    let c = build(&md, &v, &provisioned(true), &observed(), &cfg, NOW).unwrap();
    let node: NodeConfig =
        serde_yaml::from_str(&data_text(&c.node_config, NODE_CONFIG_KEY)).unwrap();
    assert!(
        !node.nats.manage_streams,
        "the operator manages the JetStream objects"
    );
    assert_eq!(node.nats.replicas, 3);
    assert!(node.nats.require_tls);
    assert_eq!(
        node.nats.credentials_file.as_deref(),
        Some(std::path::Path::new("/etc/kubemail/nats/nats.creds"))
    );
    assert_eq!(
        node.nats.ca_file.as_deref(),
        Some(std::path::Path::new("/etc/kubemail/nats/ca.crt"))
    );
    assert_eq!(
        node.nats.inbox_prefix.as_deref(),
        Some(kubemail_queue::inbox_prefix(&[v.domain.as_str()]).as_str())
    );
    let pod = c.deployment.spec.unwrap().template.spec.unwrap();
    let volume = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|vol| vol.name == "nats")
        .unwrap();
    assert_eq!(
        volume.secret.unwrap().secret_name.as_deref(),
        Some("example-com-nats")
    );
    assert!(
        pod.containers[0]
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.name == "nats" && m.mount_path == "/etc/kubemail/nats")
    );
}

#[test]
fn the_mta_sts_policy_is_served_on_443_under_a_certificate_for_its_host() {
    let (_, v, c) = full();
    assert_eq!(
        v.certificate_names(),
        ["mx.example.com", "mta-sts.example.com"]
    );
    let node = NodeConfig::from_yaml(&data_text(&c.node_config, NODE_CONFIG_KEY)).unwrap();
    let policy = dns_records::mta_sts_policy(v.mta_sts.as_ref().unwrap(), "mx.example.com");
    assert_eq!(
        node.domains[0].mta_sts_policy.as_deref(),
        Some(policy.as_str())
    );
    assert_eq!(
        node.mta_sts_server.as_ref().map(|s| s.address.port()),
        Some(8443)
    );
    let container = &c
        .deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    assert!(
        container
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .any(|p| p.name.as_deref() == Some("mta-sts") && p.container_port == 8443),
        "{:?}",
        container.ports
    );

    // Without MTA-STS: no listener, no port, one certificate name.
    let plain = md(&FULL.replace("  mtaSts: { mode: testing }\n", ""));
    let v = validate(&plain, &refs()).unwrap();
    assert_eq!(v.certificate_names(), ["mx.example.com"]);
    let c = build(&plain, &v, &provisioned(true), &observed(), &config(), NOW).unwrap();
    let node = NodeConfig::from_yaml(&data_text(&c.node_config, NODE_CONFIG_KEY)).unwrap();
    assert!(node.mta_sts_server.is_none() && node.domains[0].mta_sts_policy.is_none());
    assert_eq!(c.service.spec.unwrap().ports.unwrap().len(), 3);
}

#[test]
fn enforce_needs_a_certificate_senders_can_verify() {
    let enforce = FULL.replace("mtaSts: { mode: testing }", "mtaSts: { mode: enforce }");
    let e = validate(&md(&enforce), &refs()).unwrap_err();
    assert_eq!(e.reason, "MtaStsEnforceNeedsPublicCertificate");
    assert!(e.message.contains("spec.tls.issuerRef"), "{}", e.message);

    let public =
        format!("{enforce}  tls: {{ issuerRef: {{ name: letsencrypt, kind: ClusterIssuer }} }}\n");
    let mut r = refs();
    r.cert_manager_installed = true;
    let m = md(&public);
    let v = validate(&m, &r).unwrap();
    let c = build(&m, &v, &provisioned(true), &observed(), &config(), NOW).unwrap();
    let cert = c.certificate.expect("a cert-manager Certificate");
    assert_eq!(
        cert.data["spec"]["dnsNames"],
        json!(["mx.example.com", "mta-sts.example.com"])
    );
}

#[test]
fn outbound_tls_policies_reach_the_node_config() {
    let spec = format!(
        "{FULL}  outboundTls: {{ policies: [{{ domain: partner.example, mode: verify }}, {{ domain: legacy.example, mode: none }}] }}\n"
    );
    let m = md(&spec);
    let v = validate(&m, &refs()).unwrap();
    let c = build(&m, &v, &provisioned(true), &observed(), &config(), NOW).unwrap();
    let node = NodeConfig::from_yaml(&data_text(&c.node_config, NODE_CONFIG_KEY)).unwrap();
    let got: Vec<(String, kubemail_config::TlsPolicyMode)> = node
        .delivery
        .tls
        .policies
        .iter()
        .map(|p| (p.domain.clone(), p.mode))
        .collect();
    assert_eq!(
        got,
        [
            (
                "partner.example".to_owned(),
                kubemail_config::TlsPolicyMode::Verify
            ),
            (
                "legacy.example".to_owned(),
                kubemail_config::TlsPolicyMode::None
            ),
        ]
    );
}

#[test]
fn the_retry_schedule_reaches_the_node_config() {
    let spec = format!("{FULL}  delivery: {{ retryIntervals: [5m, 1h30m, 4h] }}\n");
    let m = md(&spec);
    let v = validate(&m, &refs()).unwrap();
    let c = build(&m, &v, &provisioned(true), &observed(), &config(), NOW).unwrap();
    let node = NodeConfig::from_yaml(&data_text(&c.node_config, NODE_CONFIG_KEY)).unwrap();
    let secs: Vec<u64> = node.domains[0]
        .retry_intervals
        .iter()
        .map(|d| d.0.as_secs())
        .collect();
    assert_eq!(secs, [300, 5400, 14400]);
    // Without the section the node's own schedule applies.
    let (_, _, plain) = full();
    let node = NodeConfig::from_yaml(&data_text(&plain.node_config, NODE_CONFIG_KEY)).unwrap();
    assert!(node.domains[0].retry_intervals.is_empty());
    let bad = format!("{FULL}  delivery: {{ retryIntervals: [soon] }}\n");
    let e = validate(&md(&bad), &refs()).unwrap_err();
    assert_eq!(e.reason, "InvalidDuration");
    assert!(
        e.message.contains("spec.delivery.retryIntervals"),
        "{}",
        e.message
    );
}

#[test]
fn a_pooled_domain_publishes_no_mta_sts_it_cannot_serve() {
    let (mut md, _, dedicated) = full();
    let has_sts = |c: &Children| {
        c.dns_records
            .iter()
            .any(|r| r.name.starts_with("_mta-sts.") || r.name.starts_with("mta-sts."))
    };
    assert!(
        has_sts(&dedicated),
        "a dedicated domain serves and publishes its policy"
    );
    md.spec.pool_ref = Some(crate::crd::mail_domain::PoolRef {
        name: "shared".into(),
        namespace: None,
    });
    let v = validate(&md, &refs()).unwrap();
    let pooled = build(&md, &v, &provisioned(true), &observed(), &config(), NOW).unwrap();
    assert!(!has_sts(&pooled), "{:?}", pooled.dns_records);
    assert!(
        !pooled
            .dns_config
            .data
            .as_ref()
            .unwrap()
            .contains_key("mta-sts.txt")
    );
    // Everything else is still published.
    assert!(pooled.dns_records.iter().any(|r| r.type_ == "MX"));
}
