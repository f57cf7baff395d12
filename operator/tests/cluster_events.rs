//! EventSink and Suppression against the real local control plane and nats-server, with the
//! real operator binary (one namespace per test):
//!
//! * a webhook answering `500` makes the sink `Healthy=False` (`Failing`) with the error in
//!   its status; once it answers `200` the sink is `Healthy=True` with no backlog;
//! * a webhook answering `410 Gone` makes the sink `Healthy=False` (`Gone`) and paused, with
//!   the event kept as backlog;
//! * a `Suppression` puts its addresses on the MailDomain's list in NATS, and deleting it
//!   takes them off again.
//!
//! Needs `e2e/local-cluster up` and its env (`. .kubemail-local/env`).

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use common::maildomain::apply_md;
use common::{
    Operator, OperatorOptions, TEST_MANAGER, TestNamespace, client, install_crds, nats_connect,
    wait_for,
};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams};
use kubemail_operator::crd::{EventSink, Suppression};
use kubemail_queue::events::{
    CloudEvent, EVENTS_STREAM, EVENTS_SUBJECTS, EventData, EventType, event_subject,
};
use kubemail_queue::suppression::{SuppressionList, SuppressionReason};
use kubemail_test_support::ports::free_port;
use kubemail_test_support::wait::wait_for_port;
use serde_json::json;

const SECRET: &str = "whsec-cluster-51d0";
const TIMEOUT: Duration = Duration::from_secs(60);

/// The Python receiver of `tests/clients/webhook_receiver.py`.
struct Receiver {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Receiver {
    fn start(mode: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), SECRET).unwrap();
        std::fs::write(dir.path().join("mode"), mode).unwrap();
        let port = free_port();
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/webhook_receiver.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .arg(dir.path().join("secret"))
            .arg(dir.path().join("mode"))
            .arg(dir.path().join("log.jsonl"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(
            ([127, 0, 0, 1], port).into(),
            "webhook receiver",
            &mut child,
            Duration::from_secs(20),
        );
        Self { child, port, dir }
    }

    fn set_mode(&self, mode: &str) {
        std::fs::write(self.dir.path().join("mode"), mode).unwrap();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn jetstream() -> async_nats::jetstream::Context {
    let js =
        async_nats::jetstream::new(nats_connect().await.expect("connect to the cluster's NATS"));
    // The stream as a node creates it.
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: EVENTS_STREAM.to_owned(),
        subjects: vec![EVENTS_SUBJECTS.to_owned()],
        max_age: Duration::from_secs(3600),
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap();
    js
}

async fn publish_event(js: &async_nats::jetstream::Context, domain: &str, rcpt: &str) {
    let event = CloudEvent::new(
        EventType::Bounced,
        "mx.cluster.test",
        SystemTime::now(),
        EventData {
            domain: domain.to_owned(),
            queue_id: format!("{:032x}", rand::random::<u128>()),
            sender: format!("alice@{domain}"),
            recipient: Some(rcpt.to_owned()),
            attempt: 1,
            ..EventData::default()
        },
    );
    js.publish(
        event_subject(domain, EventType::Bounced),
        serde_json::to_vec(&event).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

async fn apply(client: &kube::Client, ns: &str, kind: &str, name: &str, spec: serde_json::Value) {
    let obj = json!({
        "apiVersion": "kubemail.io/v1alpha1",
        "kind": kind,
        "metadata": { "name": name },
        "spec": spec,
    });
    let params = PatchParams::apply(TEST_MANAGER).force();
    match kind {
        "EventSink" => {
            Api::<EventSink>::namespaced(client.clone(), ns)
                .patch(name, &params, &Patch::Apply(&obj))
                .await
                .unwrap();
        }
        _ => {
            Api::<Suppression>::namespaced(client.clone(), ns)
                .patch(name, &params, &Patch::Apply(&obj))
                .await
                .unwrap();
        }
    }
}

/// Waits until the sink's `Healthy` condition has `status` and `reason`; returns the sink.
async fn wait_healthy(
    client: &kube::Client,
    ns: &str,
    name: &str,
    status: &str,
    reason: &str,
) -> EventSink {
    let api = Api::<EventSink>::namespaced(client.clone(), ns);
    wait_for(
        &format!("EventSink {name} Healthy={status} ({reason})"),
        TIMEOUT,
        || async {
            let sink = api.get(name).await.ok()?;
            let c = sink
                .status
                .as_ref()?
                .conditions
                .iter()
                .find(|c| c.type_ == "Healthy")?;
            (c.status == status && c.reason == reason).then_some(sink.clone())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn event_sink_health_and_suppressions() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "events").await;
    let n = ns.name.as_str();
    let domain = format!("{n}.example");
    let _op = Operator::start(&OperatorOptions::for_namespace(&ns, "op-events"));
    apply_md(
        &client,
        n,
        "md",
        json!({ "domain": domain, "replicas": 0, "service": { "type": "ClusterIP" } }),
    )
    .await;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("hook-key".to_owned()),
            ..Default::default()
        },
        data: Some([("secret".to_owned(), ByteString(SECRET.as_bytes().to_vec()))].into()),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), n)
        .patch(
            "hook-key",
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await
        .unwrap();
    let js = jetstream().await;

    // A receiver that fails, then recovers.
    let flaky = Receiver::start("500x1000");
    apply(
        &client,
        n,
        "EventSink",
        "flaky",
        json!({
            "mailDomainRef": { "name": "md" },
            "webhook": {
                "url": format!("http://127.0.0.1:{}/hook", flaky.port),
                "secretRef": { "name": "hook-key" },
                "maxBackoff": "2s"
            }
        }),
    )
    .await;
    wait_for("the flaky sink's consumer", TIMEOUT, || async {
        let sink = Api::<EventSink>::namespaced(client.clone(), n)
            .get("flaky")
            .await
            .ok()?;
        sink.status?.consumer
    })
    .await;
    publish_event(&js, &domain, "bob@remote.test").await;
    let sink = wait_healthy(&client, n, "flaky", "False", "Failing").await;
    let status = sink.status.unwrap();
    assert!(
        status.last_error.as_deref().unwrap_or("").contains("500"),
        "{status:?}"
    );
    assert!(!status.paused);
    flaky.set_mode("ok");
    let sink = wait_healthy(&client, n, "flaky", "True", "Delivering").await;
    let status = sink.status.unwrap();
    assert!(status.last_success.is_some(), "{status:?}");
    wait_for("the flaky sink's backlog to drain", TIMEOUT, || async {
        let sink = Api::<EventSink>::namespaced(client.clone(), n)
            .get("flaky")
            .await
            .ok()?;
        (sink.status?.backlog == Some(0)).then_some(())
    })
    .await;

    // A receiver that is gone.
    let gone = Receiver::start("410");
    apply(
        &client,
        n,
        "EventSink",
        "gone",
        json!({
            "mailDomainRef": { "name": "md" },
            "types": ["complaint", "bounced"],
            "webhook": {
                "url": format!("http://127.0.0.1:{}/hook", gone.port),
                "secretRef": { "name": "hook-key" }
            }
        }),
    )
    .await;
    wait_for("the gone sink's consumer", TIMEOUT, || async {
        let sink = Api::<EventSink>::namespaced(client.clone(), n)
            .get("gone")
            .await
            .ok()?;
        sink.status?.consumer
    })
    .await;
    publish_event(&js, &domain, "carol@remote.test").await;
    let sink = wait_healthy(&client, n, "gone", "False", "Gone").await;
    let status = sink.status.unwrap();
    assert!(status.paused, "{status:?}");
    assert_eq!(
        status.backlog,
        Some(1),
        "the event stays for when it is resumed"
    );

    // Without a webhook: a durable consumer for a client of one's own.
    apply(
        &client,
        n,
        "EventSink",
        "raw",
        json!({ "mailDomainRef": { "name": "md" }, "types": ["bounced"] }),
    )
    .await;
    let consumer = wait_for("the raw sink's consumer", TIMEOUT, || async {
        let sink = Api::<EventSink>::namespaced(client.clone(), n)
            .get("raw")
            .await
            .ok()?;
        let status = sink.status?;
        let ready = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True" && c.reason == "ConsumerReady");
        ready.then_some(status.consumer?)
    })
    .await;
    publish_event(&js, &domain, "frank@remote.test").await;
    let stream = js.get_stream(EVENTS_STREAM).await.unwrap();
    let pull: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer(&consumer).await.unwrap();
    let mut batch = pull
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(10))
        .messages()
        .await
        .unwrap();
    let message = futures::StreamExt::next(&mut batch).await.unwrap().unwrap();
    let event: CloudEvent = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(event.subject.as_deref(), Some("frank@remote.test"));
    message.ack().await.unwrap();

    // Suppression: on the list while the object exists.
    apply(
        &client,
        n,
        "Suppression",
        "manual",
        json!({
            "mailDomainRef": { "name": "md" },
            "addresses": ["Dave@Remote.test"],
            "note": "asked to be removed by phone"
        }),
    )
    .await;
    let list = SuppressionList::open(&js).await.unwrap();
    let entry = wait_for("the manual entry in NATS", TIMEOUT, || async {
        list.get(&domain, "dave@remote.test", SystemTime::now())
            .await
            .ok()
            .flatten()
    })
    .await;
    assert_eq!(entry.reason, SuppressionReason::Manual);
    assert_eq!(entry.note.as_deref(), Some("asked to be removed by phone"));
    assert!(entry.expires_at.is_none());
    Api::<Suppression>::namespaced(client.clone(), n)
        .delete("manual", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the manual entry to be removed", TIMEOUT, || async {
        list.get(&domain, "dave@remote.test", SystemTime::now())
            .await
            .ok()
            .and_then(|e| e.is_none().then_some(()))
    })
    .await;
}
