//! Delivery status notifications (RFC 3464 inside an RFC 6522 `multipart/report`): the
//! bounce for failed recipients and the optional "delayed" notice. Pure: facts in, message
//! bytes out.
//!
//! Shape: sent with the null reverse path (so it is never bounced
//! itself), `Auto-Submitted: auto-replied` (RFC 3834), three parts: a human-readable text, a
//! `message/delivery-status` with `Reporting-MTA`, `Arrival-Date`, `Original-Envelope-Id`
//! and per recipient `Final-Recipient`, `Action`, `Status`, `Remote-MTA`, `Diagnostic-Code`,
//! `Last-Attempt-Date` (and `Will-Retry-Until` for delays), and the original message as
//! `message/rfc822`, or only its header as `text/rfc822-headers` when the sender asked for
//! `RET=HDRS`, the message is larger than the bounce size limit, or the DSN goes to a sender
//! outside our domains. All lines end in CRLF.

use std::time::SystemTime;

use super::outcome::Diagnostic;
use crate::message::{header_section, rfc5322_date};

/// Which notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnKind {
    /// `Action: failed`: the recipients will not get the message.
    Failure,
    /// `Action: delayed`: still trying.
    Delay,
}

/// The facts a DSN reports.
#[derive(Debug, Clone)]
pub struct DsnInput<'a> {
    pub kind: DsnKind,
    /// Our host name (`Reporting-MTA`).
    pub reporting_mta: &'a str,
    /// The domain the DSN comes from (`MAILER-DAEMON@<domain>`; it is DKIM-signed for it).
    pub from_domain: &'a str,
    /// The original envelope sender, who receives the DSN.
    pub to: &'a str,
    pub queue_id: &'a str,
    pub envid: Option<&'a str>,
    /// `RET` of the original transaction (`FULL` or `HDRS`).
    pub ret: Option<&'a str>,
    pub arrival: SystemTime,
    pub now: SystemTime,
    pub recipients: &'a [(String, Diagnostic)],
    /// For delays: the end of the queue lifetime.
    pub retry_until: Option<SystemTime>,
    /// The original message, if it is still available.
    pub original: Option<&'a [u8]>,
    /// Return only the original's header: the DSN goes to a sender outside our domains.
    pub headers_only: bool,
    pub original_message_id: Option<&'a str>,
    /// Largest original returned whole (bigger ones: headers only).
    pub size_limit: usize,
    /// Unique tokens for the boundary and the Message-ID.
    pub unique: &'a str,
}

/// A built DSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dsn {
    pub message: Vec<u8>,
    /// The DSN's `Message-ID` (with brackets).
    pub message_id: String,
    /// The returned content has 8-bit bytes, so the DSN needs `BODY=8BITMIME`.
    pub eight_bit: bool,
}

/// Builds the DSN message.
pub fn build(input: &DsnInput<'_>) -> Dsn {
    let boundary = format!("{}/{}", input.unique, ascii(input.reporting_mta));
    let message_id = format!("<{}.dsn@{}>", input.unique, ascii(input.reporting_mta));
    let mut m = String::with_capacity(4096);
    let subject = match input.kind {
        DsnKind::Failure => "Undelivered Mail Returned to Sender",
        DsnKind::Delay => "Delayed Mail (still being retried)",
    };
    push_line(
        &mut m,
        &format!(
            "From: Mail Delivery System <MAILER-DAEMON@{}>",
            ascii(input.from_domain)
        ),
    );
    push_line(&mut m, &format!("To: <{}>", ascii(input.to)));
    push_line(&mut m, &format!("Subject: {subject}"));
    push_line(&mut m, &format!("Date: {}", rfc5322_date(input.now)));
    push_line(&mut m, &format!("Message-ID: {message_id}"));
    if let Some(id) = input
        .original_message_id
        .map(ascii)
        .filter(|id| id.starts_with('<') && id.ends_with('>'))
    {
        push_line(&mut m, &format!("In-Reply-To: {id}"));
        push_line(&mut m, &format!("References: {id}"));
    }
    push_line(&mut m, "Auto-Submitted: auto-replied");
    push_line(&mut m, "MIME-Version: 1.0");
    push_line(
        &mut m,
        "Content-Type: multipart/report; report-type=delivery-status;",
    );
    push_line(&mut m, &format!("\tboundary=\"{boundary}\""));
    push_line(&mut m, "");
    push_line(&mut m, "This is a MIME-encapsulated message.");
    push_line(&mut m, "");

    // Part 1: for people.
    push_line(&mut m, &format!("--{boundary}"));
    push_line(&mut m, "Content-Description: Notification");
    push_line(&mut m, "Content-Type: text/plain; charset=us-ascii");
    push_line(&mut m, "");
    push_line(
        &mut m,
        &format!(
            "This is the mail system at host {}.",
            ascii(input.reporting_mta)
        ),
    );
    push_line(&mut m, "");
    match input.kind {
        DsnKind::Failure => {
            push_line(
                &mut m,
                "Your message could not be delivered to one or more recipients.",
            );
            push_line(&mut m, "It is attached below. The mail system said:");
        }
        DsnKind::Delay => {
            push_line(
                &mut m,
                "Your message could not be delivered yet to one or more recipients.",
            );
            match input.retry_until {
                Some(t) => push_line(
                    &mut m,
                    &format!(
                        "The mail system keeps trying until {}; you need not resend it.",
                        rfc5322_date(t)
                    ),
                ),
                None => push_line(
                    &mut m,
                    "The mail system keeps trying; you need not resend it.",
                ),
            }
            push_line(&mut m, "The mail system said:");
        }
    }
    push_line(&mut m, "");
    for (rcpt, d) in input.recipients {
        push_line(
            &mut m,
            &format!("<{}>: {}", ascii(rcpt), ascii(&d.summary())),
        );
    }
    push_line(&mut m, "");

    // Part 2: for programs (RFC 3464 2.2, 2.3).
    push_line(&mut m, &format!("--{boundary}"));
    push_line(&mut m, "Content-Description: Delivery report");
    push_line(&mut m, "Content-Type: message/delivery-status");
    push_line(&mut m, "");
    push_line(
        &mut m,
        &format!("Reporting-MTA: dns; {}", ascii(input.reporting_mta)),
    );
    push_line(
        &mut m,
        &format!("X-Kubemail-Queue-ID: {}", ascii(input.queue_id)),
    );
    if let Some(envid) = input.envid {
        push_line(&mut m, &format!("Original-Envelope-Id: {}", ascii(envid)));
    }
    push_line(
        &mut m,
        &format!("Arrival-Date: {}", rfc5322_date(input.arrival)),
    );
    let action = match input.kind {
        DsnKind::Failure => "failed",
        DsnKind::Delay => "delayed",
    };
    for (rcpt, d) in input.recipients {
        push_line(&mut m, "");
        push_line(&mut m, &format!("Final-Recipient: rfc822; {}", ascii(rcpt)));
        push_line(&mut m, &format!("Action: {action}"));
        push_line(&mut m, &format!("Status: {}", d.status));
        if let Some(host) = &d.remote_mta {
            push_line(&mut m, &format!("Remote-MTA: dns; {}", ascii(host)));
        }
        push_line(
            &mut m,
            &format!("Diagnostic-Code: {}", ascii(&d.diagnostic_code())),
        );
        push_line(
            &mut m,
            &format!("Last-Attempt-Date: {}", rfc5322_date(input.now)),
        );
        if let (DsnKind::Delay, Some(t)) = (input.kind, input.retry_until) {
            push_line(&mut m, &format!("Will-Retry-Until: {}", rfc5322_date(t)));
        }
    }
    push_line(&mut m, "");

    // Part 3: the original (or its header).
    let mut out = m.into_bytes();
    let mut eight_bit = false;
    if let Some(original) = input.original {
        let headers_only = input.headers_only
            || input.ret.is_some_and(|r| r.eq_ignore_ascii_case("HDRS"))
            || original.len() > input.size_limit
            || input.kind == DsnKind::Delay;
        let (content_type, content) = if headers_only {
            ("text/rfc822-headers", header_section(original))
        } else {
            ("message/rfc822", original)
        };
        eight_bit = !content.is_ascii();
        let mut part = String::new();
        push_line(&mut part, &format!("--{boundary}"));
        push_line(
            &mut part,
            &format!(
                "Content-Description: {}",
                if headers_only {
                    "Message Headers"
                } else {
                    "Undelivered Message"
                }
            ),
        );
        push_line(&mut part, &format!("Content-Type: {content_type}"));
        if eight_bit {
            push_line(&mut part, "Content-Transfer-Encoding: 8bit");
        }
        push_line(&mut part, "");
        out.extend_from_slice(part.as_bytes());
        out.extend_from_slice(content);
        if !content.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    Dsn {
        message: out,
        message_id,
        eight_bit,
    }
}

fn push_line(m: &mut String, line: &str) {
    m.push_str(line);
    m.push_str("\r\n");
}

/// DSN fields are ASCII (RFC 3464); anything else becomes `?`, controls become spaces.
fn ascii(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            c if c.is_ascii_control() => ' ',
            c if c.is_ascii() => c,
            _ => '?',
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::protocol::{EnhancedCode, Reply};

    const ORIGINAL: &[u8] = b"From: alice@example.test\r\nTo: carol@remote.test\r\nSubject: hi\r\nMessage-ID: <m1@example.test>\r\n\r\nHello.\r\n";

    fn failed() -> Vec<(String, Diagnostic)> {
        vec![
            (
                "carol@remote.test".into(),
                Diagnostic::from_reply(
                    Reply::new(550, EnhancedCode(5, 1, 1), "no such user\r\n250 injected"),
                    Some("mx.remote.test".into()),
                ),
            ),
            (
                "dan@nowhere.test".into(),
                Diagnostic::local(EnhancedCode(5, 1, 2), "domain nowhere.test does not exist"),
            ),
        ]
    }

    fn input<'a>(
        kind: DsnKind,
        recipients: &'a [(String, Diagnostic)],
        original: Option<&'a [u8]>,
    ) -> DsnInput<'a> {
        DsnInput {
            kind,
            reporting_mta: "mx.example.test",
            from_domain: "example.test",
            to: "alice@example.test",
            queue_id: "q1",
            envid: Some("ENV-1"),
            ret: None,
            arrival: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_600),
            recipients,
            retry_until: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_432_000)),
            original,
            headers_only: false,
            original_message_id: Some("<m1@example.test>"),
            size_limit: 50_000,
            unique: "0190abc",
        }
    }

    #[test]
    fn failure_report_has_the_rfc_3464_shape() {
        let rcpts = failed();
        let dsn = build(&input(DsnKind::Failure, &rcpts, Some(ORIGINAL)));
        let text = String::from_utf8(dsn.message.clone()).unwrap();
        for needle in [
            "From: Mail Delivery System <MAILER-DAEMON@example.test>\r\n",
            "To: <alice@example.test>\r\n",
            "Auto-Submitted: auto-replied\r\n",
            "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"0190abc/mx.example.test\"\r\n",
            "In-Reply-To: <m1@example.test>\r\n",
            "Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.test\r\n",
            "Original-Envelope-Id: ENV-1\r\n",
            "Final-Recipient: rfc822; carol@remote.test\r\nAction: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx.remote.test\r\nDiagnostic-Code: smtp; 550 5.1.1 no such user  250 injected\r\n",
            "Final-Recipient: rfc822; dan@nowhere.test\r\nAction: failed\r\nStatus: 5.1.2\r\nDiagnostic-Code: x-kubemail; domain nowhere.test does not exist\r\n",
            "Content-Type: message/rfc822\r\n\r\nFrom: alice@example.test\r\n",
            "Hello.\r\n\r\n--0190abc/mx.example.test--\r\n",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert!(!dsn.eight_bit);
        assert_eq!(dsn.message_id, "<0190abc.dsn@mx.example.test>");
        // Every line ends in CRLF and none is too long.
        for line in text.split("\r\n") {
            assert!(!line.contains('\n') && !line.contains('\r'), "{line:?}");
            assert!(line.len() <= 998);
        }
    }

    #[test]
    fn headers_only_for_ret_hdrs_large_originals_and_delays() {
        let rcpts = failed();
        let mut i = input(DsnKind::Failure, &rcpts, Some(ORIGINAL));
        i.ret = Some("HDRS");
        let text = String::from_utf8(build(&i).message).unwrap();
        assert!(
            text.contains("Content-Type: text/rfc822-headers\r\n\r\nFrom: alice@example.test\r\n"),
            "{text}"
        );
        assert!(!text.contains("Hello."), "{text}");
        let mut i = input(DsnKind::Failure, &rcpts, Some(ORIGINAL));
        i.headers_only = true;
        let text = String::from_utf8(build(&i).message).unwrap();
        assert!(
            text.contains("Content-Type: text/rfc822-headers\r\n\r\nFrom: alice@example.test\r\n"),
            "an outside sender gets the header only: {text}"
        );
        assert!(!text.contains("Hello."), "{text}");
        let mut i = input(DsnKind::Failure, &rcpts, Some(ORIGINAL));
        i.size_limit = 10;
        assert!(
            !String::from_utf8(build(&i).message)
                .unwrap()
                .contains("Hello.")
        );
        let text = String::from_utf8(build(&input(DsnKind::Delay, &rcpts, Some(ORIGINAL))).message)
            .unwrap();
        assert!(text.contains("Action: delayed\r\n"), "{text}");
        assert!(text.contains("Will-Retry-Until: "), "{text}");
        assert!(text.contains("Subject: Delayed Mail"), "{text}");
        assert!(!text.contains("Hello."));
    }

    #[test]
    fn eight_bit_originals_and_lost_bodies() {
        let rcpts = failed();
        let original = "Subject: caf\u{e9}\r\n\r\nna\u{ef}ve\r\n".as_bytes();
        let dsn = build(&input(DsnKind::Failure, &rcpts, Some(original)));
        assert!(dsn.eight_bit);
        assert!(
            String::from_utf8_lossy(&dsn.message).contains("Content-Transfer-Encoding: 8bit\r\n")
        );
        let dsn = build(&input(DsnKind::Failure, &rcpts, None));
        let text = String::from_utf8(dsn.message).unwrap();
        assert!(!text.contains("message/rfc822"));
        assert!(text.ends_with("\r\n--0190abc/mx.example.test--\r\n"));
    }
}
