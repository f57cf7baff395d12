//! `crdgen`: prints the MailDomain and Relay CRDs as one multi-document YAML stream, or with
//! `--out-dir DIR` writes one file per CRD (`crds/` in the repository).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Generate the kubemail CRDs from the Rust types.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Write `<plural>.<group>.yaml` files into this directory instead of printing.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rendered = match kubemail_operator::crd::render_crds() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot render the CRDs: {e}");
            return ExitCode::FAILURE;
        }
    };
    match args.out_dir {
        Some(dir) => {
            for (file, yaml) in rendered {
                let path = dir.join(file);
                if let Err(e) = std::fs::write(&path, yaml) {
                    eprintln!("error: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                println!("wrote {}", path.display());
            }
        }
        None => {
            for (_, yaml) in rendered {
                print!("---\n{yaml}");
            }
        }
    }
    ExitCode::SUCCESS
}
