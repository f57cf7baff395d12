//! SMTP command parser: one line (without CRLF) in, one typed [`Command`] out
//! (RFC 5321 §4.1 grammar, plus the ESMTP parameters of the extensions we advertise).
//!
//! Leniency choices, each pinned by a test:
//! * verbs and parameter keywords are case-insensitive (RFC 5321 §2.4);
//! * runs of spaces between words and trailing spaces are tolerated (common client habits that
//!   carry no ambiguity);
//! * `MAIL FROM: <a@b>` with spaces after the colon is **accepted**, like Postfix does, because
//!   deployed clients send it and the path is still delimited unambiguously;
//!   `MAIL FROM :<a@b>` and a path without angle brackets (`MAIL FROM:a@b`) are refused;
//! * after the closing `>` only the end of line or a space and parameters may follow, so
//!   `MAIL FROM:<>>>>>` is a syntax error, not a null path;
//! * unknown MAIL/RCPT parameters get `555`, duplicates and bad values `501`;
//! * NUL and other control characters anywhere, invalid UTF-8 anywhere, and non-ASCII outside
//!   an address path (or free text of NOOP/VRFY/HELP) are syntax errors;
//! * RCPT paths are parsed with UTF-8 allowed, because whether the transaction is SMTPUTF8 is
//!   session state: the session must refuse [`Address::is_utf8`] recipients with `553 5.6.7`
//!   unless MAIL carried SMTPUTF8 (RFC 6531 §3.6). MAIL paths are checked here against the
//!   command's own SMTPUTF8 parameter;
//! * ESMTP parameter values stay in their wire (xtext) form after validation, since they are
//!   passed on unchanged to a DSN-capable next hop (RFC 3461 §4);
//! * HTTP requests and header-looking lines are reported as [`CommandError::Forbidden`] so the
//!   session can hang up at once (cross-protocol defence, Postfix `smtpd_forbidden_commands`).

use std::fmt;

use super::address::{Address, AddressError, ReversePath, parse_forward_path, parse_reverse_path};
use super::{EnhancedCode, Reply};

/// One parsed SMTP command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `EHLO <domain-or-literal>` (the argument as sent; not resolved or validated as a name).
    Ehlo(String),
    /// `HELO <domain>`.
    Helo(String),
    /// `MAIL FROM:<reverse-path> [params]`.
    Mail {
        from: ReversePath,
        params: MailParams,
    },
    /// `RCPT TO:<forward-path> [params]`.
    Rcpt { to: Address, params: RcptParams },
    /// `DATA`.
    Data,
    /// `BDAT <size> [LAST]` (RFC 3030). The session must read `size` octets next, even when it
    /// refuses the command, or they would be taken as commands.
    Bdat { size: u64, last: bool },
    /// `RSET`.
    Rset,
    /// `NOOP [text]` (the text is ignored).
    Noop,
    /// `QUIT`.
    Quit,
    /// `VRFY <string>`.
    Vrfy(String),
    /// `HELP [topic]`.
    Help(Option<String>),
    /// `STARTTLS` (RFC 3207).
    StartTls,
    /// `AUTH <mechanism> [initial-response]` (RFC 4954). `mechanism` is upper-cased; the
    /// initial response is the raw base64 text (`=` means an empty response).
    Auth {
        mechanism: String,
        initial_response: Option<String>,
    },
}

/// Parameters of MAIL FROM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailParams {
    /// `SIZE=<n>` declared message size in octets (RFC 1870).
    pub size: Option<u64>,
    /// `BODY=7BIT|8BITMIME|BINARYMIME` (RFC 6152, RFC 3030).
    pub body: Option<BodyType>,
    /// `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
    /// `AUTH=<xtext mailbox>` or `AUTH=<>` (RFC 4954 §5), xtext-encoded as sent.
    pub auth: Option<String>,
    /// `ENVID=<xtext>` (RFC 3461 §4.4), as sent.
    pub envid: Option<String>,
    /// `RET=FULL|HDRS` (RFC 3461 §4.3), upper-cased.
    pub ret: Option<String>,
    /// `REQUIRETLS` (RFC 8689 §3): the message must only travel over verified TLS.
    pub requiretls: bool,
}

/// The `BODY=` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyType {
    /// `7BIT`
    SevenBit,
    /// `8BITMIME` (RFC 6152)
    EightBitMime,
    /// `BINARYMIME` (RFC 3030; only valid with BDAT)
    BinaryMime,
}

/// Parameters of RCPT TO.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcptParams {
    /// `NOTIFY=NEVER` or a comma list of `SUCCESS`, `FAILURE`, `DELAY` (RFC 3461 §4.1),
    /// upper-cased.
    pub notify: Option<String>,
    /// `ORCPT=<addr-type>;<xtext>` (RFC 3461 §4.2), as sent.
    pub orcpt: Option<String>,
}

/// Why a command line was refused. [`CommandError::reply`] gives the reply to send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Not an SMTP verb: `500 5.5.1`.
    #[error("command unrecognized")]
    Unknown,
    /// Bad arguments: `501 5.5.4`.
    #[error("{0}")]
    Syntax(String),
    /// An ESMTP parameter we do not support (the keyword, upper-cased): `555 5.5.4`.
    #[error("parameter {0} not recognized")]
    ParamNotRecognized(String),
    /// A known verb we deliberately do not implement (EXPN, TURN, ...): `502 5.5.1`.
    #[error("{0} not implemented")]
    NotImplemented(String),
    /// MAIL FROM path refused: `501 5.1.7`, or `553 5.6.7` for UTF-8 without SMTPUTF8.
    #[error("bad sender address: {0}")]
    BadSender(AddressError),
    /// RCPT TO path refused: `501 5.1.3`, or `553 5.6.7`.
    #[error("bad recipient address: {0}")]
    BadRecipient(AddressError),
    /// A BDAT command whose size cannot be read: `501 5.5.4`, and the session must close the
    /// connection, since it cannot know how many octets of chunk data follow
    /// ([`CommandError::closes_connection`]).
    #[error("{0}")]
    BadBdat(String),
    /// An HTTP request or header line on the SMTP port: `554 5.7.0`, and close.
    #[error("{0}")]
    Forbidden(&'static str),
}

impl CommandError {
    /// The reply to send for this error.
    pub fn reply(&self) -> Reply {
        match self {
            Self::Unknown => Reply::unknown_command(),
            Self::Syntax(text) => Reply::syntax_error(text.clone()),
            Self::ParamNotRecognized(_) => {
                Reply::param_not_recognized(capitalise(&self.to_string()))
            }
            Self::NotImplemented(_) => Reply::not_implemented(capitalise(&self.to_string())),
            Self::BadSender(e) => e.sender_reply(),
            Self::BadRecipient(e) => e.recipient_reply(),
            Self::BadBdat(text) => Reply::syntax_error(text.clone()),
            Self::Forbidden(text) => Reply::new(554, EnhancedCode(5, 7, 0), *text),
        }
    }

    /// Whether the session must close the connection after sending [`CommandError::reply`].
    pub fn closes_connection(&self) -> bool {
        matches!(self, Self::BadBdat(_) | Self::Forbidden(_))
    }
}

impl Command {
    /// The verb, upper-case, for logs and metrics.
    pub fn verb(&self) -> &'static str {
        match self {
            Self::Ehlo(_) => "EHLO",
            Self::Helo(_) => "HELO",
            Self::Mail { .. } => "MAIL",
            Self::Rcpt { .. } => "RCPT",
            Self::Data => "DATA",
            Self::Bdat { .. } => "BDAT",
            Self::Rset => "RSET",
            Self::Noop => "NOOP",
            Self::Quit => "QUIT",
            Self::Vrfy(_) => "VRFY",
            Self::Help(_) => "HELP",
            Self::StartTls => "STARTTLS",
            Self::Auth { .. } => "AUTH",
        }
    }
}

impl fmt::Display for BodyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::SevenBit => "7BIT",
            Self::EightBitMime => "8BITMIME",
            Self::BinaryMime => "BINARYMIME",
        })
    }
}

/// RFC 3461 §4.4: "The ENVID ... MUST NOT exceed 100 characters" (xtext-encoded).
pub(crate) const MAX_ENVID: usize = 100;
/// RFC 3461 §4.2: the ORCPT value "MUST NOT exceed 500 characters".
pub(crate) const MAX_ORCPT: usize = 500;
/// RFC 4954 §5: the AUTH= parameter adds at most 500 characters to MAIL.
pub(crate) const MAX_AUTH_PARAM: usize = 500;
/// RFC 1870 §3: size-value ::= 1*20DIGIT.
const MAX_SIZE_DIGITS: usize = 20;
/// RFC 4422 §3.1: a SASL mechanism name is 1 to 20 characters.
const MAX_SASL_MECH: usize = 20;

/// Parses one command line (without its CRLF).
pub fn parse_command(line: &[u8]) -> Result<Command, CommandError> {
    if line.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(syntax("Control characters are not allowed in commands"));
    }
    let line = std::str::from_utf8(line).map_err(|_| syntax("Command is not valid UTF-8"))?;
    let line = line.trim_end_matches(' ');
    let (verb, rest) = match line.split_once(' ') {
        Some((verb, rest)) => (verb, rest.trim_start_matches(' ')),
        None => (line, ""),
    };
    if !verb.is_ascii() || verb.is_empty() {
        return Err(CommandError::Unknown);
    }
    match verb.to_ascii_uppercase().as_str() {
        "EHLO" => Ok(Command::Ehlo(parse_hello_arg("EHLO", rest)?)),
        "HELO" => Ok(Command::Helo(parse_hello_arg("HELO", rest)?)),
        "MAIL" => parse_mail(rest),
        "RCPT" => parse_rcpt(rest),
        "DATA" => no_args("DATA", rest).map(|()| Command::Data),
        "BDAT" => parse_bdat(rest),
        "RSET" => no_args("RSET", rest).map(|()| Command::Rset),
        "NOOP" => Ok(Command::Noop),
        "QUIT" => no_args("QUIT", rest).map(|()| Command::Quit),
        "STARTTLS" => no_args("STARTTLS", rest).map(|()| Command::StartTls),
        "VRFY" if rest.is_empty() => Err(syntax("Syntax: VRFY <address>")),
        "VRFY" => Ok(Command::Vrfy(rest.to_owned())),
        "HELP" => Ok(Command::Help((!rest.is_empty()).then(|| rest.to_owned()))),
        "AUTH" => parse_auth(rest),
        "EXPN" | "TURN" | "ETRN" | "ATRN" | "SEND" | "SOML" | "SAML" | "VERB" => {
            Err(CommandError::NotImplemented(verb.to_ascii_uppercase()))
        }
        "GET" | "POST" | "HEAD" | "PUT" | "CONNECT" | "OPTIONS" | "DELETE" | "PATCH" | "TRACE" => {
            Err(CommandError::Forbidden(
                "HTTP request on an SMTP port; goodbye",
            ))
        }
        _ if verb.len() > 1 && verb.ends_with(':') => Err(CommandError::Forbidden(
            "Header line sent as a command; goodbye",
        )),
        _ => Err(CommandError::Unknown),
    }
}

fn syntax(text: &str) -> CommandError {
    CommandError::Syntax(text.to_owned())
}

fn capitalise(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn no_args(verb: &str, rest: &str) -> Result<(), CommandError> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(CommandError::Syntax(format!(
            "Syntax: {verb} (no parameters allowed)"
        )))
    }
}

/// EHLO/HELO take exactly one word. Its syntax as a domain or literal is not enforced (many
/// real clients send bare host names); it is ASCII and free of controls, so it is safe to
/// write into a Received header.
fn parse_hello_arg(verb: &str, rest: &str) -> Result<String, CommandError> {
    if rest.is_empty() || rest.contains(' ') || !rest.is_ascii() {
        return Err(CommandError::Syntax(format!("Syntax: {verb} <hostname>")));
    }
    Ok(rest.to_owned())
}

fn parse_mail(rest: &str) -> Result<Command, CommandError> {
    let after =
        strip_keyword(rest, "FROM:").ok_or_else(|| syntax("Syntax: MAIL FROM:<address>"))?;
    let (path, params) = split_path(after)?;
    let params = parse_mail_params(params)?;
    let from = parse_reverse_path(path, params.smtputf8).map_err(CommandError::BadSender)?;
    Ok(Command::Mail { from, params })
}

fn parse_rcpt(rest: &str) -> Result<Command, CommandError> {
    let after = strip_keyword(rest, "TO:").ok_or_else(|| syntax("Syntax: RCPT TO:<address>"))?;
    let (path, params) = split_path(after)?;
    let params = parse_rcpt_params(params)?;
    let to = parse_forward_path(path, true).map_err(CommandError::BadRecipient)?;
    Ok(Command::Rcpt { to, params })
}

/// Case-insensitive `FROM:` / `TO:` prefix, then any number of spaces (SYN-08 leniency).
fn strip_keyword<'a>(rest: &'a str, keyword: &str) -> Option<&'a str> {
    let head = rest.get(..keyword.len())?;
    head.eq_ignore_ascii_case(keyword)
        .then(|| rest[keyword.len()..].trim_start_matches(' '))
}

/// Splits `<path> params` into the text between the brackets and the parameter text. A `>`
/// inside a quoted local part does not close the path.
fn split_path(s: &str) -> Result<(&str, &str), CommandError> {
    let inner = s
        .strip_prefix('<')
        .ok_or_else(|| syntax("Address must be enclosed in <>"))?;
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in inner.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '>' if !in_quotes => {
                let after = &inner[i + 1..];
                if !after.is_empty() && !after.starts_with(' ') {
                    return Err(syntax("Unexpected characters after the address"));
                }
                return Ok((&inner[..i], after.trim_start_matches(' ')));
            }
            _ => {}
        }
    }
    Err(syntax("Missing '>' after the address"))
}

/// esmtp-param = esmtp-keyword ["=" esmtp-value] (RFC 5321 §4.1.2). Yields the upper-cased
/// keyword and the value.
fn esmtp_params(s: &str) -> impl Iterator<Item = Result<(String, Option<&str>), CommandError>> {
    s.split(' ').filter(|p| !p.is_empty()).map(|param| {
        let (keyword, value) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param, None),
        };
        let keyword_ok = keyword
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
            && keyword
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !keyword_ok {
            return Err(CommandError::Syntax(format!("Invalid parameter {param:?}")));
        }
        // esmtp-value = 1*(%d33-60 / %d62-126): printable ASCII without "=" and space.
        if let Some(v) = value
            && (v.is_empty() || !v.bytes().all(|b| b.is_ascii_graphic() && b != b'='))
        {
            return Err(CommandError::Syntax(format!(
                "Invalid value for parameter {}",
                keyword.to_ascii_uppercase()
            )));
        }
        Ok((keyword.to_ascii_uppercase(), value))
    })
}

fn set_once<T>(slot: &mut Option<T>, keyword: &str, value: T) -> Result<(), CommandError> {
    if slot.is_some() {
        return Err(CommandError::Syntax(format!(
            "Duplicate {keyword} parameter"
        )));
    }
    *slot = Some(value);
    Ok(())
}

fn required<'a>(keyword: &str, value: Option<&'a str>) -> Result<&'a str, CommandError> {
    value.ok_or_else(|| CommandError::Syntax(format!("{keyword} requires a value")))
}

fn parse_mail_params(s: &str) -> Result<MailParams, CommandError> {
    let mut params = MailParams::default();
    let mut seen_smtputf8 = false;
    for param in esmtp_params(s) {
        let (keyword, value) = param?;
        match keyword.as_str() {
            "SIZE" => {
                let v = required("SIZE", value)?;
                set_once(
                    &mut params.size,
                    "SIZE",
                    parse_decimal(v).ok_or_else(|| syntax("Invalid SIZE value"))?,
                )?;
            }
            "BODY" => {
                let body = match required("BODY", value)?.to_ascii_uppercase().as_str() {
                    "7BIT" => BodyType::SevenBit,
                    "8BITMIME" => BodyType::EightBitMime,
                    "BINARYMIME" => BodyType::BinaryMime,
                    _ => return Err(syntax("Invalid BODY value")),
                };
                set_once(&mut params.body, "BODY", body)?;
            }
            "SMTPUTF8" => {
                if value.is_some() {
                    return Err(syntax("SMTPUTF8 takes no value"));
                }
                if seen_smtputf8 {
                    return Err(syntax("Duplicate SMTPUTF8 parameter"));
                }
                seen_smtputf8 = true;
                params.smtputf8 = true;
            }
            "REQUIRETLS" => {
                if value.is_some() {
                    return Err(syntax("REQUIRETLS takes no value"));
                }
                if params.requiretls {
                    return Err(syntax("Duplicate REQUIRETLS parameter"));
                }
                params.requiretls = true;
            }
            "AUTH" => {
                let v = required("AUTH", value)?;
                if v != "<>" && (v.len() > MAX_AUTH_PARAM || !is_xtext(v)) {
                    return Err(syntax("Invalid AUTH value"));
                }
                set_once(&mut params.auth, "AUTH", v.to_owned())?;
            }
            "ENVID" => {
                let v = required("ENVID", value)?;
                if v.len() > MAX_ENVID || !is_xtext(v) {
                    return Err(syntax("Invalid ENVID value"));
                }
                set_once(&mut params.envid, "ENVID", v.to_owned())?;
            }
            "RET" => {
                let v = required("RET", value)?.to_ascii_uppercase();
                if v != "FULL" && v != "HDRS" {
                    return Err(syntax("Invalid RET value"));
                }
                set_once(&mut params.ret, "RET", v)?;
            }
            _ => return Err(CommandError::ParamNotRecognized(keyword)),
        }
    }
    Ok(params)
}

fn parse_rcpt_params(s: &str) -> Result<RcptParams, CommandError> {
    let mut params = RcptParams::default();
    for param in esmtp_params(s) {
        let (keyword, value) = param?;
        match keyword.as_str() {
            "NOTIFY" => {
                let v = required("NOTIFY", value)?.to_ascii_uppercase();
                if !is_valid_notify(&v) {
                    return Err(syntax("Invalid NOTIFY value"));
                }
                set_once(&mut params.notify, "NOTIFY", v)?;
            }
            "ORCPT" => {
                let v = required("ORCPT", value)?;
                if v.len() > MAX_ORCPT || !is_valid_orcpt(v) {
                    return Err(syntax("Invalid ORCPT value"));
                }
                set_once(&mut params.orcpt, "ORCPT", v.to_owned())?;
            }
            _ => return Err(CommandError::ParamNotRecognized(keyword)),
        }
    }
    Ok(params)
}

/// `BDAT <size> [LAST]` (RFC 3030 §2). Any error here must close the connection.
fn parse_bdat(rest: &str) -> Result<Command, CommandError> {
    let mut words = rest.split(' ').filter(|w| !w.is_empty());
    let size = words
        .next()
        .and_then(parse_decimal)
        .ok_or_else(|| CommandError::BadBdat("Syntax: BDAT <size> [LAST]".to_owned()))?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => {
            return Err(CommandError::BadBdat(
                "Syntax: BDAT <size> [LAST]".to_owned(),
            ));
        }
    };
    if words.next().is_some() {
        return Err(CommandError::BadBdat(
            "Syntax: BDAT <size> [LAST]".to_owned(),
        ));
    }
    Ok(Command::Bdat { size, last })
}

/// `AUTH <mechanism> [initial-response]` (RFC 4954 §4).
fn parse_auth(rest: &str) -> Result<Command, CommandError> {
    let mut words = rest.split(' ').filter(|w| !w.is_empty());
    let mechanism = words
        .next()
        .ok_or_else(|| syntax("Syntax: AUTH <mechanism> [initial-response]"))?;
    // sasl-mech = 1*20 (UPPER-ALPHA / DIGIT / "-" / "_") (RFC 4422 §3.1), case-folded here.
    if mechanism.len() > MAX_SASL_MECH
        || !mechanism
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(syntax("Invalid mechanism name"));
    }
    let initial_response = words.next().map(str::to_owned);
    if words.next().is_some() || initial_response.as_deref().is_some_and(|r| !r.is_ascii()) {
        return Err(syntax("Syntax: AUTH <mechanism> [initial-response]"));
    }
    Ok(Command::Auth {
        mechanism: mechanism.to_ascii_uppercase(),
        initial_response,
    })
}

/// 1*20DIGIT that fits in a u64 (no sign, no spaces: `u64::from_str` alone accepts `+5`).
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > MAX_SIZE_DIGITS || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// xtext = *( xchar / hexchar ) (RFC 3461 §4): printable ASCII except "+" and "=", or "+"
/// followed by two hex digits (upper case per the RFC; lower case tolerated).
pub(crate) fn is_xtext(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = |j: usize| b.get(j).is_some_and(u8::is_ascii_hexdigit);
                if !(hex(i + 1) && hex(i + 2)) {
                    return false;
                }
                i += 3;
            }
            b'=' => return false,
            c if (33..=126).contains(&c) => i += 1,
            _ => return false,
        }
    }
    true
}

/// NOTIFY = "NEVER" / 1#( "SUCCESS" / "FAILURE" / "DELAY" ) without repeats (RFC 3461 §4.1).
pub(crate) fn is_valid_notify(v: &str) -> bool {
    if v == "NEVER" {
        return true;
    }
    let mut seen: Vec<&str> = Vec::new();
    for item in v.split(',') {
        if !matches!(item, "SUCCESS" | "FAILURE" | "DELAY") || seen.contains(&item) {
            return false;
        }
        seen.push(item);
    }
    true
}

/// ORCPT = addr-type ";" xtext, addr-type = atom (RFC 3461 §4.2).
pub(crate) fn is_valid_orcpt(v: &str) -> bool {
    match v.split_once(';') {
        Some((addr_type, addr)) => {
            !addr_type.is_empty()
                && addr_type
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b))
                && !addr.is_empty()
                && is_xtext(addr)
        }
        None => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    fn addr(s: &str) -> Address {
        parse_forward_path(s, true).unwrap()
    }

    fn mail(s: &str, params: MailParams) -> Command {
        let from = if s.is_empty() {
            ReversePath::Null
        } else {
            ReversePath::Address(addr(s))
        };
        Command::Mail { from, params }
    }

    fn rcpt(s: &str) -> Command {
        Command::Rcpt {
            to: addr(s),
            params: RcptParams::default(),
        }
    }

    #[test]
    fn valid_commands() {
        let cases: Vec<(&str, Command)> = vec![
            (
                "EHLO client.example",
                Command::Ehlo("client.example".into()),
            ),
            (
                "ehlo client.example",
                Command::Ehlo("client.example".into()),
            ),
            ("EHLO [192.0.2.1]", Command::Ehlo("[192.0.2.1]".into())),
            ("EHLO   spaced  ", Command::Ehlo("spaced".into())),
            ("HELO client", Command::Helo("client".into())),
            (
                "MAIL FROM:<a@b.test>",
                mail("a@b.test", MailParams::default()),
            ),
            // SYN-07: lower-case verbs and keywords.
            (
                "mail from:<a@b.test>",
                mail("a@b.test", MailParams::default()),
            ),
            // SYN-08: space after the colon tolerated.
            (
                "MAIL FROM: <a@b.test>",
                mail("a@b.test", MailParams::default()),
            ),
            (
                "MAIL FROM:  <a@b.test>",
                mail("a@b.test", MailParams::default()),
            ),
            ("MAIL FROM:<>", mail("", MailParams::default())),
            ("MAIL FROM:<> ", mail("", MailParams::default())),
            (
                "MAIL FROM:<a@b.test> SIZE=1000 BODY=8BITMIME",
                mail(
                    "a@b.test",
                    MailParams {
                        size: Some(1000),
                        body: Some(BodyType::EightBitMime),
                        ..Default::default()
                    },
                ),
            ),
            (
                "MAIL FROM:<a@b.test> size=0 body=7bit",
                mail(
                    "a@b.test",
                    MailParams {
                        size: Some(0),
                        body: Some(BodyType::SevenBit),
                        ..Default::default()
                    },
                ),
            ),
            (
                "MAIL FROM:<a@b.test> BODY=BINARYMIME",
                mail(
                    "a@b.test",
                    MailParams {
                        body: Some(BodyType::BinaryMime),
                        ..Default::default()
                    },
                ),
            ),
            (
                "MAIL FROM:<a@b.test> SIZE=18446744073709551615",
                mail(
                    "a@b.test",
                    MailParams {
                        size: Some(u64::MAX),
                        ..Default::default()
                    },
                ),
            ),
            // EXT-04: UTF-8 sender with SMTPUTF8.
            (
                "MAIL FROM:<用户@例子.广告> SMTPUTF8",
                mail(
                    "用户@例子.广告",
                    MailParams {
                        smtputf8: true,
                        ..Default::default()
                    },
                ),
            ),
            // RFC 8689: REQUIRETLS takes no value.
            (
                "MAIL FROM:<a@b.test> requiretls",
                mail(
                    "a@b.test",
                    MailParams {
                        requiretls: true,
                        ..Default::default()
                    },
                ),
            ),
            // EXT-08: DSN parameters.
            (
                "MAIL FROM:<a@b.test> RET=hdrs ENVID=QQ314159",
                mail(
                    "a@b.test",
                    MailParams {
                        ret: Some("HDRS".into()),
                        envid: Some("QQ314159".into()),
                        ..Default::default()
                    },
                ),
            ),
            (
                "MAIL FROM:<a@b.test> AUTH=<>",
                mail(
                    "a@b.test",
                    MailParams {
                        auth: Some("<>".into()),
                        ..Default::default()
                    },
                ),
            ),
            (
                "MAIL FROM:<a@b.test> AUTH=e+3Dmc2@example.com",
                mail(
                    "a@b.test",
                    MailParams {
                        auth: Some("e+3Dmc2@example.com".into()),
                        ..Default::default()
                    },
                ),
            ),
            ("RCPT TO:<c@d.test>", rcpt("c@d.test")),
            ("RCPT TO: <c@d.test>", rcpt("c@d.test")),
            ("rcpt to:<C@D.TEST.>", rcpt("C@d.test")),
            // RFC 5321 §4.1.1.3 special recipient.
            (
                "RCPT TO:<Postmaster>",
                Command::Rcpt {
                    to: parse_forward_path("Postmaster", false).unwrap(),
                    params: RcptParams::default(),
                },
            ),
            // OR-13: source route accepted, dropped.
            (
                "RCPT TO:<@srv.test:relaytest@d.test>",
                rcpt("relaytest@d.test"),
            ),
            // A '>' inside a quoted local part does not end the path.
            ("RCPT TO:<\"a>b\"@d.test>", rcpt("\"a>b\"@d.test")),
            // UTF-8 recipient: parsed; the session checks is_utf8() against the transaction.
            ("RCPT TO:<用户@例子.广告>", rcpt("用户@例子.广告")),
            (
                "RCPT TO:<b@x.test> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;B@x.test",
                Command::Rcpt {
                    to: addr("b@x.test"),
                    params: RcptParams {
                        notify: Some("SUCCESS,FAILURE,DELAY".into()),
                        orcpt: Some("rfc822;B@x.test".into()),
                    },
                },
            ),
            (
                "RCPT TO:<b@x.test> notify=never",
                Command::Rcpt {
                    to: addr("b@x.test"),
                    params: RcptParams {
                        notify: Some("NEVER".into()),
                        orcpt: None,
                    },
                },
            ),
            ("DATA", Command::Data),
            ("data ", Command::Data),
            (
                "BDAT 86 LAST",
                Command::Bdat {
                    size: 86,
                    last: true,
                },
            ),
            (
                "BDAT 0 last",
                Command::Bdat {
                    size: 0,
                    last: true,
                },
            ),
            (
                "BDAT 1000",
                Command::Bdat {
                    size: 1000,
                    last: false,
                },
            ),
            // EXT-15: fits in u64, so the session answers 552 from its size limit.
            (
                "BDAT 18446744073709551615 LAST",
                Command::Bdat {
                    size: u64::MAX,
                    last: true,
                },
            ),
            ("RSET", Command::Rset),
            ("NOOP", Command::Noop),
            ("NOOP some text", Command::Noop),
            ("QUIT", Command::Quit),
            ("VRFY user", Command::Vrfy("user".into())),
            ("HELP", Command::Help(None)),
            ("HELP MAIL", Command::Help(Some("MAIL".into()))),
            ("STARTTLS", Command::StartTls),
            ("starttls", Command::StartTls),
            (
                "AUTH PLAIN",
                Command::Auth {
                    mechanism: "PLAIN".into(),
                    initial_response: None,
                },
            ),
            (
                "auth login",
                Command::Auth {
                    mechanism: "LOGIN".into(),
                    initial_response: None,
                },
            ),
            (
                "AUTH PLAIN AHVzZXIAcGFzcw==",
                Command::Auth {
                    mechanism: "PLAIN".into(),
                    initial_response: Some("AHVzZXIAcGFzcw==".into()),
                },
            ),
            (
                "AUTH PLAIN =",
                Command::Auth {
                    mechanism: "PLAIN".into(),
                    initial_response: Some("=".into()),
                },
            ),
            (
                "AUTH SCRAM-SHA-256",
                Command::Auth {
                    mechanism: "SCRAM-SHA-256".into(),
                    initial_response: None,
                },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse_command(line.as_bytes()), Ok(want), "{line:?}");
        }
    }

    #[test]
    fn invalid_commands() {
        use CommandError as E;
        let s = |t: &str| E::Syntax(t.to_owned());
        let cases: Vec<(&[u8], CommandError)> = vec![
            (b"", E::Unknown),
            (b"FOO", E::Unknown),
            (b"FOO bar", E::Unknown),
            (b" MAIL FROM:<a@b.test>", E::Unknown),
            (b"MAILFROM:<a@b.test>", E::Unknown),
            (b"\xc3\xa9HLO x", E::Unknown),
            // SYN-03
            (b"EHLO", s("Syntax: EHLO <hostname>")),
            (b"HELO", s("Syntax: HELO <hostname>")),
            (b"EHLO a b", s("Syntax: EHLO <hostname>")),
            (
                "EHLO bücher.example".as_bytes(),
                s("Syntax: EHLO <hostname>"),
            ),
            // NUL, controls, invalid UTF-8: syntax errors, never panics.
            (
                b"MAIL FROM:<a\0@b.test>",
                s("Control characters are not allowed in commands"),
            ),
            (
                b"NOOP\0",
                s("Control characters are not allowed in commands"),
            ),
            (
                b"MAIL\tFROM:<a@b.test>",
                s("Control characters are not allowed in commands"),
            ),
            (
                b"RCPT TO:<a@b.test>\r",
                s("Control characters are not allowed in commands"),
            ),
            (b"MAIL FROM:<\xff@b.test>", s("Command is not valid UTF-8")),
            (b"\xff\xfe", s("Command is not valid UTF-8")),
            // MAIL/RCPT framing.
            (b"MAIL", s("Syntax: MAIL FROM:<address>")),
            (b"MAIL TO:<a@b.test>", s("Syntax: MAIL FROM:<address>")),
            (b"MAIL FROM :<a@b.test>", s("Syntax: MAIL FROM:<address>")),
            (b"MAIL FROM:a@b.test", s("Address must be enclosed in <>")),
            (b"MAIL FROM:", s("Address must be enclosed in <>")),
            (b"MAIL FROM:<a@b.test", s("Missing '>' after the address")),
            // SYN-09
            (
                b"MAIL FROM:<>>>>>",
                s("Unexpected characters after the address"),
            ),
            (
                b"MAIL FROM:<a@b.com>>>",
                s("Unexpected characters after the address"),
            ),
            (
                b"MAIL FROM:<a@b.test>SIZE=10",
                s("Unexpected characters after the address"),
            ),
            (
                b"RCPT TO:<a@b.test>x",
                s("Unexpected characters after the address"),
            ),
            (b"RCPT FROM:<a@b.test>", s("Syntax: RCPT TO:<address>")),
            (b"RCPT TO:<>", E::BadRecipient(AddressError::Empty)),
            (
                b"RCPT TO:<d.test!relaytest>",
                E::BadRecipient(AddressError::MissingDomain),
            ),
            (
                b"RCPT TO:<relaytest@d.test@srv.test>",
                E::BadRecipient(AddressError::InvalidDomain),
            ),
            (
                b"MAIL FROM:<postmaster>",
                E::BadSender(AddressError::MissingDomain),
            ),
            // EXT-05: UTF-8 sender without SMTPUTF8.
            (
                "MAIL FROM:<用户@例子.广告>".as_bytes(),
                E::BadSender(AddressError::NonAscii),
            ),
            // Parameters: unknown 555, duplicate/bad 501 (EXT-02, EXT-09, SIZE-04).
            (
                b"MAIL FROM:<a@b.test> FOO=bar",
                E::ParamNotRecognized("FOO".into()),
            ),
            (
                b"MAIL FROM:<a@b.test> NOTIFY=NEVER",
                E::ParamNotRecognized("NOTIFY".into()),
            ),
            (
                b"RCPT TO:<a@b.test> SIZE=10",
                E::ParamNotRecognized("SIZE".into()),
            ),
            (
                b"MAIL FROM:<a@b.test> SIZE=1 SIZE=2",
                s("Duplicate SIZE parameter"),
            ),
            (
                b"MAIL FROM:<a@b.test> SMTPUTF8 smtputf8",
                s("Duplicate SMTPUTF8 parameter"),
            ),
            (
                b"MAIL FROM:<a@b.test> REQUIRETLS REQUIRETLS",
                s("Duplicate REQUIRETLS parameter"),
            ),
            (
                b"MAIL FROM:<a@b.test> REQUIRETLS=YES",
                s("REQUIRETLS takes no value"),
            ),
            (
                b"MAIL FROM:<a@b.test> BODY=7BIT BODY=8BITMIME",
                s("Duplicate BODY parameter"),
            ),
            (
                b"RCPT TO:<a@b.test> NOTIFY=NEVER NOTIFY=NEVER",
                s("Duplicate NOTIFY parameter"),
            ),
            (b"MAIL FROM:<a@b.test> SIZE=abc", s("Invalid SIZE value")),
            (
                b"MAIL FROM:<a@b.test> SIZE=",
                s("Invalid value for parameter SIZE"),
            ),
            (b"MAIL FROM:<a@b.test> SIZE", s("SIZE requires a value")),
            (b"MAIL FROM:<a@b.test> SIZE=+5", s("Invalid SIZE value")),
            (b"MAIL FROM:<a@b.test> SIZE=-1", s("Invalid SIZE value")),
            (
                b"MAIL FROM:<a@b.test> SIZE=99999999999999999999999",
                s("Invalid SIZE value"),
            ),
            (
                b"MAIL FROM:<a@b.test> SIZE=18446744073709551616",
                s("Invalid SIZE value"),
            ),
            (b"MAIL FROM:<a@b.test> BODY=FOO", s("Invalid BODY value")),
            (
                b"MAIL FROM:<a@b.test> SMTPUTF8=yes",
                s("SMTPUTF8 takes no value"),
            ),
            (b"MAIL FROM:<a@b.test> RET=FOO", s("Invalid RET value")),
            (b"MAIL FROM:<a@b.test> ENVID=+ZZ", s("Invalid ENVID value")),
            (b"MAIL FROM:<a@b.test> ENVID=ab+4", s("Invalid ENVID value")),
            (b"MAIL FROM:<a@b.test> AUTH=a+", s("Invalid AUTH value")),
            (b"MAIL FROM:<a@b.test> =x", s("Invalid parameter \"=x\"")),
            (
                b"MAIL FROM:<a@b.test> -X=1",
                s("Invalid parameter \"-X=1\""),
            ),
            (
                b"MAIL FROM:<a@b.test> SIZE=1=2",
                s("Invalid value for parameter SIZE"),
            ),
            (
                "MAIL FROM:<a@b.test> ENVID=é".as_bytes(),
                s("Invalid value for parameter ENVID"),
            ),
            (
                b"RCPT TO:<a@b.test> NOTIFY=NEVER,SUCCESS",
                s("Invalid NOTIFY value"),
            ),
            (
                b"RCPT TO:<a@b.test> NOTIFY=SUCCESS,SUCCESS",
                s("Invalid NOTIFY value"),
            ),
            (
                b"RCPT TO:<a@b.test> NOTIFY=",
                s("Invalid value for parameter NOTIFY"),
            ),
            (b"RCPT TO:<a@b.test> ORCPT=rfc822", s("Invalid ORCPT value")),
            (b"RCPT TO:<a@b.test> ORCPT=;a@b", s("Invalid ORCPT value")),
            // No-argument verbs (TLS-INJ-03).
            (
                b"STARTTLS foo",
                s("Syntax: STARTTLS (no parameters allowed)"),
            ),
            (b"DATA x", s("Syntax: DATA (no parameters allowed)")),
            (b"RSET x", s("Syntax: RSET (no parameters allowed)")),
            (b"QUIT now", s("Syntax: QUIT (no parameters allowed)")),
            (b"VRFY", s("Syntax: VRFY <address>")),
            // BDAT: syntax errors close the connection.
            (b"BDAT", E::BadBdat("Syntax: BDAT <size> [LAST]".into())),
            (b"BDAT -1", E::BadBdat("Syntax: BDAT <size> [LAST]".into())),
            (b"BDAT abc", E::BadBdat("Syntax: BDAT <size> [LAST]".into())),
            (
                b"BDAT 99999999999999999999",
                E::BadBdat("Syntax: BDAT <size> [LAST]".into()),
            ),
            (
                b"BDAT 10 FIRST",
                E::BadBdat("Syntax: BDAT <size> [LAST]".into()),
            ),
            (
                b"BDAT 10 LAST x",
                E::BadBdat("Syntax: BDAT <size> [LAST]".into()),
            ),
            // AUTH.
            (b"AUTH", s("Syntax: AUTH <mechanism> [initial-response]")),
            (
                b"AUTH PLAIN a b",
                s("Syntax: AUTH <mechanism> [initial-response]"),
            ),
            (b"AUTH PL@IN", s("Invalid mechanism name")),
            (b"AUTH ABCDEFGHIJKLMNOPQRSTU", s("Invalid mechanism name")),
            // Not implemented / forbidden.
            (b"EXPN list", E::NotImplemented("EXPN".into())),
            (b"TURN", E::NotImplemented("TURN".into())),
            (
                b"GET / HTTP/1.1",
                E::Forbidden("HTTP request on an SMTP port; goodbye"),
            ),
            (
                b"POST /x HTTP/1.0",
                E::Forbidden("HTTP request on an SMTP port; goodbye"),
            ),
            (
                b"CONNECT a:25 HTTP/1.1",
                E::Forbidden("HTTP request on an SMTP port; goodbye"),
            ),
            (
                b"Host: example",
                E::Forbidden("Header line sent as a command; goodbye"),
            ),
            (
                b"User-Agent: x",
                E::Forbidden("Header line sent as a command; goodbye"),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(
                parse_command(line),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn error_replies() {
        use CommandError as E;
        let cases: Vec<(CommandError, u16, EnhancedCode, bool)> = vec![
            (E::Unknown, 500, EnhancedCode(5, 5, 1), false),
            (E::Syntax("x".into()), 501, EnhancedCode(5, 5, 4), false),
            (
                E::ParamNotRecognized("FOO".into()),
                555,
                EnhancedCode(5, 5, 4),
                false,
            ),
            (
                E::NotImplemented("EXPN".into()),
                502,
                EnhancedCode(5, 5, 1),
                false,
            ),
            (
                E::BadSender(AddressError::InvalidDomain),
                501,
                EnhancedCode(5, 1, 7),
                false,
            ),
            (
                E::BadRecipient(AddressError::InvalidDomain),
                501,
                EnhancedCode(5, 1, 3),
                false,
            ),
            (
                E::BadSender(AddressError::NonAscii),
                553,
                EnhancedCode(5, 6, 7),
                false,
            ),
            (E::BadBdat("x".into()), 501, EnhancedCode(5, 5, 4), true),
            (E::Forbidden("x"), 554, EnhancedCode(5, 7, 0), true),
        ];
        for (err, code, enhanced, closes) in cases {
            let reply = err.reply();
            assert_eq!(
                (reply.code, reply.enhanced, err.closes_connection()),
                (code, Some(enhanced), closes),
                "{err:?}"
            );
        }
        assert_eq!(
            E::ParamNotRecognized("FOO".into()).reply().text(),
            "Parameter FOO not recognized"
        );
    }

    #[test]
    fn a_512_octet_command_with_parameters_parses() {
        // LIM-01: a command line of 512 octets including CRLF, with ESMTP parameters.
        let path = format!(
            "{}@{}",
            "a".repeat(64),
            ["c".repeat(61).as_str(); 3].join(".") + ".abc"
        );
        let head = format!(
            "MAIL FROM:<{path}> SIZE=1000 BODY=8BITMIME RET=HDRS ENVID={}",
            "e".repeat(100)
        );
        let line = format!("{head} AUTH={}", "u".repeat(510 - head.len() - 6));
        assert_eq!(line.len() + 2, 512);
        assert!(matches!(
            parse_command(line.as_bytes()),
            Ok(Command::Mail { .. })
        ));
        let line = format!("RCPT TO:<{path}> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;{path}");
        assert!(matches!(
            parse_command(line.as_bytes()),
            Ok(Command::Rcpt { .. })
        ));
    }

    #[test]
    fn xtext_and_notify_helpers() {
        for (v, ok) in [
            ("", true),
            ("abc", true),
            ("a+2B", true),
            ("a+2b", true),
            ("+", false),
            ("+2", false),
            ("+ZZ", false),
            ("a=b", false),
            ("a b", false),
            ("+2Bx", true),
        ] {
            assert_eq!(is_xtext(v), ok, "{v:?}");
        }
        for (v, ok) in [
            ("NEVER", true),
            ("SUCCESS", true),
            ("DELAY,FAILURE", true),
            ("NEVER,DELAY", false),
            ("", false),
            ("SUCCESS,", false),
        ] {
            assert_eq!(is_valid_notify(v), ok, "{v:?}");
        }
    }
}
