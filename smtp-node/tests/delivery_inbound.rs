//! Inbound mail: a message for a local recipient, received on the MX port, is checked
//! (SPF, DKIM, DMARC against Knot DNS), gets our `Authentication-Results` header and is
//! forwarded to the domain's inbound target (mailpit); forged results claiming to be ours
//! are removed; with DMARC enforcement a message failing a `p=reject` policy is refused at
//! the end of data.

mod common;
mod delivery_support;

use std::time::Duration;

use common::{Nats, Node, smtplib, unique};
use delivery_support::{Knot, Mailpit, Setup, configure, example_zone, remote_zone};
use serde_json::json;

/// A zone whose owner says: no host may send for me, reject what fails.
fn forged_zone() -> (&'static str, String) {
    (
        "forged.test",
        "@ IN TXT \"v=spf1 -all\"\n_dmarc IN TXT \"v=DMARC1; p=reject\"\n".to_owned(),
    )
}

fn start(nats: &Nats, knot: &Knot, mailpit: &Mailpit, mode: &str) -> Node {
    Node::start_with(&nats.url(), true, |c| {
        configure(
            c,
            &Setup {
                dns: knot,
                mx_port: mailpit.smtp_port,
                inbound_port: Some(mailpit.smtp_port),
                allow_loopback: true,
                dkim: false,
                inbound_auth: Some(mode),
            },
        )
    })
}

/// Sends `message` from `from` to bob@example.test over the MX port; returns the DATA code.
fn send_mx(node: &Node, from: &str, message: &str) -> (i64, String) {
    let steps = smtplib(
        node.ports.mx,
        "plain",
        json!([
            ["ehlo", "mail.remote.test"],
            ["mail", from],
            ["rcpt", "bob@example.test"],
            ["data", message],
            ["quit"]
        ]),
    );
    let data = steps.iter().find(|s| s.op == "data").expect("data step");
    (data.code, data.msg.clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn mail_for_a_local_recipient_is_forwarded_with_authentication_results() {
    let nats = Nats::start();
    let mailpit = Mailpit::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let node = start(&nats, &knot, &mailpit, "enforce");
    let subject = unique("inbound");
    let message = format!(
        "Authentication-Results: mx.example.test; dkim=pass; spf=pass; dmarc=pass\r\nAuthentication-Results: elsewhere.test; spf=fail\r\nFrom: Carol <carol@remote.test>\r\nTo: bob@example.test\r\nSubject: {subject}\r\nMessage-ID: <{subject}@remote.test>\r\nDate: Sat, 28 Nov 2026 00:00:00 +0000\r\n\r\nHello Bob.\r\n"
    );
    let (code, text) = send_mx(&node, "carol@remote.test", &message);
    assert_eq!(code, 250, "{text}");
    let (summary, raw) = mailpit
        .wait_for_subject(&subject, Duration::from_secs(30))
        .await;
    assert_eq!(summary["To"][0]["Address"], "bob@example.test", "{summary}");
    let text = String::from_utf8_lossy(&raw);
    eprintln!("{text}");
    let ours: Vec<&str> = text
        .split("\r\n")
        .filter(|l| l.starts_with("Authentication-Results: mx.example.test"))
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "exactly one header of ours (the forged one is gone):\n{text}"
    );
    let header_end = text.find("\r\n\r\n").expect("header section");
    let header = &text[..header_end];
    let ours_start = header
        .find("Authentication-Results: mx.example.test;")
        .expect("our header");
    let ours_text: String = header[ours_start..]
        .split("\r\n")
        .take_while(|l| !l.is_empty())
        .enumerate()
        .take_while(|(i, l)| *i == 0 || l.starts_with('\t') || l.starts_with(' '))
        .map(|(_, l)| l.trim().to_owned())
        .collect::<Vec<_>>()
        .join(" ");
    for needle in [
        "spf=pass",
        "smtp.mailfrom=carol@remote.test",
        "dkim=none",
        "dmarc=pass",
        "header.from=remote.test",
    ] {
        assert!(
            ours_text.contains(needle),
            "missing {needle:?} in {ours_text:?}"
        );
    }
    assert!(
        text.contains("Authentication-Results: elsewhere.test; spf=fail"),
        "others' results stay"
    );
}

/// Our `Authentication-Results` field in `message`, unfolded.
fn our_results(message: &str) -> String {
    let header = &message[..message.find("\r\n\r\n").expect("header section")];
    let start = header
        .find("Authentication-Results: mx.example.test;")
        .expect("our header");
    header[start..]
        .split("\r\n")
        .enumerate()
        .take_while(|(i, l)| *i == 0 || l.starts_with('\t') || l.starts_with(' '))
        .map(|(_, l)| l.trim().to_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// An inbound message larger than an entry carries inline is stored while it arrives; its
/// DKIM signature is checked with the body hash computed on the way: a pass for the message
/// as signed, no pass once a line of its body was changed after signing.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_inbound_message_stored_while_it_arrives_has_its_dkim_body_hash_checked() {
    use kubemail_smtp_node::config::{DkimConfig, DkimKeyConfig};
    let nats = Nats::start();
    let mailpit = Mailpit::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let node = start(&nats, &knot, &mailpit, "record");
    let signer = kubemail_smtp_node::dkim::DkimSigner::load([(
        "example.test",
        &DkimConfig {
            keys: vec![DkimKeyConfig {
                selector: "dev-rsa".into(),
                key_file: delivery_support::examples_dir().join("dev-dkim-rsa.pem"),
            }],
        },
    )])
    .expect("dev key");
    let mut body = String::with_capacity(1_200_000);
    for i in 0..12_000 {
        body.push_str(&format!(
            "{i:08} a line  of\tthe body {}\r\n",
            "q".repeat(70)
        ));
    }
    for (label, tamper) in [("signed", false), ("tampered", true)] {
        let subject = unique(label);
        let message = format!(
            "From: Alice <alice@example.test>\r\nTo: bob@example.test\r\nSubject: {subject}\r\nDate: Sat, 28 Nov 2026 00:00:00 +0000\r\nMessage-ID: <{subject}@example.test>\r\n\r\n{body}"
        );
        let signature = signer
            .sign_for(message.as_bytes(), "example.test")
            .expect("sign")
            .expect("a key");
        let mut signed = format!("{signature}{message}");
        if tamper {
            signed = signed.replacen("00011000 a line", "00011000 A line", 1);
        }
        let (code, text) = send_mx(&node, "alice@example.test", &signed);
        assert_eq!(code, 250, "{text}");
        let (_, raw) = mailpit
            .wait_for_subject(&subject, Duration::from_secs(30))
            .await;
        let text = String::from_utf8_lossy(&raw);
        assert!(
            text.ends_with(&signed[signed.len() - 1000..]),
            "body intact"
        );
        let results = our_results(&text);
        if tamper {
            assert!(!results.contains("dkim=pass"), "{results}");
            assert!(
                results.contains("dkim=neutral") || results.contains("dkim=fail"),
                "{results}"
            );
        } else {
            assert!(results.contains("dkim=pass"), "{results}");
            assert!(results.contains("header.d=example.test"), "{results}");
        }
    }
    assert_eq!(
        delivery_support::counter(
            &delivery_support::metrics(&node),
            "kubemail_smtp_message_bodies_streamed_total"
        ),
        2.0,
        "both bodies went to the store while they arrived"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dmarc_enforcement_refuses_mail_that_fails_a_reject_policy() {
    let nats = Nats::start();
    let mailpit = Mailpit::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1"), forged_zone()]);
    let subject = unique("forged");
    let message = format!(
        "From: Boss <boss@forged.test>\r\nTo: bob@example.test\r\nSubject: {subject}\r\nDate: Sat, 28 Nov 2026 00:00:00 +0000\r\n\r\nPay this invoice.\r\n"
    );

    let enforcing = start(&nats, &knot, &mailpit, "enforce");
    let (code, text) = send_mx(&enforcing, "boss@forged.test", &message);
    assert_eq!(code, 550, "{text}");
    assert!(text.starts_with("5.7.1"), "{text}");
    drop(enforcing);

    // Recording only: accepted, and the header says what happened.
    let recording = start(&nats, &knot, &mailpit, "record");
    let (code, text) = send_mx(&recording, "boss@forged.test", &message);
    assert_eq!(code, 250, "{text}");
    let (_, raw) = mailpit
        .wait_for_subject(&subject, Duration::from_secs(30))
        .await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.contains("dmarc=fail"), "{text}");
    assert!(text.contains("policy.dmarc=reject"), "{text}");
    assert!(text.contains("spf=fail"), "{text}");
    assert_eq!(
        mailpit.count_subject(&subject).await,
        1,
        "the enforced one never arrived"
    );
}
