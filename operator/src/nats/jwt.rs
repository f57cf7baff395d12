//! NATS JWTs (version 2): the operator, account and user claims of NATS' decentralized
//! authentication, encoded and signed with NKeys.
//!
//! Our own small module rather than a crate: the Rust NATS JWT crates on crates.io are either
//! unmaintained (`nats-jwt`, built on an old `nkeys`) or carry far more than the three claim
//! types we write. The wire format is the one of `github.com/nats-io/jwt/v2`:
//! `base64url(header) "." base64url(claims) "." base64url(ed25519 signature of the first two
//! parts)`, no padding, header `{"typ":"JWT","alg":"ed25519-nkey"}`, `jti` the base32 SHA-512/256
//! of the claims without it. `operator/tests/nats_auth.rs` checks every kind against a real
//! nats-server in operator mode.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::KeyPair;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512_256};

use crate::timestamps::UnixSeconds;

/// NATS' "no limit".
pub const NO_LIMIT: i64 = -1;
const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

/// Why a JWT could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("cannot sign the JWT")]
    Sign(#[source] nkeys::error::Error),
    #[error("cannot encode the claims")]
    Encode(#[source] serde_json::Error),
    #[error("the JWT is malformed")]
    Malformed,
    #[error("the JWT's signature does not verify against its issuer")]
    BadSignature,
}

/// The claims every JWT has, in the order the Go library writes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims<T> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<UnixSeconds>,
    #[serde(default)]
    pub jti: String,
    #[serde(default)]
    pub iat: UnixSeconds,
    #[serde(default)]
    pub iss: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub sub: String,
    pub nats: T,
}

/// The `nats` part of an operator JWT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorNats {
    pub system_account: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub version: u8,
}

/// The `nats` part of an account JWT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountNats {
    pub limits: AccountLimits,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signing_keys: Vec<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub version: u8,
}

/// Account limits; JetStream is enabled by non-zero storage limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountLimits {
    pub subs: i64,
    pub data: i64,
    pub payload: i64,
    pub imports: i64,
    pub exports: i64,
    pub wildcards: bool,
    pub conn: i64,
    pub leaf: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mem_storage: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub disk_storage: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub streams: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub consumer: i64,
}

impl AccountLimits {
    /// No limits and no JetStream (the system account).
    pub fn unlimited() -> Self {
        Self {
            subs: NO_LIMIT,
            data: NO_LIMIT,
            payload: NO_LIMIT,
            imports: NO_LIMIT,
            exports: NO_LIMIT,
            wildcards: true,
            conn: NO_LIMIT,
            leaf: NO_LIMIT,
            mem_storage: 0,
            disk_storage: 0,
            streams: 0,
            consumer: 0,
        }
    }

    /// No limits, JetStream on with `disk` bytes of file storage (`NO_LIMIT` for no limit)
    /// and `memory` bytes of memory storage.
    pub fn with_jetstream(disk: i64, memory: i64) -> Self {
        Self {
            mem_storage: memory,
            disk_storage: disk,
            streams: NO_LIMIT,
            consumer: NO_LIMIT,
            ..Self::unlimited()
        }
    }
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// A publish or subscribe permission: the allowed subjects (everything else is denied).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Permission {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

/// The `nats` part of a user JWT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserNats {
    #[serde(rename = "pub")]
    pub publish: Permission,
    #[serde(rename = "sub")]
    pub subscribe: Permission,
    pub subs: i64,
    pub data: i64,
    pub payload: i64,
    /// Only plain NATS clients (no websocket, MQTT or leaf node connections).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_connection_types: Vec<String>,
    /// The account, when a signing key of it issued the JWT.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub issuer_account: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub version: u8,
}

/// Encodes `claims` (whose `iss` and `jti` are set here) signed by `issuer`.
pub fn encode<T: Serialize>(issuer: &KeyPair, mut claims: Claims<T>) -> Result<String, JwtError> {
    claims.iss = issuer.public_key();
    claims.jti = String::new();
    claims.jti = jti(&claims)?;
    let header = URL_SAFE_NO_PAD.encode(HEADER);
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).map_err(JwtError::Encode)?);
    let signed = format!("{header}.{body}");
    let signature = issuer.sign(signed.as_bytes()).map_err(JwtError::Sign)?;
    Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

/// Reads a JWT's claims after checking its signature against its own issuer (`iss`).
/// Whether that issuer is trusted is the caller's business.
pub fn decode<T: for<'de> Deserialize<'de>>(jwt: &str) -> Result<Claims<T>, JwtError> {
    let mut parts = jwt.trim().split('.');
    let (Some(header), Some(body), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let raw = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| JwtError::Malformed)?;
    let claims: Claims<T> = serde_json::from_slice(&raw).map_err(|_| JwtError::Malformed)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| JwtError::Malformed)?;
    let issuer = KeyPair::from_public_key(&claims.iss).map_err(|_| JwtError::Malformed)?;
    issuer
        .verify(format!("{header}.{body}").as_bytes(), &signature)
        .map_err(|_| JwtError::BadSignature)?;
    Ok(claims)
}

/// The claims' id as the Go library computes it: base32 (no padding) of the SHA-512/256 of
/// the JSON of the standard claims with an empty `jti`.
fn jti<T>(claims: &Claims<T>) -> Result<String, JwtError> {
    #[derive(Serialize)]
    struct Standard<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        exp: Option<UnixSeconds>,
        iat: UnixSeconds,
        iss: &'a str,
        name: &'a str,
        sub: &'a str,
    }
    let json = serde_json::to_vec(&Standard {
        exp: claims.exp,
        iat: claims.iat,
        iss: &claims.iss,
        name: &claims.name,
        sub: &claims.sub,
    })
    .map_err(JwtError::Encode)?;
    Ok(data_encoding::BASE32_NOPAD.encode(&Sha512_256::digest(json)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn encoded_claims_decode_and_tampering_is_caught() {
        let account = KeyPair::new_account();
        let user = KeyPair::new_user();
        let claims = Claims {
            exp: Some(2_000_000_000),
            jti: String::new(),
            iat: 1_700_000_000,
            iss: String::new(),
            name: "example.com".to_owned(),
            sub: user.public_key(),
            nats: UserNats {
                publish: Permission {
                    allow: vec!["a.b".to_owned()],
                    deny: vec![],
                },
                subscribe: Permission::default(),
                subs: NO_LIMIT,
                data: NO_LIMIT,
                payload: NO_LIMIT,
                allowed_connection_types: vec!["STANDARD".to_owned()],
                issuer_account: String::new(),
                kind: "user".to_owned(),
                version: 2,
            },
        };
        let jwt = encode(&account, claims.clone()).unwrap();
        let back: Claims<UserNats> = decode(&jwt).unwrap();
        assert_eq!(back.iss, account.public_key());
        assert_eq!(back.nats, claims.nats);
        assert_eq!(back.exp, Some(2_000_000_000));
        assert_eq!(back.jti.len(), 52, "base32 of 32 bytes");
        let json: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(jwt.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(json["nats"]["pub"]["allow"][0], "a.b");
        assert_eq!(json["nats"]["type"], "user");

        let mut parts: Vec<&str> = jwt.split('.').collect();
        let other = encode(&KeyPair::new_account(), claims).unwrap();
        let other_body = other.split('.').nth(1).unwrap().to_owned();
        parts[1] = &other_body;
        assert!(matches!(
            decode::<UserNats>(&parts.join(".")),
            Err(JwtError::BadSignature)
        ));
        assert!(matches!(
            decode::<UserNats>("not.a-jwt"),
            Err(JwtError::Malformed)
        ));
    }
}
