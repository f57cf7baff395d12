//! Child processes of the hostile cases: finding tools and the `smtp-node` binary, free
//! loopback ports, waiting for a port, killing on drop, and reading a process's memory.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a started server may take to listen.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The path of `name` on `PATH` (or in `/usr/sbin`, where Debian puts knotd and smtp-sink).
/// Panics with what to install when it is missing: a case that needs a tool must fail, never
/// skip.
pub fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin")]);
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` is not on PATH. The hostile suite needs it: nats-server comes from \
         e2e/tools/setup.sh (export PATH=$(ls -d ~/.cache/kubemail/tools/*/ | tr '\\n' ':')$PATH); \
         testssl (testssl.sh), smtp-sink (postfix) and knotd (knot) are Debian packages that \
         `make setup` installs."
    );
}

/// The `smtp-node` binary of this build: `$KUBEMAIL_SMTP_NODE_BIN`, else the one next to the
/// test executable's `deps/` directory (what `cargo build` / `cargo test --workspace` make).
pub fn smtp_node_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KUBEMAIL_SMTP_NODE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let candidates = exe
        .ancestors()
        .skip(1)
        .take(3)
        .map(|dir| dir.join("smtp-node"))
        .collect::<Vec<_>>();
    candidates
        .iter()
        .find(|c| c.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no smtp-node binary next to {} (looked at {candidates:?}); build it first: \
                 `cargo build -p kubemail-smtp-node` (make build does), or set \
                 KUBEMAIL_SMTP_NODE_BIN",
                exe.display()
            )
        })
}

/// The SMTP node crate's directory (`smtp-node/`, for its example certificate and users).
pub fn smtp_node_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("smtp-node")
}

pub use kubemail_test_support::ports::{free_port, free_port_on, free_ports};
pub use kubemail_test_support::wait::{wait_for_port, wait_until};

/// A child process that is killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    child: Option<Child>,
    pub name: String,
}

impl Proc {
    pub fn new(child: Child, name: impl Into<String>) -> Self {
        Self {
            child: Some(child),
            name: name.into(),
        }
    }

    /// The process id (panics when it was stopped).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("process is running")
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("process is running")
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL and reap, as a crash or an OOM kill would end it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` (e.g. SIGTERM) without waiting.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap_or(i32::MAX));
            let _ = nix::sys::signal::kill(pid, signal);
        }
    }

    /// Waits up to `limit` for it to exit; true when it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match self.child.as_mut().map(Child::try_wait) {
                None | Some(Ok(Some(_))) | Some(Err(_)) => {
                    self.child = None;
                    return true;
                }
                Some(Ok(None)) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Resident memory of `pid` in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Samples a process's RSS every 20 ms on a thread and keeps the maximum.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(rss_kib(pid).unwrap_or(0)));
        let (s, m) = (stop.clone(), max.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    m.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self {
            stop,
            max,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the largest RSS seen, in KiB.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.max.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Raises this process's open-file limit to the hard limit (load cases open thousands of
/// sockets); returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}
