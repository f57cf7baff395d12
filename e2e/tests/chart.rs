//! The Helm chart without a cluster: `helm lint` is clean, the chart's CRDs are the generated
//! ones byte for byte, `manifests/install.yaml` is what the chart renders today, the production
//! options render, and values.schema.json refuses an invalid value.
//! Needs only helm (pinned, `make setup`).

// Test helpers panic on purpose: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

#[path = "common/mail.rs"]
mod mail;

use std::collections::BTreeMap;
use std::path::Path;

use kubemail_e2e::local_env::workspace_root;
use mail::{run, run_ok, tool};

/// The Kubernetes version the chart is rendered for (the local cluster's, and the chart's
/// kubeVersion constraint needs one; helm's offline default is too old).
const KUBE_VERSION: &str = "1.36.3";

fn chart() -> String {
    workspace_root()
        .join("charts/kubemail")
        .to_string_lossy()
        .into_owned()
}

fn yaml_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

#[test]
fn helm_lint_is_clean() {
    let out = run_ok(&tool("helm"), &["lint", &chart(), "--strict"]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
    for bad in ["[ERROR]", "[WARNING]"] {
        assert!(!out.contains(bad), "helm lint reports {bad}:\n{out}");
    }
}

#[test]
fn chart_crds_are_the_generated_crds_byte_for_byte() {
    let root = workspace_root();
    let generated = yaml_files(&root.join("crds"));
    let in_chart = yaml_files(&root.join("charts/kubemail/crds"));
    assert!(!generated.is_empty(), "crds/ holds no CRD");
    assert_eq!(
        generated.keys().collect::<Vec<_>>(),
        in_chart.keys().collect::<Vec<_>>(),
        "charts/kubemail/crds must hold exactly the files of crds/; run e2e/tools/render-manifests.sh"
    );
    for (name, bytes) in &generated {
        assert!(
            in_chart[name] == *bytes,
            "charts/kubemail/crds/{name} differs from crds/{name}; run e2e/tools/render-manifests.sh"
        );
    }
}

#[test]
fn install_yaml_is_freshly_rendered() {
    let root = workspace_root();
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("install.yaml");
    let script = root.join("e2e/tools/render-manifests.sh");
    // The script finds helm through $HELM first, so it uses the same pinned helm as this test.
    let out = std::process::Command::new(&script)
        .arg(&fresh)
        .env("HELM", tool("helm"))
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "render-manifests.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fresh = std::fs::read_to_string(&fresh).unwrap();
    let committed = std::fs::read_to_string(root.join("manifests/install.yaml"))
        .expect("manifests/install.yaml exists");
    if fresh != committed {
        let first_diff = fresh
            .lines()
            .zip(committed.lines())
            .position(|(a, b)| a != b)
            .map(|i| i + 1)
            .unwrap_or_else(|| fresh.lines().count().min(committed.lines().count()) + 1);
        panic!(
            "manifests/install.yaml is stale (first difference at line {first_diff}); \
             run e2e/tools/render-manifests.sh"
        );
    }
    for kind in [
        "CustomResourceDefinition",
        "Deployment",
        "ClusterRole",
        "StatefulSet",
    ] {
        assert!(
            committed.contains(&format!("kind: {kind}\n")),
            "install.yaml has no {kind}"
        );
    }
}

#[test]
fn production_options_render() {
    let out = run_ok(
        &tool("helm"),
        &[
            "template",
            "kubemail",
            &chart(),
            "--namespace",
            "kubemail-system",
            "--kube-version",
            KUBE_VERSION,
            "--set",
            "nats.replicas=3",
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "serviceMonitor.enabled=true",
        ],
    );
    let docs: Vec<serde_yaml::Value> = out
        .split("\n---")
        .filter_map(|d| serde_yaml::from_str::<serde_yaml::Value>(d).ok())
        .filter(|v| !v.is_null())
        .collect();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "NetworkPolicy",
        "ServiceMonitor",
        "StatefulSet",
        "Deployment",
    ] {
        assert!(
            kinds.contains(&kind),
            "no {kind} rendered; kinds: {kinds:?}"
        );
    }
    let nats = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("StatefulSet"))
        .unwrap();
    assert_eq!(
        nats["spec"]["replicas"].as_i64(),
        Some(3),
        "nats.replicas=3 gives a 3-replica NATS StatefulSet"
    );
}

#[test]
fn values_schema_refuses_an_even_nats_replica_count() {
    let out = run(
        &tool("helm"),
        &[
            "template",
            "kubemail",
            &chart(),
            "--kube-version",
            KUBE_VERSION,
            "--set",
            "nats.replicas=2",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "nats.replicas=2 (no Raft majority) must be refused"
    );
    assert!(
        stderr.contains("/nats/replicas"),
        "the refusal names the value: {stderr}"
    );
}

/// The RBAC objects of a rendered chart: (kind, namespace, name, rules).
fn rbac(out: &str) -> Vec<(String, String, String, serde_yaml::Value)> {
    out.split("\n---")
        .filter_map(|d| serde_yaml::from_str::<serde_yaml::Value>(d).ok())
        .filter(|d| matches!(d["kind"].as_str(), Some("ClusterRole" | "Role")))
        .map(|d| {
            let s = |v: &serde_yaml::Value| v.as_str().unwrap_or_default().to_owned();
            (
                s(&d["kind"]),
                s(&d["metadata"]["namespace"]),
                s(&d["metadata"]["name"]),
                d["rules"].clone(),
            )
        })
        .collect()
}

fn grants(rules: &serde_yaml::Value, resource: &str) -> bool {
    rules.as_sequence().into_iter().flatten().any(|r| {
        r["resources"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|x| x.as_str() == Some(resource))
    })
}

#[test]
fn watch_namespaces_give_roles_there_and_no_cluster_wide_secret_access() {
    let chart = chart();
    let render = |extra: &[&str]| {
        let mut args = vec![
            "template",
            "kubemail",
            chart.as_str(),
            "--namespace",
            "kubemail-system",
            "--kube-version",
            KUBE_VERSION,
        ];
        args.extend_from_slice(extra);
        run_ok(&tool("helm"), &args)
    };
    // Default: one ClusterRole with everything.
    let cluster_mode = rbac(&render(&[]));
    let cluster_role = cluster_mode
        .iter()
        .find(|(kind, ..)| kind == "ClusterRole")
        .expect("a ClusterRole");
    assert!(grants(&cluster_role.3, "secrets"), "{cluster_role:?}");

    let out = render(&["--set", "operator.watchNamespaces={team-a,team-b}"]);
    let objects = rbac(&out);
    for (kind, ns, name, rules) in &objects {
        if kind == "ClusterRole" && name.ends_with("-edit") {
            // Aggregated into the built-in edit/admin roles of people, not the operator's:
            // it may read kubemail's resources, never a Secret.
            assert!(
                !grants(rules, "secrets"),
                "ClusterRole {name} grants secrets"
            );
        } else if kind == "ClusterRole" {
            for namespaced in ["secrets", "configmaps", "deployments", "maildomains"] {
                assert!(
                    !grants(rules, namespaced),
                    "ClusterRole {name} grants {namespaced} in namespaced mode"
                );
            }
        } else if ns == "kubemail-system" {
            assert!(
                name.ends_with("-ca") || name.ends_with("-leader-election"),
                "only the CA and the Lease in the operator's own namespace: {name}"
            );
        }
    }
    for ns in ["team-a", "team-b"] {
        let role = objects
            .iter()
            .find(|(kind, n, ..)| kind == "Role" && n == ns)
            .unwrap_or_else(|| panic!("no Role in {ns}: {objects:?}"));
        for resource in ["secrets", "maildomains", "deployments", "events"] {
            assert!(grants(&role.3, resource), "Role in {ns} lacks {resource}");
        }
        assert!(
            out.contains(&format!("namespace: {ns}\n")),
            "a RoleBinding in {ns}"
        );
    }
    assert!(
        out.contains("name: KUBEMAIL_WATCH_NAMESPACES\n              value: \"team-a,team-b\""),
        "the operator is told which namespaces to watch"
    );
}
