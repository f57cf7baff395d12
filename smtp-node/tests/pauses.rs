//! Delivery pauses against real nodes: two `smtp-node` replicas of one domain on one
//! nats-server, a scripted sink as `remote.test`'s MX, DSNs to a second sink. The pause is
//! written to the KV bucket the way the operator writes a `DeliveryPause`.
//!
//! * a pause made while messages flow: no transaction starts at the remote once the pause
//!   is written (plus the watch's propagation), queued messages stay queued without an
//!   attempt or a bounce, even past their lifetime, and delivery resumes when it is deleted;
//! * a pause with an expiry ends by itself.

mod common;
mod delivery_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use common::{Nats, Node, unique};
use delivery_support::{
    Knot, Setup, configure, counter, example_zone, metrics, remote_zone, submit,
};
use futures::TryStreamExt as _;
use kubemail_queue::pause::Pause;
use kubemail_queue_admin::{Filter, Listed, Queue, State, pauses};
use kubemail_test_support::scripted_sink::ScriptedSink;
use serde_json::json;

/// How long a pause may take to reach every node's watch.
const PROPAGATION: Duration = Duration::from_millis(500);

fn replicas(
    nats: &Nats,
    knot: &Knot,
    remote: &ScriptedSink,
    inbound: &ScriptedSink,
) -> (Node, Node) {
    let setup = |c: &mut serde_json::Value| {
        configure(
            c,
            &Setup {
                dns: knot,
                mx_port: remote.port,
                inbound_port: Some(inbound.port),
                allow_loopback: true,
                dkim: false,
                inbound_auth: None,
            },
        );
        c["delivery"]["pauseCheckInterval"] = json!("2s");
        // Shorter than the pause below: mail held only by a pause must not expire.
        c["delivery"]["retry"]["lifetime"] = json!("15s");
    };
    let a = Node::start_with(&nats.url(), true, setup);
    let (stream, prefix, bucket) = (a.stream.clone(), a.subject_prefix.clone(), a.bucket.clone());
    let b = Node::start_with(&nats.url(), true, |c| {
        setup(c);
        c["nats"]["stream"] = json!(stream);
        c["nats"]["subjectPrefix"] = json!(prefix);
        c["nats"]["bodyBucket"] = json!(bucket);
    });
    (a, b)
}

async fn open(node: &Node) -> (Queue, async_nats::jetstream::kv::Store) {
    let client = async_nats::connect(&node.nats_url).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let store = pauses::open_bucket(&js, 1).await.expect("pause bucket");
    let q = Queue::open(js, &node.stream, &node.subject_prefix, "pause-test")
        .await
        .expect("queue");
    (q, store)
}

async fn entries(q: &Queue) -> Vec<Listed> {
    q.scan(0, Filter::default())
        .await
        .expect("scan")
        .try_collect()
        .await
        .expect("scan")
}

/// The queue listed by a scan that no rewrite crossed. A paused entry is rewritten at each
/// check to a new stream sequence, and a scan that meets the rewrite misses it (it ends at
/// the stream's last sequence when it began), so this scans again (at most ten times) until
/// the entries listed plus `delivered` account for all `sent`; a lost message still fails.
async fn entries_accounting_for(q: &Queue, delivered: usize, sent: usize) -> Vec<Listed> {
    let mut listed = entries(q).await;
    for _ in 0..10 {
        if listed.len() + delivered == sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        listed = entries(q).await;
    }
    listed
}

async fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn remote_pause(key: &str, expires: Option<SystemTime>) -> Pause {
    let mut p = Pause {
        key: key.into(),
        reason: Some("remote.test answers 421".into()),
        recipient_domains: vec!["remote.test".into()],
        ..Pause::default()
    };
    p.set_expiry(expires);
    p
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pause_stops_every_replica_keeps_mail_queued_without_bounces_and_resumes() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let remote = ScriptedSink::start(Duration::from_millis(200));
    let inbound = ScriptedSink::start(Duration::ZERO);
    let (a, b) = replicas(&nats, &knot, &remote, &inbound);
    let (q, store) = open(&a).await;
    let batch = unique("flow");

    // Mail flows from both replicas' submission ports while the pause is made.
    let stop = Arc::new(AtomicBool::new(false));
    let submitter = {
        let stop = stop.clone();
        let batch = batch.clone();
        let ports = [a.ports.submission, b.ports.submission];
        std::thread::spawn(move || {
            let mut sent = 0usize;
            while !stop.load(Ordering::SeqCst) && sent < 200 {
                submit(
                    ports[sent % 2],
                    &["carol@remote.test"],
                    &format!("{batch}-{sent:03}"),
                    "Hi.",
                );
                sent += 1;
                std::thread::sleep(Duration::from_millis(150));
            }
            sent
        })
    };
    wait_for(Duration::from_secs(30), "the first deliveries", || {
        remote.count(&batch) >= 3
    })
    .await;
    let key = "mail.remote-421";
    pauses::put(&store, &remote_pause(key, None))
        .await
        .expect("write the pause");
    // The operator reports Ready once the write is acknowledged: from here on.
    let ready = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    let sent = submitter.join().expect("submitter");
    let at_pause = remote.received().len();
    eprintln!("{sent} messages submitted, {at_pause} delivered when the pause took effect");

    // Longer than the 15 s lifetime: paused mail must neither expire nor bounce.
    tokio::time::sleep(Duration::from_secs(18)).await;
    let late: Vec<Duration> = remote
        .received()
        .iter()
        .filter(|r| r.started > ready + PROPAGATION)
        .map(|r| r.started - ready)
        .collect();
    assert!(
        late.is_empty(),
        "transactions started after the pause was ready: {late:?}"
    );
    // Every message is delivered (nothing started after the pause, checked above) or queued.
    let delivered = remote.received().len();
    let queued = entries_accounting_for(&q, delivered, sent).await;
    let now = SystemTime::now();
    assert_eq!(
        queued.len() + delivered,
        sent,
        "every message is delivered or queued"
    );
    assert!(!queued.is_empty(), "the pause held nothing back");
    for l in &queued {
        assert_eq!(l.state(now), State::Paused, "{l:?}");
        assert_eq!(l.entry.admin.paused_by.as_deref(), Some(key));
        assert!(
            l.entry.admin.suspended >= Duration::from_secs(10),
            "the wait extends the lifetime: {:?}",
            l.entry.admin.suspended
        );
        assert_eq!(l.entry.attempts, 0, "a paused message counts no attempt");
    }
    let counts = q.paused_counts().await.expect("counts");
    assert_eq!(counts.get(key).copied(), Some(queued.len() as u64));
    assert!(inbound.received().is_empty(), "no DSN for paused mail");
    let held_back = counter(
        &metrics(&a),
        "kubemail_smtp_delivery_paused_recipients_total",
    ) + counter(
        &metrics(&b),
        "kubemail_smtp_delivery_paused_recipients_total",
    );
    assert!(held_back >= queued.len() as f64, "{held_back}");

    // Deleting the pause resumes delivery within the check interval (2 s).
    pauses::delete(&store, key).await.expect("delete the pause");
    let resumed = Instant::now();
    wait_for(
        Duration::from_secs(20),
        "every message delivered after the pause",
        || remote.received().len() >= sent,
    )
    .await;
    eprintln!(
        "delivered everything {:?} after the pause was deleted",
        resumed.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..sent {
        assert_eq!(remote.count(&format!("{batch}-{i:03}")), 1, "message {i}");
    }
    assert!(entries(&q).await.is_empty());
    assert!(
        inbound.received().is_empty(),
        "no bounce after the pause either"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pause_with_an_expiry_ends_by_itself() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let remote = ScriptedSink::start(Duration::ZERO);
    let inbound = ScriptedSink::start(Duration::ZERO);
    let (a, _b) = replicas(&nats, &knot, &remote, &inbound);
    let (q, store) = open(&a).await;
    let ends = SystemTime::now() + Duration::from_secs(8);
    let ends_here = Instant::now() + Duration::from_secs(8);
    pauses::put(&store, &remote_pause("mail.until", Some(ends)))
        .await
        .expect("write the pause");
    tokio::time::sleep(PROPAGATION).await;
    let subject = unique("expiry");
    submit(a.ports.submission, &["carol@remote.test"], &subject, "Hi.");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(remote.count(&subject), 0, "delivered during the pause");
    let queued = entries(&q).await;
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].state(SystemTime::now()), State::Paused);
    wait_for(Duration::from_secs(20), "delivery after the expiry", || {
        remote.count(&subject) == 1
    })
    .await;
    let started = remote.received()[0].started;
    assert!(
        started + Duration::from_millis(100) >= ends_here,
        "delivered {:?} before the pause ended",
        ends_here - started
    );
    assert!(
        started < ends_here + Duration::from_secs(8),
        "delivered {:?} after the end of the pause (check interval 2 s)",
        started - ends_here
    );
    assert!(inbound.received().is_empty());
}
