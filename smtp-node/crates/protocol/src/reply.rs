//! SMTP replies: the three-digit code, the optional RFC 3463 enhanced status code, the text,
//! and their serialisation (RFC 5321 §4.2, RFC 2034).
//!
//! The constructors at the bottom are the replies a session sends for protocol-level events,
//! with the codes the RFCs and deployed MTAs use; policy replies (relay denied, unknown
//! user, ...) are built by the session with [`Reply::new`].

use std::fmt;

/// An enhanced mail system status code `class.subject.detail` (RFC 3463, RFC 5248 registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnhancedCode(pub u8, pub u16, pub u16);

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// The text of a reply without lines.
static EMPTY_LINE: String = String::new();

/// One SMTP reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The basic reply code (RFC 5321 §4.2.1), e.g. 250.
    pub code: u16,
    /// The enhanced status code, written when ENHANCEDSTATUSCODES is in effect.
    pub enhanced: Option<EnhancedCode>,
    /// The text lines; one element per reply line.
    pub lines: Vec<String>,
}

impl Reply {
    /// A single-line reply with an enhanced status code.
    pub fn new(code: u16, enhanced: EnhancedCode, text: impl Into<String>) -> Self {
        Self {
            code,
            enhanced: Some(enhanced),
            lines: vec![text.into()],
        }
    }

    /// A single-line reply that never carries an enhanced code: the `220` greeting, `354`, and
    /// `334` challenges (RFC 2034 §3 puts enhanced codes only on 2xx/4xx/5xx after EHLO; the
    /// greeting precedes EHLO and 3xx replies are intermediate).
    pub fn plain(code: u16, text: impl Into<String>) -> Self {
        Self {
            code,
            enhanced: None,
            lines: vec![text.into()],
        }
    }

    /// A reply with several lines (the EHLO capability list, HELP text).
    pub fn multiline(code: u16, enhanced: Option<EnhancedCode>, lines: Vec<String>) -> Self {
        Self {
            code,
            enhanced,
            lines,
        }
    }

    /// Serialises the reply with CRLF line endings, appending to `out`.
    ///
    /// `with_enhanced` says whether ENHANCEDSTATUSCODES is in effect (the client sent EHLO and
    /// we advertised it); then "X.Y.Z " prefixes the text of every line (RFC 2034 §3). All but
    /// the last line use the `NNN-` continuation form (RFC 5321 §4.2.1).
    ///
    /// CR, LF and other control characters in the text are written as spaces: reply text can
    /// echo client input (an address, a parameter), and a CRLF in it would let that input
    /// inject reply lines.
    pub fn write_to(&self, out: &mut Vec<u8>, with_enhanced: bool) {
        use std::io::Write as _;
        // Two replies go out for every message: this writes them without a temporary string.
        let code = self.code.min(999);
        let enhanced = self.enhanced.filter(|_| with_enhanced);
        let lines: &[String] = if self.lines.is_empty() {
            std::slice::from_ref(&EMPTY_LINE)
        } else {
            &self.lines
        };
        for (i, text) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { b' ' } else { b'-' };
            out.extend_from_slice(&[
                b'0' + (code / 100) as u8,
                b'0' + (code / 10 % 10) as u8,
                b'0' + (code % 10) as u8,
                sep,
            ]);
            if let Some(EnhancedCode(class, subject, detail)) = enhanced {
                // Writing to a Vec cannot fail.
                let _ = write!(out, "{class}.{subject}.{detail}");
                if !text.is_empty() {
                    out.push(b' ');
                }
            }
            // Control characters are C0 and DEL (one byte) and C1 (0xC2 0x80..0x9F).
            if text.bytes().any(|b| b < 0x20 || b == 0x7f || b == 0xc2) {
                for c in text.chars() {
                    if c.is_control() {
                        out.push(b' ');
                    } else {
                        let mut utf8 = [0u8; 4];
                        out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
                    }
                }
            } else {
                out.extend_from_slice(text.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The serialised reply as a new buffer (see [`Reply::write_to`]).
    pub fn to_bytes(&self, with_enhanced: bool) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out, with_enhanced);
        out
    }

    /// 2xx (completion) or 3xx (intermediate: 354, 334).
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// 4xx: the client may try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx: the client must not repeat the same command unchanged.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The text lines joined with a space (for logs and errors).
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }

    // ---- Common replies -------------------------------------------------------------------

    /// `250 2.0.0 <text>`: generic success (RSET, NOOP, end of DATA).
    pub fn ok(text: impl Into<String>) -> Self {
        Self::new(250, EnhancedCode(2, 0, 0), text)
    }

    /// `221 2.0.0 <text>`: answer to QUIT, then close (RFC 5321 §4.1.1.10).
    pub fn closing(text: impl Into<String>) -> Self {
        Self::new(221, EnhancedCode(2, 0, 0), text)
    }

    /// `354 End data with <CR><LF>.<CR><LF>` (no enhanced code: 3xx, RFC 2034 §3).
    pub fn start_mail_input() -> Self {
        Self::plain(354, "End data with <CR><LF>.<CR><LF>")
    }

    /// `220 2.0.0 Ready to start TLS` (RFC 3207 §4).
    pub fn ready_to_start_tls() -> Self {
        Self::new(220, EnhancedCode(2, 0, 0), "Ready to start TLS")
    }

    /// `334 <challenge>`: a SASL challenge, already base64 (RFC 4954 §4). An empty challenge
    /// is written as "334 " + CRLF.
    pub fn auth_challenge(b64: impl Into<String>) -> Self {
        Self::plain(334, b64)
    }

    /// `235 2.7.0 Authentication successful` (RFC 4954 §6).
    pub fn auth_succeeded() -> Self {
        Self::new(235, EnhancedCode(2, 7, 0), "Authentication successful")
    }

    /// `535 5.7.8 Authentication credentials invalid` (RFC 4954 §6). The same reply for an
    /// unknown user and a wrong password, so it is no user oracle.
    pub fn auth_failed() -> Self {
        Self::new(
            535,
            EnhancedCode(5, 7, 8),
            "Authentication credentials invalid",
        )
    }

    /// `530 5.7.0 Authentication required` (RFC 4954 §6).
    pub fn auth_required() -> Self {
        Self::new(530, EnhancedCode(5, 7, 0), "Authentication required")
    }

    /// `538 5.7.11 Encryption required for requested authentication mechanism` (RFC 4954 §6).
    pub fn encryption_required() -> Self {
        Self::new(
            538,
            EnhancedCode(5, 7, 11),
            "Encryption required for requested authentication mechanism",
        )
    }

    /// `504 5.5.4 Unrecognized authentication type` (RFC 4954 §4).
    pub fn auth_mechanism_not_supported() -> Self {
        Self::new(
            504,
            EnhancedCode(5, 5, 4),
            "Unrecognized authentication type",
        )
    }

    /// `500 5.5.6 Authentication exchange line is too long` (RFC 4954 §4).
    pub fn auth_line_too_long() -> Self {
        Self::new(
            500,
            EnhancedCode(5, 5, 6),
            "Authentication exchange line is too long",
        )
    }

    /// `454 4.7.0 TLS not available due to temporary reason` (RFC 3207 §4).
    pub fn tls_not_available() -> Self {
        Self::new(
            454,
            EnhancedCode(4, 7, 0),
            "TLS not available due to temporary reason",
        )
    }

    /// `500 5.5.1 Command unrecognized` (RFC 5321 §4.2.4).
    pub fn unknown_command() -> Self {
        Self::new(500, EnhancedCode(5, 5, 1), "Command unrecognized")
    }

    /// `502 5.5.1 <text>`: a recognised command we do not implement (EXPN, TURN, ...).
    pub fn not_implemented(text: impl Into<String>) -> Self {
        Self::new(502, EnhancedCode(5, 5, 1), text)
    }

    /// `501 5.5.4 <text>`: syntax error in parameters or arguments (RFC 5321 §4.2.2).
    pub fn syntax_error(text: impl Into<String>) -> Self {
        Self::new(501, EnhancedCode(5, 5, 4), text)
    }

    /// `555 5.5.4 <text>`: MAIL/RCPT parameter not recognized (RFC 5321 §4.1.1.11).
    pub fn param_not_recognized(text: impl Into<String>) -> Self {
        Self::new(555, EnhancedCode(5, 5, 4), text)
    }

    /// `503 5.5.1 <text>`: bad sequence of commands (RFC 5321 §4.1.4).
    pub fn bad_sequence(text: impl Into<String>) -> Self {
        Self::new(503, EnhancedCode(5, 5, 1), text)
    }

    /// `500 5.5.2 Line too long`: a command line over the limit (RFC 5321 §4.5.3.1.10 gives
    /// "500 Line too long"). X.5.2 is "syntax error"; X.5.6 is reserved for
    /// the AUTH exchange ([`Reply::auth_line_too_long`]).
    pub fn line_too_long() -> Self {
        Self::new(500, EnhancedCode(5, 5, 2), "Line too long")
    }

    /// `500 5.5.2 Bare CR or LF in command line`: RFC 5321 §2.3.8 allows only CRLF.
    pub fn bare_line_ending() -> Self {
        Self::new(500, EnhancedCode(5, 5, 2), "Bare CR or LF in command line")
    }

    /// `554 5.5.0 SMTP protocol synchronization error`: the client sent commands it had to
    /// wait for a reply to.
    pub fn sync_error() -> Self {
        Self::new(
            554,
            EnhancedCode(5, 5, 0),
            "SMTP protocol synchronization error",
        )
    }

    /// `552 5.3.4 Message size exceeds fixed maximum message size` (RFC 1870 §6).
    pub fn message_too_large() -> Self {
        Self::new(
            552,
            EnhancedCode(5, 3, 4),
            "Message size exceeds fixed maximum message size",
        )
    }

    /// `452 4.5.3 Too many recipients` (RFC 5321 §4.5.3.1.10).
    pub fn too_many_recipients() -> Self {
        Self::new(452, EnhancedCode(4, 5, 3), "Too many recipients")
    }

    /// `553 5.6.7 <text>`: non-ASCII address without SMTPUTF8 (RFC 6531 §3.6).
    pub fn non_ascii_address(text: impl Into<String>) -> Self {
        Self::new(553, EnhancedCode(5, 6, 7), text)
    }

    /// `252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery`: VRFY answer
    /// that reveals nothing (RFC 5321 §3.5.3, §7.3).
    pub fn cannot_vrfy() -> Self {
        Self::new(
            252,
            EnhancedCode(2, 5, 0),
            "Cannot VRFY user, but will accept message and attempt delivery",
        )
    }

    /// `451 4.3.0 <text>`: local error, try again (e.g. the queue did not acknowledge).
    pub fn local_error(text: impl Into<String>) -> Self {
        Self::new(451, EnhancedCode(4, 3, 0), text)
    }

    /// `421 4.3.0 Server shutting down.` (RFC 5321 §3.8).
    pub fn shutting_down() -> Self {
        Self::new(421, EnhancedCode(4, 3, 0), "Server shutting down.")
    }

    /// `421 4.4.2 Timeout waiting for input` (RFC 5321 §4.5.3.2.7).
    pub fn timeout() -> Self {
        Self::new(421, EnhancedCode(4, 4, 2), "Timeout waiting for input")
    }

    /// `421 4.7.0 Too many errors`: closing a session that keeps failing.
    pub fn too_many_errors() -> Self {
        Self::new(421, EnhancedCode(4, 7, 0), "Too many errors")
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.enhanced {
            Some(e) => write!(f, "{} {} {}", self.code, e, self.text()),
            None => write!(f, "{} {}", self.code, self.text()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn serialisation_vectors() {
        let cases: Vec<(Reply, bool, &str)> = vec![
            (Reply::ok("Ok"), true, "250 2.0.0 Ok\r\n"),
            (Reply::ok("Ok"), false, "250 Ok\r\n"),
            (
                Reply::start_mail_input(),
                true,
                "354 End data with <CR><LF>.<CR><LF>\r\n",
            ),
            (
                Reply::multiline(
                    250,
                    None,
                    vec![
                        "mx.example.test".into(),
                        "PIPELINING".into(),
                        "SIZE 1000".into(),
                    ],
                ),
                true,
                "250-mx.example.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n",
            ),
            (
                Reply::multiline(
                    214,
                    Some(EnhancedCode(2, 0, 0)),
                    vec!["a".into(), "b".into()],
                ),
                true,
                "214-2.0.0 a\r\n214 2.0.0 b\r\n",
            ),
            (Reply::multiline(250, None, vec![]), true, "250 \r\n"),
            (
                Reply::multiline(250, Some(EnhancedCode(2, 0, 0)), vec![]),
                true,
                "250 2.0.0\r\n",
            ),
            (Reply::auth_challenge(""), true, "334 \r\n"),
            (
                Reply::auth_challenge("VXNlcm5hbWU6"),
                true,
                "334 VXNlcm5hbWU6\r\n",
            ),
            // Reply injection: client text with CRLF is flattened.
            (
                Reply::syntax_error("bad <a@b>\r\n250 fake"),
                true,
                "501 5.5.4 bad <a@b>  250 fake\r\n",
            ),
            (
                Reply::new(550, EnhancedCode(5, 7, 11), "x\0y"),
                true,
                "550 5.7.11 x y\r\n",
            ),
            (
                Reply::new(553, EnhancedCode(5, 6, 7), "é"),
                true,
                "553 5.6.7 é\r\n",
            ),
            // A C1 control (U+0085) goes; U+00A2 starts with the same byte and stays.
            (
                Reply::new(550, EnhancedCode(5, 1, 1), "a\u{85}b\u{a2}"),
                true,
                "550 5.1.1 a b\u{a2}\r\n",
            ),
            (Reply::plain(999, "x"), false, "999 x\r\n"),
            (Reply::plain(1234, "x"), false, "999 x\r\n"),
        ];
        for (reply, enhanced, want) in cases {
            let got = String::from_utf8(reply.to_bytes(enhanced)).unwrap();
            assert_eq!(got, want, "{reply:?}");
        }
    }

    #[test]
    fn classification() {
        let cases = [
            (220, true, false, false),
            (250, true, false, false),
            (334, true, false, false),
            (354, true, false, false),
            (421, false, true, false),
            (451, false, true, false),
            (500, false, false, true),
            (554, false, false, true),
        ];
        for (code, pos, trans, perm) in cases {
            let r = Reply::plain(code, "x");
            assert_eq!(
                (r.is_positive(), r.is_transient(), r.is_permanent()),
                (pos, trans, perm),
                "{code}"
            );
        }
    }

    #[test]
    fn constructors_use_recommended_codes() {
        let cases = [
            (Reply::syntax_error("x"), 501, Some(EnhancedCode(5, 5, 4))),
            (Reply::bad_sequence("x"), 503, Some(EnhancedCode(5, 5, 1))),
            (Reply::unknown_command(), 500, Some(EnhancedCode(5, 5, 1))),
            (Reply::line_too_long(), 500, Some(EnhancedCode(5, 5, 2))),
            (
                Reply::auth_line_too_long(),
                500,
                Some(EnhancedCode(5, 5, 6)),
            ),
            (
                Reply::param_not_recognized("x"),
                555,
                Some(EnhancedCode(5, 5, 4)),
            ),
            (Reply::message_too_large(), 552, Some(EnhancedCode(5, 3, 4))),
            (
                Reply::too_many_recipients(),
                452,
                Some(EnhancedCode(4, 5, 3)),
            ),
            (Reply::auth_failed(), 535, Some(EnhancedCode(5, 7, 8))),
            (Reply::shutting_down(), 421, Some(EnhancedCode(4, 3, 0))),
            (Reply::start_mail_input(), 354, None),
        ];
        for (reply, code, enhanced) in cases {
            assert_eq!((reply.code, reply.enhanced), (code, enhanced), "{reply}");
        }
    }

    #[test]
    fn display_is_one_line() {
        assert_eq!(
            Reply::ok("Queued as X").to_string(),
            "250 2.0.0 Queued as X"
        );
        assert_eq!(Reply::plain(354, "Go").to_string(), "354 Go");
    }
}
