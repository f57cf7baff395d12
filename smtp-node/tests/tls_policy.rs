//! Outbound transport security against real peers on loopback: Knot DNS for the recipient
//! domains, an HTTPS MTA-STS policy server with a test CA (trusted through `extraCaFile`),
//! small SMTP MX peers with STARTTLS, and a man in the middle that strips STARTTLS.
//!
//! * MTA-STS `enforce`: an MX host the policy does not name, an MX with a certificate for
//!   another name, and an MX behind a STARTTLS-stripping attacker each leave the message
//!   deferred with the reason, never delivered; `testing` delivers and records the failure.
//! * One policy fetch serves every node: a second node process uses the shared cache.
//! * REQUIRETLS: offered and taken only over TLS; a message with it reaches a server that
//!   offers REQUIRETLS over verified TLS (and is passed on with REQUIRETLS), and bounces with
//!   5.7.30 / 5.7.10 instead of going to a server without REQUIRETLS or without TLS.

mod common;
mod delivery_support;
mod tls_support;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::{Nats, Node, PASSWORD, RawTcp, USER, smtplib, unique};
use delivery_support::{Knot, Setup, Sink, configure, counter, example_zone, metrics, submit};
use serde_json::json;
use tls_support::{MxOptions, MxPeer, PolicyServer, TestCa, starttls_stripper};

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

fn policy(mode: &str, mx: &str) -> String {
    format!("version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n")
}

/// A recipient domain zone: MX `mx.<domain>` at 127.0.0.`last`, and an MTA-STS TXT record
/// and policy host when `sts`.
fn zone(domain: &'static str, last: u8, sts: bool) -> (&'static str, String) {
    let mut records = format!("@ IN MX 10 mx\nmx IN A 127.0.0.{last}\n");
    if sts {
        records.push_str("_mta-sts IN TXT \"v=STSv1; id=20261127\"\nmta-sts IN A 127.0.0.1\n");
    }
    (domain, records)
}

fn node_config(
    c: &mut serde_json::Value,
    knot: &Knot,
    mx_port: u16,
    inbound: Option<u16>,
    ca: &TestCa,
    https_port: u16,
) {
    configure(
        c,
        &Setup {
            dns: knot,
            mx_port,
            inbound_port: inbound,
            allow_loopback: true,
            dkim: false,
            inbound_auth: None,
        },
    );
    c["delivery"]["tls"] = json!({
        "extraCaFile": ca.ca_file,
        "mtaSts": { "httpsPort": https_port, "fetchTimeout": "10s" },
    });
}

/// The `Kubemail-Last-Error` of the retry entry for `recipient`, once there is one.
async fn last_error(node: &Node, recipient: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        for entry in node.messages().await {
            if entry
                .header("Kubemail-Rcpt-To")
                .is_some_and(|r| r.contains(recipient))
                && let Some(error) = entry.header("Kubemail-Last-Error")
            {
                return error.to_owned();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no deferred entry for {recipient} within {limit:?}:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mta_sts_enforce_refuses_bad_mx_hosts_testing_delivers_and_one_fetch_serves_every_node() {
    let ca = TestCa::new();
    let port = common::free_port();
    let good = |name: &str| MxOptions {
        tls: Some(ca.server_config(&[name])),
        requiretls: false,
    };
    let ok = MxPeer::start(ip(11), port, good("mx.ok.test")).await;
    let unlisted = MxPeer::start(ip(12), port, good("mx.unlisted.test")).await;
    let badcert = MxPeer::start(ip(13), port, good("wrong.test")).await;
    let behind = MxPeer::start(ip(15), port, good("mx.strip.test")).await;
    starttls_stripper(SocketAddr::new(ip(14), port), behind.addr).await;
    let testing = MxPeer::start(ip(16), port, good("wrong.test")).await;
    let server = PolicyServer::start(
        &ca,
        HashMap::from([
            (
                "mta-sts.ok.test".to_owned(),
                policy("enforce", "mx.ok.test"),
            ),
            (
                "mta-sts.unlisted.test".to_owned(),
                policy("enforce", "mx.elsewhere.test"),
            ),
            (
                "mta-sts.badcert.test".to_owned(),
                policy("enforce", "mx.badcert.test"),
            ),
            (
                "mta-sts.strip.test".to_owned(),
                policy("enforce", "*.strip.test"),
            ),
            (
                "mta-sts.testing.test".to_owned(),
                policy("testing", "mx.testing.test"),
            ),
        ]),
    )
    .await;
    let knot = Knot::start(&[
        example_zone(),
        zone("ok.test", 11, true),
        zone("unlisted.test", 12, true),
        zone("badcert.test", 13, true),
        zone("strip.test", 14, true),
        zone("testing.test", 16, true),
    ]);
    let nats = Nats::start();
    let node = Node::start_with(&nats.url(), true, |c| {
        node_config(c, &knot, port, None, &ca, server.port)
    });

    let subject = unique("sts");
    for domain in ["ok", "unlisted", "badcert", "strip", "testing"] {
        submit(
            node.ports.submission,
            &[&format!("carol@{domain}.test")],
            &format!("{subject} {domain}"),
            "Hello over verified TLS.",
        );
    }
    wait_for(
        "enforce (valid) and testing (invalid) delivered",
        Duration::from_secs(30),
        || ok.received().len() == 1 && testing.received().len() == 1,
    )
    .await;
    assert!(ok.received()[0].tls && ok.received()[0].data.contains(&subject));

    let unlisted_error = last_error(&node, "carol@unlisted.test", Duration::from_secs(30)).await;
    assert!(
        unlisted_error
            .contains("mx.unlisted.test is not named by the MTA-STS policy of unlisted.test"),
        "{unlisted_error}"
    );
    let badcert_error = last_error(&node, "carol@badcert.test", Duration::from_secs(30)).await;
    assert!(
        badcert_error.contains("TLS policy not met")
            && badcert_error.contains("certificate of mx.badcert.test"),
        "{badcert_error}"
    );
    let strip_error = last_error(&node, "carol@strip.test", Duration::from_secs(30)).await;
    assert!(
        strip_error.contains("does not offer STARTTLS"),
        "{strip_error}"
    );
    assert!(
        unlisted.received().is_empty(),
        "an MX outside the policy got mail"
    );
    assert!(
        badcert.received().is_empty(),
        "an MX with a wrong certificate got mail"
    );
    assert!(
        behind.received().is_empty(),
        "mail went through the STARTTLS stripper"
    );

    let m = metrics(&node);
    let mismatch = counter(
        &m,
        "kubemail_smtp_tls_policy_results_total{policy=\"sts\",result=\"certificate-host-mismatch\"}",
    );
    assert!(
        mismatch >= 2.0,
        "enforce and testing mismatches are both recorded:\n{m}"
    );
    assert!(
        counter(
            &m,
            "kubemail_smtp_tls_policy_results_total{policy=\"sts\",result=\"starttls-not-supported\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        counter(
            &m,
            "kubemail_smtp_tls_policy_results_total{policy=\"sts\",result=\"success\"}"
        ) >= 1.0,
        "{m}"
    );

    // A second node uses the policy the first one fetched.
    assert_eq!(server.fetches("mta-sts.ok.test"), 1);
    let second = Node::start_with(&nats.url(), true, |c| {
        node_config(c, &knot, port, None, &ca, server.port)
    });
    submit(
        second.ports.submission,
        &["dave@ok.test"],
        &format!("{subject} second"),
        "Hello again.",
    );
    wait_for(
        "the second node's message delivered",
        Duration::from_secs(30),
        || ok.received().len() == 2,
    )
    .await;
    assert_eq!(
        server.fetches("mta-sts.ok.test"),
        1,
        "the second node fetched the policy again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn requiretls_is_never_delivered_without_verified_tls_and_a_server_that_offers_it() {
    let ca = TestCa::new();
    let port = common::free_port();
    let with = MxPeer::start(
        ip(21),
        port,
        MxOptions {
            tls: Some(ca.server_config(&["mx.rt-ok.test"])),
            requiretls: true,
        },
    )
    .await;
    let without = MxPeer::start(
        ip(22),
        port,
        MxOptions {
            tls: Some(ca.server_config(&["mx.rt-noext.test"])),
            requiretls: false,
        },
    )
    .await;
    let plain = MxPeer::start(
        ip(23),
        port,
        MxOptions {
            tls: None,
            requiretls: false,
        },
    )
    .await;
    let server = PolicyServer::start(
        &ca,
        HashMap::from([
            (
                "mta-sts.rt-ok.test".to_owned(),
                policy("enforce", "mx.rt-ok.test"),
            ),
            (
                "mta-sts.rt-noext.test".to_owned(),
                policy("enforce", "mx.rt-noext.test"),
            ),
        ]),
    )
    .await;
    let knot = Knot::start(&[
        example_zone(),
        zone("rt-ok.test", 21, true),
        zone("rt-noext.test", 22, true),
        zone("rt-plain.test", 23, false),
    ]);
    let sink = Sink::start(&[]);
    let nats = Nats::start();
    let node = Node::start_with(&nats.url(), true, |c| {
        node_config(c, &knot, port, Some(sink.port), &ca, server.port)
    });

    // Over plaintext REQUIRETLS is neither offered nor taken.
    let mut raw = RawTcp::connect(node.ports.mx).await;
    raw.expect("220").await;
    let ehlo = raw.cmd("EHLO client.test", "250").await;
    assert!(!ehlo.contains("REQUIRETLS"), "{ehlo}");
    raw.cmd("MAIL FROM:<x@client.test> REQUIRETLS", "530 5.7.10")
        .await;

    let subject = unique("requiretls");
    for domain in ["rt-ok", "rt-noext", "rt-plain"] {
        let message = format!(
            "From: Alice <alice@example.test>\r\nTo: carol@{domain}.test\r\nSubject: {subject} {domain}\r\n\r\nConfidential.\r\n"
        );
        let steps = smtplib(
            node.ports.submission,
            "starttls",
            json!([
                ["login", USER, PASSWORD],
                ["mail", "alice@example.test", ["REQUIRETLS"]],
                ["rcpt", format!("carol@{domain}.test")],
                ["data", message],
                ["quit"]
            ]),
        );
        let mail = steps.iter().find(|s| s.op == "mail").expect("mail step");
        assert_eq!(mail.code, 250, "REQUIRETLS over TLS is taken: {steps:?}");
        assert!(
            steps.iter().any(|s| s.op == "data" && s.code == 250),
            "{steps:?}"
        );
    }
    wait_for(
        "the REQUIRETLS message delivered",
        Duration::from_secs(30),
        || with.received().len() == 1,
    )
    .await;
    let got = &with.received()[0];
    assert!(got.tls, "delivered over TLS");
    assert!(
        got.mail_from.to_ascii_uppercase().contains("REQUIRETLS"),
        "{}",
        got.mail_from
    );
    // Both others bounce to the sender (example.test's inbound target is the sink).
    let deadline = Instant::now() + Duration::from_secs(30);
    while sink.count("5.7.30") == 0 || sink.count("5.7.10") == 0 {
        assert!(
            Instant::now() < deadline,
            "bounces 5.7.30 and 5.7.10 expected: {:?}",
            sink.transactions()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        without.received().is_empty(),
        "a server without REQUIRETLS got the message"
    );
    assert!(
        plain.received().is_empty(),
        "the message went out without TLS"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn our_own_policy_is_served_over_https_to_an_independent_client() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = ca.leaf_files(&["mx.example.test", "mta-sts.example.test"], dir.path());
    let https = common::free_port();
    let policy = "version: STSv1\r\nmode: testing\r\nmx: mx.example.test\r\nmax_age: 604800\r\n";
    let nats = Nats::start();
    let node = Node::start_with(&nats.url(), true, |c| {
        c["tls"] = json!({ "certFile": cert, "keyFile": key });
        c["mtaStsServer"] = json!({ "address": format!("127.0.0.1:{https}") });
        c["domains"][0]["mtaStsPolicy"] = json!(policy);
    });
    let curl = |host: &str| {
        std::process::Command::new(common::require_tool("curl"))
            .args(["--silent", "--show-error", "--include", "--max-time", "10"])
            .arg("--cacert")
            .arg(&ca.ca_file)
            .args(["--resolve", &format!("{host}:{https}:127.0.0.1")])
            .arg(format!("https://{host}:{https}/.well-known/mta-sts.txt"))
            .output()
            .expect("run curl")
    };
    let out = curl("mta-sts.example.test");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{text}"
    );
    assert!(text.ends_with(policy), "{text:?}");
    // The policy parses, with our MX, by the same rules senders apply.
    let body = text.rsplit("\r\n\r\n").next().unwrap_or_default();
    let parsed =
        kubemail_smtp_node::delivery::policy::mta_sts::Policy::parse(body).expect("policy");
    assert!(parsed.matches("mx.example.test"));
    // Another name gets no certificate: the handshake fails.
    let other = curl("mta-sts.other.test");
    assert!(
        !other.status.success(),
        "{}",
        String::from_utf8_lossy(&other.stdout)
    );
}
