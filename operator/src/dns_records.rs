//! The DNS records a MailDomain needs (MX, A/AAAA, SPF, DKIM, DMARC, MTA-STS, TLS-RPT), computed
//! from the spec and what the operator provisioned, and their three renderings: the list in
//! `status.dnsRecords`, an RFC 1035 zone-file fragment (with TXT data split into strings of at
//! most 255 octets, RFC 1035 3.3.14 / RFC 7208 3.3), and the endpoints of an external-dns
//! `DNSEndpoint`.
//!
//! Everything here is pure: the same inputs give the same records in the same order, so a
//! second reconcile writes nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::crd::mail_domain::{
    Alignment, DkimAlgorithm, DmarcPolicy, DmarcSpec, DnsRecord, MtaStsMode, SpfPolicy, SpfSpec,
};

/// RFC 1035 3.3: a character-string is at most 255 octets.
pub const MAX_TXT_STRING: usize = 255;
/// RFC 7208 4.6.4: at most 10 terms that cause DNS lookups.
pub const MAX_SPF_LOOKUPS: usize = 10;
/// Preference of our one MX record (any value works with a single MX; 10 is the convention).
const MX_PREFERENCE: u16 = 10;

/// A DKIM public key published in DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedKey {
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    /// Base64 of the DNS `p=` value: SubjectPublicKeyInfo DER for RSA, the raw 32-byte key
    /// for Ed25519 (RFC 8463 4.2).
    pub public_key: String,
}

/// MTA-STS settings after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtaSts {
    pub mode: MtaStsMode,
    pub max_age_seconds: u64,
}

/// Everything the records are computed from.
#[derive(Debug, Clone)]
pub struct DnsInputs<'a> {
    pub domain: &'a str,
    pub hostname: &'a str,
    pub ttl: i32,
    /// Load-balancer addresses of the nodes' Service (empty when unknown).
    pub addresses: &'a [IpAddr],
    pub spf: &'a SpfSpec,
    /// The `include:` a Relay asks for.
    pub relay_include: Option<&'a str>,
    pub dkim_keys: &'a [PublishedKey],
    pub dmarc: &'a DmarcSpec,
    pub mta_sts: Option<&'a MtaSts>,
    pub tls_rpt: Option<&'a str>,
}

/// The records, in a fixed order: MX, A, AAAA, SPF, DKIM (by selector), DMARC, MTA-STS
/// (the policy host's A/AAAA or CNAME, then the TXT record), TLS-RPT.
pub fn records(inputs: &DnsInputs<'_>) -> Vec<DnsRecord> {
    let apex = absolute(inputs.domain);
    let host = absolute(inputs.hostname);
    let rr = |name: &str, type_: &str, value: String| DnsRecord {
        name: name.to_owned(),
        type_: type_.to_owned(),
        ttl: inputs.ttl,
        value,
    };
    let mut out = vec![rr(&apex, "MX", format!("{MX_PREFERENCE} {host}"))];
    let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = inputs.addresses.iter().partition(|a| a.is_ipv4());
    out.extend(v4.iter().map(|a| rr(&host, "A", a.to_string())));
    out.extend(v6.iter().map(|a| rr(&host, "AAAA", a.to_string())));
    out.push(rr(&apex, "TXT", spf_value(inputs)));
    let mut keys: Vec<&PublishedKey> = inputs.dkim_keys.iter().collect();
    keys.sort_by(|a, b| a.selector.cmp(&b.selector));
    for key in keys {
        out.push(rr(
            &format!("{}._domainkey.{apex}", key.selector),
            "TXT",
            dkim_value(key),
        ));
    }
    out.push(rr(
        &format!("_dmarc.{apex}"),
        "TXT",
        dmarc_value(inputs.dmarc),
    ));
    if let Some(sts) = inputs.mta_sts {
        // The policy host (RFC 8461 3.3) is served by the nodes: their addresses, or the MX
        // host's name while the addresses are unknown.
        let policy_host = format!("mta-sts.{apex}");
        if inputs.addresses.is_empty() {
            out.push(rr(&policy_host, "CNAME", host.clone()));
        } else {
            out.extend(v4.iter().map(|a| rr(&policy_host, "A", a.to_string())));
            out.extend(v6.iter().map(|a| rr(&policy_host, "AAAA", a.to_string())));
        }
        let policy = mta_sts_policy(sts, inputs.hostname);
        out.push(rr(
            &format!("_mta-sts.{apex}"),
            "TXT",
            format!("v=STSv1; id={}", mta_sts_id(&policy)),
        ));
    }
    if let Some(rua) = inputs.tls_rpt {
        out.push(rr(
            &format!("_smtp._tls.{apex}"),
            "TXT",
            format!("v=TLSRPTv1; rua={}", normalise_uris(rua)),
        ));
    }
    out
}

/// The SPF record: our addresses (or `mx` while they are unknown), the spec's addresses, the
/// relay's include, the spec's includes, then `-all`/`~all`.
pub fn spf_value(inputs: &DnsInputs<'_>) -> String {
    let mut terms = vec!["v=spf1".to_owned()];
    for a in inputs.addresses {
        terms.push(match a {
            IpAddr::V4(v4) => format!("ip4:{v4}"),
            IpAddr::V6(v6) => format!("ip6:{v6}"),
        });
    }
    terms.extend(inputs.spf.ip4.iter().map(|a| format!("ip4:{a}")));
    terms.extend(inputs.spf.ip6.iter().map(|a| format!("ip6:{a}")));
    if inputs.addresses.is_empty() {
        // Without known addresses the MX host's own A/AAAA records stand in (one lookup).
        terms.push("mx".to_owned());
    }
    if let Some(relay) = inputs.relay_include {
        terms.push(format!("include:{relay}"));
    }
    for include in &inputs.spf.include {
        let term = format!("include:{include}");
        if !terms.contains(&term) {
            terms.push(term);
        }
    }
    terms.push(
        match inputs.spf.policy {
            SpfPolicy::Fail => "-all",
            SpfPolicy::SoftFail => "~all",
        }
        .to_owned(),
    );
    terms.join(" ")
}

/// Number of SPF terms that cost a DNS lookup at the first level (`include`, `a`, `mx`,
/// `ptr`, `exists`, `redirect`); nested includes add theirs on top.
pub fn spf_lookups(spf_value: &str) -> usize {
    spf_value
        .split_ascii_whitespace()
        .filter(|t| {
            let t = t.trim_start_matches(['+', '-', '~', '?']);
            let name = t.split([':', '/', '=']).next().unwrap_or(t);
            matches!(name, "include" | "a" | "mx" | "ptr" | "exists" | "redirect")
        })
        .count()
}

/// `v=DKIM1; k=<rsa|ed25519>; p=<key>` (RFC 6376 3.6.1, RFC 8463 4.2).
pub fn dkim_value(key: &PublishedKey) -> String {
    let k = match key.algorithm {
        DkimAlgorithm::RsaSha256 => "rsa",
        DkimAlgorithm::Ed25519Sha256 => "ed25519",
    };
    format!("v=DKIM1; k={k}; p={}", key.public_key)
}

/// The DMARC record (RFC 7489 6.3); alignment is always written, so it is a decision.
pub fn dmarc_value(dmarc: &DmarcSpec) -> String {
    let policy = |p: DmarcPolicy| match p {
        DmarcPolicy::None => "none",
        DmarcPolicy::Quarantine => "quarantine",
        DmarcPolicy::Reject => "reject",
    };
    let align = |a: Alignment| match a {
        Alignment::Relaxed => "r",
        Alignment::Strict => "s",
    };
    let mut tags = vec!["v=DMARC1".to_owned(), format!("p={}", policy(dmarc.policy))];
    if let Some(sp) = dmarc.subdomain_policy {
        tags.push(format!("sp={}", policy(sp)));
    }
    if let Some(rua) = &dmarc.rua {
        tags.push(format!("rua={}", normalise_uris(rua)));
    }
    if let Some(ruf) = &dmarc.ruf {
        tags.push(format!("ruf={}", normalise_uris(ruf)));
    }
    tags.push(format!("adkim={}", align(dmarc.adkim)));
    tags.push(format!("aspf={}", align(dmarc.aspf)));
    tags.join("; ")
}

/// The MTA-STS policy file (RFC 8461 3.2) served at
/// `https://mta-sts.<domain>/.well-known/mta-sts.txt`; CRLF line endings.
pub fn mta_sts_policy(sts: &MtaSts, hostname: &str) -> String {
    let mode = match sts.mode {
        MtaStsMode::Enforce => "enforce",
        MtaStsMode::Testing => "testing",
        MtaStsMode::None => "none",
    };
    format!(
        "version: STSv1\r\nmode: {mode}\r\nmx: {hostname}\r\nmax_age: {}\r\n",
        sts.max_age_seconds
    )
}

/// The policy id (RFC 8461 3.1: 1-32 alphanumerics) changes exactly when the policy does.
pub fn mta_sts_id(policy: &str) -> String {
    let digest = Sha256::digest(policy.as_bytes());
    // 20 hex characters (80 bits) are plenty to tell policies apart.
    digest.iter().take(10).fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// TXT data split into character-strings of at most 255 octets.
pub fn split_txt(value: &str) -> Vec<&[u8]> {
    value.as_bytes().chunks(MAX_TXT_STRING).collect()
}

/// An RFC 1035 zone-file fragment. Records whose names lie outside `domain` (a host name in
/// another zone) are listed as comments, since they belong to another zone file.
pub fn zone_fragment(domain: &str, source: &str, records: &[DnsRecord]) -> String {
    let apex = absolute(domain);
    let mut out = format!(
        "; DNS records for {domain}, computed by kubemail-operator from MailDomain {source}.\n\
         ; Publish them in the {domain} zone.\n$ORIGIN {apex}\n"
    );
    let mut foreign = Vec::new();
    for r in records {
        let line = format!("{}\t{}\tIN\t{}\t{}", r.name, r.ttl, r.type_, rdata(r));
        if in_zone(&r.name, &apex) {
            out.push_str(&line);
            out.push('\n');
        } else {
            foreign.push(line);
        }
    }
    if !foreign.is_empty() {
        out.push_str("; Outside this zone: publish these in the zone that holds them.\n");
        for line in foreign {
            out.push_str("; ");
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// The `spec.endpoints` of an external-dns `DNSEndpoint`: one endpoint per name and type.
pub fn dns_endpoints(records: &[DnsRecord]) -> Value {
    let mut grouped: BTreeMap<(String, String), (i32, Vec<String>)> = BTreeMap::new();
    let mut order = Vec::new();
    for r in records {
        let key = (r.name.trim_end_matches('.').to_owned(), r.type_.clone());
        let target = match r.type_.as_str() {
            // external-dns writes MX targets as "<preference> <host>" without the root dot.
            "MX" => r.value.trim_end_matches('.').to_owned(),
            _ => r.value.clone(),
        };
        let entry = grouped.entry(key.clone()).or_insert_with(|| {
            order.push(key.clone());
            (r.ttl, Vec::new())
        });
        entry.1.push(target);
    }
    let endpoints: Vec<Value> = order
        .into_iter()
        .filter_map(|key| {
            let (ttl, targets) = grouped.remove(&key)?;
            Some(json!({
                "dnsName": key.0,
                "recordType": key.1,
                "recordTTL": ttl,
                "targets": targets,
            }))
        })
        .collect();
    json!({ "endpoints": endpoints })
}

/// `name` with exactly one trailing dot.
pub fn absolute(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.'))
}

fn in_zone(name: &str, apex: &str) -> bool {
    name == apex || name.ends_with(&format!(".{apex}"))
}

fn rdata(r: &DnsRecord) -> String {
    if r.type_ != "TXT" {
        return r.value.clone();
    }
    split_txt(&r.value)
        .into_iter()
        .map(quote_character_string)
        .collect::<Vec<_>>()
        .join(" ")
}

/// RFC 1035 5.1 quoting: `"` and `\` escaped, anything not printable ASCII as `\DDD`.
fn quote_character_string(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('"');
    for &b in bytes {
        match b {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(char::from(b));
            }
            0x20..=0x7e => out.push(char::from(b)),
            _ => {
                let _ = write!(out, "\\{b:03}");
            }
        }
    }
    out.push('"');
    out
}

/// Report URIs as written in a record: comma separated, no blanks.
fn normalise_uris(uris: &str) -> String {
    uris.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spf() -> SpfSpec {
        SpfSpec {
            include: vec!["_spf.example.net".into()],
            ip4: vec!["198.51.100.0/24".into()],
            ip6: vec![],
            policy: SpfPolicy::Fail,
        }
    }

    fn inputs<'a>(
        addresses: &'a [IpAddr],
        spf: &'a SpfSpec,
        keys: &'a [PublishedKey],
        dmarc: &'a DmarcSpec,
        sts: Option<&'a MtaSts>,
    ) -> DnsInputs<'a> {
        DnsInputs {
            domain: "example.com",
            hostname: "mx.example.com",
            ttl: 3600,
            addresses,
            spf,
            relay_include: Some("sendgrid.net"),
            dkim_keys: keys,
            dmarc,
            mta_sts: sts,
            tls_rpt: Some("mailto:tls@example.com"),
        }
    }

    #[test]
    fn spf_lists_addresses_then_includes_then_all() {
        let spf = spf();
        let dmarc = DmarcSpec::default();
        let addrs = [
            "203.0.113.7".parse().unwrap(),
            "2001:db8::7".parse().unwrap(),
        ];
        let i = inputs(&addrs, &spf, &[], &dmarc, None);
        let v = spf_value(&i);
        assert_eq!(
            v,
            "v=spf1 ip4:203.0.113.7 ip6:2001:db8::7 ip4:198.51.100.0/24 include:sendgrid.net include:_spf.example.net -all"
        );
        assert_eq!(spf_lookups(&v), 2);
        let none = inputs(&[], &spf, &[], &dmarc, None);
        assert_eq!(
            spf_value(&none),
            "v=spf1 ip4:198.51.100.0/24 mx include:sendgrid.net include:_spf.example.net -all"
        );
        assert_eq!(spf_lookups(&spf_value(&none)), 3);
    }

    #[test]
    fn dmarc_writes_alignment_and_normalised_uris() {
        let dmarc = DmarcSpec {
            policy: DmarcPolicy::Quarantine,
            subdomain_policy: Some(DmarcPolicy::Reject),
            rua: Some("mailto:a@example.com, https://r.example.com/x".into()),
            ruf: None,
            adkim: Alignment::Strict,
            aspf: Alignment::Relaxed,
        };
        assert_eq!(
            dmarc_value(&dmarc),
            "v=DMARC1; p=quarantine; sp=reject; rua=mailto:a@example.com,https://r.example.com/x; adkim=s; aspf=r"
        );
    }

    #[test]
    fn long_txt_is_split_into_255_octet_strings_in_the_zone() {
        let long = "a".repeat(600);
        let r = DnsRecord {
            name: "x._domainkey.example.com.".into(),
            type_: "TXT".into(),
            ttl: 60,
            value: long,
        };
        let zone = zone_fragment("example.com", "ns/x", &[r]);
        let line = zone.lines().find(|l| l.contains("_domainkey")).unwrap();
        let strings: Vec<&str> = line.split('"').filter(|s| s.starts_with('a')).collect();
        assert_eq!(
            strings.iter().map(|s| s.len()).collect::<Vec<_>>(),
            [255, 255, 90]
        );
        assert_eq!(
            quote_character_string(b"a\"b\\c\x01"),
            "\"a\\\"b\\\\c\\001\""
        );
    }

    #[test]
    fn names_outside_the_zone_become_comments() {
        let spf = spf();
        let dmarc = DmarcSpec::default();
        let addrs = ["203.0.113.7".parse().unwrap()];
        let mut i = inputs(&addrs, &spf, &[], &dmarc, None);
        i.hostname = "mx.provider.net";
        let recs = records(&i);
        let zone = zone_fragment("example.com", "ns/x", &recs);
        assert!(
            zone.contains("; mx.provider.net.\t3600\tIN\tA\t203.0.113.7"),
            "{zone}"
        );
        assert!(
            zone.contains("\nexample.com.\t3600\tIN\tMX\t10 mx.provider.net.\n"),
            "{zone}"
        );
    }

    #[test]
    fn mta_sts_id_follows_the_policy() {
        let a = MtaSts {
            mode: MtaStsMode::Enforce,
            max_age_seconds: 604800,
        };
        let b = MtaSts {
            mode: MtaStsMode::Testing,
            max_age_seconds: 604800,
        };
        let pa = mta_sts_policy(&a, "mx.example.com");
        assert_eq!(
            pa,
            "version: STSv1\r\nmode: enforce\r\nmx: mx.example.com\r\nmax_age: 604800\r\n"
        );
        let id = mta_sts_id(&pa);
        assert_eq!(id.len(), 20);
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(id, mta_sts_id(&mta_sts_policy(&b, "mx.example.com")));
    }

    #[test]
    fn dns_endpoints_group_targets_by_name_and_type() {
        let recs = vec![
            DnsRecord {
                name: "mx.example.com.".into(),
                type_: "A".into(),
                ttl: 60,
                value: "192.0.2.1".into(),
            },
            DnsRecord {
                name: "mx.example.com.".into(),
                type_: "A".into(),
                ttl: 60,
                value: "192.0.2.2".into(),
            },
            DnsRecord {
                name: "example.com.".into(),
                type_: "MX".into(),
                ttl: 60,
                value: "10 mx.example.com.".into(),
            },
        ];
        let v = dns_endpoints(&recs);
        assert_eq!(
            v,
            json!({"endpoints": [
                {"dnsName": "mx.example.com", "recordType": "A", "recordTTL": 60, "targets": ["192.0.2.1", "192.0.2.2"]},
                {"dnsName": "example.com", "recordType": "MX", "recordTTL": 60, "targets": ["10 mx.example.com"]},
            ]})
        );
    }
}
