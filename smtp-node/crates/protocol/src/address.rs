//! Mailbox and path syntax of MAIL FROM / RCPT TO (RFC 5321 §4.1.2, RFC 6531 §3.3), with the
//! normalisations the relay decision depends on.
//!
//! Choices, each pinned by a test below:
//! * **Source routes** (`<@a,@b:user@c>`) are accepted syntactically and the route is
//!   **dropped**: only the final mailbox `user@c` is kept, so the relay decision is made on the
//!   real destination. RFC 5321 §4.1.1.3: servers "MUST be prepared to encounter a list of
//!   source routes in the forward-path, but they SHOULD ignore the routes"; Appendix C: they
//!   "MAY ... ignore the routes and utilize only the target domain". Refusing them would be
//!   just as safe but breaks the MUST; dropping is safe because nothing downstream ever sees
//!   the route.
//! * **Trailing dot**: `user@example.test.` is normalised to `example.test` (the absolute form
//!   of the same DNS name). Exactly one trailing dot is removed; `example.test..` is refused.
//! * **Case**: the domain is lower-cased (DNS names are case-insensitive); the local part keeps
//!   its case (RFC 5321 §2.4: it may be case-sensitive, the final server decides).
//! * **Percent hack, bang paths, quoted `@`**: never interpreted. `user%remote@local`,
//!   `remote!user@local` and `"user@remote"@local` are local parts of a mailbox at `local`
//!   that will not match a real user; `remote!user` (no `@`) and `user@remote@local` are
//!   syntax errors.
//! * **Quoted local parts** are stored unquoted (`"a b"@x` has local part `a b`), so the
//!   quoted and unquoted spellings of the same mailbox compare equal (RFC 5321 §4.1.2); Display
//!   quotes again when needed.
//! * **Address literals** `[192.0.2.1]` and `[IPv6:2001:db8::1]` are parsed and canonicalised
//!   (the session decides whether to accept them); general literals
//!   (`[tag:content]`) have no registered tags and are refused.
//! * **Limits** (RFC 5321 §4.5.3.1): local part 64 octets as sent, domain 255 octets, whole
//!   path 256 octets including the angle brackets and any source route.
//! * `RCPT TO:<Postmaster>` (no domain) is the one mailbox without a domain that RFC 5321
//!   §4.1.1.3 requires; it parses to an address whose [`Address::domain`] is empty (see
//!   [`Address::is_bare_postmaster`]).
//! * No control characters anywhere (they cannot appear in the grammar), so a parsed address
//!   can be written back to the wire or a header without CRLF injection.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{EnhancedCode, MAX_DOMAIN, MAX_LOCAL_PART, MAX_PATH, Reply};

/// A mailbox: local part and domain, syntax-checked and normalised.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    /// Unquoted local part, case preserved.
    local: String,
    /// Lower-cased domain without trailing dot, or a canonical address literal; empty only for
    /// the bare `<Postmaster>` recipient.
    domain: String,
    /// The IP address of an address-literal domain.
    literal: Option<IpAddr>,
}

/// The argument of MAIL FROM: a mailbox or the null reverse-path `<>` (bounces, RFC 5321 §4.5.5).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReversePath {
    /// `<>`: the null sender; never bounced to.
    Null,
    /// A sender mailbox.
    Address(Address),
}

/// Why a path was refused; `Display` gives a reason fit for the reply text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Nothing between the angle brackets where a mailbox is required.
    #[error("empty address")]
    Empty,
    /// RFC 5321 §4.5.3.1.3.
    #[error("path too long (at most {MAX_PATH} octets)")]
    PathTooLong,
    /// RFC 5321 §4.5.3.1.1.
    #[error("local part too long (at most {MAX_LOCAL_PART} octets)")]
    LocalPartTooLong,
    /// RFC 5321 §4.5.3.1.2.
    #[error("domain too long (at most {MAX_DOMAIN} octets)")]
    DomainTooLong,
    /// A control character (NUL, CR, LF, TAB, DEL, ...) inside the path.
    #[error("control character in address")]
    ControlCharacter,
    /// UTF-8 in the path without the SMTPUTF8 parameter (RFC 6531 §3.6).
    #[error("non-ASCII address requires SMTPUTF8")]
    NonAscii,
    /// No `@domain` part.
    #[error("address has no domain")]
    MissingDomain,
    /// The local part is neither a dot-string nor a quoted string.
    #[error("invalid local part")]
    InvalidLocalPart,
    /// The domain is not a valid host name.
    #[error("invalid domain")]
    InvalidDomain,
    /// `[...]` that is not an IPv4 or `IPv6:` literal.
    #[error("invalid address literal")]
    InvalidAddressLiteral,
    /// A source route (`@a,@b:`) that is not a list of `@domain`.
    #[error("invalid source route")]
    InvalidSourceRoute,
}

impl AddressError {
    /// The reply for a refused MAIL FROM path: `501 5.1.7` (bad sender mailbox syntax), or
    /// `553 5.6.7` for a non-ASCII address without SMTPUTF8.
    pub fn sender_reply(&self) -> Reply {
        match self {
            Self::NonAscii => Reply::non_ascii_address(format!("Sender address rejected: {self}")),
            _ => Reply::new(
                501,
                EnhancedCode(5, 1, 7),
                format!("Bad sender address syntax: {self}"),
            ),
        }
    }

    /// The reply for a refused RCPT TO path: `501 5.1.3` (bad destination mailbox syntax), or
    /// `553 5.6.7` for a non-ASCII address without SMTPUTF8.
    pub fn recipient_reply(&self) -> Reply {
        match self {
            Self::NonAscii => {
                Reply::non_ascii_address(format!("Recipient address rejected: {self}"))
            }
            _ => Reply::new(
                501,
                EnhancedCode(5, 1, 3),
                format!("Bad recipient address syntax: {self}"),
            ),
        }
    }
}

impl Address {
    /// The local part, unquoted, case preserved.
    pub fn local_part(&self) -> &str {
        &self.local
    }

    /// The domain: lower-cased, without trailing dot; for address literals the canonical form
    /// `[192.0.2.1]` / `[IPv6:2001:db8::1]`. Empty only for the bare `<Postmaster>` recipient.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Whether the address contains non-ASCII characters and so needs SMTPUTF8 end to end.
    pub fn is_utf8(&self) -> bool {
        !self.local.is_ascii() || !self.domain.is_ascii()
    }

    /// The IP address when the domain is an address literal.
    pub fn ip_literal(&self) -> Option<IpAddr> {
        self.literal
    }

    /// Whether the local part is "postmaster" (case-insensitive, RFC 5321 §4.5.1).
    pub fn is_postmaster(&self) -> bool {
        self.local.eq_ignore_ascii_case("postmaster")
    }

    /// `RCPT TO:<Postmaster>` without a domain (RFC 5321 §4.1.1.3): the postmaster of this
    /// server. Its [`domain`](Self::domain) is empty, so a session that does not handle it
    /// explicitly treats it as a non-local domain (refused unless relaying is allowed).
    pub fn is_bare_postmaster(&self) -> bool {
        self.domain.is_empty()
    }

    /// Builds an address from a local part and a domain, with the same checks as the parser
    /// (SMTPUTF8 allowed). For configuration and tests.
    pub fn new(local: &str, domain: &str) -> Result<Self, AddressError> {
        let quoted = if is_dot_string(local) {
            local.to_owned()
        } else {
            quote(local)
        };
        parse_forward_path(&format!("{quoted}@{domain}"), true)
    }
}

impl fmt::Display for Address {
    /// `local@domain`, quoting the local part when it is not a dot-string.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if is_dot_string(&self.local) {
            f.write_str(&self.local)?;
        } else {
            f.write_str(&quote(&self.local))?;
        }
        if !self.domain.is_empty() {
            write!(f, "@{}", self.domain)?;
        }
        Ok(())
    }
}

impl ReversePath {
    /// Whether this is the null sender `<>`.
    pub fn is_null(&self) -> bool {
        matches!(self, Self::Null)
    }

    /// The sender mailbox, if not null.
    pub fn address(&self) -> Option<&Address> {
        match self {
            Self::Null => None,
            Self::Address(a) => Some(a),
        }
    }
}

impl fmt::Display for ReversePath {
    /// The mailbox, or the empty string for the null path (write `<{}>` for the wire form).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Null => Ok(()),
            Self::Address(a) => a.fmt(f),
        }
    }
}

/// Parses a forward-path (RCPT TO). `s` is the text **between** the angle brackets (the
/// command parser strips them), e.g. `user@example.test` or `@relay.test:user@example.test`.
///
/// `smtputf8` allows UTF-8 in the local part and the domain (RFC 6531 §3.3); without it any
/// non-ASCII character gives [`AddressError::NonAscii`].
pub fn parse_forward_path(s: &str, smtputf8: bool) -> Result<Address, AddressError> {
    if s.eq_ignore_ascii_case("postmaster") {
        return Ok(Address {
            local: s.to_owned(),
            domain: String::new(),
            literal: None,
        });
    }
    parse_mailbox_path(s, smtputf8)
}

/// Parses a reverse-path (MAIL FROM). `s` is the text between the angle brackets; the empty
/// string is the null path `<>`. Otherwise as [`parse_forward_path`], except that the bare
/// `Postmaster` form is not allowed.
pub fn parse_reverse_path(s: &str, smtputf8: bool) -> Result<ReversePath, AddressError> {
    if s.is_empty() {
        return Ok(ReversePath::Null);
    }
    parse_mailbox_path(s, smtputf8).map(ReversePath::Address)
}

/// Path = [ A-d-l ":" ] Mailbox (without the brackets).
fn parse_mailbox_path(s: &str, smtputf8: bool) -> Result<Address, AddressError> {
    if s.is_empty() {
        return Err(AddressError::Empty);
    }
    // Cheap bound before any work; the precise limits are checked after parsing so that the
    // error names the part that is too long.
    if s.len() > 4 * MAX_PATH {
        return Err(AddressError::PathTooLong);
    }
    if s.chars().any(char::is_control) {
        return Err(AddressError::ControlCharacter);
    }
    if !smtputf8 && !s.is_ascii() {
        return Err(AddressError::NonAscii);
    }
    let mailbox = strip_source_route(s)?;
    if mailbox.is_empty() {
        return Err(AddressError::Empty);
    }
    let (local, local_wire_len, rest) = parse_local_part(mailbox)?;
    if local_wire_len > MAX_LOCAL_PART {
        return Err(AddressError::LocalPartTooLong);
    }
    let domain_text = rest.strip_prefix('@').ok_or(AddressError::MissingDomain)?;
    let (domain, literal) = parse_domain(domain_text)?;
    if s.len() + 2 > MAX_PATH {
        return Err(AddressError::PathTooLong);
    }
    Ok(Address {
        local,
        domain,
        literal,
    })
}

/// Removes `@a,@b:` (RFC 5321 A-d-l) after checking its syntax; returns the mailbox.
fn strip_source_route(s: &str) -> Result<&str, AddressError> {
    if !s.starts_with('@') {
        return Ok(s);
    }
    let (route, mailbox) = s.split_once(':').ok_or(AddressError::InvalidSourceRoute)?;
    for at_domain in route.split(',') {
        let domain = at_domain
            .strip_prefix('@')
            .ok_or(AddressError::InvalidSourceRoute)?;
        if domain.starts_with('[') || parse_domain(domain).is_err() {
            return Err(AddressError::InvalidSourceRoute);
        }
    }
    Ok(mailbox)
}

/// Local-part = Dot-string / Quoted-string. Returns the unquoted value, its length as sent,
/// and the rest of the input (starting at `@` for a valid mailbox).
fn parse_local_part(s: &str) -> Result<(String, usize, &str), AddressError> {
    if let Some(inner) = s.strip_prefix('"') {
        let mut value = String::new();
        let mut chars = inner.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    if value.is_empty() {
                        return Err(AddressError::InvalidLocalPart);
                    }
                    let wire_len = i + 2;
                    return Ok((value, wire_len, &s[wire_len..]));
                }
                // quoted-pairSMTP = "\" %d32-126 (RFC 6531 adds UTF-8)
                '\\' => match chars.next() {
                    Some((_, q)) if q == ' ' || q.is_ascii_graphic() || !q.is_ascii() => {
                        value.push(q)
                    }
                    _ => return Err(AddressError::InvalidLocalPart),
                },
                // qtextSMTP = %d32-33 / %d35-91 / %d93-126 (plus UTF-8)
                c if c == ' ' || c.is_ascii_graphic() || !c.is_ascii() => value.push(c),
                _ => return Err(AddressError::InvalidLocalPart),
            }
        }
        return Err(AddressError::InvalidLocalPart);
    }
    let end = s.find('@').ok_or(AddressError::MissingDomain)?;
    let local = &s[..end];
    if local.is_empty() {
        return Err(AddressError::Empty);
    }
    if !is_dot_string(local) {
        return Err(AddressError::InvalidLocalPart);
    }
    Ok((local.to_owned(), end, &s[end..]))
}

/// Domain / address-literal after the `@`; returns the normalised domain text.
fn parse_domain(s: &str) -> Result<(String, Option<IpAddr>), AddressError> {
    if let Some(inner) = s.strip_prefix('[') {
        let content = inner
            .strip_suffix(']')
            .ok_or(AddressError::InvalidAddressLiteral)?;
        let ip = parse_address_literal(content)?;
        let text = match ip {
            IpAddr::V4(v4) => format!("[{v4}]"),
            IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
        };
        return Ok((text, Some(ip)));
    }
    // One trailing dot is the absolute form of the same name.
    let name = s.strip_suffix('.').unwrap_or(s);
    if name.is_empty() {
        return Err(AddressError::InvalidDomain);
    }
    if name.len() > MAX_DOMAIN {
        return Err(AddressError::DomainTooLong);
    }
    for label in name.split('.') {
        if !is_label(label) {
            return Err(AddressError::InvalidDomain);
        }
    }
    Ok((name.to_lowercase(), None))
}

/// IPv4-address-literal / "IPv6:" IPv6-addr (RFC 5321 §4.1.3). Rust's parsers are strict
/// (no leading zeros in IPv4 octets, no zone ids), which is what we want for a literal.
fn parse_address_literal(content: &str) -> Result<IpAddr, AddressError> {
    if content.len() > 5 && content.is_char_boundary(5) {
        let (tag, rest) = content.split_at(5);
        if tag.eq_ignore_ascii_case("IPv6:") {
            return rest
                .parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| AddressError::InvalidAddressLiteral);
        }
    }
    content
        .parse::<Ipv4Addr>()
        .map(IpAddr::V4)
        .map_err(|_| AddressError::InvalidAddressLiteral)
}

/// sub-domain = Let-dig [Ldh-str] (RFC 5321), at most 63 octets (RFC 1035 §2.3.4); with
/// SMTPUTF8 a U-label may contain non-ASCII characters (RFC 6531 §3.3).
fn is_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(&first), Some(&last)) => {
            bytes.len() <= 63
                && first != b'-'
                && last != b'-'
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
        }
        _ => false,
    }
}

/// Dot-string = Atom *("." Atom), Atom = 1*atext (RFC 5321 §4.1.2; RFC 6531 adds UTF-8).
fn is_dot_string(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// atext (RFC 5322 §3.2.3) plus UTF8-non-ascii (RFC 6531 §3.3).
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || "!#$%&'*+-/=?^_`{|}~".contains(c)
        || (!c.is_ascii() && !c.is_control())
}

/// Quoted-string form of a local part.
fn quote(local: &str) -> String {
    let mut out = String::with_capacity(local.len() + 2);
    out.push('"');
    for c in local.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    fn ok(s: &str, utf8: bool) -> (String, String) {
        let a = parse_forward_path(s, utf8).unwrap_or_else(|e| panic!("{s:?}: {e}"));
        (a.local_part().to_owned(), a.domain().to_owned())
    }

    #[test]
    fn valid_forward_paths() {
        let cases: &[(&str, bool, &str, &str, &str)] = &[
            // input, smtputf8, local, domain, display
            (
                "user@example.test",
                false,
                "user",
                "example.test",
                "user@example.test",
            ),
            (
                "User.Name+tag@Example.TEST",
                false,
                "User.Name+tag",
                "example.test",
                "User.Name+tag@example.test",
            ),
            // Trailing dot normalised (OR-17).
            (
                "user@remote.test.",
                false,
                "user",
                "remote.test",
                "user@remote.test",
            ),
            (
                "USER@OurDomain.COM",
                false,
                "USER",
                "ourdomain.com",
                "USER@ourdomain.com",
            ),
            // Source routes: accepted, route dropped (OR-12, OR-13).
            (
                "@srv.test:relaytest@d.test",
                false,
                "relaytest",
                "d.test",
                "relaytest@d.test",
            ),
            (
                "@a.test,@b.test:user@c.test",
                false,
                "user",
                "c.test",
                "user@c.test",
            ),
            // Percent hack and bang paths stay literal local parts (OR-5, OR-6, OR-15, OR-16).
            (
                "relaytest%d.test@srv.test",
                false,
                "relaytest%d.test",
                "srv.test",
                "relaytest%d.test@srv.test",
            ),
            (
                "d.test!relaytest@srv.test",
                false,
                "d.test!relaytest",
                "srv.test",
                "d.test!relaytest@srv.test",
            ),
            (
                "d.test!relaytest@[192.0.2.1]",
                false,
                "d.test!relaytest",
                "[192.0.2.1]",
                "d.test!relaytest@[192.0.2.1]",
            ),
            // Quoted local parts: unquoted value, re-quoted on display (OR-10).
            (
                "\"user@remote\"@local.test",
                false,
                "user@remote",
                "local.test",
                "\"user@remote\"@local.test",
            ),
            (
                "\"relaytest@d.test\"@[192.0.2.1]",
                false,
                "relaytest@d.test",
                "[192.0.2.1]",
                "\"relaytest@d.test\"@[192.0.2.1]",
            ),
            ("\"a b\"@x.test", false, "a b", "x.test", "\"a b\"@x.test"),
            (
                "\"a\\\"b\\\\c\"@x.test",
                false,
                "a\"b\\c",
                "x.test",
                "\"a\\\"b\\\\c\"@x.test",
            ),
            ("\"plain\"@x.test", false, "plain", "x.test", "plain@x.test"),
            // Address literals, canonicalised (OR-18: the session refuses them).
            (
                "user@[127.0.0.1]",
                false,
                "user",
                "[127.0.0.1]",
                "user@[127.0.0.1]",
            ),
            (
                "user@[IPv6:::1]",
                false,
                "user",
                "[IPv6:::1]",
                "user@[IPv6:::1]",
            ),
            (
                "user@[ipv6:2001:DB8:0:0::1]",
                false,
                "user",
                "[IPv6:2001:db8::1]",
                "user@[IPv6:2001:db8::1]",
            ),
            // Digits-only labels are valid names (not literals).
            ("a@1.2.3.4", false, "a", "1.2.3.4", "a@1.2.3.4"),
            (
                "a@xn--bcher-kva.example",
                false,
                "a",
                "xn--bcher-kva.example",
                "a@xn--bcher-kva.example",
            ),
            // SMTPUTF8 (EXT-04); U-label lower-cased.
            (
                "用户@例子.广告",
                true,
                "用户",
                "例子.广告",
                "用户@例子.广告",
            ),
            (
                "Jöran@BÜCHER.example",
                true,
                "Jöran",
                "bücher.example",
                "Jöran@bücher.example",
            ),
            // Bare postmaster (RFC 5321 §4.1.1.3).
            ("Postmaster", false, "Postmaster", "", "Postmaster"),
        ];
        for &(input, utf8, local, domain, display) in cases {
            let a = parse_forward_path(input, utf8).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!((a.local_part(), a.domain()), (local, domain), "{input:?}");
            assert_eq!(a.to_string(), display, "{input:?}");
            // Display round-trips to the same address.
            if !a.is_bare_postmaster() {
                assert_eq!(
                    parse_forward_path(&a.to_string(), utf8),
                    Ok(a.clone()),
                    "{input:?}"
                );
            }
        }
    }

    #[test]
    fn invalid_forward_paths() {
        let long_local = format!("{}@x.test", "a".repeat(65));
        let long_label = format!("a@{}.test", "b".repeat(64));
        let long_domain = format!("a@{}", ["abcdefghi"; 26].join("."));
        let long_path = format!(
            "{}@{}.test",
            "a".repeat(60),
            ["b".repeat(60).as_str(); 4].join(".")
        );
        let cases: Vec<(&str, bool, AddressError)> = vec![
            ("", false, AddressError::Empty),
            ("@x.test", false, AddressError::InvalidSourceRoute),
            ("user", false, AddressError::MissingDomain),
            ("user@", false, AddressError::InvalidDomain),
            ("user@.", false, AddressError::InvalidDomain),
            ("user@remote.test..", false, AddressError::InvalidDomain),
            ("user@.remote.test", false, AddressError::InvalidDomain),
            ("user@-a.test", false, AddressError::InvalidDomain),
            ("user@a-.test", false, AddressError::InvalidDomain),
            ("user@a_b.test", false, AddressError::InvalidDomain),
            ("user@a b.test", false, AddressError::InvalidDomain),
            // Bang path without domain (OR-14), quoted local part only (OR-7, OR-8).
            ("d.test!relaytest", false, AddressError::MissingDomain),
            ("\"relaytest@d.test\"", false, AddressError::MissingDomain),
            ("\"relaytest%d.test\"", false, AddressError::MissingDomain),
            // Double @ (OR-9, OR-11).
            (
                "relaytest@d.test@[192.0.2.1]",
                false,
                AddressError::InvalidDomain,
            ),
            (
                "relaytest@d.test@srv.test",
                false,
                AddressError::InvalidDomain,
            ),
            ("a..b@x.test", false, AddressError::InvalidLocalPart),
            (".a@x.test", false, AddressError::InvalidLocalPart),
            ("a.@x.test", false, AddressError::InvalidLocalPart),
            ("a b@x.test", false, AddressError::InvalidLocalPart),
            ("a(b)@x.test", false, AddressError::InvalidLocalPart),
            ("\"\"@x.test", false, AddressError::InvalidLocalPart),
            ("\"abc@x.test", false, AddressError::InvalidLocalPart),
            ("\"a\"b@x.test", false, AddressError::MissingDomain),
            // Controls, including CRLF injection attempts.
            (
                "a\r\nRCPT TO:<b@c>@x.test",
                false,
                AddressError::ControlCharacter,
            ),
            ("a\0@x.test", false, AddressError::ControlCharacter),
            ("\"a\tb\"@x.test", false, AddressError::ControlCharacter),
            // UTF-8 without SMTPUTF8 (EXT-05).
            ("用户@例子.广告", false, AddressError::NonAscii),
            ("user@bücher.example", false, AddressError::NonAscii),
            // Literals.
            ("a@[1.2.3]", false, AddressError::InvalidAddressLiteral),
            ("a@[010.0.0.1]", false, AddressError::InvalidAddressLiteral),
            ("a@[256.0.0.1]", false, AddressError::InvalidAddressLiteral),
            (
                "a@[IPv6:1.2.3.4]",
                false,
                AddressError::InvalidAddressLiteral,
            ),
            ("a@[::1]", false, AddressError::InvalidAddressLiteral),
            ("a@[x-tag:foo]", false, AddressError::InvalidAddressLiteral),
            ("a@[1.2.3.4", false, AddressError::InvalidAddressLiteral),
            (
                "a@[IPv6:fe80::1%eth0]",
                false,
                AddressError::InvalidAddressLiteral,
            ),
            // Bad source routes.
            ("@:user@x.test", false, AddressError::InvalidSourceRoute),
            (
                "@a.test,b.test:user@x.test",
                false,
                AddressError::InvalidSourceRoute,
            ),
            (
                "@[1.2.3.4]:user@x.test",
                false,
                AddressError::InvalidSourceRoute,
            ),
            ("@a.test:", false, AddressError::Empty),
            // Limits (LIM-06).
            (&long_local, false, AddressError::LocalPartTooLong),
            (&long_label, false, AddressError::InvalidDomain),
            (&long_domain, false, AddressError::DomainTooLong),
            (&long_path, false, AddressError::PathTooLong),
        ];
        for (input, utf8, want) in cases {
            assert_eq!(
                parse_forward_path(input, utf8),
                Err(want.clone()),
                "{input:?}"
            );
        }
    }

    #[test]
    fn limits_are_inclusive() {
        let local64 = "a".repeat(64);
        assert_eq!(ok(&format!("{local64}@x.test"), false).0, local64);
        let label63 = "b".repeat(63);
        assert_eq!(
            ok(&format!("a@{label63}.test"), false).1,
            format!("{label63}.test")
        );
        // 254 octets inside the brackets = a 256-octet path.
        let path = format!(
            "{}@{}",
            "a".repeat(64),
            ["c".repeat(61).as_str(); 3].join(".") + ".abc"
        );
        assert_eq!(path.len(), 254);
        assert!(parse_forward_path(&path, false).is_ok());
        let too_long = format!("{path}c");
        assert_eq!(
            parse_forward_path(&too_long, false),
            Err(AddressError::PathTooLong)
        );
        // The quoted form counts as sent (64 octets including quotes).
        let quoted = format!("\"{}\"@x.test", "q".repeat(62));
        assert!(parse_forward_path(&quoted, false).is_ok());
        let quoted = format!("\"{}\"@x.test", "q".repeat(63));
        assert_eq!(
            parse_forward_path(&quoted, false),
            Err(AddressError::LocalPartTooLong)
        );
    }

    /// The relay decision is made on `domain()`; no spelling of a remote mailbox may produce a
    /// local domain, and no spelling of a local one a remote domain.
    #[test]
    fn relay_relevant_domains() {
        let local = "local.test";
        let cases: &[(&str, Option<&str>)] = &[
            ("user@remote.test.", Some("remote.test")),
            ("user@REMOTE.test", Some("remote.test")),
            ("user@local.test.", Some(local)),
            ("@local.test:user@remote.test", Some("remote.test")),
            ("@remote.test:user@local.test", Some(local)),
            ("user%remote.test@local.test", Some(local)),
            ("\"user@remote.test\"@local.test", Some(local)),
            ("remote.test!user@local.test", Some(local)),
            ("user@remote.test@local.test", None),
            ("user@local.test@remote.test", None),
            (
                "user@local.test.remote.test",
                Some("local.test.remote.test"),
            ),
            ("user@remote.test\0.local.test", None),
        ];
        for &(input, want) in cases {
            let got = parse_forward_path(input, false).ok();
            assert_eq!(got.as_ref().map(Address::domain), want, "{input:?}");
        }
    }

    #[test]
    fn reverse_paths() {
        assert_eq!(parse_reverse_path("", false), Ok(ReversePath::Null));
        assert!(parse_reverse_path("", false).unwrap().is_null());
        let rp = parse_reverse_path("a@b.test", false).unwrap();
        assert_eq!(rp.address().map(|a| a.domain()), Some("b.test"));
        assert_eq!(rp.to_string(), "a@b.test");
        // The bare postmaster form is only a recipient.
        assert_eq!(
            parse_reverse_path("postmaster", false),
            Err(AddressError::MissingDomain)
        );
        assert_eq!(
            parse_reverse_path("用户@例子.广告", false),
            Err(AddressError::NonAscii)
        );
    }

    #[test]
    fn utf8_flag_and_literal() {
        assert!(!parse_forward_path("a@b.test", true).unwrap().is_utf8());
        assert!(parse_forward_path("ä@b.test", true).unwrap().is_utf8());
        assert!(parse_forward_path("a@bä.test", true).unwrap().is_utf8());
        let a = parse_forward_path("a@[IPv6:::1]", false).unwrap();
        assert_eq!(a.ip_literal(), Some("::1".parse().unwrap()));
        assert!(
            parse_forward_path("a@b.test", false)
                .unwrap()
                .ip_literal()
                .is_none()
        );
        assert!(
            parse_forward_path("PostMaster@b.test", false)
                .unwrap()
                .is_postmaster()
        );
        let bare = parse_forward_path("postmaster", false).unwrap();
        assert!(bare.is_bare_postmaster() && bare.is_postmaster());
    }

    #[test]
    fn constructor_quotes_as_needed() {
        let a = Address::new("a b", "Example.TEST.").unwrap();
        assert_eq!(a.to_string(), "\"a b\"@example.test");
        assert_eq!(a.local_part(), "a b");
        assert!(Address::new("a", "bad domain").is_err());
    }

    #[test]
    fn error_replies() {
        let r = AddressError::InvalidDomain.sender_reply();
        assert_eq!((r.code, r.enhanced), (501, Some(EnhancedCode(5, 1, 7))));
        let r = AddressError::PathTooLong.recipient_reply();
        assert_eq!((r.code, r.enhanced), (501, Some(EnhancedCode(5, 1, 3))));
        let r = AddressError::NonAscii.recipient_reply();
        assert_eq!((r.code, r.enhanced), (553, Some(EnhancedCode(5, 6, 7))));
        let r = AddressError::NonAscii.sender_reply();
        assert_eq!((r.code, r.enhanced), (553, Some(EnhancedCode(5, 6, 7))));
    }
}
