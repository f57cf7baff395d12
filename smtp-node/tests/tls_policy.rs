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
//! * DANE against zones Knot signed, validated from a trust anchor made of `test.`'s key:
//!   DANE-EE and DANE-TA records that match deliver to MX hosts no CA vouches for; a record
//!   that does not match, or a stripped STARTTLS, defers and nothing reaches the MX, not even
//!   in cleartext; expired signatures, a zone re-signed with another key and a DS that matches
//!   no key are bogus (deferred), never insecure; an unsigned zone is insecure and its TLSA
//!   records are ignored (opportunistic TLS as before).
//! * TLS-RPT: two nodes' sessions of one (injected) day add up to one RFC 8460 report at the
//!   `rua` mailbox, sent by one of two competing nodes the next day; Python's `jsonschema`
//!   validates it against the checked-in schema and its counts are the sessions the MX saw.
//! * Our own MTA-STS policy is fetched over HTTPS by curl and resolved by
//!   postfix-mta-sts-resolver, an independent MTA-STS implementation, as valid and naming our MX.

mod common;
mod delivery_support;
mod tls_support;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Nats, Node, PASSWORD, RawTcp, USER, smtplib, unique};
use delivery_support::{
    Dnssec, Knot, Setup, Sink, configure, counter, dkim_verify, example_zone, metrics, run_python,
    sink_message, submit,
};
use serde_json::{Value, json};
use tls_support::{MxOptions, MxPeer, PolicyServer, TestCa, sha256_hex, starttls_stripper};

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
    tls_config(c, ca, https_port);
}

fn tls_config(c: &mut serde_json::Value, ca: &TestCa, https_port: u16) {
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
        ..MxOptions::default()
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
            ..MxOptions::default()
        },
    )
    .await;
    let without = MxPeer::start(
        ip(22),
        port,
        MxOptions {
            tls: Some(ca.server_config(&["mx.rt-noext.test"])),
            ..MxOptions::default()
        },
    )
    .await;
    let plain = MxPeer::start(ip(23), port, MxOptions::default()).await;
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
    let (example, mut records) = example_zone();
    records.push_str("_mta-sts IN TXT \"v=STSv1; id=20261127T000000\"\nmta-sts IN A 127.0.0.1\n");
    let knot = Knot::start(&[(example, records), ("other.test", String::new())]);
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
    // An independent MTA-STS implementation finds the TXT record, fetches the policy and takes
    // it as valid, naming our MX.
    let verdict = resolve_with_postfix_mta_sts_resolver(&knot, https, &ca, "example.test");
    assert_eq!(verdict["status"], "VALID", "{verdict}\n{}", node.log());
    assert_eq!(verdict["id"], "20261127T000000");
    assert_eq!(verdict["policy"]["version"], "STSv1", "{verdict}");
    assert_eq!(verdict["policy"]["mode"], "testing", "{verdict}");
    assert_eq!(verdict["policy"]["max_age"], 604800, "{verdict}");
    assert_eq!(
        verdict["policy"]["mx"],
        json!(["mx.example.test"]),
        "{verdict}"
    );
    // Without the TXT record it finds no policy: the verdict above came from our server.
    assert_eq!(
        resolve_with_postfix_mta_sts_resolver(&knot, https, &ca, "other.test")["status"],
        "NONE"
    );
    // Another name gets no certificate: the handshake fails.
    let other = curl("mta-sts.other.test");
    assert!(
        !other.status.success(),
        "{}",
        String::from_utf8_lossy(&other.stdout)
    );
}

/// A zone for DANE: MX `mx.<domain>` at 127.0.0.`last` with `tlsa` records for port `port`.
fn dane_zone(
    domain: &'static str,
    last: u8,
    port: u16,
    tlsa: &str,
    dnssec: Dnssec,
) -> (&'static str, String, Dnssec) {
    (
        domain,
        format!("@ IN MX 10 mx\nmx IN A 127.0.0.{last}\n_{port}._tcp.mx IN TLSA {tlsa}\n"),
        dnssec,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn dane_delivers_on_matching_tlsa_defers_on_mismatch_and_bogus_and_ignores_unsigned_zones() {
    // A CA nobody trusts (no extraCaFile): only DANE can vouch for its certificates.
    let private = TestCa::new();
    let port = common::free_port();
    let ee = private.dane_leaf(&["mx.dane-ee.test"], false);
    let ta = private.dane_leaf(&["mx.dane-ta.test"], true);
    let mismatch = private.dane_leaf(&["mx.dane-mismatch.test"], false);
    let stripped = private.dane_leaf(&["mx.dane-strip.test"], false);
    // The MX hosts of the bogus zones present the certificate their TLSA records name, so
    // reading a bogus answer as secure would deliver, and reading it as insecure would too.
    let broken = private.dane_leaf(&["mx.broken.test"], false);
    let unsigned = private.dane_leaf(&["mx.unsigned.test"], false);
    let nobody = private.dane_leaf(&["nobody.test"], false);
    let ee_311 = |spki: &[u8]| format!("3 1 1 {}", sha256_hex(spki));

    let peer = |leaf: &tls_support::DaneLeaf| MxOptions {
        tls: Some(leaf.config.clone()),
        ..MxOptions::default()
    };
    let ee_mx = MxPeer::start(ip(41), port, peer(&ee)).await;
    let ta_mx = MxPeer::start(ip(42), port, peer(&ta)).await;
    let mismatch_mx = MxPeer::start(ip(43), port, peer(&mismatch)).await;
    let behind_stripper = MxPeer::start(ip(45), port, peer(&stripped)).await;
    starttls_stripper(SocketAddr::new(ip(44), port), behind_stripper.addr).await;
    let expired_mx = MxPeer::start(ip(46), port, peer(&broken)).await;
    let resigned_mx = MxPeer::start(ip(47), port, peer(&broken)).await;
    let wrong_ds_mx = MxPeer::start(ip(48), port, peer(&broken)).await;
    let unsigned_mx = MxPeer::start(ip(49), port, peer(&unsigned)).await;

    let (example, example_records) = example_zone();
    let knot = Knot::start_signed(&[
        (example, example_records, Dnssec::Unsigned),
        dane_zone("dane-ee.test", 41, port, &ee_311(&ee.spki), Dnssec::Signed),
        dane_zone(
            "dane-ta.test",
            42,
            port,
            &format!("2 0 1 {}", sha256_hex(private.cert_der().as_ref())),
            Dnssec::Signed,
        ),
        dane_zone(
            "dane-mismatch.test",
            43,
            port,
            &ee_311(&nobody.spki),
            Dnssec::Signed,
        ),
        dane_zone(
            "dane-strip.test",
            44,
            port,
            &ee_311(&stripped.spki),
            Dnssec::Signed,
        ),
        dane_zone(
            "expired.test",
            46,
            port,
            &ee_311(&broken.spki),
            Dnssec::Expired,
        ),
        dane_zone(
            "resigned.test",
            47,
            port,
            &ee_311(&broken.spki),
            Dnssec::Resigned,
        ),
        dane_zone(
            "wrongds.test",
            48,
            port,
            &ee_311(&broken.spki),
            Dnssec::WrongDs,
        ),
        // TLSA records that match nothing: in an unsigned zone they must not count.
        dane_zone(
            "unsigned.test",
            49,
            port,
            &ee_311(&nobody.spki),
            Dnssec::Unsigned,
        ),
    ]);
    let nats = Nats::start();
    let node = Node::start_with(&nats.url(), true, |c| {
        configure(
            c,
            &Setup {
                dns: &knot,
                mx_port: port,
                inbound_port: None,
                allow_loopback: true,
                dkim: false,
                inbound_auth: None,
            },
        );
        c["delivery"]["tls"] = json!({
            "dane": { "enabled": true, "trustAnchorFile": knot.trust_anchor_file },
        });
    });

    let subject = unique("dane");
    let domains = [
        "dane-ee",
        "dane-ta",
        "dane-mismatch",
        "dane-strip",
        "expired",
        "resigned",
        "wrongds",
        "unsigned",
    ];
    for domain in domains {
        submit(
            node.ports.submission,
            &[&format!("carol@{domain}.test")],
            &format!("{subject} {domain}"),
            "Hello over DANE.",
        );
    }
    wait_for(
        "DANE-EE, DANE-TA and the unsigned domain delivered",
        Duration::from_secs(30),
        || {
            ee_mx.received().len() == 1
                && ta_mx.received().len() == 1
                && unsigned_mx.received().len() == 1
        },
    )
    .await;
    for (what, mx) in [
        ("DANE-EE", &ee_mx),
        ("DANE-TA", &ta_mx),
        ("unsigned", &unsigned_mx),
    ] {
        let got = &mx.received()[0];
        assert!(got.tls && got.data.contains(&subject), "{what}: {got:?}");
    }

    let error = last_error(&node, "carol@dane-mismatch.test", Duration::from_secs(30)).await;
    assert!(
        error.contains("TLS policy not met")
            && error.contains("no TLSA record of the host matches its certificate chain"),
        "{error}"
    );
    let error = last_error(&node, "carol@dane-strip.test", Duration::from_secs(30)).await;
    assert!(error.contains("does not offer STARTTLS"), "{error}");
    for domain in ["expired", "resigned", "wrongds"] {
        let error = last_error(
            &node,
            &format!("carol@{domain}.test"),
            Duration::from_secs(30),
        )
        .await;
        assert!(
            error.contains(&format!("the MX records of {domain}.test are DNSSEC-bogus")),
            "{domain}: {error}"
        );
    }
    // A few retries later (backoff 1-2 s) still nothing went out, TLS or cleartext.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for (what, mx) in [
        ("mismatching TLSA", &mismatch_mx),
        ("STARTTLS stripped", &behind_stripper),
        ("expired signatures", &expired_mx),
        ("re-signed zone", &resigned_mx),
        ("DS of no key", &wrong_ds_mx),
    ] {
        assert!(
            mx.received().is_empty(),
            "{what}: the MX got mail: {:?}",
            mx.received()
        );
    }
    assert!(
        mismatch_mx.sessions() >= 2,
        "the mismatching MX was retried, not dropped"
    );

    let m = metrics(&node);
    let tlsa = |result: &str| {
        counter(
            &m,
            &format!(
                "kubemail_smtp_tls_policy_results_total{{policy=\"tlsa\",result=\"{result}\"}}"
            ),
        )
    };
    assert_eq!(tlsa("success"), 2.0, "{m}");
    assert!(tlsa("validation-failure") >= 1.0, "{m}");
    assert!(tlsa("starttls-not-supported") >= 1.0, "{m}");
    assert!(tlsa("dnssec-invalid") >= 3.0, "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_rpt_one_report_of_a_days_sessions_reaches_the_rua_mailbox_valid_and_exact() {
    let ca = TestCa::new();
    // A CA with the trusted CA's name but its own key, as an attacker would make.
    let impostor = TestCa::new();
    // reports.test's MX, where the rua mailbox is; the recipient domain's MX shares its port.
    let mailbox = Sink::start(&[]);
    let port = mailbox.port;
    let options = |tls: Option<Arc<rustls::ServerConfig>>| MxOptions {
        tls,
        one_message_per_session: true,
        ..MxOptions::default()
    };
    let mx = MxPeer::start(
        ip(31),
        port,
        options(Some(ca.server_config(&["mx.rpt.test"]))),
    )
    .await;
    let policy_text = policy("testing", "mx.rpt.test");
    let server = PolicyServer::start(
        &ca,
        HashMap::from([("mta-sts.rpt.test".to_owned(), policy_text.clone())]),
    )
    .await;
    let knot = Knot::start(&[
        example_zone(),
        (
            "rpt.test",
            "@ IN MX 10 mx\nmx IN A 127.0.0.31\n_mta-sts IN TXT \"v=STSv1; id=1\"\nmta-sts IN A 127.0.0.1\n\
             _smtp._tls IN TXT \"v=TLSRPTv1; rua=mailto:tls-reports@reports.test\"\n"
                .to_owned(),
        ),
        (
            "reports.test",
            "@ IN MX 10 mx\nmx IN A 127.0.0.1\n".to_owned(),
        ),
    ]);
    let nats = Nats::start();
    let start_node = |clock: &str, check_interval: &str| {
        Node::start_with_env(
            &nats.url(),
            true,
            &[("SMTP_NODE_CLOCK_START", clock)],
            |c| {
                configure(
                    c,
                    &Setup {
                        dns: &knot,
                        mx_port: port,
                        inbound_port: None,
                        allow_loopback: true,
                        dkim: true,
                        inbound_auth: None,
                    },
                );
                tls_config(c, &ca, server.port);
                c["delivery"]["tls"]["reports"] = json!({ "checkInterval": check_interval });
            },
        )
    };

    // 27 November: two nodes deliver to rpt.test (MTA-STS testing), one message per session,
    // while its MX changes what it offers.
    let day = "2026-11-27T12:00:00Z";
    let nodes = [start_node(day, "1h"), start_node(day, "1h")];
    let subject = unique("tlsrpt");
    let mut sent = 0;
    let mut sessions = HashMap::new();
    let phases = [
        (
            "success",
            options(Some(ca.server_config(&["mx.rpt.test"]))),
            3,
        ),
        (
            "certificate-host-mismatch",
            options(Some(ca.server_config(&["other.test"]))),
            2,
        ),
        (
            "certificate-not-trusted",
            options(Some(impostor.server_config(&["mx.rpt.test"]))),
            1,
        ),
        ("starttls-not-supported", options(None), 1),
    ];
    for (outcome, offer, count) in phases {
        mx.set_options(offer);
        let before = mx.sessions();
        for _ in 0..count {
            let node = &nodes[sent % 2];
            sent += 1;
            submit(
                node.ports.submission,
                &["carol@rpt.test"],
                &format!("{subject} {sent}"),
                "Hello.",
            );
            wait_for(
                &format!("message {sent} ({outcome}) delivered"),
                Duration::from_secs(30),
                || mx.received().len() == sent,
            )
            .await;
        }
        sessions.insert(outcome, mx.sessions() - before);
    }
    assert_eq!(
        sessions,
        HashMap::from([
            ("success", 3),
            ("certificate-host-mismatch", 2),
            ("certificate-not-trusted", 1),
            ("starttls-not-supported", 1),
        ]),
        "one session per message"
    );
    drop(nodes);

    // 28 November: two other nodes look for the finished day every second; one sends.
    let next_day = "2026-11-28T00:00:05Z";
    let reporters = [start_node(next_day, "1s"), start_node(next_day, "1s")];
    let dump = delivery_support::wait_until(
        Duration::from_secs(30),
        "the TLS report at the rua mailbox",
        || {
            mailbox
                .transactions()
                .into_iter()
                .find(|t| t.contains("application/tlsrpt+gzip"))
        },
    );
    // Several more checks on both nodes: still one report.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(mailbox.count("application/tlsrpt+gzip"), 1, "one report");
    let sent_by: Vec<f64> = reporters
        .iter()
        .map(|n| {
            counter(
                &metrics(n),
                "kubemail_smtp_tls_reports_total{result=\"sent\"}",
            )
        })
        .collect();
    assert_eq!(sent_by.iter().sum::<f64>(), 1.0, "{sent_by:?}");

    assert!(dump.contains("X-Mail-Args: <>\n"), "null sender: {dump}");
    assert!(
        dump.contains("X-Rcpt-Args: <tls-reports@reports.test>\n"),
        "{dump}"
    );
    let raw = sink_message(&dump);
    let schema = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/rfc8460-report.schema.json");
    let checked = run_python("tlsrpt_report.py", &[&schema.display().to_string()], &raw);
    eprintln!("the report as Python sees it: {checked:#}");
    assert_eq!(checked["errors"], json!([]), "schema violations");
    assert_eq!(checked["content_type"], "multipart/report");
    assert_eq!(checked["report_type"], "tlsrpt");
    assert_eq!(checked["headers"]["TLS-Report-Domain"], "rpt.test");
    assert_eq!(
        checked["headers"]["TLS-Report-Submitter"],
        "mx.example.test"
    );
    assert!(
        checked["filename"].as_str().is_some_and(|f| f
            .starts_with("mx.example.test!rpt.test!1795737600!1795823999!")
            && f.ends_with(".json.gz")),
        "{checked}"
    );
    let verdicts = dkim_verify(&raw, &knot);
    assert!(
        !verdicts.is_empty()
            && verdicts
                .iter()
                .all(|v| v["ok"] == true && v["d"] == "example.test"),
        "{verdicts:?}"
    );

    let report = &checked["report"];
    assert_eq!(report["organization-name"], "example.test");
    assert_eq!(report["contact-info"], "postmaster@example.test");
    assert_eq!(
        report["date-range"],
        json!({ "start-datetime": "2026-11-27T00:00:00Z", "end-datetime": "2026-11-27T23:59:59Z" })
    );
    let policies = report["policies"].as_array().expect("policies");
    assert_eq!(policies.len(), 1, "{report:#}");
    let p = &policies[0];
    assert_eq!(
        p["policy"],
        json!({
            "policy-type": "sts",
            "policy-domain": "rpt.test",
            "policy-string": policy_text.trim_end().split("\r\n").collect::<Vec<_>>(),
            "mx-host": ["mx.rpt.test"],
        })
    );
    assert_eq!(
        p["summary"],
        json!({ "total-successful-session-count": 3, "total-failure-session-count": 4 })
    );
    let mut failures: HashMap<String, u64> = HashMap::new();
    for d in p["failure-details"].as_array().expect("failure details") {
        assert_eq!(d["receiving-mx-hostname"], "mx.rpt.test", "{d}");
        assert_eq!(d["receiving-ip"], "127.0.0.31", "{d}");
        *failures
            .entry(d["result-type"].as_str().unwrap_or_default().to_owned())
            .or_default() += d["failed-session-count"].as_u64().unwrap_or(0);
    }
    assert_eq!(
        failures,
        HashMap::from([
            ("certificate-host-mismatch".to_owned(), 2),
            ("certificate-not-trusted".to_owned(), 1),
            ("starttls-not-supported".to_owned(), 1),
        ])
    );
}

/// postfix-mta-sts-resolver's verdict on `domain`'s MTA-STS policy.
fn resolve_with_postfix_mta_sts_resolver(
    knot: &Knot,
    https_port: u16,
    ca: &TestCa,
    domain: &str,
) -> Value {
    run_python(
        "mta_sts_resolve.py",
        &[
            "--dns",
            &knot.addr(),
            "--https-port",
            &https_port.to_string(),
            "--ca",
            &ca.ca_file.display().to_string(),
            domain,
        ],
        b"",
    )
}
