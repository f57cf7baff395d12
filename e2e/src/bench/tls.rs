//! TLS for the benchmarks: one throw-away ECDSA P-256 CA and server certificate (for
//! `localhost`, 127.0.0.1 and ::1) that both kubemail and Postfix serve, and the load generator's
//! client settings, which trust only that CA and never resume sessions, so that "a new TLS
//! session per message" is a full handshake on both servers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

/// Why the test certificates or the client settings could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot generate the benchmark certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read CA certificates from {path}: {reason}")]
    ReadCa { path: PathBuf, reason: String },
    #[error("cannot build the client TLS settings: {0}")]
    Client(#[from] rustls::Error),
}

/// Files of the benchmark PKI.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    /// The CA certificate the client trusts.
    pub ca: PathBuf,
    /// Server certificate chain, leaf first (leaf, CA).
    pub chain: PathBuf,
    /// Server private key (PKCS#8).
    pub key: PathBuf,
}

/// Generates an ECDSA P-256 CA and a server certificate for `localhost`, 127.0.0.1 and ::1 and writes
/// them into `dir`. The key file is readable by its owner only.
pub fn generate(dir: &Path) -> Result<PkiFiles, TlsSetupError> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "kubemail benchmark CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let mut leaf_params = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf_key = KeyPair::generate()?;
    let leaf = leaf_params.signed_by(&leaf_key, &ca)?;
    let files = PkiFiles {
        ca: dir.join("ca.pem"),
        chain: dir.join("server-chain.pem"),
        key: dir.join("server-key.pem"),
    };
    write(&files.ca, ca.pem().as_bytes())?;
    write(
        &files.chain,
        format!("{}{}", leaf.pem(), ca.pem()).as_bytes(),
    )?;
    write(&files.key, leaf_key.serialize_pem().as_bytes())?;
    restrict(&files.key)?;
    Ok(files)
}

/// Client settings trusting the CAs in `ca_file` only; TLS 1.3 and 1.2, no session resumption.
pub fn client_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let read_error = |reason: String| TlsSetupError::ReadCa {
        path: ca_file.to_owned(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| read_error(e.to_string()))? {
        let cert = cert.map_err(|e| read_error(e.to_string()))?;
        roots.add(cert).map_err(|e| read_error(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(read_error("no certificate in the file".to_owned()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every connection must pay for a full handshake on the server, as a new client would.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), TlsSetupError> {
    std::fs::write(path, bytes).map_err(|source| TlsSetupError::Write {
        path: path.to_owned(),
        source,
    })
}

fn restrict(path: &Path) -> Result<(), TlsSetupError> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        TlsSetupError::Write {
            path: path.to_owned(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::PrivateKeyDer;

    use super::*;

    #[tokio::test]
    async fn clients_complete_a_handshake_with_the_generated_chain() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate(dir.path()).unwrap();
        let chain: Vec<_> = CertificateDer::pem_file_iter(&files.chain)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(chain.len(), 2);
        let key = PrivateKeyDer::from_pem_file(&files.key).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let connector = tokio_rustls::TlsConnector::from(client_config(&files.ca).unwrap());
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        // Both ends stay alive until both handshakes are done.
        let (server, client) = tokio::join!(acceptor.accept(b), connector.connect(name, a));
        server.unwrap();
        client.unwrap();
    }
}
