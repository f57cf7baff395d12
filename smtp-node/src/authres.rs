//! Authentication of mail arriving on the MX port: SPF (RFC 7208), DKIM (RFC 6376) and
//! DMARC (RFC 7489) with mail-auth, recorded in an `Authentication-Results` header
//! (RFC 8601) whose authserv-id is our host name, and optionally enforced.
//!
//! * The lookups use the node's configured resolver (the same hickory resolver as MX
//!   delivery), bounded by `inboundAuth.timeout` in total; when it runs out the header says
//!   `temperror` and the message is accepted.
//! * SPF is checked for the MAIL FROM identity (the HELO identity for the null sender).
//! * DMARC `enforce` refuses at the end of data, with `550 5.7.1`, a message that fails
//!   DMARC when the author domain's policy is `reject`. `quarantine` and `none` are only
//!   recorded (the node has no quarantine); so is everything in `record` mode.
//! * Receivers must remove `Authentication-Results` headers that claim to be from them
//!   (RFC 8601 5), or a sender could forge a pass; [`strip_forged`] does that for every
//!   message the node accepts, on every port, and for `ARC-Authentication-Results` too.
//! * The verdict also says whether the *envelope sender* is authenticated ([`SenderAuth`]:
//!   SPF pass for its domain, or a passing DKIM signature aligned with it): only such a
//!   sender ever gets a delivery status notification about inbound mail.
//!
//! Where the authserv-id is: RFC 8601 2.2 puts it first in the field value, after optional
//! CFWS (comments nest, may hold quoted pairs, and folding may split anything), as a token or
//! a quoted string, optionally followed by a version; an ARC field puts `i=<n>;` before it
//! (RFC 8617 4.1.1). mail-parser hands these values over as unparsed text, so the small
//! parser here reads that grammar, and errs on the side of removal: a field is ours when its
//! authserv-id is, or when our host name is any word before its first `;` (so that a
//! malformed comment or quote cannot hide it from us while a lenient reader downstream still
//! finds it). Removing a third party's field that mentions us costs nothing.

use std::net::IpAddr;
use std::ops::Range;

use kubemail_queue::SenderAuth;

use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dmarc::Policy;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult, MessageAuthenticator,
    SpfResult,
};

use crate::config::{DmarcMode, InboundAuthConfig};
use crate::message::header_section;
use crate::protocol::{EnhancedCode, Reply};

/// The result of checking one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The complete `Authentication-Results: ...\r\n` header field to prepend.
    pub header: String,
    /// `Some` when the message must be refused (DMARC enforcement).
    pub reject: Option<Reply>,
    /// `pass`, `fail`, `none`, `temperror`, `permerror`: for logs and metrics.
    pub dmarc: &'static str,
    /// How the envelope sender was authenticated (nothing when the checks timed out).
    pub sender_auth: SenderAuth,
}

/// Checks inbound mail.
pub struct InboundVerifier {
    authenticator: MessageAuthenticator,
    hostname: String,
    config: InboundAuthConfig,
}

/// What is known about the SMTP transaction of the message.
#[derive(Debug, Clone, Copy)]
pub struct Transaction<'a> {
    pub client_ip: IpAddr,
    pub helo: &'a str,
    /// The reverse path without brackets; empty for `<>`.
    pub mail_from: &'a str,
}

impl InboundVerifier {
    pub fn new(
        authenticator: MessageAuthenticator,
        hostname: &str,
        config: InboundAuthConfig,
    ) -> Self {
        Self {
            authenticator,
            hostname: hostname.to_owned(),
            config,
        }
    }

    /// Whether checks are enabled.
    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// Evaluates SPF, DKIM and DMARC for `message`. `body`, for a message whose body was not
    /// kept ([`crate::dkim::BodyHash`]): `message` is the header section, and these are the
    /// body hashes its signatures ask for, computed while the body streamed past.
    pub async fn verify(
        &self,
        message: &[u8],
        body: Option<&[crate::dkim::BodyHashValue]>,
        tx: Transaction<'_>,
    ) -> Verdict {
        match tokio::time::timeout(self.config.timeout.0, self.evaluate(message, body, tx)).await {
            Ok(v) => v,
            Err(_) => Verdict {
                header: format!(
                    "Authentication-Results: {};\r\n\tdkim=temperror (lookup timeout);\r\n\tspf=temperror (lookup timeout);\r\n\tdmarc=temperror (lookup timeout)\r\n",
                    self.hostname
                ),
                reject: None,
                dmarc: "temperror",
                sender_auth: SenderAuth::default(),
            },
        }
    }

    async fn evaluate(
        &self,
        message: &[u8],
        body: Option<&[crate::dkim::BodyHashValue]>,
        tx: Transaction<'_>,
    ) -> Verdict {
        let helo = if tx.helo.is_empty() {
            "unknown"
        } else {
            tx.helo
        };
        let Some(mut parsed) = AuthenticatedMessage::parse(message) else {
            return Verdict {
                header: format!(
                    "Authentication-Results: {}; none (unparsable message)\r\n",
                    self.hostname
                ),
                reject: None,
                dmarc: "none",
                sender_auth: SenderAuth::default(),
            };
        };
        if let Some(streamed) = body {
            // Each hash the signatures ask for is there; one missing (the header section
            // changed since) keeps the empty body's hash, which fails like a changed body.
            for (c, a, l, hash) in &mut parsed.body_hashes {
                if let Some((.., h)) = streamed
                    .iter()
                    .find(|(sc, sa, sl, _)| sc == c && sa == a && sl == l)
                {
                    hash.clone_from(h);
                }
            }
        }
        let dkim = self.authenticator.verify_dkim(&parsed).await;
        let spf = if tx.mail_from.is_empty() {
            self.authenticator
                .verify_spf(SpfParameters::verify_ehlo(
                    tx.client_ip,
                    helo,
                    &self.hostname,
                ))
                .await
        } else {
            self.authenticator
                .verify_spf(SpfParameters::verify_mail_from(
                    tx.client_ip,
                    helo,
                    &self.hostname,
                    tx.mail_from,
                ))
                .await
        };
        let mail_from_domain = tx.mail_from.rsplit_once('@').map_or(helo, |(_, d)| d);
        let dmarc = self
            .authenticator
            .verify_dmarc(DmarcParameters::new(&parsed, &dkim, mail_from_domain, &spf))
            .await;
        let results = AuthenticationResults::new(&self.hostname)
            .with_dkim_results(&dkim, parsed.from())
            .with_spf_mailfrom_result(&spf, tx.client_ip, tx.mail_from, helo)
            .with_dmarc_result(&dmarc);
        let failed = matches!(dmarc.result(), DmarcResult::Fail(_));
        let reject =
            (self.config.dmarc == DmarcMode::Enforce && failed && dmarc.policy() == Policy::Reject)
                .then(|| {
                    Reply::new(
                        550,
                        EnhancedCode(5, 7, 1),
                        format!(
                            "Message rejected: DMARC policy of {} is reject",
                            dmarc.domain()
                        ),
                    )
                });
        tracing::debug!(
            dkim = ?dkim.iter().map(|d| dkim_label(d.result())).collect::<Vec<_>>(),
            spf = spf_label(spf.result()),
            dmarc = dmarc_label(&dmarc.result()),
            "inbound authentication"
        );
        let mut header = results.to_header();
        if dkim.is_empty() {
            // RFC 8601 2.7.1: say "none" rather than nothing when there was no signature.
            let prefix = format!("Authentication-Results: {}", self.hostname);
            if header.starts_with(&prefix) {
                header.insert_str(prefix.len(), ";\r\n\tdkim=none (no signature)");
            }
        }
        let sender_domain = tx.mail_from.rsplit_once('@').map(|(_, d)| d);
        let sender_auth = SenderAuth {
            // SPF of MAIL FROM is about the sender's own domain; for `<>` it was the HELO's.
            spf: sender_domain.is_some() && spf.result() == SpfResult::Pass,
            dkim: sender_domain.is_some_and(|sender| {
                dkim.iter().any(|d| {
                    *d.result() == DkimResult::Pass
                        && d.signature().is_some_and(|sig| aligned(&sig.d, sender))
                })
            }),
        };
        Verdict {
            header,
            reject,
            dmarc: dmarc_label(&dmarc.result()),
            sender_auth,
        }
    }
}

/// Relaxed alignment of a DKIM signing domain with the sender's domain (RFC 7489 3.1.1),
/// without a public suffix list: the same domain, or one a subdomain of the other, the
/// signing domain having at least two labels.
fn aligned(signing: &str, sender: &str) -> bool {
    let norm = |d: &str| d.trim_end_matches('.').to_ascii_lowercase();
    let (signing, sender) = (norm(signing), norm(sender));
    if signing.is_empty() || !signing.contains('.') {
        return false;
    }
    let under = |child: &str, parent: &str| {
        child == parent
            || child
                .strip_suffix(parent)
                .is_some_and(|rest| rest.ends_with('.'))
    };
    under(&sender, &signing) || under(&signing, &sender)
}

/// Removes the `Authentication-Results` and `ARC-Authentication-Results` header fields that
/// claim `hostname` as their authserv-id from the header section of `message` (RFC 8601 5:
/// they would be forged claims of ours).
pub fn strip_forged(message: &[u8], hostname: &str) -> Vec<u8> {
    let forged = forged_fields(message, hostname);
    without(message, &forged)
}

/// [`strip_forged`], or `None` (and no copy) when no field claims to be ours, the common
/// case.
pub fn without_forged(message: &[u8], hostname: &str) -> Option<Vec<u8>> {
    let forged = forged_fields(message, hostname);
    (!forged.is_empty()).then(|| without(message, &forged))
}

fn without(message: &[u8], ranges: &[Range<usize>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len());
    let mut at = 0;
    for r in ranges {
        out.extend_from_slice(&message[at..r.start]);
        at = r.end;
    }
    out.extend_from_slice(&message[at..]);
    out
}

/// The byte ranges (whole fields, folded lines included) of the forged fields. The header
/// section is split as everywhere in the node: a message that starts with the blank line has
/// none, so nothing in a body is ever taken for a field.
fn forged_fields(message: &[u8], hostname: &str) -> Vec<Range<usize>> {
    let headers = header_section(message);
    let line_end = |from: usize| {
        memchr::memchr(b'\n', &headers[from..]).map_or(headers.len(), |i| from + i + 1)
    };
    let mut forged = Vec::new();
    let mut start = 0;
    while start < headers.len() {
        let mut end = line_end(start);
        while end < headers.len() && matches!(headers[end], b' ' | b'\t') {
            end = line_end(end);
        }
        if claims_authserv_id(&headers[start..end], hostname) {
            forged.push(start..end);
        }
        start = end;
    }
    forged
}

/// Whether `field` (one header field, possibly folded) is an `Authentication-Results` or
/// `ARC-Authentication-Results` field naming `hostname` as its authserv-id.
fn claims_authserv_id(field: &[u8], hostname: &str) -> bool {
    let Some(colon) = memchr::memchr(b':', field) else {
        return false;
    };
    let name = field[..colon].trim_ascii();
    let arc = name.eq_ignore_ascii_case(b"ARC-Authentication-Results");
    if !arc && !name.eq_ignore_ascii_case(b"Authentication-Results") {
        return false;
    }
    // Unfolding (RFC 5322 2.2.3) removes the line breaks; what is left is one line.
    let value: Vec<u8> = field[colon + 1..]
        .iter()
        .copied()
        .filter(|b| !matches!(b, b'\r' | b'\n'))
        .collect();
    let mut value = value.as_slice();
    if arc {
        // `i=<instance>;` comes first: the authserv-id follows the first `;` outside
        // comments and quotes.
        match first_separator(value) {
            Some(at) => value = &value[at + 1..],
            None => return false,
        }
    }
    let ours = |id: &[u8]| {
        let id = id.strip_suffix(b".").unwrap_or(id);
        id.eq_ignore_ascii_case(hostname.as_bytes())
    };
    if authserv_id(value).is_some_and(|id| ours(&id)) {
        return true;
    }
    // However the comments and quotes before it are read, a field that names us before
    // its first `;` is treated as ours.
    let head = &value[..memchr::memchr(b';', value).unwrap_or(value.len())];
    head.split(|b| matches!(b, b' ' | b'\t' | b'(' | b')' | b'"' | b'\\'))
        .any(ours)
}

/// The authserv-id of an `Authentication-Results` value: after CFWS, a token or a quoted
/// string (RFC 8601 2.2, RFC 2045 token). `None` when there is neither.
fn authserv_id(value: &[u8]) -> Option<Vec<u8>> {
    let rest = skip_cfws(value);
    match rest.first()? {
        b'"' => {
            let mut id = Vec::new();
            let mut i = 1;
            while i < rest.len() {
                match rest[i] {
                    b'\\' if i + 1 < rest.len() => {
                        id.push(rest[i + 1]);
                        i += 2;
                    }
                    b'"' => return Some(id),
                    b => {
                        id.push(b);
                        i += 1;
                    }
                }
            }
            None
        }
        _ => {
            let end = rest
                .iter()
                .position(|&b| b <= b' ' || b >= 0x7f || TSPECIALS.contains(&b))
                .unwrap_or(rest.len());
            (end > 0).then(|| rest[..end].to_vec())
        }
    }
}

/// RFC 2045 tspecials: what ends a token.
const TSPECIALS: &[u8] = b"()<>@,;:\\\"/[]?=";

/// `value` after leading white space and comments (which nest and may hold quoted pairs).
fn skip_cfws(value: &[u8]) -> &[u8] {
    let mut i = 0;
    let mut depth = 0usize;
    while i < value.len() {
        match value[i] {
            b'\\' if depth > 0 => i += 1,
            b'(' => depth += 1,
            b')' if depth > 0 => depth -= 1,
            b' ' | b'\t' => {}
            _ if depth > 0 => {}
            _ => break,
        }
        i += 1;
    }
    value.get(i..).unwrap_or(&[])
}

/// The position of the first `;` outside comments and quoted strings.
fn first_separator(value: &[u8]) -> Option<usize> {
    let mut depth = 0usize;
    let mut quoted = false;
    let mut i = 0;
    while i < value.len() {
        match value[i] {
            b'\\' if depth > 0 || quoted => i += 1,
            b'"' if depth == 0 => quoted = !quoted,
            b'(' if !quoted => depth += 1,
            b')' if !quoted && depth > 0 => depth -= 1,
            b';' if depth == 0 && !quoted => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

fn dkim_label(r: &DkimResult) -> &'static str {
    match r {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

fn spf_label(r: SpfResult) -> &'static str {
    match r {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

fn dmarc_label(r: &DmarcResult) -> &'static str {
    match r {
        DmarcResult::Pass => "pass",
        DmarcResult::Fail(_) => "fail",
        DmarcResult::TempError(_) => "temperror",
        DmarcResult::PermError(_) => "permerror",
        DmarcResult::None => "none",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn strips_our_authserv_id_in_every_form_rfc_8601_allows() {
        let ours = [
            "Authentication-Results: (x) mx.example.test; dmarc=pass",
            "Authentication-Results: (a (nested \\) comment) b)mx.example.test; dmarc=pass",
            "Authentication-Results:\r\n mx.example.test;\r\n\tdmarc=pass",
            "Authentication-Results:\r\n (folded\r\n comment)\r\n MX.Example.Test; spf=pass",
            "Authentication-Results: \"mx.example.test\"; dkim=pass",
            "Authentication-Results: \"mx.exa\\mple.test\"; dkim=pass",
            "Authentication-Results: mx.example.test 1; spf=pass",
            "Authentication-Results: mx.example.test. ; spf=pass",
            "Authentication-Results: mx.example.test; none",
            "AUTHENTICATION-RESULTS :mx.example.test;dmarc=pass",
            "Authentication-Results: (unclosed mx.example.test; dmarc=pass",
            "ARC-Authentication-Results: i=1; mx.example.test; dmarc=pass",
            "ARC-Authentication-Results: i=2 (c;) ;\r\n\t(x) \"mx.example.test\" 1; spf=pass",
        ];
        let others = [
            "Authentication-Results: other.test; spf=pass smtp.mailfrom=mx.example.test",
            "Authentication-Results: mx.example.test.evil; dmarc=pass",
            "Authentication-Results: amx.example.test; dmarc=pass",
            "ARC-Authentication-Results: i=1; other.test; dkim=pass header.d=mx.example.test",
            "X-Authentication-Results: mx.example.test; dmarc=pass",
            "Subject: Authentication-Results: mx.example.test",
        ];
        for field in ours {
            let msg = format!("Subject: a\r\n{field}\r\nTo: b@example.test\r\n\r\nbody\r\n");
            let out = String::from_utf8(strip_forged(msg.as_bytes(), "mx.example.test")).unwrap();
            assert_eq!(
                out, "Subject: a\r\nTo: b@example.test\r\n\r\nbody\r\n",
                "{field:?} must be removed"
            );
            assert_eq!(
                without_forged(msg.as_bytes(), "mx.example.test").as_deref(),
                Some(out.as_bytes())
            );
        }
        for field in others {
            let msg = format!("Subject: a\r\n{field}\r\n\r\nbody\r\n");
            assert_eq!(
                without_forged(msg.as_bytes(), "mx.example.test"),
                None,
                "{field:?} must stay"
            );
        }
    }

    #[test]
    fn alignment_of_the_signing_domain_with_the_sender() {
        assert!(aligned("example.test", "example.test"));
        assert!(aligned("Example.TEST.", "bounce.example.test"));
        assert!(aligned("mail.example.test", "example.test"));
        assert!(!aligned("example.test", "example.test.evil"));
        assert!(
            !aligned("test", "example.test"),
            "a single label never aligns"
        );
        assert!(!aligned("other.test", "example.test"));
        assert!(!aligned("", "example.test"));
    }

    #[test]
    fn strips_only_our_own_results() {
        let msg = b"Authentication-Results: mx.example.test; spf=pass\r\n\tdkim=pass\r\nAuthentication-Results: other.test; spf=fail\r\nauthentication-results:MX.EXAMPLE.TEST;dmarc=pass\r\nSubject: x\r\n\r\nAuthentication-Results: mx.example.test; body stays\r\n";
        let out = String::from_utf8(strip_forged(msg, "mx.example.test")).unwrap();
        assert_eq!(
            out,
            "Authentication-Results: other.test; spf=fail\r\nSubject: x\r\n\r\nAuthentication-Results: mx.example.test; body stays\r\n"
        );
    }

    #[tokio::test]
    async fn records_none_for_unsigned_mail_without_records() {
        // A resolver pointed at a closed port: every lookup fails quickly.
        let resolver = crate::dns::HickoryResolver::new(&crate::dns::DnsConfig {
            nameservers: vec!["127.0.0.1:9".parse().unwrap()],
            timeout: crate::config::HumanDuration(Duration::from_millis(200)),
            attempts: 1,
        })
        .unwrap();
        let v = InboundVerifier::new(
            resolver.authenticator(),
            "mx.example.test",
            InboundAuthConfig {
                dmarc: DmarcMode::Enforce,
                ..InboundAuthConfig::default()
            },
        );
        let verdict = v
            .verify(
                b"From: a@sender.test\r\nSubject: x\r\n\r\nhi\r\n",
                None,
                Transaction {
                    client_ip: "192.0.2.1".parse().unwrap(),
                    helo: "client.sender.test",
                    mail_from: "a@sender.test",
                },
            )
            .await;
        assert!(
            verdict
                .header
                .starts_with("Authentication-Results: mx.example.test;"),
            "{}",
            verdict.header
        );
        assert!(verdict.header.contains("dkim=none"), "{}", verdict.header);
        assert!(verdict.header.ends_with("\r\n"));
        assert!(
            verdict.reject.is_none(),
            "a DNS failure never rejects: {verdict:?}"
        );
        assert!(
            !verdict.sender_auth.verified(),
            "nothing passed: {verdict:?}"
        );
    }
}
