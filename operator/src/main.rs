//! `kubemail-operator`: parse the flags, set up logging, run, map the exit code.

use std::process::ExitCode;

use clap::Parser;
use kubemail_operator::args::{Args, Command};
use kubemail_operator::{controller, diagnose, runtime, telemetry};

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::NatsTrust {
        out,
        admin_validity,
    }) = &args.command
    {
        return match kubemail_operator::nats::tools::write_trust(out, *admin_validity) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {}", controller::chain(&e));
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::SmokeSend {
        server,
        from,
        to,
        ehlo,
        subject,
        timeout,
    }) = &args.command
    {
        return smoke_send(kubemail_operator::smoke::SmokeMessage {
            server: server.clone(),
            from: from.clone(),
            to: to.clone(),
            ehlo_name: ehlo.clone(),
            subject: subject.clone(),
            timeout: *timeout,
        });
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter runs on the runtime, so telemetry starts inside its context.
    let telemetry = {
        let _context = rt.enter();
        telemetry::init(args.log_format)
    };
    let result = rt.block_on(runtime::run(args));
    // Sends the spans still queued while the runtime (the exporter's home) is still up.
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = diagnose::explain(&e, &diagnose::Hints::default());
            tracing::error!(error = %message, "operator failed");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `smoke-send`: one message, its final reply on stdout; no telemetry, no Kubernetes client.
fn smoke_send(message: kubemail_operator::smoke::SmokeMessage) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(kubemail_operator::smoke::send(&message)) {
        Ok(reply) => {
            println!(
                "{} accepted the message from {} to {}: {reply}",
                message.server, message.from, message.to
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", controller::chain(&e));
            ExitCode::FAILURE
        }
    }
}
