//! The production durability class against real failures: three JetStream servers on loopback
//! (`sync_interval: always`), the queue stream with three replicas, the real node delivering
//! to Postfix's smtp-sink. Under a bounded load of accepted messages one NATS server is
//! killed with SIGKILL (the stream's leader, the worst one to lose) and later restarted:
//! every message that got `250` is delivered exactly once or is still queued, none is lost;
//! the node answers `451` only while the stream has no quorum (the leader election after the
//! kill, and while two of three servers are down), never `250` then.

// Test helpers panic on purpose: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
mod delivery_support;

use std::time::{Duration, Instant};

use common::{Node, RawTcp, send_message};
use delivery_support::Sink;
use kubemail_test_support::nats::NatsCluster;
use serde_json::json;

/// Longest leader election after losing the leader (NATS elects within a few seconds).
const ELECTION: Duration = Duration::from_secs(20);

/// Sends one message to bob@example.test over the MX port; the final reply's code.
async fn send(node: &Node, token: &str) -> String {
    let mut c = RawTcp::connect(node.ports.mx).await;
    c.expect("220").await;
    c.cmd("EHLO client.remote.test", "250").await;
    let body = format!(
        "From: <sender@remote.test>\r\nTo: <bob@example.test>\r\nSubject: {token}\r\n\r\n{token}\r\n"
    );
    let reply = send_message(
        &mut c,
        "sender@remote.test",
        "bob@example.test",
        body.as_bytes(),
    )
    .await;
    let _ = c.send(b"QUIT\r\n").await;
    reply.chars().take(3).collect()
}

async fn admin(nats: &NatsCluster) -> async_nats::jetstream::Context {
    let urls: Vec<String> = nats.urls("nats").split(',').map(str::to_owned).collect();
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(urls)
        .await
        .expect("connect to the cluster");
    async_nats::jetstream::new(client)
}

/// The server leading `stream`, as its index in the cluster.
async fn leader(nats: &NatsCluster, stream: &str) -> usize {
    let js = admin(nats).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = js.get_stream(stream).await
            && let Ok(info) = s.info().await
            && let Some(name) = info.cluster.as_ref().and_then(|c| c.leader.clone())
        {
            assert_eq!(info.config.num_replicas, 3, "the stream has three replicas");
            return nats
                .servers
                .iter()
                .position(|s| s.name == name)
                .expect("a server of ours leads");
        }
        assert!(Instant::now() < deadline, "no leader for {stream}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Entries of `stream` whose body carries `token`.
async fn queued_with(nats: &NatsCluster, stream: &str, token: &str) -> usize {
    let js = admin(nats).await;
    let Ok(mut s) = js.get_stream(stream).await else {
        return 0;
    };
    let Ok(info) = s.info().await else { return 0 };
    let state = info.state.clone();
    let mut n = 0;
    if state.messages == 0 {
        return 0;
    }
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = s.get_raw_message(seq).await
            && String::from_utf8_lossy(&m.payload).contains(token)
        {
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn r3_queue_loses_nothing_when_a_nats_server_is_killed() {
    common::require_tool("nats-server");
    let mut nats = NatsCluster::start(3, "", "sync_interval: always");
    let sink = Sink::start(&[]);
    let sink_port = sink.port;
    let mut node = Node::start_with(&nats.urls("nats"), false, |c| {
        c["nats"]["replicas"] = json!(3);
        c["nats"]["publishTimeout"] = json!("2s");
        c["delivery"] = json!({
            "enabled": true,
            "concurrency": 4,
            "allowedNetworks": ["127.0.0.0/8"],
            "retry": { "minBackoff": "1s", "maxBackoff": "2s" },
            "consumer": { "ackWait": "5s" },
        });
        c["domains"][0]["inbound"] =
            json!({ "host": "127.0.0.1", "port": sink_port, "protocol": "smtp" });
    });
    node.wait_ready(Duration::from_secs(90));
    let stream = node.stream.clone();

    let mut accepted = Vec::new();
    let mut next = 0;
    let mut token = || {
        next += 1;
        format!("r3-{next:03}")
    };
    // All three servers up: every message is accepted.
    for _ in 0..10 {
        let t = token();
        assert_eq!(send(&node, &t).await, "250", "{t} with every server up");
        accepted.push(t);
    }

    // Lose the stream's leader: 451 only until a new leader is elected, then 250 again.
    let first = leader(&nats, &stream).await;
    nats.kill(first);
    let killed_at = Instant::now();
    let mut recovered = None;
    let mut after = 0;
    while after < 10 {
        assert!(
            killed_at.elapsed() < ELECTION,
            "mail is not accepted again with two of three servers within {ELECTION:?}:\n{}",
            node.log()
        );
        let t = token();
        match send(&node, &t).await.as_str() {
            "250" => {
                recovered.get_or_insert(killed_at.elapsed());
                after += 1;
                accepted.push(t);
            }
            "451" => assert!(
                recovered.is_none(),
                "{t}: 451 after the new leader had accepted mail"
            ),
            other => panic!("{t}: unexpected reply {other}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("accepting again {:?} after losing the leader", recovered);

    // Lose a second server: no quorum, so never 250.
    let second = (0..3).find(|i| *i != first).expect("another server");
    nats.kill(second);
    tokio::time::sleep(Duration::from_secs(3)).await;
    for _ in 0..3 {
        let t = token();
        assert_eq!(send(&node, &t).await, "451", "{t} without quorum");
    }

    // Both come back: mail is accepted again.
    nats.restart(first);
    nats.restart(second);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = token();
        if send(&node, &t).await == "250" {
            accepted.push(t);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no 250 after the servers came back"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for _ in 0..10 {
        let t = token();
        assert_eq!(send(&node, &t).await, "250", "{t} after the restart");
        accepted.push(t);
    }

    // Every accepted message is delivered exactly once, or still queued: none is lost.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        for t in &accepted {
            let delivered = sink.count(t);
            assert!(delivered <= 1, "{t} delivered {delivered} times");
        }
        let undelivered = accepted.iter().filter(|t| sink.count(t) == 0).count();
        if undelivered == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Judged once delivery has settled: a message read as "not at the sink" just before its
    // delivery and "not in the stream" just after its acknowledgement is not lost.
    let mut missing = Vec::new();
    for t in &accepted {
        if sink.count(t) == 0 && queued_with(&nats, &stream, t).await == 0 && sink.count(t) == 0 {
            missing.push(t.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "accepted but neither delivered nor queued: {missing:?}\n{}",
        node.log()
    );
    let delivered = accepted.iter().filter(|t| sink.count(t) == 1).count();
    assert_eq!(
        delivered,
        accepted.len(),
        "every accepted message reached the sink once the cluster was whole again"
    );
}
