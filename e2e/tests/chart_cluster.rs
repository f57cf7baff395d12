//! The chart's `helm test` on the local real cluster: a release installed with helm, a
//! MailDomain applied with kubectl, and `helm test` running the chart's hook pod (the operator
//! image's `smoke-send`). It passes when the node queues the message (which then arrives at
//! mailpit, the domain's inbound target) and fails, naming the refusal, when the node refuses it.
//!
//! Service names do not resolve on the local cluster (pods are processes on loopback, see the
//! README's "The node agent"), so `test.server` is the node pod's IP and container port 2525
//! where a real cluster uses the Service, `<maildomain>.<namespace>.svc:25`.
//! Needs the local cluster (`e2e/local-cluster up`, or `make test`) and built binaries.

// Test helpers panic on purpose: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

#[path = "common/cluster.rs"]
mod cluster;
#[path = "common/mail.rs"]
mod mail;

use std::time::Duration;

use cluster::{TestCluster, is_ready, list_pods, phase, wait_for};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kubemail_e2e::local_env::{LocalEnv, workspace_root};
use mail::{ReleaseCleanup, apply_shared_crds, local_values, run, run_ok, tool};

const STEP: Duration = Duration::from_secs(120);
const MD: &str = "helm-test";
const DOMAIN: &str = "helm-test.test";
/// The node's MX container port (the Service maps 25 onto it).
const MX_PORT: u16 = 2525;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_test_passes_when_the_domain_queues_the_message_and_fails_when_it_refuses() {
    let env = LocalEnv::load().unwrap_or_else(|e| panic!("{e}"));
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("helmtest").await;
    let n = ns.name.clone();
    let kubeconfig = cluster.kubeconfig.to_string_lossy().into_owned();
    let work = tempfile::tempdir().unwrap();
    let stream = format!("KMHT_{}", n.replace('-', "_").to_uppercase());
    let release = n.clone();
    let _cleanup = ReleaseCleanup::new(&kubeconfig, &n, &release, MD, &stream);
    let kubectl = |args: &[&str]| {
        let mut all = vec!["--kubeconfig", kubeconfig.as_str(), "-n", n.as_str()];
        all.extend_from_slice(args);
        run_ok(&tool("kubectl"), &all)
    };
    let helm = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&[
            "--kubeconfig",
            kubeconfig.as_str(),
            "--namespace",
            n.as_str(),
        ]);
        run(&tool("helm"), &all)
    };

    // --- install: CRDs shared by the cluster's releases, the local values -----------------
    apply_shared_crds(&kubeconfig);
    let values = work.path().join("values.yaml");
    std::fs::write(
        &values,
        local_values(&n, &stream, &format!("kmht.{n}"), &[]),
    )
    .unwrap();
    let values = values.to_string_lossy().into_owned();
    let chart = workspace_root()
        .join("charts/kubemail")
        .to_string_lossy()
        .into_owned();
    let out = helm(&[
        "install",
        &release,
        &chart,
        "-f",
        &values,
        "--wait",
        "--timeout",
        "120s",
    ]);
    assert!(out.status.success(), "helm install: {}", text(&out));

    // Without test values the release has no test: helm says so and passes.
    let out = helm(&["test", &release]);
    assert!(
        out.status.success(),
        "helm test without tests: {}",
        text(&out)
    );

    // --- a MailDomain whose postmaster forwards to mailpit ---------------------------------
    let mailpit_port = env.mailpit_smtp.rsplit(':').next().unwrap();
    let manifest = work.path().join("maildomain.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: kubemail.io/v1alpha1\nkind: MailDomain\nmetadata:\n  name: {MD}\n\
             spec:\n  domain: {DOMAIN}\n  replicas: 1\n  service:\n    type: ClusterIP\n  \
             inbound:\n    recipients: [postmaster]\n    forward:\n      host: 127.0.0.1\n      \
             port: {mailpit_port}\n      protocol: smtp\n      tls: None\n"
        ),
    )
    .unwrap();
    kubectl(&["apply", "-f", &manifest.to_string_lossy()]);
    kubectl(&[
        "wait",
        &format!("maildomain/{MD}"),
        "--for=condition=Ready",
        "--timeout=180s",
    ]);
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &n);
    let selector =
        format!("app.kubernetes.io/instance={MD},app.kubernetes.io/name=kubemail-smtp-node");
    let node = wait_for("the MailDomain's node pod Ready", STEP, || async {
        list_pods(&pods, &selector)
            .await
            .into_iter()
            .find(|p| phase(p) == "Running" && is_ready(p))
            .ok_or_else(|| "no ready node pod".to_owned())
    })
    .await;
    let ip = node
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("the node pod has an IP");
    let server = format!("{ip}:{MX_PORT}");

    // --- helm test with an accepted recipient passes, and the message arrives --------------
    let set_test = |to: &str| {
        let out = helm(&[
            "upgrade",
            &release,
            &chart,
            "--reuse-values",
            "--set",
            "test.enabled=true",
            "--set",
            &format!("test.server={server}"),
            "--set",
            &format!("test.from=helm-test@{DOMAIN}"),
            "--set",
            &format!("test.to={to}"),
        ]);
        assert!(
            out.status.success(),
            "helm upgrade with test values: {}",
            text(&out)
        );
    };
    // The hook pod's log: the agent writes it where a kubelet would serve it from (this
    // cluster has no kubelet API, so `helm test --logs` cannot fetch it here).
    let hook = format!("{release}-kubemail-smoke-send");
    let hook_log =
        || std::fs::read_to_string(cluster.pod_log(&n, &hook, "smoke-send")).unwrap_or_default();
    set_test(&format!("postmaster@{DOMAIN}"));
    let out = helm(&["test", &release, "--timeout", "120s"]);
    let log = format!("{}\n--- hook pod log ---\n{}", text(&out), hook_log());
    assert!(out.status.success(), "helm test must pass:\n{log}");
    assert!(
        log.contains("Phase:          Succeeded")
            && log.contains("accepted the message")
            && log.contains(": 250 "),
        "the hook pod succeeded with the node's 250:\n{log}"
    );
    let subject = format!("kubemail helm test of release {release}");
    let http = reqwest::Client::new();
    wait_for("the helm test message at mailpit", STEP, || async {
        let url = format!(
            "{}/api/v1/search?query=subject:%22{}%22",
            env.mailpit_api,
            subject.replace(' ', "%20")
        );
        let found: serde_json::Value = http
            .get(&url)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        (found["messages_count"].as_u64().unwrap_or(0) > 0)
            .then_some(())
            .ok_or_else(|| format!("not yet: {found}"))
    })
    .await;

    // --- a recipient the domain does not have: the node refuses, helm test fails -----------
    set_test(&format!("nobody@{DOMAIN}"));
    let out = helm(&["test", &release, "--timeout", "120s"]);
    let log = format!("{}\n--- hook pod log ---\n{}", text(&out), hook_log());
    assert!(
        !out.status.success(),
        "helm test must fail on a refused message:\n{log}"
    );
    assert!(
        log.contains("refused RCPT TO: 550"),
        "the failure names the refusal:\n{log}"
    );

    let mds: Api<DynamicObject> = Api::namespaced_with(
        cluster.client.clone(),
        &n,
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "kubemail.io",
            "v1alpha1",
            "MailDomain",
        )),
    );
    let _ = mds.delete(MD, &Default::default()).await;
    wait_for("the MailDomain finalized", STEP, || async {
        match mds.get_opt(MD).await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    ns.delete().await;
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
