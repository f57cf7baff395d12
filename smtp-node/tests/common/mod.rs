//! Shared harness of the integration tests: a real `nats-server` with JetStream, the real
//! `smtp-node` binary with a generated config on free loopback ports, real clients (Python
//! smtplib scripts under `tests/clients/`, swaks, raw TCP and rustls), and reading queue
//! entries back from the stream. Children are killed on drop.
//!
//! Each node gets its own stream, subject prefix and body bucket, so tests sharing one
//! nats-server never see each other's messages.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The local part of the dev user and its password (see `examples/dev-users`).
pub const USER: &str = "alice@example.test";
pub const PASSWORD: &str = "wonderland";

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Fails with a clear message when a required tool is missing.
pub fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` is not on PATH. The integration tests need it: nats-server comes from \
         e2e/tools/setup.sh (export PATH=$(ls -d /root/.cache/kubemail/tools/*/ | tr '\\n' ':')$PATH), \
         swaks from Debian (with libnet-ssleay-perl for TLS), python3 from the system."
    );
}

pub use kubemail_test_support::ports::{free_port, free_ports};
pub use kubemail_test_support::wait::wait_for_port;

/// How long a server the tests start may take to listen.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// `tag` with a random suffix, for names that must not meet those of another test or run.
/// A queue entry of `domain` from `from` to `to`, accepted now, with nothing optional set
/// (tests that write entries by hand change what they need).
#[allow(dead_code)]
pub fn queue_entry(domain: &str, from: &str, to: &str) -> kubemail_queue::QueueEntry {
    kubemail_queue::QueueEntry::new(
        kubemail_queue::QueueId::new(),
        from.to_owned(),
        vec![to.to_owned()],
        kubemail_queue::Direction::Inbound,
        domain.to_owned(),
        std::time::SystemTime::now(),
    )
}

pub fn unique(tag: &str) -> String {
    format!("{tag}-{}", uuid::Uuid::new_v4().simple())
}

/// Whether the node's stream holds no entry (from a test on a multi-threaded runtime).
pub fn queue_is_empty(node: &Node) -> bool {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(node.messages()))
        .is_empty()
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// A nats-server with JetStream on a free port and its own store directory.
pub struct Nats {
    child: Option<Child>,
    /// Kept open so a wrapper shell can notice when the test process dies (see `shared`).
    _stdin: Option<ChildStdin>,
    pub port: u16,
    store: tempfile::TempDir,
}

impl Nats {
    /// Starts a server owned by the caller (stopped on drop).
    pub fn start() -> Self {
        let store = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut nats = Self {
            child: None,
            _stdin: None,
            port,
            store,
        };
        nats.spawn(false);
        nats
    }

    /// One server per test binary, for tests that never stop it. It runs under a shell that
    /// kills it when the test process exits (its stdin closes), since statics are not dropped.
    pub fn shared() -> &'static Nats {
        static SHARED: OnceLock<Nats> = OnceLock::new();
        SHARED.get_or_init(|| {
            let store = tempfile::tempdir().expect("tempdir");
            let port = free_port();
            let mut nats = Self {
                child: None,
                _stdin: None,
                port,
                store,
            };
            nats.spawn(true);
            nats
        })
    }

    fn spawn(&mut self, watchdog: bool) {
        let binary = require_tool("nats-server");
        let args = [
            "-js".to_owned(),
            "-sd".to_owned(),
            self.store.path().display().to_string(),
            "-a".to_owned(),
            "127.0.0.1".to_owned(),
            "-p".to_owned(),
            self.port.to_string(),
        ];
        let mut child = if watchdog {
            let script = format!(
                "{} {} >/dev/null 2>&1 & pid=$!; read _; kill $pid; wait $pid; rm -rf {}",
                binary.display(),
                args.join(" "),
                self.store.path().display()
            );
            Command::new("sh")
                .args(["-c", &script])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn nats-server")
        } else {
            Command::new(&binary)
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn nats-server")
        };
        wait_for_port(
            loopback(self.port),
            "nats-server",
            &mut child,
            START_TIMEOUT,
        );
        self._stdin = child.stdin.take();
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn(false);
    }

    /// Starts it again on the same port with an empty store (streams lost).
    pub fn restart_empty(&mut self) {
        self.stop();
        self.store = tempfile::tempdir().expect("tempdir");
        self.spawn(false);
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Addresses of a running node.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub mx: SocketAddr,
    pub mx_normalize: SocketAddr,
    pub mx_proxy: SocketAddr,
    pub submission: SocketAddr,
    pub implicit_tls: SocketAddr,
    pub admin: SocketAddr,
}

/// A running `smtp-node` process.
pub struct Node {
    child: Option<Child>,
    pub ports: Ports,
    pub stream: String,
    pub subject_prefix: String,
    pub bucket: String,
    pub nats_url: String,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    /// Extra environment of the process (OpenTelemetry settings, `LOG_FORMAT`, ...).
    env: Vec<(String, String)>,
}

impl Node {
    /// Starts a node against `nats_url` with the default test config, changed by `customize`
    /// (a JSON view of the YAML config), and waits until it listens (and, when
    /// `wait_ready`, until `/readyz` answers 200).
    pub fn start_with(
        nats_url: &str,
        wait_ready: bool,
        customize: impl FnOnce(&mut serde_json::Value),
    ) -> Self {
        Self::start_with_env(nats_url, wait_ready, &[], customize)
    }

    /// Like [`Node::start_with`], with extra environment variables for the process. Without
    /// them a node exports no traces, even when the test's environment names a collector.
    pub fn start_with_env(
        nats_url: &str,
        wait_ready: bool,
        env: &[(&str, &str)],
        customize: impl FnOnce(&mut serde_json::Value),
    ) -> Self {
        let id = format!(
            "{}x{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::tempdir().expect("tempdir");
        for f in ["dev-cert.pem", "dev-key.pem", "dev-users"] {
            std::fs::copy(examples_dir().join(f), dir.path().join(f)).expect("copy example file");
        }
        let [mx, mx_normalize, mx_proxy, submission, implicit_tls, admin] = free_ports::<6>();
        let ports = Ports {
            mx: loopback(mx),
            mx_normalize: loopback(mx_normalize),
            mx_proxy: loopback(mx_proxy),
            submission: loopback(submission),
            implicit_tls: loopback(implicit_tls),
            admin: loopback(admin),
        };
        let stream = format!("T{id}");
        let subject_prefix = format!("t{id}.queue");
        let bucket = format!("B{id}");
        let mut config = serde_json::json!({
            "hostname": "mx.example.test",
            "listeners": [
                { "name": "mx", "kind": "mx", "address": ports.mx.to_string() },
                { "name": "mxnorm", "kind": "mx", "address": ports.mx_normalize.to_string(), "bareLineEndings": "normalize" },
                { "name": "mxproxy", "kind": "mx", "address": ports.mx_proxy.to_string(), "proxyProtocol": true, "trustedProxies": ["127.0.0.0/8"] },
                { "name": "submission", "kind": "submission", "address": ports.submission.to_string() },
                { "name": "submissions", "kind": "implicitTls", "address": ports.implicit_tls.to_string() },
            ],
            "tls": { "certFile": "dev-cert.pem", "keyFile": "dev-key.pem", "reloadInterval": "1s" },
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
                // (delivery tests that deliver inbound set a real one).
                "inbound": { "host": "127.0.0.1", "port": 9, "protocol": "smtp" },
            }],
            "admin": { "address": ports.admin.to_string() },
            "shutdown": { "drainTimeout": "10s" },
            // The receiving-side tests read entries back from the stream: no worker may take
            // them, and no check may reach out to a DNS server or an inbound target.
            "delivery": { "enabled": false },
            "inboundAuth": { "enabled": false },
            "recipientVerification": { "enabled": false },
        });
        customize(&mut config);
        let config_path = dir.path().join("config.yaml");
        std::fs::write(
            &config_path,
            serde_yaml::to_string(&config).expect("config yaml"),
        )
        .expect("write config");
        let mut node = Self {
            child: None,
            ports,
            stream,
            subject_prefix,
            bucket,
            nats_url: nats_url.to_owned(),
            dir,
            config_path,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        node.spawn(wait_ready);
        node
    }

    /// A node with the default test config, ready.
    pub fn start(nats_url: &str) -> Self {
        Self::start_with(nats_url, true, |_| {})
    }

    fn spawn(&mut self, wait_ready: bool) {
        let log = std::fs::File::create(self.log_path()).expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_smtp-node"))
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "debug,async_nats=info")
            .env_remove("LOG_FORMAT")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_SERVICE_NAME")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn smtp-node");
        // The admin port is bound after the SMTP listeners. Probing it rather than an SMTP port
        // leaves no probe session holding a connection slot when the test starts.
        wait_for_port(self.ports.admin, "smtp-node", &mut child, START_TIMEOUT);
        self.child = Some(child);
        if wait_ready {
            self.wait_ready(Duration::from_secs(30));
        }
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
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("smtp-node exited with {status}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("smtp-node not ready within {limit:?}:\n{}", self.log());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("running node")
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, as Kubernetes does on pod deletion.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
    }

    /// Waits for the process to exit; returns whether it exited successfully.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().expect("running node");
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("smtp-node did not exit within {limit:?}:\n{}", self.log());
    }

    /// Starts the same node again (same config, ports, stream).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn(true);
    }

    /// The body bucket of example.test (one bucket per domain, named from `nats.bodyBucket`).
    pub fn body_bucket(&self) -> String {
        kubemail_queue::body_bucket(&self.bucket, "example.test")
    }

    /// Every queue entry in this node's stream.
    pub async fn messages(&self) -> Vec<QueuedEntry> {
        read_stream(&self.nats_url, &self.stream, &self.bucket).await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- smtp-node log ----\n{}", self.log());
        }
    }
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A minimal HTTP GET (no client dependency needed for three endpoints).
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
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

/// One entry of the queue stream, with its body resolved from the object store if needed.
#[derive(Debug, Clone)]
pub struct QueuedEntry {
    pub subject: String,
    pub headers: HashMap<String, Vec<String>>,
    pub body: Vec<u8>,
    /// Octets of `body` the entry carries itself (the rest is its body object).
    pub inline: usize,
}

impl QueuedEntry {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads every message of `stream` without consuming it (direct gets by sequence).
pub async fn read_stream(url: &str, stream: &str, bucket: &str) -> Vec<QueuedEntry> {
    let client = async_nats::connect(url).await.expect("connect to nats");
    let js = async_nats::jetstream::new(client);
    let mut s = match js.get_stream(stream).await {
        Ok(s) => s,
        Err(_) => return Vec::new(),
    };
    let state = s.info().await.expect("stream info").state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let Ok(m) = s.get_raw_message(seq).await else {
            continue;
        };
        let mut headers: HashMap<String, Vec<String>> = HashMap::new();
        for (k, values) in m.headers.iter() {
            headers.insert(
                k.to_string(),
                values.iter().map(|v| v.as_str().to_owned()).collect(),
            );
        }
        let mut body = m.payload.to_vec();
        let inline = body.len();
        if let Some(reference) = headers.get("Kubemail-Body-Ref").and_then(|v| v.first()) {
            let (b, name) = kubemail_queue::split_body_ref(reference).expect("bucket/name");
            // One bucket per domain: `<bodyBucket>-<domain>`.
            assert!(
                b.starts_with(&format!("{bucket}-")),
                "{b} is not of {bucket}"
            );
            let store = js.get_object_store(b).await.expect("body bucket");
            let mut object = store.get(name).await.expect("body object");
            // The message is the payload (empty, or the header section of a body stored
            // while it arrived) followed by the object.
            object.read_to_end(&mut body).await.expect("read body");
        }
        out.push(QueuedEntry {
            subject: m.subject.to_string(),
            headers,
            body,
            inline,
        });
    }
    out
}

/// Result of one step of `tests/clients/smtp_steps.py`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Step {
    pub op: String,
    pub code: i64,
    pub msg: String,
}

/// Runs the Python smtplib client with `steps` (see the script) against `addr`.
pub fn smtplib(addr: SocketAddr, mode: &str, steps: serde_json::Value) -> Vec<Step> {
    let python = require_tool("python3");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/smtp_steps.py");
    let output = Command::new(python)
        .arg(script)
        .args(["--host", "127.0.0.1", "--port", &addr.port().to_string()])
        .args(["--mode", mode])
        .args([
            "--cafile",
            &examples_dir().join("dev-cert.pem").display().to_string(),
        ])
        // On standard input: a large message does not fit on a command line.
        .args(["--steps", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(steps.to_string().as_bytes())?;
            }
            child.wait_with_output()
        })
        .expect("run python3");
    assert!(
        output.status.success(),
        "smtp_steps.py failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
        .stdout
        .lines()
        .map_while(Result::ok)
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

/// Asserts the codes of the steps, in order; the message must start with the enhanced code
/// when one is given as `"250 2.1.0"`.
pub fn assert_codes(steps: &[Step], expected: &[&str]) {
    let got: Vec<String> = steps
        .iter()
        .map(|s| format!("{} {}", s.code, s.msg))
        .collect();
    assert_eq!(steps.len(), expected.len(), "steps: {got:#?}");
    for (step, want) in steps.iter().zip(expected) {
        let line = format!("{} {}", step.code, step.msg);
        assert!(
            line.starts_with(want),
            "expected {want:?}, got {line:?}\nall: {got:#?}"
        );
    }
}

/// Runs swaks with `args`; returns its output (the dialogue).
pub fn swaks(args: &[&str]) -> String {
    let swaks = require_tool("swaks");
    let output = Command::new(swaks).args(args).output().expect("run swaks");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Server reply lines (`<-` or `<~`) of a swaks dialogue.
pub fn swaks_replies(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| {
            let t = l.trim_start();
            t.strip_prefix("<- ")
                .or_else(|| t.strip_prefix("<~ "))
                .or_else(|| t.strip_prefix("<** "))
                .or_else(|| t.strip_prefix("<~* "))
                .map(|r| r.trim().to_owned())
        })
        .collect()
}

/// A raw SMTP client over any async stream, reading whole replies.
pub struct Raw<S> {
    pub io: S,
    buf: Vec<u8>,
}

pub type RawTcp = Raw<tokio::net::TcpStream>;

impl RawTcp {
    pub async fn connect(addr: SocketAddr) -> Self {
        let io = tokio::net::TcpStream::connect(addr).await.expect("connect");
        io.set_nodelay(true).expect("nodelay");
        Self::new(io)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Raw<S> {
    pub fn new(io: S) -> Self {
        Self {
            io,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("write");
        self.io.flush().await.expect("flush");
    }

    /// The next complete reply, or `None` when the connection closed first.
    pub async fn try_reply(&mut self, limit: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(end) = reply_end(&self.buf) {
                let r: Vec<u8> = self.buf.drain(..end).collect();
                return Some(String::from_utf8_lossy(&r).into_owned());
            }
            let mut chunk = [0u8; 8192];
            let n = match tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => 0,
                Err(_) => panic!(
                    "no reply within {limit:?}; buffered {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
            };
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A reply if one arrives within `limit`; `None` on timeout or close.
    pub async fn reply_within(&mut self, limit: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(end) = reply_end(&self.buf) {
                let r: Vec<u8> = self.buf.drain(..end).collect();
                return Some(String::from_utf8_lossy(&r).into_owned());
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    pub async fn reply(&mut self) -> String {
        self.try_reply(Duration::from_secs(30))
            .await
            .expect("connection closed before a reply")
    }

    pub async fn expect(&mut self, prefix: &str) -> String {
        let r = self.reply().await;
        assert!(r.starts_with(prefix), "expected {prefix:?}, got {r:?}");
        r
    }

    pub async fn cmd(&mut self, line: &str, prefix: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.expect(prefix).await
    }

    /// True when the server closed the connection (EOF) with nothing more to say.
    pub async fn closed(&mut self, limit: Duration) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut chunk = [0u8; 256];
        matches!(
            tokio::time::timeout(limit, self.io.read(&mut chunk)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    pub fn into_inner(self) -> (S, Vec<u8>) {
        (self.io, self.buf)
    }
}

fn reply_end(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(pos) = buf[start..].windows(2).position(|w| w == b"\r\n") {
        let line = &buf[start..start + pos];
        let end = start + pos + 2;
        if line.len() < 4 || line[3] == b' ' {
            return Some(end);
        }
        start = end;
    }
    None
}

/// A rustls client config trusting the dev certificate (and nothing else).
pub fn tls_client_config(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(examples_dir().join("dev-cert.pem"))
        .expect("dev cert")
    {
        roots.add(cert.expect("cert")).expect("add root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Completes a TLS handshake as a client over `io`.
pub async fn tls_connect<S>(
    io: S,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::io::Result<tokio_rustls::client::TlsStream<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(versions));
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    connector.connect(name, io).await
}

/// Sends one message over a raw connection (EHLO already done) and returns the final reply.
pub async fn send_message<S>(c: &mut Raw<S>, from: &str, to: &str, body: &[u8]) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    c.cmd(&format!("MAIL FROM:<{from}>"), "250").await;
    c.cmd(&format!("RCPT TO:<{to}>"), "250").await;
    c.cmd("DATA", "354").await;
    c.send(body).await;
    c.send(b"\r\n.\r\n").await;
    c.reply().await
}

/// Line-oriented reading of a child's output (for log checks).
pub fn lines(text: &str) -> Vec<String> {
    text.as_bytes().lines().map_while(Result::ok).collect()
}
