//! The real `smtp-node` binary under attack: a generated config on free loopback ports
//! (MX, submission with STARTTLS, implicit TLS, admin), its own stream, subject prefix and
//! body bucket so that cases sharing a nats-server never see each other's mail, and the
//! development certificate and users of `smtp-node/examples` (alice@example.test /
//! wonderland). Killed on drop; its log is printed when a case fails.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::nats::{StoredEntry, read_stream};
use super::process::{
    Proc, START_TIMEOUT, free_ports, rss_kib, smtp_node_binary, smtp_node_dir, wait_for_port,
};

/// The submission user of the example users file, and its password.
pub const USER: &str = "alice@example.test";
pub const PASSWORD: &str = "wonderland";
/// The node's host name in the generated config.
pub const HOSTNAME: &str = "mx.example.test";

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Addresses of a running node.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub mx: SocketAddr,
    pub submission: SocketAddr,
    pub implicit_tls: SocketAddr,
    pub admin: SocketAddr,
}

/// A running `smtp-node` process.
pub struct Node {
    proc: Option<Proc>,
    pub ports: Ports,
    pub stream: String,
    pub subject_prefix: String,
    pub bucket: String,
    pub nats_url: String,
    dir: tempfile::TempDir,
    config_path: PathBuf,
}

impl Node {
    /// Starts a node against `nats_url` with the default hostile-suite config changed by
    /// `customize` (a JSON view of the YAML file), and waits until `/readyz` answers 200.
    pub fn start(nats_url: &str, customize: impl FnOnce(&mut Value, &Ports)) -> Self {
        Self::start_with(nats_url, true, customize)
    }

    /// As [`Node::start`]; `wait_ready` false only waits for the MX port.
    pub fn start_with(
        nats_url: &str,
        wait_ready: bool,
        customize: impl FnOnce(&mut Value, &Ports),
    ) -> Self {
        let id = format!(
            "{}x{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let examples = smtp_node_dir().join("examples");
        for f in ["dev-cert.pem", "dev-key.pem", "dev-users"] {
            std::fs::copy(examples.join(f), dir.path().join(f)).expect("copy example file");
        }
        let [mx, submission, implicit_tls, admin] = free_ports::<4>();
        let lo = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let ports = Ports {
            mx: lo(mx),
            submission: lo(submission),
            implicit_tls: lo(implicit_tls),
            admin: lo(admin),
        };
        let stream = format!("H{id}");
        let subject_prefix = format!("h{id}.queue");
        let bucket = format!("HB{id}");
        let mut config = json!({
            "hostname": HOSTNAME,
            "listeners": [
                { "name": "mx", "kind": "mx", "address": ports.mx.to_string() },
                { "name": "submission", "kind": "submission", "address": ports.submission.to_string() },
                { "name": "submissions", "kind": "implicitTls", "address": ports.implicit_tls.to_string() },
            ],
            "tls": { "certFile": "dev-cert.pem", "keyFile": "dev-key.pem" },
            "nats": {
                "url": nats_url,
                "stream": stream,
                "subjectPrefix": subject_prefix,
                "bodyBucket": bucket,
                "publishTimeout": "3s",
            },
            "domains": [{
                "name": "example.test",
                "recipients": ["postmaster", "bob"],
                "usersFile": "dev-users",
                // A domain receives mail only with an inbound target; nothing listens here
                // unless a case puts a peer there.
                "inbound": { "host": "127.0.0.1", "port": 9, "protocol": "smtp" },
            }],
            "admin": { "address": ports.admin.to_string() },
            "shutdown": { "drainTimeout": "5s" },
            "delivery": { "enabled": false },
            "inboundAuth": { "enabled": false },
            // Cases that probe recipients turn it on with a peer as the inbound target.
            "recipientVerification": { "enabled": false },
        });
        customize(&mut config, &ports);
        let config_path = dir.path().join("config.yaml");
        std::fs::write(
            &config_path,
            serde_yaml::to_string(&config).expect("config yaml"),
        )
        .expect("write config");
        let mut node = Self {
            proc: None,
            ports,
            stream,
            subject_prefix,
            bucket,
            nats_url: nats_url.to_owned(),
            dir,
            config_path,
        };
        node.spawn(wait_ready);
        node
    }

    fn spawn(&mut self, wait_ready: bool) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("node log");
        let mut child = Command::new(smtp_node_binary())
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info,async_nats=warn")
            .env("NO_COLOR", "1")
            .env_remove("LOG_FORMAT")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn smtp-node");
        // The admin port is bound after the SMTP listeners; probing it leaves no probe session
        // holding a connection slot.
        wait_for_port(self.ports.admin, "smtp-node", &mut child, START_TIMEOUT);
        self.proc = Some(Proc::new(child, "smtp-node"));
        if wait_ready {
            self.wait_ready(START_TIMEOUT);
        }
    }

    /// The node's working directory (config, certificate, users, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("node.log")
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Polls `/readyz` until it answers 200.
    pub fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if http_get(self.ports.admin, "/readyz").starts_with("HTTP/1.1 200") {
                return;
            }
            if let Some(p) = self.proc.as_mut()
                && !p.running()
            {
                panic!("smtp-node exited:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("smtp-node not ready within {limit:?}:\n{}", self.log());
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map(Proc::pid).expect("running node")
    }

    /// Resident memory now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid()).unwrap_or(0)
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::running)
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts the same node again (same config, ports and stream).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn(true);
    }

    /// `/metrics` as text.
    pub fn metrics(&self) -> String {
        http_get(self.ports.admin, "/metrics")
    }

    /// Sum of the metric lines that start with `prefix`.
    pub fn counter(&self, prefix: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    }

    /// Recipients this node process has delivered (over all domains).
    pub fn delivered(&self) -> f64 {
        self.counter_with(
            "kubemail_smtp_delivery_recipients_total",
            "result=\"delivered\"",
        )
    }

    /// Sum of the metric lines that start with `prefix` and contain `label` (e.g.
    /// `result="deferred"`).
    pub fn counter_with(&self, prefix: &str, label: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(prefix) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    }

    /// Every entry of this node's queue stream, read through `url`.
    pub async fn entries(&self, url: &str) -> Vec<StoredEntry> {
        read_stream(url, &self.stream)
            .await
            .unwrap_or_else(|e| panic!("reading stream {}: {e}", self.stream))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!(
                "---- smtp-node log (last 80 lines) ----\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// A minimal HTTP/1.1 GET (the admin endpoint has three paths; no client needed).
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Turns delivery on, towards `dns` (Knot) for MX lookups, with seconds-scale timeouts and
/// retries so that faults resolve within a case.
pub fn enable_delivery(config: &mut Value, dns: &str, mx_port: u16, allow_loopback: bool) {
    config["dns"] = json!({ "nameservers": [dns], "timeout": "2s", "attempts": 2 });
    config["delivery"] = json!({
        "enabled": true,
        "concurrency": 8,
        "mxPort": mx_port,
        "allowedNetworks": if allow_loopback { json!(["127.0.0.0/8"]) } else { json!([]) },
        "retry": { "minBackoff": "1s", "maxBackoff": "2s", "lifetime": "120s", "bounceLifetime": "120s" },
        "timeouts": {
            "connect": "2s", "greeting": "2s", "command": "2s", "mail": "2s", "rcpt": "2s",
            "dataInit": "2s", "dataBlock": "2s", "dataTermination": "2s"
        },
        "connections": { "idleTimeout": "1s" },
        "consumer": { "ackWait": "3s", "maxDeliver": 20 },
    });
}
