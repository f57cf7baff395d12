//! The fuzz targets: one function per parser of the SMTP node that faces untrusted bytes,
//! each taking arbitrary input and panicking when a property is violated.
//!
//! This file is the single definition of the targets. It is compiled twice: here, for the
//! bounded runs `cargo test` does on stable ([`super::run_target`]), and by the separate
//! libFuzzer crate `smtp-node/fuzz` (`#[path]`-included there) for the long, coverage-guided
//! runs of `make fuzz`. It may therefore use only `kubemail_smtp_node`, `bytes`,
//! `mail_auth`, `serde_json` and `serde_yaml`, never `crate::`.
//!
//! Every target is deterministic in its input (libFuzzer requires it): where a property
//! needs a way to split the input, the split points are derived from a hash of the input.
//!
//! | target | parser | properties beyond "no panic" |
//! |---|---|---|
//! | `command` | `LineReader` + `parse_command` | framing independent of read splits; bounded buffer; parsed addresses carry no CR/LF/NUL |
//! | `data` | `DataReceiver` (DATA end-of-data, unstuffing) | same result however the input is split; agrees with a reference model of RFC 5321 §4.1.1.4; stored message re-stuffs to itself |
//! | `address` | `parse_forward_path` / `parse_reverse_path` | display form re-parses to the same address; length limits; no control characters |
//! | `auth` | `decode_plain` / `decode_login_step` | no NUL in fields; password never in `Debug` output |
//! | `reply` | the client side's `parse_reply` (delivery client, relay probe) | incremental (a prefix is "need more"); bounded in bytes and line length; our own serialisation re-parses to the same reply |
//! | `config` | `NodeConfig::from_yaml` + `validate` | YAML and JSON round trips give the same config (the operator renders it) |
//! | `message` | header scans at ingest + mail-auth's parser | forged-header stripping is idempotent; known crash inputs of mail crates |

use bytes::BytesMut;
use kubemail_smtp_node::config::{ByteSize, NodeConfig};
use kubemail_smtp_node::protocol::client::{
    Capabilities, MAX_REPLY_BYTES, MAX_REPLY_LINE, encode_data, parse_reply, status_of,
};
use kubemail_smtp_node::protocol::{
    BareEolPolicy, Command, DataError, DataProgress, DataReceiver, LineEvent, LineReader,
    MAX_DOMAIN, MAX_ESMTP_COMMAND_LINE, MAX_LOCAL_PART, MAX_PATH, ReversePath, decode_login_step,
    decode_plain, parse_command, parse_forward_path, parse_reverse_path,
};

/// A fuzz target: panics on a violated property.
pub type Target = fn(&[u8]);

/// Every target, by name (the names of `smtp-node/fuzz/fuzz_targets/*.rs` and of the seed
/// corpus directories under `e2e/hostile/corpus/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("command", command),
    ("data", data),
    ("address", address),
    ("auth", auth),
    ("reply", reply),
    ("config", config),
    ("message", message),
];

/// FNV-1a: a cheap, stable hash of the input, to derive split points deterministically.
fn fnv(input: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in input {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Three ways to cut the input into reads: at one hashed offset, into small hashed-size
/// chunks, and (for short inputs) one byte at a time.
fn splits(input: &[u8]) -> Vec<Vec<&[u8]>> {
    let h = fnv(input);
    let at = (h % (input.len() as u64 + 1)) as usize;
    let size = 1 + ((h >> 32) % 7) as usize;
    let mut out = vec![
        vec![&input[..at], &input[at..]],
        input.chunks(size).collect::<Vec<_>>(),
    ];
    if input.len() <= 2048 {
        out.push(input.chunks(1).collect());
    }
    out
}

// ---- command ------------------------------------------------------------------------------

/// Command framing and parsing (FUZZ-01): the session's `LineReader` with the ESMTP limit,
/// then `parse_command` on every line.
pub fn command(input: &[u8]) {
    let whole = frame(&[input], MAX_ESMTP_COMMAND_LINE);
    for chunks in splits(input) {
        assert_eq!(
            frame(&chunks, MAX_ESMTP_COMMAND_LINE),
            whole,
            "line framing depends on how the input is split"
        );
    }
    // A small limit reaches the over-long-line resynchronisation with short inputs.
    let _ = frame(&[input], 16);
    for event in &whole {
        if let LineEvent::Line(line) = event {
            check_command(line);
        }
    }
    // And the whole input as one line, as if the client never sent a CRLF.
    check_command(input);
}

/// Feeds `chunks` to a line reader, draining events after each; asserts the buffer bound.
fn frame(chunks: &[&[u8]], max: usize) -> Vec<LineEvent> {
    let mut reader = LineReader::new();
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        while let Some(event) = reader.next_line(&mut buf, max) {
            if let LineEvent::Line(line) = &event {
                assert!(line.len() + 2 <= max, "a line longer than the limit passed");
                assert!(
                    !line.contains(&b'\r') && !line.contains(&b'\n'),
                    "a line with CR or LF inside passed"
                );
            }
            events.push(event);
        }
        assert!(
            buf.len() < max,
            "the reader holds {} bytes (limit {max})",
            buf.len()
        );
    }
    events
}

fn check_command(line: &[u8]) {
    let Ok(command) = parse_command(line) else {
        return;
    };
    let no_ctl = |s: &str, what: &str| {
        assert!(
            !s.contains(['\r', '\n', '\0']),
            "{what} with CR/LF/NUL parsed from {line:?}"
        );
    };
    match &command {
        Command::Mail { from, params } => {
            no_ctl(&from.to_string(), "sender");
            if let Some(envid) = &params.envid {
                no_ctl(envid, "ENVID");
            }
        }
        Command::Rcpt { to, params } => {
            no_ctl(&to.to_string(), "recipient");
            if let Some(orcpt) = &params.orcpt {
                no_ctl(orcpt, "ORCPT");
            }
        }
        Command::Ehlo(name) | Command::Helo(name) | Command::Vrfy(name) => no_ctl(name, "argument"),
        Command::Auth {
            mechanism,
            initial_response,
        } => {
            no_ctl(mechanism, "mechanism");
            if let Some(r) = initial_response {
                no_ctl(r, "initial response");
            }
        }
        _ => {}
    }
}

// ---- data ---------------------------------------------------------------------------------

/// Receiver settings the data target runs with: the real limits, and small ones so that
/// short inputs reach the line and size errors.
const DATA_LIMITS: [(BareEolPolicy, u64, usize); 4] = [
    (BareEolPolicy::Reject, 1 << 20, 1000),
    (BareEolPolicy::Normalize, 1 << 20, 1000),
    (BareEolPolicy::Reject, 300, 40),
    (BareEolPolicy::Normalize, 300, 40),
];

/// What one DATA phase made of the input.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DataOutcome {
    /// Wire octets the receiver consumed (the rest are the next pipelined commands).
    consumed: usize,
    /// `None` while the terminator was not seen.
    result: Option<Result<Vec<u8>, DataError>>,
}

/// DATA end-of-data scanning and unstuffing (FUZZ-02, FUZZ-04, LIM-05, SMUG-12): the outcome
/// must not depend on how the bytes are split into reads, must match a reference model of
/// RFC 5321 §4.1.1.4, and an accepted message must re-stuff into exactly itself.
pub fn data(input: &[u8]) {
    for (policy, max_size, max_line) in DATA_LIMITS {
        let whole = receive(policy, max_size, max_line, &[input]);
        for chunks in splits(input) {
            let split = receive(policy, max_size, max_line, &chunks);
            assert_eq!(
                split, whole,
                "DATA outcome depends on the split ({policy:?}, {max_size}, {max_line})"
            );
        }
        check_reference(policy, max_size, max_line, input, &whole);
        if let Some(Ok(stored)) = &whole.result {
            check_stored(stored);
        }
    }
}

fn receive(policy: BareEolPolicy, max_size: u64, max_line: usize, chunks: &[&[u8]]) -> DataOutcome {
    let mut rx = DataReceiver::new(policy, max_size, max_line);
    let mut buf = BytesMut::new();
    let total: usize = chunks.iter().map(|c| c.len()).sum();
    let mut fed = 0;
    let mut done = false;
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        fed += chunk.len();
        if rx.feed(&mut buf) == DataProgress::Done {
            done = true;
            break;
        }
        assert!(buf.is_empty(), "NeedMore left bytes unconsumed");
    }
    let consumed = usize::try_from(rx.bytes_received()).unwrap_or(usize::MAX);
    assert_eq!(consumed + buf.len(), fed, "consumed + left over != fed");
    assert!(consumed <= total);
    assert_eq!(rx.is_done(), done);
    DataOutcome {
        consumed,
        result: done.then(|| rx.finish().map(|b| b.to_vec())),
    }
}

/// The reference: the data ends at the first `.<CRLF>` at the very start or the first
/// `<CRLF>.<CRLF>`; every CRLF is a real line end. Without bare CR/LF the stored message is
/// the lines before it, each with a leading dot removed.
fn check_reference(
    policy: BareEolPolicy,
    max_size: u64,
    max_line: usize,
    input: &[u8],
    got: &DataOutcome,
) {
    let end = if input.starts_with(b".\r\n") {
        Some(3)
    } else {
        input
            .windows(5)
            .position(|w| w == b"\r\n.\r\n")
            .map(|i| i + 5)
    };
    let Some(end) = end else {
        assert!(got.result.is_none(), "DATA ended without <CRLF>.<CRLF>");
        assert_eq!(got.consumed, input.len());
        return;
    };
    assert_eq!(got.consumed, end, "DATA ended at the wrong place");
    let Some(result) = &got.result else {
        panic!("<CRLF>.<CRLF> at {end} did not end DATA");
    };
    // The message part, including the CRLF that precedes the terminating dot.
    let body = &input[..end - 3];
    if has_bare_eol(body) {
        if policy == BareEolPolicy::Reject {
            assert!(result.is_err(), "bare CR/LF accepted under Reject");
        }
        return;
    }
    let mut expected = Vec::with_capacity(body.len());
    let mut too_long = false;
    for line in split_crlf(body) {
        let line = line.strip_prefix(b".").unwrap_or(line);
        too_long |= line.len() + 2 > max_line;
        expected.extend_from_slice(line);
        expected.extend_from_slice(b"\r\n");
    }
    let too_large = expected.len() as u64 > max_size;
    match result {
        Ok(stored) => {
            assert!(
                !too_long && !too_large,
                "an over-limit message was accepted"
            );
            assert_eq!(
                stored, &expected,
                "stored message differs from the reference"
            );
        }
        Err(DataError::LineTooLong) => assert!(too_long, "LineTooLong without a long line"),
        Err(DataError::TooLarge) => assert!(too_large, "TooLarge for a message within the limit"),
        Err(e) => panic!("unexpected {e:?} for a message with CRLF endings only"),
    }
}

/// Lines of `body` (which ends in CRLF), without their CRLF.
fn split_crlf(body: &[u8]) -> Vec<&[u8]> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < body.len() {
        if body[i] == b'\r' && body[i + 1] == b'\n' {
            lines.push(&body[start..i]);
            i += 2;
            start = i;
        } else {
            i += 1;
        }
    }
    lines
}

/// A CR not followed by LF, or a LF not preceded by CR.
fn has_bare_eol(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().any(|(i, &b)| match b {
        b'\r' => bytes.get(i + 1) != Some(&b'\n'),
        b'\n' => i == 0 || bytes[i - 1] != b'\r',
        _ => false,
    })
}

/// The stored-message invariant of `protocol::data`: CRLF endings only, and dot-stuffing it
/// for the next hop gives a DATA stream that ends exactly at its end and unstuffs to itself.
fn check_stored(stored: &[u8]) {
    assert!(
        !has_bare_eol(stored),
        "stored message has a bare CR or LF: {stored:?}"
    );
    let wire = encode_data(stored);
    let again = receive(BareEolPolicy::Reject, u64::MAX, usize::MAX, &[&wire]);
    assert_eq!(again.consumed, wire.len(), "re-stuffed message ends early");
    assert_eq!(
        again.result,
        Some(Ok(stored.to_vec())),
        "re-stuffing changed it"
    );
}

// ---- address ------------------------------------------------------------------------------

/// Address parsing (FUZZ-08, OR-01..16, SYN-09, LIM-06): what parses is within the RFC 5321
/// length limits, has no control characters, and its display form parses to itself.
pub fn address(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    for smtputf8 in [false, true] {
        if let Ok(a) = parse_forward_path(&text, smtputf8) {
            check_address(
                &a.to_string(),
                a.local_part(),
                a.domain(),
                a.ip_literal().is_some(),
                smtputf8,
            );
            if !a.is_bare_postmaster() {
                assert_eq!(
                    parse_forward_path(&a.to_string(), true).as_ref(),
                    Ok(&a),
                    "forward path {text:?} does not round-trip"
                );
            }
        }
        if let Ok(ReversePath::Address(a)) = parse_reverse_path(&text, smtputf8) {
            check_address(
                &a.to_string(),
                a.local_part(),
                a.domain(),
                a.ip_literal().is_some(),
                smtputf8,
            );
            assert_eq!(
                parse_reverse_path(&a.to_string(), true),
                Ok(ReversePath::Address(a.clone())),
                "reverse path {text:?} does not round-trip"
            );
        }
    }
    // The same text inside MAIL/RCPT commands, as the session sees it.
    for prefix in ["MAIL FROM:<", "RCPT TO:<"] {
        let line = format!("{prefix}{text}>");
        check_command(line.as_bytes());
    }
}

fn check_address(shown: &str, local: &str, domain: &str, literal: bool, smtputf8: bool) {
    assert!(
        !shown.chars().any(char::is_control),
        "control character in {shown:?}"
    );
    assert!(
        local.len() <= MAX_LOCAL_PART,
        "local part {local:?} too long"
    );
    assert!(domain.len() <= MAX_DOMAIN, "domain {domain:?} too long");
    // MAX_PATH counts the angle brackets.
    assert!(shown.len() + 2 <= MAX_PATH, "path {shown:?} too long");
    if !smtputf8 {
        assert!(shown.is_ascii(), "non-ASCII {shown:?} without SMTPUTF8");
    }
    // Names are lower-cased; address literals keep their canonical `IPv6:` tag.
    if !literal {
        assert_eq!(
            domain,
            domain.to_ascii_lowercase(),
            "domain {domain:?} not normalised"
        );
    }
}

// ---- auth ---------------------------------------------------------------------------------

/// SASL decoding (AUTH-07): PLAIN and LOGIN responses; decoded fields carry no NUL, and a
/// password never shows in `Debug` output.
pub fn auth(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    if let Ok(c) = decode_plain(&text) {
        assert!(!c.authcid.is_empty() && !c.password.is_empty());
        for field in [&c.authzid, &c.authcid, &c.password] {
            assert!(!field.contains('\0'), "NUL inside a PLAIN field");
        }
        let shown = format!("{c:?}");
        if c.password.len() >= 12
            && !c.authzid.contains(&c.password)
            && !c.authcid.contains(&c.password)
        {
            assert!(!shown.contains(&c.password), "password in Debug output");
        }
    }
    if let Ok(step) = decode_login_step(&text) {
        assert!(!step.is_empty() && !step.contains('\0'));
    }
    // Also behind an AUTH command line, as the session parses it.
    check_command(format!("AUTH PLAIN {text}").as_bytes());
}

// ---- reply --------------------------------------------------------------------------------

/// The client side's reply parser (FUZZ-05, TLS-CLI-04): bounded, incremental, and our own
/// serialisation of a parsed reply parses back to the same reply.
pub fn reply(input: &[u8]) {
    let Ok(parsed) = parse_reply(input) else {
        return;
    };
    let Some((reply, used)) = parsed else {
        assert!(
            input.len() <= MAX_REPLY_BYTES,
            "needs more beyond the limit"
        );
        return;
    };
    assert!(used > 0 && used <= input.len() && used <= MAX_REPLY_BYTES);
    let longest_line = input[..used]
        .split_inclusive(|&b| b == b'\n')
        .map(<[u8]>::len)
        .max()
        .unwrap_or(0);
    assert!(
        longest_line <= MAX_REPLY_LINE,
        "line of {longest_line} bytes"
    );
    assert!((100..=599).contains(&reply.code), "code {}", reply.code);
    assert!(!reply.lines.is_empty());
    for line in &reply.lines {
        assert!(!line.chars().any(char::is_control), "control in {line:?}");
    }
    // Incremental: the bytes of the reply alone give the same reply; any shorter prefix of
    // it needs more.
    assert_eq!(
        parse_reply(&input[..used]),
        Ok(Some((reply.clone(), used))),
        "reply depends on the bytes after it"
    );
    let cut = (fnv(input) % used as u64) as usize;
    assert_eq!(
        parse_reply(&input[..cut]),
        Ok(None),
        "prefix of {cut} bytes"
    );
    // Our serialisation re-parses to the same reply.
    let wire = reply.to_bytes(true);
    match parse_reply(&wire) {
        Ok(Some((again, n))) => {
            assert_eq!(n, wire.len());
            assert_eq!(again, reply, "re-serialised reply differs: {wire:?}");
        }
        other => panic!("our own reply {wire:?} does not parse: {other:?}"),
    }
    let status = status_of(&reply);
    assert!(matches!(status.0, 2 | 4 | 5), "status class {status}");
    let _ = Capabilities::parse(&reply);
}

// ---- config -------------------------------------------------------------------------------

/// The node config loader: parse and validate never panic, and a parsed config survives the
/// YAML and JSON round trips the operator's rendering relies on.
pub fn config(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    if let Ok(size) = text.parse::<ByteSize>() {
        assert_eq!(size.to_string().parse::<ByteSize>(), Ok(size));
    }
    let Ok(config) = NodeConfig::from_yaml(&text) else {
        return;
    };
    let _ = config.validate();
    let _ = config.max_message_size();
    let yaml = match serde_yaml::to_string(&config) {
        Ok(y) => y,
        Err(e) => panic!("a parsed config does not serialise to YAML: {e}"),
    };
    match NodeConfig::from_yaml(&yaml) {
        Ok(again) => assert_eq!(again, config, "YAML round trip changed the config:\n{yaml}"),
        Err(e) => panic!("our own YAML does not parse: {e}\n{yaml}"),
    }
    let json = match serde_json::to_string(&config) {
        Ok(j) => j,
        Err(e) => panic!("a parsed config does not serialise to JSON: {e}"),
    };
    match serde_json::from_str::<NodeConfig>(&json) {
        Ok(again) => assert_eq!(again, config, "JSON round trip changed the config:\n{json}"),
        Err(e) => panic!("our own JSON does not parse: {e}\n{json}"),
    }
}

// ---- message ------------------------------------------------------------------------------

/// Host name the message target strips forged `Authentication-Results` for.
const HOSTNAME: &str = "mx.example.test";

/// What the node does with a received message before queueing it (the header scans of
/// `message` and `authres`, and mail-auth's parser that the inbound checks run):
/// no panic on known crash inputs of mail crates (mail-parser #21/#145/#155, mailparse
/// #41/#130), and stripping forged `Authentication-Results` is idempotent and leaves the
/// body alone.
pub fn message(input: &[u8]) {
    use kubemail_smtp_node::authres::strip_forged;
    use kubemail_smtp_node::message::header_value;

    // The node only ever holds messages with CRLF line endings (DATA and BDAT refuse or
    // normalise bare CR/LF), so that is what its header scans get.
    let input = &crlf_only(input);
    let stripped = strip_forged(input, HOSTNAME);
    assert!(stripped.len() <= input.len());
    assert_eq!(
        body_of(&stripped),
        body_of(input),
        "stripping forged Authentication-Results changed the body"
    );
    assert_eq!(
        strip_forged(&stripped, HOSTNAME),
        stripped,
        "stripping forged Authentication-Results is not idempotent"
    );
    for name in ["Message-ID", "From", "Received"] {
        if let Some(v) = header_value(input, name) {
            assert!(
                !v.contains(['\r', '\n']),
                "unfolded {name} keeps a line break"
            );
        }
    }
    let _ = mail_auth::AuthenticatedMessage::parse(input);
    let _ = mail_auth::AuthenticatedMessage::parse(&stripped);
}

/// `input` with every bare CR or LF turned into CRLF (what `BareEolPolicy::Normalize` stores).
fn crlf_only(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() + 16);
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'\r' | b'\n' => {
                out.extend_from_slice(b"\r\n");
                if input[i] == b'\r' && input.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// The body: what follows the first empty line (RFC 5322 §2.1); empty when there is none.
fn body_of(message: &[u8]) -> &[u8] {
    if let Some(rest) = message.strip_prefix(b"\r\n") {
        return rest;
    }
    message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(&[][..], |i| &message[i + 4..])
}
