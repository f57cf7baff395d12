//! Parsing of the replies a server sends (RFC 5321 §4.2), incremental: bytes in, the first
//! complete [`Reply`] and the number of bytes it used out.
//!
//! A remote server is untrusted input. The parser accepts what real servers send (multi-line
//! replies, a bare LF at the end of a line, a code with no text, enhanced status codes per
//! RFC 2034) and turns everything else into [`ReplyError`], which a client treats as a
//! temporary failure of that host. It never panics and never buffers without bound: a line
//! longer than [`MAX_REPLY_LINE`], or a reply longer than [`MAX_REPLY_BYTES`] or
//! [`MAX_REPLY_LINES`], is an error as soon as the bytes show it, complete or not.

use crate::{EnhancedCode, Reply};

/// Longest reply accepted (all lines). EHLO replies are the longest real ones, a few hundred
/// bytes; 64 KiB leaves room for chatty servers and still bounds memory per connection.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;
/// Most lines in one reply.
pub const MAX_REPLY_LINES: usize = 256;
/// Longest reply line accepted, including its line ending. RFC 5321 §4.5.3.1.5 allows 512
/// octets; servers with long texts (policy URLs, SMTPUTF8 greetings) exceed it, so we take
/// eight times that, and a line that never ends fails long before [`MAX_REPLY_BYTES`].
pub const MAX_REPLY_LINE: usize = 4096;

/// Why bytes are not a valid reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply line does not start with a three-digit code: {0:?}")]
    BadCode(String),
    #[error("reply lines carry different codes ({0} then {1})")]
    MixedCodes(u16, u16),
    #[error("reply line longer than {MAX_REPLY_LINE} bytes")]
    LineTooLong,
    #[error("reply longer than {MAX_REPLY_BYTES} bytes or {MAX_REPLY_LINES} lines")]
    TooLong,
}

/// The first complete reply in `buf`, and the number of bytes it used; `Ok(None)` when more
/// bytes are needed. Bytes after the reply (the next pipelined replies) are not looked at.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
    let mut pos = 0;
    let mut code: Option<u16> = None;
    let mut lines: Vec<String> = Vec::new();
    loop {
        let Some(nl) = memchr::memchr(b'\n', &buf[pos..]) else {
            if buf.len() > MAX_REPLY_BYTES {
                return Err(ReplyError::TooLong);
            }
            if buf.len() - pos > MAX_REPLY_LINE {
                return Err(ReplyError::LineTooLong);
            }
            return Ok(None);
        };
        let end = pos + nl + 1;
        if end > MAX_REPLY_BYTES || lines.len() >= MAX_REPLY_LINES {
            return Err(ReplyError::TooLong);
        }
        if nl + 1 > MAX_REPLY_LINE {
            return Err(ReplyError::LineTooLong);
        }
        let raw = &buf[pos..pos + nl];
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        pos = end;
        let (line_code, last, text) = split_line(line)?;
        match code {
            None => code = Some(line_code),
            Some(c) if c != line_code => return Err(ReplyError::MixedCodes(c, line_code)),
            Some(_) => {}
        }
        lines.push(text);
        if last {
            let code = code.unwrap_or(line_code);
            return Ok(Some((with_enhanced_code(code, lines), pos)));
        }
    }
}

/// `"5.1.1 text"` → (5.1.1, "text"): an RFC 3463 enhanced status code at the start of a reply
/// text.
pub fn parse_enhanced(text: &str) -> Option<(EnhancedCode, &str)> {
    let (token, rest) = match text.split_once(' ') {
        Some((t, r)) => (t, r),
        None => (text, ""),
    };
    let mut parts = token.split('.');
    let class = parts.next()?;
    let subject = parts.next()?;
    let detail = parts.next()?;
    if parts.next().is_some()
        || class.len() != 1
        || !(1..=3).contains(&subject.len())
        || !(1..=3).contains(&detail.len())
    {
        return None;
    }
    let e = EnhancedCode(
        class.parse().ok()?,
        subject.parse().ok()?,
        detail.parse().ok()?,
    );
    Some((e, rest))
}

/// The enhanced status code of `reply`, or the generic one for its class (X.0.0), for DSNs
/// (RFC 3464 `Status:` is required).
pub fn status_of(reply: &Reply) -> EnhancedCode {
    reply.enhanced.unwrap_or_else(|| {
        let class = match reply.code / 100 {
            2 => 2,
            4 => 4,
            _ => 5,
        };
        EnhancedCode(class, 0, 0)
    })
}

/// Splits `NNN-text` / `NNN text` / `NNN`; returns (code, is_last, text).
fn split_line(line: &[u8]) -> Result<(u16, bool, String), ReplyError> {
    let bad =
        || ReplyError::BadCode(String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned());
    if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    // RFC 5321 §4.2: the first digit is 2..5; 1yz is unused in SMTP but harmless to accept.
    if !(b'1'..=b'5').contains(&line[0]) {
        return Err(bad());
    }
    let code = u16::from(line[0] - b'0') * 100
        + u16::from(line[1] - b'0') * 10
        + u16::from(line[2] - b'0');
    let (last, text) = match line.get(3) {
        None => (true, &[][..]),
        Some(b' ') => (true, &line[4..]),
        Some(b'-') => (false, &line[4..]),
        Some(_) => return Err(bad()),
    };
    // Control characters would end up in logs and DSNs; keep the text printable.
    let text: String = String::from_utf8_lossy(text)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    Ok((code, last, text))
}

/// Moves an RFC 2034 enhanced status code from the start of every line into
/// [`Reply::enhanced`] when its class matches the basic code's first digit.
fn with_enhanced_code(code: u16, lines: Vec<String>) -> Reply {
    let class = (code / 100) as u8;
    let enhanced = lines
        .first()
        .and_then(|l| parse_enhanced(l))
        // RFC 3463 §2: the class is 2, 4 or 5 only; "354 3.0.0" is text, not a status (found
        // by the hostile suite's reply fuzzer: a DSN must never carry `Status: 3.0.0`).
        .filter(|(e, _)| e.0 == class && matches!(class, 2 | 4 | 5))
        .map(|(e, _)| e);
    let lines = match enhanced {
        Some(e) => lines
            .into_iter()
            .map(|l| match parse_enhanced(&l) {
                Some((found, rest)) if found == e => rest.to_owned(),
                _ => l,
            })
            .collect(),
        None => lines,
    };
    Reply {
        code,
        enhanced,
        lines,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    type Parsed = Result<Option<(Reply, usize)>, ReplyError>;

    fn ok(code: u16, enhanced: Option<EnhancedCode>, lines: &[&str], used: usize) -> Parsed {
        Ok(Some((
            Reply {
                code,
                enhanced,
                lines: lines.iter().map(|s| (*s).to_owned()).collect(),
            },
            used,
        )))
    }

    #[test]
    fn vectors() {
        let cases: Vec<(&[u8], Parsed)> = vec![
            (
                b"220 mx.test ESMTP\r\n",
                ok(220, None, &["mx.test ESMTP"], 19),
            ),
            (
                b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n",
                ok(250, None, &["mx.test", "PIPELINING", "SIZE 1000"], 44),
            ),
            (
                b"550 5.1.1 <x@y>: user unknown\r\n",
                ok(
                    550,
                    Some(EnhancedCode(5, 1, 1)),
                    &["<x@y>: user unknown"],
                    31,
                ),
            ),
            (
                b"451-4.3.0 first\r\n451 4.3.0 second\r\n",
                ok(451, Some(EnhancedCode(4, 3, 0)), &["first", "second"], 35),
            ),
            // Class mismatch: the "enhanced code" is just text.
            (b"250 5.1.1 odd\r\n", ok(250, None, &["5.1.1 odd"], 15)),
            // No enhanced class 3 (RFC 3463): the text stays text.
            (b"354 3.0.0 go\r\n", ok(354, None, &["3.0.0 go"], 14)),
            (b"250\r\n", ok(250, None, &[""], 5)),
            (b"354 go ahead\n", ok(354, None, &["go ahead"], 13)),
            (
                b"250 2.0.0\r\n",
                ok(250, Some(EnhancedCode(2, 0, 0)), &[""], 11),
            ),
            (b"250 a\x00b\r\n", ok(250, None, &["a b"], 9)),
            (b"250-partial\r\n", Ok(None)),
            (b"250 no end", Ok(None)),
            (b"", Ok(None)),
            (b"25x ok\r\n", Err(ReplyError::BadCode("25x ok".into()))),
            (b"hello\r\n", Err(ReplyError::BadCode("hello".into()))),
            (b"250_ok\r\n", Err(ReplyError::BadCode("250_ok".into()))),
            (b"650 ok\r\n", Err(ReplyError::BadCode("650 ok".into()))),
            (b"250-a\r\n251 b\r\n", Err(ReplyError::MixedCodes(250, 251))),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse_reply(input),
                want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn hostile_replies() {
        let long_line = |n: usize| {
            let mut line = b"250 ".to_vec();
            line.resize(n - 2, b'x');
            line.extend_from_slice(b"\r\n");
            line
        };
        let cases: Vec<(&str, Vec<u8>, Parsed)> = vec![
            // Over-long lines: one just at the limit is fine, one byte more is not, and a line
            // that never ends fails as soon as it passes the limit.
            ("line at the limit", long_line(MAX_REPLY_LINE), {
                let text = "x".repeat(MAX_REPLY_LINE - 6);
                ok(250, None, &[text.as_str()], MAX_REPLY_LINE)
            }),
            (
                "line over the limit",
                long_line(MAX_REPLY_LINE + 1),
                Err(ReplyError::LineTooLong),
            ),
            (
                "unterminated line over the limit",
                b"250-".repeat(MAX_REPLY_LINE / 4 + 1),
                Err(ReplyError::LineTooLong),
            ),
            (
                "over-long continuation line",
                [&b"250-ok\r\n"[..], &long_line(MAX_REPLY_LINE + 1)].concat(),
                Err(ReplyError::LineTooLong),
            ),
            // Too many lines, complete or still coming.
            (
                "too many lines",
                [b"250-x\r\n".repeat(MAX_REPLY_LINES), b"250 x\r\n".to_vec()].concat(),
                Err(ReplyError::TooLong),
            ),
            (
                "many short lines are fine",
                [
                    b"250-x\r\n".repeat(MAX_REPLY_LINES - 1),
                    b"250 x\r\n".to_vec(),
                ]
                .concat(),
                Ok(Some((
                    Reply {
                        code: 250,
                        enhanced: None,
                        lines: vec!["x".to_owned(); MAX_REPLY_LINES],
                    },
                    7 * MAX_REPLY_LINES,
                ))),
            ),
            // Mixed codes across continuation lines, including a last line that changes the
            // class (a 250 that turns into a 550 must not be read as either).
            (
                "mixed codes",
                b"250-mx\r\n250-SIZE\r\n550 no\r\n".to_vec(),
                Err(ReplyError::MixedCodes(250, 550)),
            ),
            (
                "mixed codes, continuation",
                b"451-a\r\n452-b\r\n452 c\r\n".to_vec(),
                Err(ReplyError::MixedCodes(451, 452)),
            ),
            // Non-UTF-8 text is replaced, never passed on as bytes.
            (
                "non-UTF-8",
                b"550 5.7.1 bad \xff\xfe text\r\n".to_vec(),
                ok(
                    550,
                    Some(EnhancedCode(5, 7, 1)),
                    &["bad \u{fffd}\u{fffd} text"],
                    23,
                ),
            ),
            (
                "non-UTF-8 code",
                b"2\xff0 ok\r\n".to_vec(),
                Err(ReplyError::BadCode("2\u{fffd}0 ok".into())),
            ),
            // A CR inside the line is text, shown as a space; only LF ends a line.
            (
                "bare CR inside",
                b"250 a\rb\r\n".to_vec(),
                ok(250, None, &["a b"], 9),
            ),
            // A continuation line whose enhanced code differs keeps it as text.
            (
                "enhanced code changes",
                b"550-5.1.1 a\r\n550 5.7.1 b\r\n".to_vec(),
                ok(550, Some(EnhancedCode(5, 1, 1)), &["a", "5.7.1 b"], 26),
            ),
        ];
        for (name, input, want) in cases {
            assert_eq!(parse_reply(&input), want, "{name}");
        }
    }

    #[test]
    fn leaves_following_replies_in_the_buffer() {
        let buf = b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go\r\n";
        let (r1, n1) = parse_reply(buf).unwrap().unwrap();
        let (r2, n2) = parse_reply(&buf[n1..]).unwrap().unwrap();
        let (r3, _) = parse_reply(&buf[n1 + n2..]).unwrap().unwrap();
        assert_eq!((r1.code, r2.code, r3.code), (250, 250, 354));
        assert_eq!(r2.enhanced, Some(EnhancedCode(2, 1, 5)));
    }

    #[test]
    fn is_incremental() {
        // Every prefix of a reply needs more; the whole gives the reply, whatever follows.
        let wire = b"250-mx.example.test\r\n250-PIPELINING\r\n250 2.0.0 SIZE 1000\r\n";
        for cut in 0..wire.len() {
            assert_eq!(parse_reply(&wire[..cut]), Ok(None), "prefix {cut}");
        }
        let (reply, used) = parse_reply(wire).unwrap().unwrap();
        assert_eq!(used, wire.len());
        let mut more = wire.to_vec();
        more.extend_from_slice(b"garbage that is not a reply");
        assert_eq!(parse_reply(&more), Ok(Some((reply, used))));
    }

    #[test]
    fn bounds_memory() {
        let endless = vec![b'2'; MAX_REPLY_BYTES + 1];
        assert_eq!(parse_reply(&endless), Err(ReplyError::TooLong));
        let many: Vec<u8> = b"250-x\r\n".repeat(MAX_REPLY_LINES + 1);
        assert_eq!(parse_reply(&many), Err(ReplyError::TooLong));
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // A cheap deterministic fuzz: every prefix and every single-byte mutation of a
        // realistic multi-line reply.
        let base = b"250-mx.example.test Hello\r\n250-SIZE 10240000\r\n250 2.0.0 STARTTLS\r\n";
        for len in 0..=base.len() {
            let _ = parse_reply(&base[..len]);
        }
        for i in 0..base.len() {
            for b in [0u8, b'\r', b'\n', b' ', b'-', b'9', 0xff] {
                let mut m = base.to_vec();
                m[i] = b;
                let _ = parse_reply(&m);
            }
        }
    }

    #[test]
    fn our_own_replies_parse_back() {
        let replies = [
            Reply::ok("Queued as X"),
            Reply::new(550, EnhancedCode(5, 1, 1), "no such user"),
            Reply::multiline(
                250,
                None,
                vec!["mx.test".into(), "PIPELINING".into(), "SIZE 10".into()],
            ),
            Reply::start_mail_input(),
        ];
        for reply in replies {
            let wire = reply.to_bytes(true);
            assert_eq!(
                parse_reply(&wire),
                Ok(Some((reply.clone(), wire.len()))),
                "{reply}"
            );
        }
    }

    #[test]
    fn status_falls_back_to_class() {
        assert_eq!(status_of(&Reply::plain(550, "x")), EnhancedCode(5, 0, 0));
        assert_eq!(status_of(&Reply::plain(421, "x")), EnhancedCode(4, 0, 0));
        assert_eq!(
            status_of(&Reply::new(552, EnhancedCode(5, 2, 2), "full")),
            EnhancedCode(5, 2, 2)
        );
    }
}
