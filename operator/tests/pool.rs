//! A MailPool shared by two tenants, against the real local cluster (operator, node agent
//! running the pool's smtp-node pod, nats-server): the pool admits namespaces by label, each
//! tenant's mail reaches only its own forward target, a user of one tenant cannot send as the
//! other's domain, a namespace the pool does not admit gets `NotAllowedByPool`, and a domain
//! attached to the running pool is served without a pod restart and without dropping an open
//! SMTP session. The local cluster's NATS is authenticated: the pool's nodes run on one
//! credential the operator mints for every attached domain, re-minted (and picked up by the
//! running node) when a domain attaches.
//!
//! Needs `e2e/local-cluster up` and its env, the `smtp-node` binary built, and python3.

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::maildomain::{apply_md, condition, wait_condition, wait_condition_by};
use common::{
    Operator, OperatorOptions, TEST_MANAGER, TestNamespace, client, delete_stream, install_crds,
    wait_for,
};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams};
use kube::{Api, Client};
use kubemail_operator::crd::MailPool;
use kubemail_operator::nats::jwt::{self, UserNats};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// The documented bound for a newly attached domain: the kubelet's volume sync (the local
/// node agent syncs every 30 s; a kubelet up to about a minute) plus the node's 5 s reload.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(90);

/// A loopback SMTP server that accepts everything and keeps each message's text.
async fn sink() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let messages = Arc::new(Mutex::new(Vec::new()));
    let kept = messages.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                let _ = w.write_all(b"220 sink.test ESMTP\r\n").await;
                let mut envelope = String::new();
                while let Ok(Some(line)) = lines.next_line().await {
                    let verb = line.get(..4).unwrap_or_default().to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250 sink.test\r\n",
                        "MAIL" | "RCPT" => {
                            envelope.push_str(&line);
                            envelope.push('\n');
                            b"250 ok\r\n"
                        }
                        "DATA" => {
                            let _ = w.write_all(b"354 go\r\n").await;
                            let mut text = std::mem::take(&mut envelope);
                            while let Ok(Some(l)) = lines.next_line().await {
                                if l == "." {
                                    break;
                                }
                                text.push_str(&l);
                                text.push('\n');
                            }
                            kept.lock().unwrap().push(text);
                            b"250 kept\r\n"
                        }
                        "QUIT" => {
                            let _ = w.write_all(b"221 bye\r\n").await;
                            return;
                        }
                        _ => b"250 ok\r\n",
                    };
                    let _ = w.write_all(reply).await;
                }
            });
        }
    });
    (port, messages)
}

/// A line-oriented SMTP client over plain TCP.
struct Smtp {
    lines: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Smtp {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (r, w) = stream.into_split();
        let mut c = Self {
            lines: BufReader::new(r).lines(),
            w,
        };
        c.reply().await;
        c
    }

    /// The last line of the next reply.
    async fn reply(&mut self) -> String {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
                .await
                .expect("a reply within 30 s")
                .unwrap()
                .expect("the connection is open");
            if line.as_bytes().get(3) != Some(&b'-') {
                return line;
            }
        }
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.w
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
        self.reply().await
    }

    /// Sends one message; the reply to the final dot.
    async fn send(&mut self, from: &str, to: &str, subject: &str) -> String {
        assert!(
            self.cmd(&format!("MAIL FROM:<{from}>"))
                .await
                .starts_with("250")
        );
        let rcpt = self.cmd(&format!("RCPT TO:<{to}>")).await;
        assert!(rcpt.starts_with("250"), "RCPT TO:<{to}>: {rcpt}");
        self.data(subject).await
    }

    async fn data(&mut self, subject: &str) -> String {
        assert!(self.cmd("DATA").await.starts_with("354"));
        self.cmd(&format!(
            "From: <sender@elsewhere.test>\r\nSubject: {subject}\r\n\r\n{subject}\r\n."
        ))
        .await
    }
}

/// The queue subjects the pool's NATS credentials may publish to (the local cluster's NATS
/// is authenticated, so the pool must have them).
async fn pool_credential_subjects(client: &Client, ns: &str) -> Vec<String> {
    assert!(
        std::env::var("NATS_ACCOUNT_DIR").is_ok(),
        "the local cluster's env names its NATS account (authenticated NATS)"
    );
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get("mailpool-shared-nats")
        .await
        .expect("the pool's NATS Secret");
    let creds = String::from_utf8(secret.data.unwrap()["nats.creds"].0.clone()).unwrap();
    let (jwt, _) = kubemail_queue::credentials::parse(&creds).unwrap();
    jwt::decode::<UserNats>(&jwt).unwrap().nats.publish.allow
}

/// Sends one message to `rcpt` on a new session, retrying while the node answers with a
/// temporary error (a domain just attached: its body bucket and credentials on their way).
async fn send_when_ready(mx: SocketAddr, rcpt: &str, subject: &str, op: &Operator) {
    let start = Instant::now();
    loop {
        let mut s = Smtp::connect(mx).await;
        s.cmd("EHLO client.test").await;
        let reply = s.send("x@elsewhere.test", rcpt, subject).await;
        s.cmd("QUIT").await;
        if reply.starts_with("250") {
            eprintln!(
                "{rcpt} accepted mail {:?} after it was first tried",
                start.elapsed()
            );
            return;
        }
        assert!(
            reply.starts_with('4') && start.elapsed() < ATTACH_TIMEOUT,
            "mail for {rcpt} not accepted within {ATTACH_TIMEOUT:?}: {reply}\noperator logs:\n{}",
            op.logs()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Waits until the pool's node accepts `rcpt` in a new session (its config reloaded with the
/// domain); how long that took.
async fn wait_served(mx: SocketAddr, rcpt: &str, op: &Operator) -> Duration {
    let start = Instant::now();
    loop {
        let mut probe = Smtp::connect(mx).await;
        probe.cmd("EHLO client.test").await;
        probe.cmd("MAIL FROM:<x@elsewhere.test>").await;
        let reply = probe.cmd(&format!("RCPT TO:<{rcpt}>")).await;
        probe.cmd("QUIT").await;
        if reply.starts_with("250") {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < ATTACH_TIMEOUT,
            "{rcpt} not served within {ATTACH_TIMEOUT:?}: {reply}\noperator logs:\n{}",
            op.logs()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn label_namespace(client: &Client, ns: &str, key: &str, value: &str) {
    Api::<Namespace>::all(client.clone())
        .patch(
            ns,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { key: value } } })),
        )
        .await
        .unwrap();
}

async fn users_secret(client: &Client, ns: &str) {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("users".into()),
            ..Default::default()
        },
        data: Some([("alice".to_owned(), ByteString(b"wonderland".to_vec()))].into()),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch(
            "users",
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await
        .unwrap();
}

fn tenant_domain(domain: &str, pool_ns: &str, sink: u16, users: bool) -> serde_json::Value {
    let mut spec = json!({
        "domain": domain,
        "poolRef": { "name": "shared", "namespace": pool_ns },
        "dkim": { "algorithms": ["rsa-sha256"] },
        "inbound": {
            "catchAll": true,
            "forward": { "host": "127.0.0.1", "port": sink, "protocol": "smtp", "tls": "None" },
        },
    });
    if users {
        spec["submission"] = json!({ "usersSecretRef": { "name": "users" } });
    }
    spec
}

/// Submission as `user` through STARTTLS and AUTH (python's smtplib, the certificate is not
/// what this test checks); prints the server's answer to the transaction.
fn submit(addr: SocketAddr, user: &str, from: &str, to: &str, subject: &str) -> String {
    let script = r#"
import smtplib, ssl, sys
host, port, user, sender, rcpt, subject = sys.argv[1:7]
s = smtplib.SMTP(host, int(port), timeout=30)
s.starttls(context=ssl._create_unverified_context())
s.login(user, "wonderland")
try:
    s.sendmail(sender, [rcpt], f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n\r\n{subject}\r\n")
    print("accepted")
except smtplib.SMTPSenderRefused as e:
    print(f"refused {e.smtp_code}")
except smtplib.SMTPException as e:
    print(f"failed {e}")
s.quit()
"#;
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            &addr.ip().to_string(),
            &addr.port().to_string(),
            user,
            from,
            to,
            subject,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python smtplib: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

async fn wait_kept(messages: &Arc<Mutex<Vec<String>>>, needle: &str, what: &str) -> String {
    wait_for(what, Duration::from_secs(60), || async {
        messages
            .lock()
            .unwrap()
            .iter()
            .find(|m| m.contains(needle))
            .cloned()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_share_a_pool_each_with_its_own_mail_and_a_domain_attaches_live() {
    let client = client().await;
    install_crds(&client).await;
    let pool_ns = TestNamespace::create(&client, "pool").await;
    let tenant_a = TestNamespace::create(&client, "tenant-a").await;
    let tenant_b = TestNamespace::create(&client, "tenant-b").await;
    let outsider = TestNamespace::create(&client, "outsider").await;
    let (p, a, b, c) = (
        pool_ns.name.as_str(),
        tenant_a.name.as_str(),
        tenant_b.name.as_str(),
        outsider.name.as_str(),
    );
    for ns in [a, b] {
        label_namespace(&client, ns, "kubemail.io/test-pool", p).await;
    }
    let mut opts = OperatorOptions::for_namespace(&pool_ns, "pool-a");
    opts.extra_args = vec!["--watch-namespaces".into(), format!("{a},{b},{c}")];
    let mut op = Operator::start(&opts);

    let pools: Api<MailPool> = Api::namespaced(client.clone(), p);
    let pool = json!({
        "apiVersion": "kubemail.io/v1alpha1",
        "kind": "MailPool",
        "metadata": { "name": "shared" },
        "spec": {
            "hostname": "mx.pool.test",
            "replicas": 1,
            "service": { "type": "ClusterIP" },
            "allowedDomains": { "namespaces": {
                "from": "Selector",
                "selector": { "matchLabels": { "kubemail.io/test-pool": p } },
            } },
        },
    });
    // A CRD just established can take a moment before its resource path is served.
    wait_for(
        "the MailPool to be accepted",
        Duration::from_secs(30),
        || async {
            pools
                .patch(
                    "shared",
                    &PatchParams::apply(TEST_MANAGER).force(),
                    &Patch::Apply(&pool),
                )
                .await
                .ok()
        },
    )
    .await;

    let (sink_a, kept_a) = sink().await;
    let (sink_b, kept_b) = sink().await;
    users_secret(&client, a).await;
    apply_md(
        &client,
        a,
        "shop",
        tenant_domain("a-pool.test", p, sink_a, true),
    )
    .await;
    apply_md(
        &client,
        b,
        "blog",
        tenant_domain("b-pool.test", p, sink_b, false),
    )
    .await;
    apply_md(
        &client,
        c,
        "intruder",
        tenant_domain("c-pool.test", p, sink_b, false),
    )
    .await;

    // The outsider's namespace is not admitted; nothing of it reaches the pool.
    let refused = wait_condition_by(
        &client,
        c,
        "intruder",
        "Accepted",
        |c| c.status == "False" && c.reason == "NotAllowedByPool",
        Duration::from_secs(60),
        &op,
    )
    .await;
    assert_eq!(
        condition(&refused, "Ready").map(|c| c.status.as_str()),
        Some("False")
    );

    for (ns, name) in [(a, "shop"), (b, "blog")] {
        let md = wait_condition(&client, ns, name, "Ready", "True", READY_TIMEOUT, &op).await;
        assert_eq!(
            condition(&md, "Accepted").map(|c| c.status.as_str()),
            Some("True")
        );
        // No Deployment of its own: the pool's nodes serve it.
        assert!(
            Api::<Deployment>::namespaced(client.clone(), ns)
                .get_opt(name)
                .await
                .unwrap()
                .is_none()
        );
    }
    // One NATS credential for the pool's nodes, covering exactly the attached domains; no
    // per-domain credential in the tenants' namespaces.
    let subjects = pool_credential_subjects(&client, p).await;
    let queue_subject = |d: &str| kubemail_queue::subject(&opts.subject_prefix, d);
    for domain in ["a-pool.test", "b-pool.test"] {
        assert!(
            subjects.contains(&queue_subject(domain)),
            "{domain}: {subjects:?}"
        );
    }
    assert!(
        !subjects.contains(&queue_subject("c-pool.test")),
        "{subjects:?}"
    );
    for (ns, name) in [(a, "shop"), (b, "blog")] {
        assert!(
            Api::<Secret>::namespaced(client.clone(), ns)
                .get_opt(&format!("{name}-nats"))
                .await
                .unwrap()
                .is_none(),
            "a pooled domain has no NATS credential of its own"
        );
    }
    let pool = pools.get("shared").await.unwrap();
    let status = pool.status.clone().unwrap();
    assert_eq!(status.attached_domains, 2, "{status:?}");
    let domains: Vec<&str> = status.domains.iter().map(|d| d.domain.as_str()).collect();
    assert_eq!(domains, ["a-pool.test", "b-pool.test"]);

    // The pool's one pod.
    let pods: Api<Pod> = Api::namespaced(client.clone(), p);
    let pod = pods
        .list(&ListParams::default().labels("kubemail.io/mailpool=shared"))
        .await
        .unwrap()
        .items
        .into_iter()
        .next()
        .expect("the pool's pod");
    let pod_uid = pod.metadata.uid.clone().unwrap();
    let ip: std::net::IpAddr = pod
        .status
        .as_ref()
        .unwrap()
        .pod_ip
        .as_ref()
        .unwrap()
        .parse()
        .unwrap();
    let mx = SocketAddr::new(ip, 2525);
    let submission = SocketAddr::new(ip, 2587);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), p);
    let template = |d: Deployment| serde_json::to_value(d.spec.unwrap().template).unwrap();
    let template_before = template(deployments.get("mailpool-shared").await.unwrap());

    // Ready means the pool's nodes were given the domain; they serve it once they reloaded.
    for rcpt in ["bob@a-pool.test", "carol@b-pool.test"] {
        let took = wait_served(mx, rcpt, &op).await;
        eprintln!("{rcpt} served {took:?} after its MailDomain was Ready");
    }

    // Inbound: each tenant's mail reaches its own target only.
    let mut s = Smtp::connect(mx).await;
    assert!(s.cmd("EHLO client.test").await.starts_with("250"));
    assert!(
        s.send("x@elsewhere.test", "bob@a-pool.test", "for-tenant-a")
            .await
            .starts_with("250")
    );
    assert!(
        s.send("x@elsewhere.test", "carol@b-pool.test", "for-tenant-b")
            .await
            .starts_with("250")
    );
    let rcpt = s.cmd("MAIL FROM:<x@elsewhere.test>").await;
    assert!(rcpt.starts_with("250"));
    let rcpt = s.cmd("RCPT TO:<eve@c-pool.test>").await;
    assert!(
        rcpt.starts_with('5'),
        "the refused tenant's domain is not served: {rcpt}"
    );
    s.cmd("QUIT").await;
    wait_kept(&kept_a, "for-tenant-a", "tenant A's mail at A's target").await;
    wait_kept(&kept_b, "for-tenant-b", "tenant B's mail at B's target").await;

    // Submission: alice of tenant A may send as A, not as B; mail from A to B is signed for A.
    let as_b = submit(
        submission,
        "alice@a-pool.test",
        "alice@b-pool.test",
        "carol@b-pool.test",
        "forged-as-b",
    );
    assert!(as_b.starts_with("refused 5"), "{as_b}");
    let as_a = submit(
        submission,
        "alice@a-pool.test",
        "alice@a-pool.test",
        "carol@b-pool.test",
        "from-a-to-b",
    );
    assert_eq!(as_a, "accepted");
    let delivered = wait_kept(&kept_b, "from-a-to-b", "A's submission at B's target").await;
    assert!(
        delivered.contains("d=a-pool.test"),
        "signed for A: {delivered}"
    );
    assert!(
        !delivered.contains("d=b-pool.test"),
        "never signed for B: {delivered}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    for m in kept_a.lock().unwrap().iter() {
        assert!(
            !m.contains("for-tenant-b") && !m.contains("from-a-to-b"),
            "B's mail at A: {m}"
        );
    }
    for m in kept_b.lock().unwrap().iter() {
        assert!(
            !m.contains("for-tenant-a") && !m.contains("forged-as-b"),
            "A's mail at B: {m}"
        );
    }

    // Attach a third domain while a session is open on the pool.
    let mut open = Smtp::connect(mx).await;
    assert!(open.cmd("EHLO client.test").await.starts_with("250"));
    assert!(
        open.cmd("MAIL FROM:<x@elsewhere.test>")
            .await
            .starts_with("250")
    );
    assert!(
        open.cmd("RCPT TO:<bob@a-pool.test>")
            .await
            .starts_with("250")
    );
    let attached_at = Instant::now();
    apply_md(
        &client,
        a,
        "late",
        tenant_domain("late-pool.test", p, sink_a, false),
    )
    .await;
    wait_served(mx, "dan@late-pool.test", &op).await;
    eprintln!(
        "late-pool.test served {:?} after its MailDomain was applied",
        attached_at.elapsed()
    );
    // The credential was re-minted for the new domain and the running node uses it: mail
    // for the new domain goes through the queue to its target.
    let subjects = pool_credential_subjects(&client, p).await;
    assert!(
        subjects.contains(&queue_subject("late-pool.test")),
        "{subjects:?}"
    );
    send_when_ready(mx, "dan@late-pool.test", "for-the-late-domain", &op).await;
    wait_kept(&kept_a, "for-the-late-domain", "the attached domain's mail").await;
    let reply = open.data("across-the-reload").await;
    assert!(
        reply.starts_with("250"),
        "the open session carries on: {reply}"
    );
    open.cmd("QUIT").await;
    wait_kept(&kept_a, "across-the-reload", "the open session's mail").await;
    wait_condition(&client, a, "late", "Ready", "True", READY_TIMEOUT, &op).await;

    // Same pod, same template: nothing restarted.
    let pod = pods
        .list(&ListParams::default().labels("kubemail.io/mailpool=shared"))
        .await
        .unwrap()
        .items;
    assert_eq!(pod.len(), 1);
    assert_eq!(pod[0].metadata.uid.as_deref(), Some(pod_uid.as_str()));
    let restarts: i32 = pod[0]
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| cs.iter().map(|c| c.restart_count).sum())
        .unwrap_or_default();
    assert_eq!(restarts, 0);
    assert_eq!(
        template(deployments.get("mailpool-shared").await.unwrap()),
        template_before,
        "attaching changed the pod template"
    );

    // kubectl scale on the pool: the operator keeps what was set.
    // Scaling the pool through its scale subresource (what kubectl scale and an HPA use).
    pools
        .patch_scale(
            "shared",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 2 } })),
        )
        .await
        .unwrap();
    wait_for(
        "the pool's Deployment to scale",
        Duration::from_secs(60),
        || async {
            let d = deployments.get("mailpool-shared").await.ok()?;
            (d.spec?.replicas == Some(2)).then_some(())
        },
    )
    .await;
    wait_for(
        "the pool's status to count 2 pods",
        READY_TIMEOUT,
        || async {
            let s = pools.get("shared").await.ok()?.status?;
            (s.replicas == 2 && s.selector.is_some()).then_some(())
        },
    )
    .await;

    let logs = op.logs();
    assert!(!logs.contains("PRIVATE KEY"), "private keys in the logs");
    assert!(op.stop(Duration::from_secs(20)), "clean exit:\n{logs}");
    delete_stream(&pool_ns.nats_stream()).await;
}
