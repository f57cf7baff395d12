//! The ESMTP extensions a server announces in its EHLO or LHLO reply (RFC 5321 §4.1.1.1,
//! RFC 2033 §4.1): one keyword per line after the greeting line, with optional parameters.
//!
//! Keywords are case-insensitive (RFC 5321 §2.4); unknown ones are ignored, and a malformed
//! parameter never fails the parse: `SIZE` with a value that is not a number reads as "no
//! fixed limit", like a bare `SIZE` (RFC 1870 §4), which is the safe reading for a client that
//! then lets the server refuse the message itself.

use crate::Reply;

/// The ESMTP extensions the server announced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The server answered EHLO/LHLO (false after a HELO fallback: no extension at all).
    pub esmtp: bool,
    /// `PIPELINING` (RFC 2920).
    pub pipelining: bool,
    /// `SIZE n`; `Some(0)` means "no fixed limit" (RFC 1870).
    pub size: Option<u64>,
    /// `8BITMIME` (RFC 6152).
    pub eight_bit_mime: bool,
    /// `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
    /// `STARTTLS` (RFC 3207).
    pub starttls: bool,
    /// `CHUNKING`: BDAT (RFC 3030).
    pub chunking: bool,
    /// `BINARYMIME` (RFC 3030).
    pub binary_mime: bool,
    /// `DSN`: NOTIFY/ORCPT on RCPT, RET/ENVID on MAIL (RFC 3461).
    pub dsn: bool,
    /// `ENHANCEDSTATUSCODES` (RFC 2034).
    pub enhanced_status_codes: bool,
    /// `REQUIRETLS` (RFC 8689).
    pub requiretls: bool,
    /// SASL mechanisms of `AUTH` (RFC 4954), upper case, sorted, without repeats.
    pub auth: Vec<String>,
}

impl Capabilities {
    /// Parses the lines of an EHLO/LHLO reply (the first line is the greeting).
    pub fn parse(reply: &Reply) -> Self {
        let mut caps = Self {
            esmtp: true,
            ..Self::default()
        };
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => caps.pipelining = true,
                "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "STARTTLS" => caps.starttls = true,
                "CHUNKING" => caps.chunking = true,
                "BINARYMIME" => caps.binary_mime = true,
                "DSN" => caps.dsn = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                "REQUIRETLS" => caps.requiretls = true,
                "AUTH" => caps.auth.extend(words.map(|w| w.to_ascii_uppercase())),
                // Pre-RFC 4954 servers announce `AUTH=PLAIN LOGIN`.
                k if k.starts_with("AUTH=") => {
                    caps.auth.push(k["AUTH=".len()..].to_owned());
                    caps.auth.extend(words.map(|w| w.to_ascii_uppercase()));
                }
                _ => {}
            }
        }
        caps.auth.retain(|m| !m.is_empty());
        caps.auth.sort();
        caps.auth.dedup();
        caps
    }

    /// Whether `mechanism` (any case) is among the announced SASL mechanisms.
    pub fn offers_auth(&self, mechanism: &str) -> bool {
        self.auth.iter().any(|m| m.eq_ignore_ascii_case(mechanism))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    fn ehlo(lines: &[&str]) -> Capabilities {
        Capabilities::parse(&Reply::multiline(
            250,
            None,
            lines.iter().map(|l| (*l).to_owned()).collect(),
        ))
    }

    #[test]
    fn capabilities_from_ehlo() {
        let c = ehlo(&[
            "mx.test greets you",
            "PIPELINING",
            "SIZE 10240000",
            "8bitmime",
            "AUTH PLAIN login",
            "AUTH=LOGIN",
            "STARTTLS",
            "SMTPUTF8",
            "",
        ]);
        assert!(c.pipelining && c.eight_bit_mime && c.starttls && c.smtputf8 && c.esmtp);
        assert_eq!(c.size, Some(10_240_000));
        assert_eq!(c.auth, vec!["LOGIN", "PLAIN"]);
        let bare = ehlo(&["x", "SIZE"]);
        assert_eq!(bare.size, Some(0));
        assert!(!bare.pipelining);
    }

    #[test]
    fn vectors() {
        let all = Capabilities {
            esmtp: true,
            ..Capabilities::default()
        };
        let cases: Vec<(&[&str], Capabilities)> = vec![
            (&["mx.test"], all.clone()),
            // The greeting line is never a keyword, whatever it says.
            (&["STARTTLS PIPELINING"], all.clone()),
            (
                &["mx", "CHUNKING", "BINARYMIME", "DSN", "ENHANCEDSTATUSCODES"],
                Capabilities {
                    chunking: true,
                    binary_mime: true,
                    dsn: true,
                    enhanced_status_codes: true,
                    ..all.clone()
                },
            ),
            (
                &["mx", "requiretls", "  Pipelining  "],
                Capabilities {
                    requiretls: true,
                    pipelining: true,
                    ..all.clone()
                },
            ),
            // A SIZE that is not a number reads as "no fixed limit".
            (
                &["mx", "SIZE lots"],
                Capabilities {
                    size: Some(0),
                    ..all.clone()
                },
            ),
            (
                &["mx", "SIZE 99999999999999999999999"],
                Capabilities {
                    size: Some(0),
                    ..all.clone()
                },
            ),
            (
                &["mx", "SIZE 0"],
                Capabilities {
                    size: Some(0),
                    ..all.clone()
                },
            ),
            // Look-alikes are not the extension.
            (
                &["mx", "STARTTLSX", "X-PIPELINING", "8BITMIMEX"],
                all.clone(),
            ),
            (
                &["mx", "AUTH", "AUTH= ", "AUTH=CRAM-MD5 plain Plain"],
                Capabilities {
                    auth: vec!["CRAM-MD5".into(), "PLAIN".into()],
                    ..all.clone()
                },
            ),
        ];
        for (lines, want) in cases {
            assert_eq!(ehlo(lines), want, "{lines:?}");
        }
    }

    #[test]
    fn auth_mechanisms_are_case_insensitive() {
        let c = ehlo(&["mx", "AUTH login"]);
        assert!(c.offers_auth("LOGIN") && c.offers_auth("login"));
        assert!(!c.offers_auth("PLAIN"));
    }
}
