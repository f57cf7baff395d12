//! The load generator against a real peer (Postfix's smtp-sink): counts add up in closed loop,
//! open loop and one-connection-per-message modes, idle connections stay served, and the
//! sink saw every message. No timing assertions.

use std::time::Duration;

use kubemail_e2e::bench::loadgen::idle::{self, IdleSpec};
use kubemail_e2e::bench::loadgen::{self, LoadSpec};
use kubemail_e2e::bench::peers::{self, sink::Sink};

fn sink(count: u64) -> (Sink, tempfile::TempDir) {
    let binary = peers::find_tool("smtp-sink", &["/usr/sbin"], "Debian package postfix")
        .unwrap_or_else(|e| panic!("{e}: the load generator test needs smtp-sink (make setup)"));
    let dir = tempfile::tempdir().expect("temp dir");
    let sink = Sink::start(&binary, dir.path(), count).expect("start smtp-sink");
    (sink, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_counts_match_what_the_sink_received() {
    let (mut sink, _dir) = sink(1_000);
    let target = peers::loopback(sink.port);

    let mut spec = LoadSpec::new(target);
    spec.sessions = 3;
    spec.messages = 30;
    spec.message_size = 2048;
    spec.max_duration = Duration::from_secs(60);
    let closed = loadgen::run(spec.clone()).await.unwrap();
    assert_eq!(
        (
            closed.attempted,
            closed.accepted,
            closed.rejected,
            closed.failed
        ),
        (30, 30, 0, 0),
        "{}",
        closed.summary()
    );
    assert_eq!(closed.data_latency.count, 30);
    assert_eq!(closed.txn_latency.count, 30);
    assert!(closed.connections >= 1 && closed.connections <= 3);
    assert!(!closed.deadline_hit);

    // Open loop, a new connection per message.
    spec.messages = 10;
    spec.rate = Some(200.0);
    spec.messages_per_connection = Some(1);
    let open = loadgen::run(spec).await.unwrap();
    assert_eq!(
        (open.accepted, open.connections),
        (10, 10),
        "{}",
        open.summary()
    );

    // Idle connections after EHLO answer NOOP.
    let mut plain = LoadSpec::new(target);
    plain.io_timeout = Duration::from_secs(10);
    let mut held = idle::open(&IdleSpec {
        connect: plain.connect_spec(),
        count: 5,
        concurrency: 2,
        max_duration: Duration::from_secs(30),
    })
    .await
    .unwrap();
    assert_eq!((held.len(), held.failed), (5, 0));
    assert_eq!(held.count_alive(5).await, 5);
    held.close(5).await;

    // The sink counts a message when the session ends; give the last ones a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sink.received() < 40 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sink.received(), 40);
    sink.stop();
}

#[tokio::test]
async fn loadgen_refuses_non_loopback_targets() {
    let spec = LoadSpec::new("192.0.2.10:25".parse().unwrap());
    let err = loadgen::run(spec).await.unwrap_err();
    assert!(err.to_string().contains("loopback"), "{err}");
}
