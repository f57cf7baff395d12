//! kubemail as a user runs it, on the local real cluster: `helm install` of the chart, the
//! operator as a pod (and rolled by `helm upgrade`), a `kubectl apply`d MailDomain whose nodes
//! run as pods, mail submitted with STARTTLS + AUTH arriving DKIM-signed with keys that match
//! the published records (checked by dkimpy), inbound mail with Authentication-Results,
//! scaling 1 → 3 → 1 without loss, a node pod deleted during a stream without loss, and the
//! MailDomain's and the release's removal cleaning up after themselves.
//!
//! Real helm, kubectl, API server, node agent, NATS, mailpit, Knot DNS, python smtplib + dkimpy.
//! Nodes are reached only at their pod IPs (127.1.x.y), never at Service ClusterIPs.
//! Needs the local cluster (`e2e/local-cluster up`, or `make test`) and built binaries.

// Test helpers panic on purpose: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

#[path = "common/cluster.rs"]
mod cluster;
#[path = "common/mail.rs"]
mod mail;
#[path = "common/queue_security.rs"]
mod queue_security;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cluster::{TestCluster, is_ready, list_pods, phase, unique_name, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Api;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kubemail_e2e::local_env::{LocalEnv, workspace_root};
use mail::{ReleaseCleanup, apply_shared_crds, local_values, run_ok, tool};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Bound on each step's wait (install, Ready, rollout, arrival).
const STEP: Duration = Duration::from_secs(90);
/// Arrival after a pod was killed may need the JetStream ack wait (30 s) for redelivery.
const ARRIVAL_AFTER_KILL: Duration = Duration::from_secs(150);
/// Messages in the stream during which one node pod is deleted.
const STREAM: usize = 200;
/// The pod is deleted after this many messages of the stream were accepted.
const KILL_AFTER: usize = 60;
/// Messages sent just before scaling 3 → 1.
const BURST: usize = 30;
/// Ports of the node listeners and admin endpoint (fixed by the operator's pod template).
const MX_PORT: u16 = 2525;
const SUBMISSION_PORT: u16 = 2587;

const MD: &str = "example-test";
const DOMAIN: &str = "example.test";
const NODE_SELECTOR: &str =
    "app.kubernetes.io/name=kubemail-smtp-node,app.kubernetes.io/instance=example-test";

/// Submits one message on the submission port: STARTTLS verified against the operator CA
/// (chain only: the name is mx.example.test, we connect to an IP), then AUTH PLAIN.
const SUBMIT_PY: &str = r#"
import smtplib, ssl, sys
host, port, cafile, subject = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=cafile)
ctx.check_hostname = False
msg = ("From: Alice <alice@example.test>\r\nTo: Carol <carol@remote.test>\r\n"
       "Subject: %s\r\nMessage-ID: <%s@example.test>\r\n\r\nSigned by kubemail.\r\n" % (subject, subject.replace(" ", ".")))
with smtplib.SMTP(host, port, timeout=30) as s:
    s.ehlo("client.remote.test")
    if not s.has_extn("starttls"):
        sys.exit("no STARTTLS offered")
    s.starttls(context=ctx)
    s.ehlo("client.remote.test")
    s.login("alice@example.test", "wonderland")
    refused = s.sendmail("alice@example.test", ["carol@remote.test"], msg)
    if refused:
        sys.exit("refused: %r" % refused)
print("250 accepted")
"#;

/// Verifies every DKIM-Signature of a raw message with dkimpy, answering the key lookups
/// from the MailDomain's status.dnsRecords only (argv[2], JSON) instead of DNS.
const DKIM_VERIFY_PY: &str = r#"
import json, sys, dkim
raw = open(sys.argv[1], "rb").read()
records = json.load(open(sys.argv[2]))
def dnsfunc(name, timeout=5):
    if isinstance(name, bytes):
        name = name.decode()
    name = name.rstrip(".").lower() + "."
    for r in records:
        if r["type"] == "TXT" and r["name"].lower() == name:
            return r["value"].encode()
    return None
d = dkim.DKIM(raw)
sigs = [v for (k, v) in d.headers if k.lower() == b"dkim-signature"]
out = []
for i, sig in enumerate(sigs):
    tags = dict(t.strip().split(b"=", 1) for t in sig.split(b";") if b"=" in t)
    ok = dkim.DKIM(raw).verify(idx=i, dnsfunc=dnsfunc)
    out.append({"a": tags.get(b"a", b"").decode(), "s": tags.get(b"s", b"").decode().strip(), "ok": bool(ok)})
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn helm_installed_kubemail_serves_signs_scales_survives_pod_loss_and_uninstalls() {
    let env = LocalEnv::load().unwrap_or_else(|e| panic!("{e}"));
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("mailcl").await;
    let n = ns.name.clone();
    let run_tag = unique_name("mc");
    let kubeconfig = cluster.kubeconfig.to_string_lossy().into_owned();
    let work = tempfile::tempdir().unwrap();
    // One queue of our own: no other test or the demo shares its subjects or the consumer.
    let stream = format!("KMCL_{}", n.replace('-', "_").to_uppercase());
    let mut guard = ReleaseCleanup::new(&kubeconfig, &n, &n, MD, &stream);
    let k = Kubectl {
        kubeconfig: kubeconfig.clone(),
        namespace: n.clone(),
    };
    let client = cluster.client.clone();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &n);
    let mds: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &n,
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "kubemail.io",
            "v1alpha1",
            "MailDomain",
        )),
    );
    let http = reqwest::Client::new();
    let mailpit = env.mailpit_api.clone();
    let mailpit_port: u16 = env
        .mailpit_smtp
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("MAILPIT_SMTP is host:port");

    // --- helm install: the operator runs as a pod and becomes Ready -------------------------
    // KUBEMAIL_E2E_CHART: another copy of the chart to install (e.g. a fix under test).
    let chart = std::env::var("KUBEMAIL_E2E_CHART")
        .ok()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| {
            workspace_root()
                .join("charts/kubemail")
                .to_string_lossy()
                .into_owned()
        });
    let helm = tool("helm");
    let values = work.path().join("values.yaml");
    let helm_path = helm.to_string_lossy();
    let rendered = local_values(
        &n,
        &stream,
        &format!("kmcl.{n}"),
        &[("HELM", &helm_path), ("KUBEMAIL_CHART", &chart)],
    );
    std::fs::write(&values, &rendered).unwrap();
    let values = values.to_string_lossy().into_owned();
    let release = n.clone();
    let helm_args = |verb: &str, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            verb,
            &release,
            &chart,
            "--kubeconfig",
            &kubeconfig,
            "--namespace",
            &n,
            "-f",
            &values,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    apply_shared_crds(&kubeconfig);
    let args = helm_args("install", &[]);
    run_ok(&helm, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let op_selector =
        format!("app.kubernetes.io/instance={release},app.kubernetes.io/component=operator");
    let first = ready_pods(
        &pods,
        &op_selector,
        1,
        "the operator pod after helm install",
    )
    .await;
    let first_name = first[0].metadata.name.clone().unwrap();
    eprintln!("[install] operator pod {first_name} Ready");

    // --- helm upgrade with a changed value rolls the operator ------------------------------
    let args = helm_args("upgrade", &["--set", "operator.logLevel=debug"]);
    run_ok(&helm, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let rolled = wait_for(
        "helm upgrade to replace the operator pod with a Ready one running RUST_LOG=debug \
         (if the new pod crash-loops, see its log under $KUBEMAIL_AGENT_STATE/pods/)",
        STEP,
        || async {
            let list = list_pods(&pods, &op_selector).await;
            let mut summary = pod_summary(&list);
            // A new pod that is not Ready: its last log line usually says why.
            for p in list.iter().filter(|p| !usable(p)) {
                let name = p.metadata.name.as_deref().unwrap_or("?");
                let log = std::fs::read_to_string(cluster.pod_log(&n, name, "operator"))
                    .unwrap_or_default();
                if let Some(last) = log.lines().rev().find(|l| !l.trim().is_empty()) {
                    summary.push_str(&format!("; {name} last log line: {last}"));
                }
            }
            if list.len() != 1 {
                return Err(summary);
            }
            let p = &list[0];
            let new = p.metadata.name.as_deref() != Some(first_name.as_str());
            let debug = p
                .spec
                .as_ref()
                .and_then(|s| s.containers[0].env.as_ref())
                .is_some_and(|e| {
                    e.iter()
                        .any(|v| v.name == "RUST_LOG" && v.value.as_deref() == Some("debug"))
                });
            (new && debug && usable(p))
                .then(|| p.clone())
                .ok_or(summary)
        },
    )
    .await;
    eprintln!(
        "[upgrade] operator rolled: {first_name} -> {}",
        rolled.metadata.name.as_deref().unwrap_or("?")
    );

    // --- kubectl apply of the MailDomain reaches Ready; its nodes run as pods ---------------
    let manifest = work.path().join("maildomain.yaml");
    std::fs::write(&manifest, maildomain_manifest(mailpit_port)).unwrap();
    k.ok(&["apply", "-f", &manifest.to_string_lossy()]);
    wait_md_ready(&mds, 1).await;
    let nodes = ready_pods(&pods, NODE_SELECTOR, 1, "the MailDomain's node pod").await;
    let ip = pod_ip(&nodes[0]);
    eprintln!("[maildomain] Ready, node pod at {ip}");

    // --- submission with STARTTLS + AUTH; DKIM verified against status.dnsRecords ------------
    let tls: Secret = Api::namespaced(client.clone(), &n)
        .get(&format!("{MD}-tls"))
        .await
        .expect("the MailDomain's TLS Secret");
    let ca = work.path().join("ca.crt");
    std::fs::write(&ca, &tls.data.as_ref().unwrap()["ca.crt"].0).unwrap();
    let submit_py = write(work.path(), "submit.py", SUBMIT_PY);
    let subject = format!("{run_tag} submit");
    let out = run_ok(
        &tool("python3"),
        &[
            &submit_py,
            &ip.to_string(),
            &SUBMISSION_PORT.to_string(),
            &ca.to_string_lossy(),
            &subject,
        ],
    );
    assert!(out.contains("250"), "{out}");
    let arrived = wait_arrivals(
        &http,
        &mailpit,
        &subject,
        std::slice::from_ref(&subject),
        STEP,
    )
    .await;
    let id = arrived[&subject][0].clone();
    let raw = http
        .get(format!("{mailpit}/api/v1/message/{id}/raw"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let raw_file = work.path().join("submitted.eml");
    std::fs::write(&raw_file, &raw).unwrap();
    let md = mds.get(MD).await.unwrap();
    let records = md.data["status"]["dnsRecords"].clone();
    let records_file = work.path().join("records.json");
    std::fs::write(&records_file, records.to_string()).unwrap();
    let verify_py = write(work.path(), "dkim_verify.py", DKIM_VERIFY_PY);
    let verdicts: Vec<Value> = serde_json::from_str(
        run_ok(
            &tool("python3"),
            &[
                &verify_py,
                &raw_file.to_string_lossy(),
                &records_file.to_string_lossy(),
            ],
        )
        .trim(),
    )
    .expect("dkim_verify.py prints JSON");
    eprintln!("[dkim] dkimpy verdicts with the published records: {verdicts:?}");
    for algorithm in ["rsa-sha256", "ed25519-sha256"] {
        assert!(
            verdicts
                .iter()
                .any(|v| v["a"] == algorithm && v["ok"] == true),
            "no valid {algorithm} DKIM signature verifiable with status.dnsRecords: {verdicts:?}; records: {records}"
        );
    }
    assert!(
        verdicts.iter().all(|v| v["ok"] == true),
        "every DKIM signature verifies: {verdicts:?}"
    );

    // --- inbound on the MX port reaches the forward target with Authentication-Results -------
    let subject = format!("{run_tag} inbound");
    smtp_send(SocketAddr::new(ip, MX_PORT), &subject)
        .await
        .unwrap_or_else(|e| panic!("MX delivery to bob@{DOMAIN} on {ip}:{MX_PORT}: {e}"));
    let arrived = wait_arrivals(
        &http,
        &mailpit,
        &subject,
        std::slice::from_ref(&subject),
        STEP,
    )
    .await;
    let id = &arrived[&subject][0];
    let headers: Value = http
        .get(format!("{mailpit}/api/v1/message/{id}/headers"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ar = &headers["Authentication-Results"];
    assert!(
        ar.as_array().is_some_and(|a| !a.is_empty()),
        "inbound mail has no Authentication-Results header: {headers}"
    );
    eprintln!("[inbound] Authentication-Results: {ar}");

    // --- queue security: the domain's NATS credentials reach its queue only ----------------
    queue_security::check(&env, &client, &n, MD, DOMAIN, &stream, &format!("kmcl.{n}")).await;

    // --- scale 1 -> 3: three serving nodes, each accepts mail --------------------------------
    patch_replicas(&mds, 3).await;
    wait_md_ready(&mds, 3).await;
    let nodes = ready_pods(&pods, NODE_SELECTOR, 3, "3 node pods after scaling up").await;
    let ips: Vec<IpAddr> = nodes.iter().map(pod_ip).collect();
    let mut expected = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let subject = format!("{run_tag} scale-{i}");
        smtp_send(SocketAddr::new(*ip, MX_PORT), &subject)
            .await
            .unwrap_or_else(|e| panic!("node {ip} after scaling to 3: {e}"));
        expected.push(subject);
    }
    wait_arrivals(
        &http,
        &mailpit,
        &format!("{run_tag} scale-"),
        &expected,
        STEP,
    )
    .await;
    eprintln!("[scale] 3 nodes {ips:?} each accepted a message; all arrived");

    // --- a node pod deleted during a stream of STREAM messages loses none --------------------
    let stream_stats = stream_with_pod_kill(&pods, &run_tag).await;
    let counts = wait_arrivals(
        &http,
        &mailpit,
        &format!("{run_tag} stream-"),
        &stream_stats.accepted,
        ARRIVAL_AFTER_KILL,
    )
    .await;
    let duplicates: usize = counts.values().map(|ids| ids.len().saturating_sub(1)).sum();
    let delivered = stream_stats
        .accepted
        .iter()
        .filter(|s| counts.contains_key(*s))
        .count();
    eprintln!(
        "[pod loss] sent {} accepted {} refused/failed {} delivered {} duplicates {} (pod {} deleted after {} accepted)",
        STREAM,
        stream_stats.accepted.len(),
        stream_stats.failed.len(),
        delivered,
        duplicates,
        stream_stats.killed,
        KILL_AFTER
    );
    if !stream_stats.failed.is_empty() {
        eprintln!(
            "[pod loss] first failures: {:?}",
            &stream_stats.failed[..stream_stats.failed.len().min(5)]
        );
    }
    assert!(
        stream_stats.accepted.len() >= KILL_AFTER,
        "too few messages accepted to mean anything"
    );
    // Unsolicited deliveries (never acknowledged with 250) would show up as extra subjects.
    let unexpected: Vec<&String> = counts
        .keys()
        .filter(|s| !stream_stats.accepted.contains(*s))
        .collect();
    eprintln!(
        "[pod loss] delivered although not answered 250: {}",
        unexpected.len()
    );

    // --- burst just before scaling 3 -> 1: the drained nodes lose nothing -------------------
    let nodes = ready_pods(&pods, NODE_SELECTOR, 3, "3 node pods before scaling down").await;
    let ips: Vec<IpAddr> = nodes.iter().map(pod_ip).collect();
    let mut burst = Vec::new();
    for i in 0..BURST {
        let subject = format!("{run_tag} burst-{i}");
        let ip = ips[i % ips.len()];
        smtp_send(SocketAddr::new(ip, MX_PORT), &subject)
            .await
            .unwrap_or_else(|e| panic!("burst message {i} to {ip}: {e}"));
        burst.push(subject);
    }
    patch_replicas(&mds, 1).await;
    ready_pods(&pods, NODE_SELECTOR, 1, "1 node pod after scaling down").await;
    wait_md_ready(&mds, 1).await;
    let counts = wait_arrivals(&http, &mailpit, &format!("{run_tag} burst-"), &burst, STEP).await;
    let burst_dups: usize = counts.values().map(|ids| ids.len().saturating_sub(1)).sum();
    eprintln!(
        "[scale down] burst of {BURST} sent just before 3 -> 1: all {} arrived, duplicates {burst_dups}",
        burst.len()
    );

    // --- deleting the MailDomain removes its children and its queue consumer -----------------
    let consumer = kubemail_queue::consumer_name(DOMAIN);
    let nats = env.nats_connect().await.expect("connect to NATS");
    let js = async_nats::jetstream::new(nats);
    assert!(
        js.get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            &consumer, &stream
        )
        .await
        .is_ok(),
        "the domain's consumer {consumer} exists on {stream} while the domain is served"
    );
    k.ok(&["delete", "maildomain", MD, "--timeout=90s"]);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &n);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &n);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &n);
    let services: Api<Service> = Api::namespaced(client.clone(), &n);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &n);
    wait_for(
        "the MailDomain's children to be garbage-collected",
        STEP,
        || async {
            let mut left = Vec::new();
            if deployments.get_opt(MD).await.ok().flatten().is_some() {
                left.push("Deployment".to_string());
            }
            for cm in [format!("{MD}-config"), format!("{MD}-dns")] {
                if config_maps.get_opt(&cm).await.ok().flatten().is_some() {
                    left.push(format!("ConfigMap {cm}"));
                }
            }
            for s in [
                format!("{MD}-dkim"),
                format!("{MD}-tls"),
                format!("{MD}-users-hashed"),
            ] {
                if secrets.get_opt(&s).await.ok().flatten().is_some() {
                    left.push(format!("Secret {s}"));
                }
            }
            if services.get_opt(MD).await.ok().flatten().is_some() {
                left.push("Service".into());
            }
            if pdbs.get_opt(MD).await.ok().flatten().is_some() {
                left.push("PodDisruptionBudget".into());
            }
            if !list_pods(&pods, NODE_SELECTOR).await.is_empty() {
                left.push("node pods".into());
            }
            left.is_empty().then_some(()).ok_or(left.join(", "))
        },
    )
    .await;
    wait_for(
        &format!("the finalizer to delete consumer {consumer} on {stream}"),
        STEP,
        || async {
            match js
                .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                    &consumer, &stream,
                )
                .await
            {
                Err(_) => Ok(()),
                Ok(_) => Err("still there".to_string()),
            }
        },
    )
    .await;
    eprintln!("[delete] children and consumer {consumer} gone");

    // --- helm uninstall removes the operator -------------------------------------------------
    run_ok(
        &helm,
        &[
            "uninstall",
            &release,
            "--kubeconfig",
            &kubeconfig,
            "--namespace",
            &n,
            "--wait",
            "--timeout",
            "90s",
        ],
    );
    wait_for("helm uninstall to remove the operator", STEP, || async {
        let left = list_pods(&pods, &op_selector).await;
        let deployment = deployments
            .get_opt(&format!("{release}-kubemail-operator"))
            .await
            .ok()
            .flatten();
        (left.is_empty() && deployment.is_none())
            .then_some(())
            .ok_or_else(|| pod_summary(&left))
    })
    .await;
    eprintln!("[uninstall] operator gone");
    guard.finish();
    ns.delete().await;
}

/// What the stream with a pod deletion saw.
struct StreamStats {
    accepted: Vec<String>,
    failed: Vec<String>,
    killed: String,
}

/// Sends STREAM messages round-robin over the Ready node pods (re-listed every few messages)
/// and deletes one node pod after KILL_AFTER were accepted.
async fn stream_with_pod_kill(pods: &Api<Pod>, run_tag: &str) -> StreamStats {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut accepted = Vec::new();
    let mut failed = Vec::new();
    let mut killed = String::new();
    let mut ips: Vec<IpAddr> = Vec::new();
    for i in 0..STREAM {
        assert!(
            Instant::now() < deadline,
            "the stream took longer than 180 s"
        );
        if i % 5 == 0 || ips.is_empty() {
            let list = list_pods(pods, NODE_SELECTOR).await;
            let fresh: Vec<IpAddr> = list.iter().filter(|p| usable(p)).map(pod_ip).collect();
            if !fresh.is_empty() {
                ips = fresh;
            }
        }
        if killed.is_empty() && accepted.len() >= KILL_AFTER {
            let list = list_pods(pods, NODE_SELECTOR).await;
            let victim = list
                .iter()
                .find(|p| usable(p))
                .expect("a node pod to delete");
            killed = victim.metadata.name.clone().unwrap();
            eprintln!("[pod loss] deleting {killed} ({})", pod_ip(victim));
            pods.delete(&killed, &DeleteParams::default())
                .await
                .expect("delete a node pod");
        }
        let subject = format!("{run_tag} stream-{i}");
        let ip = ips[i % ips.len()];
        match smtp_send(SocketAddr::new(ip, MX_PORT), &subject).await {
            Ok(()) => accepted.push(subject),
            Err(e) => {
                failed.push(format!("{subject} via {ip}: {e}"));
                // A refused connection is the deleted pod: look again before the next one.
                ips.clear();
            }
        }
    }
    StreamStats {
        accepted,
        failed,
        killed,
    }
}

/// kubectl in the test namespace.
struct Kubectl {
    kubeconfig: String,
    namespace: String,
}

impl Kubectl {
    fn ok(&self, args: &[&str]) -> String {
        let mut all = vec!["--kubeconfig", &self.kubeconfig, "-n", &self.namespace];
        all.extend_from_slice(args);
        run_ok(&tool("kubectl"), &all)
    }
}

fn maildomain_manifest(mailpit_port: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Secret
metadata:
  name: {MD}-users
type: Opaque
stringData:
  alice: wonderland
---
apiVersion: kubemail.io/v1alpha1
kind: MailDomain
metadata:
  name: {MD}
spec:
  domain: {DOMAIN}
  replicas: 1
  service:
    type: ClusterIP
  inbound:
    recipients: [postmaster, bob]
    forward:
      host: 127.0.0.1
      port: {mailpit_port}
      protocol: smtp
      tls: None
  submission:
    usersSecretRef: {{ name: {MD}-users }}
"#
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p: PathBuf = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

/// Running, Ready and not being deleted.
fn usable(p: &Pod) -> bool {
    phase(p) == "Running" && is_ready(p) && p.metadata.deletion_timestamp.is_none()
}

fn pod_ip(p: &Pod) -> IpAddr {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "pod {} has no podIP",
                p.metadata.name.as_deref().unwrap_or("?")
            )
        })
}

fn pod_summary(list: &[Pod]) -> String {
    let pods: Vec<String> = list
        .iter()
        .map(|p| {
            format!(
                "{}:{}:ready={}:deleting={}",
                p.metadata.name.as_deref().unwrap_or("?"),
                phase(p),
                is_ready(p),
                p.metadata.deletion_timestamp.is_some()
            )
        })
        .collect();
    format!("{} pods [{}]", list.len(), pods.join(", "))
}

/// Waits until exactly `n` pods match `selector` and all are usable (none terminating).
async fn ready_pods(pods: &Api<Pod>, selector: &str, n: usize, what: &str) -> Vec<Pod> {
    wait_for(&format!("{what}: {n} Running+Ready"), STEP, || async {
        let list = list_pods(pods, selector).await;
        (list.len() == n && list.iter().all(usable))
            .then(|| list.clone())
            .ok_or_else(|| pod_summary(&list))
    })
    .await
}

/// Waits for the MailDomain's Ready condition True with `replicas` ready replicas.
async fn wait_md_ready(mds: &Api<DynamicObject>, replicas: i64) {
    wait_for(
        &format!("MailDomain {MD} Ready with {replicas} ready replicas"),
        STEP,
        || async {
            let md = mds.get(MD).await.map_err(|e| e.to_string())?;
            let status = &md.data["status"];
            let ready = status["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Ready")
                .cloned()
                .unwrap_or(Value::Null);
            let observed = status["observedGeneration"].as_i64() == md.metadata.generation;
            if ready["status"] == "True"
                && status["readyReplicas"].as_i64() == Some(replicas)
                && observed
            {
                Ok(())
            } else {
                Err(format!(
                    "Ready={ready} readyReplicas={} observedGeneration={} generation={:?}",
                    status["readyReplicas"], status["observedGeneration"], md.metadata.generation
                ))
            }
        },
    )
    .await
}

async fn patch_replicas(mds: &Api<DynamicObject>, replicas: i64) {
    mds.patch(
        MD,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "replicas": replicas } })),
    )
    .await
    .unwrap_or_else(|e| panic!("patch spec.replicas={replicas}: {e}"));
}

/// Subject -> mailpit IDs of every message whose subject contains `query`, paginated.
async fn mailpit_subjects(
    http: &reqwest::Client,
    api: &str,
    query: &str,
) -> Result<BTreeMap<String, Vec<String>>, String> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut start = 0usize;
    loop {
        let page: Value = http
            .get(format!("{api}/api/v1/search"))
            .query(&[
                ("query", format!("subject:\"{query}\"")),
                ("limit", "500".to_string()),
                ("start", start.to_string()),
            ])
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let msgs = page["messages"].as_array().cloned().unwrap_or_default();
        if msgs.is_empty() {
            return Ok(out);
        }
        start += msgs.len();
        for m in msgs {
            let subject = m["Subject"].as_str().unwrap_or_default().to_string();
            let id = m["ID"].as_str().unwrap_or_default().to_string();
            out.entry(subject).or_default().push(id);
        }
    }
}

/// Waits until every subject in `expected` is at mailpit; returns subject -> IDs of all
/// messages matching `query` (so duplicates can be counted).
async fn wait_arrivals(
    http: &reqwest::Client,
    api: &str,
    query: &str,
    expected: &[String],
    timeout: Duration,
) -> BTreeMap<String, Vec<String>> {
    wait_for(
        &format!("{} message(s) '{query}*' at mailpit", expected.len()),
        timeout,
        || async {
            let found = mailpit_subjects(http, api, query).await?;
            let missing: Vec<&String> = expected
                .iter()
                .filter(|s| !found.contains_key(*s))
                .collect();
            if missing.is_empty() {
                Ok(found)
            } else {
                Err(format!(
                    "{} of {} missing, e.g. {:?}",
                    missing.len(),
                    expected.len(),
                    &missing[..missing.len().min(5)]
                ))
            }
        },
    )
    .await
}

/// One message from sender@remote.test to bob@example.test over plain SMTP (the MX port);
/// Ok only when the end of DATA was answered 250.
async fn smtp_send(addr: SocketAddr, subject: &str) -> Result<(), String> {
    tokio::time::timeout(Duration::from_secs(30), smtp_send_inner(addr, subject))
        .await
        .map_err(|_| "timed out after 30 s".to_string())?
}

async fn smtp_send_inner(addr: SocketAddr, subject: &str) -> Result<(), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    expect(&mut rd, 220, "greeting").await?;
    let body = format!(
        "From: Sender <sender@remote.test>\r\nTo: Bob <bob@{DOMAIN}>\r\nSubject: {subject}\r\n\
         Message-ID: <{}@remote.test>\r\n\r\nkubemail mail-cluster test\r\n",
        subject.replace(' ', ".")
    );
    for (cmd, code) in [
        ("EHLO client.remote.test\r\n".to_string(), 250),
        ("MAIL FROM:<sender@remote.test>\r\n".to_string(), 250),
        (format!("RCPT TO:<bob@{DOMAIN}>\r\n"), 250),
        ("DATA\r\n".to_string(), 354),
        (format!("{body}.\r\n"), 250),
    ] {
        wr.write_all(cmd.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        expect(&mut rd, code, cmd.lines().next().unwrap_or_default()).await?;
    }
    let _ = wr.write_all(b"QUIT\r\n").await;
    Ok(())
}

async fn expect<R: tokio::io::AsyncBufRead + Unpin>(
    rd: &mut R,
    code: u16,
    after: &str,
) -> Result<(), String> {
    let mut reply = String::new();
    loop {
        let mut line = String::new();
        let n = rd
            .read_line(&mut line)
            .await
            .map_err(|e| format!("read after {after}: {e}"))?;
        if n == 0 {
            return Err(format!(
                "connection closed after {after} (so far: {reply:?})"
            ));
        }
        reply.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            break;
        }
    }
    if reply.get(..3) == Some(code.to_string().as_str()) {
        Ok(())
    } else {
        Err(format!(
            "after {after}: expected {code}, got {:?}",
            reply.trim_end()
        ))
    }
}
