//! Whether the DNS records a MailDomain should publish (its `status.dnsRecords`, computed by
//! [`crate::dns_records`]) are what DNS actually answers: the comparison behind the
//! `DnsPublished` condition.
//!
//! [`compare`] is pure: the expected records and the answers of one lookup per name and type
//! ([`queries`]) give the [`Finding`]s, each a record that is
//! * missing (no answer of its kind),
//! * drifted (an answer of its kind with other data: a stale DKIM key, a wrong MX, an old
//!   MTA-STS policy id), or
//! * conflicting (more than one record of a kind that must be unique at its name: two
//!   `v=spf1` TXT records make SPF fail with permerror, RFC 7208 4.5; likewise DMARC
//!   (RFC 7489 6.6.3), MTA-STS (RFC 8461 3.1), TLS-RPT (RFC 8460 3) and a DKIM selector).
//!
//! TXT answers are matched by kind (the `v=` tag of the expected value), so unrelated TXT
//! records at the same name (site verification tokens) are ignored. Tag-list records (DKIM,
//! DMARC, MTA-STS, TLS-RPT) match when every tag the operator writes has the same value, in any
//! order and spacing; SPF matches term by term, since the order of its mechanisms matters.
//! [`resolve`] does the lookups with hickory-resolver.

pub mod resolve;

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::crd::mail_domain::DnsRecord;

/// Condition type.
pub const DNS_PUBLISHED: &str = "DnsPublished";
/// Every record answers as computed.
pub const PUBLISHED: &str = "Published";
/// A record has no answer of its kind.
pub const MISSING: &str = "Missing";
/// A record answers with other data.
pub const DRIFTED: &str = "Drifted";
/// More than one record of a kind that must be unique.
pub const CONFLICTING: &str = "Conflicting";
/// A lookup failed (timeout, SERVFAIL, refused): nothing can be said about that record.
pub const RESOLVER_ERROR: &str = "ResolverError";
/// Longest condition message; the rest is counted, not listed (a DKIM key alone is ~400
/// characters, so values are shortened too).
pub const MAX_MESSAGE: usize = 1024;
/// Longest record value quoted in a message.
const MAX_VALUE: usize = 64;

/// The answers of one lookup per `(name, type)`: the records' data in presentation form
/// (MX `10 mx.example.com.`, a TXT record's strings concatenated), or why the lookup failed.
/// A name that does not exist (NXDOMAIN) is an empty answer.
pub type Answers = BTreeMap<Query, Result<Vec<String>, String>>;

/// One lookup: the absolute, lower-case name and the record type.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Query {
    pub name: String,
    pub type_: String,
}

/// A record that is not published as computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub name: String,
    pub type_: String,
    /// What should be published (several values, comma separated, for an address or MX set).
    pub expected: String,
    pub problem: Problem,
}

/// What is wrong with a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    Missing,
    /// DNS answers with `found` instead.
    Drifted {
        found: Vec<String>,
    },
    /// DNS holds all of `found`, of a kind that must be unique.
    Conflicting {
        found: Vec<String>,
    },
    ResolverError {
        error: String,
    },
}

impl Problem {
    /// The condition reason this problem gives.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => MISSING,
            Self::Drifted { .. } => DRIFTED,
            Self::Conflicting { .. } => CONFLICTING,
            Self::ResolverError { .. } => RESOLVER_ERROR,
        }
    }

    /// Which reason wins when several records are wrong: the one that breaks most.
    fn rank(&self) -> u8 {
        match self {
            Self::Conflicting { .. } => 3,
            Self::Drifted { .. } => 2,
            Self::Missing => 1,
            Self::ResolverError { .. } => 0,
        }
    }
}

/// The outcome of one check, as the condition shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub published: bool,
    pub reason: &'static str,
    pub message: String,
    /// Records not as expected (the metric).
    pub not_as_expected: usize,
}

/// The distinct lookups the records need, in the records' order.
pub fn queries(expected: &[DnsRecord]) -> Vec<Query> {
    let mut out: Vec<Query> = Vec::new();
    for r in expected {
        let q = query_of(r);
        if !out.contains(&q) {
            out.push(q);
        }
    }
    out
}

/// The records of `expected` that `answers` do not show as computed. Pure.
pub fn compare(expected: &[DnsRecord], answers: &Answers) -> Vec<Finding> {
    let mut findings = Vec::new();
    for q in queries(expected) {
        let group: Vec<&DnsRecord> = expected.iter().filter(|r| query_of(r) == q).collect();
        let found = match answers.get(&q) {
            Some(Ok(found)) => found,
            Some(Err(error)) => {
                findings.extend(group.iter().map(|r| Finding {
                    name: r.name.clone(),
                    type_: r.type_.clone(),
                    expected: r.value.clone(),
                    problem: Problem::ResolverError {
                        error: error.clone(),
                    },
                }));
                continue;
            }
            None => {
                findings.extend(group.iter().map(|r| Finding {
                    name: r.name.clone(),
                    type_: r.type_.clone(),
                    expected: r.value.clone(),
                    problem: Problem::ResolverError {
                        error: "not looked up".to_owned(),
                    },
                }));
                continue;
            }
        };
        if q.type_ == "TXT" {
            for r in group {
                if let Some(problem) = compare_txt(&r.value, found) {
                    findings.push(Finding {
                        name: r.name.clone(),
                        type_: r.type_.clone(),
                        expected: r.value.clone(),
                        problem,
                    });
                }
            }
        } else if let Some(problem) = compare_set(&q.type_, &group, found) {
            // An address or MX set is one answer: report it once.
            findings.push(Finding {
                name: group[0].name.clone(),
                type_: q.type_.clone(),
                expected: group
                    .iter()
                    .map(|r| r.value.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                problem,
            });
        }
    }
    findings
}

/// The condition for `findings` out of `total` records, checked through `resolver` (a
/// description such as `127.0.0.1:53` or `the system resolver`).
pub fn verdict(total: usize, findings: &[Finding], resolver: &str) -> Verdict {
    let Some(worst) = findings.iter().map(|f| &f.problem).max_by_key(|p| p.rank()) else {
        return Verdict {
            published: true,
            reason: PUBLISHED,
            message: format!(
                "all {total} records are published as computed (looked up through {resolver})"
            ),
            not_as_expected: 0,
        };
    };
    let mut message = format!(
        "{} of {total} records not as expected (looked up through {resolver}): ",
        findings.len()
    );
    for (i, f) in findings.iter().enumerate() {
        let part = describe(f);
        let separator = if i == 0 { "" } else { "; " };
        let rest = findings.len() - i;
        // Leave room for the "and N more" tail.
        if message.len() + separator.len() + part.len() > MAX_MESSAGE - 24 {
            message.push_str(&format!("; and {rest} more"));
            break;
        }
        message.push_str(separator);
        message.push_str(&part);
    }
    Verdict {
        published: false,
        reason: worst.reason(),
        message,
        not_as_expected: findings.len(),
    }
}

/// One finding, for people.
pub fn describe(f: &Finding) -> String {
    let what = format!("{} {}", f.name, f.type_);
    let expected = shorten(&f.expected);
    match &f.problem {
        Problem::Missing => format!("{what} is missing (publish {expected})"),
        Problem::Drifted { found } => {
            format!("{what} is {}, expected {expected}", display_values(found))
        }
        Problem::Conflicting { found } => {
            let why = if txt_kind(&f.expected) == TxtKind::Spf {
                ", which makes SPF fail with permerror (RFC 7208 4.5)"
            } else {
                ", which receivers treat as no record at all"
            };
            format!(
                "{what} has {} records of this kind{why}: keep only {expected} (found {})",
                found.len(),
                display_values(found)
            )
        }
        Problem::ResolverError { error } => format!("{what} could not be looked up: {error}"),
    }
}

fn query_of(r: &DnsRecord) -> Query {
    Query {
        name: absolute_lower(&r.name),
        type_: r.type_.to_ascii_uppercase(),
    }
}

/// MX, A, AAAA and CNAME: the answer must be exactly the expected set.
fn compare_set(type_: &str, group: &[&DnsRecord], found: &[String]) -> Option<Problem> {
    if found.is_empty() {
        return Some(Problem::Missing);
    }
    let mut want: Vec<String> = group.iter().map(|r| normalise(type_, &r.value)).collect();
    let mut have: Vec<String> = found.iter().map(|v| normalise(type_, v)).collect();
    want.sort();
    want.dedup();
    have.sort();
    have.dedup();
    (want != have).then(|| Problem::Drifted {
        found: found.to_vec(),
    })
}

fn normalise(type_: &str, value: &str) -> String {
    match type_ {
        "A" | "AAAA" => value
            .trim()
            .parse::<IpAddr>()
            .map_or_else(|_| value.trim().to_owned(), |ip| ip.to_string()),
        "MX" => {
            let mut parts = value.split_ascii_whitespace();
            let preference = parts.next().unwrap_or_default();
            let host = parts.next().unwrap_or_default();
            format!("{preference} {}", absolute_lower(host))
        }
        _ => absolute_lower(value.trim()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxtKind {
    Spf,
    Dkim,
    /// A tag list whose first tag is this `v=` value.
    Versioned(&'static str),
    Other,
}

fn txt_kind(value: &str) -> TxtKind {
    let first = first_tag(value);
    if is_spf(value) {
        TxtKind::Spf
    } else if first.eq_ignore_ascii_case("v=DKIM1") {
        TxtKind::Dkim
    } else if let Some(v) = ["v=DMARC1", "v=STSv1", "v=TLSRPTv1"]
        .into_iter()
        .find(|v| first.eq_ignore_ascii_case(v))
    {
        TxtKind::Versioned(v)
    } else {
        TxtKind::Other
    }
}

/// RFC 7208 4.5: exactly `v=spf1`, then a space or the end.
fn is_spf(value: &str) -> bool {
    let v = value.trim_start();
    v.len() >= 6
        && v[..6].eq_ignore_ascii_case("v=spf1")
        && v[6..].chars().next().is_none_or(|c| c == ' ')
}

fn first_tag(value: &str) -> String {
    value
        .split(';')
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

/// Whether a TXT answer is of `kind` (the candidates for one expected record).
fn is_kind(kind: TxtKind, answer: &str) -> bool {
    match kind {
        TxtKind::Spf => is_spf(answer),
        // `v=` is only recommended in a DKIM key record (RFC 6376 3.6.1): a `p=` tag is enough.
        TxtKind::Dkim => {
            txt_kind(answer) == TxtKind::Dkim
                || (txt_kind(answer) == TxtKind::Other && tags(answer).contains_key("p"))
        }
        TxtKind::Versioned(v) => first_tag(answer).eq_ignore_ascii_case(v),
        TxtKind::Other => true,
    }
}

fn compare_txt(expected: &str, found: &[String]) -> Option<Problem> {
    let kind = txt_kind(expected);
    if kind == TxtKind::Other {
        return (!found.iter().any(|f| f == expected)).then_some(Problem::Missing);
    }
    let candidates: Vec<String> = found.iter().filter(|f| is_kind(kind, f)).cloned().collect();
    match candidates.as_slice() {
        [] => Some(Problem::Missing),
        [one] => (!txt_matches(kind, expected, one)).then(|| Problem::Drifted {
            found: candidates.clone(),
        }),
        _ => Some(Problem::Conflicting { found: candidates }),
    }
}

fn txt_matches(kind: TxtKind, expected: &str, found: &str) -> bool {
    match kind {
        TxtKind::Spf => {
            let terms = |s: &str| -> Vec<String> {
                s.split_ascii_whitespace()
                    .map(str::to_ascii_lowercase)
                    .collect()
            };
            terms(expected) == terms(found)
        }
        TxtKind::Other => expected == found,
        TxtKind::Dkim | TxtKind::Versioned(_) => {
            let want = tags(expected);
            let mut have = tags(found);
            if kind == TxtKind::Dkim {
                // RFC 6376 3.6.1: k= defaults to rsa.
                have.entry("k".to_owned())
                    .or_insert_with(|| "rsa".to_owned());
            }
            want.iter().all(|(tag, value)| {
                // RFC 6376 3.6.1: a key record's v= is optional.
                if tag == "v" && kind == TxtKind::Dkim {
                    return true;
                }
                have.get(tag).is_some_and(|v| {
                    // Base64 key data is case-sensitive; policies and URIs are not.
                    if tag == "p" && kind == TxtKind::Dkim {
                        v == value
                    } else {
                        v.eq_ignore_ascii_case(value)
                    }
                })
            })
        }
    }
}

/// `tag=value; ...` with lower-case tags and values without whitespace (RFC 6376 3.2 allows
/// folding whitespace anywhere in a value such as a base64 key).
fn tags(value: &str) -> BTreeMap<String, String> {
    value
        .split(';')
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_ascii_lowercase(),
                v.chars().filter(|c| !c.is_whitespace()).collect(),
            )
        })
        .collect()
}

fn absolute_lower(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.').to_ascii_lowercase())
}

fn display_values(values: &[String]) -> String {
    values
        .iter()
        .map(|v| shorten(v))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A value quoted in a message: long ones keep their start and end (where DKIM keys differ
/// is anywhere, and the end shows it as well as the start).
fn shorten(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    if chars.len() <= MAX_VALUE {
        return format!("\"{value}\"");
    }
    let head: String = chars[..MAX_VALUE - 16].iter().collect();
    let tail: String = chars[chars.len() - 12..].iter().collect();
    format!("\"{head}…{tail}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rr(name: &str, type_: &str, value: &str) -> DnsRecord {
        DnsRecord {
            name: name.to_owned(),
            type_: type_.to_owned(),
            ttl: 3600,
            value: value.to_owned(),
        }
    }

    const KEY: &str = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAnewkeynewkeynewkeyAQAB";
    const OLD_KEY: &str = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAoldkeyoldkeyoldkeyAQAB";

    fn expected() -> Vec<DnsRecord> {
        vec![
            rr("example.com.", "MX", "10 mx.example.com."),
            rr("mx.example.com.", "A", "203.0.113.7"),
            rr("example.com.", "TXT", "v=spf1 ip4:203.0.113.7 -all"),
            rr(
                "kubemail1._domainkey.example.com.",
                "TXT",
                &format!("v=DKIM1; k=rsa; p={KEY}"),
            ),
            rr(
                "_dmarc.example.com.",
                "TXT",
                "v=DMARC1; p=quarantine; rua=mailto:d@example.com; adkim=r; aspf=r",
            ),
            rr("mta-sts.example.com.", "CNAME", "mx.example.com."),
            rr(
                "_mta-sts.example.com.",
                "TXT",
                "v=STSv1; id=0123456789abcdef0123",
            ),
            rr(
                "_smtp._tls.example.com.",
                "TXT",
                "v=TLSRPTv1; rua=mailto:tls@example.com",
            ),
        ]
    }

    /// What a correct zone answers, in the forms people publish (other order, spacing, case,
    /// an unrelated TXT record, a DKIM key split over strings with blanks).
    fn published() -> Answers {
        let q = |name: &str, type_: &str| Query {
            name: name.to_owned(),
            type_: type_.to_owned(),
        };
        let ok = |v: &[&str]| Ok(v.iter().map(|s| (*s).to_owned()).collect());
        Answers::from([
            (q("example.com.", "MX"), ok(&["10 MX.Example.com."])),
            (q("mx.example.com.", "A"), ok(&["203.0.113.7"])),
            (
                q("example.com.", "TXT"),
                ok(&[
                    "google-site-verification=abc",
                    "v=spf1  ip4:203.0.113.7 -all",
                ]),
            ),
            (
                q("kubemail1._domainkey.example.com.", "TXT"),
                ok(&[&format!("p={} {}", &KEY[..30], &KEY[30..])]),
            ),
            (
                q("_dmarc.example.com.", "TXT"),
                ok(&["v=DMARC1;aspf=r; adkim=r; p=Quarantine; rua=mailto:d@example.com"]),
            ),
            (q("mta-sts.example.com.", "CNAME"), ok(&["mx.example.com."])),
            (
                q("_mta-sts.example.com.", "TXT"),
                ok(&["v=STSv1; id=0123456789abcdef0123;"]),
            ),
            (
                q("_smtp._tls.example.com.", "TXT"),
                ok(&["v=TLSRPTv1; rua=mailto:tls@example.com"]),
            ),
        ])
    }

    fn set(answers: &mut Answers, name: &str, type_: &str, values: Result<Vec<&str>, &str>) {
        answers.insert(
            Query {
                name: name.to_owned(),
                type_: type_.to_owned(),
            },
            values
                .map(|v| v.into_iter().map(str::to_owned).collect())
                .map_err(str::to_owned),
        );
    }

    #[test]
    fn records_published_in_any_form_are_published() {
        let expected = expected();
        assert_eq!(queries(&expected).len(), 8);
        let findings = compare(&expected, &published());
        assert_eq!(findings, []);
        let v = verdict(expected.len(), &findings, "127.0.0.1:53");
        assert!(v.published);
        assert_eq!(v.reason, PUBLISHED);
        assert_eq!(
            v.message,
            "all 8 records are published as computed (looked up through 127.0.0.1:53)"
        );
    }

    #[test]
    fn missing_stale_and_doubled_records_are_named() {
        let expected = expected();
        let mut answers = published();
        set(&mut answers, "example.com.", "MX", Ok(vec![]));
        set(
            &mut answers,
            "kubemail1._domainkey.example.com.",
            "TXT",
            Ok(vec![&format!("v=DKIM1; k=rsa; p={OLD_KEY}")]),
        );
        set(
            &mut answers,
            "example.com.",
            "TXT",
            Ok(vec![
                "v=spf1 ip4:203.0.113.7 -all",
                "v=spf1 include:_spf.old.example -all",
            ]),
        );
        let findings = compare(&expected, &answers);
        let got: Vec<(&str, &str, &'static str)> = findings
            .iter()
            .map(|f| (f.name.as_str(), f.type_.as_str(), f.problem.reason()))
            .collect();
        assert_eq!(
            got,
            [
                ("example.com.", "MX", MISSING),
                ("example.com.", "TXT", CONFLICTING),
                ("kubemail1._domainkey.example.com.", "TXT", DRIFTED),
            ]
        );
        let v = verdict(expected.len(), &findings, "the system resolver");
        assert!(!v.published);
        assert_eq!(v.reason, CONFLICTING, "a second SPF record breaks SPF");
        assert_eq!(v.not_as_expected, 3);
        assert!(
            v.message.starts_with(
                "3 of 8 records not as expected (looked up through the system resolver): \
                 example.com. MX is missing (publish \"10 mx.example.com.\")"
            ),
            "{}",
            v.message
        );
        assert!(
            v.message.contains("example.com. TXT has 2 records of this kind, which makes SPF fail with permerror (RFC 7208 4.5): keep only \"v=spf1 ip4:203.0.113.7 -all\""),
            "{}",
            v.message
        );
        assert!(
            v.message
                .contains("kubemail1._domainkey.example.com. TXT is \"v=DKIM1; k=rsa; p=MIIB")
                && v.message.contains("keyAQAB\", expected \"v=DKIM1"),
            "{}",
            v.message
        );
    }

    #[test]
    fn wrong_mx_extra_address_and_old_policy_id_drift() {
        let expected = expected();
        let mut answers = published();
        set(
            &mut answers,
            "example.com.",
            "MX",
            Ok(vec!["10 mx.example.com.", "5 old-mx.example.net."]),
        );
        set(
            &mut answers,
            "mx.example.com.",
            "A",
            Ok(vec!["198.51.100.1"]),
        );
        set(
            &mut answers,
            "_mta-sts.example.com.",
            "TXT",
            Ok(vec!["v=STSv1; id=oldpolicy"]),
        );
        set(
            &mut answers,
            "_dmarc.example.com.",
            "TXT",
            Ok(vec![
                "v=DMARC1; p=none; rua=mailto:d@example.com; adkim=r; aspf=r",
            ]),
        );
        let findings = compare(&expected, &answers);
        assert!(
            findings
                .iter()
                .all(|f| matches!(f.problem, Problem::Drifted { .. })),
            "{findings:?}"
        );
        let names: Vec<&str> = findings.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "example.com.",
                "mx.example.com.",
                "_dmarc.example.com.",
                "_mta-sts.example.com."
            ]
        );
        assert_eq!(
            describe(&findings[1]),
            "mx.example.com. A is \"198.51.100.1\", expected \"203.0.113.7\""
        );
    }

    #[test]
    fn lookup_failures_and_unrelated_txt_records_are_told_apart() {
        let expected = expected();
        let mut answers = published();
        set(
            &mut answers,
            "_smtp._tls.example.com.",
            "TXT",
            Err("request timed out"),
        );
        // Only unrelated TXT at the apex: the SPF record is missing, not drifted.
        set(
            &mut answers,
            "example.com.",
            "TXT",
            Ok(vec!["google-site-verification=abc", "v=spf10 nonsense"]),
        );
        let findings = compare(&expected, &answers);
        assert_eq!(findings[0].problem, Problem::Missing);
        assert_eq!(
            findings[1].problem,
            Problem::ResolverError {
                error: "request timed out".into()
            }
        );
        assert_eq!(verdict(8, &findings, "x").reason, MISSING);
        assert_eq!(verdict(8, &findings[1..], "x").reason, RESOLVER_ERROR);
    }

    #[test]
    fn the_message_is_bounded() {
        let expected: Vec<DnsRecord> = (0..60)
            .map(|i| {
                rr(
                    &format!("s{i}._domainkey.example.com."),
                    "TXT",
                    &format!("v=DKIM1; k=rsa; p={KEY}{i}"),
                )
            })
            .collect();
        let findings = compare(&expected, &Answers::new());
        assert_eq!(findings.len(), 60);
        let v = verdict(60, &findings, "x");
        assert!(v.message.len() <= MAX_MESSAGE, "{}", v.message.len());
        assert!(v.message.ends_with(" more"), "{}", v.message);
        assert_eq!(v.not_as_expected, 60);
    }
}
