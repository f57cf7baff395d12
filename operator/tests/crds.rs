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
