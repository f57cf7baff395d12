//! Client-side TLS for delivery: two rustls configurations.
//!
//! * **verified**: the Mozilla root store (webpki-roots) plus an optional extra CA file, with
//!   normal name checks. Used for relays and for MX connections when TLS is required.
//! * **unverified**: accepts any certificate (handshake signatures are still checked). Used
//!   for opportunistic STARTTLS to MX hosts: without MTA-STS or DANE an MTA cannot know which
//!   name the certificate should carry (MX records are unauthenticated), and the alternative
//!   to unverified TLS is plaintext, not verified TLS (RFC 7435 "opportunistic security";
//!   Postfix `smtp_tls_security_level = may` does the same). Credentials are never sent over
//!   an unverified connection. MTA-STS and DANE (see [`super::policy`]) also hand-shake with
//!   this configuration and then check the chain the server sent before saying EHLO.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::metrics::TlsLabels;

/// Why the TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("cannot read CA file {path}: {source}")]
    ReadCaFile {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("CA file {path} holds no usable certificate")]
    NoCertificate { path: PathBuf },
    #[error("cannot build the TLS client configuration: {0}")]
    Build(#[source] rustls::Error),
}

/// The two client configurations, and the WebPKI verifier of the verified one for checks
/// after a handshake (MTA-STS, DANE-TA; see [`super::policy::verify`]).
#[derive(Clone)]
pub struct ClientTls {
    verified: Arc<ClientConfig>,
    unverified: Arc<ClientConfig>,
    webpki: Arc<WebPkiServerVerifier>,
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    /// Handshakes made with these configurations (`tls_handshakes`, side `client`).
    handshakes: Family<TlsLabels, Counter>,
}

impl ClientTls {
    /// Builds both configurations; `extra_ca_file` adds trusted CAs to the verified one.
    pub fn new(extra_ca_file: Option<&Path>) -> Result<Self, ClientTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = extra_ca_file {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|source| ClientTlsError::ReadCaFile {
                    path: path.to_owned(),
                    source,
                })?;
            let (added, _ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(ClientTlsError::NoCertificate {
                    path: path.to_owned(),
                });
            }
        }
        let roots = Arc::new(roots);
        let webpki = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| ClientTlsError::Build(rustls::Error::General(e.to_string())))?;
        let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
        let verified = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map_err(ClientTlsError::Build)?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        let unverified = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map_err(ClientTlsError::Build)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider.clone())))
            .with_no_client_auth();
        Ok(Self {
            verified: Arc::new(verified),
            unverified: Arc::new(unverified),
            webpki,
            provider,
            roots,
            handshakes: Family::default(),
        })
    }

    /// Counts its handshakes in `handshakes` (the node's `tls_handshakes`).
    pub fn counted_in(self, handshakes: Family<TlsLabels, Counter>) -> Self {
        Self { handshakes, ..self }
    }

    /// Counts a handshake; `version` is `None` when it failed.
    pub fn count_handshake(&self, version: Option<&str>) {
        crate::metrics::count_tls_handshake(&self.handshakes, "client", version);
    }

    /// The WebPKI verifier with the trusted roots (Mozilla's and `extraCaFile`).
    pub fn webpki(&self) -> &WebPkiServerVerifier {
        &self.webpki
    }

    /// The crypto provider of both configurations.
    pub fn provider(&self) -> Arc<CryptoProvider> {
        self.provider.clone()
    }

    /// The trusted roots (for the MTA-STS policy fetch).
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// The configuration for a connection that must (`true`) or need not verify the peer.
    pub fn config(&self, verify: bool) -> Arc<ClientConfig> {
        if verify {
            self.verified.clone()
        } else {
            self.unverified.clone()
        }
    }
}

/// The name to send in SNI and to verify: the host name, or the IP address when the host is
/// an address (an address literal or an IP inbound target).
pub fn server_name(host: &str, fallback: std::net::IpAddr) -> ServerName<'static> {
    let trimmed = host.trim_start_matches('[').trim_end_matches(']');
    let trimmed = trimmed.strip_prefix("IPv6:").unwrap_or(trimmed);
    if let Ok(ip) = trimmed.parse::<std::net::IpAddr>() {
        return ServerName::IpAddress(ip.into());
    }
    ServerName::try_from(host.to_owned()).unwrap_or(ServerName::IpAddress(fallback.into()))
}

/// Accepts every certificate; still verifies the handshake signatures with the provider's
/// algorithms, so the session keys belong to whoever holds the presented key.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn builds_with_and_without_extra_cas() {
        ClientTls::new(None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(&ca, params.self_signed(&key).unwrap().pem()).unwrap();
        ClientTls::new(Some(&ca)).unwrap();
        std::fs::write(&ca, "not a certificate").unwrap();
        assert!(ClientTls::new(Some(&ca)).is_err());
    }

    #[test]
    fn server_names_for_hosts_and_literals() {
        let ip = "192.0.2.1".parse().unwrap();
        assert!(matches!(
            server_name("mx.example.test", ip),
            ServerName::DnsName(_)
        ));
        assert!(matches!(
            server_name("[192.0.2.7]", ip),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[IPv6:2001:db8::1]", ip),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("127.0.0.1", ip),
            ServerName::IpAddress(_)
        ));
    }
}
