//! DKIM signing of outbound mail (RFC 6376, RFC 8463) with mail-auth.
//!
//! Submitted mail is signed at acceptance, before it is queued, with every key configured for
//! the *authenticated user's* domain — typically one RSA-SHA256 key of 2048 bits or more (ring
//! refuses smaller ones) and one Ed25519-SHA256 key (RFC 8463; a second signature, since many
//! verifiers still lack Ed25519). Never with another domain's keys because `From:` names it:
//! a node serving several domains would otherwise give any of their users an aligned
//! signature for every other one. The session refuses a `From:` the user may not use
//! ([`author_addresses`] reads it), so a signed message's author is one its sender owns.
//! Delivery status notifications are signed for the domain they come from. Choices:
//!
//! * `c=relaxed/relaxed`: survives the header re-folding and whitespace changes common in
//!   transit;
//! * signed headers: From, To, Cc, Subject, Date, Message-ID, MIME-Version, Content-Type,
//!   Content-Transfer-Encoding, Reply-To, In-Reply-To, References. Each name listed is also
//!   signed when absent (mail-auth lists missing names in `h=`), so adding one later breaks
//!   the signature, and From is listed twice (over-signing, RFC 6376 8.15): a second From
//!   added in transit cannot pass;
//! * no `l=` body length (appended-content attacks, RFC 6376 8.2);
//! * keys are PKCS#8 PEM (or PKCS#1 for RSA) files, normally a mounted Secret; they are never
//!   logged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use mail_auth::common::crypto::{
    DkimKey, Ed25519Key, HashAlgorithm, HashContext as _, HashImpl, RsaKey, Sha1, Sha256,
    SigningKey as _,
};
use mail_auth::common::headers::{HeaderWriter as _, Writable, Writer};
use mail_auth::dkim::canonicalize::{BodyHasher, CanonicalHeaders};
use mail_auth::dkim::{Canonicalization, Done};
use mail_parser::{HeaderName, HeaderValue, MessageParser};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject as _;

use crate::config::DkimConfig;
use crate::message::header_section;

/// The headers signed, From twice (over-signing).
pub const SIGNED_HEADERS: [&str; 13] = [
    "From",
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Reply-To",
    "In-Reply-To",
    "References",
];

/// Why DKIM keys could not be loaded or a message signed.
#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("cannot read DKIM key file {path}: {source}")]
    ReadKey {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error(
        "DKIM key file {path} is not a usable RSA (2048 bits or more) or Ed25519 private key: {reason}"
    )]
    ParseKey { path: PathBuf, reason: String },
    #[error("invalid DKIM selector {selector:?} for {domain}: use letters, digits, '-' and '.'")]
    InvalidSelector { domain: String, selector: String },
    #[error("cannot DKIM-sign for {domain} with selector {selector}: {reason}")]
    Sign {
        domain: String,
        selector: String,
        reason: String,
    },
}

/// The algorithm of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    RsaSha256,
    Ed25519Sha256,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RsaSha256 => "rsa-sha256",
            Self::Ed25519Sha256 => "ed25519-sha256",
        }
    }
}

struct Key {
    selector: String,
    algorithm: Algorithm,
    signer: mail_auth::dkim::DkimSigner<DkimKey, Done>,
}

/// The signing keys of our domains.
#[derive(Default)]
pub struct DkimSigner {
    domains: HashMap<String, Vec<Key>>,
    /// Signatures made, by domain, algorithm and result (`dkim_signatures`).
    signatures: Family<crate::metrics::DkimLabels, Counter>,
}

impl std::fmt::Debug for DkimSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut m = f.debug_map();
        for (domain, keys) in &self.domains {
            let list: Vec<String> = keys
                .iter()
                .map(|k| format!("{} ({})", k.selector, k.algorithm.as_str()))
                .collect();
            m.entry(domain, &list);
        }
        m.finish()
    }
}

impl DkimSigner {
    /// Loads every domain's keys.
    pub fn load<'a>(
        domains: impl IntoIterator<Item = (&'a str, &'a DkimConfig)>,
    ) -> Result<Self, DkimError> {
        let mut map: HashMap<String, Vec<Key>> = HashMap::new();
        for (domain, config) in domains {
            let domain = domain.to_ascii_lowercase();
            for k in &config.keys {
                if k.selector.is_empty()
                    || !k
                        .selector
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
                {
                    return Err(DkimError::InvalidSelector {
                        domain,
                        selector: k.selector.clone(),
                    });
                }
                let (key, algorithm) = load_key(&k.key_file)?;
                let signer = mail_auth::dkim::DkimSigner::from_key(key)
                    .domain(domain.clone())
                    .selector(k.selector.clone())
                    .headers(SIGNED_HEADERS)
                    .header_canonicalization(Canonicalization::Relaxed)
                    .body_canonicalization(Canonicalization::Relaxed);
                map.entry(domain.clone()).or_default().push(Key {
                    selector: k.selector.clone(),
                    algorithm,
                    signer,
                });
            }
        }
        Ok(Self {
            domains: map,
            signatures: Family::default(),
        })
    }

    /// Whether any key is configured.
    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// Counts the signatures it makes in `signatures` (the node's `dkim_signatures`).
    pub fn counted_in(self, signatures: Family<crate::metrics::DkimLabels, Counter>) -> Self {
        Self { signatures, ..self }
    }

    /// The `DKIM-Signature` header fields (CRLF-terminated) to put in front of `message`,
    /// one per key of `domain`, whatever the message's `From:` says; `None` when `domain`
    /// has no keys.
    pub fn sign_for(&self, message: &[u8], domain: &str) -> Result<Option<String>, DkimError> {
        self.sign_each(domain, |signer| signer.sign(message))
    }

    /// Like [`Self::sign_for`], for a message whose body was not kept: `head` is its header
    /// section (with the empty line after it), `body` the hash of its body computed while
    /// the body streamed past ([`BodyHash::ours`]).
    pub fn sign_head_for(
        &self,
        head: &[u8],
        body: &BodyHashValue,
        domain: &str,
    ) -> Result<Option<String>, DkimError> {
        self.sign_each(domain, |signer| sign_with_body_hash(signer, head, body))
    }

    /// The signatures `sign` makes with each key of `domain`, counted.
    fn sign_each(
        &self,
        domain: &str,
        sign: impl Fn(
            &mail_auth::dkim::DkimSigner<DkimKey, Done>,
        ) -> mail_auth::Result<mail_auth::dkim::Signature>,
    ) -> Result<Option<String>, DkimError> {
        let Some((domain, keys)) = self.domains.get_key_value(&domain.to_ascii_lowercase()) else {
            return Ok(None);
        };
        let mut headers = String::new();
        for key in keys {
            // mail-auth parses the header section itself; a panic on odd input must not take
            // the session down with it.
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sign(&key.signer)));
            let signed = matches!(result, Ok(Ok(_)));
            self.signatures
                .get_or_create(&crate::metrics::DkimLabels {
                    domain: domain.to_owned(),
                    algorithm: key.algorithm.as_str(),
                    result: if signed { "signed" } else { "failed" },
                })
                .inc();
            let signature = match result {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err(DkimError::Sign {
                        domain: domain.to_owned(),
                        selector: key.selector.clone(),
                        reason: e.to_string(),
                    });
                }
                Err(_) => {
                    return Err(DkimError::Sign {
                        domain: domain.to_owned(),
                        selector: key.selector.clone(),
                        reason: "the signer panicked".to_owned(),
                    });
                }
            };
            headers.push_str(&signature.to_header());
        }
        Ok(Some(headers))
    }
}

/// A finished body hash: the canonicalization, algorithm and length limit (`l=`, 0 for the
/// whole body) it was computed with, and the hash. The form mail-auth keeps per message.
pub type BodyHashValue = (Canonicalization, HashAlgorithm, u64, Vec<u8>);

/// A DKIM body hash (RFC 6376 3.7) computed while the body streams past, chunk by chunk.
pub struct BodyHash {
    canonicalization: Canonicalization,
    algorithm: HashAlgorithm,
    limit: u64,
    hasher: BodyHasher<<Sha256 as HashImpl>::Context>,
}

impl BodyHash {
    /// A hash of the body from its first octet with canonicalization `c`, algorithm `a`, and
    /// of the first `l` octets only unless `l` is 0.
    pub fn new(c: Canonicalization, a: HashAlgorithm, l: u64) -> Self {
        let context = match a {
            HashAlgorithm::Sha1 => <Sha1 as HashImpl>::hasher(),
            HashAlgorithm::Sha256 => <Sha256 as HashImpl>::hasher(),
        };
        Self {
            canonicalization: c,
            algorithm: a,
            limit: l,
            hasher: BodyHasher::new(context, c, l),
        }
    }

    /// The body hash of this node's signatures: relaxed, SHA-256, the whole body.
    pub fn ours() -> Self {
        Self::new(Canonicalization::Relaxed, HashAlgorithm::Sha256, 0)
    }

    /// The body hashes the `DKIM-Signature` fields of `header_section` ask for, each once.
    pub fn requested_by(header_section: &[u8]) -> Vec<Self> {
        mail_auth::AuthenticatedMessage::parse(header_section).map_or_else(Vec::new, |m| {
            m.body_hashes
                .iter()
                .map(|(c, a, l, _)| Self::new(*c, *a, *l))
                .collect()
        })
    }

    pub fn update(&mut self, chunk: &[u8]) {
        self.hasher.write(chunk);
    }

    pub fn finish(self) -> BodyHashValue {
        let (context, _) = self.hasher.finish();
        (
            self.canonicalization,
            self.algorithm,
            self.limit,
            context.complete().as_ref().to_vec(),
        )
    }
}

/// What mail-auth's signer does for a whole message, with the body hash given: the signed
/// fields of `head` canonicalized, the signature's own field last, signed with the key.
fn sign_with_body_hash(
    signer: &mail_auth::dkim::DkimSigner<DkimKey, Done>,
    head: &[u8],
    body: &BodyHashValue,
) -> mail_auth::Result<mail_auth::dkim::Signature> {
    let template = &signer.template;
    let (_, _, _, hash) = body;
    let mut headers = Vec::with_capacity(template.h.len());
    let mut found = vec![false; template.h.len()];
    let mut signed = Vec::with_capacity(template.h.len());
    // The fields as mail-auth's verifier splits them.
    let parsed =
        mail_auth::AuthenticatedMessage::parse(head).ok_or(mail_auth::Error::NoHeadersFound)?;
    for &(name, value) in &parsed.headers {
        if let Some(pos) = template
            .h
            .iter()
            .position(|h| name.eq_ignore_ascii_case(h.as_bytes()))
        {
            headers.push((name, value));
            found[pos] = true;
            signed.push(String::from_utf8_lossy(name).into_owned());
        }
    }
    if signed.is_empty() {
        return Err(mail_auth::Error::NoHeadersFound);
    }
    // Listed but absent (or listed again, as From is) names are signed as absent.
    signed.reverse();
    for (name, found) in template.h.iter().zip(found) {
        if !found {
            signed.push(name.clone());
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut signature = template.clone();
    signature.bh = hash.clone();
    signature.t = now;
    signature.x = if signature.x > 0 {
        now + signature.x
    } else {
        0
    };
    signature.h = signed;
    signature.b = signer.key.sign(Signable {
        headers: template.ch.canonical_headers(headers),
        signature: &signature,
    })?;
    Ok(signature)
}

/// The octets a DKIM signature signs: the canonical signed fields, then its own field
/// without the `b=` value.
struct Signable<'a> {
    headers: CanonicalHeaders<'a>,
    signature: &'a mail_auth::dkim::Signature,
}

impl Writable for Signable<'_> {
    fn write(self, writer: &mut impl Writer) {
        self.headers.write(writer);
        self.signature.write(writer, false);
    }
}

/// Reads a private key and tells its algorithm.
pub fn load_key(path: &Path) -> Result<(DkimKey, Algorithm), DkimError> {
    let der = PrivateKeyDer::from_pem_file(path).map_err(|source| DkimError::ReadKey {
        path: path.to_owned(),
        source,
    })?;
    let parse_err = |reason: String| DkimError::ParseKey {
        path: path.to_owned(),
        reason,
    };
    match der {
        PrivateKeyDer::Pkcs8(pkcs8) => {
            match RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs8(pkcs8.clone_key())) {
                Ok(rsa) => Ok((DkimKey::Rsa(rsa), Algorithm::RsaSha256)),
                Err(rsa_err) => {
                    Ed25519Key::from_pkcs8_maybe_unchecked_der(pkcs8.secret_pkcs8_der())
                        .map(|ed| (DkimKey::Ed25519(ed), Algorithm::Ed25519Sha256))
                        .map_err(|ed_err| {
                            parse_err(format!("not RSA ({rsa_err}), not Ed25519 ({ed_err})"))
                        })
                }
            }
        }
        PrivateKeyDer::Pkcs1(pkcs1) => RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs1(pkcs1))
            .map(|rsa| (DkimKey::Rsa(rsa), Algorithm::RsaSha256))
            .map_err(|e| parse_err(e.to_string())),
        other => Err(parse_err(format!("unsupported key format {other:?}"))),
    }
}

/// The DNS TXT record value for the public half of a key file:
/// `v=DKIM1; k=rsa; p=<SubjectPublicKeyInfo>` or `v=DKIM1; k=ed25519; p=<raw 32 bytes>`
/// (RFC 8463 4.2: the raw key, not an SPKI).
pub fn dns_txt_record(path: &Path) -> Result<String, DkimError> {
    let (key, _) = load_key(path)?;
    let b64 = base64::engine::general_purpose::STANDARD;
    Ok(match key {
        DkimKey::Rsa(rsa) => format!(
            "v=DKIM1; k=rsa; p={}",
            b64.encode(rsa_spki(&rsa.public_key()))
        ),
        DkimKey::Ed25519(ed) => format!("v=DKIM1; k=ed25519; p={}", b64.encode(ed.public_key())),
    })
}

/// Wraps a PKCS#1 `RSAPublicKey` in a `SubjectPublicKeyInfo` (what `openssl rsa -pubout`
/// writes and every verifier reads).
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { rsaEncryption (1.2.840.113549.1.1.1), NULL }
    const ALGORITHM: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bit_string = vec![0x00];
    bit_string.extend_from_slice(pkcs1);
    let mut inner = ALGORITHM.to_vec();
    inner.extend(der_tlv(0x03, &bit_string));
    der_tlv(0x30, &inner)
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// The addresses of every mailbox of every `From:` field of `message` (RFC 5322 3.6.2),
/// parsed with mail-parser: `Some(empty)` when there is no `From:` field, `None` when a field
/// holds anything that is not a mailbox with a usable address (what one reader takes for the
/// address another may not: see [`mailbox_domain`]).
pub fn author_addresses(message: &[u8]) -> Option<Vec<String>> {
    let Some(parsed) = MessageParser::new().parse_headers(header_section(message)) else {
        return Some(Vec::new());
    };
    let mut out = Vec::new();
    for field in parsed.header_values(HeaderName::From) {
        let HeaderValue::Address(from) = field else {
            return None;
        };
        let mut any = false;
        for mailbox in from.iter() {
            let address = mailbox.address.as_deref()?;
            mailbox_domain(address)?;
            out.push(address.to_owned());
            any = true;
        }
        if !any {
            return None;
        }
    }
    Some(out)
}

/// The author domain of `message` (RFC 7489 §3.1.1: the domain of the `From:` header's
/// address), lower case and without a trailing dot; `None` when the message has no single one.
///
/// The `From:` field is parsed with mail-parser (RFC 5322 §3.4 address syntax), so display
/// names with `<` or `@`, comments, quoted strings, encoded words and groups cannot make us
/// take a domain from anything but the mailbox itself. RFC 5322 §3.6 allows one `From:` field
/// with one or more mailboxes; DKIM and DMARC want a single author. We take the domain when
/// there is exactly one field and every mailbox in it (a list or the members of groups) has
/// that same domain; two `From:` fields, mailboxes of different domains, or a mailbox without
/// a usable domain give `None`, and the envelope domain decides instead (RFC 7489 §6.6.1 lets
/// receivers reject such mail, so no author domain of ours should vouch for it).
pub fn author_domain(message: &[u8]) -> Option<String> {
    // The same header/body split as the rest of the node: nothing in the body is a header.
    let parsed = MessageParser::new().parse_headers(header_section(message))?;
    let mut fields = parsed.header_values(HeaderName::From);
    let (Some(HeaderValue::Address(from)), None) = (fields.next(), fields.next()) else {
        return None;
    };
    let mut domains = from.iter().map(|mailbox| {
        let address = mailbox.address.as_deref()?;
        mailbox_domain(address)
    });
    let first = domains.next()??;
    for domain in domains {
        if domain.as_deref() != Some(first.as_str()) {
            return None;
        }
    }
    Some(first)
}

/// The domain of `local@domain` as a DNS name we could hold keys for: letters, digits, `-`
/// and `.`, lower case, one trailing dot dropped. Address literals and anything else: `None`,
/// and so is an address with no local part or a second `@`: mail-parser runs the pieces of a
/// malformed field together (`Evil <a@evil.test> <a@good.test>` gives
/// `a@evil.testa@good.test`), and no domain of such a field is the author's.
fn mailbox_domain(address: &str) -> Option<String> {
    let (local, domain) = address.split_once('@')?;
    if local.is_empty() || domain.contains('@') {
        return None;
    }
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    let valid = !domain.is_empty()
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    valid.then(|| domain.to_ascii_lowercase())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::config::DkimKeyConfig;

    /// RFC 8463 Appendix A test key (RFC 8032 7.1 test 1) as PKCS#8 v1.
    fn rfc8463_key_pem() -> String {
        let seed = base64::engine::general_purpose::STANDARD
            .decode("nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=")
            .unwrap();
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend(seed);
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n")
    }

    fn signer_with_ed25519(dir: &Path) -> DkimSigner {
        let path = dir.join("ed.pem");
        std::fs::write(&path, rfc8463_key_pem()).unwrap();
        let config = DkimConfig {
            keys: vec![DkimKeyConfig {
                selector: "brisbane".into(),
                key_file: path,
            }],
        };
        DkimSigner::load([("football.example.com", &config)]).unwrap()
    }

    const MESSAGE: &str = "From: Joe SixPack <joe@football.example.com>\r\nTo: Suzie Q <suzie@shopping.example.net>\r\nSubject: Is dinner ready?\r\nDate: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\nMessage-ID: <20030712040037.46341.5F8J@football.example.com>\r\n\r\nHi.\r\n\r\nWe lost the game.  Are you hungry yet?\r\n\r\nJoe.\r\n";

    #[test]
    fn signs_with_the_rfc_8463_key_and_the_expected_tags() {
        let dir = tempfile::tempdir().unwrap();
        let signer = signer_with_ed25519(dir.path());
        let header = signer
            .sign_for(MESSAGE.as_bytes(), "football.example.com")
            .unwrap()
            .unwrap();
        let unfolded = header.replace("\r\n", "").replace(['\t', ' '], "");
        assert!(header.starts_with("DKIM-Signature:"), "{header}");
        assert!(unfolded.contains("a=ed25519-sha256"), "{header}");
        assert!(unfolded.contains("c=relaxed/relaxed"), "{header}");
        assert!(unfolded.contains("d=football.example.com"), "{header}");
        assert!(unfolded.contains("s=brisbane"), "{header}");
        // RFC 8463 A.3 body hash of this body.
        assert!(
            unfolded.contains("bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8="),
            "{header}"
        );
        assert!(!unfolded.contains(";l="), "no body length tag: {header}");
        let h = unfolded
            .split(";h=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_ascii_lowercase();
        assert_eq!(h.matches("from").count(), 2, "From is over-signed: {h}");
        assert!(
            h.contains("cc") && h.contains("mime-version"),
            "absent headers are signed too: {h}"
        );
        assert!(header.ends_with("\r\n"));
        assert_eq!(
            dns_txt_record(&dir.path().join("ed.pem")).unwrap(),
            "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
        );
    }

    #[test]
    fn a_body_hashed_in_pieces_signs_as_the_whole_message_does() {
        let dir = tempfile::tempdir().unwrap();
        let signer = signer_with_ed25519(dir.path());
        let split = MESSAGE.find("\r\n\r\n").unwrap() + 4;
        let (head, body) = MESSAGE.as_bytes().split_at(split);
        // Pieces that cut through CRLFs and the whitespace relaxed canonicalization folds.
        let mut hash = BodyHash::ours();
        for piece in body.chunks(3) {
            hash.update(piece);
        }
        let value = hash.finish();
        // RFC 8463 A.3 body hash of this body.
        assert_eq!(
            base64::engine::general_purpose::STANDARD.encode(&value.3),
            "2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8="
        );
        // Ed25519 signatures are deterministic: within one second (`t=`), the same octets.
        for _ in 0..3 {
            let whole = signer
                .sign_for(MESSAGE.as_bytes(), "football.example.com")
                .unwrap()
                .unwrap();
            let streamed = signer
                .sign_head_for(head, &value, "football.example.com")
                .unwrap()
                .unwrap();
            if whole == streamed {
                return;
            }
            assert_eq!(
                whole.split(" t=").next(),
                streamed.split(" t=").next(),
                "only the time may differ"
            );
        }
        panic!("the streamed signature never matched the whole message's");
    }

    #[test]
    fn requested_body_hashes_match_what_mail_auth_computes_for_the_whole_message() {
        let message = concat!(
            "DKIM-Signature: v=1; a=rsa-sha256; c=simple/simple; d=a.test; s=s; h=from; bh=AAAA; b=AAAA\r\n",
            "DKIM-Signature: v=1; a=rsa-sha1; c=relaxed/relaxed; d=b.test; s=s; h=from; bh=AAAA; b=AAAA\r\n",
            "From: a@a.test\r\n\r\n",
            "line  with \t spaces  \r\n\r\n  \r\nlast\r\n\r\n\r\n"
        );
        let split = message.find("\r\n\r\n").unwrap() + 4;
        let mut hashes = BodyHash::requested_by(&message.as_bytes()[..split]);
        assert_eq!(hashes.len(), 2);
        for piece in message.as_bytes()[split..].chunks(2) {
            for h in &mut hashes {
                h.update(piece);
            }
        }
        let got: Vec<BodyHashValue> = hashes.into_iter().map(BodyHash::finish).collect();
        let whole = mail_auth::AuthenticatedMessage::parse(message.as_bytes()).unwrap();
        assert_eq!(got, whole.body_hashes);
    }

    #[test]
    fn signs_for_the_given_domain_only() {
        let dir = tempfile::tempdir().unwrap();
        let signer = signer_with_ed25519(dir.path());
        let other = MESSAGE.replace("joe@football.example.com", "joe@elsewhere.test");
        let header = signer
            .sign_for(other.as_bytes(), "Football.Example.com")
            .unwrap()
            .unwrap();
        assert!(
            header
                .replace(['\r', '\n', '\t', ' '], "")
                .contains("d=football.example.com"),
            "the given domain signs, whatever From: says: {header}"
        );
        assert!(
            signer
                .sign_for(MESSAGE.as_bytes(), "elsewhere.test")
                .unwrap()
                .is_none(),
            "a From: of a domain with keys does not make another domain's message signed"
        );
    }

    #[test]
    fn author_addresses_of_hostile_from_headers() {
        let cases: [(&str, Option<&[&str]>); 7] = [
            ("From: A <a@good.test>", Some(&["a@good.test"])),
            (
                "From: a@good.test, \"B\" <b@other.test>",
                Some(&["a@good.test", "b@other.test"]),
            ),
            (
                "From: a@good.test\r\nFrom: b@evil.test",
                Some(&["a@good.test", "b@evil.test"]),
            ),
            ("Subject: no author", Some(&[])),
            ("From: Evil <a@evil.test> <a@good.test>", None),
            ("From: undisclosed-recipients:;", None),
            ("From: just text", None),
        ];
        for (headers, want) in cases {
            let msg = format!("{headers}\r\nTo: x@y.test\r\n\r\nFrom: body@evil.test\r\n");
            let got = author_addresses(msg.as_bytes());
            let want = want.map(|w| w.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
            assert_eq!(got, want, "{headers:?}");
        }
    }

    #[test]
    fn author_domain_forms() {
        let cases = [
            ("From: a@Example.TEST\r\n\r\n", Some("example.test")),
            ("From: \"A, B\" <a@x.test>\r\n\r\n", Some("x.test")),
            ("From: a@x.test (Alice)\r\n\r\n", Some("x.test")),
            (
                "Subject: s\r\nFrom:\r\n <a@folded.test>\r\n\r\n",
                Some("folded.test"),
            ),
            ("Subject: s\r\n\r\nFrom: a@body.test\r\n", None),
            ("From: nobody\r\n\r\n", None),
        ];
        for (msg, want) in cases {
            assert_eq!(author_domain(msg.as_bytes()).as_deref(), want, "{msg:?}");
        }
    }

    #[test]
    fn author_domain_of_hostile_from_headers() {
        let cases = [
            // Display names, comments and quoted strings that look like addresses.
            (
                "From: \"Evil <a@evil.test>\" <a@good.test>",
                Some("good.test"),
            ),
            ("From: Evil <a@evil.test> <a@good.test>", None),
            ("From: \"a@evil.test\" <a@good.test>", Some("good.test")),
            ("From: a@good.test (x <b@evil.test>)", Some("good.test")),
            ("From: (x <b@evil.test>) a@good.test", Some("good.test")),
            (
                "From: \"x\\\" <b@evil.test>\" <a@good.test>",
                Some("good.test"),
            ),
            (
                "From: =?utf-8?q?a=40evil.test?= <a@good.test>",
                Some("good.test"),
            ),
            // mail-parser takes a quoted local part with `@` for a display name and leaves no
            // local part: too odd to vouch for.
            ("From: \"quoted@evil.test\"@good.test", None),
            // Malformed fields whose pieces mail-parser runs together.
            ("From: <a@good.test> <b@evil.test>", None),
            ("From: x <a@good.test>, y", None),
            // A phrase before the angle address is a display name, whatever it looks like.
            ("From: a@good.test <b@evil.test>", Some("evil.test")),
            // Groups and lists: one author domain or none.
            ("From: Team: a@good.test, b@Good.Test.;", Some("good.test")),
            ("From: Team: a@good.test, b@evil.test;", None),
            ("From: a@good.test, b@evil.test", None),
            ("From: a@good.test, <b@good.test>", Some("good.test")),
            ("From: undisclosed-recipients:;", None),
            // Two From fields: no single author.
            ("From: a@good.test\r\nFrom: b@good.test", None),
            // No domain we could sign for.
            ("From: <a@[192.0.2.1]>", None),
            ("From: <a@>", None),
            ("From: a@b\u{e4}d.test", None),
            ("From:", None),
        ];
        for (headers, want) in cases {
            let msg = format!("{headers}\r\nSubject: s\r\n\r\nFrom: b@body.test\r\n");
            assert_eq!(
                author_domain(msg.as_bytes()).as_deref(),
                want,
                "{headers:?}"
            );
        }
        // A message that starts with the blank line has no header, whatever its body says.
        assert_eq!(author_domain(b"\r\nFrom: a@body.test\r\n"), None);
    }

    #[test]
    fn refuses_bad_keys_and_selectors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.pem");
        std::fs::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let config = DkimConfig {
            keys: vec![DkimKeyConfig {
                selector: "s".into(),
                key_file: path.clone(),
            }],
        };
        assert!(matches!(
            DkimSigner::load([("x.test", &config)]),
            Err(DkimError::ParseKey { .. })
        ));
        let config = DkimConfig {
            keys: vec![DkimKeyConfig {
                selector: "bad selector".into(),
                key_file: path,
            }],
        };
        assert!(matches!(
            DkimSigner::load([("x.test", &config)]),
            Err(DkimError::InvalidSelector { .. })
        ));
    }

    #[tokio::test]
    async fn dev_zone_publishes_the_dev_keys() {
        use crate::dns::{Resolver as _, ZoneResolver};
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let zone = std::fs::read_to_string(examples.join("dev-dkim.zone")).unwrap();
        let zone = ZoneResolver::from_zone(&format!("$ORIGIN example.test.\n{zone}")).unwrap();
        for (selector, file, kind) in [
            ("dev-rsa", "dev-dkim-rsa.pem", "k=rsa"),
            ("dev-ed", "dev-dkim-ed25519.pem", "k=ed25519"),
        ] {
            let want = dns_txt_record(&examples.join(file)).unwrap();
            assert!(want.contains(kind), "{want}");
            let published = zone
                .txt(&format!("{selector}._domainkey.example.test"))
                .await
                .unwrap();
            assert_eq!(published, vec![want], "{selector}");
        }
    }

    #[test]
    fn spki_wrapping_matches_der_lengths() {
        let wrapped = rsa_spki(&[0x30, 0x03, 0x02, 0x01, 0x05]);
        assert_eq!(wrapped[0], 0x30);
        assert_eq!(wrapped[1] as usize, wrapped.len() - 2);
        let long = der_tlv(0x04, &[0u8; 300]);
        assert_eq!(&long[..4], &[0x04, 0x82, 0x01, 0x2c]);
    }
}
