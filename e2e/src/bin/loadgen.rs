//! `loadgen`: the kubemail SMTP load generator on the command line (smtp-source's options plus
//! TLS, AUTH, an offered rate and latency percentiles). Loopback targets only.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use kubemail_e2e::bench::loadgen::{self, LoadSpec, Security};
use kubemail_e2e::bench::tls;

/// Sends SMTP load to a loopback server and reports msg/s and end-of-data latency.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
struct Args {
    /// Server address, e.g. 127.0.0.1:2525 or localhost:2525 (loopback only).
    #[arg(env = "LOADGEN_TARGET")]
    target: String,
    /// Concurrent sessions.
    #[arg(short = 's', long, env = "LOADGEN_SESSIONS", default_value_t = 10)]
    sessions: usize,
    /// Messages to send in total.
    #[arg(short = 'm', long, env = "LOADGEN_MESSAGES", default_value_t = 1000)]
    messages: u64,
    /// Message size in bytes (headers and body).
    #[arg(short = 'l', long, env = "LOADGEN_SIZE", default_value_t = 5120)]
    size: usize,
    /// Offered rate in messages per second (open loop); default: as fast as the server answers.
    #[arg(long, env = "LOADGEN_RATE")]
    rate: Option<f64>,
    /// Stop after this long (humantime, e.g. 60s, 5m).
    #[arg(long, env = "LOADGEN_DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Bound on every connect, read and write.
    #[arg(long, env = "LOADGEN_IO_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    io_timeout: Duration,
    /// Use STARTTLS after EHLO.
    #[arg(long, env = "LOADGEN_STARTTLS", conflicts_with = "implicit_tls")]
    starttls: bool,
    /// Use TLS from the first byte (port 465 style).
    #[arg(long, env = "LOADGEN_IMPLICIT_TLS")]
    implicit_tls: bool,
    /// CA certificate(s) (PEM) to trust for TLS.
    #[arg(long, env = "LOADGEN_CA")]
    ca: Option<PathBuf>,
    /// Name the server certificate must carry.
    #[arg(long, env = "LOADGEN_SERVER_NAME", default_value = "localhost")]
    server_name: String,
    /// AUTH PLAIN user.
    #[arg(long, env = "LOADGEN_AUTH_USER", requires = "auth_password")]
    auth_user: Option<String>,
    /// AUTH PLAIN password (prefer the environment variable over the command line).
    #[arg(long, env = "LOADGEN_AUTH_PASSWORD", hide_env_values = true)]
    auth_password: Option<String>,
    /// Messages per connection before a new one (1 = a new connection, and TLS session, per
    /// message); default: connections are kept open.
    #[arg(long, env = "LOADGEN_MESSAGES_PER_CONNECTION")]
    messages_per_connection: Option<u64>,
    /// Do not pipeline MAIL/RCPT/DATA even when the server offers PIPELINING.
    #[arg(long, env = "LOADGEN_NO_PIPELINING")]
    no_pipelining: bool,
    /// Envelope sender and From header.
    #[arg(
        short = 'f',
        long,
        env = "LOADGEN_FROM",
        default_value = "sender@bench.test"
    )]
    from: String,
    /// Recipients are r<n>@DOMAIN, one unique recipient per message.
    #[arg(
        short = 't',
        long,
        env = "LOADGEN_TO_DOMAIN",
        default_value = "bench.test"
    )]
    to_domain: String,
    /// Stop early after this many connection or protocol errors.
    #[arg(long, env = "LOADGEN_MAX_ERRORS", default_value_t = 100)]
    max_errors: u64,
    /// Print the report as JSON.
    #[arg(long, env = "LOADGEN_JSON")]
    json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let target = resolve(&args.target)?;
    let mut spec = LoadSpec::new(target);
    spec.security = if args.starttls {
        Security::StartTls
    } else if args.implicit_tls {
        Security::ImplicitTls
    } else {
        Security::Plain
    };
    if let Some(ca) = &args.ca {
        spec.tls = Some(tls::client_config(ca)?);
    }
    spec.server_name = rustls_pki_types::ServerName::try_from(args.server_name.clone())?;
    spec.auth = args.auth_user.clone().zip(args.auth_password.clone());
    spec.sessions = args.sessions;
    spec.messages = args.messages;
    spec.message_size = args.size;
    spec.rate = args.rate;
    spec.max_duration = args.duration;
    spec.io_timeout = args.io_timeout;
    spec.messages_per_connection = args.messages_per_connection;
    spec.pipelining = !args.no_pipelining;
    spec.from = args.from;
    spec.recipient_domain = args.to_domain;
    spec.max_errors = args.max_errors;
    let report = loadgen::run(spec).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.summary());
    }
    Ok(
        if report.accepted == report.attempted && report.attempted > 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

/// Resolves `host:port`; every address must be loopback (checked again by the generator).
fn resolve(target: &str) -> anyhow::Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = target.to_socket_addrs()?.collect();
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| anyhow::anyhow!("{target} resolves to no address"))?;
    loadgen::check_loopback(addr)?;
    Ok(addr)
}
