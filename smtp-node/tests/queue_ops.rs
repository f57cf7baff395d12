//! Operators' actions on the queue against real nodes: two `smtp-node` processes share one
//! domain's queue on one nats-server, the remote MX is a scripted sink, DSNs land at a
//! second sink (example.test's inbound target). The actions are the library calls
//! `kubectl kubemail queue ...` makes.
//!
//! * a held message is delivered by no replica until it is released, then once;
//! * `retry` makes a message deferred for an hour deliverable at once;
//! * `delete` with a notice sends exactly one DSN and never delivers; a silent delete sends
//!   none; dry runs change nothing.

mod common;
mod delivery_support;

use std::time::{Duration, Instant};

use common::{Nats, Node, unique};
use delivery_support::{Knot, Setup, configure, example_zone, remote_zone, submit};
use futures::TryStreamExt as _;
use kubemail_queue_admin::actions::{Kind, Result_};
use kubemail_queue_admin::{Filter, Listed, Queue, State};
use kubemail_test_support::scripted_sink::ScriptedSink;
use serde_json::json;

/// Two replicas of example.test delivering to `remote`, DSNs to `inbound`; retries follow
/// `intervals`.
fn replicas(
    nats: &Nats,
    knot: &Knot,
    remote: &ScriptedSink,
    inbound: &ScriptedSink,
    intervals: &[&str],
) -> (Node, Node) {
    let intervals = json!(intervals);
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
        c["delivery"]["retry"]["intervals"] = intervals.clone();
        c["delivery"]["retry"]["lifetime"] = json!("3h");
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

async fn queue(node: &Node) -> Queue {
    let client = async_nats::connect(&node.nats_url).await.expect("nats");
    Queue::open(
        async_nats::jetstream::new(client),
        &node.stream,
        &node.subject_prefix,
        "queue-ops-test",
    )
    .await
    .expect("open the queue")
}

async fn entries(q: &Queue) -> Vec<Listed> {
    q.scan(0, Filter::default())
        .await
        .expect("scan")
        .try_collect()
        .await
        .expect("scan")
}

/// The queue's only entry, once it is in `state`.
async fn wait_for_state(q: &Queue, state: State, limit: Duration) -> Listed {
    let deadline = Instant::now() + limit;
    loop {
        let all = entries(q).await;
        let now = std::time::SystemTime::now();
        if let [only] = all.as_slice()
            && only.state(now) == state
        {
            return only.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no single entry in state {state:?} within {limit:?}; queue: {:?}",
            all.iter()
                .map(|l| (l.entry.queue_id.to_string(), l.state(now)))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn by_id(listed: &Listed) -> Filter {
    Filter {
        queue_ids: vec![listed.entry.queue_id.to_string()],
        ..Filter::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_message_is_delivered_by_no_replica_until_released() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let remote = ScriptedSink::start(Duration::ZERO);
    let inbound = ScriptedSink::start(Duration::ZERO);
    // Retries every 2 s: without the hold the message would be delivered within seconds.
    let (a, _b) = replicas(&nats, &knot, &remote, &inbound, &["2s"]);
    let q = queue(&a).await;
    remote.refuse(true);
    let subject = unique("held");
    submit(a.ports.submission, &["carol@remote.test"], &subject, "Hi.");
    let deferred = wait_for_state(&q, State::Deferred, Duration::from_secs(30)).await;
    assert!(deferred.entry.attempts >= 1);

    let summary = q
        .act(
            &Kind::Hold {
                reason: Some("customer asked".into()),
            },
            by_id(&deferred),
            false,
            |_| {},
        )
        .await
        .expect("hold");
    assert_eq!(summary.changed, 1, "{summary:?}");
    remote.refuse(false);
    // Five retry periods on two replicas: nobody delivers it.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(remote.count(&subject), 0, "a held message was delivered");
    let held = entries(&q).await;
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].state(std::time::SystemTime::now()), State::Held);
    assert_eq!(
        held[0].entry.admin.hold_reason.as_deref(),
        Some("customer asked")
    );
    assert!(held[0].subject.contains("._held."), "{}", held[0].subject);

    let summary = q
        .act(&Kind::Release, by_id(&deferred), false, |_| {})
        .await
        .expect("release");
    assert_eq!(summary.changed, 1, "{summary:?}");
    wait_for(
        Duration::from_secs(20),
        "delivery after the release",
        || remote.count(&subject) == 1,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(remote.count(&subject), 1, "delivered once");
    assert!(entries(&q).await.is_empty(), "the queue is empty");
    assert_eq!(inbound.received().len(), 0, "no DSN for a held message");

    // Each action is an event of the message's domain, naming what was done and by whom.
    let actions = queue_action_events(&a, &deferred.entry.domain).await;
    let done: Vec<(&str, &str, Option<&str>)> = actions
        .iter()
        .map(|e| {
            (
                e["data"]["action"]["name"].as_str().unwrap_or(""),
                e["data"]["action"]["actor"].as_str().unwrap_or(""),
                e["data"]["action"]["reason"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        done,
        [
            ("hold", "queue-ops-test", Some("customer asked")),
            ("release", "queue-ops-test", None)
        ],
        "{actions:?}"
    );
    for e in &actions {
        assert_eq!(e["type"], "io.kubemail.delivery.queue_action", "{e}");
        assert_eq!(
            e["data"]["queueId"],
            deferred.entry.queue_id.to_string(),
            "{e}"
        );
        assert_eq!(
            e["data"]["action"]["recipients"],
            json!(["carol@remote.test"]),
            "{e}"
        );
    }
}

/// The `queue_action` events of `domain` in the events stream, oldest first.
async fn queue_action_events(node: &Node, domain: &str) -> Vec<serde_json::Value> {
    use kubemail_queue::events::{EVENTS_STREAM, EventType, event_subject};
    let client = async_nats::connect(&node.nats_url).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .expect("the events stream");
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: event_subject(domain, EventType::QueueAction),
            ..Default::default()
        })
        .await
        .expect("an ordered consumer");
    let pending = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await.expect("messages");
    let mut out = Vec::new();
    while (out.len() as u64) < pending {
        let m = tokio::time::timeout(Duration::from_secs(10), messages.try_next())
            .await
            .expect("the events in time")
            .expect("an event")
            .expect("not the end");
        out.push(serde_json::from_slice(&m.payload).expect("JSON"));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_now_delivers_a_message_deferred_for_an_hour_and_a_dry_run_changes_nothing() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let remote = ScriptedSink::start(Duration::ZERO);
    let inbound = ScriptedSink::start(Duration::ZERO);
    let (a, _b) = replicas(&nats, &knot, &remote, &inbound, &["1h"]);
    let q = queue(&a).await;
    remote.refuse(true);
    let subject = unique("retry");
    submit(a.ports.submission, &["carol@remote.test"], &subject, "Hi.");
    let deferred = wait_for_state(&q, State::Deferred, Duration::from_secs(30)).await;
    let wait = deferred
        .entry
        .not_before
        .and_then(|t| t.duration_since(std::time::SystemTime::now()).ok())
        .unwrap_or_default();
    assert!(
        wait > Duration::from_secs(50 * 60),
        "next attempt in an hour, not {wait:?}"
    );
    remote.refuse(false);

    let deferred_filter = Filter {
        state: Some(State::Deferred),
        ..Filter::default()
    };
    let dry = q
        .act(&Kind::Retry, deferred_filter.clone(), true, |_| {})
        .await
        .expect("dry run");
    assert_eq!((dry.matched, dry.would_change, dry.changed), (1, 1, 0));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_dry = entries(&q).await;
    assert_eq!(after_dry.len(), 1);
    assert_eq!(
        after_dry[0].sequence, deferred.sequence,
        "the dry run changed the entry"
    );
    assert_eq!(remote.count(&subject), 0);

    let mut outcomes = Vec::new();
    let summary = q
        .act(&Kind::Retry, deferred_filter, false, |o| {
            outcomes.push(o.clone())
        })
        .await
        .expect("retry");
    assert_eq!(summary.changed, 1, "{outcomes:?}");
    let started = Instant::now();
    wait_for(Duration::from_secs(15), "delivery after retry now", || {
        remote.count(&subject) == 1
    })
    .await;
    eprintln!("delivered {:?} after retry now", started.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(remote.count(&subject), 1);
    assert!(entries(&q).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_with_a_notice_sends_exactly_one_dsn_and_a_silent_delete_none() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let remote = ScriptedSink::start(Duration::ZERO);
    let inbound = ScriptedSink::start(Duration::ZERO);
    let (a, b) = replicas(&nats, &knot, &remote, &inbound, &["1h"]);
    let q = queue(&a).await;
    remote.refuse(true);
    let notify = unique("delete-dsn");
    let silent = unique("delete-silent");
    submit(a.ports.submission, &["carol@remote.test"], &notify, "One.");
    submit(b.ports.submission, &["dave@remote.test"], &silent, "Two.");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (first, second) = loop {
        let all = entries(&q).await;
        let now = std::time::SystemTime::now();
        if all.len() == 2 && all.iter().all(|l| l.state(now) == State::Deferred) {
            let to = |who: &str| {
                all.iter()
                    .find(|l| l.entry.recipients[0].starts_with(who))
                    .cloned()
                    .expect("entry")
            };
            break (to("carol"), to("dave"));
        }
        assert!(Instant::now() < deadline, "two deferred entries: {all:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    remote.refuse(false);

    // Dry runs of both kinds: counted, nothing changed.
    for notify in [true, false] {
        let dry = q
            .act(&Kind::Delete { notify }, Filter::default(), true, |_| {})
            .await
            .expect("dry run");
        assert_eq!((dry.matched, dry.would_change), (2, 2), "{dry:?}");
    }
    let unchanged: Vec<u64> = entries(&q).await.iter().map(|l| l.sequence).collect();
    assert_eq!(unchanged, [first.sequence, second.sequence]);

    let summary = q
        .act(&Kind::Delete { notify: true }, by_id(&first), false, |_| {})
        .await
        .expect("delete with a notice");
    assert_eq!(summary.changed, 1);
    let summary = q
        .act(
            &Kind::Delete { notify: false },
            by_id(&second),
            false,
            |o| assert_eq!(o.result, Result_::Changed),
        )
        .await
        .expect("silent delete");
    assert_eq!(summary.changed, 1);

    wait_for(
        Duration::from_secs(20),
        "the DSN of the deleted message",
        || !inbound.received().is_empty(),
    )
    .await;
    // Time for a second DSN, a delivery or a resurrected entry to show up.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let dsns = inbound.received();
    assert_eq!(dsns.len(), 1, "exactly one DSN: {dsns:?}");
    let dsn = &dsns[0];
    assert!(dsn.recipients[0].contains("alice@example.test"), "{dsn:?}");
    assert!(dsn.data.contains("Status: 5.0.0"), "{}", dsn.data);
    assert!(
        dsn.data
            .contains("deleted from the queue by an administrator")
    );
    assert!(dsn.data.contains(&notify), "the DSN quotes the message");
    assert!(!dsn.data.contains(&silent), "no DSN for the silent delete");
    assert_eq!(remote.count(&notify), 0, "a deleted message was delivered");
    assert_eq!(remote.count(&silent), 0, "a deleted message was delivered");
    assert!(entries(&q).await.is_empty(), "nothing left in the queue");
}

/// A bulk action follows a message whose entry a worker wrote again under a later sequence
/// while the action ran (what a delivery worker does with a paused entry at every pause
/// check): the message is acted on once, under its new sequence, and counted once; it is
/// not missed. Real nats-server, no worker: the rewrite is done by hand at a known moment,
/// right after the action's first outcome, before the scan reaches the old entry. Mail
/// accepted after the action started is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_action_follows_an_entry_written_again_while_it_ran() {
    use kubemail_queue::QueueEntry;
    let nats = Nats::start();
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let config = kubemail_config::NatsConfig {
        stream: "KUBEMAIL_FOLLOW".to_owned(),
        subject_prefix: "follow.queue".to_owned(),
        ..Default::default()
    };
    js.create_stream(kubemail_queue::streams::queue_stream_config(&config))
        .await
        .expect("queue stream");
    let subject = kubemail_queue::subject(&config.subject_prefix, "example.test");
    let entry = |n: usize| {
        let mut e = common::queue_entry(
            "example.test",
            &format!("s{n}@example.test"),
            &format!("r{n}@remote.test"),
        );
        e.direction = kubemail_queue::Direction::Outbound;
        e
    };
    let entries: Vec<QueueEntry> = (0..3).map(entry).collect();
    let mut sequences = Vec::new();
    for e in &entries {
        let ack = js
            .publish_with_headers(subject.clone(), e.to_headers(&e.entry_id()), "m".into())
            .await
            .expect("publish")
            .await
            .expect("stored");
        sequences.push(ack.sequence);
    }
    let q = Queue::open(
        js.clone(),
        &config.stream,
        &config.subject_prefix,
        "queue-ops-test",
    )
    .await
    .expect("open the queue");

    let handle = tokio::runtime::Handle::current();
    let mut outcomes = Vec::new();
    let moved = entries[1].clone();
    let (old, rewrite_js, rewrite_subject) = (sequences[1], js.clone(), subject.clone());
    let summary = q
        .act(
            &Kind::Hold { reason: None },
            Filter::default(),
            false,
            |o| {
                if outcomes.is_empty() {
                    // The worker's pause check: the second entry, written again, the old one
                    // removed.
                    tokio::task::block_in_place(|| {
                        handle.block_on(async {
                            rewrite_js
                                .publish_with_headers(
                                    rewrite_subject.clone(),
                                    moved.to_headers(&format!("{}-again", moved.entry_id())),
                                    "m".into(),
                                )
                                .await
                                .expect("publish")
                                .await
                                .expect("stored");
                            let stream = rewrite_js.get_stream("KUBEMAIL_FOLLOW").await.unwrap();
                            assert!(stream.delete_message(old).await.expect("delete"));
                            // New mail, accepted after the action started.
                            let fresh = entry(9);
                            rewrite_js
                                .publish_with_headers(
                                    rewrite_subject.clone(),
                                    fresh.to_headers(&fresh.entry_id()),
                                    "m".into(),
                                )
                                .await
                                .expect("publish")
                                .await
                                .expect("stored");
                        })
                    });
                }
                outcomes.push(o.clone());
            },
        )
        .await
        .expect("hold");

    assert!(
        outcomes.iter().all(|o| o.result == Result_::Changed),
        "{outcomes:?}"
    );
    assert_eq!(outcomes.len(), 3, "one outcome per message: {outcomes:?}");
    assert!(
        outcomes.iter().any(|o| o.result == Result_::Changed
            && o.queue_id == moved.queue_id.to_string()
            && o.sequence > sequences[2]),
        "the moved entry is held under its new sequence: {outcomes:?}"
    );
    assert_eq!(
        (summary.matched, summary.changed, summary.gone),
        (3, 3, 0),
        "{summary:?}"
    );
    let listed: Vec<Listed> = q
        .scan(0, Filter::default())
        .await
        .expect("scan")
        .try_collect()
        .await
        .expect("entries");
    let held: Vec<String> = listed
        .iter()
        .filter(|l| l.held)
        .map(|l| l.entry.queue_id.to_string())
        .collect();
    assert_eq!(
        listed.iter().filter(|l| !l.held).count(),
        1,
        "the new mail is not held"
    );
    assert_eq!(held.len(), 3, "every message is held once: {held:?}");
    for e in &entries {
        assert!(held.contains(&e.queue_id.to_string()));
    }
}
