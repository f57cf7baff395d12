//! SMTP conversations driven by independent clients (Python smtplib, swaks) and by raw TCP
//! for pipelining: the reply code a client gets for each command and limit.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn reply_codes_for_commands_and_sequence() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    let steps = smtplib(
        node.ports.mx,
        "plain",
        json!([
            ["cmd", "MAIL FROM:<a@remote.test>"],
            ["cmd", "EHLO"],
            ["helo", "client.test"],
            ["ehlo", "client.test"],
            ["cmd", "RCPT TO:<bob@example.test>"],
            ["cmd", "DATA"],
            ["cmd", "FOO bar"],
            ["cmd", "EXPN staff"],
            ["cmd", "MAIL FROM:<a@remote.test> FOO=BAR"],
            ["cmd", "MAIL FROM:a@remote.test"],
            ["vrfy", "bob"],
            ["help"],
            ["noop"],
            ["cmd", "NOOP with text"],
            ["mail", "a@remote.test"],
            ["cmd", "MAIL FROM:<a@remote.test>"],
            ["rcpt", "bob@example.test"],
            ["rset"],
            ["cmd", "DATA"],
            ["cmd", "STARTTLS now"],
            ["quit"],
        ]),
    );
    assert_codes(
        &steps,
        &[
            "503 Send HELO",
            "501",
            "250 mx.example.test",
            "250 mx.example.test greets client.test",
            "503 5.5.1",
            "503 5.5.1",
            "500 5.5.1",
            "502 5.5.1",
            "555 5.5.4",
            "501 5.5.4",
            "252 2.5.0",
            "214 2.0.0",
            "250 2.0.0",
            "250 2.0.0",
            "250 2.1.0",
            "503 5.5.1",
            "250 2.1.5",
            "250 2.0.0",
            "503 5.5.1",
            "501 5.5.4",
            "221 2.0.0",
        ],
    );
    let ehlo = &steps[3].msg;
    for ext in [
        "PIPELINING",
        "SIZE 26214400",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "STARTTLS",
    ] {
        assert!(ehlo.contains(ext), "{ext} missing in {ehlo}");
    }
    // After EHLO every reply carries an enhanced status code (RFC 2034).
    for s in &steps[4..] {
        let enhanced = s.msg.split(' ').next().unwrap_or("");
        assert!(
            enhanced.split('.').count() == 3
                && enhanced.chars().all(|c| c.is_ascii_digit() || c == '.'),
            "no enhanced code in {} {}",
            s.code,
            s.msg
        );
    }
}

#[tokio::test]
async fn limits_lines_recipients_and_errors() {
    let nats = Nats::shared();
    let node = Node::start_with(&nats.url(), true, |c| {
        c["domains"][0]["limits"] = json!({ "maxRecipients": 3 });
        c["domains"][0]["catchAll"] = json!(true);
        c["maxErrorsPerSession"] = json!(3);
    });
    let line_1000 = "a".repeat(998);
    let line_1001 = "a".repeat(999);
    let steps = smtplib(
        node.ports.mx,
        "plain",
        json!([
            ["ehlo", "client.test"],
            ["cmd", format!("NOOP {}", "n".repeat(600))],
            ["mail", "a@remote.test", ["SMTPUTF8"]],
            ["rcpt", "r1@example.test"],
            ["rcpt", "r2@example.test"],
            ["rcpt", "r3@example.test"],
            ["rcpt", "r4@example.test"],
            ["cmd", "RCPT TO:<用户@example.test>"],
            ["data", format!("Subject: limits\r\n\r\n{line_1000}\r\n")],
            ["mail", "a@remote.test"],
            ["rcpt", "r1@example.test"],
            ["data", format!("Subject: limits\r\n\r\n{line_1001}\r\n")],
            ["mail", "a@remote.test"],
            ["cmd", "RCPT TO:<用户@example.test>"],
            ["cmd", "FOO"],
            ["noop"],
        ]),
    );
    assert_codes(
        &steps,
        &[
            "250",
            "500 5.5.2",
            "250 2.1.0",
            "250 2.1.5",
            "250 2.1.5",
            "250 2.1.5",
            "452 4.5.3",
            "452 4.5.3",
            "250 2.0.0",
            "250 2.1.0",
            "250 2.1.5",
            "554 5.6.0",
            "250 2.1.0",
            "553 5.6.7",
            "500 5.5.1",
            "421 4.7.0",
        ],
    );
    let entries = node.messages().await;
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].header("Kubemail-Rcpt-To"),
        Some(r#"["r1@example.test","r2@example.test","r3@example.test"]"#)
    );
    assert!(
        entries[0]
            .body_str()
            .contains(&format!("\r\n{line_1000}\r\n"))
    );
}

#[tokio::test]
async fn smtputf8_addresses() {
    let nats = Nats::shared();
    let node = Node::start_with(&nats.url(), true, |c| {
        c["domains"][0]["catchAll"] = json!(true);
    });
    // smtplib sends UTF-8 commands only once SMTPUTF8 is in use.
    let steps = smtplib(
        node.ports.mx,
        "plain",
        json!([
            ["ehlo", "client.test"],
            ["mail", "用户@例子.广告", ["SMTPUTF8"]],
            ["rcpt", "δοκιμή@example.test"],
            ["data", "Subject: utf8\r\n\r\nhi\r\n"],
            ["quit"],
        ]),
    );
    assert_codes(
        &steps,
        &["250", "250 2.1.0", "250 2.1.5", "250 2.0.0", "221"],
    );
    let e = &node.messages().await[0];
    assert_eq!(e.header("Kubemail-Smtputf8"), Some("true"));
    assert_eq!(e.header("Kubemail-Mail-From"), Some("<用户@例子.广告>"));
    assert!(e.body_str().contains("with UTF8SMTP id"));
    // Without the parameter a UTF-8 address is refused.
    let mut c = RawTcp::connect(node.ports.mx).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd("MAIL FROM:<用户@例子.广告>", "553 5.6.7").await;
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    c.cmd("RCPT TO:<δοκιμή@example.test>", "553 5.6.7").await;
}

#[tokio::test]
async fn pipelining_with_swaks_and_in_one_write() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    let out = swaks(&[
        "--server",
        &node.ports.mx.to_string(),
        "--pipeline",
        "--from",
        "a@remote.test",
        "--to",
        "bob@example.test,nobody@example.test,postmaster@example.test",
    ]);
    let replies = swaks_replies(&out);
    for want in [
        "250 2.1.0",
        "250 2.1.5",
        "550 5.1.1",
        "354",
        "250 2.0.0 Ok: queued",
        "221",
    ] {
        assert!(
            replies.iter().any(|r| r.starts_with(want)),
            "{want} missing:\n{out}"
        );
    }

    // Two whole transactions and QUIT in a single write: replies in order.
    let mut c = RawTcp::connect(node.ports.mx).await;
    c.expect("220").await;
    c.send(b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\none\r\n.\r\nMAIL FROM:<b@remote.test>\r\nRCPT TO:<bob@example.test>\r\nBDAT 5 LAST\r\ntwo\r\nQUIT\r\n").await;
    for want in [
        "250-",
        "250 2.1.0",
        "250 2.1.5",
        "354",
        "250 2.0.0",
        "250 2.1.0",
        "250 2.1.5",
        "250 2.0.0",
        "221",
    ] {
        c.expect(want).await;
    }
    let entries = node.messages().await;
    assert_eq!(entries.len(), 3);
    assert!(entries[1].body_str().ends_with("\r\none\r\n"));
    assert!(entries[2].body_str().ends_with("\r\ntwo\r\n"));
}

#[tokio::test]
async fn chunking_with_bdat() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    let mut c = RawTcp::connect(node.ports.mx).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250-").await;
    // BDAT before MAIL: refused, and its octets are not run as a command.
    c.send(b"BDAT 6\r\nQUIT\r\n").await;
    c.expect("503 5.5.1").await;
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    c.cmd("RCPT TO:<bob@example.test>", "250").await;
    c.send(b"BDAT 12\r\nSubject: c\r\n").await;
    c.expect("250 2.0.0").await;
    // A "\r\n.\r\n" inside a chunk is content.
    c.send(b"BDAT 8 LAST\r\n\r\n.\r\nend").await;
    c.expect("250 2.0.0 Ok: queued").await;
    c.cmd("QUIT", "221").await;
    let e = &node.messages().await[0];
    assert!(
        e.body_str().ends_with("\r\nSubject: c\r\n\r\n.\r\nend"),
        "{:?}",
        e.body_str()
    );
}
