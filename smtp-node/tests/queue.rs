//! Durable enqueue, end to end: a `250` means the message is in the JetStream stream, byte
//! for byte with its envelope; no `250` without the queue; large messages through the object
//! store; stream settings that never drop mail.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const MESSAGE: &str = "From: someone@remote.test\r\nTo: bob@example.test\r\nSubject: durable\r\n\r\nline one\r\n.leading dot\r\n\r\nlast line\r\n";

#[tokio::test]
async fn accepted_message_is_in_the_stream_byte_for_byte() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    let steps = smtplib(
        node.ports.mx,
        "plain",
        json!([
            ["ehlo", "client.test"],
            ["mail", "someone@remote.test", ["BODY=8BITMIME"]],
            ["rcpt", "bob@example.test"],
            ["rcpt", "postmaster@example.test"],
            ["data", MESSAGE],
            ["quit"],
        ]),
    );
    assert_codes(
        &steps,
        &[
            "250 mx.example.test",
            "250 2.1.0",
            "250 2.1.5",
            "250 2.1.5",
            "250 2.0.0 Ok: queued as ",
            "221 2.0.0",
        ],
    );
    let queue_id = steps[4].msg.rsplit(' ').next().unwrap().to_owned();

    let entries = node.messages().await;
    assert_eq!(entries.len(), 1, "{entries:#?}");
    let e = &entries[0];
    assert_eq!(e.subject, format!("{}.example.test", node.subject_prefix));
    assert_eq!(e.header("Kubemail-Queue-Id"), Some(queue_id.as_str()));
    assert_eq!(
        e.header("Nats-Msg-Id"),
        Some(format!("{queue_id}.example.test").as_str())
    );
    assert_eq!(
        e.header("Kubemail-Mail-From"),
        Some("<someone@remote.test>")
    );
    assert_eq!(
        e.header("Kubemail-Rcpt-To"),
        Some(r#"["bob@example.test","postmaster@example.test"]"#)
    );
    assert_eq!(e.header("Kubemail-Direction"), Some("inbound"));
    assert_eq!(e.header("Kubemail-Domain"), Some("example.test"));
    assert_eq!(e.header("Kubemail-Body-Type"), Some("8BITMIME"));
    assert_eq!(e.header("Kubemail-Client-Ip"), Some("127.0.0.1"));
    let traceparent = e.header("traceparent").expect("traceparent");
    assert!(
        traceparent.starts_with("00-") && traceparent.len() == 55,
        "{traceparent}"
    );
    assert!(
        e.header("Kubemail-Accepted-At")
            .is_some_and(|t| t.ends_with('Z'))
    );

    // Our Received header, then exactly what the client meant (smtplib dot-stuffed it).
    let body = e.body_str();
    let (received, rest) = body
        .split_once("\r\nFrom: ")
        .expect("received header first");
    assert!(
        received.starts_with("Received: from client.test ([127.0.0.1])"),
        "{received}"
    );
    assert!(
        received.contains(&format!("with ESMTP id {queue_id}")),
        "{received}"
    );
    assert_eq!(format!("From: {rest}"), MESSAGE);
}

#[tokio::test]
async fn queue_outage_gives_451_and_recovery_gives_250() {
    let mut nats = Nats::start();
    let node = Node::start(&nats.url());
    let send = || {
        smtplib(
            node.ports.mx,
            "plain",
            json!([
                ["ehlo", "client.test"],
                ["mail", "someone@remote.test"],
                ["rcpt", "bob@example.test"],
                ["data", "Subject: outage\r\n\r\nhello\r\n"],
                ["quit"],
            ]),
        )
    };
    assert_eq!(send()[3].code, 250);

    nats.stop();
    let steps = send();
    assert_codes(
        &steps,
        &["250 mx", "250 2.1.0", "250 2.1.5", "451 4.3.0", "221"],
    );
    let ready = http_get(node.ports.admin, "/readyz");
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(http_get(node.ports.admin, "/healthz").starts_with("HTTP/1.1 200"));

    nats.restart();
    // The client reconnects on its own (backoff up to 4 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let steps = send();
        if steps[3].code == 250 {
            break;
        }
        assert_eq!(steps[3].code, 451, "{steps:?}");
        assert!(
            std::time::Instant::now() < deadline,
            "no 250 after the restart"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let entries = node.messages().await;
    assert_eq!(entries.len(), 2, "the 451 message was not queued");
}

#[tokio::test]
async fn lost_stream_is_recreated() {
    let mut nats = Nats::start();
    let node = Node::start(&nats.url());
    nats.restart_empty();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = RawTcp::connect(node.ports.mx).await;
        c.expect("220").await;
        c.cmd("EHLO client.test", "250").await;
        let reply = send_message(
            &mut c,
            "a@remote.test",
            "bob@example.test",
            b"Subject: again",
        )
        .await;
        if reply.starts_with("250 2.0.0") {
            break;
        }
        assert!(reply.starts_with("451 4.3.0"), "{reply}");
        assert!(
            std::time::Instant::now() < deadline,
            "stream never recreated"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(node.messages().await.len(), 1);
}

#[tokio::test]
async fn sigkill_right_after_250_loses_nothing() {
    let nats = Nats::shared();
    let mut node = Node::start(&nats.url());
    let mut c = RawTcp::connect(node.ports.mx).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    let reply = send_message(
        &mut c,
        "a@remote.test",
        "bob@example.test",
        b"Subject: crash\r\n\r\nsurvive",
    )
    .await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    node.kill();
    let entries = read_stream(&node.nats_url, &node.stream, &node.bucket).await;
    assert_eq!(entries.len(), 1);
    assert!(
        entries[0]
            .body_str()
            .ends_with("Subject: crash\r\n\r\nsurvive\r\n")
    );
    // And a restarted node keeps working against the same stream.
    node.restart();
    let mut c = RawTcp::connect(node.ports.mx).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    let reply = send_message(&mut c, "a@remote.test", "bob@example.test", b"again").await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    assert_eq!(node.messages().await.len(), 2);
}

#[tokio::test]
async fn twenty_mib_message_goes_through_the_object_store() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    // 20 MiB of 100-octet lines, each line different so corruption would show.
    let mut body = String::with_capacity(21 << 20);
    body.push_str("Subject: big\r\n\r\n");
    let mut i = 0u64;
    while body.len() < 20 << 20 {
        body.push_str(&format!("{i:010} {}\r\n", "x".repeat(87)));
        i += 1;
    }
    let mut c = RawTcp::connect(node.ports.mx).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd(
        &format!("MAIL FROM:<a@remote.test> SIZE={}", body.len()),
        "250",
    )
    .await;
    c.cmd("RCPT TO:<bob@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(body.as_bytes()).await;
    c.send(b".\r\n").await;
    c.expect("250 2.0.0").await;

    let entries = node.messages().await;
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(
        e.header("Kubemail-Body-Ref"),
        Some(format!("{}/{}", node.bucket, e.header("Nats-Msg-Id").unwrap()).as_str())
    );
    let stored = e.body_str();
    let (_, rest) = stored
        .split_once("\r\nSubject: big")
        .expect("received then body");
    assert_eq!(format!("Subject: big{rest}"), body, "body intact");
    assert_eq!(
        e.header("Kubemail-Body-Size"),
        Some(stored.len().to_string().as_str())
    );

    // Over the limit (25 MiB by default): declared, and undeclared (the client lies).
    c.cmd("MAIL FROM:<a@remote.test> SIZE=30000000", "552 5.3.4")
        .await;
    c.cmd("MAIL FROM:<a@remote.test> SIZE=1000", "250").await;
    c.cmd("RCPT TO:<bob@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    let chunk = "y".repeat(998) + "\r\n";
    for _ in 0..(26 << 10) {
        c.send(chunk.as_bytes()).await;
    }
    c.send(b".\r\n").await;
    c.expect("552 5.3.4").await;
    c.cmd("QUIT", "221").await;
    assert_eq!(
        node.messages().await.len(),
        1,
        "nothing of the oversized message queued"
    );
}

#[tokio::test]
async fn stream_settings_never_drop_queued_mail() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(&node.stream).await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    use async_nats::jetstream::stream::{DiscardPolicy, RetentionPolicy, StorageType};
    assert_eq!(config.retention, RetentionPolicy::WorkQueue);
    assert_eq!(config.storage, StorageType::File);
    assert_eq!(config.discard, DiscardPolicy::New);
    assert!(config.max_age.is_zero(), "no expiry inside NATS");
    assert!(config.duplicate_window >= Duration::from_secs(120));
    assert_eq!(config.subjects, [format!("{}.>", node.subject_prefix)]);
    assert!(
        js.get_object_store(&node.bucket).await.is_ok(),
        "body bucket exists"
    );
}

#[tokio::test]
async fn full_stream_gives_452() {
    let nats = Nats::shared();
    let node = Node::start_with(&nats.url(), true, |c| {
        c["nats"]["maxBytes"] = json!(4096);
    });
    let mut c = RawTcp::connect(node.ports.mx).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    let body = "z".repeat(900);
    let mut saw_full = false;
    for _ in 0..10 {
        let reply =
            send_message(&mut c, "a@remote.test", "bob@example.test", body.as_bytes()).await;
        if reply.starts_with("452 4.3.1") {
            saw_full = true;
            break;
        }
        assert!(reply.starts_with("250"), "{reply}");
    }
    assert!(saw_full, "a full stream must refuse with 452 4.3.1");
}
