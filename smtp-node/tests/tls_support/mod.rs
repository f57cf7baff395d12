//! Real TLS peers for the outbound TLS policy tests, all on loopback: a test CA (rcgen) whose
//! certificate the node trusts through `delivery.tls.extraCaFile` (or, for DANE, a CA it does
//! not trust, with the TLSA association data of its certificates); an HTTPS MTA-STS policy
//! server that counts its fetches; small SMTP MX peers with STARTTLS (and optionally
//! REQUIRETLS) that record what they receive and count their sessions, and whose offer can be
//! changed while they run; and a man in the middle that strips STARTTLS from the EHLO reply. Each peer binds its own 127.0.0.x address on a shared port, since
//! the node sends to every MX on `delivery.mxPort`. Tasks end with the test's runtime.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::PublicKeyData as _;
use sha2::{Digest as _, Sha256};

use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// A test certificate authority. Every one has the same name, so a second one is an impostor
/// of the first: its certificates name a trusted issuer that did not sign them.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub cert_pem: String,
    pub ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> Self {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kubemail TLS policy test CA");
        let cert = params.self_signed(&key).expect("CA");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, cert.pem()).expect("write CA");
        Self {
            issuer: rcgen::Issuer::new(params, key),
            cert_pem: cert.pem(),
            ca_file,
            _dir: dir,
        }
    }

    /// A leaf for `names` and its key: (chain leaf first, key).
    pub fn leaf(&self, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .expect("params");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    /// A PEM file pair (chain, key) for `names`, in `dir`.
    pub fn leaf_files(&self, names: &[&str], dir: &std::path::Path) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .expect("params");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        let (c, k) = (dir.join("leaf.pem"), dir.join("leaf.key"));
        std::fs::write(&c, cert.pem()).expect("write leaf");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c, k)
    }

    /// A TLS server configuration with a leaf for `names`.
    pub fn server_config(&self, names: &[&str]) -> Arc<ServerConfig> {
        let (chain, key) = self.leaf(names);
        server_config(chain, key)
    }

    /// A leaf for `names` served with this CA's certificate after it (a DANE-TA server must
    /// send its trust anchor, RFC 7671 5.2.2), and the leaf's SubjectPublicKeyInfo.
    pub fn dane_leaf(&self, names: &[&str], with_ca: bool) -> DaneLeaf {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .expect("params");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        let mut chain = vec![cert.der().clone()];
        if with_ca {
            chain.push(self.cert_der());
        }
        DaneLeaf {
            config: server_config(
                chain,
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            ),
            spki: key.subject_public_key_info(),
        }
    }

    /// This CA's certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        rustls_pki_types::pem::PemObject::from_pem_slice(self.cert_pem.as_bytes()).expect("CA PEM")
    }
}

/// A server configuration and the SPKI of its leaf.
pub struct DaneLeaf {
    pub config: Arc<ServerConfig>,
    pub spki: Vec<u8>,
}

/// Lower-case hex SHA-256 of `bytes`: TLSA matching type 1 (RFC 6698 2.1.3).
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// An HTTPS server for MTA-STS policies: host name → policy text; counts requests per host.
pub struct PolicyServer {
    pub port: u16,
    pub fetches: Arc<Mutex<HashMap<String, usize>>>,
}

impl PolicyServer {
    pub async fn start(ca: &TestCa, policies: HashMap<String, String>) -> Self {
        let names: Vec<&str> = policies.keys().map(String::as_str).collect();
        let acceptor = TlsAcceptor::from(ca.server_config(&names));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind policy server");
        let port = listener.local_addr().expect("addr").port();
        let fetches = Arc::new(Mutex::new(HashMap::new()));
        let counter = fetches.clone();
        let policies = Arc::new(policies);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let policies = policies.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    let mut reader = BufReader::new(tls);
                    let mut host = String::new();
                    let mut first = String::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if first.is_empty() {
                            first = line.clone();
                        }
                        if let Some(h) = line.to_ascii_lowercase().strip_prefix("host:") {
                            host = h.trim().split(':').next().unwrap_or_default().to_owned();
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    *counter
                        .lock()
                        .expect("lock")
                        .entry(host.clone())
                        .or_default() += 1;
                    let response = match policies.get(&host) {
                        Some(p) if first.starts_with("GET /.well-known/mta-sts.txt ") => format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{p}",
                            p.len()
                        ),
                        _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned(),
                    };
                    let mut tls = reader.into_inner();
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Self { port, fetches }
    }

    pub fn fetches(&self, host: &str) -> usize {
        self.fetches
            .lock()
            .expect("lock")
            .get(host)
            .copied()
            .unwrap_or(0)
    }
}

/// One message an MX peer received.
#[derive(Debug, Clone)]
pub struct Received {
    pub mail_from: String,
    pub data: String,
    pub tls: bool,
}

/// A small SMTP server as a remote MX.
pub struct MxPeer {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    options: Arc<Mutex<MxOptions>>,
    sessions: Arc<AtomicUsize>,
}

/// What an MX peer offers.
#[derive(Clone, Default)]
pub struct MxOptions {
    /// STARTTLS with this configuration; `None`: no STARTTLS.
    pub tls: Option<Arc<ServerConfig>>,
    pub requiretls: bool,
    /// Close the connection after each message, so every message is a session of its own
    /// (the client cannot reuse the connection).
    pub one_message_per_session: bool,
}

impl MxPeer {
    pub async fn start(ip: IpAddr, port: u16, options: MxOptions) -> Self {
        let listener = TcpListener::bind((ip, port)).await.expect("bind MX peer");
        let received = Arc::new(Mutex::new(Vec::new()));
        let store = received.clone();
        let options = Arc::new(Mutex::new(options));
        let current = options.clone();
        let sessions = Arc::new(AtomicUsize::new(0));
        let count = sessions.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let options = current.lock().expect("lock").clone();
                let store = store.clone();
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(60), smtp(tcp, options, store))
                            .await;
                });
            }
        });
        Self {
            addr: SocketAddr::new(ip, port),
            received,
            options,
            sessions,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    /// What sessions from now on are offered.
    pub fn set_options(&self, options: MxOptions) {
        *self.options.lock().expect("lock") = options;
    }

    /// How many connections it has accepted.
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::SeqCst)
    }
}

async fn smtp(tcp: TcpStream, options: MxOptions, store: Arc<Mutex<Vec<Received>>>) {
    let mut plain = BufReader::new(tcp);
    if plain
        .get_mut()
        .write_all(b"220 peer ESMTP\r\n")
        .await
        .is_err()
    {
        return;
    }
    if session(&mut plain, &options, false, &store).await == Some(true) {
        let Some(config) = options.tls.clone() else {
            return;
        };
        let Ok(tls) = TlsAcceptor::from(config).accept(plain.into_inner()).await else {
            return;
        };
        let mut tls = BufReader::new(tls);
        let _ = session(&mut tls, &options, true, &store).await;
    }
}

/// Serves commands; `Some(true)` when the client started TLS.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    options: &MxOptions,
    tls: bool,
    store: &Arc<Mutex<Vec<Received>>>,
) -> Option<bool> {
    let mut mail_from = String::new();
    loop {
        let mut line = String::new();
        if io.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let upper = line.trim_end().to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") {
            let mut caps = vec!["250-peer", "250-PIPELINING", "250-8BITMIME"];
            if !tls && options.tls.is_some() {
                caps.push("250-STARTTLS");
            }
            if tls && options.requiretls {
                caps.push("250-REQUIRETLS");
            }
            caps.push("250 ENHANCEDSTATUSCODES");
            caps.join("\r\n") + "\r\n"
        } else if upper == "STARTTLS" && !tls && options.tls.is_some() {
            io.get_mut()
                .write_all(b"220 2.0.0 go ahead\r\n")
                .await
                .ok()?;
            return Some(true);
        } else if upper.starts_with("MAIL FROM:") {
            mail_from = line.trim_end().to_owned();
            "250 2.1.0 ok\r\n".to_owned()
        } else if upper.starts_with("RCPT TO:") {
            "250 2.1.5 ok\r\n".to_owned()
        } else if upper == "DATA" {
            io.get_mut().write_all(b"354 go\r\n").await.ok()?;
            let mut data = String::new();
            loop {
                let mut l = String::new();
                if io.read_line(&mut l).await.ok()? == 0 {
                    return None;
                }
                if l == ".\r\n" {
                    break;
                }
                data.push_str(&l);
            }
            store.lock().ok()?.push(Received {
                mail_from: mail_from.clone(),
                data,
                tls,
            });
            if options.one_message_per_session {
                io.get_mut().write_all(b"250 2.0.0 queued\r\n").await.ok()?;
                let _ = io.get_mut().shutdown().await;
                return Some(false);
            }
            "250 2.0.0 queued\r\n".to_owned()
        } else if upper == "QUIT" {
            io.get_mut().write_all(b"221 bye\r\n").await.ok()?;
            return Some(false);
        } else if upper == "RSET" || upper == "NOOP" {
            "250 2.0.0 ok\r\n".to_owned()
        } else {
            "502 5.5.1 no\r\n".to_owned()
        };
        io.get_mut().write_all(reply.as_bytes()).await.ok()?;
    }
}

/// A man in the middle on `listen` that forwards to `upstream` and replaces `STARTTLS` in
/// everything the server says (so the EHLO reply no longer offers it), as a downgrade
/// attacker does.
pub async fn starttls_stripper(listen: SocketAddr, upstream: SocketAddr) {
    let listener = TcpListener::bind(listen).await.expect("bind stripper");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                };
                let down = async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let text =
                            String::from_utf8_lossy(&buf[..n]).replace("STARTTLS", "XXXXXXXA");
                        if cw.write_all(text.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                };
                tokio::join!(up, down);
            });
        }
    });
}
