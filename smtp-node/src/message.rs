//! Message header helpers of both sides of the node, so that neither reaches into the other:
//! the receiving side ([`crate::session`]) adds the `Received` trace header (RFC 5321 4.4,
//! with-protocol names of RFC 3848; the OpenTelemetry trace id and the TLS details in
//! comments) and, on submission, a `Message-ID` when the client sent none (RFC 6409 8.3), and
//! counts hops; the sending side ([`crate::dkim`], [`crate::authres`],
//! [`crate::delivery::dsn`]) finds the header section and dates its notices.
//!
//! These are byte scans on purpose: they run on every accepted message and need one field or
//! the header/body split, not a parsed message. Where a header's *content* has structure that
//! matters (the `From:` address of [`crate::dkim::author_domain`]), mail-parser reads it.

use std::net::IpAddr;
use std::time::SystemTime;

use crate::tls::TlsInfo;

/// Inputs of the `Received` header.
pub struct ReceivedInfo<'a> {
    pub helo: &'a str,
    pub client_ip: IpAddr,
    pub hostname: &'a str,
    pub esmtp: bool,
    pub authenticated: bool,
    pub smtputf8: bool,
    pub tls: Option<&'a TlsInfo>,
    pub queue_id: &'a str,
    /// The message's trace id, shown as a `(trace <id>)` comment so that whoever holds the
    /// message can find its trace (see [`crate::telemetry`]).
    pub trace_id: Option<&'a str>,
    /// Named in a `for` clause only when there is exactly one (RFC 5321 7.2: a list of all
    /// recipients would disclose Bcc recipients).
    pub single_recipient: Option<&'a str>,
    pub date: SystemTime,
}

/// The `Received:` header, folded, ending in CRLF.
pub fn received_header(info: &ReceivedInfo<'_>) -> String {
    // RFC 3848: (UTF8)(E)SMTP + S (TLS) + A (authenticated).
    let mut protocol = String::new();
    if info.smtputf8 {
        protocol.push_str("UTF8SMTP");
    } else if info.esmtp {
        protocol.push_str("ESMTP");
    } else {
        protocol.push_str("SMTP");
    }
    if info.esmtp || info.smtputf8 {
        if info.tls.is_some() {
            protocol.push('S');
        }
        if info.authenticated {
            protocol.push('A');
        }
    }
    use std::fmt::Write as _;
    // Written into one buffer (this runs for every message); writing to a String cannot fail.
    let mut h = String::with_capacity(256);
    let _ = write!(h, "Received: from {} ([", sanitize(info.helo));
    let _ = match info.client_ip {
        IpAddr::V4(v4) => write!(h, "{v4}"),
        IpAddr::V6(v6) => write!(h, "IPv6:{v6}"),
    };
    let _ = write!(
        h,
        "])\r\n\tby {} (kubemail) with {} id {}",
        info.hostname, protocol, info.queue_id
    );
    if let Some(trace) = info.trace_id {
        let _ = write!(h, "\r\n\t(trace {})", sanitize(trace));
    }
    if let Some(tls) = info.tls {
        let _ = write!(
            h,
            "\r\n\t(using {} with cipher {})",
            tls.version, tls.cipher
        );
    }
    if let Some(rcpt) = info.single_recipient {
        let _ = write!(h, "\r\n\tfor <{}>", sanitize(rcpt));
    }
    let _ = write!(h, ";\r\n\t{}\r\n", rfc5322_date(info.date));
    h
}

/// A new `Message-ID` value for `hostname`.
pub fn new_message_id(hostname: &str) -> String {
    format!("<{}@{}>", uuid::Uuid::now_v7().simple(), hostname)
}

/// The value of the first header field `name` in the header section of `message`, unfolded
/// and trimmed.
pub fn header_value(message: &[u8], name: &str) -> Option<String> {
    let headers = header_section(message);
    let mut lines = headers.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        let line = strip_cr(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if !line[..colon]
            .trim_ascii()
            .eq_ignore_ascii_case(name.as_bytes())
        {
            continue;
        }
        let mut value = line[colon + 1..].to_vec();
        while let Some(next) = lines.peek() {
            if next.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                value.push(b' ');
                value.extend_from_slice(strip_cr(next).trim_ascii());
                lines.next();
            } else {
                break;
            }
        }
        return Some(String::from_utf8_lossy(value.trim_ascii()).into_owned());
    }
    None
}

/// RFC 5321 §6.3: counting `Received:` fields is the loop test MTAs use; the RFC asks for a
/// large limit ("at least 100"). A message that already passed this many hops is looping.
pub const MAX_RECEIVED_HEADERS: usize = 100;

/// Number of `Received:` header fields (the hop count) of a message.
pub fn received_count(message: &[u8]) -> usize {
    header_section(message)
        .split(|&b| b == b'\n')
        .filter(|line| line.len() > 9 && line[..9].eq_ignore_ascii_case(b"received:"))
        .count()
}

/// The header section including its final CRLF; empty when the message starts with the blank
/// line (no headers at all).
pub fn header_section(message: &[u8]) -> &[u8] {
    if message.starts_with(b"\r\n") {
        return &[];
    }
    match memchr::memmem::find(message, b"\r\n\r\n") {
        Some(end) => &message[..end + 2],
        None => message,
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// RFC 5322 3.3 date-time in UTC, e.g. `Fri, 27 Nov 2026 23:59:01 +0000`.
pub fn rfc5322_date(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    t.format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Keeps client-supplied text printable inside our header (no CR/LF, no controls).
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;

    #[test]
    fn received_header_names_protocol_tls_and_recipient() {
        let tls = TlsInfo {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_128_GCM_SHA256".into(),
        };
        let h = received_header(&ReceivedInfo {
            helo: "client.test",
            client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            hostname: "mx.example.test",
            esmtp: true,
            authenticated: true,
            smtputf8: false,
            tls: Some(&tls),
            queue_id: "abc",
            trace_id: Some("0af7651916cd43dd8448eb211c80319c"),
            single_recipient: Some("bob@example.test"),
            date: SystemTime::UNIX_EPOCH + Duration::from_secs(86400),
        });
        assert_eq!(
            h,
            "Received: from client.test ([192.0.2.1])\r\n\tby mx.example.test (kubemail) with ESMTPSA id abc\r\n\t(trace 0af7651916cd43dd8448eb211c80319c)\r\n\t(using TLSv1.3 with cipher TLS13_AES_128_GCM_SHA256)\r\n\tfor <bob@example.test>;\r\n\tFri, 02 Jan 1970 00:00:00 +0000\r\n"
        );
    }

    #[test]
    fn finds_headers_only_in_the_header_section() {
        let msg = b"Subject: hi\r\nMessage-ID:\r\n <a@b>\r\n\r\nMessage-ID: <body@x>\r\n";
        assert_eq!(header_value(msg, "message-id").as_deref(), Some("<a@b>"));
        let msg = b"Subject: hi\r\n\r\nMessage-ID: <body@x>\r\n";
        assert_eq!(header_value(msg, "Message-ID"), None);
        assert_eq!(header_value(b"\r\nMessage-ID: <x>\r\n", "Message-ID"), None);
    }

    #[test]
    fn received_count_counts_only_header_fields() {
        let msg =
            b"Received: a\r\nreceived: b\r\n\tcontinued\r\nSubject: x\r\n\r\nReceived: in body\r\n";
        assert_eq!(received_count(msg), 2);
        assert_eq!(received_count(b"\r\nReceived: body only\r\n"), 0);
    }
}
