//! DKIM keys of a MailDomain: generation (RSA-2048 and Ed25519, PKCS#8 PEM), the rotation
//! schedule, and the public `p=` values for DNS.
//!
//! The keys live in the domain's DKIM Secret (`<selector>.pem`), and the schedule beside them
//! in the annotation [`STATE_ANNOTATION`], so both survive operator restarts; the operator
//! never generates a key it already has. Rotation follows RFC 6376 3.1 practice:
//!
//! ```text
//!  created ──publishAhead──► signFrom ─────────── rotateEvery ──────────► next key signs
//!  (TXT published)           (nodes sign with it)          old key: retireAt = new signFrom + retainAfter
//! ```
//!
//! A new key is published first, signs only after `publishAhead` (DNS propagation), and the
//! key it replaces stays published for `retainAfter` more, so mail signed before the switch
//! still verifies. The very first keys of a domain sign at once (nothing to overlap with).
//! Each algorithm has its own selector, since one TXT record carries one key.
//!
//! [`plan`] is pure (state + policy + now → new state); [`provision`] adds the randomness.
//! Private keys are wrapped in [`PrivateKeyPem`], whose `Debug` prints nothing secret.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::api::core::v1::Secret;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use serde::{Deserialize, Serialize};

use crate::crd::mail_domain::DkimAlgorithm;
use crate::dns_records::PublishedKey;
use crate::timestamps::{UnixSeconds, as_rfc3339, as_rfc3339_opt};

/// Annotation on the DKIM Secret holding the key schedule (JSON list of [`KeyRecord`]).
pub const STATE_ANNOTATION: &str = "kubemail.io/dkim-keys";
/// RFC 8301 3.2: signers SHOULD use at least 2048-bit RSA keys.
pub const RSA_BITS: usize = 2048;

/// Why keys could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("cannot generate an RSA-{RSA_BITS} key")]
    GenerateRsaKey(#[source] rsa::Error),
    #[error("cannot encode the RSA key as PKCS#8")]
    EncodeRsaKey(#[source] rsa::pkcs8::Error),
    #[error("cannot generate an Ed25519 key")]
    GenerateEd25519Key(#[source] rcgen::Error),
    #[error("the stored key for selector {selector} is not a valid {algorithm} PKCS#8 key")]
    ReadStoredKey {
        selector: String,
        algorithm: &'static str,
    },
}

/// One key of the schedule (no key material).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KeyRecord {
    /// DNS selector (`<selector>._domainkey.<domain>`).
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    /// The `spec.dkim.selector` it was made under.
    pub base: String,
    /// 1 for the first keys under `base`, +1 per rotation.
    pub generation: u32,
    /// Generated and published.
    #[serde(with = "as_rfc3339")]
    pub created: UnixSeconds,
    /// Nodes sign with it from then on (unless a newer key of the algorithm took over).
    #[serde(with = "as_rfc3339")]
    pub sign_from: UnixSeconds,
    /// Removed from DNS and the Secret then.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "as_rfc3339_opt"
    )]
    pub retire_at: Option<UnixSeconds>,
}

/// The rotation settings of a MailDomain, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationPolicy {
    pub base: String,
    pub algorithms: Vec<DkimAlgorithm>,
    pub rotate_every: Option<i64>,
    pub publish_ahead: i64,
    pub retain_after: i64,
}

/// What [`plan`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The schedule after this step: kept keys plus new ones.
    pub keys: Vec<KeyRecord>,
    /// Keys to generate now (also in `keys`).
    pub generate: Vec<KeyRecord>,
    /// Keys whose time is up (not in `keys`).
    pub retired: Vec<KeyRecord>,
    /// When the schedule next changes on its own (a key starts signing, retires, or is due
    /// for rotation).
    pub next_event: Option<UnixSeconds>,
}

/// A PEM private key. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKeyPem(String);

impl PrivateKeyPem {
    pub fn new(pem: String) -> Self {
        Self(pem)
    }

    /// The PEM text, for the Secret only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PrivateKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKeyPem(<redacted>)")
    }
}

/// A key with its material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimKey {
    pub record: KeyRecord,
    pub private_key: PrivateKeyPem,
    /// Base64 `p=` value.
    pub public_key: String,
}

/// The keys of a domain after provisioning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimKeys {
    pub keys: Vec<DkimKey>,
    /// Selectors generated in this pass.
    pub generated: Vec<String>,
    /// Selectors retired in this pass.
    pub retired: Vec<String>,
    pub next_event: Option<UnixSeconds>,
}

/// The selector of a key: `<base>` (generation 1) or `<base>-g<N>`, plus `-ed25519` for
/// Ed25519 keys.
pub fn selector_name(base: &str, generation: u32, algorithm: DkimAlgorithm) -> String {
    let mut s = if generation <= 1 {
        base.to_owned()
    } else {
        format!("{base}-g{generation}")
    };
    if algorithm == DkimAlgorithm::Ed25519Sha256 {
        s.push_str("-ed25519");
    }
    s
}

/// Decides which keys to keep, make and retire. Pure.
pub fn plan(current: &[KeyRecord], policy: &RotationPolicy, now: UnixSeconds) -> Plan {
    let (mut keys, retired): (Vec<KeyRecord>, Vec<KeyRecord>) = current
        .iter()
        .cloned()
        .partition(|k| k.retire_at.is_none_or(|t| t > now));
    let first_keys = keys.is_empty();
    let mut due = Vec::new();
    let mut next_event: Option<UnixSeconds> = None;
    let mut consider = |t: UnixSeconds| {
        if t > now {
            next_event = Some(next_event.map_or(t, |n| n.min(t)));
        }
    };

    for &algorithm in &policy.algorithms {
        let newest = keys
            .iter()
            .filter(|k| k.algorithm == algorithm)
            .max_by_key(|k| (k.created, k.generation));
        let rotation_due = newest.and_then(|k| {
            policy
                .rotate_every
                .map(|every| k.sign_from + every - policy.publish_ahead)
        });
        let needs_new = match newest {
            None => true,
            Some(k) => k.base != policy.base || rotation_due.is_some_and(|t| now >= t),
        };
        if needs_new {
            due.push(algorithm);
        }
    }

    let mut generate = Vec::new();
    if !due.is_empty() {
        let generation = keys
            .iter()
            .chain(retired.iter())
            .filter(|k| k.base == policy.base)
            .map(|k| k.generation)
            .max()
            .unwrap_or(0)
            + 1;
        let sign_from = if first_keys {
            now
        } else {
            now + policy.publish_ahead
        };
        for algorithm in due {
            for old in keys.iter_mut().filter(|k| k.algorithm == algorithm) {
                let retire = sign_from + policy.retain_after;
                old.retire_at = Some(old.retire_at.map_or(retire, |t| t.min(retire)));
            }
            let record = KeyRecord {
                selector: selector_name(&policy.base, generation, algorithm),
                algorithm,
                base: policy.base.clone(),
                generation,
                created: now,
                sign_from,
                retire_at: None,
            };
            generate.push(record.clone());
            keys.push(record);
        }
    }

    // Algorithms no longer wanted stop signing now and leave DNS after the retention time.
    for k in keys
        .iter_mut()
        .filter(|k| !policy.algorithms.contains(&k.algorithm) && k.retire_at.is_none())
    {
        k.retire_at = Some(now + policy.retain_after);
    }
    for k in &keys {
        consider(k.sign_from);
        if let Some(t) = k.retire_at {
            consider(t);
        }
    }
    if let Some(every) = policy.rotate_every {
        for &algorithm in &policy.algorithms {
            if let Some(newest) = keys
                .iter()
                .filter(|k| k.algorithm == algorithm)
                .max_by_key(|k| (k.created, k.generation))
            {
                consider(newest.sign_from + every - policy.publish_ahead);
            }
        }
    }
    keys.sort_by(|a, b| a.selector.cmp(&b.selector));
    Plan {
        keys,
        generate,
        retired,
        next_event,
    }
}

/// The key each wanted algorithm signs with now: the newest one whose `signFrom` has come.
pub fn signing_keys<'a>(
    keys: &'a [KeyRecord],
    algorithms: &[DkimAlgorithm],
    now: UnixSeconds,
) -> Vec<&'a KeyRecord> {
    algorithms
        .iter()
        .filter_map(|&alg| {
            keys.iter()
                .filter(|k| k.algorithm == alg && k.sign_from <= now)
                .max_by_key(|k| (k.sign_from, k.generation))
        })
        .collect()
}

/// Reads the schedule and keys from the DKIM Secret, plans, generates what is missing and
/// derives the public keys. Blocking (RSA key generation takes a while): run it on a
/// blocking thread.
pub fn provision(
    secret: Option<&Secret>,
    policy: &RotationPolicy,
    now: UnixSeconds,
) -> Result<DkimKeys, DkimError> {
    let (records, mut material) = stored(secret);
    let plan = plan(&records, policy, now);
    for record in &plan.generate {
        material.insert(record.selector.clone(), generate_key(record.algorithm)?);
    }
    let mut keys = Vec::with_capacity(plan.keys.len());
    for record in plan.keys {
        let Some(private_key) = material.remove(&record.selector) else {
            // `stored` only returns records with material, and new ones were just made.
            continue;
        };
        let public_key =
            public_key(record.algorithm, &private_key).ok_or_else(|| DkimError::ReadStoredKey {
                selector: record.selector.clone(),
                algorithm: algorithm_name(record.algorithm),
            })?;
        keys.push(DkimKey {
            record,
            private_key,
            public_key,
        });
    }
    Ok(DkimKeys {
        keys,
        generated: plan.generate.into_iter().map(|k| k.selector).collect(),
        retired: plan.retired.into_iter().map(|k| k.selector).collect(),
        next_event: plan.next_event,
    })
}

/// The Secret data key of a selector's private key.
pub fn secret_key(selector: &str) -> String {
    format!("{selector}.pem")
}

/// The schedule as stored in [`STATE_ANNOTATION`].
pub fn state_json(keys: &[DkimKey]) -> String {
    let records: Vec<&KeyRecord> = keys.iter().map(|k| &k.record).collect();
    serde_json::to_string(&records).unwrap_or_else(|_| "[]".to_owned())
}

impl DkimKeys {
    /// The keys as published in DNS.
    pub fn published(&self) -> Vec<PublishedKey> {
        self.keys
            .iter()
            .map(|k| PublishedKey {
                selector: k.record.selector.clone(),
                algorithm: k.record.algorithm,
                public_key: k.public_key.clone(),
            })
            .collect()
    }
}

/// A new private key, PKCS#8 PEM.
pub fn generate_key(algorithm: DkimAlgorithm) -> Result<PrivateKeyPem, DkimError> {
    match algorithm {
        DkimAlgorithm::RsaSha256 => {
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, RSA_BITS)
                .map_err(DkimError::GenerateRsaKey)?;
            let pem = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(DkimError::EncodeRsaKey)?;
            Ok(PrivateKeyPem(pem.to_string()))
        }
        DkimAlgorithm::Ed25519Sha256 => {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
                .map_err(DkimError::GenerateEd25519Key)?;
            Ok(PrivateKeyPem(key.serialize_pem()))
        }
    }
}

/// The base64 DNS `p=` value derived from a private key.
/// `None` when the PEM is not a key of that algorithm.
pub fn public_key(algorithm: DkimAlgorithm, pem: &PrivateKeyPem) -> Option<String> {
    match algorithm {
        DkimAlgorithm::RsaSha256 => {
            let key = rsa::RsaPrivateKey::from_pkcs8_pem(pem.expose()).ok()?;
            let der = key.to_public_key().to_public_key_der().ok()?;
            Some(BASE64.encode(der.as_bytes()))
        }
        DkimAlgorithm::Ed25519Sha256 => {
            let key = rcgen::KeyPair::from_pem(pem.expose()).ok()?;
            key.is_compatible(&rcgen::PKCS_ED25519)
                .then(|| BASE64.encode(key.public_key_raw()))
        }
    }
}

fn algorithm_name(algorithm: DkimAlgorithm) -> &'static str {
    match algorithm {
        DkimAlgorithm::RsaSha256 => "RSA",
        DkimAlgorithm::Ed25519Sha256 => "Ed25519",
    }
}

/// Records of the stored schedule that still have their key, and the keys.
fn stored(secret: Option<&Secret>) -> (Vec<KeyRecord>, BTreeMap<String, PrivateKeyPem>) {
    let Some(secret) = secret else {
        return (Vec::new(), BTreeMap::new());
    };
    let records: Vec<KeyRecord> = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(STATE_ANNOTATION))
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or_default();
    let data = secret.data.clone().unwrap_or_default();
    let mut material = BTreeMap::new();
    let kept = records
        .into_iter()
        .filter(|r| {
            let pem = data
                .get(&secret_key(&r.selector))
                .and_then(|b| String::from_utf8(b.0.clone()).ok());
            match pem {
                Some(pem) => {
                    material.insert(r.selector.clone(), PrivateKeyPem(pem));
                    true
                }
                None => false,
            }
        })
        .collect();
    (kept, material)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86400;
    const T0: i64 = 1_800_000_000;

    fn policy(rotate_days: Option<i64>) -> RotationPolicy {
        RotationPolicy {
            base: "kubemail1".into(),
            algorithms: vec![DkimAlgorithm::RsaSha256, DkimAlgorithm::Ed25519Sha256],
            rotate_every: rotate_days.map(|d| d * DAY),
            publish_ahead: 2 * DAY,
            retain_after: 7 * DAY,
        }
    }

    fn selectors(keys: &[&KeyRecord]) -> Vec<String> {
        keys.iter().map(|k| k.selector.clone()).collect()
    }

    #[test]
    fn first_keys_sign_at_once_and_are_kept() {
        let p = policy(None);
        let first = plan(&[], &p, T0);
        assert_eq!(first.generate.len(), 2);
        assert_eq!(
            first
                .keys
                .iter()
                .map(|k| k.selector.as_str())
                .collect::<Vec<_>>(),
            ["kubemail1", "kubemail1-ed25519"]
        );
        assert!(first.keys.iter().all(|k| k.sign_from == T0));
        assert_eq!(first.next_event, None);
        let again = plan(&first.keys, &p, T0 + 400 * DAY);
        assert!(again.generate.is_empty());
        assert_eq!(again.keys, first.keys);
    }

    #[test]
    fn rotation_publishes_first_signs_after_overlap_and_retires_later() {
        let p = policy(Some(90));
        let first = plan(&[], &p, T0);
        // Due at signFrom + rotateEvery - publishAhead.
        assert_eq!(first.next_event, Some(T0 + 88 * DAY));
        let before = plan(&first.keys, &p, T0 + 88 * DAY - 1);
        assert!(before.generate.is_empty());

        let t1 = T0 + 88 * DAY;
        let rotated = plan(&first.keys, &p, t1);
        assert_eq!(
            rotated
                .generate
                .iter()
                .map(|k| k.selector.as_str())
                .collect::<Vec<_>>(),
            ["kubemail1-g2", "kubemail1-g2-ed25519"]
        );
        assert_eq!(rotated.keys.len(), 4, "old and new keys are both published");
        // Until the overlap ends the old keys sign.
        assert_eq!(
            selectors(&signing_keys(&rotated.keys, &p.algorithms, t1 + DAY)),
            ["kubemail1", "kubemail1-ed25519"]
        );
        let switch = t1 + 2 * DAY;
        assert_eq!(
            selectors(&signing_keys(&rotated.keys, &p.algorithms, switch)),
            ["kubemail1-g2", "kubemail1-g2-ed25519"]
        );
        assert_eq!(rotated.next_event, Some(switch));
        let old = rotated
            .keys
            .iter()
            .find(|k| k.selector == "kubemail1")
            .unwrap();
        assert_eq!(old.retire_at, Some(switch + 7 * DAY));

        let kept = plan(&rotated.keys, &p, switch + 7 * DAY - 1);
        assert_eq!(kept.keys.len(), 4);
        let gone = plan(&rotated.keys, &p, switch + 7 * DAY);
        assert_eq!(gone.keys.len(), 2);
        assert_eq!(gone.retired.len(), 2);
        assert!(gone.generate.is_empty());
    }

    #[test]
    fn a_new_selector_rotates_and_a_dropped_algorithm_retires() {
        let p = policy(None);
        let first = plan(&[], &p, T0);
        let mut renamed = p.clone();
        renamed.base = "mail2026".into();
        renamed.algorithms = vec![DkimAlgorithm::RsaSha256];
        let next = plan(&first.keys, &renamed, T0 + DAY);
        assert_eq!(
            next.generate
                .iter()
                .map(|k| k.selector.as_str())
                .collect::<Vec<_>>(),
            ["mail2026"]
        );
        let ed = next
            .keys
            .iter()
            .find(|k| k.selector == "kubemail1-ed25519")
            .unwrap();
        assert_eq!(ed.retire_at, Some(T0 + DAY + 7 * DAY));
        assert_eq!(
            selectors(&signing_keys(&next.keys, &renamed.algorithms, T0 + DAY)),
            ["kubemail1"],
            "the old RSA key signs until the new one is propagated"
        );
    }

    #[test]
    fn generated_keys_are_pkcs8_and_public_keys_match_rfc_formats() {
        let ed = generate_key(DkimAlgorithm::Ed25519Sha256).unwrap();
        assert!(ed.expose().starts_with("-----BEGIN PRIVATE KEY-----"));
        let p = public_key(DkimAlgorithm::Ed25519Sha256, &ed).unwrap();
        // RFC 8463 4.2: the raw 32-byte key, 44 base64 characters.
        assert_eq!(BASE64.decode(&p).unwrap().len(), 32);
        assert_eq!(format!("{ed:?}"), "PrivateKeyPem(<redacted>)");
        assert!(public_key(DkimAlgorithm::RsaSha256, &ed).is_none());
    }

    #[test]
    fn rsa_keys_are_2048_bit_pkcs8_with_an_spki_dns_key() {
        use rsa::traits::PublicKeyParts;
        let pem = generate_key(DkimAlgorithm::RsaSha256).unwrap();
        assert!(pem.expose().starts_with("-----BEGIN PRIVATE KEY-----"));
        let key = rsa::RsaPrivateKey::from_pkcs8_pem(pem.expose()).unwrap();
        assert_eq!(key.size() * 8, RSA_BITS);
        let p = public_key(DkimAlgorithm::RsaSha256, &pem).unwrap();
        let der = BASE64.decode(&p).unwrap();
        // DKIM-08: the published key is the one derived from the private key.
        use rsa::pkcs8::DecodePublicKey;
        assert_eq!(
            rsa::RsaPublicKey::from_public_key_der(&der).unwrap(),
            key.to_public_key()
        );
    }
}
