//! `kubectl-kubemail`: a kubectl plugin (install it on the PATH, then `kubectl kubemail ...`)
//! to look at and steer kubemail's mail queue across every replica. Parses the flags, finds
//! the queue, runs one subcommand; logs (and the audit line of every action) go to stderr.

mod args;
mod connect;
mod queue;

use std::process::ExitCode;

use clap::Parser as _;
use kubemail_queue_admin::Queue;
use kubemail_queue_admin::actions::Kind;

use crate::args::{Args, Command, QueueCommand};

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KUBEMAIL_LOG")
                .unwrap_or_else(|_| "kubemail=info,kubectl_kubemail=info,warn".into()),
        )
        .init();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let target = connect::resolve(&args.connect).await?;
    let client = connect::nats(&target, &args.connect).await?;
    let queue = Queue::open(
        async_nats::jetstream::new(client),
        &target.stream,
        &target.prefix,
        &target.actor,
    )
    .await?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let Command::Queue(command) = args.command;
    match command {
        QueueCommand::List(a) => queue::list(&queue, &a, &mut out).await?,
        QueueCommand::Show(a) => {
            queue::show(&queue, &a, &args.connect, target.kube.as_ref(), &mut out).await?
        }
        QueueCommand::Retry(a) => {
            queue::act(&queue, Kind::Retry, &a, false, &mut out).await?;
        }
        QueueCommand::Hold(a) => {
            let kind = Kind::Hold {
                reason: a.reason.clone(),
            };
            queue::act(&queue, kind, &a.action, false, &mut out).await?;
        }
        QueueCommand::Release(a) => {
            queue::act(&queue, Kind::Release, &a, false, &mut out).await?;
        }
        QueueCommand::Delete(a) => {
            queue::delete(&queue, &a, &mut out).await?;
        }
        QueueCommand::Stats(a) => queue::stats(&queue, &a, &mut out).await?,
    }
    std::io::Write::flush(&mut out)?;
    Ok(())
}
