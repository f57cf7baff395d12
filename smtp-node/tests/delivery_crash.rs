//! Workers that die and workers that share: a node killed with SIGKILL in the middle of a
//! delivery loses nothing (JetStream redelivers the entry after the ack wait, the restarted
//! node delivers it; a duplicate is possible at-least-once behaviour and is reported), and
//! two node processes on one domain share its durable consumer so each message is delivered
//! once.

mod common;
mod delivery_support;

use std::time::Duration;

use common::{Nats, Node, queue_is_empty, unique};
use delivery_support::{
    DELIVERED, Knot, Setup, Sink, configure, counter, example_zone, log, metrics, remote_zone,
    submit, wait_until,
};

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_delivery_loses_nothing() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    // The remote takes 20 s to answer the final dot: the kill lands while the worker waits,
    // however slowly this test runs.
    let mut sink = Sink::start(&["-W", ".:20"]);
    let mut node = Node::start_with(&nats.url(), true, |c| {
        configure(
            c,
            &Setup {
                dns: &knot,
                mx_port: sink.port,
                inbound_port: None,
                allow_loopback: true,
                dkim: false,
                inbound_auth: None,
            },
        )
    });
    let subject = unique("crash");
    submit(
        node.ports.submission,
        &["carol@remote.test"],
        &subject,
        "Hi.",
    );
    // Wait until the worker is connected to the remote, then for the data to be sent.
    wait_until(
        Duration::from_secs(30),
        "the worker to connect to the remote",
        || {
            log(&node)
                .contains("delivery::client: connected")
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_millis(1500));
    node.kill();
    eprintln!(
        "killed the node mid-delivery; remote has {} copies",
        sink.count(&subject)
    );

    // The remote answers at once from now on. The same node (same config, stream and
    // consumer) comes back; JetStream redelivers the entry once its ack wait (3 s) has passed
    // without progress acks.
    sink.restart(&[]);
    node.restart();
    wait_until(
        Duration::from_secs(60),
        "delivery after the restart",
        || {
            log(&node)
                .contains("delivered recipient=carol@remote.test")
                .then_some(())
        },
    );
    wait_until(Duration::from_secs(15), "an empty queue", || {
        queue_is_empty(&node).then_some(())
    });
    let copies = sink.count(&subject);
    eprintln!(
        "SIGKILL mid-delivery: the remote holds {copies} copy(ies); duplicates: {}",
        copies.saturating_sub(1)
    );
    assert!(copies >= 1, "the message was lost");
    // At-least-once: the remote may have accepted the first transaction after the kill,
    // but never more than the two attempts that were made.
    assert!(copies <= 2, "{copies} copies for two attempts");
    let m = metrics(&node);
    assert_eq!(counter(&m, DELIVERED), 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_on_one_domain_share_the_queue_and_deliver_each_message_once() {
    const MESSAGES: usize = 12;
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    // A little delay per message keeps both nodes busy at the same time.
    let sink = Sink::start(&["-W", ".:1"]);
    let setup = |c: &mut serde_json::Value| {
        configure(
            c,
            &Setup {
                dns: &knot,
                mx_port: sink.port,
                inbound_port: None,
                allow_loopback: true,
                dkim: false,
                inbound_auth: None,
            },
        );
        c["delivery"]["concurrency"] = serde_json::json!(2);
    };
    let mut a = Node::start_with(&nats.url(), true, setup);
    let (stream, prefix, bucket) = (a.stream.clone(), a.subject_prefix.clone(), a.bucket.clone());
    let b = Node::start_with(&nats.url(), true, |c| {
        setup(c);
        // The same queue as node A: two replicas of one MailDomain.
        c["nats"]["stream"] = serde_json::json!(stream);
        c["nats"]["subjectPrefix"] = serde_json::json!(prefix);
        c["nats"]["bodyBucket"] = serde_json::json!(bucket);
    });
    let batch = unique("shared");
    for i in 0..MESSAGES {
        let node = if i % 2 == 0 { &a } else { &b };
        submit(
            node.ports.submission,
            &["carol@remote.test"],
            &format!("{batch}-{i:02}"),
            "Hi.",
        );
    }
    wait_until(
        Duration::from_secs(60),
        "every message at the remote",
        || {
            (0..MESSAGES)
                .all(|i| sink.count(&format!("{batch}-{i:02}")) >= 1)
                .then_some(())
        },
    );
    wait_until(Duration::from_secs(15), "an empty queue", || {
        queue_is_empty(&a).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    for i in 0..MESSAGES {
        let copies = sink.count(&format!("{batch}-{i:02}"));
        assert_eq!(copies, 1, "message {i} delivered {copies} times");
    }
    let delivered = |n: &Node| counter(&metrics(n), DELIVERED);
    let (by_a, by_b) = (delivered(&a), delivered(&b));
    eprintln!("delivered by node A: {by_a}, by node B: {by_b}");
    assert_eq!(by_a + by_b, MESSAGES as f64);
    assert!(
        log(&a).contains("delivery consumer ready") && log(&b).contains("delivery consumer ready"),
        "both nodes pull from the shared consumer"
    );
    // SIGTERM with workers running: the node stops pulling and exits cleanly.
    a.terminate();
    assert!(
        a.wait_exit(Duration::from_secs(30)),
        "clean exit on SIGTERM:\n{}",
        log(&a)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_that_keeps_killing_workers_is_bounced_not_looped_on() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    // The remote never answers the final dot in time; every attempt is cut by a kill.
    let remote = Sink::start(&["-W", ".:30"]);
    let inbound = Sink::start(&[]);
    let mut node = Node::start_with(&nats.url(), true, |c| {
        configure(
            c,
            &Setup {
                dns: &knot,
                mx_port: remote.port,
                inbound_port: Some(inbound.port),
                allow_loopback: true,
                dkim: false,
                inbound_auth: None,
            },
        );
        // Attempts on deliveries 1 and 2, give up on 3 (4 stays spare).
        c["delivery"]["consumer"]["maxDeliver"] = serde_json::json!(4);
    });
    let subject = unique("poison");
    submit(
        node.ports.submission,
        &["carol@remote.test"],
        &subject,
        "Hi.",
    );
    for round in 1..=2 {
        wait_until(
            Duration::from_secs(30),
            "the worker to reach the remote",
            || {
                log(&node)
                    .contains("delivery::client: connected")
                    .then_some(())
            },
        );
        std::thread::sleep(Duration::from_millis(1500));
        eprintln!("round {round}: killing the node mid-delivery");
        node.kill();
        node.restart();
    }
    let dump = wait_until(
        Duration::from_secs(30),
        "the bounce of the poison message",
        || {
            inbound
                .transactions()
                .into_iter()
                .find(|t| t.contains("Subject: Undelivered Mail Returned to Sender"))
        },
    );
    assert!(dump.contains("Status: 5.3.0"), "{dump}");
    assert!(dump.contains("interrupted 2 times"), "{dump}");
    wait_until(Duration::from_secs(15), "an empty queue", || {
        queue_is_empty(&node).then_some(())
    });
    let text = log(&node);
    let third_attempt = text
        .lines()
        .any(|l| l.contains("host=mx.remote.test") && l.contains("delivery::client: connected"));
    assert!(!third_attempt, "no third attempt at the remote:\n{text}");
    let m = metrics(&node);
    assert_eq!(
        counter(
            &m,
            "kubemail_smtp_delivery_poison_messages_total{domain=\"example.test\"}"
        ),
        1.0,
        "{m}"
    );
}
