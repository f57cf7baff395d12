//! CPU cgroups for the loaded run that shares the CPUs the way a Kubernetes node does.
//!
//! The kernel's scheduler shares a CPU per runnable task inside a cgroup and per cgroup
//! between cgroups. Beside busy loops in the same cgroup, a server made of a hundred processes
//! (Postfix: an smtpd per connection, cleanup, qmgr, smtp) therefore gets a larger share of
//! the CPU than one made of two (smtp-node and nats-server). On a Kubernetes node every pod is
//! a cgroup of its own, weighted by its CPU request, and on a plain host every systemd service
//! is one; there, the busy neighbour and the mail server get a share each, however many
//! processes each runs.
//!
//! [`CpuGroups`] makes that case measurable: three sibling cgroups of equal weight under
//! `kubemail-bench-<pid>`, one for the load generator (this process and the smtp-sink it
//! starts), one for the servers under test (started inside it by
//! [`super::peers::server_command`]) and one for the neighbours ([`BusyProcesses`]). It works
//! with the cgroup v2 `cpu` controller (`cpu.weight`) and with the v1 `cpu` hierarchy
//! (`cpu.shares`); where neither is writable the run says so and skips that part.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::peers::ManagedChild;

/// The groups of a loaded run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// The load generator: this process and what it starts (smtp-sink).
    Generator,
    /// The servers under test: smtp-node, nats-server, Postfix and what its master forks.
    Servers,
    /// The busy neighbours.
    Neighbours,
}

impl Group {
    const ALL: [Group; 3] = [Group::Generator, Group::Servers, Group::Neighbours];

    fn dir_name(self) -> &'static str {
        match self {
            Group::Generator => "generator",
            Group::Servers => "servers",
            Group::Neighbours => "neighbours",
        }
    }
}

/// Which cgroup interface the groups were made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    /// The unified hierarchy: `cpu.weight` (default 100).
    V2,
    /// The v1 `cpu` hierarchy: `cpu.shares` (default 1024).
    V1,
}

/// Three sibling cgroups of equal CPU weight; removed (and this process moved back to where
/// it was) when dropped.
#[derive(Debug)]
pub struct CpuGroups {
    version: Version,
    /// The cgroup this process was in when the groups were made, where it goes back to.
    origin: PathBuf,
    /// `<mount>/kubemail-bench-<pid>`.
    dir: PathBuf,
}

impl CpuGroups {
    /// Creates the groups under the first writable `cpu` controller: cgroup v2 at
    /// `/sys/fs/cgroup`, else v1 at `/sys/fs/cgroup/cpu` (or `cpu,cpuacct`). Needs root.
    /// The error says why none could be used.
    pub fn create() -> Result<Self, String> {
        let name = format!("kubemail-bench-{}", std::process::id());
        let v2 = Path::new("/sys/fs/cgroup");
        let v2_error = match Self::create_in(Version::V2, v2, &name) {
            Ok(g) => return Ok(g),
            Err(e) => e,
        };
        let mut errors = vec![format!("cgroup v2: {v2_error}")];
        for v1 in ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"] {
            match Self::create_in(Version::V1, Path::new(v1), &name) {
                Ok(g) => return Ok(g),
                Err(e) => errors.push(format!("cgroup v1 at {v1}: {e}")),
            }
        }
        Err(errors.join("; "))
    }

    fn create_in(version: Version, mount: &Path, name: &str) -> Result<Self, String> {
        match version {
            Version::V2 => {
                let controllers = read(&mount.join("cgroup.controllers"))?;
                if !controllers.split_whitespace().any(|c| c == "cpu") {
                    return Err("no cpu controller in cgroup.controllers".to_owned());
                }
                let subtree = mount.join("cgroup.subtree_control");
                if !read(&subtree)?.split_whitespace().any(|c| c == "cpu") {
                    write(&subtree, "+cpu")?;
                }
            }
            Version::V1 => {
                read(&mount.join("cpu.shares"))?;
            }
        }
        let dir = mount.join(name);
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let groups = Self {
            version,
            origin: own_cgroup(version, mount),
            dir,
        };
        // From here on, dropping `groups` removes what was made.
        if version == Version::V2 {
            write(&groups.dir.join("cgroup.subtree_control"), "+cpu")?;
        }
        for g in Group::ALL {
            let d = groups.dir.join(g.dir_name());
            std::fs::create_dir(&d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
            let (file, weight) = groups.weight_file();
            write(&d.join(file), weight)?;
        }
        Ok(groups)
    }

    /// The weight file of this interface and the equal weight every group gets (the default
    /// of a new cgroup, written anyway so the groups are equal whatever the default).
    fn weight_file(&self) -> (&'static str, &'static str) {
        match self.version {
            Version::V2 => ("cpu.weight", "100"),
            Version::V1 => ("cpu.shares", "1024"),
        }
    }

    /// The file a process id is written to, to move the whole process into `group`.
    pub fn procs_file(&self, group: Group) -> PathBuf {
        self.dir.join(group.dir_name()).join("cgroup.procs")
    }

    /// Moves process `pid` (every thread of it) into `group`.
    pub fn enter(&self, group: Group, pid: u32) -> Result<(), String> {
        write(&self.procs_file(group), &pid.to_string())
    }

    /// The weight of `group` as the kernel reports it, and the interface, for the report:
    /// e.g. `cpu.weight 100 (cgroup v2)`.
    pub fn describe(&self, group: Group) -> String {
        let (file, _) = self.weight_file();
        let value = read(&self.dir.join(group.dir_name()).join(file))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|e| format!("unreadable: {e}"));
        let v = match self.version {
            Version::V2 => "cgroup v2",
            Version::V1 => "cgroup v1",
        };
        format!("{file} {value} ({v})")
    }

    /// The process ids in `group` now.
    pub fn members(&self, group: Group) -> Vec<u32> {
        read(&self.procs_file(group))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }
}

impl Drop for CpuGroups {
    fn drop(&mut self) {
        // This process back to where it was, then the (by now empty) groups away. A stopped
        // process can take a moment to leave its group.
        let _ = write(
            &self.origin.join("cgroup.procs"),
            &std::process::id().to_string(),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        for g in Group::ALL {
            let d = self.dir.join(g.dir_name());
            while d.exists() && std::fs::remove_dir(&d).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// N processes that spin on every CPU of the machine, in one cgroup, until dropped (or until
/// their time limit): the busy neighbours of the run that shares CPUs per cgroup.
pub struct BusyProcesses {
    loops: Vec<ManagedChild>,
}

impl BusyProcesses {
    /// Starts `n` spinning processes inside `procs_file`'s cgroup, on `cpus` (a `taskset -c`
    /// list); each is killed after `max` whatever happens to the run.
    pub fn start(n: u32, procs_file: &Path, cpus: &str, max: Duration) -> Result<Self, String> {
        let mut loops = Vec::new();
        for _ in 0..n {
            // `timeout` runs the loop; the SIGTERM that stops `timeout` (the child's pid) ends
            // the loop too.
            let child = command_in(procs_file)
                .args(["timeout", "-s", "KILL", &max.as_secs().to_string()])
                .args(["taskset", "-c", cpus, "sh", "-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start a busy loop: {e}"))?;
            loops.push(ManagedChild::new(child, "busy loop"));
        }
        // A loop that could not enter the cgroup has exited with the shell's complaint.
        std::thread::sleep(Duration::from_millis(200));
        let mut busy = Self { loops };
        for l in &mut busy.loops {
            if l.has_exited() {
                let mut why = String::new();
                if let Some(mut err) = l.child_mut().and_then(|c| c.stderr.take()) {
                    let _ = err.read_to_string(&mut why);
                }
                return Err(format!("a busy loop exited at once: {}", why.trim()));
            }
        }
        Ok(busy)
    }

    /// The process ids of the loops.
    pub fn pids(&self) -> Vec<u32> {
        self.loops.iter().map(ManagedChild::pid).collect()
    }
}

/// A command that enters the cgroup whose `cgroup.procs` file is `procs`, then runs the
/// program and arguments added to it: a shell writes its pid there and execs them, so the
/// program keeps the pid the command was started with and whatever it forks stays in the
/// cgroup. A shell that cannot enter the cgroup exits with its complaint on stderr.
pub fn command_in(procs: &Path) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(r#"echo $$ > "$0" && exec "$@""#).arg(procs);
    c
}

/// This process's cgroup in the hierarchy mounted at `mount`, from `/proc/self/cgroup`
/// (`0::<path>` for v2, `<id>:<controllers>:<path>` with `cpu` among the controllers for v1);
/// the hierarchy's root when it cannot be read.
fn own_cgroup(version: Version, mount: &Path) -> PathBuf {
    let table = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    table
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            Some((parts.next()?, parts.next()?, parts.next()?))
        })
        .find(|(id, controllers, _)| match version {
            Version::V2 => *id == "0" && controllers.is_empty(),
            Version::V1 => controllers.split(',').any(|c| c == "cpu"),
        })
        .map_or_else(
            || mount.to_owned(),
            |(_, _, path)| mount.join(path.trim_start_matches('/')),
        )
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the machine's real cgroups, where this process may make them (root, a writable
    /// `cpu` controller); elsewhere the error must say, for every interface, why not.
    #[test]
    fn the_generator_the_servers_and_the_loops_each_land_in_their_own_group() {
        let groups = match CpuGroups::create() {
            Ok(g) => g,
            Err(e) => {
                assert!(
                    e.contains("cgroup v2:") && e.contains("cgroup v1 at /sys/fs/cgroup/cpu:"),
                    "{e}"
                );
                return;
            }
        };
        let dir = groups.dir.clone();
        assert!(dir.join("servers").is_dir() && dir.join("neighbours").is_dir());
        // This process into the generator's group, and back where it was at the end.
        let before = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroups");
        groups
            .enter(Group::Generator, std::process::id())
            .expect("this process into the generator's group");
        assert!(
            groups
                .members(Group::Generator)
                .contains(&std::process::id())
        );
        for g in Group::ALL {
            let described = groups.describe(g);
            assert!(
                described == "cpu.weight 100 (cgroup v2)"
                    || described == "cpu.shares 1024 (cgroup v1)",
                "{described}"
            );
        }

        let busy = BusyProcesses::start(
            1,
            &groups.procs_file(Group::Neighbours),
            "0",
            Duration::from_secs(60),
        )
        .expect("a busy loop in the neighbours' group");
        // `timeout` is the loop's pid; the loop itself is its child, in the same group.
        let loops = groups.members(Group::Neighbours);
        assert!(loops.contains(&busy.pids()[0]), "{loops:?}");
        assert_eq!(loops.len(), 2, "timeout and its spinning shell: {loops:?}");

        super::super::peers::servers_in_cgroup(Some(groups.procs_file(Group::Servers)));
        let mut server = super::super::peers::server_command("sleep")
            .arg("30")
            .spawn()
            .expect("sleep as a server");
        super::super::peers::servers_in_cgroup(None);
        // The shell writes its pid, then execs: the server keeps the pid it was started with.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !groups.members(Group::Servers).contains(&server.id()) {
            assert!(
                Instant::now() < deadline,
                "{:?}",
                groups.members(Group::Servers)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", server.id()))
            .expect("the server's command line");
        assert!(cmdline.starts_with("sleep\0"), "{cmdline:?}");
        // Started after the servers' group was cleared: where this process is.
        let mut outside = super::super::peers::server_command("sleep")
            .arg("30")
            .spawn()
            .expect("sleep outside");
        std::thread::sleep(Duration::from_millis(100));
        assert!(!groups.members(Group::Servers).contains(&outside.id()));

        let _ = server.kill();
        let _ = server.wait();
        let _ = outside.kill();
        let _ = outside.wait();
        drop(busy);
        drop(groups);
        assert!(!dir.exists(), "{} is left behind", dir.display());
        let after = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroups");
        assert_eq!(before, after, "this process is back in its own cgroups");
    }
}
