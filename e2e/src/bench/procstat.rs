//! CPU time and memory of the servers under test, read from `/proc`.
//!
//! * CPU: `utime + stime` (fields 14 and 15 of `/proc/<pid>/stat`, in clock ticks) of every
//!   server process, sampled before and after a measurement. For a process tree (a Postfix
//!   instance: master and every child it forks) the master's `cutime + cstime` (fields 16 and
//!   17) is added too: that is where the time of children that exited in between goes when
//!   the master reaps them.
//! * Memory: `VmRSS` of every process summed; `VmHWM` (peak RSS) where the kernel keeps one per
//!   process; PSS from `smaps_rollup` for process trees, where summing RSS counts the shared
//!   libraries of every process again.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Clock ticks per second (`getconf CLK_TCK`); Linux uses 100 on every common architecture.
pub fn clock_ticks_per_sec() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t: &u64| t > 0)
        .unwrap_or(100)
}

/// The fields of `/proc/<pid>/stat` the benchmarks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub pid: u32,
    pub ppid: u32,
    pub utime: u64,
    pub stime: u64,
    pub cutime: u64,
    pub cstime: u64,
}

/// Reads `/proc/<pid>/stat`; `None` when the process is gone or the line is unreadable.
pub fn read_stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses a stat line. The command name (field 2) may contain spaces and parentheses, so
/// fields are counted from the last `)`.
pub fn parse_stat(line: &str) -> Option<Stat> {
    let pid = line.split_whitespace().next()?.parse().ok()?;
    let rest = &line[line.rfind(')')? + 1..];
    // rest starts at field 3 (state); field n is at index n - 3.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
    Some(Stat {
        pid,
        ppid: u32::try_from(field(4)?).ok()?,
        utime: field(14)?,
        stime: field(15)?,
        cutime: field(16)?,
        cstime: field(17)?,
    })
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&text, field)
}

/// Proportional set size in KiB (`/proc/<pid>/smaps_rollup`).
pub fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    kib_field(&text, "Pss")
}

fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Every process on the machine with its parent (one scan of `/proc`).
fn all_stats() -> Vec<Stat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(read_stat)
        .collect()
}

/// `root` and all its descendants.
pub fn tree(root: u32) -> Vec<Stat> {
    let all = all_stats();
    let mut children: HashMap<u32, Vec<&Stat>> = HashMap::new();
    for s in &all {
        children.entry(s.ppid).or_default().push(s);
    }
    let mut out = Vec::new();
    let Some(root_stat) = all.iter().find(|s| s.pid == root) else {
        return out;
    };
    let mut stack = vec![root_stat];
    while let Some(s) = stack.pop() {
        out.push(*s);
        if let Some(kids) = children.get(&s.pid) {
            stack.extend(kids.iter().copied());
        }
    }
    out
}

/// The processes of one system under test, by role (`smtp-node`, `nats-server`, `postfix`).
#[derive(Debug, Clone)]
pub enum ServerProcesses {
    /// Fixed processes (no children of interest).
    Pids(Vec<(String, u32)>),
    /// A process tree under one root (a Postfix master), all charged to one role.
    Tree { role: String, root: u32 },
}

/// CPU ticks per role at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuSample(pub BTreeMap<String, u64>);

impl CpuSample {
    /// Ticks used per role since `earlier`.
    pub fn since(&self, earlier: &CpuSample) -> BTreeMap<String, u64> {
        self.0
            .iter()
            .map(|(role, t)| {
                let before = earlier.0.get(role).copied().unwrap_or(0);
                (role.clone(), t.saturating_sub(before))
            })
            .collect()
    }
}

/// Memory of the system under test at one moment, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemorySample {
    pub processes: u64,
    pub rss_kib: u64,
    pub pss_kib: u64,
}

impl ServerProcesses {
    /// CPU ticks used so far, per role.
    pub fn cpu(&self) -> CpuSample {
        let mut out = BTreeMap::new();
        match self {
            Self::Pids(pids) => {
                for (role, pid) in pids {
                    let ticks = read_stat(*pid).map_or(0, |s| s.utime + s.stime);
                    *out.entry(role.clone()).or_insert(0) += ticks;
                }
            }
            Self::Tree { role, root } => {
                let ticks: u64 = tree(*root)
                    .iter()
                    .map(|s| {
                        let reaped = if s.pid == *root {
                            s.cutime + s.cstime
                        } else {
                            0
                        };
                        s.utime + s.stime + reaped
                    })
                    .sum();
                out.insert(role.clone(), ticks);
            }
        }
        CpuSample(out)
    }

    fn pids(&self) -> Vec<u32> {
        match self {
            Self::Pids(pids) => pids.iter().map(|(_, p)| *p).collect(),
            Self::Tree { root, .. } => tree(*root).iter().map(|s| s.pid).collect(),
        }
    }

    /// Summed RSS (cheap: `/proc/<pid>/status`).
    pub fn rss_kib(&self) -> u64 {
        self.pids()
            .into_iter()
            .filter_map(|p| status_kib(p, "VmRSS"))
            .sum()
    }

    /// Summed RSS and PSS (PSS reads `smaps_rollup`, which costs more per process).
    pub fn memory(&self) -> MemorySample {
        let pids = self.pids();
        MemorySample {
            processes: pids.len() as u64,
            rss_kib: pids.iter().filter_map(|p| status_kib(*p, "VmRSS")).sum(),
            pss_kib: pids.iter().filter_map(|p| pss_kib(*p)).sum(),
        }
    }

    /// Summed peak RSS (`VmHWM`) of fixed processes; `None` for a tree, whose short-lived
    /// children take their peaks with them.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        match self {
            Self::Pids(pids) => Some(
                pids.iter()
                    .filter_map(|(_, p)| status_kib(*p, "VmHWM"))
                    .sum(),
            ),
            Self::Tree { .. } => None,
        }
    }
}

/// Samples the summed RSS and PSS of a system every `interval` on a thread and keeps the
/// maxima: the peak of process trees, where no kernel counter holds it, and a peak PSS for
/// every system.
pub struct MemorySampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<MemorySample>,
}

impl MemorySampler {
    pub fn start(processes: ServerProcesses, interval: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = processes.memory();
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(interval);
                let now = processes.memory();
                peak.processes = peak.processes.max(now.processes);
                peak.rss_kib = peak.rss_kib.max(now.rss_kib);
                peak.pss_kib = peak.pss_kib.max(now.pss_kib);
            }
            peak
        });
        Self { stop, handle }
    }

    /// Stops sampling and returns the highest sums seen (each maximum on its own).
    pub fn finish(self) -> MemorySample {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// The filesystem type and device of the mount holding `path` (from `/proc/self/mountinfo`),
/// so the report can show that both queues sit on the same disk.
pub fn mount_of(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let path = path.canonicalize().ok()?;
    let mut best: Option<(usize, String)> = None;
    for line in text.lines() {
        let parsed = line.split_once(" - ").and_then(|(left, right)| {
            let mount_point = left.split_whitespace().nth(4)?;
            let mut r = right.split_whitespace();
            Some((mount_point, r.next()?, r.next()?))
        });
        let Some((mount_point, fstype, source)) = parsed else {
            continue;
        };
        if path.starts_with(mount_point)
            && best.as_ref().is_none_or(|(l, _)| mount_point.len() >= *l)
        {
            best = Some((
                mount_point.len(),
                format!("{source} ({fstype}) at {mount_point}"),
            ));
        }
    }
    best.map(|(_, s)| s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let line = "4242 (smtpd (x) y) S 17 4242 4242 0 -1 4194560 100 0 0 0 31 12 5 6 20 0 1 0 \
                    123 4096 200 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(
            s,
            Stat {
                pid: 4242,
                ppid: 17,
                utime: 31,
                stime: 12,
                cutime: 5,
                cstime: 6
            }
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_measurable() {
        let me = std::process::id();
        assert!(read_stat(me).is_some());
        assert!(status_kib(me, "VmRSS").unwrap() > 0);
        assert!(tree(me).iter().any(|s| s.pid == me));
        let procs = ServerProcesses::Pids(vec![("me".to_owned(), me)]);
        assert!(procs.memory().rss_kib > 0);
        assert!(procs.peak_rss_kib().unwrap() > 0);
        assert!(mount_of(Path::new("/")).is_some());
    }
}
