//! The CRDs under `crds/` are generated from the Rust types; this fails when they drift.

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::path::Path;

#[test]
fn committed_crds_match_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let rendered = kubemail_operator::crd::render_crds().expect("render the CRDs");
    let mut expected: Vec<&str> = rendered.iter().map(|(f, _)| *f).collect();
    for (file, yaml) in &rendered {
        let path = dir.join(file);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == *yaml,
            "{} differs from the Rust types in operator/src/crd/; regenerate it with\n  cargo run -p kubemail-operator --bin crdgen -- --out-dir crds",
            path.display()
        );
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .expect("crds/ exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    present.sort();
    expected.sort();
    assert_eq!(present, expected, "crds/ holds files crdgen does not write");
}

/// Short names must not collide with those of widely installed projects: `kubectl get md`
/// on a cluster with Cluster API would otherwise list its MachineDeployments (and `mp` its
/// MachinePools), whichever CRD the discovery cache ranks first.
#[test]
fn short_names_collide_with_no_common_resource() {
    // Kubernetes built-ins, Cluster API, cert-manager, Prometheus operator, Argo, Knative.
    const TAKEN: &[&str] = &[
        "cm", "svc", "ns", "po", "deploy", "sts", "ds", "rs", "pv", "pvc", "sa", "ep", "ing",
        "netpol", "pdb", "hpa", "crd", "md", "mp", "mhc", "ms", "cc", "kcp", "cert", "certs", "cr",
        "crs", "issuer", "ci", "smon", "pmon", "prom", "am", "app", "apps", "ksvc", "rt", "kn",
    ];
    for (_, crd) in kubemail_operator::crd::crds() {
        for short in crd.spec.names.short_names.clone().unwrap_or_default() {
            assert!(
                !TAKEN.contains(&short.as_str()),
                "{} has the short name {short}, which another common resource uses",
                crd.spec.names.kind
            );
        }
    }
}

/// What the API server keeps of `value` under a structural `schema`: unknown fields are
/// pruned (unless the schema preserves them), the rest is kept as it is.
fn prune(value: &serde_json::Value, schema: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return value.clone();
    }
    match value {
        Value::Object(fields) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            Value::Object(
                fields
                    .iter()
                    .filter_map(|(k, v)| {
                        let sub = properties.and_then(|p| p.get(k)).or(additional)?;
                        Some((k.clone(), prune(v, sub)))
                    })
                    .collect(),
            )
        }
        Value::Array(items) => {
            let sub = schema.get("items").cloned().unwrap_or(Value::Null);
            Value::Array(items.iter().map(|v| prune(v, &sub)).collect())
        }
        other => other.clone(),
    }
}

/// The spec fields that shape the node pods and their Service survive the generated schema
/// (nothing is pruned by the API server) and read back as the same spec.
#[test]
fn pod_shape_and_load_balancer_fields_round_trip_through_the_generated_schema() {
    const POD: &str = "
    nodeSelector: { pool: mail }
    tolerations: [{ key: dedicated, operator: Equal, value: mail, effect: NoSchedule, tolerationSeconds: 30 }]
    affinity:
      nodeAffinity:
        requiredDuringSchedulingIgnoredDuringExecution:
          nodeSelectorTerms: [{ matchExpressions: [{ key: kubernetes.io/arch, operator: In, values: [amd64] }] }]
      podAntiAffinity:
        preferredDuringSchedulingIgnoredDuringExecution:
          - weight: 50
            podAffinityTerm: { topologyKey: kubernetes.io/hostname, labelSelector: { matchLabels: { app: smtp } } }
    priorityClassName: mail-critical
    imagePullSecrets: [{ name: registry }]
    topologySpreadConstraints:
      - { maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: DoNotSchedule, matchLabelKeys: [pod-template-hash], labelSelector: { matchExpressions: [{ key: app, operator: Exists }] } }
    resources:
      requests: { cpu: 250m, memory: 256Mi }
      limits: { cpu: '2', memory: 2Gi }
";
    const SERVICE: &str = "
    type: LoadBalancer
    loadBalancerClass: service.k8s.aws/nlb
    loadBalancerSourceRanges: [198.51.100.0/24, '2001:db8::/48']
    externalTrafficPolicy: Cluster
    proxyProtocol: { enabled: true, trustedCidrs: [10.0.0.0/8] }
";
    let domain: serde_json::Value = serde_yaml::from_str(&format!(
        "apiVersion: kubemail.io/v1alpha1\nkind: MailDomain\nmetadata: {{ name: example-com }}\nspec:\n  domain: example.com\n  pod:{POD}  service:{SERVICE}"
    ))
    .unwrap();
    let pool: serde_json::Value = serde_yaml::from_str(&format!(
        "apiVersion: kubemail.io/v1alpha1\nkind: MailPool\nmetadata: {{ name: shared }}\nspec:\n  hostname: mx.pool.example.net\n  pod:{POD}  service:{SERVICE}"
    ))
    .unwrap();
    for (file, object) in [
        ("maildomains.kubemail.io.yaml", &domain),
        ("mailpools.kubemail.io.yaml", &pool),
    ] {
        let crd = kubemail_operator::crd::crds()
            .into_iter()
            .find(|(f, _)| *f == file)
            .map(|(_, crd)| crd)
            .unwrap();
        let schema = serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .unwrap()
                .open_api_v3_schema
                .as_ref()
                .unwrap(),
        )
        .unwrap();
        let spec_schema = &schema["properties"]["spec"];
        let stored = prune(&object["spec"], spec_schema);
        assert_eq!(
            stored, object["spec"],
            "{file}: the API server would prune fields"
        );
        // The operator reads back what it was given.
        let spec_json = match file {
            "maildomains.kubemail.io.yaml" => serde_json::to_value(
                serde_json::from_value::<kubemail_operator::crd::MailDomainSpec>(stored).unwrap(),
            ),
            _ => serde_json::to_value(
                serde_json::from_value::<kubemail_operator::crd::MailPoolSpec>(stored).unwrap(),
            ),
        }
        .unwrap();
        assert_eq!(spec_json["pod"], object["spec"]["pod"], "{file}");
        for field in [
            "loadBalancerClass",
            "loadBalancerSourceRanges",
            "externalTrafficPolicy",
        ] {
            assert_eq!(
                spec_json["service"][field], object["spec"]["service"][field],
                "{file}: {field}"
            );
        }
    }
}
