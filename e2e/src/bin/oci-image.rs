//! `oci-image`: writes kubemail's OCI image archives (`make images`) from a cargo release
//! directory. Prints one line per image.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kubemail_e2e::image_build::{self, BuildInfo};
use kubemail_e2e::local_env::workspace_root;

/// Builds the operator and SMTP node images as oci-archive tarballs, reproducibly.
#[derive(Debug, Parser)]
#[command(name = "oci-image", version)]
struct Args {
    /// Cargo's release directory holding `kubemail-operator` and `smtp-node`.
    #[arg(long, env = "KUBEMAIL_RELEASE_DIR")]
    release_dir: PathBuf,
    /// Where `operator.tar` and `smtp-node.tar` go (the node agent's image store).
    #[arg(long, env = "KUBEMAIL_IMAGES_DIR")]
    out_dir: PathBuf,
    /// Git checkout the binaries were built from (revision and commit time for the tags).
    #[arg(long, env = "KUBEMAIL_SOURCE_DIR")]
    source_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let source = args.source_dir.unwrap_or_else(workspace_root);
    let result = BuildInfo::from_git(&source, env!("CARGO_PKG_VERSION"))
        .and_then(|info| image_build::build_all(&args.release_dir, &args.out_dir, &info));
    match result {
        Ok(images) => {
            for image in images {
                println!(
                    "{} {} ({}, {:.1} MiB, {})",
                    image.names.join(" "),
                    image.archive.display(),
                    image.digest,
                    image.size as f64 / (1024.0 * 1024.0),
                    if image.written {
                        "written"
                    } else {
                        "unchanged"
                    }
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("oci-image: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}
