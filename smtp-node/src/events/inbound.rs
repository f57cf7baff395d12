//! Reports about our mail that arrive for our domains: delivery status notifications
//! (RFC 3464, `multipart/report; report-type=delivery-status`) and abuse feedback reports
//! (RFC 5965, `report-type=feedback-report`), parsed with `mail-parser`.
//!
//! **Correlation.** A report is linked to the message it is about through the copy of that
//! message's header it returns (`message/rfc822`, `text/rfc822-headers` or
//! `message/global-headers`): an `X-Kubemail-Queue-Id` field, or our own `Received` field
//! (`by <host> (kubemail) with <protocol> id <queue id>`, the one naming our host name
//! first). Queue ids are random 128-bit values, so a report can only name a message whose
//! headers its sender has seen. A report without such a link is delivered like any mail and
//! produces no event.
//!
//! **What it produces.** For a DSN: a `bounced` event per recipient with `Action: failed`
//! (status, `Diagnostic-Code`, bounce class, `Reporting-MTA`), and a suppression entry when
//! the class is `invalid-recipient` with a permanent status. For a feedback report: a
//! `complaint` event for `Original-Rcpt-To` (or the original's single `To` address) and a
//! suppression entry. Events carry the *original* queue id and the report's queue id. DSNs
//! reported by our own host name are skipped: the delivery attempt already produced the
//! `bounced` event. The report itself is still delivered to its recipient.

use std::sync::OnceLock;

use kubemail_queue::events::{CloudEvent, EventType, ReportInfo, event_id};
use kubemail_queue::suppression::SuppressionReason;
use mail_parser::{MessageParser, MimeHeaders as _};
use regex::Regex;

use crate::config::BounceClass;
use crate::delivery::DeliveryContext;
use crate::protocol::EnhancedCode;
use crate::queue::QueueEntry;

/// A report found in an inbound message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub format: ReportFormat,
    /// The queue id of the original message.
    pub original_queue_id: String,
    pub original_message_id: Option<String>,
    /// `Reporting-MTA` (DSN) or `User-Agent`/`Reported-Domain` (ARF).
    pub reporter: Option<String>,
    pub feedback_type: Option<String>,
    pub recipients: Vec<ReportedRecipient>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportFormat {
    Dsn,
    Arf,
}

/// One recipient of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedRecipient {
    pub address: String,
    /// DSN `Action`.
    pub action: Option<String>,
    /// DSN `Status`.
    pub status: Option<EnhancedCode>,
    /// DSN `Diagnostic-Code` without its type (`550 5.1.1 ...`).
    pub diagnostic: Option<String>,
}

/// The report in `message`, when it is a DSN or feedback report about a message of ours.
/// `hostname` is ours: a DSN we reported ourselves is not returned.
pub fn parse(message: &[u8], hostname: &str) -> Option<Report> {
    let parsed = MessageParser::default().parse(message)?;
    let ct = parsed.content_type()?;
    if !ct.ctype().eq_ignore_ascii_case("multipart")
        || !ct
            .subtype()
            .is_some_and(|s| s.eq_ignore_ascii_case("report"))
    {
        return None;
    }
    let report_type = ct.attribute("report-type")?.to_ascii_lowercase();
    let mut status_part: Option<String> = None;
    let mut original: Option<Vec<u8>> = None;
    for part in parsed.parts.iter().skip(1) {
        let Some(pct) = part.content_type() else {
            continue;
        };
        let full = format!(
            "{}/{}",
            pct.ctype().to_ascii_lowercase(),
            pct.subtype().unwrap_or("").to_ascii_lowercase()
        );
        match full.as_str() {
            "message/delivery-status"
            | "message/global-delivery-status"
            | "message/feedback-report" => {
                status_part = Some(String::from_utf8_lossy(part.contents()).into_owned());
            }
            "message/rfc822"
            | "message/global"
            | "text/rfc822-headers"
            | "message/global-headers"
            | "message/rfc822-headers"
                if original.is_none() =>
            {
                original = Some(part.contents().to_vec());
            }
            _ => {}
        }
    }
    let status_part = status_part?;
    let original = original?;
    let (queue_id, message_id, original_to) = correlate(&original, hostname)?;
    let blocks = field_blocks(&status_part);
    match report_type.as_str() {
        "delivery-status" => {
            let per_message = blocks.first()?;
            let reporter = field(per_message, "reporting-mta").map(strip_type);
            if reporter
                .as_deref()
                .is_some_and(|r| r.eq_ignore_ascii_case(hostname))
            {
                return None;
            }
            let recipients = blocks
                .iter()
                .skip(1)
                .filter_map(|b| {
                    let address = field(b, "final-recipient")
                        .or_else(|| field(b, "original-recipient"))
                        .map(strip_type)?;
                    Some(ReportedRecipient {
                        address: address.trim_matches(['<', '>']).to_ascii_lowercase(),
                        action: field(b, "action").map(|a| a.trim().to_ascii_lowercase()),
                        status: field(b, "status").and_then(|s| parse_status(&s)),
                        diagnostic: field(b, "diagnostic-code").map(strip_type),
                    })
                })
                .collect();
            Some(Report {
                format: ReportFormat::Dsn,
                original_queue_id: queue_id,
                original_message_id: message_id,
                reporter,
                feedback_type: None,
                recipients,
            })
        }
        "feedback-report" => {
            let fields = blocks.first()?;
            let address = field(fields, "original-rcpt-to")
                .map(|a| a.trim().trim_matches(['<', '>']).to_ascii_lowercase())
                .or(original_to)?;
            Some(Report {
                format: ReportFormat::Arf,
                original_queue_id: queue_id,
                original_message_id: message_id,
                reporter: field(fields, "reported-domain").or_else(|| field(fields, "user-agent")),
                feedback_type: field(fields, "feedback-type")
                    .map(|f| f.trim().to_ascii_lowercase()),
                recipients: vec![ReportedRecipient {
                    address,
                    action: None,
                    status: None,
                    diagnostic: None,
                }],
            })
        }
        _ => None,
    }
}

/// The events of the report in an inbound entry's `body`, adding suppression entries on the
/// way. Empty when the body is no report about our mail.
pub async fn events(ctx: &DeliveryContext, entry: &QueueEntry, body: &[u8]) -> Vec<CloudEvent> {
    let Some(report) = parse(body, &ctx.hostname) else {
        return Vec::new();
    };
    let format = match report.format {
        ReportFormat::Dsn => "dsn",
        ReportFormat::Arf => "arf",
    };
    tracing::info!(format, original_queue_id = %report.original_queue_id, recipients = report.recipients.len(), "received a report about one of our messages");
    ctx.metrics
        .events
        .reports
        .get_or_create(&super::metrics::ReasonLabels {
            domain: entry.domain.to_ascii_lowercase(),
            reason: format,
        })
        .inc();
    let report_queue_id = entry.queue_id.as_str();
    let mut out = Vec::new();
    for r in &report.recipients {
        let (kind, class) = match report.format {
            ReportFormat::Arf => (EventType::Complaint, None),
            ReportFormat::Dsn => {
                if r.action.as_deref() != Some("failed") {
                    continue;
                }
                let status = r.status.unwrap_or(EnhancedCode(5, 0, 0));
                let class = ctx.events.classifier().classify(
                    r.diagnostic.as_deref().and_then(basic_code),
                    status,
                    r.diagnostic.as_deref().unwrap_or(""),
                );
                (EventType::Bounced, Some(class))
            }
        };
        let mut data = kubemail_queue::events::EventData {
            domain: entry.domain.to_ascii_lowercase(),
            queue_id: report.original_queue_id.clone(),
            message_id: report.original_message_id.clone(),
            direction: Some("outbound".to_owned()),
            sender: String::new(),
            recipient: Some(r.address.clone()),
            attempt: 0,
            reply: r.diagnostic.clone(),
            status: r.status.map(|s| s.to_string()),
            bounce_class: class,
            report: Some(ReportInfo {
                format: format.to_owned(),
                report_queue_id: report_queue_id.to_owned(),
                feedback_type: report.feedback_type.clone(),
                reporter: report.reporter.clone(),
                action: r.action.clone(),
            }),
            ..Default::default()
        };
        data.trace_id = None;
        let mut event = CloudEvent::new(kind, &ctx.hostname, std::time::SystemTime::now(), data);
        // One event per report and recipient, whatever the original's own events were.
        event.id = event_id(report_queue_id, 0, kind, &r.address);
        if let Some(class) = class {
            ctx.metrics
                .events
                .count_failure(&entry.domain, &r.address, "bounced", class);
        }
        let suppress = match (kind, class) {
            (EventType::Complaint, _) => Some((SuppressionReason::Complaint, None)),
            (EventType::Bounced, Some(BounceClass::InvalidRecipient))
                if r.status.is_some_and(|s| s.0 == 5) =>
            {
                Some((SuppressionReason::Bounce, class))
            }
            _ => None,
        };
        if let Some((reason, class)) = suppress {
            ctx.suppression
                .add(
                    &entry.domain,
                    &r.address,
                    reason,
                    class,
                    Some(event.id.clone()),
                    r.diagnostic
                        .clone()
                        .or_else(|| report.feedback_type.clone()),
                )
                .await;
        }
        out.push(event);
    }
    out
}

/// Queue id, Message-ID and the single `To` address of the returned original header.
fn correlate(original: &[u8], hostname: &str) -> Option<(String, Option<String>, Option<String>)> {
    // A header-only part is a header section without a body; give it one so it parses.
    let mut text = original.to_vec();
    if !text.windows(4).any(|w| w == b"\r\n\r\n") && !text.windows(2).any(|w| w == b"\n\n") {
        text.extend_from_slice(b"\r\n\r\n");
    }
    let parsed = MessageParser::default().parse(&text)?;
    let message_id = parsed.message_id().map(str::to_owned);
    let to = parsed
        .to()
        .and_then(|a| {
            let mut all = a.iter();
            let first = all.next()?;
            all.next()
                .is_none()
                .then(|| first.address().map(str::to_owned))?
        })
        .map(|a| a.to_ascii_lowercase());
    let explicit = parsed
        .header_raw("X-Kubemail-Queue-Id")
        .map(|v| v.trim().to_owned())
        .filter(|v| is_queue_id(v));
    let queue_id = explicit.or_else(|| {
        let mut ours = None;
        let mut any = None;
        for line in received_fields(&text) {
            if let Some(c) = received_re().captures(&line) {
                let id = c[2].to_ascii_lowercase();
                if c[1].eq_ignore_ascii_case(hostname) && ours.is_none() {
                    ours = Some(id.clone());
                }
                any.get_or_insert(id);
            }
        }
        ours.or(any)
    })?;
    Some((queue_id, message_id, to))
}

/// The unfolded `Received` fields of a header section.
fn received_fields(header: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(header);
    let mut out: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for line in text.split('\n') {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(c) = current.as_mut() {
                c.push(' ');
                c.push_str(line.trim());
            }
            continue;
        }
        if let Some(c) = current.take() {
            out.push(c);
        }
        if line.len() > 9 && line[..9].eq_ignore_ascii_case("received:") {
            current = Some(line[9..].trim().to_owned());
        }
    }
    out.extend(current);
    out
}

fn received_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        #[allow(clippy::expect_used)] // a constant pattern
        Regex::new(r"(?i)\bby\s+(\S+)\s+\(kubemail\)\s+with\s+\S+\s+id\s+([0-9a-f]{32})\b")
            .expect("valid pattern")
    })
}

fn is_queue_id(v: &str) -> bool {
    v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The field blocks of a `message/delivery-status` or `message/feedback-report` body:
/// (lower-cased name, unfolded value) per field, blocks separated by empty lines.
fn field_blocks(text: &str) -> Vec<Vec<(String, String)>> {
    let mut blocks = Vec::new();
    let mut block: Vec<(String, String)> = Vec::new();
    for line in text.split('\n') {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            if !block.is_empty() {
                blocks.push(std::mem::take(&mut block));
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = block.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            block.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    if !block.is_empty() {
        blocks.push(block);
    }
    blocks
}

fn field(block: &[(String, String)], name: &str) -> Option<String> {
    block
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
}

/// `rfc822; bob@x` → `bob@x`; `smtp; 550 ...` → `550 ...`; `dns; mx.x` → `mx.x`.
fn strip_type(value: String) -> String {
    match value.split_once(';') {
        Some((_, rest)) => rest.trim().to_owned(),
        None => value.trim().to_owned(),
    }
}

fn parse_status(value: &str) -> Option<EnhancedCode> {
    let v = value.split_whitespace().next()?;
    let mut parts = v.split('.').map(|p| p.parse::<u16>().ok());
    let class = u8::try_from(parts.next()??).ok()?;
    let subject = parts.next()??;
    let detail = parts.next()??;
    matches!(class, 2 | 4 | 5).then_some(EnhancedCode(class, subject, detail))
}

fn basic_code(diagnostic: &str) -> Option<u16> {
    let code = diagnostic.get(..3)?;
    code.parse().ok().filter(|c| (200..600).contains(c))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const QID: &str = "0192f0c3a1b27c4e8d9e0f1a2b3c4d5e";

    fn original_headers() -> String {
        format!(
            "Received: from client.test ([192.0.2.1])\r\n\tby mx.example.test (kubemail) with ESMTPSA id {QID}\r\n\tfor <bob@remote.test>; Sat, 28 Nov 2026 00:00:00 +0000\r\nFrom: Alice <alice@example.test>\r\nTo: bob@remote.test\r\nSubject: hello\r\nMessage-ID: <m1@example.test>\r\n"
        )
    }

    #[test]
    fn a_postfix_dsn_names_the_recipient_status_and_original() {
        let dsn = format!(
            "From: MAILER-DAEMON@mx.remote.test\r\nTo: alice@example.test\r\nSubject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nI'm sorry to have to inform you...\r\n--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.remote.test\r\nArrival-Date: Sat, 28 Nov 2026 00:00:01 +0000\r\n\r\nFinal-Recipient: rfc822; Bob@remote.test\r\nOriginal-Recipient: rfc822;bob@remote.test\r\nAction: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mailbox.remote.test\r\nDiagnostic-Code: smtp; 550 5.1.1 <bob@remote.test>: Recipient address\r\n    rejected: User unknown in local recipient table\r\n\r\n--B\r\nContent-Type: text/rfc822-headers\r\n\r\n{}\r\n--B--\r\n",
            original_headers()
        );
        let r = parse(dsn.as_bytes(), "mx.example.test").unwrap();
        assert_eq!(r.format, ReportFormat::Dsn);
        assert_eq!(r.original_queue_id, QID);
        assert_eq!(r.original_message_id.as_deref(), Some("m1@example.test"));
        assert_eq!(r.reporter.as_deref(), Some("mx.remote.test"));
        assert_eq!(r.recipients.len(), 1);
        let rcpt = &r.recipients[0];
        assert_eq!(rcpt.address, "bob@remote.test");
        assert_eq!(rcpt.action.as_deref(), Some("failed"));
        assert_eq!(rcpt.status, Some(EnhancedCode(5, 1, 1)));
        assert!(
            rcpt.diagnostic.as_deref().unwrap().starts_with(
                "550 5.1.1 <bob@remote.test>: Recipient address rejected: User unknown"
            ),
            "{:?}",
            rcpt.diagnostic
        );
        // Our own DSNs were already reported by the attempt.
        assert!(parse(dsn.as_bytes(), "mx.remote.test").is_none());
    }

    #[test]
    fn an_arf_report_names_the_complainer() {
        let arf = format!(
            "From: feedback@fbl.remote.test\r\nTo: abuse@example.test\r\nSubject: FW: hello\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=feedback-report; boundary=\"B\"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n--B\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\nUser-Agent: RemoteFBL/1.0\r\nVersion: 1\r\nOriginal-Mail-From: <alice@example.test>\r\nOriginal-Rcpt-To: <bob@remote.test>\r\nReported-Domain: example.test\r\n\r\n--B\r\nContent-Type: message/rfc822\r\n\r\n{}\r\nhello\r\n--B--\r\n",
            original_headers()
        );
        let r = parse(arf.as_bytes(), "mx.example.test").unwrap();
        assert_eq!(r.format, ReportFormat::Arf);
        assert_eq!(r.original_queue_id, QID);
        assert_eq!(r.feedback_type.as_deref(), Some("abuse"));
        assert_eq!(r.recipients[0].address, "bob@remote.test");
    }

    #[test]
    fn mail_that_is_no_report_or_not_about_our_mail_is_ignored() {
        assert!(parse(b"Subject: hi\r\n\r\nhello\r\n", "mx.example.test").is_none());
        let foreign = "Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.remote.test\r\n\r\nFinal-Recipient: rfc822; bob@remote.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n--B\r\nContent-Type: text/rfc822-headers\r\n\r\nReceived: by mx.other.test (Postfix) id 4F1\r\nSubject: x\r\n\r\n--B--\r\n";
        assert!(parse(foreign.as_bytes(), "mx.example.test").is_none());
    }
}
