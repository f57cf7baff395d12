//! Server-side TLS: the rustls configuration for STARTTLS and implicit TLS, and the certificate
//! that is re-read from its PEM files when they change (cert-manager renewals, rotated Secrets)
//! without a restart.
//!
//! Only TLS 1.2 and 1.3 are enabled; rustls offers nothing older and only AEAD suites with
//! forward secrecy. The server's suite order wins (AES-128-GCM first, the cheapest handshake);
//! TLS 1.3 resumption uses one stateless ticket per handshake, so nothing is kept per client.
//! The certificate sits behind a [`ResolvesServerCert`] that reads an `RwLock`, so a reload
//! swaps the key for every later handshake while handshakes already running keep the one they
//! started with. A node serving many domains also holds one certificate per domain, chosen by
//! the client's SNI (the domain's MX host name); a client without SNI, or asking for another
//! name, gets the node's default certificate. The domain table is swapped as a whole when the
//! node's config changes ([`TlsServer::set_domain_certificates`]).

use std::collections::HashMap;
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

use crate::config::{DomainTls, TlsConfig};

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

/// The node's TLS server side: an acceptor whose certificates can be swapped at run time.
#[derive(Clone)]
pub struct TlsServer {
    acceptor: TlsAcceptor,
    /// The default certificate.
    resolver: Arc<ReloadingResolver>,
    sni: Arc<SniResolver>,
}

/// Domain certificates by lower-case SNI host name, over the default one.
#[derive(Debug)]
struct SniResolver {
    default: Arc<ReloadingResolver>,
    domains: RwLock<HashMap<String, Arc<ReloadingResolver>>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = client_hello.server_name() {
            let domains = self.domains.read().unwrap_or_else(|e| e.into_inner());
            if let Some(domain) = domains.get(&name.to_ascii_lowercase()) {
                return Some(domain.key());
            }
        }
        Some(self.default.key())
    }
}

impl TlsServer {
    /// Loads the certificate and key and builds the rustls configuration.
    pub fn load(config: &TlsConfig) -> Result<Self, TlsError> {
        let mut provider = rustls::crypto::ring::default_provider();
        provider
            .cipher_suites
            .sort_by_key(|suite| cipher_suite_rank(suite.suite()));
        let provider = Arc::new(provider);
        let resolver = Arc::new(ReloadingResolver::load(
            &config.cert_file,
            &config.key_file,
            provider.clone(),
        )?);
        let sni = Arc::new(SniResolver {
            default: resolver.clone(),
            domains: RwLock::new(HashMap::new()),
        });
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsError::BuildConfig)?
            .with_no_client_auth()
            .with_cert_resolver(sni.clone());
        // Our order, not the client's: rustls clients (and others) list AES-256-GCM-SHA384
        // first, whose SHA-384 key schedule has no hardware help on most x86 (6% of the
        // node's CPU in the STARTTLS-per-message benchmark), while AES-128-GCM-SHA256
        // is just as safe and its SHA-256 runs on the SHA extensions.
        server.ignore_client_order = true;
        // Stateless, rotating tickets (ChaCha20-Poly1305, keys replaced every 6 hours), one
        // per handshake: a returning client can resume without the node keeping anything per
        // session. rustls's default is two tickets per handshake kept in a 256-entry cache,
        // which under load is overwritten within milliseconds, so the work bought nothing.
        server.ticketer = rustls::crypto::ring::Ticketer::new().map_err(TlsError::BuildConfig)?;
        server.send_tls13_tickets = TLS13_TICKETS;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            resolver,
            sni,
        })
    }

    /// Replaces the table of domain certificates with `domains`' (as one swap: a handshake
    /// sees the old table or the new one). Certificates whose files are unchanged are kept
    /// as loaded; a domain whose files cannot be loaded is left out (its clients get the
    /// default certificate) and its error returned.
    pub fn set_domain_certificates<'a>(
        &self,
        domains: impl IntoIterator<Item = &'a DomainTls>,
    ) -> Vec<(String, TlsError)> {
        let mut errors = Vec::new();
        let old = self
            .sni
            .domains
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut table = HashMap::new();
        for d in domains {
            let name = d.hostname.to_ascii_lowercase();
            let kept = old
                .get(&name)
                .filter(|r| r.cert_file == d.cert_file && r.key_file == d.key_file);
            let resolver = match kept {
                Some(r) => {
                    if let Err(e) = r.reload_if_changed() {
                        errors.push((name.clone(), e));
                    }
                    r.clone()
                }
                None => match ReloadingResolver::load(
                    &d.cert_file,
                    &d.key_file,
                    self.resolver.provider.clone(),
                ) {
                    Ok(r) => Arc::new(r),
                    Err(e) => {
                        errors.push((name, e));
                        continue;
                    }
                },
            };
            table.insert(name, resolver);
        }
        *self.sni.domains.write().unwrap_or_else(|e| e.into_inner()) = table;
        errors
    }

    /// The SNI names that have a certificate of their own, sorted.
    pub fn domain_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .sni
            .domains
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// A configuration for HTTPS with the same (reloading) certificate that answers only
    /// for the SNI names `names` (the MTA-STS policy hosts, [`crate::mta_sts_server`]).
    pub fn https_config(&self, names: Vec<String>) -> Result<Arc<ServerConfig>, TlsError> {
        let resolver = Arc::new(SniOnly {
            names,
            inner: self.resolver.clone(),
        });
        let mut server = ServerConfig::builder_with_provider(self.resolver.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsError::BuildConfig)?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(server))
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

    /// Polls the files every `config.reloadInterval` until `cancel` fires; a changed file that
    /// cannot be loaded counts in `reload_failures`.
    pub async fn watch(
        self,
        interval: std::time::Duration,
        cancel: CancellationToken,
        reload_failures: prometheus_client::metrics::counter::Counter,
    ) {
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
                    reload_failures.inc();
                    tracing::error!(%error, "TLS certificate changed but cannot be loaded; keeping the previous one");
                }
            }
            let domains: Vec<(String, Arc<ReloadingResolver>)> = self
                .sni
                .domains
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (hostname, resolver) in domains {
                match resolver.reload_if_changed() {
                    Ok(true) => tracing::info!(%hostname, "reloaded a domain's TLS certificate"),
                    Ok(false) => {}
                    Err(error) => {
                        reload_failures.inc();
                        tracing::error!(%hostname, %error, "a domain's TLS certificate changed but cannot be loaded; keeping the previous one");
                    }
                }
            }
        }
    }
}

/// TLS 1.3 session tickets sent after each handshake. SMTP clients open one connection to a
/// host at a time, so one ticket is enough to resume the next one.
const TLS13_TICKETS: usize = 1;

/// Preference of a cipher suite, lowest first: TLS 1.3 before TLS 1.2, then AES-128-GCM
/// (SHA-256 key schedule, hardware SHA and AES on current x86 and ARM), AES-256-GCM,
/// ChaCha20-Poly1305 (for clients without AES instructions). Mozilla's "intermediate" order.
fn cipher_suite_rank(suite: rustls::CipherSuite) -> u8 {
    use rustls::CipherSuite as S;
    match suite {
        S::TLS13_AES_128_GCM_SHA256 => 0,
        S::TLS13_AES_256_GCM_SHA384 => 1,
        S::TLS13_CHACHA20_POLY1305_SHA256 => 2,
        S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 3,
        S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 4,
        _ => 5,
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
    fn load(
        cert_file: &Path,
        key_file: &Path,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let key = load_certified_key(cert_file, key_file, &provider)?;
        Ok(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            provider,
            current: RwLock::new(Loaded {
                key: Arc::new(key),
                stamp: file_stamp(cert_file, key_file),
            }),
        })
    }

    fn key(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .key
            .clone()
    }

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
        Some(self.key())
    }
}

/// The node's certificate, only for clients that ask for one of `names` (lower case).
#[derive(Debug)]
struct SniOnly {
    names: Vec<String>,
    inner: Arc<ReloadingResolver>,
}

impl ResolvesServerCert for SniOnly {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = client_hello.server_name()?.to_ascii_lowercase();
        if self.names.contains(&sni) {
            self.inner.resolve(client_hello)
        } else {
            None
        }
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

    /// A client offering the default rustls order (AES-256-GCM first) over an in-memory pipe;
    /// returns the negotiated suite and the kind of handshake (both sides agree on it).
    async fn connect(
        server: &TlsServer,
        client: &Arc<rustls::ClientConfig>,
    ) -> (rustls::CipherSuite, rustls::HandshakeKind) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, b) = tokio::io::duplex(1 << 16);
        let acceptor = server.acceptor().clone();
        let serving = tokio::spawn(async move {
            let mut tls = acceptor.accept(a).await.unwrap();
            let kind = tls.get_ref().1.handshake_kind().unwrap();
            tls.write_all(b"220 hello\r\n").await.unwrap();
            tls.shutdown().await.unwrap();
            kind
        });
        let connector = tokio_rustls::TlsConnector::from(client.clone());
        let name = rustls_pki_types::ServerName::try_from("one.test").unwrap();
        let mut tls = connector.connect(name, b).await.unwrap();
        // Reading to the end also takes in the session ticket sent after the handshake.
        let mut hello = Vec::new();
        tls.read_to_end(&mut hello).await.unwrap();
        assert_eq!(hello, b"220 hello\r\n");
        let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap().suite();
        let client_kind = tls.get_ref().1.handshake_kind().unwrap();
        assert_eq!(serving.await.unwrap(), client_kind);
        (suite, client_kind)
    }

    #[tokio::test]
    async fn prefers_aes_128_and_resumes_with_a_ticket() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_cert(dir.path(), "one.test");
        let server = TlsServer::load(&config(cert.clone(), key)).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&cert).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        assert_eq!(
            provider.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            "the client prefers AES-256"
        );
        let client = Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let first = connect(&server, &client).await;
        assert_eq!(
            first,
            (
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
                rustls::HandshakeKind::Full
            )
        );
        // The ticket of the first connection resumes the second: nothing was stored on the
        // server side for it.
        let second = connect(&server, &client).await;
        assert_eq!(second.1, rustls::HandshakeKind::Resumed);
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

    /// Whether a client that trusts `roots` completes a handshake asking for `name` by SNI
    /// (the served certificate must be valid for `name`).
    async fn handshake_as(server: &TlsServer, roots: &rustls::RootCertStore, name: &str) -> bool {
        let client = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth(),
        );
        let (a, b) = tokio::io::duplex(1 << 16);
        let acceptor = server.acceptor().clone();
        let serving = tokio::spawn(async move { acceptor.accept(a).await.is_ok() });
        let connector = tokio_rustls::TlsConnector::from(client);
        let name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let ok = connector.connect(name, b).await.is_ok();
        let _ = serving.await;
        ok
    }

    #[tokio::test]
    async fn domain_certificates_are_served_by_sni_and_swapped_as_a_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut roots = rustls::RootCertStore::empty();
        let mut make = |name: &str| {
            let sub = dir.path().join(name);
            std::fs::create_dir_all(&sub).unwrap();
            let (cert, key) = write_cert(&sub, name);
            for c in CertificateDer::pem_file_iter(&cert).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            (cert, key)
        };
        let (pool_cert, pool_key) = make("pool.test");
        let (a_cert, a_key) = make("mx.a.test");
        let (b_cert, b_key) = make("mx.b.test");
        let server = TlsServer::load(&config(pool_cert, pool_key)).unwrap();
        assert!(handshake_as(&server, &roots, "pool.test").await);
        assert!(
            !handshake_as(&server, &roots, "mx.a.test").await,
            "no domain certificate yet: the default one does not fit mx.a.test"
        );

        let a = DomainTls {
            hostname: "MX.A.test".into(),
            cert_file: a_cert,
            key_file: a_key,
        };
        let broken = DomainTls {
            hostname: "mx.broken.test".into(),
            cert_file: dir.path().join("missing.pem"),
            key_file: dir.path().join("missing-key.pem"),
        };
        let errors = server.set_domain_certificates([&a, &broken]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].0, "mx.broken.test");
        assert_eq!(server.domain_names(), ["mx.a.test"]);
        assert!(handshake_as(&server, &roots, "mx.a.test").await);
        assert!(
            handshake_as(&server, &roots, "pool.test").await,
            "others get the default"
        );

        // Attach b, detach a: one swap.
        let b = DomainTls {
            hostname: "mx.b.test".into(),
            cert_file: b_cert,
            key_file: b_key,
        };
        assert!(server.set_domain_certificates([&b]).is_empty());
        assert_eq!(server.domain_names(), ["mx.b.test"]);
        assert!(handshake_as(&server, &roots, "mx.b.test").await);
        assert!(!handshake_as(&server, &roots, "mx.a.test").await);
    }
}
