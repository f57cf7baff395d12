//! Outbound delivery against real peers: a submitted message travels through JetStream and
//! the delivery worker to the recipient domain's MX (mailpit, found through Knot DNS), signed
//! with both DKIM keys, which dkimpy verifies on the bytes mailpit stored; and an MX record
//! pointing into loopback is refused unless the config allows it.

mod common;
mod delivery_support;

use std::time::Duration;

use common::{Nats, Node, unique};
use delivery_support::{
    DELIVERED, Knot, Mailpit, Setup, Sink, configure, counter, dkim_verify, example_zone, log,
    metrics, parse_dsn, remote_zone, submit, wait_until,
};

/// A delivering node with both DKIM keys of example.test, whose remote MX is `mailpit`.
fn signing_node(
    nats: &Nats,
    knot: &Knot,
    mailpit: &Mailpit,
    more: impl FnOnce(&mut serde_json::Value),
) -> Node {
    Node::start_with(&nats.url(), true, |c| {
        configure(
            c,
            &Setup {
                dns: knot,
                mx_port: mailpit.smtp_port,
                inbound_port: Some(mailpit.smtp_port),
                allow_loopback: true,
                dkim: true,
                inbound_auth: None,
            },
        );
        more(c);
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn submitted_mail_reaches_the_remote_mx_with_two_valid_dkim_signatures() {
    let nats = Nats::start();
    let mailpit = Mailpit::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let node = signing_node(&nats, &knot, &mailpit, |c| {
        // Long enough that the pooled connection outlives the checks between the two
        // messages on a loaded machine (the shared test setting is 2 s).
        c["delivery"]["connections"]["idleTimeout"] = serde_json::json!("60s");
    });
    let subject = unique("dkim");
    // A line that starts with a dot must survive dot-stuffing on the way out.
    submit(
        node.ports.submission,
        &["carol@remote.test"],
        &subject,
        "Hello Carol.\r\n.a line starting with a dot\r\nBye.",
    );
    let (summary, raw) = mailpit
        .wait_for_subject(&subject, Duration::from_secs(30))
        .await;
    assert_eq!(
        summary["To"][0]["Address"], "carol@remote.test",
        "{summary}"
    );
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.contains("\r\n.a line starting with a dot\r\n"),
        "{text}"
    );

    let results = dkim_verify(&raw, &knot);
    eprintln!("dkimpy: {results:#?}");
    assert_eq!(
        results.len(),
        2,
        "two DKIM signatures expected: {results:?}\n{text}"
    );
    let mut algorithms: Vec<&str> = results.iter().filter_map(|r| r["a"].as_str()).collect();
    algorithms.sort();
    assert_eq!(algorithms, ["ed25519-sha256", "rsa-sha256"]);
    for r in &results {
        assert_eq!(r["ok"], true, "dkimpy rejected a signature: {r}");
        assert_eq!(r["d"], "example.test");
        let h = r["h"].as_str().unwrap_or("").to_ascii_lowercase();
        assert_eq!(
            h.split(':').filter(|x| *x == "from").count(),
            2,
            "From over-signed: {h}"
        );
    }

    let m = wait_until(Duration::from_secs(10), "the delivered counter", || {
        let m = metrics(&node);
        (counter(&m, DELIVERED) >= 1.0).then_some(m)
    });
    assert!(
        m.contains("kubemail_smtp_delivery_attempt_seconds_bucket"),
        "{m}"
    );
    // A second message to the same domain reuses the pooled connection.
    let second = unique("reuse");
    submit(
        node.ports.submission,
        &["carol@remote.test"],
        &second,
        "Again.",
    );
    mailpit
        .wait_for_subject(&second, Duration::from_secs(30))
        .await;
    // The node logs the outcome after the remote's 250, which mailpit may show first.
    wait_until(
        Duration::from_secs(10),
        "the reused delivery in the log",
        || log(&node).contains("reused=true").then_some(()),
    );
    // The entry is gone from the queue once delivered.
    wait_until(Duration::from_secs(10), "an empty queue", || {
        let entries = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(node.messages())
        });
        entries.is_empty().then_some(())
    });
}

/// A submitted message larger than an entry carries inline is stored while it arrives: its
/// DKIM signatures are made over the header section with the body hash computed on the way,
/// and dkimpy verifies both on the delivered bytes.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_submitted_message_stored_while_it_arrives_is_signed_over_its_whole_body() {
    let nats = Nats::start();
    let mailpit = Mailpit::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let node = signing_node(&nats, &knot, &mailpit, |_| {});
    let subject = unique("large-dkim");
    // About 1.5 MiB; whitespace that relaxed canonicalization folds, empty lines at the end.
    let mut body = String::with_capacity(1_600_000);
    for i in 0..15_000 {
        body.push_str(&format!(
            "{i:08}  line\t with  spaces {}  \r\n",
            "z".repeat(60)
        ));
    }
    body.push_str("\r\n\r\n");
    submit(
        node.ports.submission,
        &["carol@remote.test"],
        &subject,
        &body,
    );
    assert_eq!(
        counter(
            &metrics(&node),
            "kubemail_smtp_message_bodies_streamed_total"
        ),
        1.0,
        "the body went to the store while it arrived"
    );
    let (_, raw) = mailpit
        .wait_for_subject(&subject, Duration::from_secs(60))
        .await;
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.contains("00014999  line\t with  spaces"),
        "the whole body arrived"
    );
    let results = dkim_verify(&raw, &knot);
    assert_eq!(results.len(), 2, "two signatures: {results:?}");
    for r in &results {
        assert_eq!(r["ok"], true, "dkimpy rejected a signature: {r}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_mx_pointing_to_loopback_is_refused_unless_allowed() {
    let nats = Nats::start();
    let mailpit = Mailpit::start();
    // The "remote" MX is a listening smtp-sink on 127.0.0.1: reachable, but not allowed.
    let sink = Sink::start(&[]);
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let node = Node::start_with(&nats.url(), true, |c| {
        configure(
            c,
            &Setup {
                dns: &knot,
                mx_port: sink.port,
                inbound_port: Some(mailpit.smtp_port),
                allow_loopback: false,
                dkim: false,
                inbound_auth: None,
            },
        )
    });
    let subject = unique("ssrf");
    submit(
        node.ports.submission,
        &["carol@remote.test"],
        &subject,
        "Hi.",
    );
    // The sender is told, through its inbound target (trusted configuration, not the DNS).
    let (_, raw) = mailpit
        .wait_for_subject(
            "Undelivered Mail Returned to Sender",
            Duration::from_secs(30),
        )
        .await;
    let dsn = parse_dsn(&raw);
    eprintln!("DSN: {dsn:#}");
    assert_eq!(dsn["content_type"], "multipart/report");
    let rcpt = &dsn["recipients"][0];
    assert_eq!(rcpt["Final-Recipient"], "rfc822; carol@remote.test");
    assert_eq!(rcpt["Action"], "failed");
    assert_eq!(rcpt["Status"], "5.4.4");
    let diagnostic = rcpt["Diagnostic-Code"].as_str().unwrap_or("");
    assert!(
        diagnostic.contains("127.0.0.1") && diagnostic.contains("loopback"),
        "{diagnostic}"
    );
    assert_eq!(dsn["returned_subject"], subject.as_str());
    assert_eq!(
        sink.transactions().len(),
        0,
        "no mail may reach the refused address"
    );
    assert!(
        log(&node).contains("MX address refused by policy"),
        "{}",
        log(&node)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_body_comes_from_the_object_store_and_is_deleted_after_delivery() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let sink = Sink::start(&[]);
    let node = Node::start_with(&nats.url(), true, |c| {
        configure(
            c,
            &Setup {
                dns: &knot,
                mx_port: sink.port,
                inbound_port: None,
                allow_loopback: true,
                dkim: true,
                inbound_auth: None,
            },
        );
        // Everything above 1 KiB goes to the object store.
        c["nats"]["inlineBodyLimit"] = serde_json::json!("1Ki");
    });
    let subject = unique("large");
    let line = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    let body = line.repeat(700); // about 50 KB
    submit(
        node.ports.submission,
        &["carol@remote.test"],
        &subject,
        &body,
    );
    // Counted after the remote's 250, which smtp-sink sends once the dump file is complete.
    wait_until(
        Duration::from_secs(30),
        "delivery of the large message",
        || (counter(&metrics(&node), DELIVERED) >= 1.0).then_some(()),
    );
    assert_eq!(sink.count(&subject), 1);
    let dump = sink
        .transactions()
        .into_iter()
        .find(|t| t.contains(&subject))
        .expect("dump");
    assert_eq!(
        dump.matches("0123456789abcdefghijklmnopqrstuvwxyz0123456789")
            .count(),
        700
    );

    // The body object is gone once the last recipient is done.
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let store = js
        .get_object_store(node.body_bucket())
        .await
        .expect("body bucket");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut list = store.list().await.expect("list objects");
        let mut live = 0;
        while let Some(info) = futures::StreamExt::next(&mut list).await {
            if !info.expect("object info").deleted {
                live += 1;
            }
        }
        if live == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{live} body object(s) left behind"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn starttls_to_an_mx_is_used_when_offered_without_verifying_its_name() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // A certificate for some other name: MX names are unauthenticated, so opportunistic TLS
    // encrypts without verifying (RFC 7435).
    let cert = rcgen::generate_simple_self_signed(vec!["elsewhere.test".to_owned()]).expect("cert");
    let cert_file = dir.path().join("cert.pem");
    let key_file = dir.path().join("key.pem");
    std::fs::write(&cert_file, cert.cert.pem()).expect("cert file");
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).expect("key file");
    let mailpit = Mailpit::start_with(&[
        "--smtp-tls-cert",
        &cert_file.display().to_string(),
        "--smtp-tls-key",
        &key_file.display().to_string(),
    ]);
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let node = Node::start_with(&nats.url(), true, |c| {
        configure(
            c,
            &Setup {
                dns: &knot,
                mx_port: mailpit.smtp_port,
                inbound_port: None,
                allow_loopback: true,
                dkim: false,
                inbound_auth: None,
            },
        )
    });
    let subject = unique("starttls");
    submit(
        node.ports.submission,
        &["carol@remote.test"],
        &subject,
        "Encrypted.",
    );
    mailpit
        .wait_for_subject(&subject, Duration::from_secs(30))
        .await;
    let text = log(&node);
    assert!(
        text.lines()
            .any(|l| l.contains("host=mx.remote.test") && l.contains("connected tls=true")),
        "the MX session used STARTTLS:\n{text}"
    );
}
