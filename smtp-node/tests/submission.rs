//! Submission (587 with STARTTLS, 465): AUTH failures and their limits, the sender-domain
//! rule, the per-user message rate, and that no password or AUTH payload reaches the logs.

mod common;

use base64::Engine as _;
use common::*;
use serde_json::json;

fn plain_blob(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

#[tokio::test]
async fn auth_failures_sender_rule_and_message_rate() {
    let nats = Nats::shared();
    let node = Node::start_with(&nats.url(), true, |c| {
        c["domains"][0]["limits"] = json!({ "messagesPerMinutePerUser": 2 });
        c["auth"] = json!({ "maxFailuresPerSession": 3, "failuresPerIpPerMinute": 100 });
    });
    // Wrong password and unknown user look the same; the third failure ends the session.
    let steps = smtplib(
        node.ports.submission,
        "starttls",
        json!([
            ["ehlo", "client.test"],
            ["auth", "PLAIN", USER, "not-the-password"],
            ["auth", "LOGIN", "nobody@example.test", PASSWORD],
            [
                "cmd",
                format!("AUTH PLAIN {}", plain_blob(USER, "also-wrong"))
            ],
            ["noop"],
        ]),
    );
    assert_eq!(steps[1].code, 535, "{steps:?}");
    assert!(steps[1].msg.starts_with("5.7.8"), "{steps:?}");
    assert_eq!((steps[2].code, &steps[2].msg), (535, &steps[1].msg));
    assert_eq!(steps[3].code, 535);
    assert!(
        steps[4].code == 421 || steps[4].code == -1,
        "disconnected: {steps:?}"
    );

    // Own domain only; at most two messages a minute.
    let message = "Subject: s\r\n\r\nhi\r\n";
    let steps = smtplib(
        node.ports.submission,
        "starttls",
        json!([
            ["ehlo", "client.test"],
            ["login", USER, PASSWORD],
            ["mail", "ceo@other.test"],
            ["mail", "alice@example.test"],
            ["rcpt", "x@remote.test"],
            ["data", message],
            ["mail", "bob@example.test"],
            ["rcpt", "y@remote.test"],
            ["data", message],
            ["mail", "alice@example.test"],
            ["quit"],
        ]),
    );
    assert_codes(
        &steps,
        &[
            "250",
            "235 2.7.0",
            "553 5.7.1",
            "250 2.1.0",
            "250 2.1.5",
            "250 2.0.0",
            "250 2.1.0",
            "250 2.1.5",
            "250 2.0.0",
            "451 4.7.1",
            "221",
        ],
    );
    assert_eq!(node.messages().await.len(), 2);

    let log = node.log();
    for secret in [
        PASSWORD,
        "not-the-password",
        "also-wrong",
        &plain_blob(USER, "also-wrong"),
        &plain_blob(USER, PASSWORD),
    ] {
        assert!(!log.contains(secret), "log contains {secret:?}");
    }
}

#[tokio::test]
async fn failed_logins_are_limited_per_ip_across_connections() {
    let nats = Nats::shared();
    let node = Node::start_with(&nats.url(), true, |c| {
        c["auth"] = json!({ "maxFailuresPerSession": 10, "failuresPerIpPerMinute": 2 });
    });
    let steps = smtplib(
        node.ports.implicit_tls,
        "ssl",
        json!([
            ["ehlo", "client.test"],
            ["auth", "PLAIN", USER, "bad1"],
            ["auth", "PLAIN", USER, "bad2"],
            ["auth", "PLAIN", USER, "bad3"],
            ["quit"],
        ]),
    );
    assert_codes(
        &steps,
        &["250", "535 5.7.8", "535 5.7.8", "535 5.7.8", "221"],
    );
    // A new connection from the same IP: even the right password is not checked now.
    let steps = smtplib(
        node.ports.implicit_tls,
        "ssl",
        json!([
            ["ehlo", "client.test"],
            ["auth", "PLAIN", USER, PASSWORD],
            ["quit"]
        ]),
    );
    assert_codes(&steps, &["250", "454 4.7.0", "221"]);
}

#[tokio::test]
async fn authenticated_submission_over_swaks_starttls() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    let out = swaks(&[
        "--server",
        &node.ports.submission.to_string(),
        "--tls",
        "--auth",
        "LOGIN",
        "--auth-user",
        USER,
        "--auth-password",
        "wrong",
        "--from",
        USER,
        "--to",
        "x@remote.test",
    ]);
    assert!(
        swaks_replies(&out)
            .iter()
            .any(|r| r.starts_with("535 5.7.8")),
        "{out}"
    );
    assert!(node.messages().await.is_empty());
}
