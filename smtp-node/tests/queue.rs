//! Durable enqueue, end to end: a `250` means the message is in the JetStream stream, byte
//! for byte with its envelope; no `250` without the queue; large messages through the object
//! store; stream settings that never drop mail; a delivery consumer of the legacy name is
//! replaced on upgrade without losing an entry, and never one that is not the domain's own.

mod common;
mod delivery_support;

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, pull};
use common::*;
use delivery_support::{
    Knot, Setup, Sink, configure, counter, example_zone, log, metrics, wait_until,
};
use futures::StreamExt as _;
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
    // The de-duplication id is the content's (a client's retry has the same), not the
    // queue id's (a retry gets a new one).
    let msg_id = e.header("Nats-Msg-Id").expect("Nats-Msg-Id");
    assert!(
        msg_id.starts_with('c') && msg_id.ends_with(".example.test") && msg_id.len() == 46,
        "{msg_id}"
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

/// A new MX connection to `node` in the data phase of a message from a@remote.test to
/// bob@example.test.
async fn data_to_bob(node: &Node) -> RawTcp {
    let mut c = RawTcp::connect(node.ports.mx).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    c.cmd("RCPT TO:<bob@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c
}

/// `node`'s body bucket and a JetStream context on `nats`.
async fn body_store(
    nats: &Nats,
    node: &Node,
) -> (
    async_nats::jetstream::Context,
    async_nats::jetstream::object_store::ObjectStore,
) {
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let store = js
        .get_object_store(node.body_bucket())
        .await
        .expect("bucket");
    (js, store)
}

/// The names of the objects in `node`'s body bucket.
async fn body_objects(nats: &Nats, node: &Node) -> Vec<String> {
    let (_, store) = body_store(nats, node).await;
    let mut list = store.list().await.expect("list");
    let mut names = Vec::new();
    while let Some(info) = list.next().await {
        let info = info.expect("object info");
        if !info.deleted {
            names.push(info.name);
        }
    }
    names
}

/// Waits (at most 10 s) until the body bucket holds exactly `want`.
async fn wait_for_objects(nats: &Nats, node: &Node, want: &[String]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut names = body_objects(nats, node).await;
        names.sort();
        if names == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "body objects {names:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A message larger than an entry carries inline (`nats.inlineBodyLimit`, 512 KiB) is
/// stored while it arrives: the entry carries the header section, the object the body
/// after it. A message refused after its body started going to the store, or whose
/// client goes away in the middle, leaves no object behind.
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
        Some(
            kubemail_queue::body_ref_after_head(
                &node.body_bucket(),
                &format!("{}.example.test", e.header("Kubemail-Queue-Id").unwrap())
            )
            .as_str()
        )
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
    // Stored while it arrived: the entry holds our Received field and the header section.
    assert!(
        stored[..e.inline].starts_with("Received: ")
            && stored[..e.inline].ends_with("\r\nSubject: big\r\n\r\n"),
        "the entry carries the header section: {:?}",
        &stored[..e.inline.min(2000)]
    );
    let streamed = "kubemail_smtp_message_bodies_streamed_total";
    assert_eq!(counter(&metrics(&node), streamed), 1.0);
    let kept = vec![format!(
        "{}.example.test",
        e.header("Kubemail-Queue-Id").unwrap()
    )];
    wait_for_objects(nats, &node, &kept).await;

    // Over the limit (25 MiB by default): declared, and undeclared (the client lies).
    c.cmd("MAIL FROM:<a@remote.test> SIZE=30000000", "552 5.3.4")
        .await;
    c.cmd("MAIL FROM:<a@remote.test> SIZE=1000", "250").await;
    c.cmd("RCPT TO:<bob@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: too large\r\n\r\n").await;
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
    // Its body had started going to the store; the refusal removed it.
    assert_eq!(counter(&metrics(&node), streamed), 2.0);
    wait_for_objects(nats, &node, &kept).await;

    // A client that goes away in the middle of a large message.
    let mut c = data_to_bob(&node).await;
    c.send(body.as_bytes()[..4 << 20].as_ref()).await;
    // The body is on its way to the store when the connection drops.
    wait_until(
        Duration::from_secs(10),
        "the third body going to the store",
        || (counter(&metrics(&node), streamed) >= 3.0).then_some(()),
    );
    drop(c);
    wait_for_objects(nats, &node, &kept).await;
    assert_eq!(node.messages().await.len(), 1);

    // A header section longer than an entry carries inline: the message stays whole and
    // goes whole to the object store at its end.
    let mut long_head = String::from("Subject: long head\r\n");
    for i in 0..8_000 {
        long_head.push_str(&format!("X-Filler-{i:05}: {}\r\n", "h".repeat(80)));
    }
    let message = format!("{long_head}\r\n{}", &body[body.len() - (1 << 20)..]);
    let mut c = data_to_bob(&node).await;
    c.send(message.as_bytes()).await;
    c.send(b".\r\n").await;
    c.expect("250 2.0.0").await;
    c.cmd("QUIT", "221").await;
    assert_eq!(
        counter(&metrics(&node), streamed),
        3.0,
        "not stored while it arrived"
    );
    let entries = node.messages().await;
    let e = entries
        .iter()
        .find(|e| e.body_str().contains("Subject: long head"))
        .expect("the long-headed message");
    assert_eq!(e.inline, 0, "the whole message is in the object");
    assert!(
        !e.header("Kubemail-Body-Ref").unwrap().contains("+head"),
        "the plain reference of a body stored whole"
    );
    assert!(e.body_str().ends_with(&message), "intact");
}

/// A large message for two domains: its body goes to each domain's bucket while it arrives,
/// and each domain's entry carries the header section and refers to its own object.
#[tokio::test]
async fn a_large_message_for_two_domains_is_stored_in_each_domains_bucket() {
    let nats = Nats::shared();
    let node = Node::start_with(&nats.url(), true, |c| {
        c["domains"].as_array_mut().expect("domains").push(json!({
            "name": "other.test",
            "recipients": ["carol"],
            "inbound": { "host": "127.0.0.1", "port": 9, "protocol": "smtp" },
        }));
    });
    let mut message = String::from("Subject: two domains\r\n\r\n");
    let mut i = 0u64;
    while message.len() < 2 << 20 {
        message.push_str(&format!("{i:08} {}\r\n", "d".repeat(70)));
        i += 1;
    }
    let mut c = RawTcp::connect(node.ports.mx).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    c.cmd("RCPT TO:<bob@example.test>", "250").await;
    c.cmd("RCPT TO:<carol@other.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(message.as_bytes()).await;
    c.send(b".\r\n").await;
    c.expect("250 2.0.0").await;
    c.cmd("QUIT", "221").await;
    assert_eq!(
        counter(
            &metrics(&node),
            "kubemail_smtp_message_bodies_streamed_total"
        ),
        1.0
    );
    let entries = node.messages().await;
    assert_eq!(entries.len(), 2, "one entry per domain");
    let mut buckets = Vec::new();
    for e in &entries {
        let domain = e.header("Kubemail-Domain").expect("domain");
        let reference = e.header("Kubemail-Body-Ref").expect("a body object");
        assert!(reference.contains("+head/"), "{reference}");
        let (bucket, object) = kubemail_queue::split_body_ref(reference).expect("bucket/object");
        assert_eq!(
            bucket,
            kubemail_queue::body_bucket(&node.bucket, domain),
            "{domain}'s own bucket"
        );
        assert!(object.ends_with(&format!(".{domain}")), "{object}");
        buckets.push(bucket.to_owned());
        assert!(e.body_str().ends_with(&message), "{domain}: intact");
        assert!(
            e.body_str()[..e.inline].ends_with("Subject: two domains\r\n\r\n"),
            "{domain}: the entry carries the header section"
        );
    }
    buckets.sort();
    buckets.dedup();
    assert_eq!(buckets.len(), 2);
    // A node of an earlier release takes the reference's bucket part as it is: it cannot open
    // that, so it defers the message instead of delivering the object without the header
    // section its entry carries.
    let (js, _) = body_store(nats, &node).await;
    let reference = entries[0].header("Kubemail-Body-Ref").expect("reference");
    let (as_is, _) = reference.split_once('/').expect("bucket part");
    assert!(js.get_object_store(as_is).await.is_err(), "{as_is}");
}

/// Sends `message` to bob@example.test with BDAT in chunks of 324,010 octets; the reply to
/// the last chunk sent (the first that was not `250`).
async fn send_bdat(c: &mut RawTcp, message: &[u8]) -> String {
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    c.cmd("RCPT TO:<bob@example.test>", "250").await;
    let pieces: Vec<&[u8]> = message.chunks(324_010).collect();
    let mut reply = String::new();
    for (k, piece) in pieces.iter().enumerate() {
        let last = k + 1 == pieces.len();
        let verb = format!(
            "BDAT {}{}\r\n",
            piece.len(),
            if last { " LAST" } else { "" }
        );
        c.send(verb.as_bytes()).await;
        c.send(piece).await;
        reply = c.expect("").await;
        if !reply.starts_with("250") {
            break;
        }
    }
    reply
}

/// BDAT too: a large message's body goes to the store as its chunks arrive, checked as the
/// whole message would be (CRLFs cut between chunks are CRLFs); a bare LF found after its
/// body started going to the store refuses the message and leaves no object behind.
#[tokio::test]
async fn a_large_bdat_message_is_stored_while_its_chunks_arrive() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    let mut message = b"Subject: bdat-big\r\n\r\n".to_vec();
    let mut i = 0u64;
    while message.len() < 3 << 20 {
        message.extend_from_slice(format!("{i:08} {}\r\n", "b".repeat(70)).as_bytes());
        i += 1;
    }
    // Lines of 81 octets after a 21-octet header section: the second chunk ends between the
    // CR and the LF of a line, after the body started going to the store.
    assert_eq!(&message[648_019..648_021], b"\r\n");
    let mut c = RawTcp::connect(node.ports.mx).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    let reply = send_bdat(&mut c, &message).await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued"), "{reply}");
    let entries = node.messages().await;
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    let stored = e.body.as_slice();
    assert!(stored.ends_with(&message), "the message octet for octet");
    assert!(
        stored[..e.inline].ends_with(b"\r\nSubject: bdat-big\r\n\r\n"),
        "the entry carries the header section"
    );
    let streamed = "kubemail_smtp_message_bodies_streamed_total";
    assert_eq!(counter(&metrics(&node), streamed), 1.0);
    let kept = vec![format!(
        "{}.example.test",
        e.header("Kubemail-Queue-Id").unwrap()
    )];

    // A bare LF two megabytes in: found in the chunk that has it, after the body started
    // going to the store.
    let mut bad = message.clone();
    let at = 2 << 20;
    let cr = at + bad[at..].iter().position(|&b| b == b'\r').unwrap();
    bad.remove(cr);
    let reply = send_bdat(&mut c, &bad).await;
    assert!(reply.starts_with("550 5.6.0"), "{reply}");
    c.cmd("QUIT", "221").await;
    assert_eq!(counter(&metrics(&node), streamed), 2.0);
    wait_for_objects(nats, &node, &kept).await;
    assert_eq!(node.messages().await.len(), 1);
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
        js.get_object_store(node.body_bucket()).await.is_ok(),
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

/// The consumer name of earlier versions for example.test (dots as dashes).
const LEGACY_CONSUMER: &str = "kubemail-example-test";

/// Creates a consumer on `node`'s stream the way an earlier version did: durable, explicit
/// acks, filtered on `filter`.
async fn create_old_consumer(node: &Node, filter: &str) {
    let js = async_nats::jetstream::new(
        async_nats::connect(&node.nats_url)
            .await
            .expect("connect to nats"),
    );
    let stream = js.get_stream(&node.stream).await.expect("the stream");
    let config = pull::Config {
        durable_name: Some(LEGACY_CONSUMER.to_owned()),
        filter_subject: filter.to_owned(),
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(120),
        ..Default::default()
    };
    stream
        .create_consumer(config)
        .await
        .expect("create the old consumer");
}

/// The filter subject of consumer `name` on `node`'s stream; `None` when it does not exist.
async fn consumer_filter(node: &Node, name: &str) -> Option<String> {
    let js = async_nats::jetstream::new(
        async_nats::connect(&node.nats_url)
            .await
            .expect("connect to nats"),
    );
    let stream = js.get_stream(&node.stream).await.expect("the stream");
    match stream.consumer_info(name).await {
        Ok(info) => Some(info.config.filter_subject.clone()),
        Err(e) => {
            assert_eq!(
                e.kind(),
                async_nats::jetstream::context::ConsumerInfoErrorKind::NotFound,
                "{e}"
            );
            None
        }
    }
}

/// Turns the receiving-only `node` into one that delivers example.test's mail to `sink`,
/// and restarts it: the same stream, now with this version's delivery workers.
fn restart_delivering(node: &mut Node, knot: &Knot, sink: &Sink) {
    let text = std::fs::read_to_string(&node.config_path).expect("read config");
    let mut config: serde_json::Value = serde_yaml::from_str(&text).expect("config yaml");
    configure(
        &mut config,
        &Setup {
            dns: knot,
            mx_port: sink.port,
            inbound_port: Some(sink.port),
            allow_loopback: true,
            dkim: false,
            inbound_auth: None,
        },
    );
    std::fs::write(
        &node.config_path,
        serde_yaml::to_string(&config).expect("config yaml"),
    )
    .expect("write config");
    node.restart();
}

#[tokio::test(flavor = "multi_thread")]
async fn entries_of_a_legacy_consumer_are_all_delivered_after_the_upgrade() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone()]);
    let sink = Sink::start(&[]);
    // Mail queued while an earlier version served the domain.
    let mut node = Node::start(&nats.url());
    let tag = unique("upgrade");
    let mut c = RawTcp::connect(node.ports.mx).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    const QUEUED: usize = 6;
    for i in 0..QUEUED {
        let body = format!("Subject: {tag} #{i}.\r\n\r\nqueued before the upgrade");
        let reply =
            send_message(&mut c, "a@remote.test", "bob@example.test", body.as_bytes()).await;
        assert!(reply.starts_with("250 2.0.0"), "{reply}");
    }
    c.cmd("QUIT", "221").await;
    let filter = format!("{}.example.test", node.subject_prefix);
    create_old_consumer(&node, &filter).await;
    // An old worker took two entries and died before acknowledging them.
    let js = async_nats::jetstream::new(async_nats::connect(&node.nats_url).await.unwrap());
    let consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(&node.stream)
        .await
        .unwrap()
        .get_consumer(LEGACY_CONSUMER)
        .await
        .unwrap();
    let mut batch = consumer
        .batch()
        .max_messages(2)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .unwrap();
    let mut taken = 0;
    while let Some(m) = batch.next().await {
        m.unwrap();
        taken += 1;
    }
    assert_eq!(
        taken, 2,
        "the old consumer holds two unacknowledged entries"
    );

    restart_delivering(&mut node, &knot, &sink);
    wait_until(
        Duration::from_secs(60),
        "every queued entry delivered",
        || {
            (0..QUEUED)
                .all(|i| sink.count(&format!("Subject: {tag} #{i}.")) > 0)
                .then_some(())
        },
    );
    wait_until(Duration::from_secs(15), "an empty queue", || {
        queue_is_empty(&node).then_some(())
    });
    assert_eq!(
        consumer_filter(&node, LEGACY_CONSUMER).await,
        None,
        "the legacy consumer is gone"
    );
    assert_eq!(
        consumer_filter(&node, &kubemail_queue::consumer_name("example.test")).await,
        Some(filter),
        "this version's consumer took its place"
    );
    assert!(
        log(&node).contains("replaced the consumer of the legacy name"),
        "{}",
        log(&node)
    );
    for i in 0..QUEUED {
        assert_eq!(
            sink.count(&format!("Subject: {tag} #{i}.")),
            1,
            "entry {i} delivered once"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_legacy_named_consumer_that_is_not_the_domains_own_is_never_deleted() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone()]);
    let sink = Sink::start(&[]);
    let mut node = Node::start(&nats.url());
    // The legacy name, but filtering every subject of the stream (overlapping ours).
    let everything = format!("{}.>", node.subject_prefix);
    create_old_consumer(&node, &everything).await;

    restart_delivering(&mut node, &knot, &sink);
    wait_until(
        Duration::from_secs(30),
        "the node to report that it cannot set up its consumer",
        || {
            log(&node)
                .contains("cannot set up the delivery consumer")
                .then_some(())
        },
    );
    assert!(log(&node).contains("leaving it alone"), "{}", log(&node));
    assert_eq!(
        consumer_filter(&node, LEGACY_CONSUMER).await,
        Some(everything),
        "the foreign consumer survives"
    );
    assert_eq!(
        consumer_filter(&node, &kubemail_queue::consumer_name("example.test")).await,
        None
    );
}

/// One client of the group-commit durability test: sends `count` messages tagged
/// `gc-<client>-<n>` as fast as it is answered (counting each answer in `answered`), then,
/// once `retry` is set, sends every message that did not get a `250` again, the same octets,
/// until it does (a real client's retry). Returns (token, replies in order) per message.
async fn group_commit_client(
    addr: std::net::SocketAddr,
    client: usize,
    count: usize,
    answered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    retry: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<(String, Vec<String>)> {
    use std::sync::atomic::Ordering;
    let message = |token: &str| {
        format!("From: load@remote.test\r\nSubject: {token}\r\n\r\nbody of {token}\r\n")
            .into_bytes()
    };
    let mut c: Option<RawTcp> = None;
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let attempt = async |c: &mut Option<RawTcp>, body: &[u8]| -> String {
        if c.is_none() {
            let mut fresh = RawTcp::connect(addr).await;
            fresh.expect("220").await;
            fresh.cmd("EHLO client.test", "250").await;
            *c = Some(fresh);
        }
        let conn = c.as_mut().expect("connected");
        conn.cmd("MAIL FROM:<load@remote.test>", "250").await;
        conn.cmd("RCPT TO:<bob@example.test>", "250").await;
        conn.cmd("DATA", "354").await;
        conn.send(body).await;
        conn.send(b".\r\n").await;
        match conn.reply_within(Duration::from_secs(30)).await {
            Some(r) => r,
            None => {
                *c = None;
                "lost".to_owned()
            }
        }
    };
    for n in 0..count {
        let token = format!("gc-{client}-{n}");
        let reply = attempt(&mut c, &message(&token)).await;
        answered.fetch_add(1, Ordering::Relaxed);
        out.push((token, vec![reply]));
    }
    while !retry.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for (token, replies) in &mut out {
        while !replies.last().is_some_and(|r| r.starts_with("250")) {
            assert!(
                std::time::Instant::now() < deadline,
                "{token} never accepted: {replies:?}"
            );
            let reply = attempt(&mut c, &message(token)).await;
            if !reply.starts_with("250") {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            replies.push(reply);
        }
    }
    out
}

/// Group commit under a crash: many sessions' entries travel in atomic batches; nats-server is
/// SIGKILLed while batches are in flight and started again. Every message answered `250` is in
/// the stream afterwards, and every message that was refused (`451`) or lost its connection
/// and was then sent again is in it exactly once, also when the server had stored it before
/// the kill (its retry carries the same `Nats-Msg-Id`).
#[tokio::test]
async fn nats_killed_mid_batch_keeps_every_250_and_duplicates_no_retry() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let mut nats = Nats::start();
    let node = Node::start_with(&nats.url(), true, |c| {
        c["nats"]["publishTimeout"] = json!("2s");
    });
    let retry = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..40)
        .map(|k| {
            tokio::spawn(group_commit_client(
                node.ports.mx,
                k,
                40,
                answered.clone(),
                retry.clone(),
            ))
        })
        .collect();
    // Let the batches flow (a quarter of the 1,600 messages answered, however fast or slow
    // the machine), then kill the server under them.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while answered.load(Ordering::Relaxed) < 400 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    nats.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.restart();
    retry.store(true, Ordering::Relaxed);
    let mut results = Vec::new();
    for c in clients {
        results.extend(c.await.expect("client task"));
    }
    let accepted_first_time = results
        .iter()
        .filter(|(_, r)| r[0].starts_with("250"))
        .count();
    let retried = results.iter().filter(|(_, r)| r.len() > 1).count();
    assert!(
        retried > 0,
        "the kill must have refused some messages: {accepted_first_time} accepted at once"
    );
    let entries = node.messages().await;
    let mut per_token: HashMap<String, usize> = HashMap::new();
    for e in &entries {
        let body = e.body_str();
        let token = body
            .lines()
            .find_map(|l| l.strip_prefix("Subject: "))
            .expect("subject")
            .to_owned();
        *per_token.entry(token).or_default() += 1;
    }
    for (token, replies) in &results {
        assert_eq!(
            per_token.get(token).copied().unwrap_or(0),
            1,
            "{token} must be in the stream exactly once (replies {replies:?})"
        );
    }
    assert_eq!(entries.len(), results.len(), "nothing else in the stream");
    // The entries did travel in groups: fewer commits than messages.
    let metrics = http_get(node.ports.admin, "/metrics");
    let commits: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kubemail_smtp_queue_commit_messages_count "))
        .and_then(|v| v.trim().parse().ok())
        .expect("commit histogram");
    assert!(
        commits < results.len() as f64,
        "{commits} commits for {} messages",
        results.len()
    );
}

/// Creates the events stream of one replica synchronous (as a replicated one is, and as an
/// earlier release made it), with atomic batches as `atomic` says.
async fn create_synchronous_events_stream(js: &async_nats::jetstream::Context, atomic: bool) {
    use kubemail_queue::streams;
    let mut synchronous = streams::events_stream_config(
        1,
        streams::EVENTS_DEFAULT_MAX_AGE,
        streams::EVENTS_DEFAULT_MAX_BYTES,
    );
    synchronous.persist_mode = None;
    synchronous.allow_atomic_publish = atomic;
    js.create_stream(synchronous)
        .await
        .expect("a synchronous events stream");
}

/// On a synchronous events stream (replicated, or made by an earlier release) the
/// `received` events of many sessions' messages go in shared writes (atomic batches, one
/// fsync each with `sync_interval: always`), not one write per event: every message has its
/// one event, and the stream saw fewer writes than events.
#[tokio::test]
async fn received_events_of_concurrent_sessions_share_writes_on_a_synchronous_stream() {
    use kubemail_queue::events::EVENTS_STREAM;
    let nats = Nats::start();
    {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        create_synchronous_events_stream(&async_nats::jetstream::new(client), true).await;
    }
    let node = Node::start(&nats.url());
    // Nothing is refused here; a refusal would be sent again at once.
    let retry = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let answered = std::sync::Arc::default();
    let clients: Vec<_> = (0..40)
        .map(|k| {
            tokio::spawn(group_commit_client(
                node.ports.mx,
                k,
                10,
                std::sync::Arc::clone(&answered),
                retry.clone(),
            ))
        })
        .collect();
    let mut sent = 0;
    for c in clients {
        for (token, replies) in c.await.expect("client task") {
            assert!(
                replies.iter().any(|r| r.starts_with("250")),
                "{token}: {replies:?}"
            );
            sent += 1;
        }
    }
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(EVENTS_STREAM).await.expect("events stream");
    assert!(
        stream.cached_info().config.allow_atomic_publish,
        "the events stream takes atomic batches"
    );
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: "kubemail.events.*.received".to_owned(),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut queue_ids = std::collections::HashSet::new();
    while queue_ids.len() < sent {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {sent} received events", queue_ids.len()))
            .expect("stream open")
            .expect("message");
        let event: serde_json::Value = serde_json::from_slice(&next.payload).expect("json");
        let queue_id = event["data"]["queueId"]
            .as_str()
            .expect("queue id")
            .to_owned();
        assert!(queue_ids.insert(queue_id), "one received event per message");
    }
    let metrics = metrics(&node);
    let writes = counter(&metrics, "kubemail_smtp_events_commit_events_count ");
    let events = counter(&metrics, "kubemail_smtp_events_commit_events_sum ");
    eprintln!("{events} events in {writes} writes for {sent} messages");
    assert!(events >= sent as f64, "{events} events written for {sent}");
    assert!(
        writes < events / 2.0,
        "{writes} writes for {events} events: the events did not share writes"
    );
}

/// The sweeper deletes a body object no entry refers to and keeps (and marks) one an entry
/// refers to, even when its mark is missing (a node that died between the publish and the
/// mark).
#[tokio::test]
async fn the_sweeper_deletes_only_bodies_no_entry_refers_to() {
    use kubemail_smtp_node::config::NatsConfig;
    use kubemail_smtp_node::queue::sweeper;
    use kubemail_smtp_node::queue::{QueueEntry, QueueId};
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    let (js, store) = body_store(nats, &node).await;
    let queue_id = QueueId::new();
    let referenced = format!("{queue_id}.example.test");
    let orphan = format!("{}.example.test", QueueId::new());
    let held_id = QueueId::new();
    let held = format!("{held_id}.example.test");
    for name in [&referenced, &orphan, &held] {
        let mut body: &[u8] = b"Subject: big\r\n\r\nbody\r\n";
        store.put(name.as_str(), &mut body).await.expect("put");
    }
    let entry = QueueEntry {
        queue_id,
        body_ref: Some(format!("{}/{referenced}", node.body_bucket())),
        body_size: Some(22),
        ..queue_entry("example.test", "a@remote.test", "bob@example.test")
    };
    // Entries of another domain come first in the stream; the sweeper reads past them.
    for _ in 0..3 {
        let mut other = entry.clone();
        other.domain = "other.test".to_owned();
        other.body_ref = None;
        js.publish_with_headers(
            format!("{}.other.test", node.subject_prefix),
            other.to_headers(&other.entry_id()),
            "x".into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    }
    js.publish_with_headers(
        format!("{}.example.test", node.subject_prefix),
        entry.to_headers(&entry.entry_id()),
        bytes::Bytes::new(),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
    // A held entry (no worker reads its subject) keeps its body too.
    let mut held_entry = entry.clone();
    held_entry.queue_id = held_id;
    held_entry.body_ref = Some(format!("{}/{held}", node.body_bucket()));
    js.publish_with_headers(
        kubemail_queue::held_subject(&node.subject_prefix, "example.test"),
        held_entry.to_headers(&held_entry.entry_id()),
        bytes::Bytes::new(),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
    let config = NatsConfig {
        url: nats.url(),
        stream: node.stream.clone(),
        subject_prefix: node.subject_prefix.clone(),
        body_bucket: node.bucket.clone(),
        ..NatsConfig::default()
    };
    // Younger than the grace period: nothing is touched.
    let deleted = sweeper::sweep(
        &js,
        &config,
        "example.test",
        &store,
        Duration::from_secs(3600),
    )
    .await
    .expect("sweep");
    assert_eq!(deleted, 0);
    assert!(store.info(&orphan).await.is_ok_and(|i| !i.deleted));
    let deleted = sweeper::sweep(&js, &config, "example.test", &store, Duration::ZERO)
        .await
        .expect("sweep");
    assert_eq!(deleted, 1);
    assert!(
        store.info(&orphan).await.is_ok_and(|i| i.deleted),
        "the orphan is gone"
    );
    let kept = store
        .info(&referenced)
        .await
        .expect("the referenced body stays");
    assert_eq!(
        kept.description.as_deref(),
        Some(sweeper::MARK),
        "and is marked, so later sweeps leave it alone"
    );
    let kept_held = store.info(&held).await.expect("the held entry's body");
    assert!(!kept_held.deleted, "a held entry's body is not an orphan");
    assert_eq!(kept_held.description.as_deref(), Some(sweeper::MARK));
    let entries = node.messages().await;
    assert!(
        entries
            .iter()
            .any(|e| e.body_str() == "Subject: big\r\n\r\nbody\r\n"),
        "the entry still finds its body"
    );
}

/// A node that manages its own JetStream objects (`nats.manageStreams`, the default outside
/// the operator's authenticated NATS) turns on atomic batches on an events stream made by an
/// earlier release, as the operator does, keeping what the stream holds.
#[tokio::test]
async fn a_self_managing_node_turns_on_atomic_batches_on_an_earlier_events_stream() {
    use kubemail_queue::events::EVENTS_STREAM;
    let nats = Nats::start();
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    create_synchronous_events_stream(&js, false).await;
    js.publish("kubemail.events.example_test.received", "kept".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    let node = Node::start(&nats.url());
    let mut c = RawTcp::connect(node.ports.mx).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    let reply = send_message(&mut c, "a@remote.test", "bob@example.test", b"Subject: x").await;
    assert!(reply.starts_with("250"), "{reply}");
    let mut info = None;
    for _ in 0..100 {
        let mut stream = js.get_stream(EVENTS_STREAM).await.expect("events stream");
        let now = stream.info().await.expect("info").clone();
        if now.config.allow_atomic_publish && now.state.messages >= 2 {
            info = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let info = info.expect("the node turned on atomic batches and published its event");
    assert!(info.state.messages >= 2, "the earlier event is kept");
}

/// A node that manages its own JetStream objects creates the events stream asynchronous
/// (one replica): it takes no atomic batches, every `received` event is stored, each in a
/// write of its own (no fsync of its own), and the node does not try to turn on batches.
#[tokio::test]
async fn a_self_managing_node_creates_an_asynchronous_events_stream_and_stores_every_event() {
    use kubemail_queue::events::EVENTS_STREAM;
    use kubemail_queue::streams;
    let nats = Nats::start();
    let node = Node::start(&nats.url());
    let clients: Vec<_> = (0..4)
        .map(|k| {
            let port = node.ports.mx;
            tokio::spawn(async move {
                let mut c = RawTcp::connect(port).await;
                c.expect("220").await;
                c.cmd("EHLO client.test", "250").await;
                for i in 0..5 {
                    let subject = format!("Subject: {k}-{i}");
                    let reply = send_message(
                        &mut c,
                        "a@remote.test",
                        "bob@example.test",
                        subject.as_bytes(),
                    )
                    .await;
                    assert!(reply.starts_with("250"), "{reply}");
                }
            })
        })
        .collect();
    for c in clients {
        c.await.expect("client task");
    }
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(EVENTS_STREAM).await.expect("events stream");
    let mut info = stream.info().await.expect("info").clone();
    for _ in 0..100 {
        if info.state.messages >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        info = stream.info().await.expect("info").clone();
    }
    assert_eq!(info.state.messages, 20, "one received event per message");
    assert!(
        streams::is_asynchronous(&info.config),
        "{:?}",
        info.config.persist_mode
    );
    assert!(!info.config.allow_atomic_publish);
    let metrics = metrics(&node);
    let writes = counter(&metrics, "kubemail_smtp_events_commit_events_count ");
    let events = counter(&metrics, "kubemail_smtp_events_commit_events_sum ");
    assert_eq!(events, 20.0, "every event confirmed");
    assert_eq!(writes, events, "no batches on an asynchronous stream");
    let log = node.log();
    assert!(
        !log.contains("cannot turn on atomic batches") && !log.contains("no events stream"),
        "{log}"
    );
}
