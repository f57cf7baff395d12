//! TLS certificates from the operator's own CA (used when a MailDomain names no cert-manager
//! issuer): the CA itself (ECDSA P-256, kept in one Secret in the operator's namespace and
//! shared by every domain), leaf certificates for the node host names, and the renewal rule
//! (renew at two thirds of the lifetime, as cert-manager does by default, or when the host
//! name or the CA changed).
//!
//! Issuing uses rcgen; reading an existing certificate uses x509-parser. [`renewal`] is pure.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::parse_x509_pem;

use crate::dkim::PrivateKeyPem;
use crate::timestamps::UnixSeconds;

/// Secret keys of a `kubernetes.io/tls` Secret (and `ca.crt` as cert-manager writes it).
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_KEY_KEY: &str = "tls.key";
pub const CA_CERT_KEY: &str = "ca.crt";
/// Lifetime of the operator's CA: ten years, the CA is rotated by hand (delete its Secret).
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86400);
/// Backdating of `notBefore`, so a peer whose clock is a little behind accepts a fresh leaf.
const CLOCK_SKEW_ALLOWANCE: i64 = 5 * 60;

/// Why a certificate could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot generate a key pair")]
    GenerateKey(#[source] rcgen::Error),
    #[error("cannot build the certificate")]
    SignCertificate(#[source] rcgen::Error),
    #[error("the CA Secret holds no usable certificate and key")]
    ReadCa(#[source] rcgen::Error),
    #[error("certificate time out of range")]
    TimeRange,
}

/// A CA certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaBundle {
    pub cert_pem: String,
    pub key_pem: PrivateKeyPem,
}

/// A leaf certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: PrivateKeyPem,
    pub not_before: UnixSeconds,
    pub not_after: UnixSeconds,
}

/// What an existing leaf certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    pub not_before: UnixSeconds,
    pub not_after: UnixSeconds,
    pub dns_names: Vec<String>,
    /// The signature checks out against the CA's key.
    pub signed_by_ca: bool,
}

/// Why a leaf must be (re)issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewReason {
    Missing,
    Unreadable,
    HostnameChanged,
    CaChanged,
    DueForRenewal,
}

impl RenewReason {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Missing => "no certificate yet",
            Self::Unreadable => "the stored certificate cannot be read",
            Self::HostnameChanged => "the host name (or the MTA-STS policy host) changed",
            Self::CaChanged => "the operator CA changed",
            Self::DueForRenewal => "two thirds of its lifetime have passed",
        }
    }
}

/// Makes a new self-signed CA.
pub fn new_ca(now: UnixSeconds) -> Result<CaBundle, CertError> {
    let key =
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CertError::GenerateKey)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kubemail operator CA");
    dn.push(DnType::OrganizationName, "kubemail");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = offset(now - CLOCK_SKEW_ALLOWANCE)?;
    params.not_after = offset(now + crate::timestamps::seconds(CA_VALIDITY))?;
    let cert = params
        .self_signed(&key)
        .map_err(CertError::SignCertificate)?;
    Ok(CaBundle {
        cert_pem: cert.pem(),
        key_pem: PrivateKeyPem::new(key.serialize_pem()),
    })
}

/// Issues a server certificate for `hostname`, valid for `validity` from `now`.
pub fn issue_leaf(
    ca: &CaBundle,
    hostname: &str,
    now: UnixSeconds,
    validity: Duration,
) -> Result<IssuedCert, CertError> {
    issue_leaf_for(ca, &[hostname.to_owned()], now, validity)
}

/// Issues a server certificate for `names` (the first is also the common name: the node's
/// host name; then `mta-sts.<domain>` when the domain publishes MTA-STS).
pub fn issue_leaf_for(
    ca: &CaBundle,
    names: &[String],
    now: UnixSeconds,
    validity: Duration,
) -> Result<IssuedCert, CertError> {
    issue_server_certificate(ca, names, now, validity, false)
}

/// Issues a server certificate for several names (DNS names, or IP addresses where a name
/// parses as one; the first is the common name), valid for `validity` from `now`. With
/// `client_auth` it may also authenticate as a client (NATS routes: each server presents it
/// to the other).
pub fn issue_server_certificate(
    ca: &CaBundle,
    names: &[String],
    now: UnixSeconds,
    validity: Duration,
    client_auth: bool,
) -> Result<IssuedCert, CertError> {
    let ca_key = KeyPair::from_pem(ca.key_pem.expose()).map_err(CertError::ReadCa)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(CertError::ReadCa)?;
    let key =
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CertError::GenerateKey)?;
    let mut params = CertificateParams::new(names.to_vec()).map_err(CertError::SignCertificate)?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        names.first().map(String::as_str).unwrap_or("kubemail"),
    );
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    if client_auth {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    params.use_authority_key_identifier_extension = true;
    let not_before = now - CLOCK_SKEW_ALLOWANCE;
    let not_after = now + crate::timestamps::seconds(validity);
    params.not_before = offset(not_before)?;
    params.not_after = offset(not_after)?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(CertError::SignCertificate)?;
    Ok(IssuedCert {
        cert_pem: cert.pem(),
        key_pem: PrivateKeyPem::new(key.serialize_pem()),
        not_before,
        not_after,
    })
}

/// Reads a PEM leaf certificate and checks it against the CA certificate.
pub fn inspect_leaf(cert_pem: &str, ca_cert_pem: &str) -> Option<LeafInfo> {
    let (_, pem) = parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let (_, ca_pem) = parse_x509_pem(ca_cert_pem.as_bytes()).ok()?;
    let ca = ca_pem.parse_x509().ok()?;
    let dns_names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(LeafInfo {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        dns_names,
        signed_by_ca: cert.verify_signature(Some(ca.public_key())).is_ok(),
    })
}

/// The end of validity (`notAfter`) of the first certificate of a PEM chain (the leaf, as
/// `tls.crt` holds it); `None` when it is not a readable certificate.
pub fn certificate_not_after(cert_pem: &str) -> Option<UnixSeconds> {
    let (_, pem) = parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// When a certificate valid from `not_before` to `not_after` is renewed: after two thirds of
/// its lifetime.
pub fn renew_after(not_before: UnixSeconds, not_after: UnixSeconds) -> UnixSeconds {
    not_before + (not_after - not_before) * 2 / 3
}

/// Whether the stored leaf must be replaced, and why. Pure.
pub fn renewal(
    leaf: Option<&LeafInfo>,
    stored_present: bool,
    hostname: &str,
    now: UnixSeconds,
) -> Option<RenewReason> {
    renewal_for(leaf, stored_present, &[hostname.to_owned()], now)
}

/// [`renewal`] for a certificate that must carry exactly `names`.
pub fn renewal_for(
    leaf: Option<&LeafInfo>,
    stored_present: bool,
    names: &[String],
    now: UnixSeconds,
) -> Option<RenewReason> {
    let Some(leaf) = leaf else {
        return Some(if stored_present {
            RenewReason::Unreadable
        } else {
            RenewReason::Missing
        });
    };
    if !leaf.signed_by_ca {
        Some(RenewReason::CaChanged)
    } else if leaf.dns_names != names {
        Some(RenewReason::HostnameChanged)
    } else if now >= renew_after(leaf.not_before, leaf.not_after) {
        Some(RenewReason::DueForRenewal)
    } else {
        None
    }
}

fn offset(t: UnixSeconds) -> Result<OffsetDateTime, CertError> {
    OffsetDateTime::from_unix_timestamp(t).map_err(|_| CertError::TimeRange)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000;
    const DAY: i64 = 86400;

    #[test]
    fn leaf_is_for_the_hostname_signed_by_the_ca_and_renewed_at_two_thirds() {
        let ca = new_ca(T0).unwrap();
        let leaf = issue_leaf(&ca, "mx.example.com", T0, Duration::from_secs(90 * 86400)).unwrap();
        let info = inspect_leaf(&leaf.cert_pem, &ca.cert_pem).unwrap();
        assert_eq!(info.dns_names, ["mx.example.com"]);
        assert!(info.signed_by_ca);
        assert_eq!(info.not_after, T0 + 90 * DAY);
        assert_eq!(renewal(Some(&info), true, "mx.example.com", T0 + DAY), None);
        let due = renew_after(info.not_before, info.not_after);
        assert!(due > T0 + 59 * DAY && due < T0 + 61 * DAY);
        assert_eq!(
            renewal(Some(&info), true, "mx.example.com", due),
            Some(RenewReason::DueForRenewal)
        );
        assert_eq!(
            renewal(Some(&info), true, "mail.example.com", T0),
            Some(RenewReason::HostnameChanged)
        );
        let other = new_ca(T0).unwrap();
        let foreign = inspect_leaf(&leaf.cert_pem, &other.cert_pem).unwrap();
        assert_eq!(
            renewal(Some(&foreign), true, "mx.example.com", T0),
            Some(RenewReason::CaChanged)
        );
        assert_eq!(
            renewal(None, false, "mx.example.com", T0),
            Some(RenewReason::Missing)
        );
        assert_eq!(
            renewal(None, true, "mx.example.com", T0),
            Some(RenewReason::Unreadable)
        );
        assert!(!format!("{leaf:?}").contains("PRIVATE KEY"));
    }
}
