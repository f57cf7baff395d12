//! The webhook signature: what a receiver checks to know an event came from this operator
//! and was not replayed.
//!
//! Every request carries `Kubemail-Signature: t=<unix seconds>,v1=<hex>` where `<hex>` is
//! the lower-case hex HMAC-SHA256, keyed with the bytes of the sink's Secret value, of the
//! ASCII timestamp, a `.` and the raw request body: `HMAC(secret, "<t>.<body>")`. A
//! receiver recomputes it over the body exactly as received, compares in constant time, and
//! refuses timestamps more than a few minutes from its clock ([`verify`] uses
//! [`TOLERANCE`]). Several `v1=` values may appear while a secret is being rotated; any one
//! matching is enough.

use std::time::Duration;

use ring::hmac;

/// The request header of the signature.
pub const HEADER: &str = "Kubemail-Signature";
/// The largest clock difference [`verify`] accepts.
pub const TOLERANCE: Duration = Duration::from_secs(300);

/// The header value for `body` sent at `timestamp` (Unix seconds).
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    format!("t={timestamp},v1={}", hex(&mac(secret, timestamp, body)))
}

/// Whether `header` is a valid signature of `body` at `now` (Unix seconds).
pub fn verify(secret: &[u8], header: &str, body: &[u8], now: u64) -> bool {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<u64>().ok(),
            Some(("v1", s)) => signatures.push(s.to_owned()),
            _ => {}
        }
    }
    let Some(t) = timestamp else {
        return false;
    };
    if now.abs_diff(t) > TOLERANCE.as_secs() {
        return false;
    }
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let message = signed_message(t, body);
    signatures
        .iter()
        .filter_map(|s| unhex(s))
        .any(|tag| hmac::verify(&key, &message, &tag).is_ok())
}

fn mac(secret: &[u8], timestamp: u64, body: &[u8]) -> hmac::Tag {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::sign(&key, &signed_message(timestamp, body))
}

fn signed_message(timestamp: u64, body: &[u8]) -> Vec<u8> {
    let mut m = format!("{timestamp}.").into_bytes();
    m.extend_from_slice(body);
    m
}

fn hex(tag: &hmac::Tag) -> String {
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_verifies() {
        let body = br#"{"id":"1"}"#;
        let header = sign(b"s3cret", 1_700_000_000, body);
        assert!(header.starts_with("t=1700000000,v1="));
        assert_eq!(header.len(), "t=1700000000,v1=".len() + 64);
        assert!(verify(b"s3cret", &header, body, 1_700_000_100));
        assert!(!verify(b"other", &header, body, 1_700_000_100));
        assert!(!verify(
            b"s3cret",
            &header,
            b"{\"id\":\"2\"}",
            1_700_000_100
        ));
        assert!(
            !verify(b"s3cret", &header, body, 1_700_000_000 + 301),
            "too old"
        );
        let rotated = format!("{header},v1={}", "00".repeat(32));
        assert!(verify(b"s3cret", &rotated, body, 1_700_000_000));
    }

    #[test]
    fn a_known_vector() {
        // HMAC-SHA256(key "key", "0.") computed independently (Python: hmac.new(b"key",
        // b"0.", hashlib.sha256).hexdigest()).
        assert_eq!(
            sign(b"key", 0, b""),
            "t=0,v1=85841b4efc3cd7776c3c8f9b7cca9e281c550e5d19889d78e9e669c6337f000d"
        );
    }
}
