//! Observability against real parts: the local cluster's Jaeger (OTLP/gRPC in, query API
//! out) shows one trace per message from acceptance on one node to every delivery attempt on
//! another, with the trace id in the delivered message's `Received` header; a dead collector
//! costs no `250` and is counted; every metric of the node is on `/metrics` and moves.
//!
//! The Jaeger tests need `OTEL_EXPORTER_OTLP_ENDPOINT` and `JAEGER_API` from
//! `.kubemail-local/env` (`make test` sources it; by hand: `e2e/local-cluster up` then
//! `. .kubemail-local/env`). Each test uses its own `OTEL_SERVICE_NAME`.

mod common;
mod delivery_support;

use std::time::Duration;

use common::{Nats, Node, RawTcp, free_port, unique};
use delivery_support::{
    DEFERRED, DELIVERED, Knot, Mailpit, Setup, Sink, configure, counter, example_zone, log,
    metrics, remote_zone, submit, wait_until,
};
use serde_json::{Value, json};

/// A variable of the local cluster's env file; fails with what to do when it is missing.
fn cluster_env(name: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not set: these tests need the local cluster's Jaeger. Run \
             `e2e/local-cluster up` and `. .kubemail-local/env` first (`make test` does both)."
            )
        })
}

/// The 32-hex-digit trace id in our `Received` header's `(trace ...)` comment.
fn trace_id_in(message: &str) -> String {
    let start = message
        .find("(trace ")
        .unwrap_or_else(|| panic!("no (trace ...) comment in the message:\n{message}"))
        + "(trace ".len();
    let id: String = message[start..].chars().take(32).collect();
    assert!(
        id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "bad trace id {id:?} in:\n{message}"
    );
    id
}

/// One trace as Jaeger's query API returns it.
struct Trace {
    spans: Vec<Value>,
    processes: Value,
}

impl Trace {
    fn named(&self, operation: &str) -> Vec<&Value> {
        self.spans
            .iter()
            .filter(|s| s["operationName"] == operation)
            .collect()
    }

    fn operations(&self) -> Vec<String> {
        let mut ops: Vec<String> = self
            .spans
            .iter()
            .filter_map(|s| s["operationName"].as_str().map(str::to_owned))
            .collect();
        ops.sort();
        ops
    }

    fn pod(&self, span: &Value) -> Option<String> {
        let process = span["processID"].as_str()?;
        tag_in(&self.processes[process]["tags"], "k8s.pod.name")
            .and_then(|v| v.as_str().map(str::to_owned))
    }

    fn service(&self, span: &Value) -> Option<String> {
        let process = span["processID"].as_str()?;
        self.processes[process]["serviceName"]
            .as_str()
            .map(str::to_owned)
    }
}

fn tag_in<'a>(tags: &'a Value, key: &str) -> Option<&'a Value> {
    tags.as_array()?
        .iter()
        .find(|t| t["key"] == key)
        .map(|t| &t["value"])
}

fn tag<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    tag_in(&span["tags"], key)
}

fn tag_str(span: &Value, key: &str) -> String {
    match tag(span, key) {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => String::new(),
    }
}

/// Whether `span` has a reference of `kind` (`CHILD_OF`, `FOLLOWS_FROM`) to `span_id`.
fn refers_to(span: &Value, kind: &str, span_id: &str) -> bool {
    span["references"].as_array().is_some_and(|refs| {
        refs.iter()
            .any(|r| r["refType"] == kind && r["spanID"] == span_id)
    })
}

async fn fetch_trace(api: &str, trace_id: &str) -> Option<Trace> {
    let resp = reqwest::get(format!("{api}/api/traces/{trace_id}"))
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body: Value = resp.json().await.ok()?;
    let trace = body["data"].as_array()?.first()?.clone();
    Some(Trace {
        spans: trace["spans"].as_array().cloned().unwrap_or_default(),
        processes: trace["processes"].clone(),
    })
}

/// Polls Jaeger until the trace satisfies `complete`, or fails with what it had.
async fn wait_for_trace(api: &str, trace_id: &str, complete: impl Fn(&Trace) -> bool) -> Trace {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    loop {
        let trace = fetch_trace(api, trace_id).await;
        if let Some(t) = trace.as_ref().filter(|t| complete(t)) {
            return Trace {
                spans: t.spans.clone(),
                processes: t.processes.clone(),
            };
        }
        if tokio::time::Instant::now() > deadline {
            let seen = trace.map(|t| t.operations()).unwrap_or_default();
            panic!("Jaeger never showed the complete trace {trace_id}; it has spans {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The lines of a JSON log that parse, as values.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect()
}

/// The span of `name` in a JSON log line's span list.
fn log_span<'a>(line: &'a Value, name: &str) -> Option<&'a Value> {
    line["spans"].as_array()?.iter().find(|s| s["name"] == name)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_from_acceptance_on_one_node_to_every_delivery_attempt_on_another() {
    let endpoint = cluster_env("OTEL_EXPORTER_OTLP_ENDPOINT");
    let jaeger = cluster_env("JAEGER_API");
    let service = unique("kubemail-test-trace");
    let nats = Nats::start();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    // 450 to every DATA: the first attempt is deferred by the remote.
    let mut sink = Sink::start(&["-r", "DATA"]);
    let setup = Setup {
        dns: &knot,
        mx_port: sink.port,
        inbound_port: None,
        allow_loopback: true,
        dkim: false,
        inbound_auth: None,
    };
    let env = |pod: &'static str| {
        [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
            ("OTEL_SERVICE_NAME", service.clone()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200".to_owned()),
            ("POD_NAME", pod.to_owned()),
            ("POD_NAMESPACE", "mail".to_owned()),
            ("LOG_FORMAT", "json".to_owned()),
        ]
    };
    let env_a = env("accept-0");
    let env_a: Vec<(&str, &str)> = env_a.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Node A accepts and queues; it delivers nothing.
    let accepting = Node::start_with_env(&nats.url(), true, &env_a, |c| {
        configure(c, &setup);
        c["delivery"]["enabled"] = json!(false);
    });
    // Node B shares A's queue and does every delivery attempt.
    let queue = json!({
        "url": nats.url(),
        "stream": accepting.stream,
        "subjectPrefix": accepting.subject_prefix,
        "bodyBucket": accepting.bucket,
        "publishTimeout": "3s",
    });
    let env_b = env("deliver-1");
    let env_b: Vec<(&str, &str)> = env_b.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let delivering = Node::start_with_env(&nats.url(), true, &env_b, |c| {
        configure(c, &setup);
        c["nats"] = queue.clone();
    });

    let subject = unique("traced");
    submit(
        accepting.ports.submission,
        &["carol@remote.test"],
        &subject,
        "Follow me.",
    );
    wait_until(Duration::from_secs(30), "the remote's deferral", || {
        (counter(&metrics(&delivering), DEFERRED) >= 1.0).then_some(())
    });
    sink.restart(&[]);
    let dump = wait_until(Duration::from_secs(30), "the retry's delivery", || {
        sink.transactions()
            .into_iter()
            .find(|t| t.contains(&subject))
    });
    let trace_id = trace_id_in(&dump);

    let trace = wait_for_trace(&jaeger, &trace_id, |t| {
        t.named("smtp.transaction").len() == 1
            && t.named("delivery.attempt")
                .iter()
                .any(|s| tag_str(s, "delivery.outcome") == "delivered")
    })
    .await;
    let ops = trace.operations();
    let transaction = trace.named("smtp.transaction")[0];
    let tx_id = transaction["spanID"].as_str().expect("span id");
    assert_eq!(
        trace.pod(transaction).as_deref(),
        Some("accept-0"),
        "{ops:?}"
    );
    assert_eq!(
        trace.service(transaction).as_deref(),
        Some(service.as_str())
    );
    assert_eq!(tag_str(transaction, "smtp.outcome"), "queued");
    assert_eq!(tag_str(transaction, "smtp.reply_code"), "250");
    assert_eq!(tag_str(transaction, "enduser.id"), common::USER);
    assert_eq!(tag_str(transaction, "smtp.mail_from"), "alice@example.test");
    assert_eq!(tag_str(transaction, "smtp.rcpt_to"), "carol@remote.test");
    assert_eq!(tag_str(transaction, "tls.protocol.version"), "TLSv1.3");
    assert!(
        transaction["references"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["refType"] == "FOLLOWS_FROM")),
        "the transaction links to its session: {transaction}"
    );
    // Every span of the trace: no password anywhere.
    let text = serde_json::to_string(&trace.spans).expect("json");
    assert!(!text.contains(common::PASSWORD), "a password in the trace");

    let publish = trace.named("queue.publish");
    assert!(
        publish
            .iter()
            .any(|p| refers_to(p, "CHILD_OF", tx_id) && trace.pod(p).as_deref() == Some("accept-0")),
        "the acceptance's publish is a child of the transaction: {ops:?}"
    );

    let attempts = trace.named("delivery.attempt");
    let deferred: Vec<_> = attempts
        .iter()
        .filter(|a| tag_str(a, "delivery.outcome") == "deferred")
        .collect();
    let delivered: Vec<_> = attempts
        .iter()
        .filter(|a| tag_str(a, "delivery.outcome") == "delivered")
        .collect();
    assert!(!deferred.is_empty(), "a deferred attempt: {ops:?}");
    assert_eq!(delivered.len(), 1, "one delivering attempt: {ops:?}");
    for a in &attempts {
        assert!(
            refers_to(a, "CHILD_OF", tx_id),
            "each attempt is a child of the transaction: {a}"
        );
        assert_eq!(trace.pod(a).as_deref(), Some("deliver-1"));
    }
    assert!(
        tag_str(deferred[0], "delivery.last_error").contains("450"),
        "{}",
        deferred[0]
    );
    assert_eq!(tag_str(deferred[0], "attempt"), "1");
    assert_eq!(tag_str(delivered[0], "delivery.delivered"), "1");
    // The pieces of an attempt.
    for op in [
        "delivery.route",
        "delivery.mx_lookup",
        "smtp.client.connect",
        "smtp.client.send",
        "smtp.client.reply",
    ] {
        assert!(ops.iter().any(|o| o == op), "no {op} span: {ops:?}");
    }
    // The transaction's replies are on its send span, in order, with the code of the one
    // that decided (recorded once: a second record would be a second attribute).
    let sends = trace.named("smtp.client.send");
    let codes = |span: &Value| {
        span["tags"].as_array().map_or(0, |t| {
            t.iter().filter(|t| t["key"] == "smtp.reply_code").count()
        })
    };
    assert!(
        sends.iter().any(|r| {
            tag_str(r, "smtp.reply_code") == "450"
                && codes(r) == 1
                && tag_str(r, "smtp.replies").contains("; DATA: 450 ")
                && tag_str(r, "smtp.replies").starts_with("MAIL: 250")
        }),
        "the 450 reply is in the trace: {sends:?}"
    );
    assert!(
        sends.iter().any(|r| {
            tag_str(r, "smtp.reply_code") == "250"
                && codes(r) == 1
                && tag_str(r, "smtp.replies").ends_with("; end of data: 250 2.0.0 Ok")
        }),
        "the delivering transaction: {sends:?}"
    );
    // The connection's own replies (greeting, EHLO) are spans of their own.
    let replies = trace.named("smtp.client.reply");
    assert!(
        replies
            .iter()
            .any(|r| tag_str(r, "smtp.phase") == "greeting"),
        "the greeting's reply span"
    );
    // The retry entry was republished by node B, in the same trace.
    assert!(
        publish
            .iter()
            .any(|p| trace.pod(p).as_deref() == Some("deliver-1")),
        "the retry's publish: {ops:?}"
    );
    let m = metrics(&delivering);
    assert!(
        counter(
            &m,
            "kubemail_smtp_delivery_retries_total{domain=\"example.test\"}"
        ) >= 1.0,
        "{m}"
    );

    // Logs: JSON lines of the transaction and of the delivery carry the trace and message id.
    let accepted_log = json_lines(&log(&accepting));
    let queued = accepted_log
        .iter()
        // The session's line; the queue's committer logs its own "queued" at DEBUG.
        .find(|l| l["fields"]["message"] == "queued" && l["level"] == "INFO")
        .expect("a 'queued' log line");
    let tx = log_span(queued, "smtp.transaction").expect("transaction span in the line");
    assert_eq!(tx["trace_id"], trace_id.as_str(), "{queued}");
    assert!(
        tx["message_id"].as_str().is_some_and(|m| m.contains('@')),
        "{queued}"
    );
    assert!(log_span(queued, "smtp.session").is_some(), "{queued}");
    let delivered_log = json_lines(&log(&delivering));
    let line = delivered_log
        .iter()
        .find(|l| l["fields"]["message"] == "delivered")
        .expect("a 'delivered' log line");
    let attempt = log_span(line, "delivery.attempt").expect("attempt span in the line");
    assert_eq!(attempt["trace_id"], trace_id.as_str(), "{line}");
    assert_eq!(attempt["message_id"], tx["message_id"], "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_collector_costs_no_reply_and_is_counted() {
    // A closed loopback port: connections are refused at once, as with a stopped collector.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let service = unique("kubemail-test-dead-collector");
    let nats = Nats::shared();
    let node = Node::start_with_env(
        &nats.url(),
        true,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &dead),
            ("OTEL_SERVICE_NAME", &service),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "300"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "4"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4"),
        ],
        |c| c["admin"]["queueSampleInterval"] = json!("1s"),
    );
    const MESSAGES: usize = 20;
    let mut c = RawTcp::connect(node.ports.mx).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    for i in 0..MESSAGES {
        let body =
            format!("Subject: dead collector {i}\r\nMessage-ID: <dead{i}@client.test>\r\n\r\nHi.");
        let reply = common::send_message(
            &mut c,
            "sender@client.test",
            "bob@example.test",
            body.as_bytes(),
        )
        .await;
        assert!(reply.starts_with("250"), "message {i}: {reply}");
    }
    c.cmd("QUIT", "221").await;

    let dropped = "kubemail_smtp_otel_spans_dropped_total";
    let m = wait_until(Duration::from_secs(30), "counted span drops", || {
        let m = metrics(&node);
        (counter(&m, dropped) > 0.0).then_some(m)
    });
    assert_eq!(
        counter(&m, "kubemail_smtp_otel_spans_exported_total"),
        0.0,
        "{m}"
    );
    // Queue depth is sampled from JetStream.
    wait_until(Duration::from_secs(15), "the sampled queue depth", || {
        let m = metrics(&node);
        (counter(&m, "kubemail_smtp_queue_messages{domain=\"example.test\"}") == MESSAGES as f64)
            .then_some(())
    });
    let text = log(&node);
    assert_eq!(
        text.matches("cannot export traces").count(),
        1,
        "one warning, not one per batch:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_is_exported_and_moves_with_a_short_exchange() {
    let nats = Nats::shared();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["mx.remote.test".to_owned()]).expect("cert");
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
    let node = Node::start_with(&nats.url(), true, |c| {
        configure(
            c,
            &Setup {
                dns: &knot,
                mx_port: mailpit.smtp_port,
                inbound_port: None,
                allow_loopback: true,
                dkim: true,
                inbound_auth: None,
            },
        );
        c["maxConnectionsPerIp"] = json!(2);
    });
    let before = metrics(&node);

    // Delivered outbound mail: STARTTLS in and out, DKIM-signed, queued, delivered.
    let subject = unique("metrics");
    submit(
        node.ports.submission,
        &["carol@remote.test"],
        &subject,
        "Count me.",
    );
    mailpit
        .wait_for_subject(&subject, Duration::from_secs(30))
        .await;
    // A refused message (bare LF) on the MX port.
    let mut mx = RawTcp::connect(node.ports.mx).await;
    mx.expect("220").await;
    mx.cmd("EHLO client.test", "250").await;
    let reply = common::send_message(
        &mut mx,
        "sender@client.test",
        "bob@example.test",
        b"Subject: bare\nbare LF\r\n",
    )
    .await;
    assert!(reply.starts_with('5'), "{reply}");
    // Two sessions open, a third refused by maxConnectionsPerIp.
    let mut second = RawTcp::connect(node.ports.mx).await;
    second.expect("220").await;
    let open = metrics(&node);
    assert_eq!(
        counter(&open, "kubemail_smtp_sessions_active{listener=\"mx\"}"),
        2.0,
        "{open}"
    );
    let mut third = RawTcp::connect(node.ports.mx).await;
    third.expect("421").await;
    wait_until(Duration::from_secs(30), "the delivery counted", || {
        (counter(&metrics(&node), DELIVERED) >= 1.0).then_some(())
    });
    mx.cmd("QUIT", "221").await;
    second.cmd("QUIT", "221").await;
    let after = metrics(&node);

    // Every metric is there (HELP/TYPE are written even before a first sample).
    for name in [
        "connections",
        "connections_refused",
        "sessions_active",
        "replies",
        "messages_accepted",
        "messages_rejected",
        "message_bytes",
        "auth",
        "queue_publish",
        "queue_publish_seconds",
        "queue_messages",
        "queue_oldest_message_age_seconds",
        "nats_connected",
        "tls_handshakes",
        "dkim_signatures",
        "otel_spans_exported",
        "otel_spans_dropped",
        "delivery_recipients",
        "delivery_remote_recipients",
        "delivery_attempt_seconds",
        "delivery_retries",
        "delivery_dsns",
        "delivery_poison_messages",
        "delivery_malformed_entries",
    ] {
        assert!(
            after.contains(&format!("# TYPE kubemail_smtp_{name} ")),
            "kubemail_smtp_{name} is missing:\n{after}"
        );
    }
    // And each moved as the exchange says.
    let moved = |line: &str| counter(&after, line) - counter(&before, line);
    for (line, want) in [
        (
            "kubemail_smtp_messages_accepted_total{listener=\"submission\"}",
            1.0,
        ),
        (
            "kubemail_smtp_messages_rejected_total{listener=\"mx\",reason=\"bare_line_ending\"}",
            1.0,
        ),
        (
            "kubemail_smtp_connections_refused_total{listener=\"mx\",reason=\"max_connections_per_ip\"}",
            1.0,
        ),
        ("kubemail_smtp_connections_total{listener=\"mx\"}", 3.0),
        (
            "kubemail_smtp_replies_total{listener=\"mx\",class=\"4xx\"}",
            1.0,
        ),
        (
            "kubemail_smtp_replies_total{listener=\"mx\",class=\"5xx\"}",
            1.0,
        ),
        ("kubemail_smtp_queue_publish_total{result=\"ok\"}", 1.0),
        ("kubemail_smtp_queue_publish_seconds_count", 1.0),
        (
            "kubemail_smtp_tls_handshakes_total{side=\"server\",version=\"TLSv1.3\",result=\"ok\"}",
            1.0,
        ),
        (
            "kubemail_smtp_tls_handshakes_total{side=\"client\",version=\"TLSv1.3\",result=\"ok\"}",
            1.0,
        ),
        (
            "kubemail_smtp_dkim_signatures_total{domain=\"example.test\",algorithm=\"rsa-sha256\",result=\"signed\"}",
            1.0,
        ),
        (
            "kubemail_smtp_dkim_signatures_total{domain=\"example.test\",algorithm=\"ed25519-sha256\",result=\"signed\"}",
            1.0,
        ),
        (DELIVERED, 1.0),
        (
            "kubemail_smtp_delivery_remote_recipients_total{domain=\"example.test\",remote_domain=\"remote.test\",result=\"delivered\"}",
            1.0,
        ),
        (
            "kubemail_smtp_delivery_attempt_seconds_count{domain=\"example.test\"}",
            1.0,
        ),
        ("kubemail_smtp_auth_total{result=\"success\"}", 1.0),
    ] {
        assert_eq!(
            moved(line),
            want,
            "{line}\nbefore:\n{before}\nafter:\n{after}"
        );
    }
    assert!(moved("kubemail_smtp_replies_total{listener=\"submission\",class=\"2xx\"}") >= 5.0);
    assert!(moved("kubemail_smtp_message_bytes_total") > 0.0);
    let idle = counter(&before, "kubemail_smtp_sessions_active{listener=\"mx\"}");
    wait_until(Duration::from_secs(10), "the sessions to end", || {
        (counter(
            &metrics(&node),
            "kubemail_smtp_sessions_active{listener=\"mx\"}",
        ) == idle)
            .then_some(())
    });
    for line in [
        "kubemail_smtp_queue_messages{domain=\"example.test\"}",
        "kubemail_smtp_queue_oldest_message_age_seconds{domain=\"example.test\"}",
        "kubemail_smtp_nats_connected 1",
    ] {
        assert!(after.contains(line), "{line}:\n{after}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bounce_continues_the_trace_below_the_failed_attempt() {
    let endpoint = cluster_env("OTEL_EXPORTER_OTLP_ENDPOINT");
    let jaeger = cluster_env("JAEGER_API");
    let service = unique("kubemail-test-bounce");
    let nats = Nats::shared();
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    // The remote refuses every recipient; the sender's own inbound target takes the DSN.
    let remote = Sink::start(&["-f", "RCPT"]);
    let inbound = Sink::start(&[]);
    let node = Node::start_with_env(
        &nats.url(),
        true,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_SERVICE_NAME", &service),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
        |c| {
            configure(
                c,
                &Setup {
                    dns: &knot,
                    mx_port: remote.port,
                    inbound_port: Some(inbound.port),
                    allow_loopback: true,
                    dkim: false,
                    inbound_auth: None,
                },
            )
        },
    );
    let subject = unique("bounced");
    submit(
        node.ports.submission,
        &["carol@remote.test"],
        &subject,
        "No.",
    );
    wait_until(Duration::from_secs(30), "the DSN at the sender", || {
        inbound
            .transactions()
            .into_iter()
            .find(|t| t.contains(&subject))
    });
    // The service is this test's alone: its one transaction is the message.
    let url = format!("{jaeger}/api/traces?service={service}&operation=smtp.transaction&limit=5");
    let trace_id = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
        loop {
            let found = match reqwest::get(&url).await {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .ok()
                    .and_then(|v| v["data"][0]["traceID"].as_str().map(str::to_owned)),
                Err(_) => None,
            };
            if let Some(id) = found {
                break id;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "Jaeger has no transaction of service {service}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let trace = wait_for_trace(&jaeger, &trace_id, |t| {
        t.named("delivery.attempt")
            .iter()
            .any(|s| tag_str(s, "delivery.outcome") == "delivered")
    })
    .await;
    let ops = trace.operations();
    let attempts = trace.named("delivery.attempt");
    let failed = attempts
        .iter()
        .find(|a| tag_str(a, "delivery.outcome") == "failed")
        .unwrap_or_else(|| panic!("a failed attempt: {ops:?}"));
    assert_eq!(tag_str(failed, "delivery.bounce"), "true", "{failed}");
    let failed_id = failed["spanID"].as_str().expect("span id");
    let dsn = attempts
        .iter()
        .find(|a| tag_str(a, "delivery.outcome") == "delivered")
        .expect("the DSN's delivery");
    assert!(
        refers_to(dsn, "CHILD_OF", failed_id),
        "the DSN's delivery hangs below the attempt that failed: {dsn}"
    );
    assert!(
        trace
            .named("queue.publish")
            .iter()
            .any(|p| refers_to(p, "CHILD_OF", failed_id)),
        "the DSN's publish: {ops:?}"
    );
}
