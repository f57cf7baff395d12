//! Open relay: on the MX port without AUTH every address form of nmap's
//! `smtp-open-relay` list, plus the same tricks aimed at our own (even catch-all) domains,
//! is refused with a 5xx; local recipients that exist are accepted, unknown ones get 550.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn open_relay_address_forms_are_refused_on_mx() {
    let nats = Nats::shared();
    let node = Node::start_with(&nats.url(), true, |c| {
        c["domains"]
            .as_array_mut()
            .unwrap()
            .push(json!({ "name": "catchall.test", "catchAll": true, "inbound": { "host": "127.0.0.1", "port": 9 } }));
        // Every refused RCPT counts as an error; allow the whole list in one session.
        c["maxErrorsPerSession"] = json!(100);
    });
    let d = "remote.test";
    let ip = "[127.0.0.1]";
    let srv = "mx.example.test";
    let senders = [
        "<>",
        "<antispam@remote.test>",
        "<antispam@mx.example.test>",
        "<antispam@[127.0.0.1]>",
    ];
    let mut recipients: Vec<String> = vec![
        format!("<relaytest@{d}>"),
        format!("<relaytest%{d}@{ip}>"),
        format!("<relaytest%{d}@{srv}>"),
        format!("<\"relaytest@{d}\">"),
        format!("<\"relaytest%{d}\">"),
        format!("<relaytest@{d}@{ip}>"),
        format!("<\"relaytest@{d}\"@{ip}>"),
        format!("<relaytest@{d}@{srv}>"),
        format!("<@{ip}:relaytest@{d}>"),
        format!("<@{srv}:relaytest@{d}>"),
        format!("<{d}!relaytest>"),
        format!("<{d}!relaytest@{ip}>"),
        format!("<{d}!relaytest@{srv}>"),
        // The same tricks against domains we serve, including a catch-all one.
        format!("<relaytest%{d}@example.test>"),
        format!("<relaytest%{d}@catchall.test>"),
        format!("<{d}!relaytest@catchall.test>"),
        format!("<\"relaytest@{d}\"@catchall.test>"),
        format!("<@catchall.test:relaytest@{d}>"),
        format!("<relaytest@{d}.>"),
        format!("<relaytest@{d}@catchall.test>"),
        "<user@[10.0.0.5]>".to_owned(),
        "<user@[IPv6:::1]>".to_owned(),
    ];
    recipients.sort();
    for sender in senders {
        let mut steps = vec![
            json!(["ehlo", "client.test"]),
            json!(["cmd", format!("MAIL FROM:{sender}")]),
        ];
        for r in &recipients {
            steps.push(json!(["cmd", format!("RCPT TO:{r}")]));
        }
        steps.push(json!(["cmd", "DATA"]));
        steps.push(json!(["quit"]));
        let result = smtplib(node.ports.mx, "plain", json!(steps));
        assert_eq!(result[1].code, 250, "MAIL FROM:{sender}: {:?}", result[1]);
        for (r, step) in recipients.iter().zip(&result[2..]) {
            assert!(
                (500..600).contains(&step.code),
                "RCPT TO:{r} from {sender} must be refused, got {} {}",
                step.code,
                step.msg
            );
        }
        // No recipient accepted: DATA is out of sequence.
        assert_eq!(result[result.len() - 2].code, 503, "{result:?}");
    }
    assert!(node.messages().await.is_empty());

    // Local recipients do work, on both the listed and the catch-all domain.
    let steps = smtplib(
        node.ports.mx,
        "plain",
        json!([
            ["ehlo", "client.test"],
            ["mail", "someone@remote.test"],
            ["rcpt", "BOB@example.test"],
            ["rcpt", "anything@catchall.test"],
            ["rcpt", "nobody@example.test"],
            ["cmd", "RCPT TO:<relaytest@remote.test>"],
            ["data", "Subject: local\r\n\r\nhi\r\n"],
            ["quit"],
        ]),
    );
    assert_codes(
        &steps,
        &[
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "250 2.1.5",
            "550 5.1.1",
            "554 5.7.1",
            "250 2.0.0",
            "221",
        ],
    );
    let entries = node.messages().await;
    assert_eq!(entries.len(), 2, "one entry per local domain");
    let subjects: Vec<_> = entries.iter().map(|e| e.subject.clone()).collect();
    assert!(subjects.contains(&format!("{}.example.test", node.subject_prefix)));
    assert!(subjects.contains(&format!("{}.catchall.test", node.subject_prefix)));
}

#[tokio::test]
async fn auth_is_not_offered_on_mx_and_relay_stays_closed_after_it() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    let steps = smtplib(
        node.ports.mx,
        "starttls",
        json!([
            ["ehlo", "client.test"],
            ["cmd", "AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB3b25kZXJsYW5k"],
            ["mail", "alice@example.test"],
            ["cmd", "RCPT TO:<relaytest@remote.test>"],
            ["quit"],
        ]),
    );
    assert!(!steps[0].msg.contains("AUTH"), "{}", steps[0].msg);
    assert_codes(
        &steps,
        &["250", "502 5.5.1", "250 2.1.0", "554 5.7.1", "221"],
    );
}
