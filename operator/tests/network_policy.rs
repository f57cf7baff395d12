//! The NetworkPolicies as an independent evaluator judges them (cyclonus, pinned in
//! e2e/tools/versions.env and built by e2e/tools/setup.sh): the chart's (NATS and operator,
//! rendered by helm with `networkPolicy.enabled`) and the one the operator makes for a
//! MailDomain in a tenant namespace other than the release's. The flows a mail system needs
//! are allowed; every other way to NATS, to the nodes' admin port, and out of the node pods
//! is denied.

// Test helpers panic on purpose: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kubemail_config::NodeConfig;
use kubemail_operator::controller::mail_domain::names;
use kubemail_operator::nats::NetworkPolicySettings;
use kubemail_operator::nats::network_policy::node_policy;
use serde_json::{Value, json};

const RELEASE_NS: &str = "kubemail-system";
const TENANT_NS: &str = "tenant-a";

fn tool(name: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not on PATH (e2e/tools/setup.sh builds it)"))
}

/// A pod (or an address outside the cluster when `namespace` is `None`).
fn peer(namespace: Option<&str>, labels: Value, ip: &str) -> Value {
    match namespace {
        Some(ns) => json!({
            "Internal": {
                "PodLabels": labels,
                "NamespaceLabels": { "kubernetes.io/metadata.name": ns },
                "Namespace": ns,
            },
            "IP": ip,
        }),
        None => json!({ "Internal": null, "IP": ip }),
    }
}

fn node_pod() -> Value {
    let labels: BTreeMap<String, String> = names::labels("example-com");
    peer(Some(TENANT_NS), json!(labels), "10.1.0.10")
}
fn nats_pod() -> Value {
    peer(
        Some(RELEASE_NS),
        json!({ "app.kubernetes.io/instance": "kubemail", "app.kubernetes.io/component": "nats", "app.kubernetes.io/name": "kubemail" }),
        "10.2.0.10",
    )
}
fn operator_pod() -> Value {
    peer(
        Some(RELEASE_NS),
        json!({ "app.kubernetes.io/instance": "kubemail", "app.kubernetes.io/component": "operator", "app.kubernetes.io/name": "kubemail" }),
        "10.2.0.20",
    )
}

#[test]
fn policies_allow_the_mail_flows_and_deny_everything_else() {
    let dir = tempfile::tempdir().unwrap();
    let policies_dir = dir.path().join("policies");
    std::fs::create_dir(&policies_dir).unwrap();
    // The chart's policies (helm renders them for the release namespace).
    let chart = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/kubemail");
    let rendered = Command::new(tool("helm"))
        .args(["template", "kubemail"])
        .arg(&chart)
        .args([
            "--namespace",
            RELEASE_NS,
            "--kube-version",
            "1.36.3",
            "--set",
            "networkPolicy.enabled=true,nats.replicas=3",
            "--set-json",
            r#"networkPolicy.metricsFrom=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]"#,
        ])
        .output()
        .expect("helm template");
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let policies: Vec<String> = String::from_utf8(rendered.stdout)
        .unwrap()
        .split("\n---")
        .filter(|doc| doc.contains("kind: NetworkPolicy"))
        .map(str::to_owned)
        .collect();
    assert_eq!(policies.len(), 2, "the NATS and the operator policy");
    for (i, doc) in policies.iter().enumerate() {
        std::fs::write(policies_dir.join(format!("chart-{i}.yaml")), doc).unwrap();
    }
    // The MailDomain's own policy, as the operator renders it in the tenant namespace.
    let node: NodeConfig = serde_yaml::from_str(
        "hostname: mx.example.com\n\
         listeners:\n\
         - {name: mx, kind: mx, address: 0.0.0.0:2525}\n\
         - {name: submission, kind: submission, address: 0.0.0.0:2587}\n\
         - {name: submissions, kind: implicitTls, address: 0.0.0.0:2465}\n\
         admin: {address: 0.0.0.0:8080}\n\
         delivery: {mxPort: 25}\n\
         domains:\n\
         - name: example.com\n\
         \x20 inbound: {host: dovecot.tenant-a.svc, port: 24, protocol: lmtp}\n",
    )
    .expect("node config");
    let settings = NetworkPolicySettings {
        nats_pods: Some((
            RELEASE_NS.to_owned(),
            BTreeMap::from([
                (
                    "app.kubernetes.io/instance".to_owned(),
                    "kubemail".to_owned(),
                ),
                ("app.kubernetes.io/component".to_owned(), "nats".to_owned()),
            ]),
        )),
        nats_port: 4222,
        metrics_from: vec![NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "kubernetes.io/metadata.name".to_owned(),
                    "monitoring".to_owned(),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }],
    };
    let policy = node_policy(
        ObjectMeta {
            name: Some("example-com".to_owned()),
            namespace: Some(TENANT_NS.to_owned()),
            ..Default::default()
        },
        names::selector_labels("example-com"),
        &node,
        &settings,
        &[],
    );
    let mut yaml = serde_yaml::to_value(&policy).unwrap();
    yaml["apiVersion"] = "networking.k8s.io/v1".into();
    yaml["kind"] = "NetworkPolicy".into();
    std::fs::write(
        policies_dir.join("maildomain.yaml"),
        serde_yaml::to_string(&yaml).unwrap(),
    )
    .unwrap();

    let web = peer(Some(TENANT_NS), json!({ "app": "web" }), "10.1.0.20");
    let stranger = peer(Some("other"), json!({ "app": "db" }), "10.3.0.10");
    let monitoring = peer(
        Some("monitoring"),
        json!({ "app": "prometheus" }),
        "10.4.0.10",
    );
    let kube_dns = peer(
        Some("kube-system"),
        json!({ "k8s-app": "kube-dns" }),
        "10.5.0.10",
    );
    let dovecot = peer(Some(TENANT_NS), json!({ "app": "dovecot" }), "10.1.0.30");
    let internet = peer(None, json!({}), "203.0.113.9");
    let remote_mx = peer(None, json!({}), "198.51.100.7");
    let api_server = peer(None, json!({}), "10.96.0.1");
    let flows: Vec<(&str, Value, Value, u16, &str, bool)> = vec![
        ("node -> NATS", node_pod(), nats_pod(), 4222, "TCP", true),
        (
            "operator -> NATS",
            operator_pod(),
            nats_pod(),
            4222,
            "TCP",
            true,
        ),
        ("NATS route", nats_pod(), nats_pod(), 6222, "TCP", true),
        (
            "internet -> node SMTP",
            internet.clone(),
            node_pod(),
            2525,
            "TCP",
            true,
        ),
        (
            "internet -> node submission",
            internet.clone(),
            node_pod(),
            2587,
            "TCP",
            true,
        ),
        (
            "monitoring -> node admin",
            monitoring.clone(),
            node_pod(),
            8080,
            "TCP",
            true,
        ),
        (
            "monitoring -> operator metrics",
            monitoring.clone(),
            operator_pod(),
            8080,
            "TCP",
            true,
        ),
        ("node -> DNS", node_pod(), kube_dns.clone(), 53, "UDP", true),
        (
            "node -> remote MX",
            node_pod(),
            remote_mx.clone(),
            25,
            "TCP",
            true,
        ),
        (
            "node -> remote submission",
            node_pod(),
            remote_mx.clone(),
            587,
            "TCP",
            true,
        ),
        (
            "node -> inbound LMTP",
            node_pod(),
            dovecot.clone(),
            24,
            "TCP",
            true,
        ),
        (
            "tenant's other pod -> NATS",
            web.clone(),
            nats_pod(),
            4222,
            "TCP",
            false,
        ),
        (
            "other namespace -> NATS",
            stranger.clone(),
            nats_pod(),
            4222,
            "TCP",
            false,
        ),
        (
            "internet -> NATS",
            internet.clone(),
            nats_pod(),
            4222,
            "TCP",
            false,
        ),
        (
            "node -> NATS routes",
            node_pod(),
            nats_pod(),
            6222,
            "TCP",
            false,
        ),
        (
            "node -> NATS monitoring",
            node_pod(),
            nats_pod(),
            8222,
            "TCP",
            false,
        ),
        (
            "tenant's other pod -> node admin",
            web.clone(),
            node_pod(),
            8080,
            "TCP",
            false,
        ),
        (
            "internet -> node admin",
            internet.clone(),
            node_pod(),
            8080,
            "TCP",
            false,
        ),
        (
            "node -> Kubernetes API",
            node_pod(),
            api_server,
            443,
            "TCP",
            false,
        ),
        (
            "node -> remote SSH",
            node_pod(),
            remote_mx,
            22,
            "TCP",
            false,
        ),
        (
            "node -> another tenant's database",
            node_pod(),
            stranger,
            5432,
            "TCP",
            false,
        ),
        (
            "node -> operator",
            node_pod(),
            operator_pod(),
            8080,
            "TCP",
            false,
        ),
    ];
    let traffic: Vec<Value> = flows
        .iter()
        .map(|(_, from, to, port, protocol, _)| {
            json!({ "Source": from, "Destination": to, "Protocol": protocol,
                    "ResolvedPort": port, "ResolvedPortName": "" })
        })
        .collect();
    let traffic_path = dir.path().join("traffic.json");
    std::fs::write(&traffic_path, serde_json::to_string(&traffic).unwrap()).unwrap();
    let out = Command::new(tool("cyclonus"))
        .args(["analyze", "--mode", "query-traffic", "--policy-path"])
        .arg(&policies_dir)
        .arg("--traffic-path")
        .arg(&traffic_path)
        .output()
        .expect("cyclonus");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One verdict per flow, in order: "| IS ALLOWED? |  TRUE  |".
    let verdicts: Vec<bool> = text
        .lines()
        .filter(|l| l.contains("IS ALLOWED?"))
        .map(|l| l.contains("TRUE"))
        .collect();
    assert_eq!(verdicts.len(), flows.len(), "{text}");
    let wrong: Vec<String> = flows
        .iter()
        .zip(&verdicts)
        .filter(|((_, _, _, _, _, want), got)| want != *got)
        .map(|((name, _, _, port, _, want), _)| {
            format!(
                "{name} :{port} should be {}",
                if *want { "allowed" } else { "denied" }
            )
        })
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}\n{text}");
}
