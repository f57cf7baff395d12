//! Operating the node: per-phase timeouts and the minimum data rate, connection caps,
//! PROXY protocol, graceful shutdown on SIGTERM, health/metrics endpoints and
//! `check-config`.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

async fn connect_from(source: [u8; 4], addr: SocketAddr) -> RawTcp {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((source, 0)))
        .expect("bind the source address");
    let io = socket.connect(addr).await.expect("connect");
    io.set_nodelay(true).expect("nodelay");
    Raw::new(io)
}

#[tokio::test]
async fn idle_and_slow_clients_are_disconnected() {
    let nats = Nats::shared();
    let node = Node::start_with(&nats.url(), true, |c| {
        c["timeouts"] =
            json!({ "greeting": "2s", "command": "2s", "dataInit": "2s", "dataBlock": "2s" });
        c["minDataRate"] = json!(1000);
    });
    // No command after the greeting.
    let started = Instant::now();
    let mut idle = RawTcp::connect(node.ports.mx).await;
    idle.expect("220").await;
    idle.expect("421 4.4.2").await;
    assert!(idle.closed(Duration::from_secs(5)).await);
    assert!(started.elapsed() >= Duration::from_secs(2));

    // A command trickled one byte every 300 ms never completes within the command deadline.
    let mut slow = RawTcp::connect(node.ports.mx).await;
    slow.expect("220").await;
    let mut reply = None;
    for b in b"EHLO a-very-long-client-name.example\r\n" {
        slow.send(&[*b]).await;
        reply = slow.reply_within(Duration::from_millis(300)).await;
        if reply.is_some() {
            break;
        }
    }
    let reply = reply.expect("cut off before the line was complete");
    assert!(reply.starts_with("421 4.4.2"), "{reply}");

    // DATA at 10 bytes per 300 ms against a minimum of 1000 bytes/s.
    let mut trickle = RawTcp::connect(node.ports.mx).await;
    trickle.expect("220").await;
    trickle.cmd("EHLO client.test", "250").await;
    trickle.cmd("MAIL FROM:<a@remote.test>", "250").await;
    trickle.cmd("RCPT TO:<bob@example.test>", "250").await;
    trickle.cmd("DATA", "354").await;
    let started = Instant::now();
    let reply = loop {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "slow DATA not cut off"
        );
        if tokio::io::AsyncWriteExt::write_all(&mut trickle.io, b"0123456789")
            .await
            .is_err()
        {
            break trickle.reply().await;
        }
        if let Some(r) = trickle.reply_within(Duration::from_millis(300)).await {
            break r;
        }
    };
    assert!(reply.starts_with("421 4.4.2"), "{reply}");
    assert!(node.messages().await.is_empty());
}

#[tokio::test]
async fn connection_caps_answer_421() {
    let nats = Nats::shared();
    let node = Node::start_with(&nats.url(), true, |c| {
        c["maxConnections"] = json!(3);
        c["maxConnectionsPerIp"] = json!(2);
    });
    let mut a1 = connect_from([127, 0, 0, 1], node.ports.mx).await;
    a1.expect("220").await;
    let mut a2 = connect_from([127, 0, 0, 1], node.ports.mx).await;
    a2.expect("220").await;
    let mut a3 = connect_from([127, 0, 0, 1], node.ports.mx).await;
    a3.expect("421 4.7.0").await;
    assert!(a3.closed(Duration::from_secs(5)).await);
    let mut b1 = connect_from([127, 0, 0, 2], node.ports.submission).await;
    b1.expect("220").await;
    // Three open: the node-wide cap refuses anyone.
    let mut c1 = connect_from([127, 0, 0, 3], node.ports.mx).await;
    c1.expect("421 4.7.0").await;
    // Closing one frees a slot once the node has ended that session.
    a1.cmd("QUIT", "221").await;
    assert!(a1.closed(Duration::from_secs(5)).await);
    drop(a1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut c2 = connect_from([127, 0, 0, 3], node.ports.mx).await;
        let reply = c2.reply().await;
        if reply.starts_with("220") {
            break;
        }
        assert!(reply.starts_with("421 4.7.0"), "{reply}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot of a closed session was not freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = http_get(node.ports.admin, "/metrics");
    assert!(
        metrics.contains("reason=\"max_connections_per_ip\""),
        "{metrics}"
    );
    assert!(metrics.contains("reason=\"max_connections\""), "{metrics}");
}

#[tokio::test]
async fn proxy_protocol_gives_the_real_client_address() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    // v1
    let mut c = RawTcp::connect(node.ports.mx_proxy).await;
    c.send(b"PROXY TCP4 203.0.113.7 127.0.0.1 40001 25\r\nEHLO client.test\r\n")
        .await;
    c.expect("220").await;
    c.expect("250").await;
    let reply = send_message(&mut c, "a@remote.test", "bob@example.test", b"Subject: v1").await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    // v2, binary: 203.0.113.9 -> 127.0.0.1
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[
        0x21, 0x11, 0x00, 0x0c, 203, 0, 113, 9, 127, 0, 0, 1, 0x9c, 0x42, 0x00, 0x19,
    ]);
    let mut c = RawTcp::connect(node.ports.mx_proxy).await;
    c.send(&header).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    let reply = send_message(&mut c, "a@remote.test", "bob@example.test", b"Subject: v2").await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    let entries = node.messages().await;
    let ips: Vec<_> = entries
        .iter()
        .map(|e| e.header("Kubemail-Client-Ip").unwrap().to_owned())
        .collect();
    assert_eq!(ips, ["203.0.113.7", "203.0.113.9"]);
    assert!(
        entries[0]
            .body_str()
            .starts_with("Received: from client.test ([203.0.113.7])")
    );
    // No PROXY header where one is required: the connection is closed without a greeting.
    let mut c = RawTcp::connect(node.ports.mx_proxy).await;
    c.send(b"EHLO client.test\r\n").await;
    assert!(
        c.try_reply(Duration::from_secs(10)).await.is_none(),
        "closed without a reply"
    );
}

#[tokio::test]
async fn sigterm_drains_sessions_then_exits() {
    let nats = Nats::shared();
    let mut node = Node::start(&nats.url());
    let mut idle = RawTcp::connect(node.ports.mx).await;
    idle.expect("220").await;
    idle.cmd("EHLO client.test", "250").await;
    let mut busy = RawTcp::connect(node.ports.mx).await;
    busy.expect("220").await;
    busy.cmd("EHLO client.test", "250").await;
    busy.cmd("MAIL FROM:<a@remote.test>", "250").await;
    busy.cmd("RCPT TO:<bob@example.test>", "250").await;
    busy.cmd("DATA", "354").await;
    busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n").await;

    node.terminate();
    idle.expect("421 4.3.0").await;
    assert!(idle.closed(Duration::from_secs(5)).await);
    let ready = http_get(node.ports.admin, "/readyz");
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains("shutting down"),
        "{ready}"
    );
    assert!(
        tokio::net::TcpStream::connect(node.ports.mx).await.is_err(),
        "no new connections after SIGTERM"
    );
    // The open transaction may finish: 250, then 421.
    busy.send(b"second half\r\n.\r\n").await;
    busy.expect("250 2.0.0").await;
    busy.expect("421 4.3.0").await;
    assert!(
        node.wait_exit(Duration::from_secs(15)),
        "clean exit:\n{}",
        node.log()
    );
    let entries = read_stream(&node.nats_url, &node.stream, &node.bucket).await;
    assert_eq!(entries.len(), 1);
    assert!(
        entries[0]
            .body_str()
            .ends_with("first half\r\nsecond half\r\n")
    );
}

#[tokio::test]
async fn sigterm_exits_promptly_while_nats_is_down() {
    let mut nats = Nats::start();
    let mut node = Node::start(&nats.url());
    nats.stop();
    node.terminate();
    assert!(
        node.wait_exit(Duration::from_secs(10)),
        "clean exit:\n{}",
        node.log()
    );
}

#[tokio::test]
async fn health_and_metrics_endpoints() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    assert!(http_get(node.ports.admin, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http_get(node.ports.admin, "/readyz").starts_with("HTTP/1.1 200"));
    let mut c = RawTcp::connect(node.ports.mx).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    let reply = send_message(&mut c, "a@remote.test", "bob@example.test", b"Subject: m").await;
    assert!(reply.starts_with("250"));
    let metrics = http_get(node.ports.admin, "/metrics");
    assert!(
        metrics.contains("kubemail_smtp_messages_accepted_total{listener=\"mx\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kubemail_smtp_nats_connected 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kubemail_smtp_queue_publish_total{result=\"ok\"} 1"),
        "{metrics}"
    );
}

#[test]
fn check_config_reports_broken_configs() {
    let bin = env!("CARGO_BIN_EXE_smtp-node");
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/dev.yaml");
    let ok = Command::new(bin)
        .arg("check-config")
        .arg(&examples)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "unknown field",
            "hostname: mx.example.test\nlisteners: []\nmaxConection: 3\n",
            "maxConection",
        ),
        (
            "invalid values",
            "hostname: MX..test\nlisteners:\n  - { name: mx, kind: mx, address: \"127.0.0.1:25\" }\nmaxConnectionsPerIp: 0\n",
            "maxConnectionsPerIp",
        ),
        (
            "missing certificate",
            "hostname: mx.example.test\nlisteners:\n  - { name: s, kind: implicitTls, address: \"127.0.0.1:465\" }\ntls: { certFile: nope.pem, keyFile: nope-key.pem }\n",
            "nope.pem",
        ),
        ("not yaml", "hostname: [unclosed\n", "cannot parse"),
    ];
    for (what, text, needle) in cases {
        let path = dir.path().join("broken.yaml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(bin)
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: should fail");
        assert!(stderr.contains(needle), "{what}: {stderr}");
    }
    let out = Command::new(bin)
        .arg("check-config")
        .arg(dir.path().join("missing.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
}
