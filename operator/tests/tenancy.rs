//! Sharing one operator between tenants, against the real local cluster: a domain claimed twice
//! (the later claim gets `DomainConflict`, makes nothing, and its deletion leaves the owner's
//! consumer and queued mail alone), scaling through the MailDomain's scale subresource
//! (`kubectl scale`, a HorizontalPodAutoscaler) without the operator reverting it, and the
//! namespaced RBAC mode (the chart's Roles, no ClusterRole on Secrets) with the operator running
//! as its ServiceAccount.
//!
//! Needs `e2e/local-cluster up` and its env, the `smtp-node` binary built, and kubectl and helm
//! (on PATH or in `$KUBEMAIL_CACHE/tools`).

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer};
use common::maildomain::{apply_md, condition, md_api, wait_condition, wait_condition_by};
use common::{
    Operator, OperatorOptions, TestNamespace, client, delete_stream, install_crds, nats_connect,
    wait_for,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client, ResourceExt};
use kubemail_queue::{Direction, QueueEntry, QueueId};
use serde_json::json;

const READY_TIMEOUT: Duration = Duration::from_secs(180);
const CHILDREN_TIMEOUT: Duration = Duration::from_secs(60);

/// A tool from PATH or from the pinned tools under `$KUBEMAIL_CACHE/tools/<name>-<version>/`.
fn tool(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    on_path
        .or_else(|| {
            let cache = std::env::var_os("KUBEMAIL_CACHE")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/kubemail"))
                })?;
            std::fs::read_dir(cache.join("tools"))
                .ok()?
                .flatten()
                .map(|e| e.path().join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!("{name} not found on PATH or in $KUBEMAIL_CACHE/tools (make setup)")
        })
}

/// Runs `program args` (stdin from `input`), returning stdout; panics with stderr on failure.
fn run(program: &str, args: &[&str], input: Option<&str>) -> String {
    use std::io::Write as _;
    let mut child = Command::new(tool(program))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    if let Some(text) = input {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The names of the objects of kind `K` in `ns` that carry `kubemail.io/maildomain=<md>`.
async fn children<K>(client: &Client, ns: &str, md: &str) -> Vec<String>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    Api::<K>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("kubemail.io/maildomain={md}")))
        .await
        .unwrap()
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect()
}

/// A queue entry for `domain` that its nodes keep deferring (due in a day): mail that waits in
/// the domain's consumer.
async fn queue_waiting_mail(js: &jetstream::Context, prefix: &str, domain: &str) {
    let entry = QueueEntry {
        not_before: Some(SystemTime::now() + Duration::from_secs(86_400)),
        ..QueueEntry::new(
            QueueId::new(),
            "sender@elsewhere.test".into(),
            vec![format!("bob@{domain}")],
            Direction::Inbound,
            domain.into(),
            SystemTime::now(),
        )
    };
    js.publish_with_headers(
        kubemail_queue::subject(prefix, domain),
        entry.to_headers(&entry.msg_id()),
        "Subject: waiting\r\n\r\nstill here\r\n".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// Entries the domain's consumer holds (waiting, in flight or deferred).
async fn held(js: &jetstream::Context, stream: &str, domain: &str) -> Option<u64> {
    let mut c = js
        .get_consumer_from_stream::<consumer::pull::Config, _, _>(
            kubemail_queue::consumer_name(domain),
            stream,
        )
        .await
        .ok()?;
    let info = c.info().await.ok()?;
    Some(info.num_pending + u64::try_from(info.num_ack_pending).unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_claim_of_a_domain_gets_domain_conflict_makes_nothing_and_leaves_the_owner_alone() {
    let client = client().await;
    install_crds(&client).await;
    let owner_ns = TestNamespace::create(&client, "own-a").await;
    let other_ns = TestNamespace::create(&client, "own-b").await;
    let (a, b) = (owner_ns.name.as_str(), other_ns.name.as_str());
    // One operator, both tenants' namespaces.
    let mut opts = OperatorOptions::for_namespace(&owner_ns, "own-a");
    opts.extra_args = vec!["--watch-namespaces".into(), b.into()];
    let mut op = Operator::start(&opts);
    let spec = json!({
        "domain": "conflict.test",
        "replicas": 1,
        "service": { "type": "ClusterIP" },
        "inbound": { "catchAll": true },
    });

    apply_md(&client, a, "shop", spec.clone()).await;
    wait_condition(&client, a, "shop", "Ready", "True", READY_TIMEOUT, &op).await;
    // The owner's nodes pull from the domain's consumer; a message waits in it.
    let js = jetstream::new(
        nats_connect()
            .await
            .expect("connect to the local cluster's NATS"),
    );
    wait_for(
        "the owner's delivery consumer",
        CHILDREN_TIMEOUT,
        || async { held(&js, &owner_ns.nats_stream(), "conflict.test").await },
    )
    .await;
    queue_waiting_mail(&js, &owner_ns.subject_prefix(), "conflict.test").await;
    wait_for(
        "the queued entry in the consumer",
        CHILDREN_TIMEOUT,
        || async {
            (held(&js, &owner_ns.nats_stream(), "conflict.test").await? == 1).then_some(())
        },
    )
    .await;

    // The second tenant claims the same domain.
    apply_md(&client, b, "copycat", spec.clone()).await;
    let loser = wait_condition_by(
        &client,
        b,
        "copycat",
        "Ready",
        |c| c.status == "False" && c.reason == "DomainConflict",
        CHILDREN_TIMEOUT,
        &op,
    )
    .await;
    let message = &condition(&loser, "Ready").unwrap().message;
    assert!(message.contains("conflict.test"), "{message}");
    assert!(
        !message.contains(a) && !message.contains("shop"),
        "the condition must not name the other tenant's object: {message}"
    );
    let status = loser.status.clone().unwrap();
    assert!(status.dns_records.is_empty(), "no DNS records: {status:?}");
    assert_eq!(status.conditions.len(), 1, "{status:?}");
    // Nothing was made for it, and it stays that way over further reconciles.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        children::<Deployment>(&client, b, "copycat").await,
        Vec::<String>::new()
    );
    assert_eq!(
        children::<ConfigMap>(&client, b, "copycat").await,
        Vec::<String>::new()
    );
    assert_eq!(
        children::<Secret>(&client, b, "copycat").await,
        Vec::<String>::new()
    );
    assert_eq!(
        children::<Service>(&client, b, "copycat").await,
        Vec::<String>::new()
    );
    let owner = md_api(&client, a).get("shop").await.unwrap();
    assert_eq!(
        condition(&owner, "Ready").map(|c| c.status.as_str()),
        Some("True"),
        "the owner is untouched"
    );

    // Deleting the later claim never touches the owner's consumer or its mail.
    md_api(&client, b)
        .delete("copycat", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the later claim to be finalized",
        CHILDREN_TIMEOUT,
        || async {
            md_api(&client, b)
                .get_opt("copycat")
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        held(&js, &owner_ns.nats_stream(), "conflict.test").await,
        Some(1),
        "the owner's consumer and its queued entry survive the deletion of the later claim"
    );
    let owner = md_api(&client, a).get("shop").await.unwrap();
    assert_eq!(
        condition(&owner, "Ready").map(|c| c.status.as_str()),
        Some("True")
    );

    // Once the owner is gone, the domain is free: a new claim takes over.
    apply_md(&client, b, "copycat", spec).await;
    wait_condition_by(
        &client,
        b,
        "copycat",
        "Ready",
        |c| c.reason == "DomainConflict",
        CHILDREN_TIMEOUT,
        &op,
    )
    .await;
    md_api(&client, a)
        .delete("shop", &DeleteParams::default())
        .await
        .unwrap();
    wait_condition(&client, b, "copycat", "Ready", "True", READY_TIMEOUT, &op).await;

    let logs = op.logs();
    assert!(op.stop(Duration::from_secs(20)), "clean exit:\n{logs}");
    delete_stream(&owner_ns.nats_stream()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_scale_and_an_hpa_scale_the_maildomain_and_the_operator_keeps_it() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "scale").await;
    let n = ns.name.as_str();
    let op = Operator::start(&OperatorOptions::for_namespace(&ns, "scale-a"));
    apply_md(
        &client,
        n,
        "example-com",
        json!({ "domain": "scale.test", "replicas": 1, "service": { "type": "ClusterIP" } }),
    )
    .await;
    let ready = wait_condition(
        &client,
        n,
        "example-com",
        "Ready",
        "True",
        READY_TIMEOUT,
        &op,
    )
    .await;
    let status = ready.status.unwrap();
    assert_eq!(status.replicas, 1);
    let selector = status.selector.clone().expect("status.selector");
    assert!(
        selector.contains("app.kubernetes.io/instance=example-com"),
        "{selector}"
    );

    // kubectl scale goes through the scale subresource.
    let scale = run(
        "kubectl",
        &[
            "-n",
            n,
            "get",
            "--raw",
            &format!("/apis/kubemail.io/v1alpha1/namespaces/{n}/maildomains/example-com/scale"),
        ],
        None,
    );
    let scale: serde_json::Value = serde_json::from_str(&scale).unwrap();
    assert_eq!(scale["spec"]["replicas"], 1, "{scale}");
    assert_eq!(scale["status"]["selector"], selector.as_str(), "{scale}");
    run(
        "kubectl",
        &["-n", n, "scale", "maildomain/example-com", "--replicas=2"],
        None,
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), n);
    let replicas = |want: i32| {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get("example-com").await.ok()?;
            (d.spec?.replicas == Some(want)).then_some(())
        }
    };
    wait_for(
        "the Deployment to follow kubectl scale",
        CHILDREN_TIMEOUT,
        || replicas(2),
    )
    .await;
    let two = wait_condition_by(
        &client,
        n,
        "example-com",
        "Ready",
        |c| c.status == "True",
        READY_TIMEOUT,
        &op,
    )
    .await;
    assert_eq!(two.spec.replicas, 2);
    // A resync later the operator still keeps 2 (it never reverts a scale).
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        replicas(2).await.is_some(),
        "the operator reverted kubectl scale"
    );
    wait_for("status.replicas 2", READY_TIMEOUT, || async {
        let md = md_api(&client, n).get("example-com").await.ok()?;
        (md.status?.replicas == 2).then_some(())
    })
    .await;

    // The example HPA is accepted as written (schema of the real API server), and an HPA
    // with a floor above the current count scales the MailDomain through the subresource
    // (the HPA controller enforces minReplicas even before it has metrics).
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../manifests/examples/maildomain-autoscaling.yaml"),
    )
    .unwrap()
    .replace("namespace: mail", &format!("namespace: {n}"))
    .replace("minReplicas: 2 ", "minReplicas: 3 ");
    run("kubectl", &["apply", "-f", "-"], Some(&example));
    wait_for(
        "the HPA to scale the MailDomain to its floor of 3",
        Duration::from_secs(90),
        || async {
            let md = md_api(&client, n).get("example-com").await.ok()?;
            (md.spec.replicas == 3).then_some(())
        },
    )
    .await;
    wait_for("the Deployment to follow the HPA", CHILDREN_TIMEOUT, || {
        replicas(3)
    })
    .await;
    run("kubectl", &["-n", n, "delete", "hpa", "example-com"], None);
    drop(op);
    delete_stream(&ns.nats_stream()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_watch_namespaces_the_operator_runs_on_the_charts_roles_without_cluster_secret_access()
{
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "rbac").await;
    let other = TestNamespace::create(&client, "rbac-x").await;
    let n = ns.name.as_str();
    // The chart's RBAC and ServiceAccount in namespaced mode, release = the namespace.
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/kubemail");
    let rendered = run(
        "helm",
        &[
            "template",
            n,
            chart.to_str().unwrap(),
            "--namespace",
            n,
            "--kube-version",
            "1.36.3",
            "--set",
            &format!("operator.watchNamespaces={{{n}}}"),
            "--show-only",
            "templates/rbac.yaml",
            "--show-only",
            "templates/serviceaccount.yaml",
        ],
        None,
    );
    run("kubectl", &["apply", "-n", n, "-f", "-"], Some(&rendered));
    let sa = format!("{n}-kubemail-operator");
    let who = format!("system:serviceaccount:{n}:{sa}");
    let can = |args: &[&str]| {
        let mut full = vec!["auth", "can-i", "--as", who.as_str()];
        full.extend_from_slice(args);
        let out = Command::new(tool("kubectl")).args(&full).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(can(&["list", "secrets", "-n", n]), "yes");
    assert_eq!(can(&["get", "secrets", "-n", &other.name]), "no");
    assert_eq!(can(&["list", "secrets", "--all-namespaces"]), "no");
    assert_eq!(can(&["watch", "configmaps", "--all-namespaces"]), "no");
    assert_eq!(can(&["list", "deployments", "-n", &other.name]), "no");

    // The operator as that ServiceAccount: a token, nothing else.
    let token = run(
        "kubectl",
        &["-n", n, "create", "token", &sa, "--duration", "1h"],
        None,
    );
    let admin = run(
        "kubectl",
        &[
            "config",
            "view",
            "--raw",
            "--minify",
            "--flatten",
            "-o",
            "json",
        ],
        None,
    );
    let admin: serde_json::Value = serde_json::from_str(&admin).unwrap();
    let cluster = &admin["clusters"][0]["cluster"];
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "local", "cluster": cluster }],
        "users": [{ "name": "operator", "user": { "token": token.trim() } }],
        "contexts": [{ "name": "operator", "context": { "cluster": "local", "user": "operator" } }],
        "current-context": "operator",
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, serde_json::to_string(&kubeconfig).unwrap()).unwrap();
    let mut opts = OperatorOptions::for_namespace(&ns, "rbac-a");
    opts.kubeconfig = Some(path.to_string_lossy().into_owned());
    let mut op = Operator::start(&opts);
    apply_md(
        &client,
        n,
        "example-com",
        json!({ "domain": "rbac.test", "replicas": 1, "service": { "type": "ClusterIP" } }),
    )
    .await;
    wait_condition(
        &client,
        n,
        "example-com",
        "Ready",
        "True",
        READY_TIMEOUT,
        &op,
    )
    .await;
    let logs = op.logs();
    assert!(
        !logs.contains("forbidden"),
        "the operator needed more than its Roles:\n{logs}"
    );
    assert!(op.stop(Duration::from_secs(20)), "clean exit:\n{logs}");
    delete_stream(&ns.nats_stream()).await;
    let _ = run(
        "kubectl",
        &[
            "delete",
            "clusterrole,clusterrolebinding",
            &format!("{n}-kubemail-operator"),
        ],
        None,
    );
}
