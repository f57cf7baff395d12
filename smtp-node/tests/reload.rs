//! Config reload against the real binary and a real nats-server: a domain attached to the
//! config file of a running node is served within seconds (recipients, its own certificate by
//! SNI, a delivery consumer, a body bucket for its large messages), a session open across the
//! reload carries on to `250`, a detached domain stops being served, and a broken file
//! changes nothing.

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use common::{Nats, Node, Raw, RawTcp, http_get, send_message};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// The documented bound: `configReloadInterval` (1 s here) plus the load itself.
const SERVED_WITHIN: Duration = Duration::from_secs(5);

fn read_config(node: &Node) -> serde_json::Value {
    serde_yaml::from_str(&std::fs::read_to_string(&node.config_path).unwrap()).unwrap()
}

/// Replaces the config file in one rename, as a ConfigMap volume's `..data` swap does.
fn write_config(node: &Node, config: &serde_json::Value) {
    let tmp = node.dir.path().join("config.yaml.new");
    std::fs::write(&tmp, serde_yaml::to_string(config).unwrap()).unwrap();
    std::fs::rename(&tmp, &node.config_path).unwrap();
}

/// A fresh session's reply to `RCPT TO:<rcpt>` on the MX port.
async fn rcpt_reply(node: &Node, rcpt: &str) -> String {
    let mut c = RawTcp::connect(node.ports.mx).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd("MAIL FROM:<sender@elsewhere.test>", "250").await;
    c.send(format!("RCPT TO:<{rcpt}>\r\n").as_bytes()).await;
    let reply = c.reply().await;
    c.send(b"QUIT\r\n").await;
    reply
}

async fn wait_rcpt(node: &Node, rcpt: &str, code: &str) -> Duration {
    let start = Instant::now();
    loop {
        let reply = rcpt_reply(node, rcpt).await;
        if reply.starts_with(code) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < SERVED_WITHIN,
            "RCPT TO:<{rcpt}> still answers {reply:?} after {SERVED_WITHIN:?}; log:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a STARTTLS handshake that asks for `sni` and trusts only `root` succeeds.
async fn starttls_as(node: &Node, sni: &str, root: &Path) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(root).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let mut c = RawTcp::connect(node.ports.mx).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    c.cmd("STARTTLS", "220").await;
    let (tcp, _) = c.into_inner();
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    match tokio_rustls::TlsConnector::from(client)
        .connect(name, tcp)
        .await
    {
        Ok(tls) => {
            let mut c = Raw::new(tls);
            c.cmd("EHLO client.test", "250").await;
            true
        }
        Err(_) => false,
    }
}

/// Whether an entry `matches` is in the queue within 5 s. Delivery attempts entries (the
/// harness's inbound target is a closed port) and queues them again as deferred, and a read of
/// the stream can fall between the two, so one read is not enough.
async fn eventually_queued(node: &Node, matches: impl Fn(&common::QueuedEntry) -> bool) -> bool {
    for _ in 0..20 {
        if node.messages().await.iter().any(&matches) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

fn metric(node: &Node, name: &str) -> f64 {
    http_get(node.ports.admin, "/metrics")
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attaching_and_detaching_domains_reloads_without_touching_an_open_session() {
    let nats = Nats::shared();
    let node = Node::start_with(&nats.url(), true, |c| {
        c["configReloadInterval"] = "1s".into();
        // Pull loops run, so a new domain's consumer appears; the harness's inbound target
        // is a closed port, so entries only wait.
        c["delivery"] = serde_json::json!({ "enabled": true });
    });
    let cert = rcgen::generate_simple_self_signed(vec!["mx.new.test".to_owned()]).unwrap();
    let (cert_file, key_file) = (
        node.dir.path().join("new.crt"),
        node.dir.path().join("new.key"),
    );
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();

    // A session open before the reload, in the middle of a transaction.
    let mut open = RawTcp::connect(node.ports.mx).await;
    open.expect("220").await;
    open.cmd("EHLO client.test", "250").await;
    open.cmd("MAIL FROM:<sender@elsewhere.test>", "250").await;
    open.cmd("RCPT TO:<bob@example.test>", "250").await;

    assert!(
        rcpt_reply(&node, "carol@new.test").await.starts_with('5'),
        "not our domain yet"
    );
    assert!(!starttls_as(&node, "mx.new.test", &cert_file).await);

    // Attach new.test with its own certificate.
    // RCPT refuses a domain without an inbound target: the new one gets the first one's.
    let mut config = read_config(&node);
    let inbound = config["domains"][0]["inbound"].clone();
    assert!(
        inbound.is_object(),
        "the harness domain has an inbound target"
    );
    config["domains"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "name": "new.test",
            "catchAll": true,
            "inbound": inbound,
            "tls": { "hostname": "mx.new.test", "certFile": "new.crt", "keyFile": "new.key" },
        }));
    write_config(&node, &config);
    let took = wait_rcpt(&node, "carol@new.test", "250").await;
    eprintln!("new.test served {took:?} after the file changed");
    assert!(
        starttls_as(&node, "mx.new.test", &cert_file).await,
        "its certificate by SNI"
    );
    assert!(
        starttls_as(
            &node,
            "localhost",
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples/dev-cert.pem")
                .as_path()
        )
        .await,
        "others still get the default certificate"
    );
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let start = Instant::now();
    while js
        .get_consumer_from_stream::<consumer::pull::Config, _, _>(
            kubemail_queue::consumer_name("new.test"),
            node.stream.as_str(),
        )
        .await
        .is_err()
    {
        assert!(
            start.elapsed() < SERVED_WITHIN,
            "no delivery consumer for new.test; log:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A message too large to go inline goes to the added domain's own body bucket, which the
    // reload set up (until then the node answers 4xx, never loses it).
    let large = format!(
        "Subject: large for new\r\n\r\n{}",
        "0123456789abcdef\r\n".repeat(80_000)
    );
    let start = Instant::now();
    loop {
        let mut c = RawTcp::connect(node.ports.mx).await;
        c.expect("220").await;
        c.cmd("EHLO client.test", "250").await;
        let reply = send_message(
            &mut c,
            "sender@elsewhere.test",
            "carol@new.test",
            large.as_bytes(),
        )
        .await;
        if reply.starts_with("250") {
            break;
        }
        assert!(
            reply.starts_with('4') && start.elapsed() < SERVED_WITHIN,
            "a large message for new.test: {reply}; log:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        eventually_queued(&node, |m| m.header("Kubemail-Body-Ref").is_some_and(
            |r| r.starts_with(&kubemail_queue::body_bucket(&node.bucket, "new.test"))
        ) && m.body.len() > 1_000_000)
        .await,
        "the large message is queued with its body in new.test's bucket"
    );

    // The open session carries on, with the settings it started with.
    open.cmd("DATA", "354").await;
    open.send(b"Subject: across a reload\r\n\r\nstill here\r\n.\r\n")
        .await;
    let reply = open.reply().await;
    assert!(reply.starts_with("250"), "{reply}");
    open.cmd("QUIT", "221").await;
    assert!(
        eventually_queued(&node, |m| m.body_str().contains("still here")).await,
        "the message of the open session is queued"
    );

    // Detach example.test.
    let mut config = read_config(&node);
    config["domains"]
        .as_array_mut()
        .unwrap()
        .retain(|d| d["name"] != "example.test");
    write_config(&node, &config);
    wait_rcpt(&node, "bob@example.test", "5").await;
    assert!(rcpt_reply(&node, "carol@new.test").await.starts_with("250"));
    assert_eq!(metric(&node, "kubemail_smtp_config_reloads_total"), 2.0);

    // A broken file changes nothing; the next good one applies.
    std::fs::write(&node.config_path, "hostname: [not, a, config").unwrap();
    let start = Instant::now();
    while metric(&node, "kubemail_smtp_config_reload_failures_total") < 1.0 {
        assert!(start.elapsed() < SERVED_WITHIN, "log:\n{}", node.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(rcpt_reply(&node, "carol@new.test").await.starts_with("250"));
    let log = node.log();
    assert!(log.contains("config reloaded"), "{log}");
    assert!(log.contains("new.test"), "{log}");
}
