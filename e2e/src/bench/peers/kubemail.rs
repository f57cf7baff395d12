//! One kubemail SMTP node (the release `smtp-node` binary) for a benchmark, with a generated
//! config on free loopback ports:
//! * `mx`: plain MX listener for the domain `bench.test` (catch-all), the accept-and-queue,
//!   latency and idle-connection benchmarks;
//! * `starttls`: an MX listener with `requireTls: true`, the "new TLS session per message"
//!   benchmark (no AUTH, like the Postfix side);
//! * `submission` (relay benchmark only): AUTH PLAIN without TLS for the benchmark user, whose
//!   domain relays to the sink with DKIM Ed25519 signing on.
//!
//! Limits that would refuse a benchmark's own load (connections per IP, messages per user per
//! minute) are raised; everything else is the node's production default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{
    ManagedChild, PeerError, START_TIMEOUT, create_dir, free_port, log_file, loopback,
    wait_for_port, write_file,
};
use crate::bench::procstat::ServerProcesses;
use crate::bench::tls::PkiFiles;

/// The domain every benchmark message is for (or, relaying, from).
pub const DOMAIN: &str = "bench.test";
/// The JetStream stream (the node's default).
pub const STREAM: &str = "KUBEMAIL";
/// Messages per minute a user may submit; high enough never to bind in a benchmark.
const UNLIMITED_PER_MINUTE: u32 = 100_000_000;

/// The relay benchmark's sending side.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Port of the sink on 127.0.0.1.
    pub sink_port: u16,
    /// Ed25519 DKIM key (PKCS#8 PEM).
    pub dkim_key: PathBuf,
    /// Users file holding the benchmark user.
    pub users_file: PathBuf,
}

/// Which optional config sections this `smtp-node` build knows (its config refuses unknown
/// fields, and the sending side is being built while these benchmarks are).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeFeatures {
    /// A `delivery` section: the sending side exists.
    pub delivery: bool,
    /// An `inboundAuth` section (SPF/DKIM/DMARC on MX listeners).
    pub inbound_auth: bool,
    /// A `dns` section (resolver settings).
    pub dns: bool,
    /// `nats.groupCommit` (atomic batches of many sessions' entries).
    pub group_commit: bool,
    /// A `recipientVerification` section (catch-all recipients checked with the target).
    pub recipient_verification: bool,
}

impl NodeFeatures {
    /// Reads the features from `smtp-node config-schema`.
    pub fn detect(binary: &Path) -> Result<Self, PeerError> {
        let out = Command::new(binary)
            .arg("config-schema")
            .output()
            .map_err(|source| PeerError::Spawn {
                what: "smtp-node config-schema".to_owned(),
                source,
            })?;
        let schema: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| PeerError::Command {
                what: "smtp-node config-schema".to_owned(),
                reason: e.to_string(),
            })?;
        let has = |key: &str| schema.get("properties").and_then(|p| p.get(key)).is_some();
        let nats_has = |key: &str| {
            schema
                .pointer("/$defs/NatsConfig/properties")
                .and_then(|p| p.get(key))
                .is_some()
        };
        Ok(Self {
            delivery: has("delivery"),
            inbound_auth: has("inboundAuth"),
            dns: has("dns"),
            group_commit: nats_has("groupCommit"),
            recipient_verification: has("recipientVerification"),
        })
    }
}

/// How to run the node.
#[derive(Debug, Clone)]
pub struct KubemailOptions {
    pub binary: PathBuf,
    pub dir: PathBuf,
    pub nats_url: String,
    /// Replicas of the queue stream (3 on a three-server cluster).
    pub nats_replicas: u32,
    pub pki: PkiFiles,
    /// Concurrent connections allowed (all from 127.0.0.1).
    pub max_connections: u32,
    pub relay: Option<RelayOptions>,
    pub features: NodeFeatures,
    /// A loopback address where nothing listens, used as the node's DNS server.
    pub dns_blackhole: SocketAddr,
    /// Whether the JetStream server syncs every write (`sync_interval: always`); without,
    /// group commit is turned off (`nats.groupCommit: false`): it has no fsync to share.
    pub synced_writes: bool,
}

/// A running node.
pub struct Kubemail {
    child: ManagedChild,
    pub mx: SocketAddr,
    pub starttls: SocketAddr,
    pub submission: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub nats_url: String,
    pub config_path: PathBuf,
    log_path: PathBuf,
}

impl Kubemail {
    /// Writes the config, checks it with `smtp-node check-config`, starts the node and waits
    /// until `/readyz` answers 200 (queue reachable).
    pub fn start(opts: &KubemailOptions) -> Result<Self, PeerError> {
        create_dir(&opts.dir)?;
        let mx = loopback(free_port()?);
        let starttls = loopback(free_port()?);
        let admin = loopback(free_port()?);
        let submission = match opts.relay {
            Some(_) => Some(loopback(free_port()?)),
            None => None,
        };
        let config = config_json(opts, mx, starttls, submission, admin);
        let config_path = opts.dir.join("smtp-node.json");
        write_file(
            &config_path,
            &serde_json::to_string_pretty(&config).unwrap_or_default(),
        )?;
        check_config(&opts.binary, &config_path)?;
        let log_path = opts.dir.join("smtp-node.log");
        let log = log_file(&log_path)?;
        let spawn_error = |source| PeerError::Spawn {
            what: "smtp-node".to_owned(),
            source,
        };
        let mut child = super::server_command(&opts.binary)
            .arg("--config")
            .arg(&config_path)
            .env_remove("RUST_LOG")
            // JSON lines, as the node logs in a pod (it chooses JSON inside Kubernetes).
            .env("LOG_FORMAT", "json")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(spawn_error)?)
            .stderr(log)
            .spawn()
            .map_err(spawn_error)?;
        // The admin port is bound after the SMTP listeners; probing it leaves no probe session
        // in the measured node.
        wait_for_port(admin.port(), "smtp-node", Some(&mut child), START_TIMEOUT)?;
        let mut node = Self {
            child: ManagedChild::new(child, "smtp-node"),
            mx,
            starttls,
            submission,
            admin,
            nats_url: opts.nats_url.clone(),
            config_path,
            log_path,
        };
        node.wait_ready(START_TIMEOUT)?;
        Ok(node)
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The last lines of the node's log (for error reports).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn stop(&mut self) {
        self.child.stop();
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), PeerError> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if http_status(self.admin, "/readyz") == Some(200) {
                return Ok(());
            }
            if self.child.has_exited() {
                return Err(PeerError::NotReady {
                    what: "smtp-node".to_owned(),
                    reason: format!("exited:\n{}", self.log_tail(20)),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(PeerError::NotReady {
            what: "smtp-node".to_owned(),
            reason: format!("/readyz not 200 after {timeout:?}:\n{}", self.log_tail(20)),
        })
    }
}

/// The server processes of a kubemail system: the node and its nats-server(s) (CPU is added
/// up per role).
pub fn processes(node_pid: u32, nats_pids: &[u32]) -> ServerProcesses {
    let mut pids = vec![("smtp-node".to_owned(), node_pid)];
    pids.extend(nats_pids.iter().map(|p| ("nats-server".to_owned(), *p)));
    ServerProcesses::Pids(pids)
}

/// Messages currently in the queue stream.
pub async fn queued(nats_url: &str) -> Result<u64, PeerError> {
    let err = |e: &dyn std::fmt::Display| PeerError::Queue(e.to_string());
    let urls: Vec<String> = nats_url.split(',').map(str::to_owned).collect();
    let client = tokio::time::timeout(Duration::from_secs(10), async_nats::connect(urls))
        .await
        .map_err(|e| err(&e))?
        .map_err(|e| err(&e))?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(STREAM).await.map_err(|e| err(&e))?;
    let info = stream.info().await.map_err(|e| err(&e))?;
    Ok(info.state.messages)
}

fn check_config(binary: &Path, config: &Path) -> Result<(), PeerError> {
    let out = Command::new(binary)
        .arg("check-config")
        .arg(config)
        .output()
        .map_err(|source| PeerError::Spawn {
            what: "smtp-node check-config".to_owned(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(PeerError::Command {
            what: "smtp-node check-config".to_owned(),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn config_json(
    opts: &KubemailOptions,
    mx: SocketAddr,
    starttls: SocketAddr,
    submission: Option<SocketAddr>,
    admin: SocketAddr,
) -> serde_json::Value {
    let mut listeners = vec![
        json!({ "name": "mx", "kind": "mx", "address": mx.to_string() }),
        json!({ "name": "starttls", "kind": "mx", "address": starttls.to_string(), "requireTls": true }),
    ];
    let mut domain = json!({
        "name": DOMAIN,
        "catchAll": true,
        // RCPT refuses a domain without an inbound target. Accept-and-queue never delivers
        // (delivery is off) and relaying sends to the relay, so nothing listens here.
        "inbound": { "host": "127.0.0.1", "port": 9, "protocol": "smtp" },
        "limits": { "messagesPerMinutePerUser": UNLIMITED_PER_MINUTE },
    });
    let mut config = json!({
        "hostname": "kubemail.bench.localhost",
        "tls": {
            "certFile": opts.pki.chain.display().to_string(),
            "keyFile": opts.pki.key.display().to_string(),
        },
        "nats": { "url": opts.nats_url, "publishTimeout": "30s", "replicas": opts.nats_replicas },
        "maxConnections": opts.max_connections,
        "maxConnectionsPerIp": opts.max_connections,
        "admin": { "address": admin.to_string() },
        "shutdown": { "drainTimeout": "5s" },
    });
    if opts.features.group_commit && !opts.synced_writes {
        config["nats"]["groupCommit"] = json!(false);
    }
    if let (Some(relay), Some(submission)) = (&opts.relay, submission) {
        listeners.push(json!({
            "name": "submission", "kind": "submission", "address": submission.to_string(),
            // The benchmark measures relaying and signing, not TLS; see the TLS benchmark.
            "requireTls": false,
        }));
        domain["usersFile"] = json!(relay.users_file.display().to_string());
        domain["relay"] = json!({
            "name": "sink",
            "host": "127.0.0.1",
            "port": relay.sink_port,
            "tls": "opportunistic",
            "verifyCertificate": false,
        });
        domain["dkim"] = json!({
            "keys": [{ "selector": "bench", "keyFile": relay.dkim_key.display().to_string() }],
        });
        config["delivery"] = json!({ "allowedNetworks": ["127.0.0.0/8"] });
    } else if opts.features.delivery {
        // Accept-and-queue: messages stay queued, as Postfix's stay in its hold queue.
        config["delivery"] = json!({ "enabled": false });
    }
    if opts.features.recipient_verification {
        // Postfix's benchmark instance accepts any recipient without asking a mail store;
        // compare like with like (the inbound target above is nothing to ask).
        config["recipientVerification"] = json!({ "enabled": false });
    }
    if opts.features.inbound_auth {
        // Postfix checks no SPF/DKIM/DMARC without milters; compare like with like.
        config["inboundAuth"] = json!({ "enabled": false });
    }
    if opts.features.dns {
        // Keep every lookup on loopback: a nameserver port where nothing listens answers
        // "refused" at once, and nothing leaves the machine.
        config["dns"] = json!({ "nameservers": [opts.dns_blackhole.to_string()], "attempts": 1 });
    }
    config["listeners"] = json!(listeners);
    config["domains"] = json!([domain]);
    config
}

/// Status code of a plain HTTP/1.1 GET (three admin endpoints need no HTTP client).
pub(crate) fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}
