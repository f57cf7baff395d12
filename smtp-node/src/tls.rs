//! Server-side TLS: the rustls configuration for STARTTLS and implicit TLS, and the certificate
//! that is re-read from its PEM files when they change (cert-manager renewals, rotated Secrets)
//! without a restart.
//!
//! Only TLS 1.2 and 1.3 are enabled; rustls offers nothing older and only AEAD suites with
//! forward secrecy. The certificate sits behind a [`ResolvesServerCert`] that reads an
//! `RwLock`, so a reload swaps the key for every later handshake while handshakes already
//! running keep the one they started with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;

/// Why the certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate file {path}: {source}")]
    ReadCertificate {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("certificate file {path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("cannot read private key file {path}: {source}")]
    ReadPrivateKey {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("private key {key} does not fit certificate {cert}: {source}")]
    MatchKey {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the TLS configuration: {0}")]
    BuildConfig(#[source] rustls::Error),
}

/// TLS details of an established connection, for logs and the `Received` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// e.g. `TLSv1.3`.
    pub version: String,
    /// e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
}

/// The node's TLS server side: an acceptor whose certificate can be swapped at run time.
#[derive(Clone)]
pub struct TlsServer {
    acceptor: TlsAcceptor,
    resolver: Arc<ReloadingResolver>,
}

impl TlsServer {
    /// Loads the certificate and key and builds the rustls configuration.
    pub fn load(config: &TlsConfig) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = load_certified_key(&config.cert_file, &config.key_file, &provider)?;
        let resolver = Arc::new(ReloadingResolver {
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
            provider: provider.clone(),
            current: RwLock::new(Loaded {
                key: Arc::new(key),
                stamp: file_stamp(&config.cert_file, &config.key_file),
            }),
        });
        let server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsError::BuildConfig)?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            resolver,
        })
    }

    /// The acceptor to run handshakes with.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Re-reads the files if their modification time or size changed. Returns whether a new
    /// certificate is now in use. A broken new file keeps the old certificate in place.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        self.resolver.reload_if_changed()
    }

    /// Polls the files every `config.reloadInterval` until `cancel` fires.
    pub async fn watch(self, interval: std::time::Duration, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match self.reload_if_changed() {
                Ok(true) => tracing::info!("reloaded TLS certificate"),
                Ok(false) => {}
                Err(error) => {
                    crate::metrics::global().tls_reload_failures.inc();
                    tracing::error!(%error, "TLS certificate changed but cannot be loaded; keeping the previous one");
                }
            }
        }
    }
}

/// TLS details of a finished handshake.
pub fn connection_info(conn: &rustls::ServerConnection) -> TlsInfo {
    let version = version_name(conn.protocol_version());
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_else(|| "unknown".to_owned());
    TlsInfo { version, cipher }
}

/// The name of a TLS version as used in `Received` headers and metrics (`TLSv1.3`).
pub fn version_name(version: Option<rustls::ProtocolVersion>) -> String {
    match version {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
        Some(other) => format!("{other:?}"),
        None => "unknown".to_owned(),
    }
}

struct Loaded {
    key: Arc<CertifiedKey>,
    stamp: Option<FileStamp>,
}

/// Modification time and length of both files: changes when either is rewritten.
type FileStamp = (SystemTime, u64, SystemTime, u64);

struct ReloadingResolver {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Loaded>,
}

impl std::fmt::Debug for ReloadingResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingResolver")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl ReloadingResolver {
    fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let stamp = file_stamp(&self.cert_file, &self.key_file);
        {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            if stamp.is_none() || current.stamp == stamp {
                return Ok(false);
            }
        }
        let result = load_certified_key(&self.cert_file, &self.key_file, &self.provider);
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        // Remember the stamp even on failure, so a broken file is reported once, not every tick.
        current.stamp = stamp;
        current.key = Arc::new(result?);
        Ok(true)
    }
}

impl ResolvesServerCert for ReloadingResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        Some(current.key.clone())
    }
}

fn load_certified_key(
    cert_file: &Path,
    key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadCertificate {
            path: cert_file.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_file.to_owned(),
        });
    }
    let key =
        PrivateKeyDer::from_pem_file(key_file).map_err(|source| TlsError::ReadPrivateKey {
            path: key_file.to_owned(),
            source,
        })?;
    CertifiedKey::from_der(certs, key, provider).map_err(|source| TlsError::MatchKey {
        cert: cert_file.to_owned(),
        key: key_file.to_owned(),
        source,
    })
}

fn file_stamp(cert: &Path, key: &Path) -> Option<FileStamp> {
    let c = std::fs::metadata(cert).ok()?;
    let k = std::fs::metadata(key).ok()?;
    Some((c.modified().ok()?, c.len(), k.modified().ok()?, k.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    fn write_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        std::fs::write(&cert_path, cert.cert.pem()).unwrap();
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    fn config(cert_file: PathBuf, key_file: PathBuf) -> TlsConfig {
        TlsConfig {
            cert_file,
            key_file,
            reload_interval: HumanDuration::from_secs(1),
        }
    }

    #[test]
    fn loads_and_reloads_when_files_change() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_cert(dir.path(), "one.test");
        let server = TlsServer::load(&config(cert.clone(), key.clone())).unwrap();
        let first = server.resolver.current.read().unwrap().key.clone();
        assert!(!server.reload_if_changed().unwrap());

        // A rewrite of different length changes the stamp even within one mtime tick.
        write_cert(dir.path(), "a-much-longer-name.example.test");
        assert!(server.reload_if_changed().unwrap());
        let second = server.resolver.current.read().unwrap().key.clone();
        assert_ne!(first.cert, second.cert);
    }

    #[test]
    fn broken_new_files_keep_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_cert(dir.path(), "one.test");
        let server = TlsServer::load(&config(cert.clone(), key)).unwrap();
        let before = server.resolver.current.read().unwrap().key.clone();
        std::fs::write(&cert, "not a certificate at all, and longer than before").unwrap();
        assert!(server.reload_if_changed().is_err());
        let after = server.resolver.current.read().unwrap().key.clone();
        assert_eq!(before.cert, after.cert);
    }

    #[test]
    fn missing_or_mismatched_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = TlsServer::load(&config(
            dir.path().join("nope.pem"),
            dir.path().join("k.pem"),
        ))
        .err()
        .unwrap();
        assert!(err.to_string().contains("nope.pem"), "{err}");

        let (cert, _) = write_cert(dir.path(), "one.test");
        let other = rcgen::generate_simple_self_signed(vec!["two.test".to_owned()]).unwrap();
        let other_key = dir.path().join("other-key.pem");
        std::fs::write(&other_key, other.signing_key.serialize_pem()).unwrap();
        let err = TlsServer::load(&config(cert, other_key)).err().unwrap();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }
}
