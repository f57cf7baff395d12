//! kubemail's SMTP wire format, sans-IO: bytes in, typed values out, in both directions.
//!
//! Everything here is pure and synchronous (no tokio, no sockets, no clock), so that it can be
//! unit-tested with tables of vectors and fed arbitrary bytes by a fuzzer. The node's session
//! state machine and delivery client, and the operator's relay probe, own the I/O and the
//! policy decisions (which domains are local, whether AUTH is allowed, which reply to send
//! when, what a reply means for a message); this crate owns the wire syntax.
//!
//! The server side (what a server reads and writes):
//!
//! * [`mod@line`]: command line framing (CRLF only, length limits, resynchronisation),
//! * [`command`]: RFC 5321 §4.1 command grammar and ESMTP parameters,
//! * [`address`]: mailbox / path syntax with the open-relay rules (source routes, trailing dots),
//! * [`data`]: DATA end-of-data scanning and dot-unstuffing (the SMTP smuggling defence),
//! * [`bdat`]: CHUNKING (RFC 3030) chunk reading and line-ending checks,
//! * [`auth`]: SASL PLAIN / LOGIN decoding (RFC 4954, RFC 4616),
//! * [`mod@reply`]: reply serialisation with enhanced status codes (RFC 2034, RFC 3463),
//! * [`proxy`]: HAProxy PROXY protocol v1/v2 headers.
//!
//! The client side, [`client`] (what a client reads and writes): reply parsing, EHLO/LHLO
//! capabilities, command encoding and DATA encoding (dot-stuffing).

pub mod address;
pub mod auth;
pub mod bdat;
pub mod client;
pub mod command;
pub mod data;
pub mod line;
pub mod proxy;
pub mod reply;

#[cfg(test)]
mod robustness_tests;

pub use address::{Address, AddressError, ReversePath, parse_forward_path, parse_reverse_path};
pub use auth::{
    PlainCredentials, SaslError, decode_login_step, decode_plain, login_challenge_password,
    login_challenge_username,
};
pub use bdat::{BdatLineCheck, BdatReceiver, check_bdat_message};
pub use client::{
    Capabilities, ClientCommand, EncodeError, ReplyError, encode_data, parse_reply, status_of,
};
pub use command::{BodyType, Command, CommandError, MailParams, RcptParams, parse_command};
pub use data::{BareEolPolicy, DataError, DataProgress, DataReceiver};
pub use line::{LineEvent, LineReader};
pub use proxy::{ProxyError, ProxyHeader, parse_proxy_header};
pub use reply::{EnhancedCode, Reply};

/// Maximum length of an SMTP command line, including the CRLF.
///
/// RFC 5321 §4.5.3.1.4: "The maximum total length of a command line including the command word
/// and the `<CRLF>` is 512 octets." This is the base limit; see [`MAX_ESMTP_COMMAND_LINE`] for the
/// limit a server should apply once it advertises extensions that lengthen MAIL and RCPT.
pub const MAX_COMMAND_LINE: usize = 512;

/// Command line limit to use when reading commands from a client that got our EHLO reply.
///
/// RFC 5321 §4.5.3.1.4 lets extensions raise the 512-octet limit, and the ones we advertise do:
/// SIZE adds 26 octets to MAIL (RFC 1870 §3 item 5), AUTH= adds up to 500 to MAIL
/// (RFC 4954 §5), and DSN's ORCPT/NOTIFY and ENVID/RET lengthen RCPT and MAIL by several
/// hundred more (RFC 3461 §4). 2048 covers the sum with room to spare and equals Postfix's
/// `line_length_limit` default, so clients that work with Postfix work with us, while one
/// connection still cannot make us buffer more than 2 KiB of an unterminated command.
pub const MAX_ESMTP_COMMAND_LINE: usize = 2048;

/// Maximum length of a line of the SASL exchange (a client response to a `334` challenge, or
/// an `AUTH` command carrying an initial response), including the CRLF.
///
/// RFC 4954 §4: "At the time of writing of this document, 12288 octets is considered to be a
/// sufficient line length limit for handling of deployed authentication mechanisms"; a longer
/// line fails the AUTH command with `500 5.5.6`. PLAIN and LOGIN need far less (RFC 4616 caps
/// each field at 255 octets), but we keep the RFC's figure so that a future GSSAPI/OAUTHBEARER
/// token still fits; Postfix's `smtpd_sasl_response_limit` uses the same number.
pub const MAX_AUTH_LINE: usize = 12288;

/// Maximum length of a text line in DATA, including the CRLF.
///
/// RFC 5321 §4.5.3.1.6: "The maximum total length of a text line including the `<CRLF>` is 1000
/// octets (not counting the leading dot duplicated for transparency)."
pub const MAX_TEXT_LINE: usize = 1000;

/// Maximum length of a local part, in octets (RFC 5321 §4.5.3.1.1).
pub const MAX_LOCAL_PART: usize = 64;

/// Maximum length of a domain name, in octets (RFC 5321 §4.5.3.1.2).
pub const MAX_DOMAIN: usize = 255;

/// Maximum length of a reverse-path or forward-path, in octets, including the angle brackets
/// and any source route (RFC 5321 §4.5.3.1.3).
pub const MAX_PATH: usize = 256;
