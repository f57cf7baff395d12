//! The node agent, a test-only "process kubelet": it registers a Node, binds pending pods to it
//! (there is no kube-scheduler), and runs every container of every pod bound to it as a local
//! process with the pod's env, volumes (bind-mounted in a private mount namespace) and its own
//! loopback address, reporting status like a kubelet. Containers whose image is in the local
//! image store ([`image_store`], what `make images` writes) run inside that image's root
//! filesystem as the image's (or the pod's) user; other images run their command from the host.
//! This module owns the run loop: the pod watch, one [`pod_runner`] task per pod, the node
//! heartbeat, the readiness file and shutdown.

pub mod binding;
pub mod container_exec;
pub mod env;
pub mod identity;
pub mod image;
pub mod image_store;
pub mod ip_pool;
pub mod node;
pub mod objects;
pub mod pod_runner;
pub mod probes;
pub mod process;
pub mod status;
pub mod volumes;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Config};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::env::Allocatable;
use self::image::ImageMap;
use self::image_store::ImageStore;
use self::ip_pool::{IpPool, LoopbackRange};
use self::pod_runner::{PodUpdate, WorkerExit};
use self::process::HostTools;

/// Name of the file written into the state directory once the Node is registered and the pod
/// watch has listed every pod (what `e2e/local-cluster` waits for).
pub const READY_FILE: &str = "ready";
/// Pod state lives under `<state-dir>/pods/`: `<uid>/` (volumes, pid records) and
/// `<namespace>_<name>/` (container logs).
pub const PODS_DIR: &str = "pods";
/// Extra time on top of the pod grace periods for all workers to finish at shutdown.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(10);

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("read kubeconfig {path}")]
    ReadKubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("load client configuration")]
    LoadConfig(#[source] kube::config::KubeconfigError),
    #[error("infer client configuration")]
    InferConfig(#[source] kube::config::InferConfigError),
    #[error("create API client")]
    CreateClient(#[source] kube::Error),
    #[error("API server URL {url} has no host or port; pass --api-server-host/--api-server-port")]
    ApiServerAddress { url: String },
    #[error("create state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("find host tools")]
    HostTools(#[source] process::ProcessError),
    #[error(
        "container-exec helper {path} not found (build it: cargo build -p kubemail-e2e --bin container-exec)"
    )]
    ContainerExecMissing { path: PathBuf },
    #[error("read the image store")]
    ImageStore(#[source] image_store::StoreError),
    #[error("register the node")]
    RegisterNode(#[source] node::NodeError),
    #[error("the pod watch ended")]
    WatchEnded,
}

/// What the agent runs with (the CLI maps onto this).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Kubeconfig file; `None`: `KUBECONFIG`, `~/.kube/config`, then in-cluster.
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    pub state_dir: PathBuf,
    /// What pods get as `KUBERNETES_SERVICE_HOST`/`_PORT`; default: from the kubeconfig URL.
    pub api_server_host: Option<String>,
    pub api_server_port: Option<u16>,
    /// Developer shortcut: images run as these host binaries (empty unless asked for).
    pub image_map: ImageMap,
    /// Directory of OCI image archives containers run from (`make images` output).
    pub image_store: Option<PathBuf>,
    /// Where unpacked image roots are kept; default `<state-dir>/images`.
    pub image_cache: Option<PathBuf>,
    /// The `container-exec` helper; default: next to the running executable.
    pub container_exec: Option<PathBuf>,
    pub pod_ip_range: LoopbackRange,
    /// Upper bound on each pod's grace period when the agent itself stops.
    pub max_shutdown_grace: Duration,
}

/// Shared by the run loop and every pod worker.
pub(crate) struct Context {
    pub client: Client,
    pub node_name: String,
    pub state_dir: PathBuf,
    pub api_server_host: String,
    pub api_server_port: u16,
    pub images: ImageMap,
    pub store: Option<Arc<ImageStore>>,
    pub container_exec: PathBuf,
    pub ip_pool: Mutex<IpPool>,
    pub host_ip: IpAddr,
    pub tools: HostTools,
    pub path_var: String,
    pub home: String,
    pub allocatable: Allocatable,
    pub max_shutdown_grace: Duration,
    pub mask_dirs: Vec<PathBuf>,
}

impl Context {
    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.state_dir.join(PODS_DIR).join(uid)
    }

    pub fn log_dir(&self, namespace: &str, name: &str) -> PathBuf {
        log_dir(&self.state_dir, namespace, name)
    }
}

/// Where the logs of pod `namespace/name` go: `<state-dir>/pods/<namespace>_<name>/`.
pub fn log_dir(state_dir: &Path, namespace: &str, name: &str) -> PathBuf {
    state_dir.join(PODS_DIR).join(format!("{namespace}_{name}"))
}

/// Runs the agent until `shutdown` fires, then stops every pod process and returns.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let state_dir = absolute(&config.state_dir);
    let state_err = |source| AgentError::StateDir {
        path: state_dir.clone(),
        source,
    };
    std::fs::create_dir_all(state_dir.join(PODS_DIR)).map_err(state_err)?;
    let ready_file = state_dir.join(READY_FILE);
    let _ = std::fs::remove_file(&ready_file);

    let client_config = client_config(config.kubeconfig.as_deref()).await?;
    let (url_host, url_port) = (
        client_config
            .cluster_url
            .host()
            .map(|h| h.trim_matches(['[', ']']).to_string()),
        client_config.cluster_url.port_u16().or(Some(443)),
    );
    let api_server_host = config.api_server_host.clone().or(url_host).ok_or_else(|| {
        AgentError::ApiServerAddress {
            url: client_config.cluster_url.to_string(),
        }
    })?;
    let api_server_port = config.api_server_port.or(url_port).unwrap_or(443);
    let client = Client::try_from(client_config).map_err(AgentError::CreateClient)?;

    let path_var = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let tools = HostTools::find(&path_var).map_err(AgentError::HostTools)?;
    let container_exec = config
        .container_exec
        .clone()
        .unwrap_or_else(default_container_exec);
    let store = match &config.image_store {
        Some(dir) => {
            if !container_exec.is_file() {
                return Err(AgentError::ContainerExecMissing {
                    path: container_exec,
                });
            }
            let cache = config
                .image_cache
                .clone()
                .unwrap_or_else(|| state_dir.join("images"));
            let store = ImageStore::new(absolute(dir), absolute(&cache));
            let references = store.references().map_err(AgentError::ImageStore)?;
            tracing::info!(store = %store.dir().display(), images = ?references, "image store");
            Some(Arc::new(store))
        }
        None => None,
    };
    let host_ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let ctx = Arc::new(Context {
        client: client.clone(),
        node_name: config.node_name.clone(),
        state_dir: state_dir.clone(),
        api_server_host,
        api_server_port,
        images: config.image_map.clone(),
        store,
        container_exec,
        ip_pool: Mutex::new(IpPool::new(config.pod_ip_range)),
        host_ip,
        tools,
        mask_dirs: vec![Path::new(&home).join(".kube")],
        path_var,
        home,
        allocatable: node::host_allocatable(),
        max_shutdown_grace: config.max_shutdown_grace,
    });

    let store_dir = ctx.store.as_ref().map(|s| s.dir().to_path_buf());
    let since = node::register(
        &client,
        &config.node_name,
        host_ip,
        &state_dir,
        store_dir.as_deref(),
    )
    .await
    .map_err(AgentError::RegisterNode)?;
    tracing::info!(node = %config.node_name, state_dir = %state_dir.display(), api_server = %format!("{}:{}", ctx.api_server_host, ctx.api_server_port),
        pod_ip_range = %config.pod_ip_range, mapped_images = ctx.images.iter().count(), image_store = ctx.store.is_some(), "node registered");

    let tracker = TaskTracker::new();
    let workers_cancel = shutdown.child_token();
    let heartbeat_cancel = CancellationToken::new();
    // Outside the tracker: the node stays Ready while the workers stop their pods.
    let heartbeat = tokio::spawn(node::heartbeat(
        client.clone(),
        config.node_name.clone(),
        host_ip,
        since,
        heartbeat_cancel.clone(),
    ));

    let mut run_loop = RunLoop {
        ctx: ctx.clone(),
        tracker: tracker.clone(),
        workers_cancel: workers_cancel.clone(),
        workers: HashMap::new(),
        finalized: HashSet::new(),
        binding: Arc::new(Mutex::new(HashSet::new())),
        done_tx: mpsc::unbounded_channel().0,
        first_listing_done: false,
    };
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    run_loop.done_tx = done_tx;

    let pods: Api<Pod> = Api::all(client.clone());
    let mut events = watcher::watcher(pods, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listing: Option<Vec<Pod>> = None;
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some((uid, exit)) = done_rx.recv() => run_loop.worker_done(uid, exit),
            event = events.next() => match event {
                None => break Err(AgentError::WatchEnded),
                Some(Err(e)) => tracing::warn!(error = %pod_runner::error_chain(&e), "pod watch error; retrying"),
                Some(Ok(Event::Init)) => listing = Some(Vec::new()),
                Some(Ok(Event::InitApply(pod))) => listing.get_or_insert_with(Vec::new).push(pod),
                Some(Ok(Event::InitDone)) => {
                    run_loop.listed(listing.take().unwrap_or_default());
                    if !run_loop.first_listing_done {
                        run_loop.first_listing_done = true;
                        let content = format!("pid={}\nnode={}\n", std::process::id(), config.node_name);
                        if let Err(e) = std::fs::write(&ready_file, content) {
                            tracing::error!(path = %ready_file.display(), error = %e, "could not write the ready file");
                        }
                        tracing::info!("node agent ready");
                    }
                }
                Some(Ok(Event::Apply(pod))) => run_loop.apply(pod),
                Some(Ok(Event::Delete(pod))) => run_loop.delete(&pod),
            },
        }
    };

    tracing::info!(
        pods = run_loop.workers.len(),
        "node agent stopping; stopping pod processes"
    );
    let _ = std::fs::remove_file(&ready_file);
    workers_cancel.cancel();
    tracker.close();
    let wait_for = config.max_shutdown_grace + SHUTDOWN_SLACK;
    if tokio::time::timeout(wait_for, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some pod workers did not stop in time");
    }
    heartbeat_cancel.cancel();
    let _ = heartbeat.await;
    if let Err(e) = tokio::time::timeout(
        Duration::from_secs(3),
        node::mark_not_ready(&client, &config.node_name, host_ip),
    )
    .await
    .unwrap_or(Ok(()))
    {
        tracing::warn!(error = %pod_runner::error_chain(&e), "could not mark the node NotReady");
    }
    tracing::info!("node agent stopped");
    result
}

struct WorkerHandle {
    tx: watch::Sender<PodUpdate>,
}

struct RunLoop {
    ctx: Arc<Context>,
    tracker: TaskTracker,
    workers_cancel: CancellationToken,
    workers: HashMap<String, WorkerHandle>,
    /// Pods this agent already removed from the API; late watch events for them are ignored.
    finalized: HashSet<String>,
    /// Pods with a binding request in flight.
    binding: Arc<Mutex<HashSet<String>>>,
    done_tx: mpsc::UnboundedSender<(String, WorkerExit)>,
    first_listing_done: bool,
}

impl RunLoop {
    fn apply(&mut self, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let node_name = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .unwrap_or_default();
        if node_name.is_empty() {
            if binding::wants_binding(&pod) {
                self.bind(pod, uid);
            }
            return;
        }
        if node_name != self.ctx.node_name || self.finalized.contains(&uid) {
            return;
        }
        let pod = Arc::new(pod);
        if let Some(w) = self.workers.get(&uid) {
            // A closed channel means the worker is ending; its done message is on the way.
            let _ = w.tx.send(PodUpdate::Latest(pod));
            return;
        }
        let (tx, rx) = watch::channel(PodUpdate::Latest(pod.clone()));
        let ctx = self.ctx.clone();
        let cancel = self.workers_cancel.child_token();
        let done = self.done_tx.clone();
        let task_uid = uid.clone();
        self.tracker.spawn(async move {
            let exit = pod_runner::run_pod_worker(ctx, pod, rx, cancel).await;
            let _ = done.send((task_uid, exit));
        });
        self.workers.insert(uid, WorkerHandle { tx });
    }

    fn delete(&mut self, pod: &Pod) {
        let Some(uid) = pod.metadata.uid.as_deref() else {
            return;
        };
        self.finalized.remove(uid);
        if let Some(w) = self.workers.get(uid) {
            let _ = w.tx.send(PodUpdate::Gone);
        }
    }

    /// A complete listing (first start or after the watch was re-established).
    fn listed(&mut self, pods: Vec<Pod>) {
        let present: HashSet<String> = pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        for (uid, w) in &self.workers {
            if !present.contains(uid) {
                let _ = w.tx.send(PodUpdate::Gone);
            }
        }
        self.finalized.retain(|uid| present.contains(uid));
        // Pods that already had an address keep it: reserve them all before any new pod
        // gets one.
        if let Ok(mut pool) = self.ctx.ip_pool.lock() {
            for pod in pods.iter().filter(|p| self.is_ours(p)) {
                let active = !pod
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.as_deref())
                    .is_some_and(status::is_terminal);
                let ip = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ip.as_deref())
                    .and_then(|ip| ip.parse().ok());
                if let (true, Some(ip), Some(uid)) = (active, ip, pod.metadata.uid.as_deref()) {
                    pool.reserve(uid, ip);
                }
            }
        }
        if !self.first_listing_done {
            self.remove_stale_state(&present);
        }
        for pod in pods {
            self.apply(pod);
        }
    }

    fn is_ours(&self, pod: &Pod) -> bool {
        pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(self.ctx.node_name.as_str())
    }

    /// Pod directories (by uid) of pods that no longer exist: kill leftovers, remove them.
    fn remove_stale_state(&self, present: &HashSet<String>) {
        let Ok(entries) = std::fs::read_dir(self.ctx.state_dir.join(PODS_DIR)) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Log directories are `<namespace>_<name>`; uid directories have no underscore.
            if name.contains('_') || present.contains(&name) {
                continue;
            }
            let dir = entry.path();
            process::kill_leftovers(&dir);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove stale pod state");
            }
        }
    }

    fn bind(&self, pod: Pod, uid: String) {
        {
            let Ok(mut in_flight) = self.binding.lock() else {
                return;
            };
            if !in_flight.insert(uid.clone()) {
                return;
            }
        }
        let client = self.ctx.client.clone();
        let node = self.ctx.node_name.clone();
        let in_flight = self.binding.clone();
        let cancel = self.workers_cancel.clone();
        self.tracker.spawn(async move {
            let mut delay = Duration::from_millis(500);
            loop {
                match binding::bind(&client, &pod, &node).await {
                    Ok(()) => {
                        tracing::debug!(pod = ?pod.metadata.name, namespace = ?pod.metadata.namespace, "pod bound");
                        break;
                    }
                    Err(e) => tracing::warn!(error = %pod_runner::error_chain(&e), "binding failed; retrying"),
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            if let Ok(mut set) = in_flight.lock() {
                set.remove(&uid);
            }
        });
    }

    fn worker_done(&mut self, uid: String, exit: WorkerExit) {
        self.workers.remove(&uid);
        if exit == WorkerExit::Finalized {
            self.finalized.insert(uid);
        }
    }
}

async fn client_config(kubeconfig: Option<&Path>) -> Result<Config, AgentError> {
    match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| AgentError::ReadKubeconfig {
                path: path.to_path_buf(),
                source,
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(AgentError::LoadConfig)
        }
        None => Config::infer().await.map_err(AgentError::InferConfig),
    }
}

/// `container-exec` next to the running executable (cargo puts both bins in one directory).
fn default_container_exec() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("container-exec")))
        .unwrap_or_else(|| PathBuf::from("container-exec"))
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_or_else(|_| path.to_path_buf(), |cwd| cwd.join(path))
    }
}
