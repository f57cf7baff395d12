//! The benchmarks, each run against one system under test (kubemail with a durability class,
//! or Postfix), on a freshly started instance so no run inherits another's queue, caches or
//! memory:
//!
//! 1. [`accept_and_queue`]: N sessions send M messages of S bytes; every accepted message
//!    must be in the queue (JetStream stream / Postfix hold queue) afterwards;
//! 2. [`relay`]: messages go in, through the queue and the delivery side (DKIM Ed25519 on for
//!    kubemail), out to `smtp-sink`; the clock stops when the sink has them all;
//! 3. [`latency`]: an open-loop offered rate, end-of-data to reply percentiles;
//! 4. [`idle`]: memory per idle connection after EHLO (plain or after STARTTLS);
//! 5. [`tls_churn`]: a new connection and a full STARTTLS handshake per message.
//!
//! Server CPU is the `utime + stime` delta of all server processes over the measured part
//! only (after the warm-up); peak RSS is the kernel's `VmHWM` for kubemail's two processes
//! and a 250 ms sampled maximum of the summed RSS for Postfix's process tree; peak PSS is the
//! sampled maximum for both.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::AsyncReadExt as _;

use super::loadgen::idle::{self as idle_conns, IdleSpec};
use super::loadgen::{self, LatencySummary, LoadReport, LoadSpec, Security};
use super::peers::PeerError;
use super::peers::kubemail::{self, Kubemail, KubemailOptions, NodeFeatures, RelayOptions};
use super::peers::nats::{Durability, NatsServer};
use super::peers::postfix::{Postfix, PostfixMode, PostfixOptions};
use super::peers::sink::Sink;
use super::procstat::{CpuSample, MemorySample, MemorySampler, ServerProcesses};
use super::syncs::SyncCounter;
use super::tls::PkiFiles;

/// How often the summed RSS and PSS of the server processes are sampled for their peaks.
const MEMORY_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);
/// Connections above the benchmark's own that the servers allow (probes, a fresh banner
/// check while the idle connections are held).
const CONNECTION_HEADROOM: u32 = 100;
/// Memory budgeted per idle Postfix connection (an smtpd process) when deciding how many fit:
/// measured at about 1.7 MiB PSS with TLS on the reference machine; 2 MiB leaves headroom.
const POSTFIX_KIB_PER_CONNECTION: u64 = 2 * 1024;
/// Time for a server to settle (finish accepting, free buffers) before memory is read.
const SETTLE: Duration = Duration::from_secs(2);

/// The systems compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum System {
    /// kubemail with JetStream `sync_interval: always` (fsync before 250).
    KubemailSyncAlways,
    /// kubemail with JetStream defaults (no fsync per message), a weaker class.
    KubemailDefault,
    /// Postfix (fsyncs every queue file before 250).
    Postfix,
    /// kubemail on three JetStream servers, the queue stream R3, `sync_interval: always`: the
    /// production durability class (benchmark 1b only).
    KubemailR3SyncAlways,
}

impl System {
    pub const ALL: [System; 3] = [
        System::KubemailSyncAlways,
        System::KubemailDefault,
        System::Postfix,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::KubemailSyncAlways => "kubemail, JetStream sync_interval: always",
            Self::KubemailDefault => "kubemail, JetStream defaults",
            Self::Postfix => "Postfix",
            Self::KubemailR3SyncAlways => {
                "kubemail, 3 JetStream servers, stream R3, sync_interval: always"
            }
        }
    }

    /// The durability class: what a `250` promises.
    pub fn durability(self) -> &'static str {
        match self {
            Self::KubemailSyncAlways | Self::Postfix => "D: fsync before 250",
            Self::KubemailR3SyncAlways => "D3: fsync on a quorum (2 of 3 servers) before 250",
            Self::KubemailDefault => {
                "F: no fsync per message (JetStream default, fsync every 2 min)"
            }
        }
    }

    pub fn is_kubemail(self) -> bool {
        self != Self::Postfix
    }
}

/// The benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ScenarioId {
    AcceptAndQueue,
    AcceptR3,
    Relay,
    Latency,
    IdleConnections,
    TlsChurn,
}

impl ScenarioId {
    pub const ALL: [ScenarioId; 6] = [
        ScenarioId::AcceptAndQueue,
        ScenarioId::AcceptR3,
        ScenarioId::Relay,
        ScenarioId::Latency,
        ScenarioId::IdleConnections,
        ScenarioId::TlsChurn,
    ];

    /// Short name used on the command line (`--scenarios accept,relay`).
    pub fn key(self) -> &'static str {
        match self {
            Self::AcceptAndQueue => "accept",
            Self::AcceptR3 => "accept-r3",
            Self::Relay => "relay",
            Self::Latency => "latency",
            Self::IdleConnections => "idle",
            Self::TlsChurn => "tls",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Self::AcceptAndQueue => "1. Accept-and-queue",
            Self::AcceptR3 => "1b. Accept-and-queue on three JetStream servers (R3)",
            Self::Relay => "2. End-to-end relay into smtp-sink",
            Self::Latency => "3. Latency at a fixed offered rate",
            Self::IdleConnections => "4. Idle connections after EHLO",
            Self::TlsChurn => "5. A new TLS session per message (STARTTLS)",
        }
    }
}

/// Counts and bounds of one throughput benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct LoadParams {
    pub sessions: usize,
    pub messages: u64,
    /// Messages sent (same shape) before the measurement starts.
    pub warmup: u64,
    pub message_size: usize,
    /// Time limit of the measured run.
    pub max_secs: u64,
}

/// The latency benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyParams {
    pub sessions: usize,
    pub message_size: usize,
    /// Offered rate as a fraction of the system's own accept-and-queue maximum.
    pub fraction: f64,
    /// Length of the open-loop run.
    pub secs: u64,
    pub warmup: u64,
}

/// The idle-connections benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct IdleParams {
    /// Plain connections held.
    pub count: usize,
    /// Connections held after STARTTLS.
    pub tls_count: usize,
    /// Connections held on Postfix (plain and STARTTLS). Each is an smtpd process of about
    /// 1.7 MiB PSS, so 10,000 would need about 17 GiB; the cost per connection is linear and
    /// is measured at a count that leaves a shared machine usable.
    pub postfix_count: usize,
    /// How long they are held before checking that all are still served.
    pub hold_secs: u64,
    /// Connections being opened at once.
    pub concurrency: usize,
    /// Time limit for opening them.
    pub open_max_secs: u64,
}

/// Everything a full run does.
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    /// Repetitions per system of the TLS churn benchmark.
    pub repetitions: u32,
    /// Repetitions per system of the headline benchmarks (accept-and-queue, relay).
    pub headline_repetitions: u32,
    pub accept: LoadParams,
    pub relay: LoadParams,
    pub latency: LatencyParams,
    pub idle: IdleParams,
    pub tls: LoadParams,
}

impl Params {
    /// The default `make bench` run: bounded to about 10 minutes on the reference machine.
    pub fn full() -> Self {
        Self {
            repetitions: 3,
            headline_repetitions: 5,
            accept: LoadParams {
                sessions: 100,
                messages: 15_000,
                warmup: 1_500,
                message_size: 5 * 1024,
                max_secs: 45,
            },
            relay: LoadParams {
                sessions: 100,
                messages: 8_000,
                warmup: 0,
                message_size: 5 * 1024,
                max_secs: 60,
            },
            latency: LatencyParams {
                sessions: 100,
                message_size: 5 * 1024,
                fraction: 0.5,
                secs: 20,
                warmup: 1_000,
            },
            idle: IdleParams {
                count: 10_000,
                tls_count: 10_000,
                postfix_count: 1_000,
                hold_secs: 10,
                concurrency: 100,
                open_max_secs: 120,
            },
            tls: LoadParams {
                sessions: 50,
                messages: 4_000,
                warmup: 400,
                message_size: 1024,
                max_secs: 45,
            },
        }
    }

    /// A short run that checks the harness end to end (numbers not representative).
    pub fn smoke() -> Self {
        Self {
            repetitions: 1,
            headline_repetitions: 1,
            accept: LoadParams {
                messages: 2_000,
                warmup: 200,
                max_secs: 20,
                ..Self::full().accept
            },
            relay: LoadParams {
                messages: 1_000,
                max_secs: 30,
                ..Self::full().relay
            },
            latency: LatencyParams {
                secs: 5,
                warmup: 200,
                ..Self::full().latency
            },
            idle: IdleParams {
                count: 1_000,
                tls_count: 500,
                postfix_count: 500,
                hold_secs: 3,
                ..Self::full().idle
            },
            tls: LoadParams {
                messages: 500,
                warmup: 50,
                max_secs: 20,
                ..Self::full().tls
            },
        }
    }
}

/// How a measurement ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "camelCase")]
pub enum Outcome {
    Ok,
    NotAvailable { reason: String },
    Failed { reason: String },
}

/// Memory of idle connections.
#[derive(Debug, Clone, Serialize)]
pub struct IdleResult {
    pub security: Security,
    pub requested: usize,
    pub opened: usize,
    pub failed: u64,
    pub alive_after_hold: u64,
    pub open_secs: f64,
    pub hold_secs: u64,
    pub before: MemorySample,
    pub after: MemorySample,
    /// (RSS after − RSS before) / opened, all server processes.
    pub rss_kib_per_connection: f64,
    /// The same with PSS (shared pages divided among the processes sharing them).
    pub pss_kib_per_connection: f64,
    /// connect → 220 greeting of one fresh connection while all are held.
    pub fresh_banner_ms: Option<f64>,
    pub first_error: Option<String>,
}

/// One benchmark run against one system.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub scenario: ScenarioId,
    pub system: System,
    /// What distinguishes rows of one scenario (rate, plain/TLS).
    pub variant: String,
    pub repetition: u32,
    pub outcome: Outcome,
    pub msgs_per_sec: Option<f64>,
    /// End of data → reply.
    pub latency: Option<LatencySummary>,
    /// Due time → reply (open loop) / transaction (closed loop).
    pub txn_latency: Option<LatencySummary>,
    pub cpu_us_per_msg: Option<f64>,
    /// fsync and fdatasync calls on the machine during the measured run, per message
    /// ([`super::syncs`]); `None` where perf cannot count them.
    pub syncs_per_msg: Option<f64>,
    pub cpu_us_per_msg_by_role: BTreeMap<String, f64>,
    pub peak_rss_kib: Option<u64>,
    pub peak_pss_kib: Option<u64>,
    /// Count check: what the queue (or sink) holds against what the client saw accepted.
    pub verified: Option<String>,
    pub load: Option<LoadReport>,
    pub idle: Option<IdleResult>,
    pub notes: Vec<String>,
    /// Busy loops running beside the benchmark (`--background-load`); 0 for the idle run.
    pub background_load: u32,
    /// The busy loops ran in a cgroup of their own, beside the servers' and the generator's
    /// (the CPU shared per cgroup); false: in the same cgroup (shared per task).
    pub background_cgroups: bool,
}

impl Measurement {
    fn new(scenario: ScenarioId, system: System, variant: &str, repetition: u32) -> Self {
        Self {
            scenario,
            system,
            variant: variant.to_owned(),
            repetition,
            outcome: Outcome::Ok,
            msgs_per_sec: None,
            latency: None,
            txn_latency: None,
            cpu_us_per_msg: None,
            syncs_per_msg: None,
            cpu_us_per_msg_by_role: BTreeMap::new(),
            peak_rss_kib: None,
            peak_pss_kib: None,
            verified: None,
            load: None,
            idle: None,
            notes: Vec::new(),
            background_load: 0,
            background_cgroups: false,
        }
    }

    fn fail(&mut self, reason: impl std::fmt::Display) {
        self.outcome = Outcome::Failed {
            reason: reason.to_string(),
        };
    }

    fn failed(mut self, reason: impl std::fmt::Display) -> Self {
        self.fail(reason);
        self
    }
}

/// What the benchmarks need: binaries, the shared PKI, keys, and a directory per instance.
pub struct Env {
    pub smtp_node: PathBuf,
    pub nats_server: PathBuf,
    pub smtp_sink: PathBuf,
    pub work_dir: PathBuf,
    pub pki: PkiFiles,
    pub client_tls: Arc<rustls::ClientConfig>,
    pub dkim_key: PathBuf,
    pub users_file: PathBuf,
    /// The submission user of the relay benchmark (user, password).
    pub bench_user: (String, String),
    /// Optional config sections the `smtp-node` build knows.
    pub features: NodeFeatures,
    /// Whether `smtp-node` has a sending side; the reason when it has not.
    pub delivery: Result<(), String>,
    /// The node's DNS server: a loopback port where nothing listens.
    pub dns_blackhole: SocketAddr,
    pub clock_ticks: u64,
    next_dir: AtomicU32,
}

impl Env {
    #[allow(clippy::too_many_arguments)] // one constructor, called once by the runner
    pub fn new(
        smtp_node: PathBuf,
        nats_server: PathBuf,
        smtp_sink: PathBuf,
        work_dir: PathBuf,
        pki: PkiFiles,
        client_tls: Arc<rustls::ClientConfig>,
        dkim_key: PathBuf,
        users_file: PathBuf,
        bench_user: (String, String),
        features: NodeFeatures,
        dns_blackhole: SocketAddr,
    ) -> Self {
        let delivery = if features.delivery {
            Ok(())
        } else {
            Err(
                "smtp-node has no sending side yet (its config has no `delivery` section)"
                    .to_owned(),
            )
        };
        Self {
            smtp_node,
            nats_server,
            smtp_sink,
            work_dir,
            pki,
            client_tls,
            dkim_key,
            users_file,
            bench_user,
            features,
            delivery,
            dns_blackhole,
            clock_ticks: super::procstat::clock_ticks_per_sec(),
            next_dir: AtomicU32::new(0),
        }
    }

    fn instance_dir(&self, system: System) -> PathBuf {
        let n = self.next_dir.fetch_add(1, Ordering::Relaxed);
        self.work_dir.join(format!("{n:03}-{system:?}"))
    }

    /// Starts a fresh instance of `system` (blocking; call from `block_in_place`).
    fn start(&self, system: System, setup: &Setup) -> Result<Sut, PeerError> {
        let dir = self.instance_dir(system);
        match system {
            System::Postfix => {
                let mode = match setup.relay_sink {
                    Some(port) => PostfixMode::RelayTo(port),
                    None => PostfixMode::Hold,
                };
                let postfix = Postfix::start(&PostfixOptions {
                    dir,
                    mode,
                    process_limit: setup.max_connections,
                    key: self.pki.key.clone(),
                    chain: self.pki.chain.clone(),
                })?;
                Ok(Sut {
                    processes: postfix.processes(),
                    plain: postfix.smtp,
                    starttls: postfix.starttls,
                    submission: None,
                    inner: Inner::Postfix(postfix),
                })
            }
            System::KubemailSyncAlways | System::KubemailDefault | System::KubemailR3SyncAlways => {
                let durability = if system == System::KubemailDefault {
                    Durability::Default
                } else {
                    Durability::SyncAlways
                };
                let (nats, nats_replicas) = if system == System::KubemailR3SyncAlways {
                    let cluster = NatsServer::start_cluster(
                        &self.nats_server,
                        &dir.join("nats"),
                        3,
                        durability,
                    )?;
                    (cluster, 3)
                } else {
                    let server =
                        NatsServer::start(&self.nats_server, &dir.join("nats"), durability)?;
                    (server, 1)
                };
                let relay = setup.relay_sink.map(|sink_port| RelayOptions {
                    sink_port,
                    dkim_key: self.dkim_key.clone(),
                    users_file: self.users_file.clone(),
                });
                let node = Kubemail::start(&KubemailOptions {
                    binary: self.smtp_node.clone(),
                    dir: dir.join("node"),
                    nats_url: nats.url(),
                    nats_replicas,
                    pki: self.pki.clone(),
                    max_connections: setup.max_connections,
                    relay,
                    features: self.features,
                    dns_blackhole: self.dns_blackhole,
                    synced_writes: durability == Durability::SyncAlways,
                })?;
                Ok(Sut {
                    processes: kubemail::processes(node.pid(), &nats.pids()),
                    plain: node.mx,
                    starttls: node.starttls,
                    submission: node.submission,
                    inner: Inner::Kubemail { node, nats },
                })
            }
        }
    }

    /// Starts counting the machine's fsyncs for a measured run (blocking for a moment).
    fn count_syncs(&self) -> Option<SyncCounter> {
        tokio::task::block_in_place(|| SyncCounter::start(&self.work_dir, "syncs.csv"))
    }

    fn cpu_per_msg(
        &self,
        before: &CpuSample,
        after: &CpuSample,
        messages: u64,
    ) -> (Option<f64>, BTreeMap<String, f64>) {
        if messages == 0 {
            return (None, BTreeMap::new());
        }
        let per_msg = |ticks: u64| ticks as f64 * 1e6 / self.clock_ticks as f64 / messages as f64;
        let by_role: BTreeMap<String, f64> = after
            .since(before)
            .into_iter()
            .map(|(role, t)| (role, per_msg(t)))
            .collect();
        (Some(by_role.values().sum()), by_role)
    }
}

/// `count` per message; `None` without a count or a message.
fn per_msg(count: Option<u64>, messages: u64) -> Option<f64> {
    count
        .filter(|_| messages > 0)
        .map(|c| c as f64 / messages as f64)
}

/// How to set up an instance for a scenario.
struct Setup {
    max_connections: u32,
    relay_sink: Option<u16>,
}

/// A running system under test.
struct Sut {
    processes: ServerProcesses,
    plain: SocketAddr,
    starttls: SocketAddr,
    submission: Option<SocketAddr>,
    inner: Inner,
}

enum Inner {
    Kubemail { node: Kubemail, nats: NatsServer },
    Postfix(Postfix),
}

impl Sut {
    /// Messages queued and waiting (kubemail: in the stream; Postfix: held, or pending
    /// delivery when relaying).
    async fn queued(&self) -> Result<u64, PeerError> {
        match &self.inner {
            Inner::Kubemail { node, .. } => kubemail::queued(&node.nats_url).await,
            Inner::Postfix(p) => Ok(p.held() + p.pending()),
        }
    }

    fn peak_sampler(&self) -> MemorySampler {
        MemorySampler::start(self.processes.clone(), MEMORY_SAMPLE_INTERVAL)
    }

    /// Peak RSS and PSS: the kernel's exact high-water mark for fixed processes, the sampled
    /// maximum for process trees; PSS is always sampled.
    fn peak_memory(&self, sampler: MemorySampler, m: &mut Measurement) {
        let sampled = sampler.finish();
        m.peak_rss_kib = self.processes.peak_rss_kib().or(Some(sampled.rss_kib));
        m.peak_pss_kib = Some(sampled.pss_kib);
    }

    fn log_tail(&self) -> String {
        match &self.inner {
            Inner::Kubemail { node, .. } => node.log_tail(15),
            Inner::Postfix(p) => p.log_tail(15),
        }
    }

    /// Stops every process (blocking).
    fn stop(mut self) {
        match &mut self.inner {
            Inner::Kubemail { node, nats } => {
                node.stop();
                nats.stop();
            }
            Inner::Postfix(p) => p.stop(),
        }
    }
}

fn start_sut(env: &Env, system: System, setup: &Setup) -> Result<Sut, PeerError> {
    tokio::task::block_in_place(|| env.start(system, setup))
}

fn stop_sut(sut: Sut) {
    tokio::task::block_in_place(|| sut.stop());
}

fn base_spec(env: &Env, target: SocketAddr, p: &LoadParams) -> LoadSpec {
    let mut spec = LoadSpec::new(target);
    spec.sessions = p.sessions;
    spec.messages = p.messages;
    spec.message_size = p.message_size;
    spec.max_duration = Duration::from_secs(p.max_secs);
    spec.tls = Some(env.client_tls.clone());
    spec.recipient_domain = kubemail::DOMAIN.to_owned();
    spec
}

fn max_connections(sessions: usize) -> u32 {
    u32::try_from(sessions)
        .unwrap_or(u32::MAX)
        .saturating_add(CONNECTION_HEADROOM)
}

fn check_load(m: &mut Measurement, report: &LoadReport) {
    if report.accepted == 0 {
        m.outcome = Outcome::Failed {
            reason: format!(
                "no message accepted: {}",
                report
                    .first_error
                    .clone()
                    .or_else(|| report.first_rejection.clone())
                    .unwrap_or_default()
            ),
        };
    }
    if report.rejected + report.failed > 0 {
        m.notes.push(format!(
            "{} rejected, {} failed (first: {})",
            report.rejected,
            report.failed,
            report
                .first_error
                .clone()
                .or_else(|| report.first_rejection.clone())
                .unwrap_or_default()
        ));
    }
    if report.deadline_hit {
        m.notes.push(format!(
            "stopped by the time limit after {:.1} s",
            report.elapsed_secs
        ));
    }
}

/// Warm-up, then the measured run; CPU and memory over the measured run. Returns the warm-up
/// and measured reports.
async fn measured_load(
    env: &Env,
    sut: &Sut,
    spec: LoadSpec,
    warmup: u64,
    m: &mut Measurement,
) -> (Option<LoadReport>, Option<LoadReport>) {
    let mut warm = None;
    if warmup > 0 {
        let mut w = spec.clone();
        w.messages = warmup;
        w.rate = None;
        w.max_duration = Duration::from_secs(60);
        match loadgen::run(w).await {
            Ok(r) => warm = Some(r),
            Err(e) => {
                m.fail(format!("warm-up: {e}"));
                return (None, None);
            }
        }
    }
    let sampler = sut.peak_sampler();
    let syncs = env.count_syncs();
    let cpu0 = sut.processes.cpu();
    let result = loadgen::run(spec).await;
    let cpu1 = sut.processes.cpu();
    let syncs = syncs.and_then(SyncCounter::stop);
    sut.peak_memory(sampler, m);
    match result {
        Ok(report) => {
            let (cpu, by_role) = env.cpu_per_msg(&cpu0, &cpu1, report.accepted);
            m.cpu_us_per_msg = cpu;
            m.syncs_per_msg = per_msg(syncs, report.accepted);
            m.cpu_us_per_msg_by_role = by_role;
            m.msgs_per_sec = Some(report.rate());
            m.latency = Some(report.data_latency);
            m.txn_latency = Some(report.txn_latency);
            check_load(m, &report);
            (warm, Some(report))
        }
        Err(e) => {
            m.fail(e);
            (warm, None)
        }
    }
}

/// Verifies that every accepted message is queued.
async fn verify_stored(
    sut: &Sut,
    m: &mut Measurement,
    warm: Option<&LoadReport>,
    report: Option<&LoadReport>,
) {
    let accepted = warm.map_or(0, |w| w.accepted) + report.map_or(0, |r| r.accepted);
    match sut.queued().await {
        Ok(stored) => {
            m.verified = Some(format!("{stored} queued / {accepted} accepted"));
            if stored < accepted {
                m.fail(format!(
                    "lost messages: {stored} queued but {accepted} accepted"
                ));
            } else if stored > accepted {
                // The server queued messages whose reply the client never saw (a timeout or a
                // dropped connection after the end of data); not a loss, but worth showing.
                m.notes.push(format!(
                    "{} more queued than the client saw accepted",
                    stored - accepted
                ));
            }
        }
        Err(e) => m.notes.push(format!("cannot verify the queue: {e}")),
    }
}

/// Benchmark 1: accept-and-queue throughput.
/// Benchmark 1b: benchmark 1 against three JetStream servers with the queue stream R3 and
/// `sync_interval: always` (every acknowledged message fsynced on a quorum), beside Postfix.
pub async fn accept_and_queue_r3(
    env: &Env,
    system: System,
    p: &LoadParams,
    rep: u32,
) -> Measurement {
    let mut m = accept_and_queue(env, system, p, rep).await;
    m.scenario = ScenarioId::AcceptR3;
    m
}

pub async fn accept_and_queue(env: &Env, system: System, p: &LoadParams, rep: u32) -> Measurement {
    let variant = format!("{} sessions, {} B, plain", p.sessions, p.message_size);
    let mut m = Measurement::new(ScenarioId::AcceptAndQueue, system, &variant, rep);
    let setup = Setup {
        max_connections: max_connections(p.sessions),
        relay_sink: None,
    };
    let sut = match start_sut(env, system, &setup) {
        Ok(s) => s,
        Err(e) => return m.failed(e),
    };
    let spec = base_spec(env, sut.plain, p);
    let (warm, report) = measured_load(env, &sut, spec, p.warmup, &mut m).await;
    if m.outcome == Outcome::Ok {
        verify_stored(&sut, &mut m, warm.as_ref(), report.as_ref()).await;
    }
    if matches!(m.outcome, Outcome::Failed { .. }) {
        m.notes
            .push(format!("server log tail:\n{}", sut.log_tail()));
    }
    m.load = report;
    stop_sut(sut);
    m
}

/// Benchmark 2: end-to-end relay into smtp-sink.
pub async fn relay(env: &Env, system: System, p: &LoadParams, rep: u32) -> Measurement {
    let variant = format!(
        "{} sessions, {} B, plain{}",
        p.sessions,
        p.message_size,
        if system.is_kubemail() {
            ", AUTH, DKIM Ed25519"
        } else {
            ", no DKIM"
        }
    );
    let mut m = Measurement::new(ScenarioId::Relay, system, &variant, rep);
    if system.is_kubemail()
        && let Err(reason) = &env.delivery
    {
        m.outcome = Outcome::NotAvailable {
            reason: reason.clone(),
        };
        return m;
    }
    let sink =
        tokio::task::block_in_place(|| Sink::start(&env.smtp_sink, &env.work_dir, p.messages));
    let mut sink = match sink {
        Ok(s) => s,
        Err(e) => return m.failed(e),
    };
    let setup = Setup {
        max_connections: max_connections(p.sessions),
        relay_sink: Some(sink.port),
    };
    let sut = match start_sut(env, system, &setup) {
        Ok(s) => s,
        Err(e) => {
            tokio::task::block_in_place(|| sink.stop());
            return m.failed(e);
        }
    };
    let target = sut.submission.unwrap_or(sut.plain);
    let mut spec = base_spec(env, target, p);
    spec.from = format!("bench@{}", kubemail::DOMAIN);
    spec.recipient_domain = "sink.test".to_owned();
    if sut.submission.is_some() {
        spec.auth = Some(env.bench_user.clone());
    }
    let sampler = sut.peak_sampler();
    let syncs = env.count_syncs();
    let cpu0 = sut.processes.cpu();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(p.max_secs);
    let result = loadgen::run(spec).await;
    let accepted = result.as_ref().map_or(0, |r| r.accepted);
    // The clock stops when the sink has every accepted message, or at the time limit.
    let mut received = 0;
    while Instant::now() < deadline {
        received = sink.received();
        if received >= accepted || sink.exited() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = sut.processes.cpu();
    let syncs = syncs.and_then(SyncCounter::stop);
    sut.peak_memory(sampler, &mut m);
    match result {
        Ok(report) => {
            check_load(&mut m, &report);
            m.latency = Some(report.data_latency);
            m.txn_latency = Some(report.txn_latency);
            let (cpu, by_role) = env.cpu_per_msg(&cpu0, &cpu1, received);
            m.cpu_us_per_msg = cpu;
            m.syncs_per_msg = per_msg(syncs, received);
            m.cpu_us_per_msg_by_role = by_role;
            m.msgs_per_sec = Some(received as f64 / elapsed);
            if received < report.accepted {
                m.notes.push(format!(
                    "time limit: the sink got {received} of {} accepted messages in {elapsed:.1} s",
                    report.accepted
                ));
            }
            // The queue must drain: acknowledgements and queue-file removal follow delivery.
            let mut left = None;
            for _ in 0..50 {
                left = sut.queued().await.ok();
                if left == Some(0) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            m.verified = Some(format!(
                "sink received {received} / {} accepted; {} left in the queue",
                report.accepted,
                left.map_or("unknown".to_owned(), |l| l.to_string())
            ));
            m.load = Some(report);
        }
        Err(e) => m = m.failed(e),
    }
    if matches!(m.outcome, Outcome::Failed { .. }) || received == 0 {
        m.notes
            .push(format!("server log tail:\n{}", sut.log_tail()));
        if received == 0 && m.outcome == Outcome::Ok {
            m.outcome = Outcome::Failed {
                reason: "the sink received nothing".to_owned(),
            };
        }
    }
    stop_sut(sut);
    tokio::task::block_in_place(|| sink.stop());
    m
}

/// Benchmark 3: open-loop latency at `rate` msg/s for `p.secs` seconds.
pub async fn latency(
    env: &Env,
    system: System,
    p: &LatencyParams,
    rate: f64,
    variant: &str,
    rep: u32,
) -> Measurement {
    let mut m = Measurement::new(ScenarioId::Latency, system, variant, rep);
    let setup = Setup {
        max_connections: max_connections(p.sessions),
        relay_sink: None,
    };
    let sut = match start_sut(env, system, &setup) {
        Ok(s) => s,
        Err(e) => return m.failed(e),
    };
    let load = LoadParams {
        sessions: p.sessions,
        messages: ((rate * p.secs as f64).ceil() as u64).max(1),
        warmup: p.warmup,
        message_size: p.message_size,
        // Room to finish what was offered when the server is a little behind; a server that
        // cannot sustain the rate is cut off and reported as such.
        max_secs: p.secs + p.secs / 2 + 5,
    };
    let mut spec = base_spec(env, sut.plain, &load);
    spec.rate = Some(rate);
    let (warm, report) = measured_load(env, &sut, spec, p.warmup, &mut m).await;
    if let Some(r) = &report {
        m.notes.push(format!(
            "offered {rate:.0} msg/s for {} s ({} messages), achieved {:.0} msg/s",
            p.secs,
            load.messages,
            r.rate()
        ));
    }
    if m.outcome == Outcome::Ok {
        verify_stored(&sut, &mut m, warm.as_ref(), report.as_ref()).await;
    }
    m.load = report;
    stop_sut(sut);
    m
}

/// Benchmark 4: memory per idle connection.
pub async fn idle(
    env: &Env,
    system: System,
    p: &IdleParams,
    security: Security,
    rep: u32,
) -> Measurement {
    let mut count = match (system, security) {
        (System::Postfix, _) => p.postfix_count,
        (_, Security::Plain) => p.count,
        _ => p.tls_count,
    };
    let mut capped = None;
    if system == System::Postfix {
        // One smtpd process per connection: keep the instance within half the available
        // memory so a shared machine is not pushed into the OOM killer.
        let affordable = available_memory_kib() / 2 / POSTFIX_KIB_PER_CONNECTION;
        if (count as u64) > affordable {
            capped = Some(count);
            count = usize::try_from(affordable).unwrap_or(usize::MAX).max(1);
        }
    }
    let variant = match security {
        Security::Plain => format!("{count} connections, plain, after EHLO"),
        _ => format!("{count} connections, after STARTTLS + EHLO"),
    };
    let mut m = Measurement::new(ScenarioId::IdleConnections, system, &variant, rep);
    if let Some(asked) = capped {
        m.notes.push(format!(
            "{asked} connections asked; {count} opened to stay within half the available memory"
        ));
    }
    let setup = Setup {
        max_connections: max_connections(count),
        relay_sink: None,
    };
    let sut = match start_sut(env, system, &setup) {
        Ok(s) => s,
        Err(e) => return m.failed(e),
    };
    if system == System::Postfix {
        m.notes.push(format!(
            "default_process_limit = {} (one smtpd process per connection)",
            setup.max_connections
        ));
    } else {
        m.notes.push(format!(
            "maxConnections = maxConnectionsPerIp = {}",
            setup.max_connections
        ));
    }
    let target = if security == Security::Plain {
        sut.plain
    } else {
        sut.starttls
    };
    tokio::time::sleep(SETTLE).await;
    let before = tokio::task::block_in_place(|| sut.processes.memory());
    let mut loadspec = LoadSpec::new(target);
    loadspec.security = security;
    loadspec.tls = Some(env.client_tls.clone());
    loadspec.io_timeout = Duration::from_secs(60);
    let spec = IdleSpec {
        connect: loadspec.connect_spec(),
        count,
        concurrency: p.concurrency,
        max_duration: Duration::from_secs(p.open_max_secs),
    };
    let opened_at = Instant::now();
    let mut set = match idle_conns::open(&spec).await {
        Ok(s) => s,
        Err(e) => {
            stop_sut(sut);
            return m.failed(e);
        }
    };
    tokio::time::sleep(SETTLE).await;
    let after = tokio::task::block_in_place(|| sut.processes.memory());
    let fresh_banner_ms = banner_time(target).await;
    let hold = Duration::from_secs(p.hold_secs);
    if let Some(rest) = hold.checked_sub(opened_at.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let alive = set.count_alive(p.concurrency).await;
    let opened = set.len();
    let per = |a: u64, b: u64| {
        if opened == 0 {
            0.0
        } else {
            a.saturating_sub(b) as f64 / opened as f64
        }
    };
    m.peak_rss_kib = Some(after.rss_kib);
    m.peak_pss_kib = Some(after.pss_kib);
    m.idle = Some(IdleResult {
        security,
        requested: count,
        opened,
        failed: set.failed,
        alive_after_hold: alive,
        open_secs: set.open_secs,
        hold_secs: p.hold_secs,
        before,
        after,
        rss_kib_per_connection: per(after.rss_kib, before.rss_kib),
        pss_kib_per_connection: per(after.pss_kib, before.pss_kib),
        fresh_banner_ms,
        first_error: set.first_error.clone(),
    });
    if opened == 0 {
        m.outcome = Outcome::Failed {
            reason: format!(
                "no connection opened: {}",
                set.first_error.clone().unwrap_or_default()
            ),
        };
    } else if set.failed > 0 || alive < opened as u64 {
        m.notes.push(format!(
            "{} of {count} failed to open, {alive} of {opened} answered NOOP after the hold",
            set.failed
        ));
    }
    set.close(p.concurrency).await;
    stop_sut(sut);
    m
}

/// Benchmark 5: a new connection and STARTTLS handshake per message.
pub async fn tls_churn(env: &Env, system: System, p: &LoadParams, rep: u32) -> Measurement {
    let variant = format!(
        "{} sessions, {} B, STARTTLS (ECDSA P-256), 1 message per connection",
        p.sessions, p.message_size
    );
    let mut m = Measurement::new(ScenarioId::TlsChurn, system, &variant, rep);
    let setup = Setup {
        max_connections: max_connections(p.sessions),
        relay_sink: None,
    };
    let sut = match start_sut(env, system, &setup) {
        Ok(s) => s,
        Err(e) => return m.failed(e),
    };
    let mut spec = base_spec(env, sut.starttls, p);
    spec.security = Security::StartTls;
    spec.messages_per_connection = Some(1);
    let (warm, report) = measured_load(env, &sut, spec, p.warmup, &mut m).await;
    if m.outcome == Outcome::Ok {
        verify_stored(&sut, &mut m, warm.as_ref(), report.as_ref()).await;
    }
    if matches!(m.outcome, Outcome::Failed { .. }) {
        m.notes
            .push(format!("server log tail:\n{}", sut.log_tail()));
    }
    m.load = report;
    stop_sut(sut);
    m
}

/// A measurement that could not run because an earlier one it depends on failed.
pub fn skipped(scenario: ScenarioId, system: System, variant: &str, reason: &str) -> Measurement {
    let mut m = Measurement::new(scenario, system, variant, 0);
    m.outcome = Outcome::NotAvailable {
        reason: reason.to_owned(),
    };
    m
}

/// `MemAvailable` of `/proc/meminfo` in KiB.
fn available_memory_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// connect → first line of the greeting, in milliseconds (None if it fails within 10 s).
async fn banner_time(target: SocketAddr) -> Option<f64> {
    let start = Instant::now();
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(target).await.ok()?;
        let mut buf = [0u8; 512];
        let mut got = Vec::new();
        while !got.contains(&b'\n') {
            let n = s.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            got.extend_from_slice(&buf[..n]);
        }
        Some(start.elapsed().as_secs_f64() * 1000.0)
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .ok()
        .flatten()
}
