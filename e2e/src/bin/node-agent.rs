//! `node-agent`: the test-only "process kubelet" of kubemail's local cluster. Registers a Node,
//! binds pending pods to it and runs their containers as local processes (from the local image
//! store's root filesystems where it has the image) until SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use kubemail_e2e::agent::{self, AgentConfig, image::ImageMap, ip_pool};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Runs Kubernetes pods bound to one Node as local processes (test clusters only).
#[derive(Debug, Parser)]
#[command(name = "node-agent", version)]
struct Args {
    /// Kubeconfig of the cluster (default: KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Name of the Node this agent registers and runs pods for.
    #[arg(long, env = "KUBEMAIL_NODE_NAME", default_value = "local-node")]
    node_name: String,
    /// Directory for pod volumes, logs (`pods/<namespace>_<name>/<container>.log`), pid
    /// records and the `ready` file.
    #[arg(long, env = "KUBEMAIL_AGENT_STATE")]
    state_dir: PathBuf,
    /// KUBERNETES_SERVICE_HOST given to pods (default: the kubeconfig server's host).
    #[arg(long, env = "KUBEMAIL_API_SERVER_HOST")]
    api_server_host: Option<String>,
    /// KUBERNETES_SERVICE_PORT given to pods (default: the kubeconfig server's port).
    #[arg(long, env = "KUBEMAIL_API_SERVER_PORT")]
    api_server_port: Option<u16>,
    /// Directory of OCI image archives (`make images` output): containers of those images run
    /// inside the image's root filesystem. Other images run their command from the host.
    #[arg(long, env = "KUBEMAIL_IMAGE_STORE")]
    image_store: Option<PathBuf>,
    /// Where unpacked image roots are cached (default: <state-dir>/images).
    #[arg(long, env = "KUBEMAIL_IMAGE_CACHE")]
    image_cache: Option<PathBuf>,
    /// The container-exec helper (default: next to this executable).
    #[arg(long, env = "KUBEMAIL_CONTAINER_EXEC")]
    container_exec: Option<PathBuf>,
    /// Developer shortcut, off unless given: `image=path` runs containers of this image
    /// (repository, tag ignored) as the host binary at path instead of from the image store.
    /// Repeatable; the env var takes a comma-separated list.
    #[arg(long = "image-map", env = "KUBEMAIL_IMAGE_MAP", value_delimiter = ',')]
    image_map: Vec<String>,
    /// Loopback range pod addresses come from (one address per pod).
    #[arg(long, env = "KUBEMAIL_POD_IP_RANGE", default_value = ip_pool::DEFAULT_POD_RANGE)]
    pod_ip_range: ip_pool::LoopbackRange,
    /// Longest grace period a pod gets when the agent itself stops, in seconds.
    #[arg(long, env = "KUBEMAIL_AGENT_MAX_SHUTDOWN_GRACE", default_value_t = 10)]
    max_shutdown_grace_seconds: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    // Not `kube=warn`: filter targets match by prefix, and that would also silence
    // `kubemail_e2e`.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,kube_client=warn,kube_runtime=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let image_map = match ImageMap::from_entries(&args.image_map) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("node-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let config = AgentConfig {
        kubeconfig: args.kubeconfig,
        node_name: args.node_name,
        state_dir: args.state_dir,
        api_server_host: args.api_server_host,
        api_server_port: args.api_server_port,
        image_map,
        image_store: args.image_store,
        image_cache: args.image_cache,
        container_exec: args.container_exec,
        pod_ip_range: args.pod_ip_range,
        max_shutdown_grace: Duration::from_secs(args.max_shutdown_grace_seconds),
    };
    let shutdown = CancellationToken::new();
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("node-agent: install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        trigger.cancel();
    });
    match agent::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            tracing::error!("node-agent failed: {text}");
            ExitCode::FAILURE
        }
    }
}
