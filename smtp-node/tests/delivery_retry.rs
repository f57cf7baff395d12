//! Retries and bounces against Postfix's smtp-sink as the remote MX: a remote that answers
//! 4xx first and 250 later gets the message exactly once; a pooled connection that the remote
//! closed while idle is replaced without a deferral; a remote that answers 5xx produces
//! one DSN to the sender, which Python's `email` package reads as a valid multipart/report;
//! and a bounce that cannot be delivered is dropped, never bounced again.

mod common;
mod delivery_support;

use std::time::Duration;

use common::{Nats, Node, queue_is_empty, unique};
use delivery_support::{
    DEFERRED, DELIVERED, Knot, Setup, Sink, configure, counter, dkim_verify, example_zone, metrics,
    parse_dsn, remote_zone, sink_message, submit, wait_until,
};

const DROPPED: &str =
    "kubemail_smtp_delivery_recipients_total{domain=\"example.test\",result=\"dropped\"}";
const BOUNCED: &str =
    "kubemail_smtp_delivery_recipients_total{domain=\"example.test\",result=\"bounced\"}";
const FAILURE_DSNS: &str =
    "kubemail_smtp_delivery_dsns_total{domain=\"example.test\",result=\"failure\"}";

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_answering_4xx_then_250_gets_the_message_once() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    // 450 to every DATA command: the recipients were accepted, the message was not.
    let mut sink = Sink::start(&["-r", "DATA"]);
    let node = Node::start_with(&nats.url(), true, |c| {
        configure(c, &Setup::to_mx(&knot, sink.port))
    });
    let subject = unique("greylisted");
    submit(
        node.ports.submission,
        &["carol@remote.test", "dave@remote.test"],
        &subject,
        "Hi.",
    );
    wait_until(Duration::from_secs(30), "a deferral", || {
        (counter(&metrics(&node), DEFERRED) >= 2.0).then_some(())
    });
    assert_eq!(sink.count(&subject), 0);
    // The retry is queued with the remaining recipients and its time.
    let retry = wait_until(Duration::from_secs(10), "the republished entry", || {
        let entries = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(node.messages())
        });
        entries
            .into_iter()
            .find(|e| e.header("Kubemail-Attempts").is_some())
    });
    assert!(
        retry.header("Kubemail-Not-Before").is_some(),
        "{:?}",
        retry.headers
    );
    assert!(
        retry
            .header("Kubemail-Last-Error")
            .unwrap_or("")
            .contains("450"),
        "{:?}",
        retry.headers
    );

    sink.restart(&[]);
    wait_until(
        Duration::from_secs(30),
        "delivery after the remote recovered",
        || (sink.count(&subject) >= 1).then_some(()),
    );
    wait_until(Duration::from_secs(10), "an empty queue", || {
        queue_is_empty(&node).then_some(())
    });
    // Several retry periods later there is still exactly one copy.
    std::thread::sleep(Duration::from_secs(4));
    let copies = sink.count(&subject);
    assert_eq!(
        copies, 1,
        "the remote must get the message once, got {copies}"
    );
    let dump = sink
        .transactions()
        .into_iter()
        .find(|t| t.contains(&subject))
        .expect("the delivered transaction");
    assert!(
        dump.contains("X-Rcpt-Args: <carol@remote.test>")
            && dump.contains("X-Rcpt-Args: <dave@remote.test>"),
        "{dump}"
    );
    let m = metrics(&node);
    assert_eq!(counter(&m, DELIVERED), 2.0, "{m}");
}

/// smtp-sink with `-t 1` drops a connection that sends nothing for a second. The second
/// message finds the pooled connection back from its transaction under 2 s ago, so it is
/// reused without an RSET first, and its MAIL meets the closed connection: nothing was
/// committed, a new connection takes the message at once, and the remote is not counted as
/// failing.
#[tokio::test(flavor = "multi_thread")]
async fn a_pooled_connection_the_remote_closed_while_idle_is_replaced_without_a_deferral() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let sink = Sink::start(&["-t", "1"]);
    let node = Node::start_with(&nats.url(), true, |c| {
        configure(c, &Setup::to_mx(&knot, sink.port));
        // The pool keeps the connection; only the remote closes it.
        c["delivery"]["connections"]["idleTimeout"] = serde_json::json!("60s");
    });
    let first = unique("pooled-1");
    submit(
        node.ports.submission,
        &["carol@remote.test"],
        &first,
        "One.",
    );
    wait_until(Duration::from_secs(30), "the first message", || {
        (sink.count(&first) == 1).then_some(())
    });
    // Past the remote's idle limit, within the time a pooled connection is used unchecked.
    std::thread::sleep(Duration::from_millis(1500));
    let second = unique("pooled-2");
    submit(
        node.ports.submission,
        &["carol@remote.test"],
        &second,
        "Two.",
    );
    wait_until(Duration::from_secs(30), "the second message", || {
        (sink.count(&second) == 1).then_some(())
    });
    let m = metrics(&node);
    assert_eq!(counter(&m, DELIVERED), 2.0, "{m}");
    assert_eq!(counter(&m, DEFERRED), 0.0, "{m}");
    let log = node.log();
    assert!(
        !log.contains("reused connection failed"),
        "the closed connection was taken for a failing remote: {log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_5xx_remote_produces_one_dsn_that_email_reads_as_a_multipart_report() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    // The remote MX answers 5xx to every RCPT; the sender's own inbound target accepts.
    let remote = Sink::start(&["-f", "RCPT"]);
    let inbound = Sink::start(&[]);
    let node = Node::start_with(&nats.url(), true, |c| {
        configure(
            c,
            &Setup {
                inbound_port: Some(inbound.port),
                dkim: true,
                ..Setup::to_mx(&knot, remote.port)
            },
        )
    });
    let subject = unique("rejected");
    submit(
        node.ports.submission,
        &["carol@remote.test", "dave@remote.test"],
        &subject,
        "Hi.",
    );
    let dump = wait_until(
        Duration::from_secs(30),
        "the DSN at the sender's inbound target",
        || {
            inbound
                .transactions()
                .into_iter()
                .find(|t| t.contains("Subject: Undelivered Mail Returned to Sender"))
        },
    );
    // The envelope: null reverse path (RFC 5321 4.5.5), to the original sender.
    assert!(dump.contains("X-Mail-Args: <>\n"), "{dump}");
    assert!(
        dump.contains("X-Rcpt-Args: <alice@example.test>\n"),
        "{dump}"
    );
    let raw = sink_message(&dump);
    let dsn = parse_dsn(&raw);
    eprintln!("DSN as Python's email package sees it: {dsn:#}");
    assert_eq!(dsn["defects"], serde_json::json!([]), "MIME defects");
    assert_eq!(dsn["content_type"], "multipart/report");
    assert_eq!(dsn["report_type"], "delivery-status");
    assert_eq!(
        dsn["parts"],
        serde_json::json!(["text/plain", "message/delivery-status", "message/rfc822"])
    );
    assert_eq!(dsn["to"], "alice@example.test");
    assert_eq!(dsn["auto_submitted"], "auto-replied");
    assert_eq!(dsn["per_message"]["Reporting-MTA"], "dns; mx.example.test");
    let recipients = dsn["recipients"].as_array().expect("recipients");
    assert_eq!(
        recipients.len(),
        2,
        "one DSN for both recipients: {recipients:?}"
    );
    for (r, who) in recipients
        .iter()
        .zip(["carol@remote.test", "dave@remote.test"])
    {
        assert_eq!(r["Final-Recipient"], format!("rfc822; {who}"));
        assert_eq!(r["Action"], "failed");
        assert!(r["Status"].as_str().unwrap_or("").starts_with("5."), "{r}");
        assert_eq!(r["Remote-MTA"], "dns; mx.remote.test");
        assert!(
            r["Diagnostic-Code"]
                .as_str()
                .unwrap_or("")
                .starts_with("smtp; 5"),
            "{r}"
        );
    }
    assert_eq!(dsn["returned_subject"], subject.as_str());
    // The bounce is signed by our domain, and the signatures hold.
    let verdicts = dkim_verify(&raw, &knot);
    assert_eq!(verdicts.len(), 2, "{verdicts:?}");
    assert!(verdicts.iter().all(|v| v["ok"] == true), "{verdicts:?}");

    wait_until(Duration::from_secs(10), "an empty queue", || {
        queue_is_empty(&node).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(inbound.count("Undelivered Mail"), 1, "exactly one DSN");
    assert_eq!(remote.transactions().len(), 0);
    let m = metrics(&node);
    assert_eq!(counter(&m, BOUNCED), 2.0, "{m}");
    assert_eq!(counter(&m, FAILURE_DSNS), 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_deferral_sends_the_sender_one_delay_notice() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let remote = Sink::start(&["-r", "DATA"]);
    let inbound = Sink::start(&[]);
    let node = Node::start_with(&nats.url(), true, |c| {
        configure(
            c,
            &Setup {
                inbound_port: Some(inbound.port),
                ..Setup::to_mx(&knot, remote.port)
            },
        );
        c["delivery"]["retry"]["delayWarning"] = serde_json::json!("2s");
    });
    let subject = unique("slow");
    submit(
        node.ports.submission,
        &["carol@remote.test"],
        &subject,
        "Hi.",
    );
    let dump = wait_until(Duration::from_secs(30), "the delay notice", || {
        inbound
            .transactions()
            .into_iter()
            .find(|t| t.contains("Subject: Delayed Mail (still being retried)"))
    });
    assert!(dump.contains("X-Mail-Args: <>\n"), "{dump}");
    let dsn = parse_dsn(&sink_message(&dump));
    assert_eq!(dsn["content_type"], "multipart/report");
    let r = &dsn["recipients"][0];
    assert_eq!(r["Action"], "delayed", "{dsn:#}");
    assert!(r["Status"].as_str().unwrap_or("").starts_with("4."), "{r}");
    assert!(r["Will-Retry-Until"].as_str().is_some(), "{r}");
    assert_eq!(
        dsn["parts"],
        serde_json::json!([
            "text/plain",
            "message/delivery-status",
            "text/rfc822-headers"
        ])
    );
    // More retries follow, but no second notice.
    std::thread::sleep(Duration::from_secs(5));
    assert!(counter(&metrics(&node), DEFERRED) >= 3.0, "still retrying");
    assert_eq!(inbound.count("Delayed Mail"), 1, "one notice only");
    assert_eq!(remote.count(&subject), 0);
}

/// The message of an smtp-sink dump: without its `X-` envelope lines, with the CRLF line
/// endings it had on the wire.
#[tokio::test(flavor = "multi_thread")]
async fn a_bounce_is_never_bounced() {
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    // The remote MX and the sender's own inbound target both refuse everything: the message
    // bounces, and the bounce (null sender) cannot be delivered either.
    let sink = Sink::start(&["-f", "RCPT"]);
    let node = Node::start_with(&nats.url(), true, |c| {
        configure(
            c,
            &Setup {
                inbound_port: Some(sink.port),
                ..Setup::to_mx(&knot, sink.port)
            },
        )
    });
    let subject = unique("double-bounce");
    submit(
        node.ports.submission,
        &["carol@remote.test"],
        &subject,
        "Hi.",
    );
    wait_until(
        Duration::from_secs(30),
        "the undeliverable bounce to be dropped",
        || (counter(&metrics(&node), DROPPED) >= 1.0).then_some(()),
    );
    wait_until(Duration::from_secs(10), "an empty queue", || {
        queue_is_empty(&node).then_some(())
    });
    // Give a hypothetical second bounce time to appear.
    std::thread::sleep(Duration::from_secs(3));
    let m = metrics(&node);
    assert_eq!(
        counter(&m, FAILURE_DSNS),
        1.0,
        "one bounce, no bounce of the bounce:\n{m}"
    );
    assert_eq!(counter(&m, DROPPED), 1.0, "{m}");
    assert!(queue_is_empty(&node), "nothing left in the queue");
    assert_eq!(sink.transactions().len(), 0);
}
