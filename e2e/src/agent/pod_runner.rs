//! One task per pod bound to this node: it assigns the pod's address, materialises its volumes,
//! runs init containers in order and then every container as a process, restarts exited
//! containers per `restartPolicy` with a doubling backoff, runs probes, reports status through
//! the status subresource, and on deletion stops the processes (SIGTERM to the process group,
//! up to the grace period, then SIGKILL) and finalises the delete with `gracePeriodSeconds=0`,
//! because there is no kubelet to do it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod, PodStatus};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::Context;
use super::env::{self, EnvInputs};
use super::identity;
use super::image::{self, ContainerImage};
use super::objects::{self, PodObjects, TokenCache};
use super::probes::{self, ProbeKind, ProbeReport, ProbeTarget};
use super::process::{self, ContainerTag, LaunchSpec, ProcessExit, RootSpec};
use super::status::{self, ContainerView, PodView, RunState, Termination};
use super::volumes::{self, VolumeInputs, VolumePlan};

/// First restart delay after a crash; doubles per crash up to [`MAX_BACKOFF`]. The kubelet
/// uses 10 s → 5 min; a test cluster wants crashes retried quickly.
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A container that ran this long before exiting starts over at the initial backoff.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);
/// Retry delay when volumes or env could not be prepared (missing ConfigMap, API error).
const PREPARE_RETRY: Duration = Duration::from_secs(2);
/// How often ConfigMap/Secret/token volumes are refreshed, like the kubelet's periodic sync.
const VOLUME_REFRESH: Duration = Duration::from_secs(30);
/// The API default for `terminationGracePeriodSeconds`.
const DEFAULT_GRACE_SECONDS: i64 = 30;
/// After SIGKILL, how long to wait for the exit to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Bound on every status patch and delete call.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// The latest state of a pod, from the watch.
#[derive(Debug, Clone)]
pub(crate) enum PodUpdate {
    Latest(Arc<Pod>),
    /// The pod object no longer exists.
    Gone,
}

/// Why a pod worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WorkerExit {
    /// The pod was deleted and the agent removed it from the API.
    Finalized,
    /// The pod object disappeared.
    Gone,
    /// The agent is shutting down.
    Shutdown,
}

/// Runs pod `pod` until it is deleted, disappears or the agent stops.
pub(crate) async fn run_pod_worker(
    ctx: Arc<Context>,
    pod: Arc<Pod>,
    mut updates: watch::Receiver<PodUpdate>,
    cancel: CancellationToken,
) -> WorkerExit {
    let (exits_tx, mut exits) = mpsc::unbounded_channel();
    let (probes_tx, mut probe_reports) = mpsc::unbounded_channel();
    let mut w = PodWorker::new(ctx, pod, exits_tx, probes_tx);
    tracing::debug!(pod = %w.key(), "pod worker started");

    if w.pod.metadata.deletion_timestamp.is_some() {
        return w.finalize(&mut exits).await;
    }
    let previous_phase = w
        .pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    w.active = !status::is_terminal(&previous_phase);
    if w.active {
        w.begin().await;
    }

    loop {
        w.sync_status().await;
        let wake = w.next_wakeup();
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                w.shutdown(&mut exits).await;
                return WorkerExit::Shutdown;
            }
            changed = updates.changed() => {
                if changed.is_err() {
                    w.shutdown(&mut exits).await;
                    return WorkerExit::Shutdown;
                }
                let update = updates.borrow_and_update().clone();
                match update {
                    PodUpdate::Latest(pod) => {
                        w.pod = pod;
                        if w.pod.metadata.deletion_timestamp.is_some() {
                            return w.finalize(&mut exits).await;
                        }
                    }
                    PodUpdate::Gone => {
                        w.gone(&mut exits).await;
                        return WorkerExit::Gone;
                    }
                }
            }
            Some(exit) = exits.recv() => w.on_exit(exit),
            Some(report) = probe_reports.recv() => w.on_probe(report),
            _ = tokio::time::sleep_until(wake.into()) => w.on_timer().await,
        }
    }
}

/// One container of the pod and what the agent knows about its current run.
struct Slot {
    spec: Container,
    init: bool,
    index: usize,
    state: RunState,
    last_termination: Option<Termination>,
    restart_count: i32,
    /// Whether the previous agent instance ran it (its restart count goes up on the next start).
    ran_before: bool,
    ready: bool,
    started: bool,
    generation: u64,
    probe_cancel: Option<CancellationToken>,
    restart_at: Option<Instant>,
    backoff: Duration,
    kill_deadline: Option<Instant>,
    started_instant: Option<Instant>,
    env: Vec<(String, String)>,
    /// uid and gid of a container from an image (for exec probes).
    run_as: Option<(u32, u32)>,
    /// Finished for good (completed init container, or not restarted by policy).
    done: bool,
}

impl Slot {
    fn new(spec: &Container, init: bool, index: usize, previous: Option<&PodStatus>) -> Self {
        let prev = previous
            .and_then(|s| {
                if init {
                    s.init_container_statuses.as_ref()
                } else {
                    s.container_statuses.as_ref()
                }
            })
            .and_then(|list| list.iter().find(|c| c.name == spec.name));
        Slot {
            spec: spec.clone(),
            init,
            index,
            state: RunState::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            },
            last_termination: None,
            restart_count: prev.map_or(0, |p| p.restart_count),
            ran_before: prev.is_some_and(|p| p.container_id.is_some()),
            ready: false,
            started: false,
            generation: 0,
            probe_cancel: None,
            restart_at: None,
            backoff: INITIAL_BACKOFF,
            kill_deadline: None,
            started_instant: None,
            env: Vec::new(),
            run_as: None,
            done: false,
        }
    }

    fn running_pid(&self) -> Option<u32> {
        match self.state {
            RunState::Running { pid, .. } => Some(pid),
            _ => None,
        }
    }

    /// Never started in this worker and not scheduled for a restart.
    fn pending(&self) -> bool {
        !self.done && self.restart_at.is_none() && matches!(self.state, RunState::Waiting { .. })
    }

    fn succeeded(&self) -> bool {
        matches!(&self.state, RunState::Terminated(t) if t.exit_code == 0)
    }

    fn tag(&self) -> ContainerTag {
        ContainerTag {
            init: self.init,
            index: self.index,
            generation: self.generation,
        }
    }

    fn view(&self) -> ContainerView {
        ContainerView {
            name: self.spec.name.clone(),
            image: self.spec.image.clone().unwrap_or_default(),
            state: self.state.clone(),
            last_termination: self.last_termination.clone(),
            restart_count: self.restart_count,
            ready: self.ready,
            started: self.started,
        }
    }

    fn wait(&mut self, reason: &str, message: Option<String>) {
        self.state = RunState::Waiting {
            reason: reason.into(),
            message,
        };
    }
}

struct PodWorker {
    ctx: Arc<Context>,
    pod: Arc<Pod>,
    uid: String,
    namespace: String,
    name: String,
    /// Running (or to be run) by this worker; false for pods found already finished.
    active: bool,
    ip: Option<IpAddr>,
    init: Vec<Slot>,
    containers: Vec<Slot>,
    initialized: bool,
    sandbox_ready: bool,
    volume_dirs: HashMap<String, PathBuf>,
    objects: PodObjects,
    tokens: TokenCache,
    start_time: Option<Timestamp>,
    exits_tx: mpsc::UnboundedSender<ProcessExit>,
    probes_tx: mpsc::UnboundedSender<ProbeReport>,
    last_status: Option<PodStatus>,
    status_retry_at: Option<Instant>,
    prepare_retry_at: Option<Instant>,
    next_refresh: Option<Instant>,
    /// Something finished that lets more containers start (an init container completed).
    start_due: bool,
    stopping: bool,
}

impl PodWorker {
    fn new(
        ctx: Arc<Context>,
        pod: Arc<Pod>,
        exits_tx: mpsc::UnboundedSender<ProcessExit>,
        probes_tx: mpsc::UnboundedSender<ProbeReport>,
    ) -> Self {
        let spec = pod.spec.clone().unwrap_or_default();
        let previous = pod.status.as_ref();
        let init = spec
            .init_containers
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, c)| Slot::new(c, true, i, previous))
            .collect();
        let containers = spec
            .containers
            .iter()
            .enumerate()
            .map(|(i, c)| Slot::new(c, false, i, previous))
            .collect();
        PodWorker {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            ctx,
            pod,
            active: false,
            ip: None,
            init,
            containers,
            initialized: false,
            sandbox_ready: false,
            volume_dirs: HashMap::new(),
            objects: PodObjects::default(),
            tokens: TokenCache::default(),
            start_time: None,
            exits_tx,
            probes_tx,
            last_status: None,
            status_retry_at: None,
            prepare_retry_at: None,
            next_refresh: None,
            start_due: false,
            stopping: false,
        }
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn api(&self) -> Api<Pod> {
        Api::namespaced(self.ctx.client.clone(), &self.namespace)
    }

    fn pod_dir(&self) -> PathBuf {
        self.ctx.pod_dir(&self.uid)
    }

    /// First start of the pod in this agent instance.
    async fn begin(&mut self) {
        // Processes an earlier agent instance left behind (it was killed hard) go first.
        let dir = self.pod_dir();
        let killed = tokio::task::spawn_blocking(move || process::kill_leftovers(&dir))
            .await
            .unwrap_or(0);
        if killed > 0 {
            tracing::info!(pod = %self.key(), killed, "stopped processes of an earlier agent instance");
        }
        self.initialized = self.init.is_empty();
        self.start_time = Some(
            self.pod
                .status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .map_or_else(Timestamp::now, |t| t.0),
        );
        self.prepare_and_start().await;
    }

    /// Assigns the address, fetches objects, materialises volumes, then starts containers.
    async fn prepare_and_start(&mut self) {
        self.prepare_retry_at = None;
        if let Err(message) = self.prepare().await {
            tracing::warn!(pod = %self.key(), %message, "pod not ready to start containers; retrying");
            for slot in self
                .init
                .iter_mut()
                .chain(self.containers.iter_mut())
                .filter(|s| s.pending())
            {
                slot.wait("ContainerCreating", Some(message.clone()));
            }
            self.prepare_retry_at = Some(Instant::now() + PREPARE_RETRY);
            return;
        }
        self.sandbox_ready = true;
        self.next_refresh
            .get_or_insert_with(|| Instant::now() + VOLUME_REFRESH);
        self.start_pending().await;
    }

    async fn prepare(&mut self) -> Result<(), String> {
        if self.ip.is_none() {
            self.ip = Some(self.assign_ip()?);
        }
        self.refresh_objects().await?;
        self.materialise_volumes(false)
    }

    fn assign_ip(&self) -> Result<IpAddr, String> {
        if self.pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            return Ok(self.ctx.host_ip);
        }
        let mut pool = self
            .ctx
            .ip_pool
            .lock()
            .map_err(|_| "pod address pool poisoned".to_string())?;
        let previous = self
            .pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        if let Some(ip) = previous
            && pool.reserve(&self.uid, ip)
        {
            return Ok(IpAddr::V4(ip));
        }
        pool.allocate(&self.uid)
            .map(IpAddr::V4)
            .map_err(|e| e.to_string())
    }

    async fn refresh_objects(&mut self) -> Result<(), String> {
        let refs = objects::references(&self.pod);
        let fetched = objects::fetch(&self.ctx.client, &self.pod, &refs, &mut self.tokens)
            .await
            .map_err(|e| error_chain(&e))?;
        self.objects = fetched;
        Ok(())
    }

    /// Writes every volume; on a refresh only the file-backed ones (emptyDir keeps its data).
    fn materialise_volumes(&mut self, refresh: bool) -> Result<(), String> {
        let volumes = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        let inputs = VolumeInputs {
            pod: &self.pod,
            pod_ip: self.ip,
            host_ip: self.ctx.host_ip,
            allocatable: self.ctx.allocatable,
            objects: &self.objects,
        };
        let base = self.pod_dir().join("volumes");
        let fs_group = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref())
            .and_then(|c| c.fs_group)
            .and_then(|g| u32::try_from(g).ok());
        for v in &volumes {
            let plan = volumes::plan_volume(v, &inputs)
                .map_err(|e| format!("MountVolume.SetUp failed for volume {:?}: {e}", v.name))?;
            if refresh && !matches!(plan, VolumePlan::Files(_)) {
                continue;
            }
            let dir = volumes::materialise(&base.join(&v.name), &plan, fs_group)
                .map_err(|e| error_chain(&e))?;
            self.volume_dirs.insert(v.name.clone(), dir);
        }
        Ok(())
    }

    /// Starts whatever should run now: the next init container, or every pending container.
    async fn start_pending(&mut self) {
        if !self.sandbox_ready || self.stopping || !self.active {
            return;
        }
        if !self.initialized {
            match self.init.iter().position(|s| !s.succeeded()) {
                None => self.initialized = true,
                Some(i) => {
                    if self.init[i].pending() {
                        self.start_slot(true, i).await;
                    }
                    return;
                }
            }
        }
        for i in 0..self.containers.len() {
            if self.containers[i].pending() {
                self.start_slot(false, i).await;
            }
        }
    }

    async fn start_slot(&mut self, init: bool, index: usize) {
        let spec = {
            let slot = self.slot_mut(init, index);
            slot.restart_at = None;
            slot.spec.clone()
        };
        let launch = match self.container_image(&spec).await {
            Ok(image) => self.launch_spec(&spec, &image),
            Err(e) => Err(e),
        };
        let slot_generation;
        let result = match launch {
            Err((reason, message)) => Err((reason, message)),
            Ok(launch) => {
                let tag = {
                    let slot = self.slot_mut(init, index);
                    slot.generation += 1;
                    slot_generation = slot.generation;
                    slot.env = launch.env.clone();
                    slot.run_as = launch
                        .root
                        .as_ref()
                        .map(|r| (r.identity.uid, r.identity.gid));
                    ContainerTag {
                        init,
                        index,
                        generation: slot_generation,
                    }
                };
                process::launch(&self.ctx.tools, &launch, tag, self.exits_tx.clone())
                    .map_err(|e| ("RunContainerError", error_chain(&e)))
            }
        };
        match result {
            Err((reason, message)) => {
                tracing::warn!(pod = %self.key(), container = %spec.name, %reason, %message, "container not started");
                let slot = self.slot_mut(init, index);
                slot.wait(reason, Some(message));
                slot.restart_at = Some(Instant::now() + slot.backoff.max(PREPARE_RETRY));
                slot.backoff = (slot.backoff * 2).min(MAX_BACKOFF);
            }
            Ok(launched) => {
                tracing::info!(pod = %self.key(), container = %spec.name, pid = launched.pid, ip = ?self.ip, "container started");
                let ip = self.ip.unwrap_or(self.ctx.host_ip);
                let nsenter = self.ctx.tools.nsenter.clone();
                let probes_tx = self.probes_tx.clone();
                let slot = self.slot_mut(init, index);
                if slot.ran_before || slot.last_termination.is_some() {
                    slot.restart_count += 1;
                }
                slot.ran_before = false;
                slot.state = RunState::Running {
                    pid: launched.pid,
                    started_at: launched.started_at,
                };
                slot.started_instant = Some(Instant::now());
                slot.ready = false;
                slot.started = false;
                slot.kill_deadline = None;
                let cancel = CancellationToken::new();
                slot.probe_cancel = Some(cancel.clone());
                let target = ProbeTarget {
                    ip,
                    named_ports: probes::named_ports(&slot.spec),
                    pid: launched.pid,
                    env: slot.env.clone(),
                    nsenter,
                    run_as: slot.run_as,
                };
                if init {
                    // Init containers have no probes; they just have to finish.
                    slot.started = true;
                    return;
                }
                let probes = probes::container_probes(&slot.spec);
                match probes.iter().find(|(k, _)| *k == ProbeKind::Startup) {
                    Some((_, p)) => {
                        probes::spawn_probe_loop(
                            ProbeKind::Startup,
                            p.clone(),
                            target,
                            slot.tag(),
                            probes_tx,
                            cancel,
                        );
                    }
                    None => {
                        slot.started = true;
                        slot.ready = slot.spec.readiness_probe.is_none();
                        spawn_post_startup_probes(slot, target, probes_tx, cancel);
                    }
                }
            }
        }
    }

    /// Where `spec`'s program comes from: the developer's image map first (it is only set when
    /// asked for), then the image store (unpacking the image the first time), else the host.
    async fn container_image(
        &self,
        spec: &Container,
    ) -> Result<ContainerImage, (&'static str, String)> {
        let name = spec.image.clone().unwrap_or_default();
        if let Some(binary) = self.ctx.images.lookup(&name) {
            return Ok(ContainerImage::Mapped(binary.to_path_buf()));
        }
        let Some(store) = self.ctx.store.clone() else {
            return Ok(ContainerImage::Host);
        };
        let key = self.key();
        let lookup = tokio::task::spawn_blocking(move || {
            let Some(hit) = store.find(&name)? else {
                return Ok(None);
            };
            if !hit.exact {
                tracing::info!(pod = %key, image = %name, using = %hit.reference,
                    "tag not in the image store; using the local build of that repository");
            }
            store.unpacked(&hit).map(Some)
        })
        .await
        .map_err(|e| ("ErrImagePull", format!("image store task failed: {e}")))?;
        match lookup {
            Ok(Some(unpacked)) => Ok(ContainerImage::Store(unpacked)),
            Ok(None) => Ok(ContainerImage::Host),
            Err(e) => Err(("ErrImagePull", error_chain(&e))),
        }
    }

    /// Env, argv and mounts for `spec`, or the waiting reason and message.
    fn launch_spec(
        &self,
        spec: &Container,
        image: &ContainerImage,
    ) -> Result<LaunchSpec, (&'static str, String)> {
        let config_err = |message: String| ("CreateContainerConfigError", message);
        let host_base;
        let image_base;
        let base: &[(String, String)] = match image {
            ContainerImage::Store(unpacked) => {
                image_base = unpacked.config.env_pairs();
                &image_base
            }
            ContainerImage::Mapped(_) | ContainerImage::Host => {
                host_base = vec![
                    ("PATH".to_string(), self.ctx.path_var.clone()),
                    ("HOME".to_string(), self.ctx.home.clone()),
                ];
                &host_base
            }
        };
        let inputs = EnvInputs {
            pod: &self.pod,
            pod_ip: self.ip,
            host_ip: self.ctx.host_ip,
            api_server_host: &self.ctx.api_server_host,
            api_server_port: self.ctx.api_server_port,
            base,
            allocatable: self.ctx.allocatable,
            objects: &self.objects,
        };
        let mut env = env::container_env(spec, &inputs).map_err(|e| config_err(e.to_string()))?;
        let argv = image::container_argv(spec, image, |s| env.expand(s))
            .map_err(|e| ("CreateContainerError", e.to_string()))?;
        let mut mounts = volumes::container_mounts(spec, &self.volume_dirs, &env)
            .map_err(|e| config_err(error_chain(&e)))?;
        let hostname = env::hostname(&self.pod);
        let (root, working_dir) = match image {
            ContainerImage::Store(unpacked) => {
                let pod_sc = self
                    .pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.security_context.as_ref());
                let identity = identity::resolve(
                    unpacked.config.user.as_deref(),
                    &unpacked.read_file("/etc/passwd"),
                    &unpacked.read_file("/etc/group"),
                    pod_sc,
                    spec.security_context.as_ref(),
                )
                .map_err(|e| config_err(e.to_string()))?;
                // The runtime sets HOME from the image's passwd when nobody else did.
                if env.get("HOME").is_none() {
                    env.set("HOME", identity.home.clone());
                }
                // First, so a volume the pod mounts over /etc hides them rather than
                // receiving them.
                let etc = self.etc_files(&hostname).map_err(config_err)?;
                mounts.splice(0..0, etc);
                let working_dir = spec
                    .working_dir
                    .clone()
                    .filter(|w| !w.is_empty())
                    .or_else(|| unpacked.config.working_dir.clone())
                    .filter(|w| !w.is_empty())
                    .unwrap_or_else(|| "/".to_string());
                let root = RootSpec {
                    image_rootfs: unpacked.rootfs.clone(),
                    read_only: spec
                        .security_context
                        .as_ref()
                        .and_then(|c| c.read_only_root_filesystem)
                        == Some(true),
                    identity,
                    exec_helper: self.ctx.container_exec.clone(),
                };
                (Some(root), Some(working_dir))
            }
            ContainerImage::Mapped(_) | ContainerImage::Host => (None, spec.working_dir.clone()),
        };
        Ok(LaunchSpec {
            argv,
            env: env.vars().to_vec(),
            mounts,
            working_dir,
            hostname,
            mask_dirs: self.ctx.mask_dirs.clone(),
            log_path: self
                .ctx
                .log_dir(&self.namespace, &self.name)
                .join(format!("{}.log", spec.name)),
            pid_path: self.pod_dir().join(format!("{}.pid", spec.name)),
            root,
        })
    }

    /// `/etc/hosts`, `/etc/hostname` and `/etc/resolv.conf` for a container with a root of its
    /// own, as the kubelet provides them: a hosts file naming the pod's address, and the
    /// host's resolver configuration (there is no cluster DNS here).
    fn etc_files(&self, hostname: &str) -> Result<Vec<volumes::BindMount>, String> {
        let dir = self.pod_dir().join("etc");
        let ip = self.ip.unwrap_or(self.ctx.host_ip);
        let hosts = format!(
            "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{hostname}\n"
        );
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let files = [
            ("hosts", hosts),
            ("hostname", format!("{hostname}\n")),
            ("resolv.conf", resolv),
        ];
        let write_err = |e: std::io::Error| format!("write {}: {e}", dir.display());
        std::fs::create_dir_all(&dir).map_err(write_err)?;
        let mut mounts = Vec::new();
        for (name, contents) in files {
            let path = dir.join(name);
            if std::fs::read_to_string(&path).ok().as_deref() != Some(contents.as_str()) {
                std::fs::write(&path, &contents).map_err(write_err)?;
            }
            mounts.push(volumes::BindMount {
                source: path,
                target: format!("/etc/{name}"),
                read_only: false,
                is_file: true,
            });
        }
        Ok(mounts)
    }

    fn slot_mut(&mut self, init: bool, index: usize) -> &mut Slot {
        if init {
            &mut self.init[index]
        } else {
            &mut self.containers[index]
        }
    }

    fn slot_for(&mut self, tag: ContainerTag) -> Option<&mut Slot> {
        let list = if tag.init {
            &mut self.init
        } else {
            &mut self.containers
        };
        list.get_mut(tag.index)
            .filter(|s| s.generation == tag.generation)
    }

    fn on_exit(&mut self, exit: ProcessExit) {
        let stopping = self.stopping;
        let policy = status::restart_policy(&self.pod).to_string();
        let key = self.key();
        let Some(slot) = self.slot_for(exit.tag) else {
            return;
        };
        if slot.running_pid() != Some(exit.pid) {
            return;
        }
        if let Some(c) = slot.probe_cancel.take() {
            c.cancel();
        }
        let started_at = match slot.state {
            RunState::Running { started_at, .. } => Some(started_at),
            _ => None,
        };
        let termination = Termination {
            exit_code: exit.exit_code,
            signal: exit.signal,
            reason: if exit.exit_code == 0 {
                "Completed"
            } else {
                "Error"
            }
            .into(),
            message: None,
            started_at,
            finished_at: exit.finished_at,
            pid: Some(exit.pid),
        };
        tracing::info!(pod = %key, container = %slot.spec.name, pid = exit.pid, code = exit.exit_code, "container exited");
        slot.ready = false;
        slot.started = false;
        slot.kill_deadline = None;
        let restart = !stopping
            && if slot.init {
                // A failed init container is retried unless the pod never restarts anything.
                exit.exit_code != 0 && policy != "Never"
            } else {
                match policy.as_str() {
                    "Always" => true,
                    "OnFailure" => exit.exit_code != 0,
                    _ => false,
                }
            };
        if restart {
            if slot
                .started_instant
                .is_some_and(|t| t.elapsed() >= BACKOFF_RESET_AFTER)
            {
                slot.backoff = INITIAL_BACKOFF;
            }
            slot.last_termination = Some(termination);
            slot.wait(
                "CrashLoopBackOff",
                Some(format!(
                    "back-off {}s restarting failed container",
                    slot.backoff.as_secs()
                )),
            );
            slot.restart_at = Some(Instant::now() + slot.backoff);
            slot.backoff = (slot.backoff * 2).min(MAX_BACKOFF);
        } else {
            slot.state = RunState::Terminated(termination);
            slot.done = true;
        }
        let init_done = exit.tag.init && exit.exit_code == 0;
        if self.phase_is_terminal() {
            self.release_ip();
        }
        if init_done {
            // The next init container (or the app containers) start on the next timer tick.
            self.start_due = true;
        }
    }

    fn on_probe(&mut self, report: ProbeReport) {
        let key = self.key();
        let grace = self.grace_seconds(None);
        let probes_tx = self.probes_tx.clone();
        let ip = self.ip.unwrap_or(self.ctx.host_ip);
        let nsenter = self.ctx.tools.nsenter.clone();
        let Some(slot) = self.slot_for(report.tag) else {
            return;
        };
        let Some(pid) = slot.running_pid() else {
            return;
        };
        match (report.kind, report.healthy) {
            (ProbeKind::Readiness, ready) => slot.ready = ready,
            (ProbeKind::Startup, true) => {
                slot.started = true;
                slot.ready = slot.spec.readiness_probe.is_none();
                let target = ProbeTarget {
                    ip,
                    named_ports: probes::named_ports(&slot.spec),
                    pid,
                    env: slot.env.clone(),
                    nsenter,
                    run_as: slot.run_as,
                };
                if let Some(cancel) = slot.probe_cancel.clone() {
                    spawn_post_startup_probes(slot, target, probes_tx, cancel);
                }
            }
            (ProbeKind::Startup | ProbeKind::Liveness, false) => {
                tracing::info!(pod = %key, container = %slot.spec.name, kind = ?report.kind, message = %report.message,
                    "probe failed; killing container to restart it");
                let probe_grace = match report.kind {
                    ProbeKind::Startup => slot.spec.startup_probe.as_ref(),
                    _ => slot.spec.liveness_probe.as_ref(),
                }
                .and_then(|p| p.termination_grace_period_seconds);
                let grace = probe_grace.map_or(grace, |g| {
                    Duration::from_secs(u64::try_from(g).unwrap_or(0))
                });
                slot.ready = false;
                if let Some(c) = slot.probe_cancel.take() {
                    c.cancel();
                }
                process::signal_group(pid, Signal::SIGTERM);
                slot.kill_deadline = Some(Instant::now() + grace);
            }
            (ProbeKind::Liveness, true) => {}
        }
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        if self.prepare_retry_at.is_some_and(|t| t <= now) {
            self.prepare_and_start().await;
        }
        if std::mem::take(&mut self.start_due) {
            self.start_pending().await;
        }
        for slot in self.init.iter_mut().chain(self.containers.iter_mut()) {
            if slot.kill_deadline.is_some_and(|t| t <= now) {
                slot.kill_deadline = None;
                if let Some(pid) = slot.running_pid() {
                    process::signal_group(pid, Signal::SIGKILL);
                }
            }
        }
        let due: Vec<(bool, usize)> = self
            .init
            .iter()
            .chain(self.containers.iter())
            .filter(|s| !s.done && s.restart_at.is_some_and(|t| t <= now))
            .map(|s| (s.init, s.index))
            .collect();
        if !due.is_empty() {
            // A container that failed on config (missing key) may succeed with fresh objects.
            if let Err(message) = self.refresh_objects().await {
                tracing::warn!(pod = %self.key(), %message, "could not refresh pod objects");
            }
            for (init, index) in due {
                self.slot_mut(init, index).restart_at = None;
                if init && self.initialized {
                    continue;
                }
                self.start_slot(init, index).await;
            }
        }
        if self.next_refresh.is_some_and(|t| t <= now) {
            self.next_refresh = Some(now + VOLUME_REFRESH);
            if self.active && !self.phase_is_terminal() {
                let refreshed = match self.refresh_objects().await {
                    Ok(()) => self.materialise_volumes(true),
                    Err(e) => Err(e),
                };
                if let Err(message) = refreshed {
                    tracing::warn!(pod = %self.key(), %message, "volume refresh failed; keeping the previous contents");
                }
            }
        }
    }

    fn next_wakeup(&self) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let slots = self.init.iter().chain(self.containers.iter());
        slots
            .flat_map(|s| [s.restart_at, s.kill_deadline])
            .chain([
                self.prepare_retry_at,
                self.status_retry_at,
                self.next_refresh,
            ])
            .chain([self.start_due.then(Instant::now)])
            .flatten()
            .min()
            .unwrap_or(far)
            .min(far)
    }

    fn view(&self) -> PodView<'_> {
        PodView {
            pod: &self.pod,
            init_containers: self.init.iter().map(Slot::view).collect(),
            containers: self.containers.iter().map(Slot::view).collect(),
            sandbox_ready: self.sandbox_ready,
            initialized: self.initialized,
            pod_ip: self.ip.or_else(|| {
                self.pod
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ip.as_deref())
                    .and_then(|ip| ip.parse().ok())
            }),
            host_ip: self.ctx.host_ip,
            start_time: self.start_time,
        }
    }

    fn phase_is_terminal(&self) -> bool {
        status::is_terminal(status::pod_phase(&self.view()))
    }

    /// Patches the pod status when it differs from what was last written.
    async fn sync_status(&mut self) {
        if !self.active || self.pod.metadata.deletion_timestamp.is_some() {
            return;
        }
        if self.status_retry_at.is_some_and(|t| t > Instant::now()) {
            return;
        }
        self.status_retry_at = None;
        let previous = self.previous_status();
        let status = status::build_status(&self.view(), Some(&previous), Timestamp::now());
        if self.last_status.as_ref() == Some(&status) {
            return;
        }
        let patch = serde_json::json!({ "status": status });
        let api = self.api();
        let params = PatchParams::default();
        let patch = Patch::Merge(&patch);
        let call = api.patch_status(&self.name, &params, &patch);
        match tokio::time::timeout(API_TIMEOUT, call).await {
            Ok(Ok(_)) => self.last_status = Some(status),
            Ok(Err(kube::Error::Api(s))) if s.code == 404 => {
                // The pod is gone; the watch will say so.
                self.last_status = Some(status);
            }
            Ok(Err(e)) => {
                tracing::warn!(pod = %self.key(), error = %error_chain(&e), "pod status patch failed; retrying");
                self.status_retry_at = Some(Instant::now() + Duration::from_secs(1));
            }
            Err(_) => {
                tracing::warn!(pod = %self.key(), "pod status patch timed out; retrying");
                self.status_retry_at = Some(Instant::now() + Duration::from_secs(1));
            }
        }
    }

    /// Our conditions as last written (their transition times) plus everyone else's from the
    /// latest pod object.
    fn previous_status(&self) -> PodStatus {
        let from_api = self.pod.status.clone().unwrap_or_default();
        let Some(ours) = &self.last_status else {
            return from_api;
        };
        let mut conditions = ours.conditions.clone().unwrap_or_default();
        let own: Vec<String> = conditions.iter().map(|c| c.type_.clone()).collect();
        conditions.extend(
            from_api
                .conditions
                .iter()
                .flatten()
                .filter(|c| !own.contains(&c.type_))
                .cloned(),
        );
        PodStatus {
            conditions: Some(conditions),
            ..from_api
        }
    }

    fn grace_seconds(&self, cap: Option<Duration>) -> Duration {
        let secs = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(DEFAULT_GRACE_SECONDS);
        let grace = Duration::from_secs(u64::try_from(secs).unwrap_or(0));
        cap.map_or(grace, |c| grace.min(c))
    }

    /// SIGTERM every running container's process group, wait up to `grace`, then SIGKILL.
    async fn stop_all(
        &mut self,
        grace: Duration,
        exits: &mut mpsc::UnboundedReceiver<ProcessExit>,
    ) {
        self.stopping = true;
        self.prepare_retry_at = None;
        self.next_refresh = None;
        for slot in self.init.iter_mut().chain(self.containers.iter_mut()) {
            slot.restart_at = None;
            slot.kill_deadline = None;
            if let Some(c) = slot.probe_cancel.take() {
                c.cancel();
            }
            if let Some(pid) = slot.running_pid() {
                tracing::info!(pod = %format!("{}/{}", self.namespace, self.name), container = %slot.spec.name, pid,
                    "stopping container");
                process::signal_group(pid, Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        self.await_exits(deadline, exits).await;
        let mut killed = false;
        for slot in self.init.iter().chain(self.containers.iter()) {
            if let Some(pid) = slot.running_pid() {
                process::signal_group(pid, Signal::SIGKILL);
                killed = true;
            }
        }
        if killed {
            self.await_exits(Instant::now() + KILL_WAIT, exits).await;
        }
    }

    async fn await_exits(
        &mut self,
        deadline: Instant,
        exits: &mut mpsc::UnboundedReceiver<ProcessExit>,
    ) {
        while self
            .init
            .iter()
            .chain(self.containers.iter())
            .any(|s| s.running_pid().is_some())
        {
            match tokio::time::timeout_at(deadline.into(), exits.recv()).await {
                Ok(Some(exit)) => self.on_exit(exit),
                Ok(None) | Err(_) => break,
            }
        }
    }

    /// The pod has a deletionTimestamp: stop it and remove it from the API.
    async fn finalize(&mut self, exits: &mut mpsc::UnboundedReceiver<ProcessExit>) -> WorkerExit {
        let grace = self.grace_seconds(None);
        tracing::info!(pod = %self.key(), grace_s = grace.as_secs(), "pod deleted; stopping it");
        self.stop_all(grace, exits).await;
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        let mut delay = Duration::from_millis(200);
        for attempt in 1.. {
            match tokio::time::timeout(API_TIMEOUT, self.api().delete(&self.name, &params)).await {
                Ok(Ok(_)) => break,
                // Gone already, or a new pod of the same name (uid precondition failed).
                Ok(Err(kube::Error::Api(s))) if s.code == 404 || s.code == 409 => break,
                Ok(Err(e)) => {
                    tracing::warn!(pod = %self.key(), attempt, error = %error_chain(&e), "finalising delete failed")
                }
                Err(_) => tracing::warn!(pod = %self.key(), attempt, "finalising delete timed out"),
            }
            if attempt >= 30 {
                tracing::error!(pod = %self.key(), "giving up finalising the delete");
                break;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        self.cleanup();
        tracing::info!(pod = %self.key(), "pod finalised");
        WorkerExit::Finalized
    }

    /// The pod object vanished without passing through us.
    async fn gone(&mut self, exits: &mut mpsc::UnboundedReceiver<ProcessExit>) {
        let grace = self.grace_seconds(Some(self.ctx.max_shutdown_grace));
        self.stop_all(grace, exits).await;
        self.cleanup();
    }

    /// The agent stops: stop the processes and say so in the status, briefly.
    async fn shutdown(&mut self, exits: &mut mpsc::UnboundedReceiver<ProcessExit>) {
        let was_running = self
            .init
            .iter()
            .chain(self.containers.iter())
            .any(|s| s.running_pid().is_some());
        let grace = self.grace_seconds(Some(self.ctx.max_shutdown_grace));
        self.stop_all(grace, exits).await;
        if was_running {
            self.status_retry_at = None;
            let _ = tokio::time::timeout(Duration::from_secs(2), self.sync_status()).await;
        }
        self.release_ip();
    }

    fn release_ip(&mut self) {
        if let Ok(mut pool) = self.ctx.ip_pool.lock() {
            pool.release(&self.uid);
        }
    }

    fn cleanup(&mut self) {
        self.release_ip();
        let dir = self.pod_dir();
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove pod state");
        }
    }
}

/// Readiness and liveness loops, once the container counts as started.
fn spawn_post_startup_probes(
    slot: &Slot,
    target: ProbeTarget,
    reports: mpsc::UnboundedSender<ProbeReport>,
    cancel: CancellationToken,
) {
    for (kind, probe) in probes::container_probes(&slot.spec) {
        if kind != ProbeKind::Startup {
            probes::spawn_probe_loop(
                kind,
                probe,
                target.clone(),
                slot.tag(),
                reports.clone(),
                cancel.clone(),
            );
        }
    }
}

/// An error with its sources, for status messages and logs.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
