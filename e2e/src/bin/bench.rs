//! `bench`: runs kubemail against Postfix on this machine (`make bench`) and writes
//! `BENCHMARKS.md` and `bench-results.json`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use kubemail_e2e::bench::peers;
use kubemail_e2e::bench::runner::{self, RunOptions};
use kubemail_e2e::bench::scenario::{Outcome, ScenarioId};
use tokio::signal::unix::{SignalKind, signal};

/// The longest wait for a quiet machine before a full run measures (`--settle-secs`).
const DEFAULT_SETTLE_SECS: u64 = 300;

/// Benchmarks kubemail against Postfix on this machine, in one run, and writes the reports.
#[derive(Debug, Parser)]
#[command(name = "bench", version)]
struct Args {
    /// The release smtp-node binary.
    #[arg(long, env = "BENCH_SMTP_NODE")]
    smtp_node: PathBuf,
    /// Markdown report to write.
    #[arg(long, env = "BENCH_MARKDOWN", default_value = "BENCHMARKS.md")]
    markdown: PathBuf,
    /// JSON results to write.
    #[arg(long, env = "BENCH_JSON", default_value = "bench-results.json")]
    json: PathBuf,
    /// Reduced counts: checks the harness end to end; the report says it is not representative.
    #[arg(long, env = "BENCH_SMOKE")]
    smoke: bool,
    /// Scenarios to run (accept, relay, latency, idle, tls), comma separated; default: all.
    #[arg(long, env = "BENCH_SCENARIOS", value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Repetitions per system for accept, relay and tls (default 5 for accept and relay, 3
    /// for tls; smoke 1).
    #[arg(long, env = "BENCH_REPETITIONS")]
    repetitions: Option<u32>,
    /// Plain idle connections to hold (default 10000, smoke 1000).
    #[arg(long, env = "BENCH_IDLE_CONNECTIONS")]
    idle_connections: Option<usize>,
    /// Idle connections to hold after STARTTLS (default 10000, smoke 500).
    #[arg(long, env = "BENCH_IDLE_TLS_CONNECTIONS")]
    idle_tls_connections: Option<usize>,
    /// Idle connections to hold on Postfix, plain and TLS (default 1000, smoke 500): each is an
    /// smtpd process of about 1.7 MiB; never more than half the available memory allows.
    #[arg(long, env = "BENCH_IDLE_POSTFIX_CONNECTIONS")]
    idle_postfix_connections: Option<usize>,
    /// Work directory for instances, queues and logs (default: a new one under /tmp).
    #[arg(long, env = "BENCH_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// Keep the work directory (logs, queues) after the run.
    #[arg(long, env = "BENCH_KEEP")]
    keep: bool,
    /// Run accept-and-queue and relay a second time beside N busy loops (a load average
    /// around N) and report both runs; 0: only the idle run.
    #[arg(long, env = "BENCH_BACKGROUND_LOAD", default_value_t = 0)]
    background_load: u32,
    /// With --background-load: skip the third run of accept and relay, the one with the busy
    /// loops, the load generator and the servers in three cgroups of equal CPU weight.
    #[arg(long, env = "BENCH_NO_CGROUP_LOAD")]
    no_cgroup_load: bool,
    /// Do not pin the load generator and the servers to separate CPUs.
    #[arg(long, env = "BENCH_NO_PIN")]
    no_pin: bool,
    /// Wait at most this many seconds, before measuring, for the 1-minute load average to
    /// fall below 1.0 (default 300, smoke 0).
    #[arg(long, env = "BENCH_SETTLE_SECS")]
    settle_secs: Option<u64>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let scenarios = match parse_scenarios(&args.scenarios) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // Before the runtime starts its threads: they inherit the generator's CPUs.
    let cpu_pinning = runner::pin_cpus(!args.no_pin);
    eprintln!("CPU pinning: {cpu_pinning}");
    let opts = RunOptions {
        smtp_node: args.smtp_node,
        work_dir: args.work_dir,
        keep_work_dir: args.keep,
        smoke: args.smoke,
        scenarios,
        repetitions: args.repetitions,
        idle_count: args.idle_connections,
        idle_tls_count: args.idle_tls_connections,
        idle_postfix_count: args.idle_postfix_connections,
        markdown: Some(args.markdown.clone()),
        json: Some(args.json.clone()),
        background_load: args.background_load,
        cpu_pinning,
        cgroup_load: !args.no_cgroup_load,
        settle: Duration::from_secs(args.settle_secs.unwrap_or(if args.smoke {
            0
        } else {
            DEFAULT_SETTLE_SECS
        })),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // An interrupted run must not leave servers behind (the Postfix master is a daemon, not
    // our child): stop everything this run started, then exit.
    runtime.spawn(async {
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("interrupted: stopping every process this run started");
        tokio::task::block_in_place(peers::stop_all);
        std::process::exit(130);
    });
    match runtime.block_on(runner::run(opts)) {
        Ok(results) => {
            let failed = results
                .measurements
                .iter()
                .filter(|m| matches!(m.outcome, Outcome::Failed { .. }))
                .count();
            eprintln!(
                "wrote {} and {} ({} measurements, {failed} failed)",
                args.markdown.display(),
                args.json.display(),
                results.measurements.len()
            );
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

fn parse_scenarios(names: &[String]) -> Result<Vec<ScenarioId>, String> {
    if names.is_empty() {
        return Ok(ScenarioId::ALL.to_vec());
    }
    names
        .iter()
        .map(|n| {
            ScenarioId::ALL
                .into_iter()
                .find(|s| s.key() == n.trim())
                .ok_or_else(|| {
                    format!("unknown scenario {n:?} (use accept, relay, latency, idle, tls)")
                })
        })
        .collect()
}
