//! The local real cluster's services answer as the rest of the suite expects: JetStream stores
//! and hands back a message, mailpit accepts SMTP and shows it over its API, jaeger accepts an
//! OTLP span and shows it over its query API. Run after `e2e/local-cluster up` (`make test`).

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use kubemail_e2e::hostile::smtp::Smtp;
use kubemail_e2e::local_env::LocalEnv;

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}{}{nanos}", std::process::id())
}

#[tokio::test]
async fn jetstream_publish_with_ack_is_consumed_back() {
    let env = LocalEnv::load().expect("local cluster env");
    let client = env.nats_connect().await.expect("connect to NATS");
    let js = jetstream::new(client);
    let name = unique("E2E_SMOKE_");
    let subject = format!("e2e.smoke.{name}");
    let s = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .expect("create stream");
    let ack = js
        .publish(subject.clone(), "hello jetstream".into())
        .await
        .expect("publish")
        .await
        .expect("publish ack");
    assert_eq!(ack.stream, name);
    let consumer = s
        .create_consumer(pull::Config {
            durable_name: Some("smoke".into()),
            ..Default::default()
        })
        .await
        .expect("create consumer");
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .expect("fetch");
    let msg = batch
        .next()
        .await
        .expect("one message within 5s")
        .expect("message");
    assert_eq!(&msg.payload[..], b"hello jetstream");
    msg.ack().await.expect("ack");
    js.delete_stream(&name).await.expect("delete stream");
}

#[tokio::test]
async fn mailpit_accepts_smtp_and_shows_the_message_in_its_api() {
    let env = LocalEnv::load().expect("local cluster env");
    let subject = unique("local-cluster smoke ");
    let addr = env.mailpit_smtp.parse().expect("MAILPIT_SMTP is host:port");
    let mut smtp = Smtp::connect(addr, "mailpit")
        .await
        .expect("connect to mailpit");
    smtp.greeting("220").await;
    smtp.expect("EHLO e2e.test", "250").await;
    let body =
        format!("Subject: {subject}\r\nFrom: smoke@e2e.test\r\nTo: carol@remote.test\r\n\r\nhello");
    let reply = smtp
        .send_mail("smoke@e2e.test", "carol@remote.test", &body)
        .await;
    assert!(
        reply.as_deref().is_some_and(|r| r.starts_with("250")),
        "mailpit refused the message: {reply:?}"
    );
    smtp.expect("QUIT", "221").await;

    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found: serde_json::Value = http
            .get(format!("{}/api/v1/search", env.mailpit_api))
            .query(&[("query", format!("subject:\"{subject}\""))])
            .send()
            .await
            .expect("mailpit search")
            .json()
            .await
            .expect("mailpit json");
        if found["messages_count"].as_u64() == Some(1) {
            assert_eq!(found["messages"][0]["Subject"], subject.as_str());
            assert_eq!(
                found["messages"][0]["To"][0]["Address"],
                "carol@remote.test"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "mailpit never showed {subject:?}: {found}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn jaeger_shows_a_span_sent_to_the_otlp_endpoint() {
    let env = LocalEnv::load().expect("local cluster env");
    let otlp_http = env
        .var("JAEGER_OTLP_HTTP")
        .expect("JAEGER_OTLP_HTTP in env")
        .to_string();
    let service = unique("e2e-smoke-");
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    // OTLP/HTTP JSON (opentelemetry-proto's JSON mapping): ids are hex strings.
    let payload = serde_json::json!({
        "resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
            "scopeSpans": [{
                "scope": {"name": "kubemail-e2e"},
                "spans": [{
                    "traceId": trace_id,
                    "spanId": "00f067aa0ba902b7",
                    "name": "smoke-span",
                    "kind": 1,
                    "startTimeUnixNano": (now - 1_000_000).to_string(),
                    "endTimeUnixNano": now.to_string(),
                }]
            }]
        }]
    });
    let http = reqwest::Client::new();
    let res = http
        .post(format!("{otlp_http}/v1/traces"))
        .json(&payload)
        .send()
        .await
        .expect("OTLP export");
    assert!(
        res.status().is_success(),
        "OTLP export refused: {}",
        res.status()
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let res = http
            .get(format!("{}/api/traces/{trace_id}", env.jaeger_api))
            .send()
            .await
            .expect("jaeger query");
        if res.status().is_success() {
            let body: serde_json::Value = res.json().await.expect("jaeger json");
            let spans = &body["data"][0]["spans"];
            if spans.as_array().is_some_and(|s| !s.is_empty()) {
                assert_eq!(spans[0]["operationName"], "smoke-span");
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "jaeger never showed trace {trace_id}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[test]
fn dns_server_serves_the_test_zones() {
    let env = LocalEnv::load().expect("local cluster env");
    let server = env
        .var("DNS_SERVER")
        .expect("DNS_SERVER in env")
        .to_string();
    let (host, port) = server.rsplit_once(':').expect("host:port");
    // dnspython (from e2e/tools/requirements.txt) as an independent resolver.
    let script = r#"
import sys, dns.resolver
r = dns.resolver.Resolver(configure=False)
r.nameservers = [sys.argv[1]]; r.port = int(sys.argv[2]); r.lifetime = 5
print(sorted(str(x) for x in r.resolve("remote.test", "MX")))
print(sorted(str(x) for x in r.resolve("mx.remote.test", "A")))
print(sorted(x.to_text() for x in r.resolve("_dmarc.example.test", "TXT")))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, host, port])
        .output()
        .expect("run python3 (the e2e venv must be on PATH)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dns query failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "['10 mx.remote.test.']");
    assert_eq!(lines[1], "['127.0.0.1']");
    assert!(lines[2].contains("v=DMARC1; p=reject"), "{}", lines[2]);
}
