//! The SMTP load generator: `sessions` concurrent connections send `messages` messages of
//! `message_size` bytes, either as fast as the server answers (closed loop, open throttle) or
//! at a fixed offered rate (open loop: message `i` is due at `start + i / rate`, whichever
//! session is free sends it). Each message gets a unique recipient, like `smtp-source -N`.
//!
//! Two latencies are recorded per accepted message in HDR histograms (microseconds):
//! * **data latency**: from writing the end of data (`CRLF.CRLF`) to reading the reply, the
//!   time the server takes to make the message safe;
//! * **transaction latency**: from when the message was due (open loop) or its session was
//!   ready (closed loop) to the final reply. In open loop this includes waiting for a free
//!   session, so a server that falls behind cannot hide it (no coordinated omission).
//!
//! Every run is bounded in count (`messages`) and time (`max_duration`, plus at most one I/O
//! timeout for transactions in flight), and only loopback targets are accepted.

pub mod client;
pub mod idle;
pub mod message;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rustls_pki_types::ServerName;
use serde::Serialize;

pub use self::client::{ClientError, ConnectSpec, Connection, Security};
use self::message::MessageTemplate;

/// Highest latency the histograms hold: 10 minutes (the RFC 5321 end-of-data timeout), in µs.
const MAX_LATENCY_US: u64 = 600_000_000;
/// Significant digits of the histograms (0.1% resolution).
const SIGFIGS: u8 = 3;

/// What to send, how, and how much.
#[derive(Clone)]
pub struct LoadSpec {
    /// Server to load; must be a loopback address.
    pub target: SocketAddr,
    pub security: Security,
    /// Client TLS settings (required for STARTTLS and implicit TLS).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Name the server certificate must carry.
    pub server_name: ServerName<'static>,
    /// AUTH PLAIN credentials (user, password), if any.
    pub auth: Option<(String, String)>,
    /// Concurrent sessions.
    pub sessions: usize,
    /// Messages to send in total.
    pub messages: u64,
    /// Size of each message in bytes (headers and body).
    pub message_size: usize,
    /// Offered rate in messages per second; `None` sends as fast as replies come back.
    pub rate: Option<f64>,
    /// Messages per connection before QUIT and a new connection; `None` keeps connections open
    /// (like `smtp-source -d`); `Some(1)` opens a new connection (and TLS session) per message.
    pub messages_per_connection: Option<u64>,
    /// Send MAIL, RCPT and DATA as one group when the server offers PIPELINING.
    pub pipelining: bool,
    /// Stop sending after this long.
    pub max_duration: Duration,
    /// Bound on every connect, read and write.
    pub io_timeout: Duration,
    /// Stop early after this many connection or protocol errors.
    pub max_errors: u64,
    /// Envelope sender (also the From header).
    pub from: String,
    /// Recipients are `r<n>@<recipient_domain>`.
    pub recipient_domain: String,
    pub ehlo_name: String,
    /// Tag in Message-IDs, so runs never repeat an id.
    pub run_id: String,
}

/// Why a load run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "refusing to load {0}: the load generator only talks to loopback addresses (127.0.0.0/8, ::1)"
    )]
    NotLoopback(SocketAddr),
    #[error("invalid load spec: {0}")]
    InvalidSpec(String),
    #[error("cannot create a latency histogram: {0}")]
    Histogram(String),
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl LatencySummary {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

/// What a load run did.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Messages a session started (claimed from the count).
    pub attempted: u64,
    /// Messages answered 2xx after the end of data.
    pub accepted: u64,
    /// Messages refused with a 4xx/5xx reply.
    pub rejected: u64,
    /// Messages lost to connection or protocol errors (or timeouts).
    pub failed: u64,
    /// Connections opened.
    pub connections: u64,
    /// From the start to the last session finishing.
    pub elapsed_secs: f64,
    /// Whether `max_duration` ended the run before all messages were sent.
    pub deadline_hit: bool,
    /// Whether `max_errors` ended the run.
    pub error_limit_hit: bool,
    pub offered_rate: Option<f64>,
    pub data_latency: LatencySummary,
    pub txn_latency: LatencySummary,
    pub first_error: Option<String>,
    pub first_rejection: Option<String>,
}

impl LoadReport {
    /// Accepted messages per second.
    pub fn rate(&self) -> f64 {
        if self.elapsed_secs > 0.0 {
            self.accepted as f64 / self.elapsed_secs
        } else {
            0.0
        }
    }

    /// One human-readable paragraph.
    pub fn summary(&self) -> String {
        let d = &self.data_latency;
        let t = &self.txn_latency;
        format!(
            "{accepted} accepted, {rejected} rejected, {failed} failed of {attempted} in {secs:.2} s \
             over {conns} connections: {rate:.0} msg/s{deadline}\n\
             end-of-data -> reply: p50 {dp50} us, p99 {dp99} us, p99.9 {dp999} us, max {dmax} us\n\
             transaction (from due time): p50 {tp50} us, p99 {tp99} us, p99.9 {tp999} us, max {tmax} us{err}{rej}",
            accepted = self.accepted,
            rejected = self.rejected,
            failed = self.failed,
            attempted = self.attempted,
            secs = self.elapsed_secs,
            conns = self.connections,
            rate = self.rate(),
            deadline = if self.deadline_hit {
                " (stopped by the time limit)"
            } else {
                ""
            },
            dp50 = d.p50_us,
            dp99 = d.p99_us,
            dp999 = d.p999_us,
            dmax = d.max_us,
            tp50 = t.p50_us,
            tp99 = t.p99_us,
            tp999 = t.p999_us,
            tmax = t.max_us,
            err = self
                .first_error
                .as_ref()
                .map(|e| format!("\nfirst error: {e}"))
                .unwrap_or_default(),
            rej = self
                .first_rejection
                .as_ref()
                .map(|e| format!("\nfirst rejection: {e}"))
                .unwrap_or_default(),
        )
    }
}

/// Refuses anything but loopback targets.
pub fn check_loopback(target: SocketAddr) -> Result<(), LoadError> {
    if target.ip().is_loopback() {
        Ok(())
    } else {
        Err(LoadError::NotLoopback(target))
    }
}

impl LoadSpec {
    /// A spec with the defaults the benchmarks use; callers set the fields that matter.
    pub fn new(target: SocketAddr) -> Self {
        Self {
            target,
            security: Security::Plain,
            tls: None,
            // The benchmark certificates are for localhost (and 127.0.0.1).
            server_name: ServerName::IpAddress(target.ip().into()),
            auth: None,
            sessions: 10,
            messages: 1000,
            message_size: 5 * 1024,
            rate: None,
            messages_per_connection: None,
            pipelining: true,
            max_duration: Duration::from_secs(60),
            io_timeout: Duration::from_secs(30),
            max_errors: 100,
            from: "sender@bench.test".to_owned(),
            recipient_domain: "bench.test".to_owned(),
            ehlo_name: "loadgen.bench.localhost".to_owned(),
            run_id: format!("{}-{}", std::process::id(), unique_suffix()),
        }
    }

    /// Checks the spec (loopback target, non-zero counts, TLS settings present).
    pub fn validate(&self) -> Result<(), LoadError> {
        check_loopback(self.target)?;
        if self.sessions == 0 || self.messages == 0 {
            return Err(LoadError::InvalidSpec(
                "sessions and messages must be at least 1".to_owned(),
            ));
        }
        if self.max_duration.is_zero() || self.io_timeout.is_zero() {
            return Err(LoadError::InvalidSpec(
                "max duration and I/O timeout must be greater than 0".to_owned(),
            ));
        }
        if let Some(rate) = self.rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err(LoadError::InvalidSpec(format!(
                "rate {rate} must be a positive number"
            )));
        }
        if self.messages_per_connection == Some(0) {
            return Err(LoadError::InvalidSpec(
                "messages per connection must be at least 1".to_owned(),
            ));
        }
        if self.security != Security::Plain && self.tls.is_none() {
            return Err(LoadError::InvalidSpec(
                "TLS needs client TLS settings (a CA to trust)".to_owned(),
            ));
        }
        Ok(())
    }

    /// The connection part of the spec.
    pub fn connect_spec(&self) -> ConnectSpec {
        ConnectSpec {
            target: self.target,
            security: self.security,
            tls: self.tls.clone(),
            server_name: self.server_name.clone(),
            ehlo_name: self.ehlo_name.clone(),
            auth: self.auth.clone(),
            io_timeout: self.io_timeout,
        }
    }
}

/// Runs the load and returns what happened. Errors only for an unusable spec; failures of
/// individual messages are counted in the report.
pub async fn run(spec: LoadSpec) -> Result<LoadReport, LoadError> {
    spec.validate()?;
    let new_histogram = || {
        Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, SIGFIGS)
            .map_err(|e| LoadError::Histogram(e.to_string()))
    };
    let mut data_hist = new_histogram()?;
    let mut txn_hist = new_histogram()?;
    let start = Instant::now();
    let shared = Arc::new(Shared {
        template: MessageTemplate::new(spec.message_size, &spec.from, &spec.run_id),
        connect: spec.connect_spec(),
        next: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        deadline_hit: AtomicBool::new(false),
        start,
        deadline: start + spec.max_duration,
        interval: spec.rate.map(|r| Duration::from_secs_f64(1.0 / r)),
        spec,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..shared.spec.sessions {
        let shared = shared.clone();
        let data = new_histogram()?;
        let txn = new_histogram()?;
        tasks.spawn(session(shared, data, txn));
    }
    let mut report = LoadReport {
        attempted: 0,
        accepted: 0,
        rejected: 0,
        failed: 0,
        connections: 0,
        elapsed_secs: 0.0,
        deadline_hit: false,
        error_limit_hit: false,
        offered_rate: shared.spec.rate,
        data_latency: LatencySummary::default(),
        txn_latency: LatencySummary::default(),
        first_error: None,
        first_rejection: None,
    };
    while let Some(joined) = tasks.join_next().await {
        let Ok(s) = joined else {
            report
                .first_error
                .get_or_insert_with(|| "a session task panicked".to_owned());
            continue;
        };
        report.attempted += s.attempted;
        report.accepted += s.accepted;
        report.rejected += s.rejected;
        report.failed += s.failed;
        report.connections += s.connections;
        // Both histograms have the same bounds, so adding cannot fail; ignore to be safe.
        let _ = data_hist.add(&s.data);
        let _ = txn_hist.add(&s.txn);
        if report.first_error.is_none() {
            report.first_error = s.first_error;
        }
        if report.first_rejection.is_none() {
            report.first_rejection = s.first_rejection;
        }
    }
    report.elapsed_secs = start.elapsed().as_secs_f64();
    report.deadline_hit = shared.deadline_hit.load(Ordering::Relaxed);
    report.error_limit_hit = shared.errors.load(Ordering::Relaxed) >= shared.spec.max_errors;
    report.data_latency = LatencySummary::from_histogram(&data_hist);
    report.txn_latency = LatencySummary::from_histogram(&txn_hist);
    Ok(report)
}

struct Shared {
    spec: LoadSpec,
    connect: ConnectSpec,
    template: MessageTemplate,
    next: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
    deadline_hit: AtomicBool,
    start: Instant,
    deadline: Instant,
    interval: Option<Duration>,
}

struct SessionResult {
    attempted: u64,
    accepted: u64,
    rejected: u64,
    failed: u64,
    connections: u64,
    data: Histogram<u64>,
    txn: Histogram<u64>,
    first_error: Option<String>,
    first_rejection: Option<String>,
}

impl Shared {
    fn record_error(&self, result: &mut SessionResult, error: &ClientError) {
        result.failed += 1;
        result.first_error.get_or_insert_with(|| error.to_string());
        if self.errors.fetch_add(1, Ordering::Relaxed) + 1 >= self.spec.max_errors {
            self.stop.store(true, Ordering::Relaxed);
        }
    }
}

async fn session(shared: Arc<Shared>, data: Histogram<u64>, txn: Histogram<u64>) -> SessionResult {
    let mut result = SessionResult {
        attempted: 0,
        accepted: 0,
        rejected: 0,
        failed: 0,
        connections: 0,
        data,
        txn,
        first_error: None,
        first_rejection: None,
    };
    let spec = &shared.spec;
    let mut conn: Option<Connection> = None;
    let mut buf = Vec::with_capacity(spec.message_size + 1024);
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let seq = shared.next.fetch_add(1, Ordering::Relaxed);
        if seq >= spec.messages {
            break;
        }
        let due = shared
            .interval
            .map(|i| shared.start + i.mul_f64(seq as f64));
        if let Some(due) = due {
            if due >= shared.deadline {
                shared.deadline_hit.store(true, Ordering::Relaxed);
                break;
            }
            tokio::time::sleep_until(due.into()).await;
        }
        if Instant::now() >= shared.deadline {
            shared.deadline_hit.store(true, Ordering::Relaxed);
            break;
        }
        result.attempted += 1;
        let ready = due.unwrap_or_else(Instant::now);
        let mut c = match conn.take() {
            Some(c) => c,
            None => match Connection::open(&shared.connect).await {
                Ok(c) => {
                    result.connections += 1;
                    c
                }
                Err(e) => {
                    shared.record_error(&mut result, &e);
                    continue;
                }
            },
        };
        let to = format!("r{seq}@{}", spec.recipient_domain);
        shared.template.render(seq, &to, &mut buf);
        match c.send(&spec.from, &to, &buf, spec.pipelining).await {
            Ok(t) if t.accepted => {
                result.accepted += 1;
                if let Some(d) = t.data_latency {
                    result.data.saturating_record(micros(d));
                }
                result.txn.saturating_record(micros(ready.elapsed()));
            }
            Ok(t) => {
                result.rejected += 1;
                result
                    .first_rejection
                    .get_or_insert_with(|| t.reply.to_string());
            }
            Err(e) => {
                shared.record_error(&mut result, &e);
                continue;
            }
        }
        if spec
            .messages_per_connection
            .is_some_and(|limit| c.messages >= limit)
        {
            c.quit().await;
        } else {
            conn = Some(c);
        }
    }
    if let Some(c) = conn {
        c.quit().await;
    }
    result
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn unique_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets_are_accepted() {
        for ok in ["127.0.0.1:25", "127.8.9.10:2525", "[::1]:587"] {
            check_loopback(ok.parse().unwrap()).unwrap();
        }
        for bad in [
            "10.0.0.1:25",
            "192.0.2.1:25",
            "0.0.0.0:25",
            "[2001:db8::1]:25",
        ] {
            let err = check_loopback(bad.parse().unwrap()).unwrap_err();
            assert!(err.to_string().contains("only talks to loopback"), "{err}");
        }
        let spec = LoadSpec::new("198.51.100.7:25".parse().unwrap());
        assert!(matches!(spec.validate(), Err(LoadError::NotLoopback(_))));
    }

    #[test]
    fn specs_without_bounds_or_tls_settings_are_refused() {
        let mut spec = LoadSpec::new("127.0.0.1:25".parse().unwrap());
        spec.validate().unwrap();
        spec.messages = 0;
        assert!(spec.validate().is_err());
        spec.messages = 1;
        spec.rate = Some(0.0);
        assert!(spec.validate().is_err());
        spec.rate = None;
        spec.security = Security::StartTls;
        assert!(spec.validate().is_err());
    }
}
