//! `spec.pod` and the Service's load-balancer settings against the real API server: what it
//! stores of the Deployment and Service the operator applies, the status and printer columns
//! a person sees, and the certificate expiry metric.
//!
//! Needs `e2e/local-cluster up` and its env (`. .kubemail-local/env`, which also puts kubectl
//! on the PATH).

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::maildomain::{apply_md, md_api, text, wait_condition_by};
use common::{
    Operator, OperatorOptions, TEST_MANAGER, TestNamespace, client, install_crds, wait_for,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use kube::Api;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kubemail_operator::certs;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

fn kubectl(args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run kubectl (on the PATH from .kubemail-local/env): {e}"));
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_shape_and_load_balancer_settings_are_what_the_api_server_stores() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "shape").await;
    let n = ns.name.as_str();
    // The Priority admission plugin refuses pods of a PriorityClass that does not exist.
    let priority_class = format!("{n}-mail");
    let classes: Api<PriorityClass> = Api::all(client.clone());
    classes
        .create(
            &PostParams::default(),
            &PriorityClass {
                metadata: ObjectMeta {
                    name: Some(priority_class.clone()),
                    ..Default::default()
                },
                value: Some(1000),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut op = Operator::start(&OperatorOptions::for_namespace(&ns, "shape-a"));

    let mut spec = json!({
        "domain": "shape.test",
        "replicas": 1,
        "service": {
            "type": "LoadBalancer",
            // No controller implements this class, so nothing else writes the Service.
            "loadBalancerClass": "kubemail.io/test-none",
            "loadBalancerSourceRanges": ["198.51.100.0/24", "2001:db8::/48"],
        },
        "pod": {
            "nodeSelector": { "kubemail.io/test-pool": "mail" },
            "tolerations": [{ "key": "dedicated", "operator": "Equal", "value": "mail", "effect": "NoSchedule" }],
            "affinity": { "nodeAffinity": { "preferredDuringSchedulingIgnoredDuringExecution": [
                { "weight": 10, "preference": { "matchExpressions": [{ "key": "kubernetes.io/os", "operator": "In", "values": ["linux"] }] } }
            ] } },
            "priorityClassName": priority_class,
            "imagePullSecrets": [{ "name": "registry" }],
            "resources": { "requests": { "cpu": "200m" }, "limits": { "memory": "1Gi" } },
        },
    });
    apply_md(&client, n, "example-com", spec.clone()).await;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), n);
    let deployment = wait_for("the Deployment", TIMEOUT, || async {
        deployments.get_opt("example-com").await.ok().flatten()
    })
    .await;
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.node_selector.unwrap()["kubemail.io/test-pool"], "mail");
    assert_eq!(
        pod.tolerations.unwrap()[0].key.as_deref(),
        Some("dedicated")
    );
    assert!(pod.affinity.unwrap().node_affinity.is_some());
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some(priority_class.as_str())
    );
    assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "registry");
    let spread = pod.topology_spread_constraints.unwrap();
    let keys: Vec<&str> = spread.iter().map(|c| c.topology_key.as_str()).collect();
    assert_eq!(
        keys,
        ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
    );
    assert!(
        spread
            .iter()
            .all(|c| c.when_unsatisfiable == "ScheduleAnyway")
    );
    let resources = pod.containers[0].resources.clone().unwrap();
    assert_eq!(resources.requests.as_ref().unwrap()["cpu"].0, "200m");
    assert_eq!(resources.requests.as_ref().unwrap()["memory"].0, "128Mi");
    assert_eq!(resources.limits.as_ref().unwrap()["memory"].0, "1Gi");

    let services: Api<Service> = Api::namespaced(client.clone(), n);
    let service = services.get("example-com").await.unwrap();
    let sspec = service.spec.unwrap();
    assert_eq!(sspec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(
        sspec.load_balancer_class.as_deref(),
        Some("kubemail.io/test-none")
    );
    assert_eq!(
        sspec.load_balancer_source_ranges.unwrap(),
        ["198.51.100.0/24", "2001:db8::/48"]
    );
    assert_eq!(sspec.external_traffic_policy.as_deref(), Some("Local"));

    // A load balancer reports its address: the MailDomain's status (and Address column) has it.
    services
        .patch_status(
            "example-com",
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "v1",
                "kind": "Service",
                "status": { "loadBalancer": { "ingress": [{ "ip": "203.0.113.9" }] } },
            })),
        )
        .await
        .unwrap();
    let domains = md_api(&client, n);
    wait_for("status.addresses", TIMEOUT, || async {
        let md = domains.get("example-com").await.ok()?;
        (md.status?.addresses == ["203.0.113.9"]).then_some(())
    })
    .await;

    // The serving certificate's notAfter, as a metric.
    let tls: Secret = Api::namespaced(client.clone(), n)
        .get("example-com-tls")
        .await
        .unwrap();
    let leaf = certs::inspect_leaf(&text(&tls, "tls.crt"), &text(&tls, "ca.crt")).unwrap();
    let series = format!(
        "kubemail_operator_maildomain_certificate_expiry_timestamp_seconds{{maildomain_namespace=\"{n}\",maildomain=\"example-com\"}}"
    );
    let expiry = wait_for("the certificate expiry metric", TIMEOUT, || async {
        let v = op.metric(&series);
        (v > 0.0).then_some(v)
    })
    .await;
    assert_eq!(expiry, leaf.not_after as f64, "{}", op.metrics());

    // A memory limit below the node's budget: a condition that says why, and the pods keep
    // the shape they had.
    spec["pod"]["resources"]["limits"]["memory"] = json!("100Mi");
    apply_md(&client, n, "example-com", spec).await;
    let md = wait_condition_by(
        &client,
        n,
        "example-com",
        "Ready",
        |c| c.status == "False" && c.reason == "InvalidPodResources",
        TIMEOUT,
        &op,
    )
    .await;
    let ready = md
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert!(
        ready.message.contains("limits.memory (100Mi)"),
        "{}",
        ready.message
    );
    let kept = deployments.get("example-com").await.unwrap();
    assert_eq!(
        kept.spec.unwrap().template.spec.unwrap().containers[0]
            .resources
            .clone()
            .unwrap()
            .limits
            .unwrap()["memory"]
            .0,
        "1Gi"
    );

    // What `kubectl get` shows.
    let table = kubectl(&["-n", n, "get", "maildomain", "example-com"]);
    let header = table.lines().next().unwrap();
    for column in ["READY", "REASON", "DNS", "ADDRESS"] {
        assert!(header.contains(column), "{table}");
    }
    assert!(
        !header.contains("MESSAGE"),
        "priority 1 only with -o wide: {table}"
    );
    let row = table.lines().nth(1).unwrap();
    assert!(
        row.contains("InvalidPodResources") && row.contains("203.0.113.9"),
        "{table}"
    );
    let wide = kubectl(&["-n", n, "get", "maildomain", "example-com", "-o", "wide"]);
    let header = wide.lines().next().unwrap();
    for column in ["HOSTNAME", "MESSAGE", "CERTIFICATE EXPIRY"] {
        assert!(header.contains(column), "{wide}");
    }
    assert!(wide.contains("limits.memory (100Mi)"), "{wide}");

    assert!(
        op.stop(Duration::from_secs(20)),
        "clean exit:\n{}",
        op.logs()
    );
    classes
        .delete(&priority_class, &DeleteParams::default())
        .await
        .unwrap();
}
