//! A whole benchmark run: preflight (tools, binaries, file-descriptor limit, what the machine
//! is and how busy it is), shared material (certificates, DKIM key, users file), then every
//! selected scenario against every system, repetitions alternating the order of the systems
//! so slow drift on a shared machine does not favour one of them. Everything runs in one
//! work directory on one disk, removed at the end unless asked to keep it.
//!
//! Steadier numbers on a shared machine: [`pin_cpus`] puts the load generator (this
//! process, and the smtp-sink it starts) on one half of the CPUs and every server under test
//! on the other (`taskset`), so the generator and the server do not take each other's CPU;
//! with `--background-load N` the headline benchmarks run a second time beside N busy loops
//! ([`BusyLoops`]), the "load average around N" case, reported apart from the idle run, and
//! a third time with the busy loops in a cgroup of their own ([`super::cgroups`]): the CPU
//! shared per cgroup, as between the pods of a Kubernetes node, not per task.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::cgroups::{BusyProcesses, CpuGroups, Group};
use super::loadgen::Security;
use super::peers::kubemail::NodeFeatures;
use super::peers::{self, PeerError};
use super::scenario::{self, Env, Measurement, Outcome, Params, ScenarioId, System};
use super::tls::{self, TlsSetupError};
use super::{procstat, report};

/// The benchmark submission user (relay benchmark).
const BENCH_USER: &str = "bench@bench.test";
/// Load average above which the report says the machine was busy.
pub const BUSY_LOAD: f64 = 1.0;
/// File descriptors the runner keeps for itself besides the idle connections.
const FD_HEADROOM: u64 = 500;
/// How long the busy loops run before the loaded repetitions start: the 1-minute load
/// average needs about that long to approach their number.
const BACKGROUND_SETTLE: Duration = Duration::from_secs(60);
/// The same for a smoke run, which checks the harness, not the figures.
const SMOKE_BACKGROUND_SETTLE: Duration = Duration::from_secs(1);
/// The busy loops stop by themselves after this long, whatever happens to the run.
const BACKGROUND_MAX: Duration = Duration::from_secs(3600);

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Peer(#[from] PeerError),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("cannot prepare {what}: {reason}")]
    Prepare { what: String, reason: String },
    #[error("cannot write {path}")]
    WriteReport {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What to run and where to write the results.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The release `smtp-node` binary.
    pub smtp_node: PathBuf,
    /// Work directory (instances, queues, logs); default: a new directory under /tmp.
    pub work_dir: Option<PathBuf>,
    pub keep_work_dir: bool,
    pub smoke: bool,
    pub scenarios: Vec<ScenarioId>,
    pub repetitions: Option<u32>,
    pub idle_count: Option<usize>,
    pub idle_tls_count: Option<usize>,
    pub idle_postfix_count: Option<usize>,
    pub markdown: Option<PathBuf>,
    pub json: Option<PathBuf>,
    /// Busy loops for the second, loaded run of the headline benchmarks (0: no such run).
    pub background_load: u32,
    /// How the CPUs were split ([`pin_cpus`]), for the report.
    pub cpu_pinning: String,
    /// After the loaded run, run the headline benchmarks once more with the busy loops in a
    /// cgroup of their own ([`super::cgroups`]), where the machine allows it.
    pub cgroup_load: bool,
    /// Longest wait, before the first measurement, for the 1-minute load average to fall
    /// below [`BUSY_LOAD`] (the release build just before leaves it around 2); zero: none.
    pub settle: Duration,
}

/// The machine and the conditions of the run.
#[derive(Debug, Clone, Serialize)]
pub struct RunMeta {
    pub date_utc: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub load_at_start: [f64; 3],
    /// How long the run waited for the load to settle before it started measuring.
    pub settled_secs: f64,
    pub load_at_end: [f64; 3],
    /// The 1-minute load average was above [`BUSY_LOAD`] at the start.
    pub busy: bool,
    pub smoke: bool,
    pub commit: String,
    pub smtp_node_version: String,
    pub nats_server_version: String,
    pub postfix_version: String,
    pub work_dir_mount: String,
    pub open_files_limit: u64,
    pub duration_secs: f64,
    /// Which CPUs the load generator and the servers ran on.
    pub cpu_pinning: String,
    /// Busy loops of the loaded run (0: none), and the load average when it started.
    pub background_load: u32,
    pub load_at_background_start: Option<[f64; 3]>,
    /// How the per-cgroup loaded run was set up, or why it was not run; `None` when there
    /// was no loaded run at all.
    pub cgroup_load: Option<String>,
}

/// What the loaded runs report beside their measurements.
#[derive(Debug, Default)]
struct LoadedRuns {
    /// Load average when the per-task loaded run started.
    per_task_start: Option<[f64; 3]>,
    /// How the per-cgroup loaded run was set up, or why it was not run.
    per_cgroup: Option<String>,
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResults {
    pub meta: RunMeta,
    pub params: Params,
    pub measurements: Vec<Measurement>,
}

/// Runs the benchmarks and writes the reports; returns the results.
pub async fn run(opts: RunOptions) -> Result<BenchResults, RunError> {
    let started = Instant::now();
    let settled = tokio::task::block_in_place(|| {
        wait_for_quiet(
            opts.settle,
            SETTLE_POLL,
            || load_average()[0],
            std::thread::sleep,
        )
    });
    let load_at_start = load_average();
    let mut params = if opts.smoke {
        Params::smoke()
    } else {
        Params::full()
    };
    if let Some(r) = opts.repetitions {
        params.repetitions = r.max(1);
        params.headline_repetitions = r.max(1);
    }
    if let Some(n) = opts.idle_count {
        params.idle.count = n;
    }
    if let Some(n) = opts.idle_tls_count {
        params.idle.tls_count = n;
    }
    if let Some(n) = opts.idle_postfix_count {
        params.idle.postfix_count = n;
    }
    let open_files_limit = raise_open_files_limit();
    let fd_budget = usize::try_from(open_files_limit.saturating_sub(FD_HEADROOM)).unwrap_or(0);
    if params.idle.count > fd_budget
        || params.idle.tls_count > fd_budget
        || params.idle.postfix_count > fd_budget
    {
        tracing::warn!(
            open_files_limit,
            "the open-files limit cannot hold the idle connections; fewer are opened"
        );
        params.idle.count = params.idle.count.min(fd_budget);
        params.idle.tls_count = params.idle.tls_count.min(fd_budget);
        params.idle.postfix_count = params.idle.postfix_count.min(fd_budget);
    }

    let nats_server = peers::find_tool(
        "nats-server",
        &[],
        "built by e2e/tools/setup.sh; put /root/.cache/kubemail/tools/*/ on PATH (make bench does)",
    )?;
    let smtp_sink = peers::find_tool(
        "smtp-sink",
        &["/usr/sbin"],
        "Debian package postfix (make setup)",
    )?;
    peers::find_tool(
        "postfix",
        &["/usr/sbin"],
        "Debian package postfix (make setup)",
    )?;
    if !nix::unistd::geteuid().is_root() {
        return Err(RunError::Prepare {
            what: "the Postfix instance".to_owned(),
            reason: "`postfix -c DIR start` needs root (its master process runs as root)"
                .to_owned(),
        });
    }
    if !opts.smtp_node.is_file() {
        return Err(PeerError::ToolMissing {
            tool: opts.smtp_node.display().to_string(),
            hint: "build it with `cargo build --release -p kubemail-smtp-node`",
        }
        .into());
    }

    let work_dir = match &opts.work_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("kubemail-bench-{}", std::process::id())),
    };
    peers::create_dir(&work_dir)?;
    if !opts.keep_work_dir {
        peers::register_dir(&work_dir);
    }
    let mut loaded = LoadedRuns::default();
    let result = run_in(
        &opts,
        &params,
        &work_dir,
        &nats_server,
        &smtp_sink,
        &mut loaded,
    )
    .await;
    if !opts.keep_work_dir {
        let _ = std::fs::remove_dir_all(&work_dir);
        peers::unregister_dir(&work_dir);
    }
    let measurements = result?;

    let meta = RunMeta {
        date_utc: utc_now(),
        cpu_model: cpu_model(),
        cpus: machine_cpus(),
        memory_gib: mem_total_kib() as f64 / 1024.0 / 1024.0,
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        load_at_start,
        settled_secs: settled.as_secs_f64(),
        load_at_end: load_average(),
        busy: load_at_start[0] > BUSY_LOAD,
        smoke: opts.smoke,
        commit: git_commit(),
        smtp_node_version: command_output(&opts.smtp_node, &["--version"]),
        nats_server_version: command_output(&nats_server, &["--version"]),
        postfix_version: peers::postfix::version().unwrap_or_else(|| "unknown".to_owned()),
        work_dir_mount: procstat::mount_of(&std::env::temp_dir())
            .filter(|_| opts.work_dir.is_none())
            .or_else(|| opts.work_dir.as_deref().and_then(procstat::mount_of))
            .unwrap_or_else(|| "unknown".to_owned()),
        open_files_limit,
        duration_secs: started.elapsed().as_secs_f64(),
        cpu_pinning: opts.cpu_pinning.clone(),
        background_load: opts.background_load,
        load_at_background_start: loaded.per_task_start,
        cgroup_load: loaded.per_cgroup,
    };
    let results = BenchResults {
        meta,
        params,
        measurements,
    };
    if let Some(path) = &opts.markdown {
        write(path, &report::markdown(&results))?;
    }
    if let Some(path) = &opts.json {
        write(path, &report::json(&results))?;
    }
    Ok(results)
}

async fn run_in(
    opts: &RunOptions,
    params: &Params,
    work_dir: &Path,
    nats_server: &Path,
    smtp_sink: &Path,
    loaded: &mut LoadedRuns,
) -> Result<Vec<Measurement>, RunError> {
    let shared = work_dir.join("shared");
    peers::create_dir(&shared)?;
    let pki = tls::generate(&shared)?;
    let client_tls = tls::client_config(&pki.ca)?;
    let dkim_key = shared.join("dkim-ed25519.pem");
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|e| RunError::Prepare {
            what: "the DKIM key".to_owned(),
            reason: e.to_string(),
        })?;
    peers::write_file(&dkim_key, &key.serialize_pem())?;
    let password = "bench-password".to_owned();
    let users_file = shared.join("users");
    peers::write_file(
        &users_file,
        &format!("{BENCH_USER}:{}\n", cheap_password_hash(&password)?),
    )?;
    let features = NodeFeatures::detect(&opts.smtp_node)?;
    let dns_blackhole = peers::loopback(peers::free_port()?);
    let env = Env::new(
        opts.smtp_node.clone(),
        nats_server.to_owned(),
        smtp_sink.to_owned(),
        work_dir.to_owned(),
        pki,
        client_tls,
        dkim_key,
        users_file,
        (BENCH_USER.to_owned(), password),
        features,
        dns_blackhole,
    );

    let mut out = Vec::new();
    for scenario in ScenarioId::ALL {
        if !opts.scenarios.contains(&scenario) {
            continue;
        }
        eprintln!("== {}", scenario.title());
        match scenario {
            ScenarioId::AcceptAndQueue => {
                let reps = params.headline_repetitions;
                for_each_alternating(reps, &System::ALL, &mut out, |s, rep| {
                    scenario::accept_and_queue(&env, s, &params.accept, rep)
                })
                .await;
            }
            ScenarioId::AcceptR3 => {
                let systems = [System::KubemailR3SyncAlways, System::Postfix];
                for_each_alternating(params.repetitions, &systems, &mut out, |s, rep| {
                    scenario::accept_and_queue_r3(&env, s, &params.accept, rep)
                })
                .await;
            }
            ScenarioId::Relay => {
                let reps = params.headline_repetitions;
                for_each_alternating(reps, &System::ALL, &mut out, |s, rep| {
                    scenario::relay(&env, s, &params.relay, rep)
                })
                .await;
            }
            ScenarioId::Latency => latency_rows(&env, params, &mut out).await,
            ScenarioId::IdleConnections => {
                for security in [Security::Plain, Security::StartTls] {
                    for system in [System::KubemailSyncAlways, System::Postfix] {
                        let m = scenario::idle(&env, system, &params.idle, security, 0).await;
                        progress(&m);
                        out.push(m);
                    }
                }
            }
            ScenarioId::TlsChurn => {
                for_each_alternating(params.repetitions, &System::ALL, &mut out, |s, rep| {
                    scenario::tls_churn(&env, s, &params.tls, rep)
                })
                .await;
            }
        }
    }
    let headline: Vec<ScenarioId> = [ScenarioId::AcceptAndQueue, ScenarioId::Relay]
        .into_iter()
        .filter(|s| opts.scenarios.contains(s))
        .collect();
    if opts.background_load == 0 || headline.is_empty() {
        return Ok(out);
    }
    let n = opts.background_load;
    let settle = if opts.smoke {
        SMOKE_BACKGROUND_SETTLE
    } else {
        BACKGROUND_SETTLE
    };
    // First beside busy loops that share the servers' cgroup, so the CPU is shared per task.
    eprintln!(
        "== background load: {n} busy loops, {}s to settle",
        settle.as_secs()
    );
    let busy = BusyLoops::start(n, BACKGROUND_MAX);
    tokio::time::sleep(settle).await;
    loaded.per_task_start = Some(load_average());
    let mut measured = headline_again(&env, params, &headline, n, "").await;
    drop(busy);
    for m in &mut measured {
        m.background_load = n;
    }
    out.append(&mut measured);
    // Then with the generator, the servers and the busy loops in three cgroups of equal
    // weight, so the CPU is shared per cgroup, as between the pods of a Kubernetes node.
    if !opts.cgroup_load {
        loaded.per_cgroup = Some("not run (--no-cgroup-load)".to_owned());
        return Ok(out);
    }
    let groups = match CpuGroups::create() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("== no per-cgroup loaded run: {e}");
            loaded.per_cgroup = Some(format!("not run: no writable CPU cgroup ({e})"));
            return Ok(out);
        }
    };
    let all_cpus = format!("0-{}", machine_cpus().saturating_sub(1));
    let busy = match groups
        .enter(Group::Generator, std::process::id())
        .and_then(|()| {
            BusyProcesses::start(
                n,
                &groups.procs_file(Group::Neighbours),
                &all_cpus,
                BACKGROUND_MAX,
            )
        }) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("== no per-cgroup loaded run: {e}");
            loaded.per_cgroup = Some(format!("not run: {e}"));
            return Ok(out);
        }
    };
    peers::servers_in_cgroup(Some(groups.procs_file(Group::Servers)));
    eprintln!(
        "== background load in cgroups: {n} busy processes (pids {:?}), {}s to settle",
        busy.pids(),
        settle.as_secs()
    );
    tokio::time::sleep(settle).await;
    let start = load_average();
    let mut measured = headline_again(&env, params, &headline, n, ", per-cgroup sharing").await;
    peers::servers_in_cgroup(None);
    drop(busy);
    loaded.per_cgroup = Some(format!(
        "{n} busy processes in a cgroup of their own, beside the load generator's and the \
         servers' (three sibling cgroups, each {}; load average {:.2} {:.2} {:.2} when it started)",
        groups.describe(Group::Servers),
        start[0],
        start[1],
        start[2]
    ));
    drop(groups);
    for m in &mut measured {
        m.background_load = n;
        m.background_cgroups = true;
    }
    out.append(&mut measured);
    Ok(out)
}

/// The headline benchmarks again, `params.headline_repetitions` each, alternating systems.
async fn headline_again(
    env: &Env,
    params: &Params,
    headline: &[ScenarioId],
    n: u32,
    how: &str,
) -> Vec<Measurement> {
    let reps = params.headline_repetitions;
    let mut loaded = Vec::new();
    for &id in headline {
        eprintln!("== {} (background load {n}{how})", id.title());
        for_each_alternating(reps, &System::ALL, &mut loaded, |s, rep| async move {
            match id {
                ScenarioId::Relay => scenario::relay(env, s, &params.relay, rep).await,
                _ => scenario::accept_and_queue(env, s, &params.accept, rep).await,
            }
        })
        .await;
    }
    loaded
}

/// Splits the CPUs this process may use: the lower half for the load generator (this
/// process: call it before any thread is started, so every thread inherits it; the sink it
/// starts inherits it too), the upper half for the servers under test ([`peers::server_command`]).
/// With fewer than two CPUs, or when `pin` is false, nothing is pinned. Returns what was done,
/// for the report.
pub fn pin_cpus(pin: bool) -> String {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;
    let Ok(all) = sched_getaffinity(Pid::from_raw(0)) else {
        return "not pinned (the CPU affinity could not be read)".to_owned();
    };
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| all.is_set(c).unwrap_or(false))
        .collect();
    if !pin {
        return format!(
            "not pinned (--no-pin): everything shares {} CPUs",
            cpus.len()
        );
    }
    if cpus.len() < 2 {
        return "not pinned: one CPU".to_owned();
    }
    let (generator, servers) = cpus.split_at(cpus.len() / 2);
    let mut set = CpuSet::new();
    for &c in generator {
        let _ = set.set(c);
    }
    if let Err(e) = sched_setaffinity(Pid::from_raw(0), &set) {
        return format!("not pinned ({e})");
    }
    let list = |cs: &[usize]| {
        cs.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    peers::pin_servers(list(servers));
    format!(
        "load generator and smtp-sink on CPU {}; servers under test (smtp-node, nats-server, Postfix) on CPU {} (taskset)",
        list(generator),
        list(servers)
    )
}

/// N threads that spin until dropped (or until their time limit): the busy neighbours of the
/// loaded run. They may run on every CPU, like a compiler next door would.
pub struct BusyLoops {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BusyLoops {
    pub fn start(n: u32, max: Duration) -> Self {
        use nix::sched::{CpuSet, sched_setaffinity};
        use nix::unistd::Pid;
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    // This thread only: back to every CPU the machine has.
                    let mut all = CpuSet::new();
                    for c in 0..machine_cpus() {
                        let _ = all.set(c);
                    }
                    let _ = sched_setaffinity(Pid::from_raw(0), &all);
                    let deadline = Instant::now() + max;
                    let mut x: u64 = 1;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        for _ in 0..100_000 {
                            x = std::hint::black_box(
                                x.wrapping_mul(6364136223846793005).wrapping_add(1),
                            );
                        }
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs `f` for every system `repetitions` times, rotating the order each repetition.
async fn for_each_alternating<F, Fut>(
    repetitions: u32,
    systems: &[System],
    out: &mut Vec<Measurement>,
    mut f: F,
) where
    F: FnMut(System, u32) -> Fut,
    Fut: std::future::Future<Output = Measurement>,
{
    for rep in 0..repetitions {
        let mut order = systems.to_vec();
        order.rotate_left(rep as usize % systems.len().max(1));
        for system in order {
            let m = f(system, rep).await;
            progress(&m);
            out.push(m);
        }
    }
}

/// Latency at a fraction of each system's own accept-and-queue maximum, plus Postfix at
/// kubemail's (sync always) rate, so both are also compared at the same offered load.
async fn latency_rows(env: &Env, params: &Params, out: &mut Vec<Measurement>) {
    let p = &params.latency;
    let mut max_rate: BTreeMap<System, f64> = BTreeMap::new();
    for system in System::ALL {
        let from_accept = median_rate(out, ScenarioId::AcceptAndQueue, system);
        let rate = match from_accept {
            Some(r) => Some(r),
            None => {
                // Accept-and-queue was not selected: measure the maximum once now.
                let m = scenario::accept_and_queue(env, system, &params.accept, 0).await;
                progress(&m);
                m.msgs_per_sec.filter(|_| m.outcome == Outcome::Ok)
            }
        };
        if let Some(r) = rate {
            max_rate.insert(system, r);
        }
    }
    let mut rows: Vec<(System, Option<f64>, String)> = System::ALL
        .iter()
        .map(|&s| {
            let rate = max_rate.get(&s).map(|r| r * p.fraction);
            let label = match rate {
                Some(r) => format!(
                    "{:.0}% of its own maximum ({:.0} msg/s offered)",
                    p.fraction * 100.0,
                    r
                ),
                None => format!("{:.0}% of its own maximum", p.fraction * 100.0),
            };
            (s, rate, label)
        })
        .collect();
    let km_rate = max_rate
        .get(&System::KubemailSyncAlways)
        .map(|r| r * p.fraction);
    rows.push((
        System::Postfix,
        km_rate,
        match km_rate {
            Some(r) => format!("kubemail (sync always)'s rate ({r:.0} msg/s offered)"),
            None => "kubemail (sync always)'s rate".to_owned(),
        },
    ));
    for (system, rate, label) in rows {
        let m = match rate {
            Some(r) => scenario::latency(env, system, p, r, &label, 0).await,
            None => scenario::skipped(
                ScenarioId::Latency,
                system,
                &label,
                "no maximum rate: its accept-and-queue run failed",
            ),
        };
        progress(&m);
        out.push(m);
    }
}

/// The median msg/s of the successful runs of `system` in `scenario`.
pub fn median_rate(ms: &[Measurement], scenario: ScenarioId, system: System) -> Option<f64> {
    let mut rates: Vec<f64> = ms
        .iter()
        .filter(|m| m.scenario == scenario && m.system == system && m.outcome == Outcome::Ok)
        .filter_map(|m| m.msgs_per_sec)
        .collect();
    if rates.is_empty() {
        return None;
    }
    rates.sort_by(f64::total_cmp);
    Some(rates[rates.len() / 2])
}

fn progress(m: &Measurement) {
    let status = match &m.outcome {
        Outcome::Ok => "ok".to_owned(),
        Outcome::NotAvailable { reason } => format!("not available: {reason}"),
        Outcome::Failed { reason } => format!("FAILED: {reason}"),
    };
    let rate = m
        .msgs_per_sec
        .map(|r| format!(" {r:.0} msg/s"))
        .unwrap_or_default();
    let lat = m
        .latency
        .map(|l| format!(" p99 {:.2} ms", l.p99_us as f64 / 1000.0))
        .unwrap_or_default();
    let cpu = m
        .cpu_us_per_msg
        .map(|c| format!(" {c:.0} us CPU/msg"))
        .unwrap_or_default();
    let idle = m
        .idle
        .as_ref()
        .map(|i| {
            format!(
                " {} open, {:.1} KiB RSS / {:.1} KiB PSS per connection",
                i.opened, i.rss_kib_per_connection, i.pss_kib_per_connection
            )
        })
        .unwrap_or_default();
    eprintln!(
        "   {:<42} rep {} [{}]{rate}{lat}{cpu}{idle}: {status}",
        m.system.label(),
        m.repetition,
        m.variant,
    );
}

/// An argon2id hash with the smallest parameters, so AUTH in the relay benchmark costs
/// microseconds rather than the production hash's tens of milliseconds per session: the
/// benchmark measures relaying, and the Postfix side does no AUTH at all.
fn cheap_password_hash(password: &str) -> Result<String, RunError> {
    use argon2::password_hash::{PasswordHasher as _, SaltString};
    let err = |e: &dyn std::fmt::Display| RunError::Prepare {
        what: "the benchmark users file".to_owned(),
        reason: e.to_string(),
    };
    // 64 KiB of memory, one pass, one lane: the minimum argon2 allows for one lane is 8 KiB.
    let params = argon2::Params::new(64, 1, 1, None).map_err(|e| err(&e))?;
    let hasher = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(b"kubemail-bench-salt").map_err(|e| err(&e))?;
    hasher
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| err(&e))
}

/// Raises the soft open-files limit to the hard limit; returns the soft limit in force.
fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// How often [`wait_for_quiet`] reads the load average.
const SETTLE_POLL: Duration = Duration::from_secs(5);

/// Waits until `load` (the 1-minute load average) is below [`BUSY_LOAD`], reading it every
/// `poll`, for at most `max`; how long it waited. A machine that stays busy is measured
/// anyway after `max`, and the report marks every ratio.
pub fn wait_for_quiet(
    max: Duration,
    poll: Duration,
    mut load: impl FnMut() -> f64,
    mut sleep: impl FnMut(Duration),
) -> Duration {
    let mut waited = Duration::ZERO;
    while waited < max && load() >= BUSY_LOAD {
        let step = poll.min(max - waited);
        sleep(step);
        waited += step;
    }
    waited
}

/// `/proc/loadavg`: 1, 5 and 15 minute load averages.
pub fn load_average() -> [f64; 3] {
    let text = read_trimmed("/proc/loadavg");
    let mut it = text
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

/// The current time as `YYYY-MM-DD HH:MM:SS` (UTC).
fn utc_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

/// CPUs of the machine (not of this process, which may be pinned to some).
fn machine_cpus() -> usize {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|t| t.lines().filter(|l| l.starts_with("processor")).count())
        .ok()
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn mem_total_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn command_output(binary: &Path, args: &[&str]) -> String {
    std::process::Command::new(binary)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text).trim().to_owned()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn git_commit() -> String {
    let root = crate::local_env::workspace_root();
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(commit) = run(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown".to_owned();
    };
    let dirty =
        run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{commit} + uncommitted changes")
    } else {
        commit
    }
}

fn write(path: &Path, contents: &str) -> Result<(), RunError> {
    std::fs::write(path, contents).map_err(|source| RunError::WriteReport {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs [`wait_for_quiet`] over the 1-minute load averages `loads`, read one per poll
    /// (the last one repeats); how long it waited and how many readings it took.
    fn settle(loads: &[f64], max_secs: u64) -> (u64, usize) {
        let mut readings = 0;
        let waited = wait_for_quiet(
            Duration::from_secs(max_secs),
            Duration::from_secs(5),
            || {
                readings += 1;
                loads[(readings - 1).min(loads.len() - 1)]
            },
            |_| {},
        );
        (waited.as_secs(), readings)
    }

    #[test]
    fn the_run_waits_for_the_load_to_fall_below_the_busy_mark() {
        // Quiet already: no wait.
        assert_eq!(settle(&[0.4], 300), (0, 1));
        // Falling after a build: starts at the first reading below the mark.
        assert_eq!(settle(&[2.1, 1.6, 1.2, 0.9, 0.7], 300), (15, 4));
        // Exactly at the mark waits: a representative run needs less than 1.0.
        assert_eq!(settle(&[1.0, 0.99], 300), (5, 2));
        // A machine that stays busy is measured after the longest wait, the last step cut
        // to fit.
        assert_eq!(settle(&[3.0], 12), (12, 3));
        // No wait asked for.
        assert_eq!(settle(&[3.0], 0), (0, 0));
    }
}
