//! Cluster-wide traffic shaping against real nodes: three `smtp-node` replicas of one domain
//! on one nats-server, a scripted sink as `remote.test`'s MX that counts its open
//! connections and can answer `421 4.7.0`.
//!
//! * a connection limit of 2 holds across the three replicas (each of which alone would
//!   open 4);
//! * `421` answers lower the destination's rate for every replica, and it comes back to the
//!   configured rate once the remote stops throttling.

mod common;
mod delivery_support;

use std::time::{Duration, Instant};

use common::{Nats, Node, unique};
use delivery_support::{
    Knot, Setup, configure, counter, example_zone, metrics, remote_zone, submit,
};
use kubemail_test_support::scripted_sink::ScriptedSink;
use serde_json::{Value, json};

fn replicas(
    nats: &Nats,
    knot: &Knot,
    remote: &ScriptedSink,
    rule: Value,
    recover_after: &str,
) -> Vec<Node> {
    let setup = |c: &mut Value| {
        configure(
            c,
            &Setup {
                dns: knot,
                mx_port: remote.port,
                inbound_port: None,
                allow_loopback: true,
                dkim: false,
                inbound_auth: None,
            },
        );
        c["delivery"]["concurrency"] = json!(4);
        c["delivery"]["connections"]["perDestination"] = json!(4);
        c["delivery"]["shaping"] = json!({
            "destinations": [rule],
            "backoff": { "recoverAfter": recover_after },
        });
    };
    let first = Node::start_with(&nats.url(), true, setup);
    let (stream, prefix, bucket) = (
        first.stream.clone(),
        first.subject_prefix.clone(),
        first.bucket.clone(),
    );
    let mut nodes = vec![first];
    for _ in 0..2 {
        nodes.push(Node::start_with(&nats.url(), true, |c| {
            setup(c);
            c["nats"]["stream"] = json!(stream);
            c["nats"]["subjectPrefix"] = json!(prefix);
            c["nats"]["bodyBucket"] = json!(bucket);
        }));
    }
    nodes
}

fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The rate gauge of `destination` on `node` (messages per minute; 0 = none set yet).
fn rate(node: &Node, destination: &str) -> f64 {
    counter(
        &metrics(node),
        &format!(
            "kubemail_smtp_delivery_shaping_messages_per_minute{{destination=\"{destination}\"}}"
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_limit_of_two_holds_across_three_replicas() {
    const MESSAGES: usize = 18;
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    // Slow final replies keep connections busy, so every replica wants several at once.
    let remote = ScriptedSink::start(Duration::from_millis(400));
    let nodes = replicas(
        &nats,
        &knot,
        &remote,
        json!({ "name": "remote", "domains": ["remote.test"], "maxConnections": 2 }),
        "60s",
    );
    let batch = unique("limit");
    // Queue them while the remote refuses, so the three replicas start on a full queue.
    remote.refuse(true);
    for i in 0..MESSAGES {
        submit(
            nodes[i % 3].ports.submission,
            &["carol@remote.test"],
            &format!("{batch}-{i:02}"),
            "Hi.",
        );
    }
    remote.refuse(false);
    wait_for(
        Duration::from_secs(90),
        "every message at the remote",
        || (0..MESSAGES).all(|i| remote.count(&format!("{batch}-{i:02}")) >= 1),
    );
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..MESSAGES {
        assert_eq!(remote.count(&format!("{batch}-{i:02}")), 1, "message {i}");
    }
    let max = remote.max_concurrent();
    eprintln!(
        "{} connections in all, at most {max} at once",
        remote.connections()
    );
    assert!(max <= 2, "the remote saw {max} connections at once");
    assert_eq!(max, 2, "the two slots were used in parallel");
    let delivered_by: Vec<f64> = nodes
        .iter()
        .map(|n| counter(&metrics(n), delivery_support::DELIVERED))
        .collect();
    eprintln!("delivered per replica: {delivered_by:?}");
    assert!(
        delivered_by.iter().filter(|d| **d > 0.0).count() >= 2,
        "more than one replica delivered: {delivered_by:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_421_lowers_the_rate_for_every_replica_and_it_recovers() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let remote = ScriptedSink::start(Duration::ZERO);
    // 120 per minute: one message every 500 ms when all is well.
    let nodes = replicas(
        &nats,
        &knot,
        &remote,
        json!({ "name": "remote", "domains": ["remote.test"], "messagesPerMinute": 120 }),
        "8s",
    );
    let batch = unique("throttle");
    remote.throttle_next(2);
    for i in 0..6 {
        submit(
            nodes[i % 3].ports.submission,
            &["carol@remote.test"],
            &format!("{batch}-a{i}"),
            "Hi.",
        );
    }
    // While the back-off is in force, replicas report a lower rate.
    let mut lowest = f64::MAX;
    let deadline = Instant::now() + Duration::from_secs(60);
    while (0..6).any(|i| remote.count(&format!("{batch}-a{i}")) == 0) {
        assert!(
            Instant::now() < deadline,
            "the throttled batch was not delivered"
        );
        for n in &nodes {
            let r = rate(n, "remote");
            if r > 0.0 {
                lowest = lowest.min(r);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(remote.throttled(), 2);
    let throttled: f64 = nodes
        .iter()
        .map(|n| {
            counter(
                &metrics(n),
                "kubemail_smtp_delivery_shaping_throttled_total",
            )
        })
        .sum();
    assert!(throttled >= 1.0, "no 421 was seen");
    eprintln!("lowest rate in force after the 421s: {lowest} per minute");
    assert!(lowest <= 60.0, "the rate was not lowered: {lowest}");
    // Deliveries right after the last 421 are spaced by the lowered rate (one level: 60 per
    // minute, a second apart; the first may go at once).
    let mut times: Vec<Instant> = remote.received().iter().map(|r| r.at).collect();
    times.sort();
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("gaps while throttled: {gaps:?}");
    let quick = gaps
        .iter()
        .filter(|g| **g < Duration::from_millis(800))
        .count();
    assert!(quick <= 1, "deliveries were not slowed down: {gaps:?}");

    // The remote is fine now; after the recovery time (8 s per level, at most two levels
    // from two 421s) the configured rate is back.
    std::thread::sleep(Duration::from_secs(17));
    let before = remote.received().len();
    let started = Instant::now();
    for i in 0..6 {
        submit(
            nodes[i % 3].ports.submission,
            &["carol@remote.test"],
            &format!("{batch}-b{i}"),
            "Hi.",
        );
    }
    wait_for(Duration::from_secs(30), "the second batch", || {
        remote.received().len() >= before + 6
    });
    eprintln!("second batch took {:?}", started.elapsed());
    let restored: Vec<f64> = nodes.iter().map(|n| rate(n, "remote")).collect();
    eprintln!("rates after recovery: {restored:?}");
    assert!(
        restored.iter().filter(|r| **r > 0.0).all(|r| *r == 120.0) && restored.contains(&120.0),
        "the configured rate is back: {restored:?}"
    );
    assert_eq!(remote.throttled(), 2, "no more 421s");
}
