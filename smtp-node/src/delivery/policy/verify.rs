//! Checking a server's certificate chain after the TLS handshake and before anything is sent
//! over the connection: WebPKI for a host name (MTA-STS, RFC 8461 4.2; the `verify` override;
//! REQUIRETLS, RFC 8689 4.2.1) and DANE TLSA matching (RFC 7672 3.1: `DANE-EE(3)` against the
//! leaf, no name or expiry check; `DANE-TA(2)` against a certificate of the chain, which then
//! anchors a path validation with the name checked against the MX host or the next-hop
//! domain). Selectors: full certificate (0) or SubjectPublicKeyInfo (1); matching types:
//! exact (0), SHA-256 (1), SHA-512 (2). Usages 0 and 1 (PKIX-TA/EE) are not usable for SMTP
//! (RFC 7672 3.1.3).
//!
//! The handshake itself verified the server's signatures with the session keys, so the
//! chain is the one of whoever holds the leaf's key; this decides whether that chain is good
//! enough. Failures carry the RFC 8460 result type they are reported as.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest as _, Sha256, Sha512};

use super::ResultType;
use crate::delivery::tls::ClientTls;
use crate::dns::TlsaRecord;

/// Why a certificate chain was not good enough.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct TlsFailure {
    pub result: ResultType,
    pub reason: String,
}

impl TlsFailure {
    fn new(result: ResultType, reason: impl Into<String>) -> Self {
        Self {
            result,
            reason: reason.into(),
        }
    }
}

/// WebPKI: `certs` (leaf first) chain to a trusted root and the leaf is valid for `host`.
pub fn webpki(tls: &ClientTls, certs: &[CertificateDer<'_>], host: &str) -> Result<(), TlsFailure> {
    let Some((leaf, intermediates)) = certs.split_first() else {
        return Err(TlsFailure::new(
            ResultType::ValidationFailure,
            "the server sent no certificate",
        ));
    };
    path_to(tls.webpki(), leaf, intermediates, host)
        .map_err(|e| webpki_failure(&e, &format!("certificate of {host}")))
}

/// DANE: some usable record of `records` matches the chain. `names` are the reference
/// identifiers for DANE-TA (the MX host name, then the next-hop domain). With no usable record
/// at all, TLS is mandatory but unauthenticated (RFC 7672 2.2), which is `Ok`.
pub fn dane(
    tls: &ClientTls,
    records: &[TlsaRecord],
    certs: &[CertificateDer<'_>],
    names: &[&str],
) -> Result<(), TlsFailure> {
    let usable: Vec<&TlsaRecord> = records.iter().filter(|r| is_usable(r)).collect();
    if usable.is_empty() {
        return Ok(());
    }
    let Some((leaf, intermediates)) = certs.split_first() else {
        return Err(TlsFailure::new(
            ResultType::ValidationFailure,
            "the server sent no certificate",
        ));
    };
    let mut last_ta_error = None;
    for record in &usable {
        match record.usage {
            DANE_EE if matches(record, leaf) => return Ok(()),
            DANE_TA => {
                for ta in certs.iter().filter(|c| matches(record, c)) {
                    match dane_ta_path(tls, ta, leaf, intermediates, names) {
                        Ok(()) => return Ok(()),
                        Err(e) => last_ta_error = Some(e),
                    }
                }
            }
            _ => {}
        }
    }
    Err(last_ta_error.unwrap_or_else(|| {
        TlsFailure::new(
            ResultType::ValidationFailure,
            format!(
                "no TLSA record of the host matches its certificate chain ({} usable records)",
                usable.len()
            ),
        )
    }))
}

/// Whether a TLSA record can be used for SMTP at all.
pub fn is_usable(record: &TlsaRecord) -> bool {
    matches!(record.usage, DANE_TA | DANE_EE)
        && record.selector <= 1
        && record.matching <= 2
        && !record.data.is_empty()
}

/// The association data of `cert` for `selector` and `matching` (RFC 6698 2.1.2, 2.1.3).
pub fn association(cert: &CertificateDer<'_>, selector: u8, matching: u8) -> Option<Vec<u8>> {
    let selected: Vec<u8> = match selector {
        0 => cert.as_ref().to_vec(),
        1 => webpki::EndEntityCert::try_from(cert)
            .ok()?
            .subject_public_key_info()
            .as_ref()
            .to_vec(),
        _ => return None,
    };
    match matching {
        0 => Some(selected),
        1 => Some(Sha256::digest(&selected).to_vec()),
        2 => Some(Sha512::digest(&selected).to_vec()),
        _ => None,
    }
}

// RFC 7218 mnemonics of the usable certificate usages.
const DANE_TA: u8 = 2;
const DANE_EE: u8 = 3;

fn matches(record: &TlsaRecord, cert: &CertificateDer<'_>) -> bool {
    association(cert, record.selector, record.matching).is_some_and(|a| a == record.data)
}

/// The chain from `leaf` to the DANE-TA certificate `ta` validates for one of `names`.
fn dane_ta_path(
    tls: &ClientTls,
    ta: &CertificateDer<'_>,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    names: &[&str],
) -> Result<(), TlsFailure> {
    let mut roots = RootCertStore::empty();
    roots.add(ta.clone().into_owned()).map_err(|e| {
        TlsFailure::new(
            ResultType::TlsaInvalid,
            format!("the DANE-TA certificate is not usable as a trust anchor: {e}"),
        )
    })?;
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), tls.provider())
        .build()
        .map_err(|e| TlsFailure::new(ResultType::ValidationFailure, e.to_string()))?;
    let mut last = None;
    for name in names {
        match path_to(verifier.as_ref(), leaf, intermediates, name) {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(webpki_failure(&e, "certificate (DANE-TA)")),
        }
    }
    Err(last.unwrap_or_else(|| TlsFailure::new(ResultType::ValidationFailure, "no name to check")))
}

fn path_to(
    verifier: &WebPkiServerVerifier,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    host: &str,
) -> Result<(), rustls::Error> {
    let name = ServerName::try_from(host.to_owned())
        .map_err(|_| rustls::Error::General(format!("{host:?} is not a DNS name")))?;
    verifier
        .verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now())
        .map(drop)
}

/// The RFC 8460 result type and a reason for a WebPKI error.
fn webpki_failure(error: &rustls::Error, what: &str) -> TlsFailure {
    let result = match error {
        rustls::Error::InvalidCertificate(e) => match e {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                ResultType::CertificateHostMismatch
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                ResultType::CertificateExpired
            }
            // RFC 8460 4.3.1: no trusted root CA for the chain. A chain that names a trusted
            // CA whose key did not sign it (an impostor CA with the trusted one's name) has
            // no trusted root either, not a generic validation failure.
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                ResultType::CertificateNotTrusted
            }
            _ => ResultType::ValidationFailure,
        },
        _ => ResultType::ValidationFailure,
    };
    TlsFailure::new(result, format!("{what} not accepted: {error}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use base64::Engine as _;

    use super::*;

    /// A CA and a leaf for `names` signed by it, as DER.
    fn chain(names: &[&str]) -> (CertificateDer<'static>, CertificateDer<'static>) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "test DANE-TA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
        (leaf.der().clone(), ca_cert.der().clone())
    }

    fn record(usage: u8, selector: u8, matching: u8, cert: &CertificateDer<'_>) -> TlsaRecord {
        TlsaRecord {
            usage,
            selector,
            matching,
            data: association(cert, selector, matching).unwrap(),
        }
    }

    #[test]
    fn dane_ee_matches_the_leaf_by_certificate_or_key_with_every_matching_type() {
        let tls = ClientTls::new(None).unwrap();
        let (leaf, ca) = chain(&["mx.remote.test"]);
        let (other, _) = chain(&["mx.remote.test"]);
        for selector in [0, 1] {
            for matching in [0, 1, 2] {
                let r = record(3, selector, matching, &leaf);
                // DANE-EE checks neither the name nor the issuer.
                dane(
                    &tls,
                    std::slice::from_ref(&r),
                    &[leaf.clone(), ca.clone()],
                    &["nowhere.test"],
                )
                .unwrap_or_else(|e| panic!("3 {selector} {matching}: {e}"));
                let e = dane(
                    &tls,
                    &[r],
                    std::slice::from_ref(&other),
                    &["mx.remote.test"],
                )
                .unwrap_err();
                assert_eq!(e.result, ResultType::ValidationFailure);
            }
        }
    }

    #[test]
    fn dane_ta_anchors_a_path_that_must_name_the_host_or_the_domain() {
        let tls = ClientTls::new(None).unwrap();
        let (leaf, ca) = chain(&["mx.remote.test"]);
        let certs = [leaf.clone(), ca.clone()];
        let ta = record(2, 1, 1, &ca);
        dane(
            &tls,
            std::slice::from_ref(&ta),
            &certs,
            &["mx.remote.test", "remote.test"],
        )
        .unwrap();
        let e = dane(&tls, std::slice::from_ref(&ta), &certs, &["other.test"]).unwrap_err();
        assert_eq!(e.result, ResultType::CertificateHostMismatch, "{e}");
        // The TA must be in the chain the server sent.
        let e = dane(
            &tls,
            &[ta],
            std::slice::from_ref(&leaf),
            &["mx.remote.test"],
        )
        .unwrap_err();
        assert_eq!(e.result, ResultType::ValidationFailure, "{e}");
        // A leaf record used as DANE-TA is no trust anchor of anything else.
        let (_, other_ca) = chain(&["x.test"]);
        let e = dane(
            &tls,
            &[record(2, 0, 1, &other_ca)],
            &certs,
            &["mx.remote.test"],
        )
        .unwrap_err();
        assert_eq!(e.result, ResultType::ValidationFailure, "{e}");
    }

    #[test]
    fn unusable_records_leave_tls_unauthenticated_and_webpki_names_its_failures() {
        let tls = ClientTls::new(None).unwrap();
        let (leaf, ca) = chain(&["mx.remote.test"]);
        let pkix_ee = record(1, 0, 1, &leaf);
        assert!(!is_usable(&pkix_ee));
        dane(
            &tls,
            &[pkix_ee],
            std::slice::from_ref(&leaf),
            &["mx.remote.test"],
        )
        .unwrap();
        // The test CA is not among the Mozilla roots.
        let e = webpki(&tls, &[leaf.clone(), ca.clone()], "mx.remote.test").unwrap_err();
        assert_eq!(e.result, ResultType::CertificateNotTrusted, "{e}");

        // Trusting that CA, a chain from another CA with the same name is not trusted either.
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        let pem = base64::engine::general_purpose::STANDARD.encode(ca.as_ref());
        std::fs::write(
            &ca_file,
            format!("-----BEGIN CERTIFICATE-----\n{pem}\n-----END CERTIFICATE-----\n"),
        )
        .unwrap();
        let tls = ClientTls::new(Some(&ca_file)).unwrap();
        webpki(&tls, std::slice::from_ref(&leaf), "mx.remote.test").unwrap();
        let (impostor_leaf, _) = chain(&["mx.remote.test"]);
        let e = webpki(&tls, &[impostor_leaf], "mx.remote.test").unwrap_err();
        assert_eq!(e.result, ResultType::CertificateNotTrusted, "{e}");
    }
}
