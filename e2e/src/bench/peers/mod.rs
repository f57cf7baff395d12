//! The processes a benchmark starts: the systems under test (kubemail = [`kubemail`] on
//! [`nats`]; a private [`postfix`] instance) and the [`sink`] relays deliver to. Each one runs
//! in its own directory on free loopback ports and is stopped when its handle is dropped, by
//! its own pid (SIGTERM, then SIGKILL after a grace period), even when a benchmark fails.
//! Everything running is also listed in a registry, so that an interrupted run (SIGINT,
//! SIGTERM) can stop it all with [`stop_all`] before exiting.

pub mod kubemail;
pub mod nats;
pub mod postfix;
pub mod sink;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a stopped process gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a server gets to start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Something this run started that must not outlive it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Live {
    /// A child process (stopped by pid).
    Child(u32),
    /// A Postfix instance (stopped with `postfix -c DIR stop`, then by pid).
    Postfix { conf_dir: PathBuf, master: u32 },
    /// A work directory to remove.
    Dir(PathBuf),
}

static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());

/// The CPUs (a `taskset -c` list) the servers under test are pinned to, when the run pins.
static SERVER_CPUS: OnceLock<String> = OnceLock::new();

/// Pins every server under test started from now on (smtp-node, nats-server, Postfix and
/// what its master forks) to `cpus`, a `taskset -c` list such as `"1"`.
pub fn pin_servers(cpus: String) {
    let _ = SERVER_CPUS.set(cpus);
}

/// The `cgroup.procs` file of the cgroup that servers under test start in, while the run
/// shares CPUs per cgroup ([`super::cgroups`]); `None` otherwise.
static SERVER_CGROUP: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Starts every server under test from now on inside the cgroup whose `cgroup.procs` file is
/// `procs` (`None`: where this process is).
pub fn servers_in_cgroup(procs: Option<PathBuf>) {
    if let Ok(mut g) = SERVER_CGROUP.lock() {
        *g = procs;
    }
}

/// A command that starts a server under test: under `taskset -c <cpus>` when the run pins
/// servers, and entering the servers' cgroup first when the run has one
/// ([`super::cgroups::command_in`]), else as is. Each step execs the next, so the pid is the
/// server's own, and whatever the server forks is in the same cgroup.
pub fn server_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    if let Some(cpus) = SERVER_CPUS.get() {
        argv.extend(["taskset".into(), "-c".into(), cpus.into()]);
    }
    argv.push(program.as_ref().to_owned());
    let cgroup = SERVER_CGROUP.lock().ok().and_then(|g| g.clone());
    let mut c = match cgroup {
        Some(procs) => super::cgroups::command_in(&procs),
        None => Command::new(argv.remove(0)),
    };
    c.args(argv);
    c
}

fn register(item: Live) {
    if let Ok(mut live) = LIVE.lock() {
        live.push(item);
    }
}

fn unregister(item: &Live) {
    if let Ok(mut live) = LIVE.lock() {
        live.retain(|l| l != item);
    }
}

/// Registers a work directory for removal by [`stop_all`].
pub fn register_dir(path: &Path) {
    register(Live::Dir(path.to_owned()));
}

/// Forgets a work directory (it was removed, or is to be kept).
pub fn unregister_dir(path: &Path) {
    unregister(&Live::Dir(path.to_owned()));
}

/// Stops every process this run started and removes its work directories: the cleanup of
/// an interrupted run. Blocking; call it just before exiting.
pub fn stop_all() {
    let items = LIVE
        .lock()
        .map(|mut l| std::mem::take(&mut *l))
        .unwrap_or_default();
    for item in items.iter().rev() {
        match item {
            Live::Child(pid) => {
                if let Ok(p) = i32::try_from(*pid) {
                    let _ = kill(Pid::from_raw(p), Signal::SIGTERM);
                }
            }
            Live::Postfix { conf_dir, master } => {
                postfix::stop_instance(conf_dir, *master);
            }
            Live::Dir(_) => {}
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    for item in &items {
        match item {
            Live::Child(pid) if pid_alive(*pid) => kill_pid(*pid),
            Live::Dir(path) => {
                let _ = std::fs::remove_dir_all(path);
            }
            _ => {}
        }
    }
}

/// Why a peer could not be set up or queried.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("`{tool}` not found ({hint})")]
    ToolMissing { tool: String, hint: &'static str },
    #[error("cannot write {path}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {what}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} did not start: {reason}")]
    NotReady { what: String, reason: String },
    #[error("{what} failed: {reason}")]
    Command { what: String, reason: String },
    #[error("cannot read the kubemail queue: {0}")]
    Queue(String),
}

/// Finds an executable on PATH, then in `extra_dirs`.
pub fn find_tool(
    name: &str,
    extra_dirs: &[&str],
    hint: &'static str,
) -> Result<PathBuf, PeerError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra_dirs.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| PeerError::ToolMissing {
            tool: name.to_owned(),
            hint,
        })
}

/// A free loopback port below the ephemeral range (see `kubemail_test_support::ports`), so
/// the peers' own outgoing connections cannot take it before the peer binds it.
pub fn free_port() -> Result<u16, PeerError> {
    Ok(kubemail_test_support::ports::free_port())
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Writes a file, naming it in the error.
pub fn write_file(path: &Path, contents: &str) -> Result<(), PeerError> {
    std::fs::write(path, contents).map_err(|source| PeerError::WriteFile {
        path: path.to_owned(),
        source,
    })
}

/// Creates a log file for a child's output.
pub fn log_file(path: &Path) -> Result<std::fs::File, PeerError> {
    std::fs::File::create(path).map_err(|source| PeerError::WriteFile {
        path: path.to_owned(),
        source,
    })
}

/// Creates a directory (and parents), naming it in the error.
pub fn create_dir(path: &Path) -> Result<(), PeerError> {
    std::fs::create_dir_all(path).map_err(|source| PeerError::WriteFile {
        path: path.to_owned(),
        source,
    })
}

/// Waits until something accepts connections on `port`, failing early if `child` exits.
pub fn wait_for_port(
    port: u16,
    what: &str,
    mut child: Option<&mut Child>,
    timeout: Duration,
) -> Result<(), PeerError> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&loopback(port), Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(c) = child.as_deref_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            return Err(PeerError::NotReady {
                what: what.to_owned(),
                reason: format!("exited with {status} before listening on port {port}"),
            });
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(PeerError::NotReady {
        what: what.to_owned(),
        reason: format!("nothing listens on port {port} after {timeout:?}"),
    })
}

/// A child process that is stopped (by its pid) when dropped.
pub struct ManagedChild {
    child: Option<Child>,
    name: String,
}

impl ManagedChild {
    pub fn new(child: Child, name: &str) -> Self {
        register(Live::Child(child.id()));
        Self {
            child: Some(child),
            name: name.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Whether it has exited (without waiting).
    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_)) | Err(_)))
    }

    /// Waits up to `timeout` for it to exit by itself; returns whether it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.has_exited() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.has_exited()
    }

    /// SIGTERM, wait up to the grace period, then SIGKILL; always reaps the child.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        unregister(&Live::Child(child.id()));
        if let Ok(None) = child.try_wait() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            tracing::warn!(name = %self.name, "did not stop after SIGTERM; killing it");
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for ManagedChild {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Kills one process by pid with SIGKILL (for processes that are not our children, such as a
/// daemonised Postfix master that ignored `postfix stop`).
pub fn kill_pid(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Whether a process with this pid exists.
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
