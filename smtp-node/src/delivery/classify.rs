//! Bounce classification: every 4xx/5xx reply (and every failure of our own, such as a DNS
//! or TLS problem) mapped to a [`BounceClass`], for metrics, events and the suppression
//! list.
//!
//! The order of the decision:
//! 1. the site's rules (`events.classification`), in order: a regular expression over the
//!    reply text, optionally limited to an enhanced status code prefix;
//! 2. the built-in text rules ([`TEXT_RULES`]): providers whose enhanced code is generic or
//!    misleading (Exchange Online's `5.1.10 RecipientNotFound`, Gmail's `4.2.1` rate limit,
//!    Yahoo's `554 delivery error: dd This user doesn't have a ... account` without any
//!    enhanced code, block list names under a plain `5.7.1`);
//! 3. the enhanced status code (RFC 3463 and the IANA registry) ([`by_status`]);
//! 4. the basic reply code: a `421` without anything more specific is the server shedding
//!    load, so `rate-limited`; everything else `other`.
//!
//! The corpus of real reply lines in `tests/data/bounce-replies.tsv` (each with its source)
//! is checked against this table in the tests below.

use std::sync::OnceLock;

use regex::{Regex, RegexBuilder};

use super::outcome::Diagnostic;
use crate::config::{BounceClass, ClassificationRule};
use crate::protocol::EnhancedCode;
use crate::protocol::client::status_of;

/// Built-in text rules: (pattern, class), tried in order, case-insensitive.
pub const TEXT_RULES: &[(&str, BounceClass)] = &[
    // TLS demands (a 421 for them is no load shedding).
    (
        r"TLS required|must issue a STARTTLS|STARTTLS (is )?required|encryption (is )?required|REQUIRETLS",
        BounceClass::TlsFailure,
    ),
    // Block lists and IP reputation, whatever the status code says.
    (
        r"spamhaus|spamcop|barracuda|block ?list|blacklist|\bbanned sending ip\b|\bRBL\b|dnsbl|listed (at|on|in)|\[TSS09\]|part of their network is on our block list|blocked using|\bIP\b.* is blocked\b|not authorized to send email directly|does not have a PTR record|poor reputation|low reputation|sender reputation",
        BounceClass::Reputation,
    ),
    // Rate limits and volume deferrals.
    (
        r"too many (connections|messages|concurrent|recipients per)|rate limit|rate-limit|receiving mail (too quickly|at a rate)|unusual rate|unexpected volume|\[TSS04\]|\[GL01\]|server busy|try again later|throttl|exceeded .*limit for|sending quota|too many emails",
        BounceClass::RateLimited,
    ),
    (
        r"domain not found|host not found|unknown domain|no mx (record|host)|name service error",
        BounceClass::DnsFailure,
    ),
    // Unknown users in the words of many servers (some without an enhanced code).
    (
        r"user unknown|unknown user|no such (user|mailbox|recipient)|recipient ?not ?found|RecipNotFound|does not exist|doesn't exist|invalid recipient|recipient address rejected: access denied|mailbox (not found|unavailable)|address (is )?(not valid|invalid)|unrouteable address|doesn't have a .* account|account (is )?(disabled|inactive)|inactive (email|user|account)",
        BounceClass::InvalidRecipient,
    ),
    (
        r"over ?quota|quota ?exceeded|mailbox (is )?full|insufficient storage for the user|exceeded (the )?storage",
        BounceClass::MailboxFull,
    ),
    (
        r"message (size )?(is )?too (big|large)|size exceeds|exceeds (the )?(maximum|fixed|size)|message size limits",
        BounceClass::MessageTooLarge,
    ),
    (
        r"spam|unsolicited|content rejected|policy|virus|phish|dmarc|spf|dkim|authentication (information|checks)|not accepted|relay access denied|greylist",
        BounceClass::PolicyBlock,
    ),
];

/// The class of an enhanced status code alone, when it says enough.
pub fn by_status(status: EnhancedCode) -> Option<BounceClass> {
    let EnhancedCode(_, subject, detail) = status;
    Some(match (subject, detail) {
        // RFC 7505 / RFC 3463: bad destination system, null MX, routing and DNS trouble.
        (1, 2) | (1, 10) | (4, 3) | (4, 4) => BounceClass::DnsFailure,
        (1, 1) | (1, 0) | (1, 3) | (1, 6) | (2, 1) => BounceClass::InvalidRecipient,
        (2, 2) => BounceClass::MailboxFull,
        (2, 3) | (3, 4) => BounceClass::MessageTooLarge,
        (4, 5) | (7, 28) => BounceClass::RateLimited,
        // Encryption needed, TLS failures, REQUIRETLS (RFC 8689).
        (7, 5) | (7, 10) | (7, 11) | (7, 30) => BounceClass::TlsFailure,
        (7, 25) | (7, 606) | (7, 708) => BounceClass::Reputation,
        (7, 1) | (7, 9) | (7, 26) | (7, 27) | (7, 23) | (7, 24) | (7, 7) => {
            BounceClass::PolicyBlock
        }
        _ => return None,
    })
}

/// Classifies replies and failures; built from the config's extra rules.
#[derive(Debug, Default)]
pub struct Classifier {
    extra: Vec<(Regex, Option<String>, BounceClass)>,
}

impl Classifier {
    /// A classifier with the site's rules before the built-in ones. Invalid patterns were
    /// refused by the config check; one that still fails to compile is skipped.
    pub fn new(rules: &[ClassificationRule]) -> Self {
        let extra = rules
            .iter()
            .filter_map(|r| {
                Regex::new(&r.pattern)
                    .inspect_err(|error| tracing::warn!(pattern = %r.pattern, %error, "skipping a classification rule"))
                    .ok()
                    .map(|re| (re, r.status.clone(), r.class))
            })
            .collect();
        Self { extra }
    }

    /// The class of a reply with basic `code` (when there was a reply), enhanced `status`
    /// and `text`.
    pub fn classify(&self, code: Option<u16>, status: EnhancedCode, text: &str) -> BounceClass {
        let status_text = format!("{}.{}.{}", status.0, status.1, status.2);
        for (re, prefix, class) in &self.extra {
            if prefix.as_deref().is_none_or(|p| status_text.starts_with(p)) && re.is_match(text) {
                return *class;
            }
        }
        for (re, class) in builtin() {
            if re.is_match(text) {
                return *class;
            }
        }
        if let Some(class) = by_status(status) {
            return class;
        }
        if code == Some(421) {
            return BounceClass::RateLimited;
        }
        BounceClass::Other
    }

    /// The class of a delivery diagnostic: its remote reply when there is one (an expired
    /// recipient keeps its last reply), else our own status and text.
    pub fn diagnostic(&self, d: &Diagnostic) -> BounceClass {
        match &d.reply {
            Some(reply) => {
                self.classify(Some(reply.code), status_of(reply), &reply.lines.join(" "))
            }
            None => self.classify(None, d.status, &d.text),
        }
    }
}

fn builtin() -> &'static [(Regex, BounceClass)] {
    static RULES: OnceLock<Vec<(Regex, BounceClass)>> = OnceLock::new();
    RULES.get_or_init(|| {
        TEXT_RULES
            .iter()
            .filter_map(|(pattern, class)| {
                RegexBuilder::new(pattern)
                    .case_insensitive(true)
                    .build()
                    .ok()
                    .map(|re| (re, *class))
            })
            .collect()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::client::parse_reply;

    /// Parses one reply line as the client would (`NNN d.d.d text` or `NNN text`).
    fn parse(line: &str) -> crate::protocol::Reply {
        let mut input = line.as_bytes().to_vec();
        input.extend_from_slice(b"\r\n");
        parse_reply(&input).unwrap().unwrap().0
    }

    fn class_of(c: &Classifier, line: &str) -> BounceClass {
        let reply = parse(line);
        c.classify(Some(reply.code), status_of(&reply), &reply.lines.join(" "))
    }

    #[test]
    fn every_built_in_rule_compiles() {
        assert_eq!(builtin().len(), TEXT_RULES.len());
    }

    /// The corpus: real reply lines of major providers and MTAs, with the class each must
    /// get and where the line was published.
    #[test]
    fn the_corpus_of_real_replies_is_classified() {
        let corpus = include_str!("../../tests/data/bounce-replies.tsv");
        let c = Classifier::default();
        let mut checked = 0;
        let mut wrong = Vec::new();
        for line in corpus.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split('\t').collect();
            assert_eq!(fields.len(), 3, "class, reply, source: {line}");
            let (expected, reply, source) = (fields[0], fields[1], fields[2]);
            assert!(!source.trim().is_empty(), "every line names its source");
            let got = class_of(&c, reply);
            if got.as_str() != expected {
                wrong.push(format!("{reply}\n  expected {expected}, got {got}"));
            }
            checked += 1;
        }
        assert!(checked >= 30, "the corpus has {checked} lines");
        assert!(wrong.is_empty(), "misclassified:\n{}", wrong.join("\n"));
        // Every class is represented.
        for class in BounceClass::ALL {
            assert!(
                corpus.lines().any(|l| l.starts_with(&format!("{class}\t"))),
                "no corpus line of class {class}"
            );
        }
    }

    #[test]
    fn site_rules_come_first_and_can_be_limited_to_a_status() {
        let c = Classifier::new(&[
            ClassificationRule {
                pattern: "(?i)frobnicated".into(),
                status: Some("5.7.".into()),
                class: BounceClass::Reputation,
            },
            ClassificationRule {
                pattern: "(?i)user unknown".into(),
                status: None,
                class: BounceClass::Other,
            },
        ]);
        assert_eq!(
            class_of(&c, "550 5.7.1 frobnicated"),
            BounceClass::Reputation
        );
        assert_eq!(
            class_of(&c, "550 5.1.1 frobnicated"),
            BounceClass::InvalidRecipient,
            "the status prefix does not match, so the built-in table decides"
        );
        assert_eq!(class_of(&c, "550 5.1.1 User unknown"), BounceClass::Other);
    }

    #[test]
    fn our_own_failures() {
        let c = Classifier::default();
        let d = Diagnostic::local(EnhancedCode(5, 1, 2), "example.invalid: no such domain");
        assert_eq!(c.diagnostic(&d), BounceClass::DnsFailure);
        let d = Diagnostic::local(EnhancedCode(4, 7, 5), "TLS handshake failed: bad cert");
        assert_eq!(c.diagnostic(&d), BounceClass::TlsFailure);
        let d = Diagnostic::local(EnhancedCode(4, 4, 1), "cannot connect to 192.0.2.1:25");
        assert_eq!(c.diagnostic(&d), BounceClass::Other);
        let d = Diagnostic::from_reply(parse("421 mx.r.test Service not available"), None);
        assert_eq!(c.diagnostic(&d), BounceClass::RateLimited);
    }
}
