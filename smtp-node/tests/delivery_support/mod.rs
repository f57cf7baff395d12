//! Real peers for the delivery tests: Knot DNS (`knotd`) serving test zones on a free
//! loopback port, mailpit and Postfix's `smtp-sink` as remote MX hosts and inbound targets,
//! dkimpy as the independent DKIM verifier and Python's `email` package as the independent
//! DSN parser. Each test starts its own instances; children are killed on drop. Every wait
//! is bounded and fails with what was seen so far.

#![allow(dead_code)]

use std::io::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{
    PASSWORD, START_TIMEOUT, USER, free_port, loopback, require_tool, smtplib, wait_for_port,
};
pub use kubemail_test_support::knot::Dnssec;
pub use kubemail_test_support::wait::wait_until;

/// The node's host name in the test config (`tests/common`).
pub const HOSTNAME: &str = "mx.example.test";

pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// Spawns a server on a free port, retrying with another port when it exits early (another
/// test took the port between `free_port` and the bind).
fn spawn_on_free_port(what: &str, mut spawn: impl FnMut(u16) -> Child) -> (Child, u16) {
    for _ in 0..5 {
        let port = free_port();
        let mut child = spawn(port);
        if wait_for_tcp_or_exit(port, what, &mut child) {
            // A port race shows as an exit right after start-up.
            std::thread::sleep(Duration::from_millis(150));
            if matches!(child.try_wait(), Ok(None)) {
                return (child, port);
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("{what} could not start on a free port after 5 attempts");
}

/// Waits until `port` accepts connections (true) or the child exits (false).
fn wait_for_tcp_or_exit(port: u16, what: &str, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{what} did not listen on port {port} within 20 s");
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

// ---- Knot DNS -----------------------------------------------------------------------------

/// An authoritative Knot DNS server for the given zones, on 127.0.0.1 (UDP and TCP).
pub struct Knot {
    child: Option<Child>,
    pub port: u16,
    /// The trust anchor (DNSKEY of `test.`) of a server started with signed zones.
    pub trust_anchor_file: Option<PathBuf>,
    dir: tempfile::TempDir,
}

impl Knot {
    /// Starts knotd with `zones`: (origin, records relative to it). SOA and NS are added.
    pub fn start(zones: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let prepared = kubemail_test_support::knot::prepare(dir.path(), zones);
        Self::serve(dir, &prepared, None)
    }

    /// Starts knotd with DNSSEC: `test.` signed, each zone signed (or broken, or left
    /// unsigned) as its [`Dnssec`] says; [`Knot::trust_anchor_file`] holds `test.`'s key.
    pub fn start_signed(zones: &[(&str, String, Dnssec)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let signed = kubemail_test_support::knot::prepare_signed(dir.path(), zones);
        let anchor = dir.path().join("trust-anchor.key");
        std::fs::write(&anchor, &signed.trust_anchor).expect("trust anchor");
        Self::serve(dir, &signed.prepared, Some(anchor))
    }

    fn serve(
        dir: tempfile::TempDir,
        prepared: &kubemail_test_support::knot::Prepared,
        trust_anchor_file: Option<PathBuf>,
    ) -> Self {
        let knotd = PathBuf::from("/usr/sbin/knotd");
        assert!(
            knotd.is_file(),
            "/usr/sbin/knotd is missing: the delivery tests need Knot DNS (Debian package knot)"
        );
        let conf_path = dir.path().join("knot.conf");
        let (child, port) = spawn_on_free_port("knotd", |port| {
            std::fs::write(&conf_path, prepared.config(port)).expect("knot.conf");
            let log = std::fs::File::create(dir.path().join("knot.log")).expect("knot log");
            Command::new(&knotd)
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("spawn knotd")
        });
        let knot = Self {
            child: Some(child),
            port,
            trust_anchor_file,
            dir,
        };
        wait_until(Duration::from_secs(20), "knotd to serve its zones", || {
            prepared.serves_all(knot.port).then_some(())
        });
        knot
    }

    /// `ip:port` for configs and dnspython.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        kill(&mut self.child);
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("knot.log")).unwrap_or_default();
            eprintln!("---- knotd log ----\n{log}");
        }
    }
}

/// The example.test zone: MX, SPF, DMARC and the dev DKIM keys (the records of
/// `examples/dev-dkim.zone`).
pub fn example_zone() -> (&'static str, String) {
    let dkim =
        std::fs::read_to_string(examples_dir().join("dev-dkim.zone")).expect("dev-dkim.zone");
    (
        "example.test",
        format!(
            "@ IN MX 10 mx\nmx IN A 127.0.0.1\n@ IN TXT \"v=spf1 ip4:127.0.0.0/8 -all\"\n_dmarc IN TXT \"v=DMARC1; p=reject\"\n{dkim}"
        ),
    )
}

/// The remote.test zone: its MX is `mx.remote.test`, which is `mx_ip`.
pub fn remote_zone(mx_ip: &str) -> (&'static str, String) {
    (
        "remote.test",
        format!(
            "@ IN MX 10 mx\nmx IN A {mx_ip}\n@ IN TXT \"v=spf1 ip4:127.0.0.0/8 -all\"\n_dmarc IN TXT \"v=DMARC1; p=none\"\n"
        ),
    )
}

// ---- mailpit ------------------------------------------------------------------------------

/// A mailpit: SMTP on one port, HTTP API on another, its own database.
pub struct Mailpit {
    child: Option<Child>,
    pub smtp_port: u16,
    pub http_port: u16,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Mailpit {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts mailpit with extra command-line arguments.
    pub fn start_with(args: &[&str]) -> Self {
        let mailpit = require_tool("mailpit");
        let dir = tempfile::tempdir().expect("tempdir");
        let smtp = std::cell::Cell::new(0u16);
        let (mut child, http_port) = spawn_on_free_port("mailpit", |http_port| {
            let smtp_port = free_port();
            smtp.set(smtp_port);
            let log = std::fs::File::create(dir.path().join("mailpit.log")).expect("log");
            Command::new(&mailpit)
                .args(["--smtp", &format!("127.0.0.1:{smtp_port}")])
                .args(["--listen", &format!("127.0.0.1:{http_port}")])
                .arg("--database")
                .arg(dir.path().join("mp.db"))
                // No reverse lookups: the tests talk to loopback only.
                .arg("--smtp-disable-rdns")
                .args(args)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("spawn mailpit")
        });
        let smtp_port = smtp.get();
        wait_for_port(
            loopback(smtp_port),
            "mailpit (SMTP)",
            &mut child,
            START_TIMEOUT,
        );
        Self {
            child: Some(child),
            smtp_port,
            http_port,
            dir,
            http: reqwest::Client::new(),
        }
    }

    /// The message summaries (newest first), as mailpit's API gives them.
    pub async fn messages(&self) -> Vec<Value> {
        let url = format!(
            "http://127.0.0.1:{}/api/v1/messages?limit=500",
            self.http_port
        );
        let Ok(resp) = self.http.get(url).send().await else {
            return Vec::new();
        };
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        v["messages"].as_array().cloned().unwrap_or_default()
    }

    /// The raw source of message `id` as mailpit stored it.
    pub async fn raw(&self, id: &str) -> Vec<u8> {
        let url = format!(
            "http://127.0.0.1:{}/api/v1/message/{id}/raw",
            self.http_port
        );
        let resp = self.http.get(url).send().await.expect("mailpit raw");
        assert!(
            resp.status().is_success(),
            "mailpit raw {id}: {}",
            resp.status()
        );
        resp.bytes().await.expect("raw body").to_vec()
    }

    /// The full details of message `id` (headers, `ReturnPath` = the envelope sender, ...).
    pub async fn details(&self, id: &str) -> Value {
        let url = format!("http://127.0.0.1:{}/api/v1/message/{id}", self.http_port);
        let resp = self.http.get(url).send().await.expect("mailpit message");
        resp.json().await.expect("message JSON")
    }

    /// Waits until a message whose subject contains `subject` arrives; returns its summary
    /// and raw source.
    pub async fn wait_for_subject(&self, subject: &str, limit: Duration) -> (Value, Vec<u8>) {
        let deadline = Instant::now() + limit;
        loop {
            let messages = self.messages().await;
            if let Some(m) = messages
                .iter()
                .find(|m| m["Subject"].as_str().is_some_and(|s| s.contains(subject)))
            {
                let id = m["ID"].as_str().expect("message ID").to_owned();
                return (m.clone(), self.raw(&id).await);
            }
            if Instant::now() > deadline {
                let subjects: Vec<&str> = messages
                    .iter()
                    .filter_map(|m| m["Subject"].as_str())
                    .collect();
                panic!(
                    "no message with subject {subject:?} in mailpit within {limit:?}; it has: {subjects:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many stored messages have a subject containing `subject`.
    pub async fn count_subject(&self, subject: &str) -> usize {
        self.messages()
            .await
            .iter()
            .filter(|m| m["Subject"].as_str().is_some_and(|s| s.contains(subject)))
            .count()
    }
}

impl Drop for Mailpit {
    fn drop(&mut self) {
        kill(&mut self.child);
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self.dir.path().join("mailpit.log")).unwrap_or_default();
            eprintln!("---- mailpit log ----\n{log}");
        }
    }
}

// ---- smtp-sink ----------------------------------------------------------------------------

/// Postfix's `smtp-sink`: a fake MX with fault injection that dumps every transaction it
/// completes into a directory.
pub struct Sink {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Sink {
    /// Starts smtp-sink with extra options (`-r DATA` for 4xx, `-f RCPT` for 5xx, ...).
    pub fn start(options: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // smtp-sink drops privileges to `nobody` (required when run as root) and writes there.
        let dumps = dir.path().join("dumps");
        std::fs::create_dir_all(&dumps).expect("dumps dir");
        let _ = Command::new("chmod")
            .args(["777", &dumps.display().to_string()])
            .status();
        let template = format!("{}/msg.", dumps.display());
        let (child, port) =
            spawn_on_free_port("smtp-sink", |port| sink_command(&template, options, port));
        Self {
            child: Some(child),
            port,
            dir,
        }
    }

    /// Stops it and starts it again on the same port with other options.
    pub fn restart(&mut self, options: &[&str]) {
        kill(&mut self.child);
        let template = format!("{}/msg.", self.dir.path().join("dumps").display());
        let mut child = sink_command(&template, options, self.port);
        wait_for_port(loopback(self.port), "smtp-sink", &mut child, START_TIMEOUT);
        self.child = Some(child);
    }

    /// The transactions it completed (dump files: envelope as `X-` lines, then the message).
    pub fn transactions(&self) -> Vec<String> {
        kubemail_test_support::smtp_sink::transactions(&self.dir.path().join("dumps"))
    }

    /// How many completed transactions contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        kubemail_test_support::smtp_sink::count(&self.dir.path().join("dumps"), needle)
    }
}

/// The message of an smtp-sink dump: without the envelope's `X-` lines, with CRLF line ends
/// again (smtp-sink writes LF).
pub fn sink_message(dump: &str) -> Vec<u8> {
    let message: Vec<&str> = dump.lines().skip_while(|l| l.starts_with("X-")).collect();
    let mut text = message.join("\r\n");
    text.push_str("\r\n");
    text.into_bytes()
}

fn sink_command(template: &str, options: &[&str], port: u16) -> Child {
    let binary = PathBuf::from("/usr/sbin/smtp-sink");
    assert!(
        binary.is_file(),
        "/usr/sbin/smtp-sink is missing: the delivery tests need Postfix (Debian package postfix)"
    );
    Command::new(binary)
        .args(["-u", "nobody", "-d", template])
        .args(options)
        .arg(format!("127.0.0.1:{port}"))
        .arg("64")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn smtp-sink")
}

impl Drop for Sink {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

// ---- the node under test ------------------------------------------------------------------

/// What a delivery test node looks like.
pub struct Setup<'a> {
    pub dns: &'a Knot,
    /// Port of remote MX hosts (mailpit or smtp-sink).
    pub mx_port: u16,
    /// Port of example.test's inbound target (SMTP).
    pub inbound_port: Option<u16>,
    pub allow_loopback: bool,
    pub dkim: bool,
    /// `record` or `enforce`; `None` disables inbound checks.
    pub inbound_auth: Option<&'a str>,
}

impl<'a> Setup<'a> {
    /// Remote MX hosts on `mx_port` (loopback allowed), no inbound target, no DKIM, no
    /// inbound checks; the other cases change a field of this.
    pub fn to_mx(dns: &'a Knot, mx_port: u16) -> Self {
        Self {
            dns,
            mx_port,
            inbound_port: None,
            allow_loopback: true,
            dkim: false,
            inbound_auth: None,
        }
    }
}

/// Turns the receiving-side test config of `tests/common` into a delivering one.
pub fn configure(config: &mut Value, s: &Setup<'_>) {
    config["dns"] = json!({ "nameservers": [s.dns.addr()], "timeout": "2s", "attempts": 2 });
    config["delivery"] = json!({
        "enabled": true,
        "concurrency": 8,
        "mxPort": s.mx_port,
        "allowedNetworks": if s.allow_loopback { json!(["127.0.0.0/8"]) } else { json!([]) },
        // Seconds instead of minutes and days, so retries and expiry happen within a test.
        "retry": { "minBackoff": "1s", "maxBackoff": "2s", "lifetime": "60s", "bounceLifetime": "60s" },
        "timeouts": {
            "connect": "5s", "greeting": "20s", "command": "20s", "mail": "20s", "rcpt": "20s",
            "dataInit": "20s", "dataBlock": "20s", "dataTermination": "30s"
        },
        "connections": { "idleTimeout": "2s" },
        "consumer": { "ackWait": "3s", "maxDeliver": 6 },
    });
    config["inboundAuth"] = match s.inbound_auth {
        Some(mode) => json!({ "enabled": true, "dmarc": mode, "timeout": "10s" }),
        None => json!({ "enabled": false }),
    };
    let domain = &mut config["domains"][0];
    if let Some(port) = s.inbound_port {
        domain["inbound"] = json!({ "host": "127.0.0.1", "port": port, "protocol": "smtp" });
    }
    if s.dkim {
        domain["dkim"] = json!({ "keys": [
            { "selector": "dev-rsa", "keyFile": examples_dir().join("dev-dkim-rsa.pem") },
            { "selector": "dev-ed", "keyFile": examples_dir().join("dev-dkim-ed25519.pem") },
        ]});
    }
}

/// Submits a message as alice@example.test over STARTTLS + AUTH; asserts the `250`.
pub fn submit(submission: std::net::SocketAddr, to: &[&str], subject: &str, body: &str) {
    let message = format!(
        "From: Alice <alice@example.test>\r\nTo: {}\r\nSubject: {subject}\r\nDate: Sat, 28 Nov 2026 00:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{body}\r\n",
        to.join(", ")
    );
    let steps = smtplib(
        submission,
        "starttls",
        json!([
            ["login", USER, PASSWORD],
            ["send", "alice@example.test", to, message],
            ["quit"]
        ]),
    );
    let send = steps.iter().find(|s| s.op == "send").expect("send step");
    assert_eq!(send.code, 250, "submission refused: {steps:?}");
}

pub fn venv_python() -> PathBuf {
    let dkimverify = require_tool("dkimverify");
    let python = dkimverify.with_file_name("python3");
    assert!(
        python.is_file(),
        "no python3 next to {} (the dkimpy virtualenv of e2e/tools/setup.sh)",
        dkimverify.display()
    );
    python
}

pub fn run_python(script: &str, args: &[&str], input: &[u8]) -> Value {
    let mut child = Command::new(venv_python())
        .arg(clients_dir().join(script))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write message");
    let out = child.wait_with_output().expect("wait for python");
    assert!(
        out.status.success(),
        "{script} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// dkimpy's verdict on every DKIM signature of `message`, keys looked up in `dns`.
pub fn dkim_verify(message: &[u8], dns: &Knot) -> Vec<Value> {
    run_python("dkim_verify.py", &["--dns", &dns.addr()], message)
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Python's `email` view of a DSN.
pub fn parse_dsn(message: &[u8]) -> Value {
    run_python("parse_dsn.py", &[], message)
}

/// The node's log without terminal colour codes, for searching.
pub fn log(node: &crate::common::Node) -> String {
    let raw = node.log();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            // Skip "ESC [ params letter".
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The recipients of `example.test` delivered so far (a counter line of `/metrics`).
pub const DELIVERED: &str =
    "kubemail_smtp_delivery_recipients_total{domain=\"example.test\",result=\"delivered\"}";
/// The recipients of `example.test` deferred so far.
pub const DEFERRED: &str =
    "kubemail_smtp_delivery_recipients_total{domain=\"example.test\",result=\"deferred\"}";

/// The node's `/metrics` text.
pub fn metrics(node: &crate::common::Node) -> String {
    crate::common::http_get(node.ports.admin, "/metrics")
}

/// The value of a counter line that starts with `prefix` (0 when absent).
pub fn counter(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

// ---- scripted MX (aiosmtpd) -----------------------------------------------------------------

/// A remote MX with scripted replies (`tests/clients/scripted_mx.py`, aiosmtpd): per
/// recipient a list of `RCPT` replies used in order, or one greeting line for every
/// connection. Its log records every connection, `RCPT` and message.
pub struct ScriptedMx {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl ScriptedMx {
    /// Starts the peer with `script` (see the script's doc).
    pub fn start(script: Value) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let script_path = dir.path().join("script.json");
        std::fs::write(&script_path, script.to_string()).expect("script");
        let log_path = dir.path().join("log.jsonl");
        let python = venv_python();
        let (child, port) = spawn_on_free_port("scripted MX", |port| {
            let out = std::fs::File::create(dir.path().join("stderr.log")).expect("log");
            Command::new(&python)
                .arg(clients_dir().join("scripted_mx.py"))
                .arg(port.to_string())
                .arg(&script_path)
                .arg(&log_path)
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("log"))
                .stderr(out)
                .spawn()
                .expect("spawn scripted_mx.py")
        });
        Self {
            child: Some(child),
            port,
            dir,
        }
    }

    /// Every logged event so far.
    pub fn log(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("log.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// How often `RCPT TO` named `address`.
    pub fn rcpt_count(&self, address: &str) -> usize {
        self.log()
            .iter()
            .filter(|e| e["event"] == "rcpt" && e["address"] == address)
            .count()
    }

    /// The messages received (`rcpt_tos`, `data`).
    pub fn messages(&self) -> Vec<Value> {
        self.log()
            .into_iter()
            .filter(|e| e["event"] == "message")
            .collect()
    }
}

impl Drop for ScriptedMx {
    fn drop(&mut self) {
        kill(&mut self.child);
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
            eprintln!("---- scripted MX stderr ----\n{log}");
        }
    }
}

/// Every delivery event in the events stream so far, in stream order.
pub async fn events(nats_url: &str) -> Vec<Value> {
    crate::common::read_stream(nats_url, kubemail_queue::names::EVENTS_STREAM, "")
        .await
        .into_iter()
        .filter_map(|m| serde_json::from_slice(&m.body).ok())
        .collect()
}

/// Waits for the first event of `kind` (`bounced`, ...) about `recipient` that `accept`
/// likes.
pub fn wait_for_event(
    nats_url: &str,
    kind: &str,
    recipient: &str,
    accept: impl Fn(&Value) -> bool,
) -> Value {
    let ty = format!("io.kubemail.delivery.{kind}");
    wait_until(
        Duration::from_secs(40),
        &format!("a {kind} event for {recipient}"),
        || {
            let all = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(events(nats_url))
            });
            all.into_iter()
                .find(|e| e["type"] == ty.as_str() && e["subject"] == recipient && accept(e))
        },
    )
}

/// jsonschema's verdict on each event against the checked-in CloudEvents 1.0 schema.
pub fn validate_cloudevents(events: &[Value]) -> Vec<Value> {
    run_python(
        "validate_cloudevents.py",
        &[],
        serde_json::to_string(events).expect("json").as_bytes(),
    )
    .as_array()
    .cloned()
    .unwrap_or_default()
}
