//! Container processes. Each container runs as
//! `unshare --mount --uts --propagation private sh -c <script> kubemail-container <argv...>`:
//! the script bind-mounts the pod's materialised volumes at their mountPaths (read-only where
//! asked) inside the new private mount namespace, sets the pod's hostname in the new UTS
//! namespace, and `exec`s the container's argv, so the pid the agent spawned *is* the
//! container's main process (reported as `proc://<pid>`). The process leads its own process
//! group; stopping a container signals the whole group. No `unsafe`/pre_exec is needed: the
//! namespaces come from util-linux's `unshare`.
//!
//! A container that runs from an image gets a root of its own in that namespace, as a runtime
//! builds one: an overlay of the unpacked image (never written) under a writable layer on a
//! tmpfs that lives as long as the container, `/proc`, a small `/dev` with the usual device
//! nodes, `/sys` read-only, the pod's volumes bound at their mountPaths resolved inside the
//! root (an image symlink never leads a mount outside it), the root remounted read-only for
//! `readOnlyRootFilesystem`, and finally `container-exec`, which chroots into it, changes to
//! the working directory, takes the container's user and groups and execs the program.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use k8s_openapi::jiff::Timestamp;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::mpsc;

use super::identity::Identity;
use super::volumes::BindMount;

/// `$0` of the wrapper shell; shows up in `ps` for the instant before the exec.
const WRAPPER_NAME: &str = "kubemail-container";
/// Where an image container's root is assembled inside its mount namespace: a tmpfs holding the
/// overlay's writable layer (`upper`, `work`) and the root itself (`merged`).
const ROOT_BASE: &str = "/run/kubemail-agent-root";
const ROOT_DIR: &str = "/run/kubemail-agent-root/merged";
/// Cap on what a container may write to its root filesystem (memory-backed, like a small
/// emptyDir); untouched with readOnlyRootFilesystem.
const ROOT_LAYER_SIZE: &str = "256m";
/// Device nodes a container's `/dev` gets from the host, as runc's defaults.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
/// Symlinks a container's `/dev` has.
const DEV_LINKS: [(&str, &str); 4] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];
/// Symlinks followed when resolving a path inside an image root (as the kernel's limit).
const MAX_SYMLINKS: usize = 40;

/// Why a container process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("host tool {tool} not found on PATH (util-linux and coreutils are required)")]
    ToolMissing { tool: &'static str },
    #[error("open log file {path}")]
    OpenLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spawn {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spawned process has no pid (it exited at once)")]
    NoPid,
    #[error("container has an empty command")]
    EmptyArgv,
    #[error("image root {path} contains ',' or ':', which overlayfs options cannot carry")]
    UnsupportedRootPath { path: PathBuf },
}

/// Absolute paths of the host programs the agent uses, found once on the agent's PATH so a
/// pod that sets its own PATH cannot break the mount script.
#[derive(Debug, Clone)]
pub struct HostTools {
    pub unshare: PathBuf,
    pub nsenter: PathBuf,
    pub sh: PathBuf,
    pub mount: PathBuf,
    pub mkdir: PathBuf,
    pub hostname: PathBuf,
    pub ln: PathBuf,
}

impl HostTools {
    pub fn find(path_var: &str) -> Result<Self, ProcessError> {
        let find = |tool: &'static str| {
            find_on_path(tool, path_var).ok_or(ProcessError::ToolMissing { tool })
        };
        Ok(HostTools {
            unshare: find("unshare")?,
            nsenter: find("nsenter")?,
            sh: find("sh")?,
            mount: find("mount")?,
            mkdir: find("mkdir")?,
            hostname: find("hostname")?,
            ln: find("ln")?,
        })
    }
}

/// Identifies which container run a process belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContainerTag {
    pub init: bool,
    pub index: usize,
    /// Bumped on every (re)start, so late events of an older run are ignored.
    pub generation: u64,
}

/// How a container process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessExit {
    pub tag: ContainerTag,
    pub pid: u32,
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub finished_at: Timestamp,
}

/// Everything needed to start one container process.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<BindMount>,
    pub working_dir: Option<String>,
    pub hostname: String,
    /// Host directories hidden behind an empty tmpfs (the host's `~/.kube`), so a client
    /// inside the pod uses its service account, not the host's admin kubeconfig.
    pub mask_dirs: Vec<PathBuf>,
    pub log_path: PathBuf,
    /// `<container>.pid` holds the pid (read by `e2e/local-cluster down` as a last resort);
    /// `<container>.pidstart` the process start time, to recognise the process after a restart.
    pub pid_path: PathBuf,
    /// Set when the container runs from an image: mount targets and the working directory are
    /// then paths inside that root.
    pub root: Option<RootSpec>,
}

/// How a container from an image gets its root and its user.
#[derive(Debug, Clone)]
pub struct RootSpec {
    /// The unpacked image: the read-only lower layer of the container's root.
    pub image_rootfs: PathBuf,
    /// `readOnlyRootFilesystem`.
    pub read_only: bool,
    pub identity: Identity,
    /// The `container-exec` helper on the host.
    pub exec_helper: PathBuf,
}

/// A started process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launched {
    pub pid: u32,
    pub started_at: Timestamp,
}

/// Where a container's volume sources are staged inside its mount namespace (a tmpfs that
/// exists only there; the empty directory on the host is its mount point).
const STAGE_DIR: &str = "/run/kubemail-agent-stage";

/// Single-quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The `sh -c` script run inside the new namespaces: mounts, hostname, working dir, exec.
/// For a container from an image it reads the image's symlinks to place mounts inside its root.
pub fn launch_script(tools: &HostTools, spec: &LaunchSpec) -> String {
    let q = |p: &Path| shell_quote(&p.to_string_lossy());
    let mkdir = q(&tools.mkdir);
    let mount = q(&tools.mount);
    let mut lines = vec!["set -e".to_string()];
    // In a root of its own the host's directories are not there to hide.
    if spec.root.is_none() {
        for dir in &spec.mask_dirs {
            let d = q(dir);
            lines.push(format!(
                "if [ -d {d} ]; then {mount} -t tmpfs -o size=64k,mode=0700 kubemail-mask {d}; fi"
            ));
        }
    }
    // Every source is first bound into a private staging tmpfs, and the targets are bound from
    // there: a mountPath such as `/tmp` must not hide the sources of later binds when the
    // agent's state dir lives below it (a clone under /tmp).
    let stage = |i: usize| shell_quote(&format!("{STAGE_DIR}/{i}"));
    if !spec.mounts.is_empty() {
        lines.push(format!("{mkdir} -p -- {}", shell_quote(STAGE_DIR)));
        lines.push(format!(
            "{mount} -t tmpfs -o size=64k,mode=0700 kubemail-stage {}",
            shell_quote(STAGE_DIR)
        ));
    }
    for (i, m) in spec.mounts.iter().enumerate() {
        if m.is_file {
            lines.push(format!(": > {}", stage(i)));
        } else {
            lines.push(format!("{mkdir} -p -- {}", stage(i)));
        }
        lines.push(format!("{mount} --bind -- {} {}", q(&m.source), stage(i)));
    }
    if let Some(root) = &spec.root {
        lines.extend(root_lines(tools, root));
    }
    // Where a path of the container is on the host (inside the namespace).
    let host_path = |path: &str| match &spec.root {
        None => path.to_string(),
        Some(root) => format!("{ROOT_DIR}{}", resolve_in_root(&root.image_rootfs, path)),
    };
    for (i, m) in spec.mounts.iter().enumerate() {
        let target_path = host_path(&m.target);
        let target = shell_quote(&target_path);
        if m.is_file {
            let parent = Path::new(&target_path).parent().unwrap_or(Path::new("/"));
            lines.push(format!(
                "if [ ! -e {target} ]; then {mkdir} -p -- {}; : > {target}; fi",
                q(parent)
            ));
        } else {
            lines.push(format!("{mkdir} -p -- {target}"));
        }
        lines.push(format!("{mount} --bind -- {} {target}", stage(i)));
    }
    // Read-only remounts come after every bind so a nested mountPath can still be created.
    for m in spec.mounts.iter().filter(|m| m.read_only) {
        lines.push(format!(
            "{mount} -o remount,bind,ro -- {}",
            shell_quote(&host_path(&m.target))
        ));
    }
    if !spec.hostname.is_empty() {
        lines.push(format!(
            "{} {}",
            q(&tools.hostname),
            shell_quote(&spec.hostname)
        ));
    }
    let working_dir = spec.working_dir.as_deref().filter(|w| !w.is_empty());
    match &spec.root {
        None => {
            if let Some(wd) = working_dir {
                lines.push(format!("{mkdir} -p -- {}", shell_quote(wd)));
                lines.push(format!("cd {}", shell_quote(wd)));
            }
            lines.push("exec \"$@\"".to_string());
        }
        Some(root) => {
            // Runtimes create a missing working directory; it has to exist before the root
            // turns read-only.
            let wd = working_dir.unwrap_or("/");
            lines.push(format!("{mkdir} -p -- {}", shell_quote(&host_path(wd))));
            if root.read_only {
                lines.push(format!(
                    "{mount} -o remount,bind,ro -- {}",
                    shell_quote(ROOT_DIR)
                ));
            }
            let id = &root.identity;
            let mut exec = format!(
                "exec {} --root {} --workdir {} --uid {} --gid {}",
                q(&root.exec_helper),
                shell_quote(ROOT_DIR),
                shell_quote(wd),
                id.uid,
                id.gid
            );
            if !id.groups.is_empty() {
                let groups: Vec<String> = id.groups.iter().map(u32::to_string).collect();
                exec.push_str(&format!(" --groups {}", groups.join(",")));
            }
            if id.no_new_privs {
                exec.push_str(" --no-new-privs");
            }
            exec.push_str(" -- \"$@\"");
            lines.push(exec);
        }
    }
    lines.join("\n")
}

/// Assembles an image container's root at [`ROOT_DIR`]: overlay, /proc, /dev, /sys.
fn root_lines(tools: &HostTools, root: &RootSpec) -> Vec<String> {
    let q = |p: &Path| shell_quote(&p.to_string_lossy());
    let mkdir = q(&tools.mkdir);
    let mount = q(&tools.mount);
    let ln = q(&tools.ln);
    let base = shell_quote(ROOT_BASE);
    let r = |sub: &str| shell_quote(&format!("{ROOT_DIR}{sub}"));
    let mut lines = vec![
        format!("{mkdir} -p -- {base}"),
        format!("{mount} -t tmpfs -o size={ROOT_LAYER_SIZE},mode=0755 kubemail-root {base}"),
        format!(
            "{mkdir} -p -- {} {} {}",
            shell_quote(&format!("{ROOT_BASE}/upper")),
            shell_quote(&format!("{ROOT_BASE}/work")),
            r("")
        ),
        format!(
            "{mount} -t overlay -o {} kubemail-rootfs {}",
            shell_quote(&format!(
                "lowerdir={},upperdir={ROOT_BASE}/upper,workdir={ROOT_BASE}/work",
                root.image_rootfs.display()
            )),
            r("")
        ),
        format!("{mkdir} -p -- {}", r("/proc")),
        format!(
            "{mount} -t proc -o nosuid,nodev,noexec kubemail-proc {}",
            r("/proc")
        ),
        format!("{mkdir} -p -- {}", r("/dev")),
        format!(
            "{mount} -t tmpfs -o nosuid,mode=0755,size=64k kubemail-dev {}",
            r("/dev")
        ),
    ];
    for dev in DEVICES {
        let target = r(&format!("/dev/{dev}"));
        lines.push(format!(": > {target}"));
        lines.push(format!(
            "{mount} --bind -- {} {target}",
            shell_quote(&format!("/dev/{dev}"))
        ));
    }
    for (name, target) in DEV_LINKS {
        lines.push(format!(
            "{ln} -s -- {} {}",
            shell_quote(target),
            r(&format!("/dev/{name}"))
        ));
    }
    lines.push(format!("{mkdir} -p -- {}", r("/dev/shm")));
    lines.push(format!(
        "{mount} -t tmpfs -o nosuid,nodev,noexec,mode=1777,size=64m kubemail-shm {}",
        r("/dev/shm")
    ));
    lines.push(format!("{mkdir} -p -- {}", r("/sys")));
    lines.push(format!(
        "{mount} -t sysfs -o ro,nosuid,nodev,noexec kubemail-sys {}",
        r("/sys")
    ));
    lines
}

/// `path` (absolute, as seen by the container) resolved inside `root`: every symlink the image
/// has on the way is followed as the container would see it, and `..` stops at the root, so the
/// result never leaves `root`. Components that do not exist yet are kept as written.
pub fn resolve_in_root(root: &Path, path: &str) -> String {
    let mut resolved: Vec<String> = Vec::new();
    let mut pending: std::collections::VecDeque<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect();
    let mut followed = 0;
    while let Some(component) = pending.pop_front() {
        match component.as_str() {
            "." => continue,
            ".." => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let on_disk = root.join(resolved.join("/")).join(&component);
        let link = std::fs::symlink_metadata(&on_disk)
            .ok()
            .filter(|m| m.file_type().is_symlink())
            .and_then(|_| std::fs::read_link(&on_disk).ok());
        match link {
            Some(target) if followed < MAX_SYMLINKS => {
                followed += 1;
                let target = target.to_string_lossy().into_owned();
                if target.starts_with('/') {
                    resolved.clear();
                }
                for part in target.split('/').filter(|c| !c.is_empty()).rev() {
                    pending.push_front(part.to_string());
                }
            }
            _ => resolved.push(component),
        }
    }
    format!("/{}", resolved.join("/"))
}

/// Arguments of `unshare` that run `script` and then the container's argv.
pub fn launcher_args(tools: &HostTools, script: &str, argv: &[String]) -> Vec<String> {
    let mut args: Vec<String> = ["--mount", "--uts", "--propagation", "private"]
        .map(String::from)
        .into();
    args.push(tools.sh.to_string_lossy().into_owned());
    args.push("-c".into());
    args.push(script.to_string());
    args.push(WRAPPER_NAME.into());
    args.extend(argv.iter().cloned());
    args
}

/// Starts the container process; its exit is reported on `exits` (after the rest of its
/// process group has been killed, as a container's processes end with it).
pub fn launch(
    tools: &HostTools,
    spec: &LaunchSpec,
    tag: ContainerTag,
    exits: mpsc::UnboundedSender<ProcessExit>,
) -> Result<Launched, ProcessError> {
    if spec.argv.is_empty() {
        return Err(ProcessError::EmptyArgv);
    }
    if let Some(root) = &spec.root {
        let text = root.image_rootfs.to_string_lossy();
        if text.contains([',', ':']) {
            return Err(ProcessError::UnsupportedRootPath {
                path: root.image_rootfs.clone(),
            });
        }
    }
    let log = open_log(&spec.log_path)?;
    let log_err = log.try_clone().map_err(|source| ProcessError::OpenLog {
        path: spec.log_path.clone(),
        source,
    })?;
    let script = launch_script(tools, spec);
    let mut child = Command::new(&tools.unshare)
        .args(launcher_args(tools, &script, &spec.argv))
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .process_group(0)
        .spawn()
        .map_err(|source| ProcessError::Spawn {
            program: tools.unshare.clone(),
            source,
        })?;
    let pid = child.id().ok_or(ProcessError::NoPid)?;
    let started_at = Timestamp::now();
    write_pid_files(&spec.pid_path, pid);
    let pid_path = spec.pid_path.clone();
    tokio::spawn(async move {
        let status = child.wait().await;
        // Whatever the main process left behind in its group goes with it.
        signal_group(pid, Signal::SIGKILL);
        remove_pid_files(&pid_path);
        let (exit_code, signal) = match status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(code), _) => (code, None),
                (None, Some(sig)) => (128 + sig, Some(sig)),
                (None, None) => (-1, None),
            },
            Err(e) => {
                tracing::warn!(pid, error = %e, "waiting for container process failed");
                (-1, None)
            }
        };
        let _ = exits.send(ProcessExit {
            tag,
            pid,
            exit_code,
            signal,
            finished_at: Timestamp::now(),
        });
    });
    Ok(Launched { pid, started_at })
}

/// Sends `sig` to the process group led by `pid`; false when the group is gone.
pub fn signal_group(pid: u32, sig: Signal) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    killpg(Pid::from_raw(raw), sig).is_ok()
}

/// Kills process groups recorded by an earlier agent instance in `dir` (`*.pid` files whose
/// process still has the recorded start time, so a reused pid is left alone) and removes the
/// records. Returns how many groups were killed.
pub fn kill_leftovers(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut killed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pid") {
            continue;
        }
        let pid = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        let recorded_start = std::fs::read_to_string(path.with_extension("pidstart"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        if let (Some(pid), Some(start)) = (pid, recorded_start)
            && process_start_ticks(pid) == Some(start)
        {
            tracing::info!(pid, record = %path.display(), "killing container process left by an earlier agent");
            signal_group(pid, Signal::SIGKILL);
            killed.push(pid);
        }
        remove_pid_files(&path);
    }
    // Give the kernel a moment to tear them down so their ports are free for the restart.
    for _ in 0..50 {
        if killed
            .iter()
            .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    killed.len()
}

/// Whether `pid` exists and is not a zombie (an orphan killed here may linger as a zombie
/// until whoever adopted it reaps it; it holds no ports or files any more).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .is_some_and(|stat| {
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next());
            !matches!(state, Some("Z" | "X") | None)
        })
}

/// Field 22 of `/proc/<pid>/stat`: the start time in clock ticks since boot.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_ticks(&stat)
}

fn parse_start_ticks(stat: &str) -> Option<u64> {
    // comm (field 2) may contain spaces and parentheses: count fields after the last ')'.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // after_comm starts with field 3 (state); starttime is field 22.
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Looks `name` up on a PATH-style list.
pub fn find_on_path(name: &str, path_var: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn open_log(path: &Path) -> Result<std::fs::File, ProcessError> {
    let err = |source| ProcessError::OpenLog {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)
}

fn write_pid_files(pid_path: &Path, pid: u32) {
    let write = || -> std::io::Result<()> {
        if let Some(parent) = pid_path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(pid_path, format!("{pid}\n"))?;
        if let Some(start) = process_start_ticks(pid) {
            std::fs::write(pid_path.with_extension("pidstart"), format!("{start}\n"))?;
        }
        Ok(())
    };
    if let Err(e) = write() {
        tracing::warn!(pid, path = %pid_path.display(), error = %e, "could not record container pid");
    }
}

fn remove_pid_files(pid_path: &Path) {
    let _ = std::fs::remove_file(pid_path);
    let _ = std::fs::remove_file(pid_path.with_extension("pidstart"));
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn tools() -> HostTools {
        let path = std::env::var("PATH").unwrap_or_default();
        HostTools::find(&path)
            .expect("util-linux unshare/nsenter/mount and coreutils must be installed")
    }

    fn fake_tools() -> HostTools {
        HostTools {
            unshare: "/usr/bin/unshare".into(),
            nsenter: "/usr/bin/nsenter".into(),
            sh: "/bin/sh".into(),
            mount: "/bin/mount".into(),
            mkdir: "/bin/mkdir".into(),
            hostname: "/bin/hostname".into(),
            ln: "/bin/ln".into(),
        }
    }

    fn spec(mounts: Vec<BindMount>, working_dir: Option<&str>) -> LaunchSpec {
        LaunchSpec {
            argv: vec!["sleep".into(), "1".into()],
            env: vec![],
            mounts,
            working_dir: working_dir.map(String::from),
            hostname: "web-1".into(),
            mask_dirs: vec![],
            log_path: "/tmp/x.log".into(),
            pid_path: "/tmp/x.pid".into(),
            root: None,
        }
    }

    #[test]
    fn quoting_survives_quotes_and_spaces() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }

    #[test]
    fn script_binds_then_remounts_read_only_then_execs() {
        let mounts = vec![
            BindMount {
                source: "/s/cfg".into(),
                target: "/etc/my cfg".into(),
                read_only: true,
                is_file: false,
            },
            BindMount {
                source: "/s/it's".into(),
                target: "/etc/app/c.yaml".into(),
                read_only: false,
                is_file: true,
            },
        ];
        let script = launch_script(&fake_tools(), &spec(mounts, Some("/work")));
        let expected = [
            "set -e",
            "'/bin/mkdir' -p -- '/run/kubemail-agent-stage'",
            "'/bin/mount' -t tmpfs -o size=64k,mode=0700 kubemail-stage '/run/kubemail-agent-stage'",
            "'/bin/mkdir' -p -- '/run/kubemail-agent-stage/0'",
            "'/bin/mount' --bind -- '/s/cfg' '/run/kubemail-agent-stage/0'",
            ": > '/run/kubemail-agent-stage/1'",
            r"'/bin/mount' --bind -- '/s/it'\''s' '/run/kubemail-agent-stage/1'",
            "'/bin/mkdir' -p -- '/etc/my cfg'",
            "'/bin/mount' --bind -- '/run/kubemail-agent-stage/0' '/etc/my cfg'",
            "if [ ! -e '/etc/app/c.yaml' ]; then '/bin/mkdir' -p -- '/etc/app'; : > '/etc/app/c.yaml'; fi",
            "'/bin/mount' --bind -- '/run/kubemail-agent-stage/1' '/etc/app/c.yaml'",
            "'/bin/mount' -o remount,bind,ro -- '/etc/my cfg'",
            "'/bin/hostname' 'web-1'",
            "'/bin/mkdir' -p -- '/work'",
            "cd '/work'",
            "exec \"$@\"",
        ]
        .join("\n");
        assert_eq!(script, expected);
        let args = launcher_args(&fake_tools(), &script, &["sleep".into(), "1".into()]);
        assert_eq!(
            &args[..6],
            [
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "/bin/sh",
                "-c"
            ]
        );
        assert_eq!(&args[7..], ["kubemail-container", "sleep", "1"]);
    }

    #[test]
    fn paths_resolve_inside_the_image_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("etc/kubemail")).unwrap();
        std::os::unix::fs::symlink("/etc/kubemail", root.join("cfg")).unwrap();
        std::os::unix::fs::symlink("../../../..", root.join("etc/up")).unwrap();
        std::os::unix::fs::symlink("kubemail", root.join("etc/rel")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        let r = |p: &str| resolve_in_root(root, p);
        assert_eq!(r("/cfg/config"), "/etc/kubemail/config");
        assert_eq!(r("/etc/rel/x"), "/etc/kubemail/x");
        assert_eq!(
            r("/etc/up/etc/passwd"),
            "/etc/passwd",
            "never above the root"
        );
        assert_eq!(r("/../../tmp"), "/tmp");
        assert_eq!(r("/new/dir/./x"), "/new/dir/x");
        assert_eq!(r("/"), "/");
        assert_eq!(r("/loop/x"), "/loop/x", "a symlink loop ends as written");
    }

    #[test]
    fn image_root_script_mounts_inside_the_root_then_execs_the_helper() {
        let tmp = tempfile::tempdir().unwrap();
        let rootfs = tmp.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("etc/kubemail")).unwrap();
        std::os::unix::fs::symlink("/etc/kubemail", rootfs.join("cfg")).unwrap();
        let mut spec = spec(
            vec![BindMount {
                source: "/s/cfg".into(),
                target: "/cfg/config".into(),
                read_only: true,
                is_file: false,
            }],
            Some("/work"),
        );
        spec.mask_dirs = vec!["/root/.kube".into()];
        spec.root = Some(RootSpec {
            image_rootfs: rootfs.clone(),
            read_only: true,
            identity: Identity {
                uid: 65532,
                gid: 65532,
                groups: vec![65532, 5],
                home: "/".into(),
                no_new_privs: true,
            },
            exec_helper: "/opt/container-exec".into(),
        });
        let script = launch_script(&fake_tools(), &spec);
        let lines: Vec<&str> = script.lines().collect();
        let at = |needle: &str| {
            lines
                .iter()
                .position(|l| *l == needle)
                .unwrap_or_else(|| panic!("no line {needle:?} in:\n{script}"))
        };
        assert!(
            !script.contains(".kube"),
            "no host dirs to mask in an image root"
        );
        let overlay = at(&format!(
            "'/bin/mount' -t overlay -o 'lowerdir={},upperdir=/run/kubemail-agent-root/upper,workdir=/run/kubemail-agent-root/work' kubemail-rootfs '/run/kubemail-agent-root/merged'",
            rootfs.display()
        ));
        at(
            "'/bin/mount' -t proc -o nosuid,nodev,noexec kubemail-proc '/run/kubemail-agent-root/merged/proc'",
        );
        at("'/bin/mount' --bind -- '/dev/null' '/run/kubemail-agent-root/merged/dev/null'");
        at("'/bin/ln' -s -- '/proc/self/fd' '/run/kubemail-agent-root/merged/dev/fd'");
        let bind = at(
            "'/bin/mount' --bind -- '/run/kubemail-agent-stage/0' '/run/kubemail-agent-root/merged/etc/kubemail/config'",
        );
        let ro_volume = at(
            "'/bin/mount' -o remount,bind,ro -- '/run/kubemail-agent-root/merged/etc/kubemail/config'",
        );
        let wd = at("'/bin/mkdir' -p -- '/run/kubemail-agent-root/merged/work'");
        let ro_root = at("'/bin/mount' -o remount,bind,ro -- '/run/kubemail-agent-root/merged'");
        assert!(overlay < bind && bind < ro_volume && ro_volume < wd && wd < ro_root);
        assert_eq!(
            lines.last().copied(),
            Some(
                "exec '/opt/container-exec' --root '/run/kubemail-agent-root/merged' --workdir '/work' --uid 65532 --gid 65532 --groups 65532,5 --no-new-privs -- \"$@\""
            )
        );
        assert!(
            !script.contains("\ncd "),
            "the helper changes directory inside the root"
        );
    }

    #[test]
    fn start_ticks_parse_with_odd_comm() {
        let stat =
            "123 (a) b (c)) S 1 123 123 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_ticks(stat), Some(987654));
        assert_eq!(
            process_start_ticks(std::process::id()).map(|t| t > 0),
            Some(true)
        );
    }

    /// Runs a real container process: needs root, util-linux `unshare` and `mount`.
    #[tokio::test]
    async fn launched_process_sees_bind_mounts_env_and_hostname_and_is_stoppable() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("key"), "mounted-value").unwrap();
        let target = tmp.path().join("target").to_string_lossy().into_owned();
        let mut spec = spec(
            vec![BindMount {
                source: src.clone(),
                target: target.clone(),
                read_only: true,
                is_file: false,
            }],
            None,
        );
        spec.argv = vec![
            "sh".into(),
            "-c".into(),
            format!(
                "cat {target}/key; echo \" $FOO $(hostname)\"; touch {target}/x 2>/dev/null || echo ro; exit 3"
            ),
        ];
        spec.env = vec![
            ("FOO".into(), "bar".into()),
            ("PATH".into(), std::env::var("PATH").unwrap()),
        ];
        spec.log_path = tmp.path().join("logs/c.log");
        spec.pid_path = tmp.path().join("pids/c.pid");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let tag = ContainerTag {
            init: false,
            index: 0,
            generation: 1,
        };
        let launched = launch(&tools(), &spec, tag, tx.clone()).expect("launch");
        let exit = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((exit.pid, exit.exit_code, exit.tag), (launched.pid, 3, tag));
        let log = std::fs::read_to_string(&spec.log_path).unwrap();
        assert_eq!(log, "mounted-value bar web-1\nro\n");
        assert!(!src.join("x").exists());
        assert!(!spec.pid_path.exists(), "pid record removed on exit");

        // A long-running process is stopped through its process group.
        spec.argv = vec!["sleep".into(), "30".into()];
        let launched = launch(&tools(), &spec, tag, tx).expect("launch");
        assert!(
            std::fs::read_to_string(&spec.pid_path)
                .unwrap()
                .starts_with(&launched.pid.to_string())
        );
        assert!(signal_group(launched.pid, Signal::SIGTERM));
        let exit = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((exit.exit_code, exit.signal), (128 + 15, Some(15)));
    }
}
