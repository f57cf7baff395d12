//! SASL decoding for SMTP AUTH (RFC 4954): the PLAIN message (RFC 4616) and the LOGIN
//! exchange (draft-murchison-sasl-login). Only decoding lives here; checking the password,
//! rate limits and the "AUTH only after TLS" rule belong to the session and `crate::auth`.
//!
//! Credentials are plain `String`s that never appear in `Debug` output, so a stray `{:?}` in a
//! log line cannot leak a password.

use std::fmt;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use super::{EnhancedCode, Reply};

/// The three fields of a SASL PLAIN message: `[authzid] NUL authcid NUL passwd`.
#[derive(Clone, PartialEq, Eq)]
pub struct PlainCredentials {
    /// Authorization identity ("act as"); empty when the client did not ask for one.
    pub authzid: String,
    /// Authentication identity (the user name).
    pub authcid: String,
    /// The password. Never logged.
    pub password: String,
}

impl fmt::Debug for PlainCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlainCredentials")
            .field("authzid", &self.authzid)
            .field("authcid", &self.authcid)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why a SASL response was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// The client sent `*` to cancel the exchange (RFC 4954 §4).
    #[error("authentication cancelled")]
    Cancelled,
    /// The response is not valid base64.
    #[error("cannot decode base64 response")]
    BadBase64,
    /// The decoded response is not a valid message for the mechanism (wrong number of fields,
    /// NUL inside a field, not UTF-8, empty user name or password).
    #[error("malformed authentication response")]
    Malformed,
}

impl SaslError {
    /// The reply for this error (RFC 4954 §4, §6):
    /// `Cancelled` → `501 5.7.0`, `BadBase64` and `Malformed` → `501 5.5.2`.
    pub fn reply(&self) -> Reply {
        match self {
            Self::Cancelled => Reply::new(501, EnhancedCode(5, 7, 0), "Authentication cancelled"),
            Self::BadBase64 => Reply::new(501, EnhancedCode(5, 5, 2), "Cannot decode response"),
            Self::Malformed => Reply::new(
                501,
                EnhancedCode(5, 5, 2),
                "Malformed authentication response",
            ),
        }
    }
}

/// Standard base64 alphabet (RFC 4954 §4 uses RFC 4648 §4). Padding is accepted with or
/// without, because some clients drop it; whitespace and other characters are refused.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes a PLAIN response (initial response of `AUTH PLAIN`, or the line after `334 `).
///
/// `*` cancels; `=` is the empty response (RFC 4954 §4), which is malformed for PLAIN.
pub fn decode_plain(b64: &str) -> Result<PlainCredentials, SaslError> {
    let raw = decode(b64)?;
    let mut fields = raw.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(SaslError::Malformed);
    };
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| SaslError::Malformed);
    let credentials = PlainCredentials {
        authzid: text(authzid)?,
        authcid: text(authcid)?,
        password: text(password)?,
    };
    if credentials.authcid.is_empty() || credentials.password.is_empty() {
        return Err(SaslError::Malformed);
    }
    Ok(credentials)
}

/// Decodes one LOGIN step (the user name, then the password, each answering a `334`
/// challenge). `*` cancels. The value must be non-empty UTF-8 without NUL.
pub fn decode_login_step(b64: &str) -> Result<String, SaslError> {
    let raw = decode(b64)?;
    if raw.is_empty() || raw.contains(&0) {
        return Err(SaslError::Malformed);
    }
    String::from_utf8(raw).map_err(|_| SaslError::Malformed)
}

/// The LOGIN user name challenge: base64 of "Username:".
pub fn login_challenge_username() -> &'static str {
    "VXNlcm5hbWU6"
}

/// The LOGIN password challenge: base64 of "Password:".
pub fn login_challenge_password() -> &'static str {
    "UGFzc3dvcmQ6"
}

fn decode(b64: &str) -> Result<Vec<u8>, SaslError> {
    match b64 {
        "*" => Err(SaslError::Cancelled),
        "=" => Ok(Vec::new()),
        _ => BASE64.decode(b64).map_err(|_| SaslError::BadBase64),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    fn b64(raw: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(raw)
    }

    fn creds(authzid: &str, authcid: &str, password: &str) -> PlainCredentials {
        PlainCredentials {
            authzid: authzid.into(),
            authcid: authcid.into(),
            password: password.into(),
        }
    }

    #[test]
    fn plain_vectors() {
        let cases: Vec<(String, Result<PlainCredentials, SaslError>)> = vec![
            // RFC 4616 §4 example.
            (
                b64(b"\0tim\0tanstaaftanstaaf"),
                Ok(creds("", "tim", "tanstaaftanstaaf")),
            ),
            (
                b64(b"Ursel\0Kurt\0xipj3plmq"),
                Ok(creds("Ursel", "Kurt", "xipj3plmq")),
            ),
            ("AHVzZXIAcGFzcw==".into(), Ok(creds("", "user", "pass"))),
            ("AHVzZXIAcGFzcw".into(), Ok(creds("", "user", "pass"))),
            (
                b64("\0jöran\0pässword".as_bytes()),
                Ok(creds("", "jöran", "pässword")),
            ),
            ("*".into(), Err(SaslError::Cancelled)),
            ("=".into(), Err(SaslError::Malformed)),
            ("not base64!".into(), Err(SaslError::BadBase64)),
            ("AHVz ZXIA".into(), Err(SaslError::BadBase64)),
            ("A".into(), Err(SaslError::BadBase64)),
            (b64(b"\0user"), Err(SaslError::Malformed)),
            (b64(b"user"), Err(SaslError::Malformed)),
            (b64(b"\0user\0pass\0extra"), Err(SaslError::Malformed)),
            (b64(b"\0\0pass"), Err(SaslError::Malformed)),
            (b64(b"\0user\0"), Err(SaslError::Malformed)),
            (b64(b"\0us\xffer\0pass"), Err(SaslError::Malformed)),
            (b64(b"\0user\0pa\xc3"), Err(SaslError::Malformed)),
        ];
        for (input, want) in cases {
            assert_eq!(decode_plain(&input), want, "{input:?}");
        }
    }

    #[test]
    fn login_vectors() {
        let cases: Vec<(String, Result<String, SaslError>)> = vec![
            (b64(b"user@example.test"), Ok("user@example.test".into())),
            (b64("pässword".as_bytes()), Ok("pässword".into())),
            ("*".into(), Err(SaslError::Cancelled)),
            ("=".into(), Err(SaslError::Malformed)),
            ("".into(), Err(SaslError::Malformed)),
            ("%%%".into(), Err(SaslError::BadBase64)),
            (b64(b"us\0er"), Err(SaslError::Malformed)),
            (b64(b"\xff"), Err(SaslError::Malformed)),
        ];
        for (input, want) in cases {
            assert_eq!(decode_login_step(&input), want, "{input:?}");
        }
    }

    #[test]
    fn login_challenges_decode_to_prompts() {
        let decoded = |s: &str| base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        assert_eq!(decoded(login_challenge_username()), b"Username:");
        assert_eq!(decoded(login_challenge_password()), b"Password:");
    }

    #[test]
    fn debug_never_shows_the_password() {
        let c = creds("", "tim", "tanstaaftanstaaf");
        let shown = format!("{c:?} {c:#?}");
        assert!(shown.contains("tim"));
        assert!(!shown.contains("tanstaaf"), "{shown}");
    }

    #[test]
    fn error_replies() {
        let cases = [
            (SaslError::Cancelled, 501, EnhancedCode(5, 7, 0)),
            (SaslError::BadBase64, 501, EnhancedCode(5, 5, 2)),
            (SaslError::Malformed, 501, EnhancedCode(5, 5, 2)),
        ];
        for (e, code, enhanced) in cases {
            assert_eq!((e.reply().code, e.reply().enhanced), (code, Some(enhanced)));
        }
    }
}
