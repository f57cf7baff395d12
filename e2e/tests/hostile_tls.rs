//! TLS scan of a running node with testssl.sh: implicit TLS (465) and
//! STARTTLS on submission (587), the real `smtp-node` binary on loopback with a certificate
//! chain from a test CA (rcgen). The suite fails when anything regresses: SSLv2/SSLv3/TLS 1.0/
//! TLS 1.1 offered, a weak cipher category (NULL, aNULL, EXPORT, LOW, 3DES/IDEA, obsolete CBC)
//! offered, a cipher without forward secrecy offered, an untrusted or broken chain, or a
//! finding of severity MEDIUM or higher.
//!
//! Bounded: in CI `-p -s -f -S -E` on 465 (protocols, cipher categories, forward secrecy,
//! certificate and chain, every cipher per protocol) and `-p -s -f -S` on 587 (the node has
//! one rustls configuration for all ports), both scans at once; the vulnerability battery
//! `-U` and `-E` on both ports under `HOSTILE_LONG=1`. `--nodns none` (no DNS traffic at
//! all), connect and openssl timeouts.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use kubemail_e2e::hostile::nats::{Nats, NatsOptions};
use kubemail_e2e::hostile::node::Node;
use kubemail_e2e::hostile::process::require_tool;
use kubemail_e2e::hostile::report::Case;
use kubemail_e2e::hostile::{long_run, scale};
use serde_json::{Value, json};

/// Writes a test CA and a leaf certificate (SAN localhost, 127.0.0.1) signed by it into
/// `dir`: `ca.pem`, `cert.pem` (leaf then CA: the chain the node serves), `key.pem`.
fn test_ca_chain(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kubemail hostile-suite test CA");
    ca_params.distinguished_name = dn;
    // A realistic lifetime: testssl rates a leaf valid for more than 398 days HIGH.
    let now = time::OffsetDateTime::now_utc();
    ca_params.not_before = now - time::Duration::days(1);
    ca_params.not_after = now + time::Duration::days(365);
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate().expect("leaf key");
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf params");
    leaf.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "localhost");
    leaf.distinguished_name = dn;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = now - time::Duration::days(1);
    leaf.not_after = now + time::Duration::days(90);
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).expect("leaf cert");

    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("ca.pem");
    std::fs::write(
        dir.join("cert.pem"),
        format!("{}{}", leaf_cert.pem(), ca_cert.pem()),
    )
    .expect("cert.pem");
    std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).expect("key.pem");
}

/// Runs testssl against `target`; returns the flat JSON findings.
fn testssl(
    case: &Case,
    target: &str,
    checks: &[&str],
    starttls: bool,
    ca: &Path,
    out: &Path,
) -> Vec<Value> {
    let binary = require_tool("testssl");
    let mut cmd = Command::new(binary);
    // How long testssl waits for a service banner (default 5 s, spent several times per
    // scan of the implicit-TLS port): the node's 220 comes at once, so 1 s is plenty.
    cmd.env("HEADER_MAXSLEEP", "1");
    cmd.args([
        "--quiet",
        "--color",
        "0",
        "--warnings",
        "off",
        "--nodns",
        "none",
    ])
    .args(["--connect-timeout", "10", "--openssl-timeout", "10"])
    .args(checks)
    .arg("--add-ca")
    .arg(ca)
    .arg("--jsonfile")
    .arg(out);
    if starttls {
        cmd.args(["-t", "smtp"]);
    }
    cmd.arg(target);
    case.note(format!(
        "sent: testssl {:?}",
        cmd.get_args().collect::<Vec<_>>()
    ));
    let started = Instant::now();
    let output = cmd.output().expect("run testssl");
    case.note(format!(
        "testssl exited with {} after {:.1}s",
        output.status,
        started.elapsed().as_secs_f64()
    ));
    let text = std::fs::read_to_string(out).unwrap_or_else(|e| {
        panic!(
            "testssl wrote no JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    serde_json::from_str::<Vec<Value>>(&text).expect("testssl JSON")
}

fn finding<'a>(findings: &'a [Value], id: &str) -> Option<&'a str> {
    findings
        .iter()
        .find(|f| f["id"] == id)
        .and_then(|f| f["finding"].as_str())
}

/// Checks the findings against the policy; returns the violations.
fn violations(findings: &[Value]) -> Vec<String> {
    let mut bad = Vec::new();
    let mut need = |id: &str, ok: &dyn Fn(&str) -> bool, what: &str| match finding(findings, id) {
        Some(f) if ok(f) => {}
        Some(f) => bad.push(format!("{id}: {f:?} ({what})")),
        None => bad.push(format!("{id}: missing from the scan ({what})")),
    };
    let not_offered = |f: &str| f.starts_with("not offered");
    let offered = |f: &str| f.starts_with("offered");
    for id in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        need(id, &not_offered, "must not be offered");
    }
    need("TLS1_2", &offered, "must be offered");
    need("TLS1_3", &offered, "must be offered");
    for id in [
        "cipherlist_NULL",
        "cipherlist_aNULL",
        "cipherlist_EXPORT",
        "cipherlist_LOW",
        "cipherlist_3DES_IDEA",
    ] {
        need(id, &not_offered, "weak cipher category");
    }
    need("cipherlist_STRONG", &offered, "AEAD with forward secrecy");
    // testssl 3.0 names the forward-secrecy check PFS and obsolete CBC ciphers AVERAGE;
    // 3.2 renamed them FS and OBSOLETED.
    let either = |a: &str, b: &str| finding(findings, a).or_else(|| finding(findings, b));
    match either("FS", "PFS") {
        Some(f) if f.starts_with("offered") => {}
        other => bad.push(format!(
            "FS/PFS: {other:?} (forward secrecy must be offered)"
        )),
    }
    match either("cipherlist_OBSOLETED", "cipherlist_AVERAGE") {
        Some(f) if f.starts_with("not offered") => {}
        other => bad.push(format!(
            "cipherlist_OBSOLETED/AVERAGE: {other:?} (obsolete CBC ciphers)"
        )),
    }
    // Every cipher testssl found (-E: ids cipher-tls1_2_x..., cipher-tls1_3_x...) must use an
    // ephemeral key exchange (ECDH/DH) or be TLS 1.3 (always ephemeral).
    for f in findings {
        let id = f["id"].as_str().unwrap_or("");
        if id.starts_with("cipher-tls1_2")
            || id.starts_with("cipher-tls1_1")
            || id.starts_with("cipher-tls1_x")
        {
            let text = f["finding"].as_str().unwrap_or("");
            if !(text.contains("ECDH") || text.contains(" DH ")) {
                bad.push(format!("{id}: {text:?} (no forward secrecy)"));
            }
        }
        if (id.starts_with("cipher-tls1_") || id.starts_with("cipher-ssl"))
            && !id.starts_with("cipher-tls1_2")
            && !id.starts_with("cipher-tls1_3")
        {
            bad.push(format!(
                "{id}: {:?} (cipher of a protocol below TLS 1.2)",
                f["finding"]
            ));
        }
    }
    for f in findings {
        let id = f["id"].as_str().unwrap_or("");
        if id.starts_with("cert_chain_of_trust") {
            let text = f["finding"].as_str().unwrap_or("");
            if !text.starts_with("passed") {
                bad.push(format!(
                    "{id}: {text:?} (chain must verify against the test CA)"
                ));
            }
        }
        let severity = f["severity"].as_str().unwrap_or("");
        // The test CA publishes no CRL or OCSP responder; that is the test PKI, not the
        // node's TLS configuration (the operator's CA or cert-manager's issuer decides it).
        if id == "cert_revocation" {
            continue;
        }
        if matches!(severity, "MEDIUM" | "HIGH" | "CRITICAL") {
            bad.push(format!("{id}: {severity} {:?}", f["finding"]));
        }
    }
    if !findings.iter().any(|f| {
        f["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("cert_chain_of_trust"))
    }) {
        bad.push("cert_chain_of_trust: missing from the scan".to_owned());
    }
    bad
}

fn summary(findings: &[Value]) -> String {
    let ids = [
        "SSLv2",
        "SSLv3",
        "TLS1",
        "TLS1_1",
        "TLS1_2",
        "TLS1_3",
        "cipherlist_NULL",
        "cipherlist_aNULL",
        "cipherlist_EXPORT",
        "cipherlist_LOW",
        "cipherlist_3DES_IDEA",
        "cipherlist_AVERAGE",
        "cipherlist_OBSOLETED",
        "cipherlist_STRONG",
        "PFS",
        "FS",
        "PFS_ciphers",
        "FS_ciphers",
        "PFS_ECDHE_curves",
        "FS_ECDHE_curves",
        "cert_keySize",
        "cert_signatureAlgorithm",
        "cert_chain_of_trust",
        "cert_validityPeriod",
    ];
    ids.iter()
        .filter_map(|id| finding(findings, id).map(|f| format!("{id}={f}")))
        .collect::<Vec<_>>()
        .join("; ")
}

#[test]
fn testssl_implicit_tls_and_starttls() {
    let case = Case::begin(
        "TLS-SCAN",
        "testssl.sh against 465 (implicit TLS) and 587 (STARTTLS) of a running node",
        "only TLS 1.2/1.3, no weak cipher category, forward secrecy only, chain trusted via the test CA, no finding >= MEDIUM",
    );
    let nats = Nats::single(NatsOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    test_ca_chain(dir.path());
    let certs = dir.path().to_owned();
    let node = Node::start(&nats.url(), |config, _| {
        config["tls"] = json!({
            "certFile": certs.join("cert.pem"),
            "keyFile": certs.join("key.pem"),
        });
    });
    // Both scans at once (they mostly wait on handshakes). The TLS configuration is the
    // node's one rustls config for every port, so CI checks each cipher (-E) on 465 only.
    let ca = dir.path().join("ca.pem");
    let full: Vec<&str> = if long_run() {
        vec!["-p", "-s", "-f", "-S", "-E", "-U"]
    } else {
        vec!["-p", "-s", "-f", "-S", "-E"]
    };
    let short: Vec<&str> = if long_run() {
        full.clone()
    } else {
        vec!["-p", "-s", "-f", "-S"]
    };
    let scans = [
        ("465", node.ports.implicit_tls, false, full),
        ("587", node.ports.submission, true, short),
    ];
    let results: Vec<(&str, Vec<Value>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = scans
            .iter()
            .map(|(label, addr, starttls, checks)| {
                let out = dir.path().join(format!("testssl-{label}.json"));
                let (case, ca) = (&case, &ca);
                scope.spawn(move || {
                    (
                        *label,
                        testssl(case, &addr.to_string(), checks, *starttls, ca, &out),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("testssl thread"))
            .collect()
    });
    let mut all_bad = Vec::new();
    for (label, findings) in &results {
        case.note(format!(
            "got ({label}, {} findings): {}",
            findings.len(),
            summary(findings)
        ));
        let bad = violations(findings);
        for b in &bad {
            case.note(format!("VIOLATION {label}: {b}"));
        }
        all_bad.extend(bad.into_iter().map(|b| format!("{label}: {b}")));
    }
    assert!(
        all_bad.is_empty(),
        "TLS policy violations:\n{}",
        all_bad.join("\n")
    );
    case.pass(format!(
        "465 and 587 pass ({})",
        scale(
            "CI: 465 -p -s -f -S -E, 587 -p -s -f -S",
            "long: both -p -s -f -S -E -U"
        )
    ));
}

/// The gate itself: a scan that shows a regression must fail the suite.
#[test]
fn tls_gate_fails_on_regressions() {
    let good: Vec<Value> = [
        ("SSLv2", "not offered", "OK"),
        ("SSLv3", "not offered", "OK"),
        ("TLS1", "not offered", "INFO"),
        ("TLS1_1", "not offered", "INFO"),
        ("TLS1_2", "offered", "OK"),
        ("TLS1_3", "offered with final", "OK"),
        ("cipherlist_NULL", "not offered", "OK"),
        ("cipherlist_aNULL", "not offered", "OK"),
        ("cipherlist_EXPORT", "not offered", "OK"),
        ("cipherlist_LOW", "not offered", "OK"),
        ("cipherlist_3DES_IDEA", "not offered", "INFO"),
        ("cipherlist_AVERAGE", "not offered", "INFO"),
        ("cipherlist_STRONG", "offered", "OK"),
        ("PFS", "offered", "OK"),
        (
            "cipher-tls1_2_xc02b",
            "TLS 1.2 xc02b ECDHE-ECDSA-AES128-GCM-SHA256 ECDH 253",
            "INFO",
        ),
        ("cert_chain_of_trust", "passed.", "OK"),
    ]
    .iter()
    .map(|(id, f, s)| json!({ "id": id, "finding": f, "severity": s }))
    .collect();
    assert!(violations(&good).is_empty(), "{:?}", violations(&good));
    let regressions = [
        ("TLS1", "offered", "LOW"),
        ("cipherlist_AVERAGE", "offered", "LOW"),
        (
            "cipher-tls1_2_x9c",
            "TLS 1.2 x9c AES128-GCM-SHA256 RSA AESGCM 128",
            "INFO",
        ),
        ("cert_chain_of_trust", "failed (self signed).", "CRITICAL"),
    ];
    for (id, finding, severity) in regressions {
        let mut scan = good.clone();
        scan.retain(|f| f["id"] != id);
        scan.push(json!({ "id": id, "finding": finding, "severity": severity }));
        assert!(
            !violations(&scan).is_empty(),
            "{id}={finding:?} passed the gate"
        );
    }
}
