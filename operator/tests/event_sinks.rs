//! The webhook dispatcher against a real nats-server and a real HTTP receiver
//! (`tests/clients/webhook_receiver.py`, which checks the signature with Python's own hmac):
//!
//! * a receiver that is down while events are published gets every event once it is up,
//!   exactly once, in order, each with a valid signature, and nothing of other domains;
//! * a receiver answering `500` gets the event again until it takes it;
//! * a receiver answering `410 Gone` stops the dispatcher with the event kept in the stream.

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, stream};
use kubemail_operator::events::dispatcher::{
    self, SharedHealth, Subscription, WebhookTarget, consumer_name,
};
use kubemail_queue::events::{
    CloudEvent, EVENTS_STREAM, EVENTS_SUBJECTS, EventData, EventType, event_subject,
};
use kubemail_test_support::ports::free_port;
use kubemail_test_support::wait::wait_for_port;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const SECRET: &[u8] = b"whsec-test-8f0c2a";

/// A nats-server with JetStream, killed on drop.
struct NatsServer {
    child: Child,
    port: u16,
    _store: tempfile::TempDir,
}

impl NatsServer {
    fn start() -> Self {
        let binary = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|dir| dir.join("nats-server"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("nats-server is not on PATH (e2e/tools/setup.sh builds it)"));
        let store = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut child = Command::new(binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        wait_for_port(
            ([127, 0, 0, 1], port).into(),
            "nats-server",
            &mut child,
            Duration::from_secs(20),
        );
        Self {
            child,
            port,
            _store: store,
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python receiver; started later than the dispatcher to play a sink that is down.
struct Receiver {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Receiver {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("secret"), SECRET).unwrap();
        std::fs::write(dir.path().join("mode"), "ok").unwrap();
        Self {
            child: None,
            port: free_port(),
            dir,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/kubemail", self.port)
    }

    fn start(&mut self) {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/webhook_receiver.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(self.port.to_string())
            .arg(self.dir.path().join("secret"))
            .arg(self.dir.path().join("mode"))
            .arg(self.dir.path().join("log.jsonl"))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn the webhook receiver");
        wait_for_port(
            ([127, 0, 0, 1], self.port).into(),
            "webhook receiver",
            &mut child,
            Duration::from_secs(20),
        );
        self.child = Some(child);
    }

    fn set_mode(&self, mode: &str) {
        std::fs::write(self.dir.path().join("mode"), mode).unwrap();
    }

    fn log(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("log.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn wait_for<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn publish(
    js: &jetstream::Context,
    domain: &str,
    kind: EventType,
    queue_id: &str,
    rcpt: &str,
) -> String {
    let event = CloudEvent::new(
        kind,
        "mx.example.test",
        SystemTime::now(),
        EventData {
            domain: domain.to_owned(),
            queue_id: queue_id.to_owned(),
            sender: "alice@example.test".to_owned(),
            recipient: Some(rcpt.to_owned()),
            attempt: 1,
            ..EventData::default()
        },
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", event.id.as_str());
    js.publish_with_headers(
        event_subject(domain, kind),
        headers,
        serde_json::to_vec(&event).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    event.id
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sink_that_was_down_gets_every_event_once_in_order_then_500_retries_and_410_pauses() {
    let nats = NatsServer::start();
    let client = async_nats::connect(format!("nats://127.0.0.1:{}", nats.port))
        .await
        .unwrap();
    let js = jetstream::new(client);
    // The stream as a node creates it.
    js.get_or_create_stream(stream::Config {
        name: EVENTS_STREAM.to_owned(),
        subjects: vec![EVENTS_SUBJECTS.to_owned()],
        max_age: Duration::from_secs(3600),
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap();

    let mut receiver = Receiver::new();
    let subscription = Subscription {
        consumer: consumer_name("team-a", "hooks", "0b7c6e1a-0000-4000-8000-000000000001"),
        domain: "example.test".to_owned(),
        types: vec![],
    };
    let health = SharedHealth::default();
    let stop = CancellationToken::new();
    let task = tokio::spawn(dispatcher::run(
        js.clone(),
        subscription.clone(),
        WebhookTarget {
            url: receiver.url(),
            secret: SECRET.to_vec(),
            timeout: Duration::from_secs(2),
            max_backoff: Duration::from_secs(2),
        },
        health.clone(),
        stop.clone(),
    ));
    wait_for(Duration::from_secs(10), "the dispatcher to start", || {
        health.get().running.then_some(())
    })
    .await;

    // The sink is down while the events happen.
    let mut published = Vec::new();
    for (kind, rcpt) in [
        (EventType::Received, "bob@remote.test"),
        (EventType::Received, "carol@remote.test"),
        (EventType::Deferred, "bob@remote.test"),
        (EventType::Delivered, "carol@remote.test"),
        (EventType::Delivered, "bob@remote.test"),
    ] {
        published.push(publish(&js, "example.test", kind, "q1", rcpt).await);
    }
    publish(&js, "other.test", EventType::Bounced, "q2", "x@remote.test").await;
    wait_for(
        Duration::from_secs(15),
        "failed attempts while the sink is down",
        || {
            let h = health.get();
            (h.last_error.is_some() && h.backlog.unwrap_or(0) >= 5).then_some(())
        },
    )
    .await;
    assert!(
        health
            .get()
            .last_error
            .unwrap()
            .1
            .contains("cannot reach the sink"),
        "{:?}",
        health.get()
    );
    assert_eq!(health.get().delivered, 0);

    receiver.start();
    let log = wait_for(Duration::from_secs(30), "every event at the sink", || {
        let log = receiver.log();
        (log.iter().filter(|l| l["status"] == 200).count() >= 5).then_some(log)
    })
    .await;
    let accepted: Vec<&str> = log
        .iter()
        .filter(|l| l["status"] == 200)
        .filter_map(|l| l["id"].as_str())
        .collect();
    assert_eq!(accepted, published, "exactly once, in order: {log:?}");
    for l in &log {
        assert_eq!(l["valid_signature"], true, "{l}");
        assert_eq!(l["header_id"], l["id"], "{l}");
        assert_eq!(l["content_type"], "application/cloudevents+json");
        assert_ne!(
            l["subject"], "x@remote.test",
            "another domain's event was sent"
        );
    }
    let h = wait_for(Duration::from_secs(10), "the backlog to drain", || {
        let h = health.get();
        (h.delivered == 5 && h.backlog == Some(0)).then_some(h)
    })
    .await;
    assert!(h.last_success.is_some());

    // 500 twice: the same event comes again until it is taken.
    receiver.set_mode("500x2");
    let retried = publish(
        &js,
        "example.test",
        EventType::Bounced,
        "q3",
        "dave@remote.test",
    )
    .await;
    let log = wait_for(
        Duration::from_secs(30),
        "the retried event to be taken",
        || {
            let log = receiver.log();
            log.iter()
                .any(|l| l["id"] == retried.as_str() && l["status"] == 200)
                .then_some(log)
        },
    )
    .await;
    let statuses: Vec<i64> = log
        .iter()
        .filter(|l| l["id"] == retried.as_str())
        .filter_map(|l| l["status"].as_i64())
        .collect();
    assert_eq!(statuses, [500, 500, 200]);

    // 410: the dispatcher stops and the event stays in the stream.
    receiver.set_mode("410");
    let gone = publish(
        &js,
        "example.test",
        EventType::Complaint,
        "q4",
        "erin@remote.test",
    )
    .await;
    let h = wait_for(
        Duration::from_secs(20),
        "the sink to be marked gone",
        || {
            let h = health.get();
            (h.gone && !h.running).then_some(h)
        },
    )
    .await;
    assert_eq!(h.backlog, Some(1), "{h:?}");
    assert!(task.await.unwrap().is_ok());
    let tries = receiver
        .log()
        .iter()
        .filter(|l| l["id"] == gone.as_str())
        .count();
    assert_eq!(tries, 1, "a gone sink is not retried");
    stop.cancel();
}
