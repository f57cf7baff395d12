//! The DNS records of a built MailDomain, checked by an independent implementation: Python's
//! dnspython parses the zone fragment, and dkimpy signs with the generated private keys and
//! verifies against the published DKIM records (`tests/check_dns_records.py`).
//!
//! Needs a `python3` with dnspython and dkimpy on PATH (the venv of `e2e/tools/setup.sh`).

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kubemail_operator::certs;
use kubemail_operator::controller::mail_domain::build::{self, BuildConfig, Observed};
use kubemail_operator::controller::mail_domain::dereference::Dereferenced;
use kubemail_operator::controller::mail_domain::names::ZONE_KEY;
use kubemail_operator::controller::mail_domain::provision::{Provisioned, TlsMaterial};
use kubemail_operator::controller::mail_domain::validate::validate;
use kubemail_operator::crd::MailDomain;
use kubemail_operator::dkim;

/// The first `python3` on PATH that can import dnspython and dkimpy.
fn python() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("python3");
        if !candidate.is_file() {
            continue;
        }
        let ok = Command::new(&candidate)
            .args(["-c", "import dns.zone, dkim, nacl"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return candidate;
        }
    }
    panic!(
        "no python3 with dnspython, dkimpy and PyNaCl on PATH; run e2e/tools/setup.sh and put \
         its venv first on PATH (export PATH=$(ls -d ~/.cache/kubemail/venv-*/bin):$PATH)"
    );
}

fn check(spec: &str, addresses: &[&str], tamper: bool) -> (bool, String) {
    let now = 1_800_000_000;
    let md: MailDomain = serde_yaml::from_str(&format!(
        "apiVersion: kubemail.io/v1alpha1\nkind: MailDomain\nmetadata: {{name: example-com, namespace: mail, uid: uid-1}}\nspec:\n{spec}"
    ))
    .expect("MailDomain YAML");
    let v = validate(&md, &Dereferenced::default()).expect("valid spec");
    let keys = dkim::provision(None, &v.dkim, now).expect("DKIM keys");
    let ca = certs::new_ca(now).expect("CA");
    let leaf = certs::issue_leaf(
        &ca,
        &v.hostname,
        now,
        std::time::Duration::from_secs(86400 * 90),
    )
    .expect("leaf");
    let p = Provisioned {
        dkim: keys.clone(),
        tls: TlsMaterial::OperatorCa {
            leaf,
            ca_cert_pem: ca.cert_pem,
            issued: None,
        },
        users_file: None,
        username_key: None,
    };
    let observed = Observed {
        addresses: addresses
            .iter()
            .map(|a| a.parse().expect("address"))
            .collect(),
        external_dns: false,
    };
    let config = BuildConfig {
        node_image: "kubemail/smtp-node:test".into(),
        listen_host: "0.0.0.0".into(),
        bind_pod_ip: false,
        node_overlay: None,
        pod_defaults: Default::default(),
        otlp_endpoint: None,
        nats_url: "nats://127.0.0.1:4222".into(),
        nats_stream: "KUBEMAIL".into(),
        nats_subject_prefix: "kubemail.queue".into(),
        nats_replicas: 1,
        nats_auth: false,
        nats_tls: false,
        network_policy: None,
    };
    let children = build::build(&md, &v, &p, &observed, &config, now).expect("build");

    let dir = tempfile::tempdir().expect("temp dir");
    let zone = dir.path().join("zone");
    std::fs::write(
        &zone,
        &children.dns_config.data.as_ref().expect("data")[ZONE_KEY],
    )
    .expect("write zone");
    let records = dir.path().join("records.json");
    std::fs::write(
        &records,
        serde_json::to_vec(&children.dns_records).expect("json"),
    )
    .expect("write records");
    let keys_dir = dir.path().join("keys");
    std::fs::create_dir(&keys_dir).expect("keys dir");
    for k in &keys.keys {
        let pem = if tamper {
            // A key that does not belong to the published record.
            dkim::generate_key(k.record.algorithm)
                .expect("other key")
                .expose()
                .to_owned()
        } else {
            k.private_key.expose().to_owned()
        };
        std::fs::write(keys_dir.join(dkim::secret_key(&k.record.selector)), pem)
            .expect("write key");
    }

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check_dns_records.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(&zone)
        .arg(&v.domain)
        .arg(&records)
        .arg(&keys_dir)
        .output()
        .expect("run check_dns_records.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = format!(
        "{stdout}\n{stderr}\nzone:\n{}",
        std::fs::read_to_string(&zone).unwrap_or_default()
    );
    (out.status.success() && stdout.starts_with("ok:"), report)
}

const FULL: &str = "  domain: example.com
  spf: { include: [_spf.example.net, spf.protection.example.org], ip4: [198.51.100.0/24] }
  dmarc: { policy: reject, subdomainPolicy: quarantine, rua: 'mailto:dmarc@example.com, https://r.example.com/d', adkim: strict }
  mtaSts: { mode: testing, maxAge: 14d }
  tlsRpt: { rua: 'mailto:tls-reports@example.com' }
";

#[test]
fn full_domain_records_parse_and_dkim_keys_verify_with_dnspython_and_dkimpy() {
    let (ok, report) = check(FULL, &["203.0.113.7", "2001:db8::7"], false);
    assert!(ok, "the independent DNS check failed:\n{report}");
}

#[test]
fn minimal_domain_with_a_foreign_host_name_and_no_addresses() {
    let (ok, report) = check(
        "  domain: mail-test.example\n  hostname: mx1.provider.example.net\n  dkim: { selector: s2026, algorithms: [rsa-sha256] }\n",
        &[],
        false,
    );
    assert!(ok, "the independent DNS check failed:\n{report}");
}

#[test]
fn the_checker_notices_a_private_key_that_does_not_match_its_record() {
    let (ok, report) = check(FULL, &["203.0.113.7"], true);
    assert!(!ok, "a mismatched key must fail the check:\n{report}");
    assert!(report.contains("does not verify"), "{report}");
}
