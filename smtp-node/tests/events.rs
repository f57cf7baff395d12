//! Delivery events, bounce classes and the suppression list against a real remote MX with
//! scripted replies (aiosmtpd, `tests/clients/scripted_mx.py`) and a real nats-server:
//!
//! * `550 5.1.1` → a `bounced` event of class `invalid-recipient` and a suppression entry;
//!   the next message to that address is `suppressed` and never reaches the MX;
//! * `452 4.2.2` → `deferred` (`mailbox-full`), then `delivered`, in that order;
//! * a `421` greeting → `deferred` (`rate-limited`);
//! * an inbound DSN and an inbound ARF report about a message we sent become `bounced` and
//!   `complaint` events linked to the original queue id (and suppression entries);
//! * a recipient a delivery pause holds back has no attempt event (nor does the suppressed one
//!   beside it count an attempt); an operator's delete with a notice bounces with `bounced`
//!   and `dsn_sent` events and suppresses nobody;
//! * every event validates against the CloudEvents 1.0 JSON schema (jsonschema) and carries
//!   no secret (no body text, no password).

mod common;
mod delivery_support;

use std::time::{Duration, SystemTime};

use common::{Nats, Node, PASSWORD, Raw, send_message, unique};
use delivery_support::{
    Knot, ScriptedMx, Setup, configure, counter, events, example_zone, metrics, remote_zone,
    submit, validate_cloudevents, wait_for_event, wait_until,
};
use kubemail_queue::suppression::{SuppressionList, SuppressionReason};
use serde_json::{Value, json};

const USER_UNKNOWN: &str = "550 5.1.1 <gone@remote.test>: Recipient address rejected: User unknown in local recipient table";
const OVER_QUOTA: &str = "452 4.2.2 The email account that you tried to reach is over quota. Please direct the recipient to https://support.google.com/mail/?p=OverQuotaTemp";
const BODY_MARKER: &str = "body-text-that-must-never-be-in-an-event";

fn start(knot: &Knot, nats: &Nats, mx: &ScriptedMx) -> Node {
    Node::start_with(&nats.url(), true, |c| {
        configure(
            c,
            &Setup {
                dns: knot,
                mx_port: mx.port,
                // Our own domain's mail (DSNs to alice) goes to the same peer.
                inbound_port: Some(mx.port),
                allow_loopback: true,
                dkim: false,
                inbound_auth: None,
            },
        )
    })
}

async fn suppression(
    nats_url: &str,
    address: &str,
) -> Option<kubemail_queue::suppression::SuppressionEntry> {
    let client = async_nats::connect(nats_url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let list = SuppressionList::open(&js)
        .await
        .expect("suppression bucket");
    list.get("example.test", address, SystemTime::now())
        .await
        .expect("read suppression entry")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hard_bounce_suppresses_the_address_and_the_next_message_is_not_attempted() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let mx = ScriptedMx::start(json!({ "rcpt": { "gone@remote.test": [USER_UNKNOWN] } }));
    let node = start(&knot, &nats, &mx);
    let url = nats.url();

    submit(
        node.ports.submission,
        &["gone@remote.test"],
        &unique("first"),
        BODY_MARKER,
    );
    let bounced = wait_for_event(&url, "bounced", "gone@remote.test", |_| true);
    let data = &bounced["data"];
    assert_eq!(data["bounceClass"], "invalid-recipient", "{bounced}");
    assert_eq!(data["status"], "5.1.1");
    assert_eq!(data["domain"], "example.test");
    assert_eq!(data["sender"], "alice@example.test");
    assert_eq!(data["remote"]["mx"], "mx.remote.test");
    assert_eq!(data["remote"]["ip"], "127.0.0.1");
    assert!(
        data["reply"]
            .as_str()
            .unwrap_or("")
            .contains("User unknown"),
        "{bounced}"
    );
    let first_queue_id = data["queueId"].as_str().expect("queue id").to_owned();
    // The sender was told, and that is an event too.
    wait_for_event(&url, "dsn_sent", "gone@remote.test", |e| {
        e["data"]["queueId"] == first_queue_id.as_str() && e["data"]["dsnKind"] == "failure"
    });

    let entry = suppression(&url, "gone@remote.test")
        .await
        .expect("a suppression entry for the hard bounce");
    assert_eq!(entry.reason, SuppressionReason::Bounce);
    assert_eq!(entry.source_event.as_deref(), bounced["id"].as_str());
    assert!(entry.expires_at.is_some(), "automatic entries expire");

    // The next message to that address is not attempted.
    submit(
        node.ports.submission,
        &["gone@remote.test"],
        &unique("second"),
        BODY_MARKER,
    );
    let suppressed = wait_for_event(&url, "suppressed", "gone@remote.test", |_| true);
    assert_ne!(suppressed["data"]["queueId"], first_queue_id.as_str());
    assert_eq!(suppressed["data"]["suppression"]["reason"], "bounce");
    assert_eq!(
        suppressed["data"]["suppression"]["sourceEvent"],
        bounced["id"]
    );
    // Give a (wrong) delivery attempt time to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(mx.rcpt_count("gone@remote.test"), 1, "{:?}", mx.log());

    let m = metrics(&node);
    assert_eq!(
        counter(
            &m,
            "kubemail_smtp_delivery_failures_total{domain=\"example.test\",result=\"bounced\",class=\"invalid-recipient\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        counter(
            &m,
            "kubemail_smtp_suppressed_recipients_total{domain=\"example.test\"}"
        ),
        1.0
    );

    // The dashboard's bounce row and the alerts query series this node exports.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("charts/kubemail/dashboards/kubemail.json"))
            .expect("dashboard"),
    )
    .expect("dashboard JSON");
    let mut queries: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["id"].as_i64().is_some_and(|id| id >= 27))
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    let rules = std::fs::read_to_string(root.join("charts/kubemail/templates/prometheusrule.yaml"))
        .expect("rules");
    for alert in ["KubemailBounceClassSpike", "KubemailEventsDropped"] {
        let at = rules.find(alert).expect("alert");
        queries.push(rules[at..].chars().take(700).collect());
    }
    assert!(queries.len() >= 10, "{queries:?}");
    for q in &queries {
        for name in q
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("kubemail_smtp_"))
        {
            assert!(
                m.lines().any(|l| l.starts_with(name)),
                "{name} (queried by the dashboard or an alert) is not exported: {q}"
            );
        }
    }
    for class in ["invalid-recipient", "mailbox-full", "rate-limited", "other"] {
        assert!(
            m.contains(&format!("class=\"{class}\"")),
            "{class} series exist from the start"
        );
    }

    // Every event is a valid CloudEvent and carries nothing secret.
    let all = events(&url).await;
    let types: Vec<&str> = all.iter().filter_map(|e| e["type"].as_str()).collect();
    for t in ["received", "bounced", "dsn_sent", "suppressed"] {
        assert!(
            types.contains(&format!("io.kubemail.delivery.{t}").as_str()),
            "{types:?}"
        );
    }
    for verdict in validate_cloudevents(&all) {
        assert_eq!(verdict["errors"], json!([]), "{verdict}");
    }
    let text = serde_json::to_string(&all).expect("json");
    assert!(
        !text.contains(BODY_MARKER),
        "a message body leaked into an event"
    );
    assert!(!text.contains(PASSWORD), "a password leaked into an event");
    // The validator does find a broken event.
    let mut broken = all[0].clone();
    broken["specversion"] = json!("0.3");
    broken.as_object_mut().expect("object").remove("source");
    let verdict = validate_cloudevents(&[broken]);
    assert_eq!(
        verdict[0]["errors"].as_array().map(Vec::len),
        Some(2),
        "{verdict:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mailbox_full_is_deferred_then_delivered_in_order() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    // With STARTTLS, so the delivered event names the connection's TLS.
    let certs = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["mx.remote.test".to_owned()]).expect("cert");
    std::fs::write(certs.path().join("cert.pem"), cert.cert.pem()).expect("cert");
    std::fs::write(
        certs.path().join("key.pem"),
        cert.signing_key.serialize_pem(),
    )
    .expect("key");
    let mx = ScriptedMx::start(json!({
        "rcpt": { "full@remote.test": [OVER_QUOTA, "250 2.1.5 OK"] },
        "tls": { "cert": certs.path().join("cert.pem"), "key": certs.path().join("key.pem") }
    }));
    let node = start(&knot, &nats, &mx);
    let url = nats.url();

    submit(
        node.ports.submission,
        &["full@remote.test"],
        &unique("quota"),
        "Hi.",
    );
    let delivered = wait_for_event(&url, "delivered", "full@remote.test", |_| true);
    assert_eq!(delivered["data"]["remote"]["ip"], "127.0.0.1");
    assert_eq!(delivered["data"]["attempt"], 2);
    let tls = &delivered["data"]["remote"]["tls"];
    assert!(
        tls["version"].as_str().unwrap_or("").starts_with("TLSv1."),
        "{delivered}"
    );
    assert!(
        tls["cipher"].as_str().is_some_and(|c| !c.is_empty()),
        "{delivered}"
    );
    assert_eq!(tls["verified"], false, "opportunistic TLS does not verify");
    let queue_id = delivered["data"]["queueId"].clone();
    let sequence: Vec<Value> = events(&url)
        .await
        .into_iter()
        .filter(|e| e["subject"] == "full@remote.test" && e["data"]["queueId"] == queue_id)
        .collect();
    let types: Vec<&str> = sequence.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        types,
        [
            "io.kubemail.delivery.received",
            "io.kubemail.delivery.deferred",
            "io.kubemail.delivery.delivered"
        ],
        "{sequence:?}"
    );
    let deferred = &sequence[1]["data"];
    assert_eq!(deferred["bounceClass"], "mailbox-full");
    assert_eq!(deferred["status"], "4.2.2");
    assert!(deferred["retryAt"].is_string(), "{deferred}");
    assert_eq!(mx.rcpt_count("full@remote.test"), 2);
    assert!(
        suppression(&url, "full@remote.test").await.is_none(),
        "a full mailbox is not suppressed"
    );
    let m = metrics(&node);
    assert!(
        counter(
            &m,
            "kubemail_smtp_delivery_failures_total{domain=\"example.test\",result=\"deferred\",class=\"mailbox-full\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        counter(
            &m,
            "kubemail_smtp_delivery_remote_failures_total{domain=\"example.test\",remote_domain=\"remote.test\",class=\"mailbox-full\"}"
        ) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_421_greeting_is_deferred_as_rate_limited() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let mx = ScriptedMx::start(json!({
        "greeting": "421 4.7.0 mx.remote.test Error: too many connections from 127.0.0.1"
    }));
    let node = start(&knot, &nats, &mx);
    let url = nats.url();

    submit(
        node.ports.submission,
        &["carol@remote.test"],
        &unique("busy"),
        "Hi.",
    );
    let deferred = wait_for_event(&url, "deferred", "carol@remote.test", |_| true);
    assert_eq!(
        deferred["data"]["bounceClass"], "rate-limited",
        "{deferred}"
    );
    assert!(
        deferred["data"]["reply"]
            .as_str()
            .unwrap_or("")
            .contains("too many connections"),
        "{deferred}"
    );
    let m = metrics(&node);
    assert!(
        counter(
            &m,
            "kubemail_smtp_delivery_failures_total{domain=\"example.test\",result=\"deferred\",class=\"rate-limited\"}"
        ) >= 1.0,
        "{m}"
    );
}

/// The header section of the message the MX received for `rcpt`: what a real remote
/// returns in its report.
fn received_header(mx: &ScriptedMx, rcpt: &str) -> String {
    let message = wait_until(Duration::from_secs(30), "the original at the MX", || {
        mx.messages().into_iter().find(|m| {
            m["rcpt_tos"]
                .as_array()
                .is_some_and(|r| r.iter().any(|a| a == rcpt))
        })
    });
    let data = message["data"]
        .as_str()
        .expect("data")
        .replace("\r\n", "\n");
    let header = data.split("\n\n").next().expect("header").to_owned();
    header.replace('\n', "\r\n")
}

async fn send_inbound(node: &Node, message: &str) {
    let mut c = Raw::connect(node.ports.mx).await;
    c.expect("220").await;
    c.cmd("EHLO mx.remote.test", "250").await;
    let reply = send_message(&mut c, "", "bob@example.test", message.as_bytes()).await;
    assert!(reply.starts_with("250"), "{reply}");
    c.cmd("QUIT", "221").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn inbound_dsn_and_feedback_report_become_events_of_the_original_message() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let mx = ScriptedMx::start(json!({}));
    let node = start(&knot, &nats, &mx);
    let url = nats.url();

    submit(
        node.ports.submission,
        &["bob@remote.test", "carol@remote.test"],
        &unique("original"),
        "Hi.",
    );
    let delivered = wait_for_event(&url, "delivered", "bob@remote.test", |_| true);
    let original = delivered["data"]["queueId"]
        .as_str()
        .expect("queue id")
        .to_owned();
    let header = received_header(&mx, "bob@remote.test");

    // A Postfix-style DSN from the remote: bob's mailbox was removed after it accepted.
    let dsn = format!(
        "From: MAILER-DAEMON@mx.remote.test (Mail Delivery System)\r\nTo: bob@example.test\r\nSubject: Undelivered Mail Returned to Sender\r\nMessage-ID: <dsn-1@mx.remote.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"DSN-B\"\r\n\r\n--DSN-B\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nI'm sorry to have to inform you that your message could not\r\nbe delivered to one or more recipients.\r\n\r\n--DSN-B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.remote.test\r\nX-Postfix-Queue-ID: 4F1A2B3C\r\nArrival-Date: Sat, 28 Nov 2026 00:00:01 +0000\r\n\r\nFinal-Recipient: rfc822; bob@remote.test\r\nOriginal-Recipient: rfc822;bob@remote.test\r\nAction: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mailbox.remote.test\r\nDiagnostic-Code: smtp; 550 5.1.1 <bob@remote.test>: Recipient address\r\n    rejected: User unknown in virtual mailbox table\r\n\r\n--DSN-B\r\nContent-Type: text/rfc822-headers\r\n\r\n{header}\r\n--DSN-B--"
    );
    send_inbound(&node, &dsn).await;
    let bounced = wait_for_event(&url, "bounced", "bob@remote.test", |e| {
        e["data"]["report"]["format"] == "dsn"
    });
    assert_eq!(bounced["data"]["queueId"], original.as_str(), "{bounced}");
    assert_eq!(bounced["data"]["bounceClass"], "invalid-recipient");
    assert_eq!(bounced["data"]["status"], "5.1.1");
    assert_eq!(bounced["data"]["report"]["reporter"], "mx.remote.test");
    let bob = suppression(&url, "bob@remote.test")
        .await
        .expect("the reported hard bounce is suppressed");
    assert_eq!(bob.reason, SuppressionReason::Bounce);

    // An RFC 5965 abuse report: carol pressed "this is spam".
    let arf = format!(
        "From: <staff@fbl.remote.test>\r\nTo: bob@example.test\r\nSubject: FW: complaint\r\nMessage-ID: <arf-1@fbl.remote.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=feedback-report;\r\n\tboundary=\"ARF-B\"\r\n\r\n--ARF-B\r\nContent-Type: text/plain; charset=\"US-ASCII\"\r\n\r\nThis is an email abuse report for an email message received from IP\r\n127.0.0.1.\r\n\r\n--ARF-B\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\nUser-Agent: SomeGenerator/1.0\r\nVersion: 1\r\nOriginal-Mail-From: <alice@example.test>\r\nOriginal-Rcpt-To: <carol@remote.test>\r\nArrival-Date: Sat, 28 Nov 2026 00:00:01 +0000\r\nReported-Domain: example.test\r\nSource-IP: 127.0.0.1\r\n\r\n--ARF-B\r\nContent-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n{header}\r\n\r\nHi.\r\n--ARF-B--"
    );
    send_inbound(&node, &arf).await;
    let complaint = wait_for_event(&url, "complaint", "carol@remote.test", |_| true);
    assert_eq!(
        complaint["data"]["queueId"],
        original.as_str(),
        "{complaint}"
    );
    assert_eq!(complaint["data"]["report"]["format"], "arf");
    assert_eq!(complaint["data"]["report"]["feedbackType"], "abuse");
    let carol = suppression(&url, "carol@remote.test")
        .await
        .expect("a complaint is suppressed");
    assert_eq!(carol.reason, SuppressionReason::Complaint);
    assert_eq!(carol.source_event.as_deref(), complaint["id"].as_str());

    // Both reports still reached the mailbox they were sent to (the scripted MX is the inbound target).
    wait_until(
        Duration::from_secs(30),
        "both reports delivered to bob",
        || {
            (mx.messages()
                .iter()
                .filter(|m| m["rcpt_tos"] == json!(["bob@example.test"]))
                .count()
                >= 2)
                .then_some(())
        },
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn submission_can_refuse_a_suppressed_recipient_at_rcpt() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let mx = ScriptedMx::start(json!({}));
    let node = Node::start_with(&nats.url(), true, |c| {
        configure(
            c,
            &Setup {
                dns: &knot,
                mx_port: mx.port,
                inbound_port: None,
                allow_loopback: true,
                dkim: false,
                inbound_auth: None,
            },
        );
        c["events"] = json!({ "suppression": {
            "refuseAtRcpt": true,
            "refuseText": "suppressed: this address bounced or complained"
        }});
    });
    // A manual entry through the library API (what the CLI and the operator use).
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let list = SuppressionList::open(&js).await.expect("bucket");
    let entry = kubemail_queue::suppression::SuppressionEntry::new(
        "example.test",
        "Blocked@Remote.test",
        SuppressionReason::Manual,
        SystemTime::now(),
        None,
    );
    list.put(&entry).await.expect("put");

    let steps = common::smtplib(
        node.ports.submission,
        "starttls",
        json!([
            ["login", common::USER, PASSWORD],
            ["mail", "alice@example.test"],
            ["rcpt", "blocked@remote.test"],
            ["rcpt", "ok@remote.test"],
            ["quit"]
        ]),
    );
    let rcpts: Vec<&common::Step> = steps.iter().filter(|s| s.op == "rcpt").collect();
    assert_eq!(rcpts[0].code, 550, "{steps:?}");
    assert!(
        rcpts[0].msg.contains("suppressed: this address bounced"),
        "{steps:?}"
    );
    assert_eq!(rcpts[1].code, 250, "{steps:?}");

    // Removed by hand, the address is accepted again.
    list.remove("example.test", "blocked@remote.test")
        .await
        .expect("remove");
    let steps = common::smtplib(
        node.ports.submission,
        "starttls",
        json!([
            ["login", common::USER, PASSWORD],
            ["mail", "alice@example.test"],
            ["rcpt", "blocked@remote.test"],
            ["quit"]
        ]),
    );
    let rcpt = steps.iter().find(|s| s.op == "rcpt").expect("rcpt step");
    assert_eq!(rcpt.code, 250, "{steps:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recipient_that_keeps_deferring_expires_with_the_class_of_its_last_reply() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let mx = ScriptedMx::start(json!({ "rcpt": { "slow@remote.test": [
        "451 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred due to unexpected volume or user complaints"
    ] } }));
    let node = Node::start_with(&nats.url(), true, |c| {
        configure(
            c,
            &Setup {
                dns: &knot,
                mx_port: mx.port,
                inbound_port: Some(mx.port),
                allow_loopback: true,
                dkim: false,
                inbound_auth: None,
            },
        );
        c["delivery"]["retry"]["lifetime"] = json!("4s");
    });
    let url = nats.url();
    submit(
        node.ports.submission,
        &["slow@remote.test"],
        &unique("expiry"),
        "Hi.",
    );
    let expired = wait_for_event(&url, "expired", "slow@remote.test", |_| true);
    assert_eq!(expired["data"]["bounceClass"], "rate-limited", "{expired}");
    assert_eq!(expired["data"]["status"], "4.4.7");
    let queue_id = expired["data"]["queueId"].clone();
    let kinds: Vec<String> = events(&url)
        .await
        .into_iter()
        .filter(|e| e["subject"] == "slow@remote.test" && e["data"]["queueId"] == queue_id)
        .filter_map(|e| e["type"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("io.kubemail.delivery.received")
    );
    assert!(
        kinds.iter().any(|k| k == "io.kubemail.delivery.deferred"),
        "{kinds:?}"
    );
    assert_eq!(
        kinds
            .iter()
            .filter(|k| *k == "io.kubemail.delivery.expired")
            .count(),
        1,
        "{kinds:?}"
    );
    // The sender is told, and an expiry suppresses nothing.
    wait_for_event(&url, "dsn_sent", "slow@remote.test", |e| {
        e["data"]["queueId"] == queue_id
    });
    assert!(suppression(&url, "slow@remote.test").await.is_none());
}

/// The types of the events about `recipient`, in stream order.
fn types_of(all: &[Value], recipient: &str) -> Vec<String> {
    all.iter()
        .filter(|e| e["subject"] == recipient)
        .filter_map(|e| e["type"].as_str())
        .map(|t| t.trim_start_matches("io.kubemail.delivery.").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_recipient_has_no_attempt_event_and_an_operators_delete_bounces_with_events() {
    use kubemail_queue::pause::Pause;
    use kubemail_queue_admin::actions::Kind;
    use kubemail_queue_admin::{Filter, Queue, pauses};

    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let mx = ScriptedMx::start(json!({}));
    let node = Node::start_with(&nats.url(), true, |c| {
        configure(
            c,
            &Setup {
                dns: &knot,
                mx_port: mx.port,
                inbound_port: Some(mx.port),
                allow_loopback: true,
                dkim: false,
                inbound_auth: None,
            },
        );
        c["delivery"]["pauseCheckInterval"] = json!("1s");
    });
    let url = nats.url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("nats"));
    let bucket = pauses::open_bucket(&js, 1).await.expect("pause bucket");
    let pause = Pause {
        key: "default.remote".into(),
        reason: Some("remote.test answers 421".into()),
        recipient_domains: vec!["remote.test".into()],
        ..Pause::default()
    };
    pauses::put(&bucket, &pause).await.expect("write the pause");
    // A suppressed address beside a paused one: it fails at once, the other waits.
    let list = SuppressionList::open(&js)
        .await
        .expect("suppression bucket");
    list.put(&kubemail_queue::suppression::SuppressionEntry::new(
        "example.test",
        "blocked@remote.test",
        SuppressionReason::Manual,
        SystemTime::now(),
        None,
    ))
    .await
    .expect("suppress");
    // The node's watch retries every 2 s until the bucket exists.
    tokio::time::sleep(Duration::from_secs(3)).await;

    submit(
        node.ports.submission,
        &["held@remote.test"],
        &unique("deleted"),
        "Hi.",
    );
    submit(
        node.ports.submission,
        &["later@remote.test", "blocked@remote.test"],
        &unique("resumed"),
        "Hi.",
    );
    let received = wait_for_event(&url, "received", "held@remote.test", |_| true);
    let queue_id = received["data"]["queueId"].clone();
    wait_for_event(&url, "received", "later@remote.test", |_| true);
    wait_for_event(&url, "suppressed", "blocked@remote.test", |_| true);
    // Several pause checks go by: no attempt, so no attempt event.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let all = events(&url).await;
    assert_eq!(types_of(&all, "held@remote.test"), ["received"], "{all:?}");
    assert_eq!(types_of(&all, "later@remote.test"), ["received"], "{all:?}");
    assert_eq!(mx.rcpt_count("held@remote.test"), 0, "{:?}", mx.log());

    // An operator deletes the first message with a notice: it bounces, with its events.
    let queue = Queue::open(
        js.clone(),
        &node.stream,
        &node.subject_prefix,
        "events-test",
    )
    .await
    .expect("queue");
    let filter = Filter {
        queue_ids: vec![queue_id.as_str().expect("queue id").to_owned()],
        ..Filter::default()
    };
    let summary = queue
        .act(&Kind::Delete { notify: true }, filter, false, |_| {})
        .await
        .expect("delete");
    assert_eq!(summary.changed, 1, "{summary:?}");
    wait_for_event(&url, "bounced", "held@remote.test", |e| {
        e["data"]["queueId"] == queue_id
    });
    wait_for_event(&url, "dsn_sent", "held@remote.test", |e| {
        e["data"]["queueId"] == queue_id && e["data"]["dsnKind"] == "failure"
    });
    assert!(
        suppression(&url, "held@remote.test").await.is_none(),
        "an operator's delete suppresses nobody"
    );

    // The pause ends: the other message goes out on its first attempt (the suppressed
    // recipient beside it counted no attempt either).
    pauses::delete(&bucket, "default.remote")
        .await
        .expect("end the pause");
    let delivered = wait_for_event(&url, "delivered", "later@remote.test", |_| true);
    assert_eq!(delivered["data"]["attempt"], 1, "{delivered}");
    let all = events(&url).await;
    assert_eq!(
        types_of(&all, "later@remote.test"),
        ["received", "delivered"],
        "{all:?}"
    );
    assert_eq!(mx.rcpt_count("held@remote.test"), 0, "{:?}", mx.log());
    assert_eq!(mx.rcpt_count("blocked@remote.test"), 0, "{:?}", mx.log());
}
