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
//!   (RFC 8601 5), or a sender could forge a pass; [`strip_forged`] does that.

use std::net::IpAddr;

use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dmarc::Policy;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult, MessageAuthenticator,
    SpfResult,
};

use crate::config::{DmarcMode, InboundAuthConfig};
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

    /// Evaluates SPF, DKIM and DMARC for `message`.
    pub async fn verify(&self, message: &[u8], tx: Transaction<'_>) -> Verdict {
        match tokio::time::timeout(self.config.timeout.0, self.evaluate(message, tx)).await {
            Ok(v) => v,
            Err(_) => Verdict {
                header: format!(
                    "Authentication-Results: {};\r\n\tdkim=temperror (lookup timeout);\r\n\tspf=temperror (lookup timeout);\r\n\tdmarc=temperror (lookup timeout)\r\n",
                    self.hostname
                ),
                reject: None,
                dmarc: "temperror",
            },
        }
    }

    async fn evaluate(&self, message: &[u8], tx: Transaction<'_>) -> Verdict {
        let helo = if tx.helo.is_empty() {
            "unknown"
        } else {
            tx.helo
        };
        let Some(parsed) = AuthenticatedMessage::parse(message) else {
            return Verdict {
                header: format!(
                    "Authentication-Results: {}; none (unparsable message)\r\n",
                    self.hostname
                ),
                reject: None,
                dmarc: "none",
            };
        };
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
        Verdict {
            header,
            reject,
            dmarc: dmarc_label(&dmarc.result()),
        }
    }
}

/// Removes `Authentication-Results` header fields whose authserv-id is `hostname` from the
/// header section of `message` (RFC 8601 5: they would be forged claims of ours).
pub fn strip_forged(message: &[u8], hostname: &str) -> Vec<u8> {
    // The same header/body split as the rest of the session: a message that starts with the
    // blank line has no headers, so nothing in its body can be taken for one.
    let header_end = crate::message::header_section(message).len();
    let (headers, body) = message.split_at(header_end);
    let mut out = Vec::with_capacity(message.len());
    let mut skipping = false;
    for line in headers.split_inclusive(|&b| b == b'\n') {
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if !continuation {
            skipping = is_our_auth_results(line, hostname);
        }
        if !skipping {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(body);
    out
}

fn is_our_auth_results(line: &[u8], hostname: &str) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    if !line[..colon]
        .trim_ascii()
        .eq_ignore_ascii_case(b"Authentication-Results")
    {
        return false;
    }
    let value = String::from_utf8_lossy(&line[colon + 1..]);
    let id = value
        .trim_start()
        .split([';', ' ', '\t', '\r', '\n'])
        .next()
        .unwrap_or("");
    id.eq_ignore_ascii_case(hostname)
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
#[allow(clippy::unwrap_used)] // tests may unwrap (see notes/common.md)
mod tests {
    use std::time::Duration;

    use super::*;

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
    }
}
