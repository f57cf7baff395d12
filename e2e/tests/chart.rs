//! The Helm chart without a cluster: `helm lint` is clean, the chart's CRDs are the generated
//! ones byte for byte and rendered as templates, `manifests/install.yaml` is what the chart
//! renders today, every object of the default and the production render validates with
//! kubeconform -strict, the alert rules are well formed and fire as intended (promtool's rule
//! unit tests), the `helm test` pod is what it should be, and values.schema.json refuses
//! invalid values.
//! Needs helm, kubeconform with its offline schemas, and promtool (pinned, `make setup`).

// Test helpers panic on purpose: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

#[path = "common/kubeconform.rs"]
mod kubeconform;
#[path = "common/mail.rs"]
mod mail;

use std::collections::BTreeMap;
use std::path::Path;

use kubeconform::{Kubeconform, yaml_files};
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

/// `helm template kubemail` of the chart in namespace kubemail-system with extra arguments.
fn template(extra: &[&str]) -> String {
    let chart = chart();
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
}

/// The YAML documents of a multi-document stream, without empty ones.
fn documents(out: &str) -> Vec<serde_yaml::Value> {
    out.split("\n---")
        .map(|d| {
            serde_yaml::from_str::<serde_yaml::Value>(d)
                .unwrap_or_else(|e| panic!("rendered YAML does not parse ({e}):\n{d}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> &'a serde_yaml::Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind} rendered"))
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
    let in_chart = yaml_files(&root.join("charts/kubemail/files/crds"));
    assert!(!generated.is_empty(), "crds/ holds no CRD");
    assert_eq!(
        generated.keys().collect::<Vec<_>>(),
        in_chart.keys().collect::<Vec<_>>(),
        "charts/kubemail/files/crds must hold exactly the files of crds/; run e2e/tools/render-manifests.sh"
    );
    for (name, bytes) in &generated {
        assert!(
            in_chart[name] == *bytes,
            "charts/kubemail/files/crds/{name} differs from crds/{name}; run e2e/tools/render-manifests.sh"
        );
    }
    // Helm installs a chart's crds/ directory once and never upgrades it; the CRDs are
    // templates instead, and a crds/ directory as well would make `helm install` create them twice.
    assert!(
        !root.join("charts/kubemail/crds").exists(),
        "charts/kubemail/crds/ must not exist: templates/crds.yaml renders the CRDs"
    );
    // What the template renders is each generated file with only labels and the keep
    // annotation added: the schemas are crdgen's.
    let rendered: BTreeMap<String, serde_yaml::Value> = documents(&template(&[]))
        .into_iter()
        .filter(|d| d["kind"].as_str() == Some("CustomResourceDefinition"))
        .map(|d| (d["metadata"]["name"].as_str().unwrap().to_owned(), d))
        .collect();
    assert_eq!(rendered.len(), generated.len(), "one rendered CRD per file");
    for bytes in generated.values() {
        let file: serde_yaml::Value = serde_yaml::from_slice(bytes).unwrap();
        let name = file["metadata"]["name"].as_str().unwrap().to_owned();
        let mut got = rendered
            .get(&name)
            .unwrap_or_else(|| panic!("{name} is not rendered"))
            .clone();
        assert_eq!(
            got["metadata"]["annotations"]["helm.sh/resource-policy"].as_str(),
            Some("keep"),
            "{name}: crds.keep (default true) keeps the CRD, and with it every resource, on uninstall"
        );
        let meta = got["metadata"].as_mapping_mut().unwrap();
        meta.remove("labels");
        meta.remove("annotations");
        assert_eq!(
            got, file,
            "{name}: the template changed more than labels and annotations"
        );
    }
}

#[test]
fn crd_values_switch_the_crds_and_their_keep_policy() {
    let kinds = |extra: &[&str]| {
        documents(&template(extra))
            .into_iter()
            .filter(|d| d["kind"].as_str() == Some("CustomResourceDefinition"))
            .collect::<Vec<_>>()
    };
    assert!(
        kinds(&["--set", "crds.enabled=false"]).is_empty(),
        "crds.enabled=false renders no CRD"
    );
    let unkept = kinds(&["--set", "crds.keep=false"]);
    assert_eq!(unkept.len(), 6, "six CRDs with crds.keep=false");
    for crd in &unkept {
        assert!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"].is_null(),
            "crds.keep=false: helm uninstall deletes {}",
            crd["metadata"]["name"].as_str().unwrap_or_default()
        );
    }
    // `helm template --include-crds` and `helm install --skip-crds` change nothing now.
    let with_flag = run_ok(
        &tool("helm"),
        &[
            "template",
            "kubemail",
            &chart(),
            "--kube-version",
            KUBE_VERSION,
            "--skip-crds",
        ],
    );
    assert_eq!(
        documents(&with_flag)
            .iter()
            .filter(|d| d["kind"].as_str() == Some("CustomResourceDefinition"))
            .count(),
        6,
        "the CRDs are templates, not the crds/ directory --skip-crds leaves out"
    );
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

    // node.podDefaults reach the operator as the JSON of --node-pod-defaults.
    let production = workspace_root().join("charts/kubemail/values-production.yaml");
    let out = template(&["-f", production.to_str().unwrap()]);
    let operator = documents(&out)
        .into_iter()
        .find(|d| {
            d["kind"].as_str() == Some("Deployment")
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with("-operator"))
        })
        .expect("operator Deployment");
    let env = operator["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .expect("env");
    let defaults = env
        .iter()
        .find(|e| e["name"].as_str() == Some("KUBEMAIL_NODE_POD_DEFAULTS"))
        .and_then(|e| e["value"].as_str())
        .expect("KUBEMAIL_NODE_POD_DEFAULTS");
    let defaults: serde_json::Value = serde_json::from_str(defaults).unwrap();
    assert_eq!(defaults["priorityClassName"], "kubemail-nodes");
    assert_eq!(defaults["tolerations"][0]["value"], "mail");
    let plain = template(&[]);
    assert!(
        !plain.contains("KUBEMAIL_NODE_POD_DEFAULTS"),
        "no defaults unless set"
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

#[test]
fn monitoring_objects_carry_the_labels_prometheus_selects_by() {
    let docs = documents(&template(&[
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "serviceMonitor.labels.release=kube-prometheus-stack",
        "--set",
        "podMonitor.labels.release=kps-nodes",
        "--set",
        "prometheusRule.labels.release=kps-rules",
    ]));
    for (kind, release) in [
        ("ServiceMonitor", "kube-prometheus-stack"),
        ("PodMonitor", "kps-nodes"),
        ("PrometheusRule", "kps-rules"),
    ] {
        let labels = &find(&docs, kind)["metadata"]["labels"];
        assert_eq!(
            labels["release"].as_str(),
            Some(release),
            "{kind}: {labels:?}"
        );
        assert_eq!(
            labels["app.kubernetes.io/name"].as_str(),
            Some("kubemail"),
            "{kind} keeps the chart's own labels"
        );
    }
    // A label value must be a string: a number would render but Kubernetes refuses it.
    let out = run(
        &tool("helm"),
        &[
            "template",
            "kubemail",
            &chart(),
            "--kube-version",
            KUBE_VERSION,
            "--set-json",
            r#"podMonitor.labels={"release":1}"#,
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a numeric label value must be refused"
    );
    assert!(stderr.contains("/podMonitor/labels"), "{stderr}");
}

/// Every alert of the rendered PrometheusRule: name -> expression.
fn alerts(extra: &[&str]) -> BTreeMap<String, String> {
    let mut args = vec!["--set", "prometheusRule.enabled=true"];
    args.extend_from_slice(extra);
    let docs = documents(&template(&args));
    let rule = find(&docs, "PrometheusRule");
    rule["spec"]["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().iter())
        .map(|r| {
            (
                r["alert"].as_str().unwrap().to_owned(),
                r["expr"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// PromQL functions, aggregations and keywords the rules may call with parentheses; a name
/// outside this list is a typo Prometheus would refuse when it loads the rule.
const PROMQL_CALLS: &[&str] = &[
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "rate",
    "increase",
    "label_replace",
    "time",
    "on",
    "by",
    "ignoring",
    "without",
    "group_left",
    "group_right",
];

/// A structural check of a PromQL expression (promtool is not among the pinned tools): string
/// literals close, brackets nest and balance, every call is a known function, no template
/// text is left, and the expression compares (an alert fires on a non-empty result).
fn check_promql(name: &str, expr: &str) {
    assert!(
        !expr.contains("{{") && !expr.contains("}}"),
        "{name}: template text left in {expr}"
    );
    let mut stack = Vec::new();
    let mut chars = expr.chars().peekable();
    let mut ident = String::new();
    while let Some(c) = chars.next() {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            ident.push(c);
            continue;
        }
        let word = std::mem::take(&mut ident);
        match c {
            '"' => loop {
                match chars.next() {
                    Some('\\') => {
                        chars.next();
                    }
                    Some('"') => break,
                    Some(_) => {}
                    None => panic!("{name}: unterminated string in {expr}"),
                }
            },
            '(' | '[' | '{' => {
                if c == '(' && !word.is_empty() && !word.chars().all(|c| c.is_ascii_digit()) {
                    assert!(
                        PROMQL_CALLS.contains(&word.as_str()),
                        "{name}: unknown function {word}() in {expr}"
                    );
                }
                stack.push(c);
            }
            ')' | ']' | '}' => {
                let open = stack.pop();
                let want = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                assert_eq!(open, Some(want), "{name}: unbalanced {c} in {expr}");
            }
            _ => {}
        }
    }
    assert!(stack.is_empty(), "{name}: unclosed {stack:?} in {expr}");
    assert!(
        [" > ", " < ", " == ", " != "]
            .iter()
            .any(|op| expr.contains(op)),
        "{name}: no comparison in {expr}"
    );
}

#[test]
fn alert_rules_are_well_formed_and_skip_domains_scaled_to_zero() {
    let rules = alerts(&[]);
    for (name, expr) in &rules {
        check_promql(name, expr);
    }
    // A MailDomain scaled to replicas: 0 has no ready node on purpose: its Deployment's
    // desired replicas (kube-state-metrics) take it out of the alert.
    let no_ready = &rules["KubemailNoReadyNodes"];
    let compact = no_ready.split_whitespace().collect::<Vec<_>>().join(" ");
    for part in [
        "kubemail_operator_maildomain_ready_replicas",
        "(kubemail_operator_leader == 1)",
        ") == 0 unless on (maildomain_namespace, maildomain)",
        "max by (namespace, deployment) (kube_deployment_spec_replicas) == 0",
        r#""maildomain_namespace", "$1", "namespace", "(.+)""#,
        r#""maildomain", "$1", "deployment", "(.+)""#,
    ] {
        assert!(
            compact.contains(part),
            "KubemailNoReadyNodes lacks {part}: {compact}"
        );
    }

    let expiry = &rules["KubemailCertificateExpiresSoon"];
    let compact = expiry.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        compact.contains("kubemail_operator_maildomain_certificate_expiry_timestamp_seconds")
            && compact.contains("and on (namespace, pod) (kubemail_operator_leader == 1)")
            && compact.ends_with(") - time() < 14 * 24 * 3600"),
        "expires within 14 days by default: {compact}"
    );
    let week = alerts(&["--set", "prometheusRule.certificateExpiryDays=7"]);
    assert!(
        week["KubemailCertificateExpiresSoon"].contains("< 7 * 24 * 3600"),
        "{}",
        week["KubemailCertificateExpiresSoon"]
    );
}

#[test]
fn every_rendered_manifest_and_example_validates_strictly() {
    let root = workspace_root();
    let kc = Kubeconform::new();
    let dir = tempfile::tempdir().unwrap();
    let production = root.join("charts/kubemail/values-production.yaml");
    let defaults = dir.path().join("defaults.yaml");
    std::fs::write(&defaults, template(&[])).unwrap();
    let prod = dir.path().join("production.yaml");
    let rendered = template(&["-f", &production.to_string_lossy()]);
    std::fs::write(&prod, &rendered).unwrap();

    // The production file exercises every optional object of the chart.
    let docs = documents(&rendered);
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for kind in [
        "CustomResourceDefinition",
        "Certificate",
        "NetworkPolicy",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "StatefulSet",
        "PodDisruptionBudget",
    ] {
        assert!(
            kinds.contains(&kind),
            "values-production.yaml renders no {kind}: {kinds:?}"
        );
    }

    let mut files = vec![
        defaults.clone(),
        prod.clone(),
        root.join("manifests/install.yaml"),
    ];
    files.extend(
        yaml_files(&root.join("manifests/examples"))
            .keys()
            .map(|f| root.join("manifests/examples").join(f)),
    );
    files.push(root.join("e2e/demo/maildomain.yaml"));
    let paths: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
    let (ok, out) = kc.validate(&paths);
    assert!(ok, "kubeconform -strict refuses:\n{out}");
    assert!(
        out.contains("Invalid: 0, Errors: 0, Skipped: 0"),
        "every resource has a schema and is valid:\n{out}"
    );

    // The validation is strict: an unknown field in a MailDomain and in a Deployment fails.
    let example = std::fs::read_to_string(root.join("manifests/examples/maildomain.yaml")).unwrap();
    let typo = example.replacen("\nspec:\n", "\nspec:\n  replicaz: 3\n", 1);
    assert_ne!(typo, example, "maildomain.yaml has a top-level spec");
    let bad = dir.path().join("typo.yaml");
    std::fs::write(&bad, typo).unwrap();
    let (ok, out) = kc.validate(&[&bad]);
    assert!(
        !ok && out.contains("replicaz"),
        "an unknown MailDomain field passes:\n{out}"
    );
    let defaults_text = std::fs::read_to_string(&defaults).unwrap();
    let typo = defaults_text.replacen(
        "\n      containers:\n",
        "\n      containerz: []\n      containers:\n",
        1,
    );
    assert_ne!(typo, defaults_text, "the default render has a pod template");
    std::fs::write(&bad, typo).unwrap();
    let (ok, out) = kc.validate(&[&bad]);
    assert!(
        !ok && out.contains("containerz"),
        "an unknown pod field passes:\n{out}"
    );
}

#[test]
fn helm_test_pod_sends_to_the_configured_domain_with_the_operator_image() {
    assert!(
        !documents(&template(&[])).iter().any(|d| d["kind"] == "Pod"),
        "no test pod by default: the chart cannot know a domain to send to"
    );
    let docs = documents(&template(&[
        "--set",
        "test.enabled=true",
        "--set",
        "test.server=example-com.mail.svc:25",
        "--set",
        "test.from=helm-test@example.com",
        "--set",
        "test.to=postmaster@example.com",
        "--set",
        "operator.image.tag=1.2.3",
    ]));
    let pod = find(&docs, "Pod");
    assert_eq!(
        pod["metadata"]["annotations"]["helm.sh/hook"].as_str(),
        Some("test"),
        "only `helm test` runs it"
    );
    assert_eq!(pod["spec"]["restartPolicy"].as_str(), Some("Never"));
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["image"].as_str(), Some("kubemail/operator:1.2.3"));
    assert_eq!(c["args"][0].as_str(), Some("smoke-send"));
    let env: BTreeMap<&str, &str> = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["value"].as_str().unwrap()))
        .collect();
    assert_eq!(env["KUBEMAIL_SMOKE_SERVER"], "example-com.mail.svc:25");
    assert_eq!(env["KUBEMAIL_SMOKE_FROM"], "helm-test@example.com");
    assert_eq!(env["KUBEMAIL_SMOKE_TO"], "postmaster@example.com");

    // Enabled without a target: refused at install, naming the value.
    let out = run(
        &tool("helm"),
        &[
            "template",
            "kubemail",
            &chart(),
            "--kube-version",
            KUBE_VERSION,
            "--set",
            "test.enabled=true",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("test.server"),
        "{out:?}"
    );
    // A server without a port is refused by the schema.
    let out = run(
        &tool("helm"),
        &[
            "template",
            "kubemail",
            &chart(),
            "--kube-version",
            KUBE_VERSION,
            "--set",
            "test.server=example-com.mail.svc",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/test/server"),
        "{out:?}"
    );
}

/// promtool's unit test of the rendered rules (annotations dropped: they are text, and promtool
/// would compare them verbatim): each case is input series and the alerts expected at a time.
fn promtool_test(name: &str, series: &str, alert: &str, eval_time: &str, expected: &str) {
    let docs = documents(&template(&["--set", "prometheusRule.enabled=true"]));
    let mut groups = find(&docs, "PrometheusRule")["spec"].clone();
    for group in groups["groups"].as_sequence_mut().unwrap() {
        for rule in group["rules"].as_sequence_mut().unwrap() {
            rule.as_mapping_mut().unwrap().remove("annotations");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml::to_string(&groups).unwrap(),
    )
    .unwrap();
    let test = format!(
        "rule_files: [rules.yaml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    \
         input_series:\n{series}    alert_rule_test:\n      - eval_time: {eval_time}\n        \
         alertname: {alert}\n        exp_alerts:\n{expected}"
    );
    let test_file = dir.path().join("test.yaml");
    std::fs::write(&test_file, &test).unwrap();
    let out = std::process::Command::new(tool("promtool"))
        .args(["test", "rules", "test.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: promtool test rules failed:\n{}{}\n{test}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn no_ready_nodes_alerts_only_for_domains_that_should_have_nodes() {
    // Two domains without ready nodes: "down" wants 2 (alert), "parked" is scaled to 0 (none),
    // and "unknown" has no Deployment metric (no kube-state-metrics: alert, as before).
    let ready = |md: &str| {
        format!(
            "      - series: 'kubemail_operator_maildomain_ready_replicas{{namespace=\"kubemail-system\",pod=\"op-0\",maildomain_namespace=\"mail\",maildomain=\"{md}\"}}'\n        values: '0x20'\n"
        )
    };
    let series = [
        ready("down"),
        ready("parked"),
        ready("unknown"),
        "      - series: 'kubemail_operator_leader{namespace=\"kubemail-system\",pod=\"op-0\"}'\n        values: '1x20'\n".to_owned(),
        "      - series: 'kube_deployment_spec_replicas{namespace=\"mail\",deployment=\"down\",pod=\"ksm-0\"}'\n        values: '2x20'\n".to_owned(),
        "      - series: 'kube_deployment_spec_replicas{namespace=\"mail\",deployment=\"parked\",pod=\"ksm-0\"}'\n        values: '0x20'\n".to_owned(),
    ]
    .concat();
    let alert = |md: &str| {
        format!(
            "          - exp_labels: {{severity: critical, maildomain_namespace: mail, maildomain: {md}}}\n"
        )
    };
    promtool_test(
        "KubemailNoReadyNodes",
        &series,
        "KubemailNoReadyNodes",
        "10m",
        &[alert("down"), alert("unknown")].concat(),
    );
}

#[test]
fn certificate_expiry_alerts_within_fourteen_days_in_the_domains_namespace() {
    // Expiry timestamps in seconds since the test's time zero; evaluated after 2 hours.
    let day = 24 * 3600;
    let expiry = |pod: &str, md: &str, days: u64| {
        format!(
            "      - series: 'kubemail_operator_maildomain_certificate_expiry_timestamp_seconds{{namespace=\"kubemail-system\",pod=\"{pod}\",maildomain_namespace=\"mail\",maildomain=\"{md}\"}}'\n        values: '{}x180'\n",
            days * day
        )
    };
    let series = [
        expiry("op-0", "soon", 10),
        expiry("op-0", "later", 30),
        // A former leader still serving what it saw then: not reported.
        expiry("op-1", "stale", 1),
        "      - series: 'kubemail_operator_leader{namespace=\"kubemail-system\",pod=\"op-0\"}'\n        values: '1x180'\n".to_owned(),
        "      - series: 'kubemail_operator_leader{namespace=\"kubemail-system\",pod=\"op-1\"}'\n        values: '0x180'\n".to_owned(),
    ]
    .concat();
    promtool_test(
        "KubemailCertificateExpiresSoon",
        &series,
        "KubemailCertificateExpiresSoon",
        "2h",
        "          - exp_labels: {severity: warning, maildomain_namespace: mail, maildomain: soon}\n",
    );
}
