//! `smtp-node`: parse arguments, set up logging and tracing, run the node, flush the traces,
//! map the exit code.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;

use clap::{Parser, Subcommand};
use kubemail_smtp_node::clock::{Clock, StartedClock, SystemClock};
use kubemail_smtp_node::config::NodeConfig;
use kubemail_smtp_node::shutdown::{self, Shutdown};
use kubemail_smtp_node::{auth, metrics, node, telemetry};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// mimalloc instead of the C library's allocator: a session allocates and frees small
/// buffers at every command and message, and glibc's malloc took about a sixth of the node's
/// CPU per accepted message. Statically linked, so the image needs no other library.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// kubemail SMTP node: receives mail, queues it in NATS JetStream and delivers it.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Configuration file (YAML) to run with.
    #[arg(long, env = "SMTP_NODE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Bind every listener and the admin endpoint to this IP instead of the config's host part
    /// (ports unchanged). For pods that share a network namespace, e.g. `--listen-ip $(POD_IP)`.
    #[arg(long, env = "SMTP_NODE_LISTEN_IP", value_name = "IP")]
    listen_ip: Option<std::net::IpAddr>,

    /// Run the wall clock that dates TLS-RPT results and reports from this RFC 3339 instant
    /// (it advances in real time from there) instead of the system time: for drills and tests
    /// that need a day to end. Timers and certificates keep the system time.
    #[arg(long, env = "SMTP_NODE_CLOCK_START", value_name = "RFC3339", value_parser = parse_instant, hide = true)]
    clock_start: Option<SystemTime>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a configuration file (and the certificate and users files it names), then exit.
    CheckConfig {
        /// The file to check.
        #[arg(env = "SMTP_NODE_CONFIG", value_name = "FILE")]
        file: PathBuf,
    },
    /// Read a password from standard input and print its argon2 hash for a users file.
    HashPassword,
    /// Print the JSON schema of the configuration file.
    ConfigSchema,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Some(Command::CheckConfig { file }) => check_config(&file),
        Some(Command::HashPassword) => hash_password(),
        Some(Command::ConfigSchema) => {
            let schema = schemars::schema_for!(NodeConfig);
            match serde_json::to_string_pretty(&schema) {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        None => match args.config {
            Some(file) => run(&file, args.listen_ip, args.clock_start),
            None => {
                eprintln!("error: --config FILE (or SMTP_NODE_CONFIG) is required; see --help");
                ExitCode::from(2)
            }
        },
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    let result = NodeConfig::load(file)
        .map_err(anyhow::Error::from)
        .and_then(|config| node::check(&config).map_err(anyhow::Error::from));
    match result {
        Ok(()) => {
            println!("{}: ok", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn hash_password() -> ExitCode {
    let mut password = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut password) {
        eprintln!("error: cannot read the password from stdin: {e}");
        return ExitCode::FAILURE;
    }
    let password = password.trim_end_matches(['\r', '\n']);
    match auth::hash_password(password) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// An RFC 3339 date and time, e.g. `2026-11-28T00:00:30Z`.
fn parse_instant(text: &str) -> Result<SystemTime, String> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map(SystemTime::from)
        .map_err(|e| format!("not an RFC 3339 date and time: {e}"))
}

fn run(
    file: &std::path::Path,
    listen_ip: Option<std::net::IpAddr>,
    clock_start: Option<SystemTime>,
) -> ExitCode {
    let log_format = telemetry::LogFormat::from_env();
    let config = match NodeConfig::load(file) {
        Ok(mut c) => {
            if let Some(ip) = listen_ip {
                c.bind_to(ip);
            }
            c
        }
        Err(e) => {
            telemetry::init_logs(log_format);
            tracing::error!("{e}");
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Built once here: the OTLP exporter and every part of the node count into it.
    let metrics = metrics::Metrics::new();
    // The OTLP exporter runs on the runtime, so telemetry starts inside its context.
    let telemetry = {
        let _context = runtime.enter();
        let domains: Vec<String> = config.domains.iter().map(|d| d.name.clone()).collect();
        telemetry::init(telemetry::Settings {
            service_name: "kubemail-smtp-node",
            service_version: env!("CARGO_PKG_VERSION"),
            attributes: telemetry::node_attributes(&domains),
            log_format,
            export_metrics: metrics.otel.clone(),
        })
    };
    let result = runtime.block_on(async {
        let shutdown = Shutdown::new();
        let stopper = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = shutdown::signal().await {
                // Without signal handling the node can only be killed; keep serving.
                tracing::error!(error = %e, "cannot listen for signals");
                std::future::pending::<()>().await;
            }
            tracing::info!("shutdown signal received");
            stopper.stop_gracefully().await;
        });
        let clock: Arc<dyn Clock> = match clock_start {
            Some(start) => {
                tracing::warn!(start = %OffsetDateTime::from(start), "the TLS-RPT clock starts at a given instant, not at the system time");
                Arc::new(StartedClock::new(start))
            }
            None => Arc::new(SystemClock),
        };
        let source = node::ConfigSource {
            path: file.to_owned(),
            listen_ip,
        };
        node::run_from(config, Some(source), shutdown, clock, metrics).await
    });
    let result = result.map_err(anyhow::Error::from);
    if let Err(e) = &result {
        tracing::error!("{e:#}");
    }
    // Sends the spans still queued (the exporter runs on the runtime, which is still up).
    telemetry.shutdown();
    // Tasks still running (a session stuck past the abort grace) are dropped here.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
