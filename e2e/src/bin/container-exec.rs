//! `container-exec`: run by the node agent's launch script inside a container's mount
//! namespace; enters the container's root as its user and execs its program (see
//! `kubemail_e2e::agent::container_exec`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kubemail_e2e::agent::container_exec::{self, ExecRequest};

/// Enters a container root as the container's user and runs its program (node agent only).
#[derive(Debug, Parser)]
#[command(name = "container-exec", version)]
struct Args {
    /// The assembled root filesystem to chroot into.
    #[arg(long)]
    root: PathBuf,
    /// Working directory inside the root.
    #[arg(long, default_value = "/")]
    workdir: String,
    #[arg(long)]
    uid: u32,
    #[arg(long)]
    gid: u32,
    /// Supplementary groups, comma separated.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<u32>,
    /// Set no_new_privs (allowPrivilegeEscalation: false).
    #[arg(long)]
    no_new_privs: bool,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let request = ExecRequest {
        root: args.root,
        workdir: args.workdir,
        uid: args.uid,
        gid: args.gid,
        groups: args.groups,
        no_new_privs: args.no_new_privs,
        argv: args.argv,
    };
    let Err(e) = container_exec::exec(&request);
    eprintln!("container-exec: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        eprintln!("  caused by: {s}");
        source = s.source();
    }
    ExitCode::from(e.exit_code())
}
