//! The DNS check against a real authoritative server: Knot DNS on loopback serves the zone
//! fragment the operator writes for a domain (everything published), or that fragment with the
//! MX removed, an older DKIM key and a second SPF record (what a person gets wrong).
//!
//! Needs `/usr/sbin/knotd` (Debian package knot).

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

mod knot;

use std::net::IpAddr;
use std::time::Duration;

use knot::Knot;
use kubemail_operator::crd::mail_domain::{
    DkimAlgorithm, DmarcSpec, DnsRecord, MtaStsMode, SpfPolicy, SpfSpec,
};
use kubemail_operator::dns_check::resolve::{Resolver, ResolverSettings};
use kubemail_operator::dns_check::{self, Problem};
use kubemail_operator::dns_records::{self, DnsInputs, MtaSts, PublishedKey};

const DOMAIN: &str = "example.test";
/// Long enough to be split into several TXT strings, as a 2048-bit RSA key is.
fn key(fill: char) -> String {
    format!(
        "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA{}IDAQAB",
        fill.to_string().repeat(340)
    )
}

/// The records the operator computes for `example.test`.
fn expected() -> Vec<DnsRecord> {
    let spf = SpfSpec {
        include: vec![],
        ip4: vec!["198.51.100.0/24".into()],
        ip6: vec![],
        policy: SpfPolicy::Fail,
    };
    let keys = [PublishedKey {
        selector: "kubemail1".into(),
        algorithm: DkimAlgorithm::RsaSha256,
        public_key: key('n'),
    }];
    let dmarc = DmarcSpec::default();
    let sts = MtaSts {
        mode: MtaStsMode::Enforce,
        max_age_seconds: 86_400,
    };
    let addresses: [IpAddr; 1] = ["127.0.0.1".parse().unwrap()];
    dns_records::records(&DnsInputs {
        domain: DOMAIN,
        hostname: "mx.example.test",
        ttl: 60,
        addresses: &addresses,
        spf: &spf,
        relay_include: None,
        dkim_keys: &keys,
        dmarc: &dmarc,
        mta_sts: Some(&sts),
        tls_rpt: Some("mailto:tls@example.test"),
    })
}

/// The zone lines of the operator's zone fragment for `records` (without `$ORIGIN` and
/// comments, which the harness writes itself).
fn zone_lines(records: &[DnsRecord]) -> Vec<String> {
    dns_records::zone_fragment(DOMAIN, "mail/example-test", records)
        .lines()
        .filter(|l| !l.starts_with(';') && !l.starts_with('$'))
        .map(str::to_owned)
        .collect()
}

fn resolver(knot: &Knot) -> Resolver {
    Resolver::new(&ResolverSettings {
        nameservers: vec![knot.addr()],
        timeout: Duration::from_secs(2),
    })
    .unwrap()
}

async fn check(
    knot: &Knot,
    expected: &[DnsRecord],
) -> (Vec<dns_check::Finding>, dns_check::Verdict) {
    let resolver = resolver(knot);
    let answers = resolver.lookup_all(&dns_check::queries(expected)).await;
    let findings = dns_check::compare(expected, &answers);
    let verdict = dns_check::verdict(expected.len(), &findings, resolver.description());
    (findings, verdict)
}

#[tokio::test]
async fn the_operators_zone_fragment_published_as_is_is_published() {
    let expected = expected();
    let types: Vec<&str> = expected.iter().map(|r| r.type_.as_str()).collect();
    assert_eq!(types, ["MX", "A", "TXT", "TXT", "TXT", "A", "TXT", "TXT"]);
    let knot = Knot::start(DOMAIN, &zone_lines(&expected).join("\n"));
    let (findings, verdict) = check(&knot, &expected).await;
    assert_eq!(findings, [], "{}", verdict.message);
    assert!(verdict.published);
    assert_eq!(verdict.reason, "Published");
    assert_eq!(
        verdict.message,
        format!(
            "all 8 records are published as computed (looked up through 127.0.0.1:{})",
            knot.addr().port()
        )
    );
}

#[tokio::test]
async fn a_missing_mx_a_stale_dkim_key_and_a_second_spf_record_are_found() {
    let expected = expected();
    let mut stale = expected.clone();
    let dkim = stale
        .iter_mut()
        .find(|r| r.name.contains("_domainkey"))
        .unwrap();
    dkim.value = format!("v=DKIM1; k=rsa; p={}", key('o'));
    let mut lines: Vec<String> = zone_lines(&stale)
        .into_iter()
        .filter(|l| !l.contains("\tMX\t"))
        .collect();
    lines.push("example.test.\t60\tIN\tTXT\t\"v=spf1 include:_spf.old-provider.test ~all\"".into());
    let knot = Knot::start(DOMAIN, &lines.join("\n"));

    let (findings, verdict) = check(&knot, &expected).await;
    let got: Vec<(&str, &str, &str)> = findings
        .iter()
        .map(|f| (f.name.as_str(), f.type_.as_str(), f.problem.reason()))
        .collect();
    assert_eq!(
        got,
        [
            ("example.test.", "MX", "Missing"),
            ("example.test.", "TXT", "Conflicting"),
            ("kubemail1._domainkey.example.test.", "TXT", "Drifted"),
        ],
        "{}",
        verdict.message
    );
    let Problem::Conflicting { found } = &findings[1].problem else {
        panic!("{:?}", findings[1]);
    };
    // DNS returns an RRset in no particular order.
    let mut found = found.clone();
    found.sort();
    assert_eq!(
        found,
        [
            "v=spf1 include:_spf.old-provider.test ~all",
            expected[2].value.as_str()
        ]
    );
    assert!(!verdict.published);
    assert_eq!(verdict.reason, "Conflicting");
    assert_eq!(verdict.not_as_expected, 3);
    for needle in [
        "3 of 8 records not as expected",
        "example.test. MX is missing (publish \"10 mx.example.test.\")",
        "example.test. TXT has 2 records of this kind, which makes SPF fail with permerror (RFC 7208 4.5)",
        "kubemail1._domainkey.example.test. TXT is \"v=DKIM1; k=rsa; p=MIIB",
    ] {
        assert!(
            verdict.message.contains(needle),
            "{needle:?} in {}",
            verdict.message
        );
    }
    assert!(verdict.message.len() <= dns_check::MAX_MESSAGE);
}
