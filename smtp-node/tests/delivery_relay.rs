//! Smarthost delivery against a real relay (mailpit with STARTTLS required and SMTP AUTH):
//! a domain with a `relay` sends all its outbound mail through it, over verified TLS with
//! its credentials, and none to the recipients' MX; a relay whose certificate cannot be
//! verified is never used in plaintext or without verification: the mail waits.

mod common;
mod delivery_support;

use std::path::Path;
use std::time::Duration;

use common::{Nats, Node, unique};
use delivery_support::{
    Knot, Mailpit, Setup, Sink, configure, counter, example_zone, log, metrics, remote_zone,
    submit, wait_until,
};
use serde_json::json;

/// A test CA and a relay certificate for 127.0.0.1 signed by it; returns the CA file, the
/// certificate file and the key file.
fn relay_certificates(dir: &Path) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kubemail relay test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "relay.test".to_owned()])
        .expect("leaf params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf certificate");
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write PEM");
        path.display().to_string()
    };
    (
        write("ca.pem", ca.pem()),
        write("relay-cert.pem", leaf.pem()),
        write("relay-key.pem", leaf_key.serialize_pem()),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn outbound_mail_goes_through_the_relay_with_verified_starttls_and_auth() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = relay_certificates(dir.path());
    let auth_file = dir.path().join("relay-users");
    std::fs::write(&auth_file, "relayuser:relaypass\n").expect("auth file");
    std::fs::write(dir.path().join("username"), "relayuser\n").expect("username");
    std::fs::write(dir.path().join("password"), "relaypass\n").expect("password");
    let relay = Mailpit::start_with(&[
        "--smtp-tls-cert",
        &cert,
        "--smtp-tls-key",
        &key,
        "--smtp-require-starttls",
        "--smtp-auth-file",
        &auth_file.display().to_string(),
        "--tags-username",
    ]);
    // The recipients' MX: with a relay configured it must never be contacted.
    let mx = Sink::start(&[]);
    let knot = Knot::start(&[example_zone(), remote_zone("127.0.0.1")]);
    let with_relay = |c: &mut serde_json::Value, trust_ca: bool| {
        configure(
            c,
            &Setup {
                dns: &knot,
                mx_port: mx.port,
                inbound_port: None,
                allow_loopback: true,
                dkim: true,
                inbound_auth: None,
            },
        );
        c["domains"][0]["relay"] = json!({
            "name": "smarthost",
            "host": "127.0.0.1",
            "port": relay.smtp_port,
            "tls": "startTlsRequired",
            "auth": {
                "usernameFile": dir.path().join("username"),
                "passwordFile": dir.path().join("password"),
            },
            "messagesPerSecond": 5,
        });
        if trust_ca {
            c["delivery"]["tls"] = json!({ "extraCaFile": ca });
        }
    };

    let node = Node::start_with(&nats.url(), true, |c| with_relay(c, true));
    let subject = unique("relayed");
    submit(
        node.ports.submission,
        &["carol@remote.test"],
        &subject,
        "Via the smarthost.",
    );
    let (summary, _raw) = relay
        .wait_for_subject(&subject, Duration::from_secs(30))
        .await;
    let details = relay.details(summary["ID"].as_str().expect("ID")).await;
    assert_eq!(
        details["Username"], "relayuser",
        "AUTH with the configured credentials: {details}"
    );
    assert_eq!(
        mx.transactions().len(),
        0,
        "nothing goes to the MX when a relay is set"
    );
    assert!(
        log(&node).contains("tls=true"),
        "the relay session used TLS"
    );
    drop(node);

    // Without the CA the relay's certificate cannot be verified: no plaintext fallback,
    // no unverified session; the message is deferred.
    let untrusting = Node::start_with(&nats.url(), true, |c| with_relay(c, false));
    let subject = unique("unverified");
    submit(
        untrusting.ports.submission,
        &["carol@remote.test"],
        &subject,
        "Must wait.",
    );
    wait_until(Duration::from_secs(30), "a deferral", || {
        (counter(
            &metrics(&untrusting),
            "kubemail_smtp_delivery_recipients_total{domain=\"example.test\",result=\"deferred\"}",
        ) >= 1.0)
            .then_some(())
    });
    let text = log(&untrusting);
    assert!(text.contains("TLS handshake failed"), "{text}");
    assert_eq!(relay.count_subject(&subject).await, 0);
    assert_eq!(mx.transactions().len(), 0);
}
