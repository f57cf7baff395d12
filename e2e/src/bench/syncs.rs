//! fsyncs per message: `fsync(2)` and `fdatasync(2)` calls on the whole machine during a
//! measured run, counted by `perf stat` on the kernel's syscall tracepoints
//! (`syscalls:sys_enter_fsync`, `syscalls:sys_enter_fdatasync`). Counting in the kernel
//! costs the servers nothing measurable, unlike tracing them. Machine-wide, because a Postfix
//! instance forks processes during the run; one system runs at a time and the load generator
//! and the sink never sync, so the count is the system under test's (plus whatever else on
//! the machine synced meanwhile, usually nothing). Without `perf` or the tracepoints (no
//! permission), there is no figure rather than a wrong one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const EVENTS: [&str; 2] = ["syscalls:sys_enter_fsync", "syscalls:sys_enter_fdatasync"];

/// A running count; [`SyncCounter::stop`] ends it and returns the calls counted.
pub struct SyncCounter {
    child: Child,
    out: PathBuf,
}

impl SyncCounter {
    /// Starts counting into `dir/<name>`; `None` when `perf` cannot count the tracepoints.
    pub fn start(dir: &Path, name: &str) -> Option<Self> {
        let out = dir.join(name);
        let child = Command::new("perf")
            .args(["stat", "--all-cpus", "--field-separator", ","])
            .arg("--output")
            .arg(&out)
            .args(EVENTS.iter().flat_map(|e| ["--event", e]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        // Without a command perf counts until it is interrupted; give it a moment to set up.
        std::thread::sleep(Duration::from_millis(200));
        Some(Self { child, out })
    }

    /// Stops counting; the calls counted, `None` when perf could not count them.
    pub fn stop(mut self) -> Option<u64> {
        let pid = i32::try_from(self.child.id()).ok()?;
        let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
        // perf writes its counts and exits at once; one that does not has counted nothing
        // worth reading (and is killed by `Drop`).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok()?.is_none() {
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(&self.out).ok()?;
        let _ = std::fs::remove_file(&self.out);
        parse(&text)
    }
}

impl Drop for SyncCounter {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The sum of the counted events in `perf stat -x,` output (`count,unit,event,...` lines);
/// `None` when an event was not counted (`<not supported>`, `<not counted>`) or is missing.
pub fn parse(text: &str) -> Option<u64> {
    let mut total = 0u64;
    for event in EVENTS {
        let line = text
            .lines()
            .find(|l| l.split(',').nth(2).is_some_and(|e| e.trim() == event))?;
        total += line.split(',').next()?.trim().parse::<u64>().ok()?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_both_calls_and_refuses_a_missing_or_uncounted_one() {
        let out = "# started on Sun Dec  6 21:40:00 2026\n\n\
                   1234,,syscalls:sys_enter_fsync,1001670039,100.00,,\n\
                   56,,syscalls:sys_enter_fdatasync,1001670039,100.00,,\n";
        assert_eq!(parse(out), Some(1290));
        let uncounted = "<not supported>,,syscalls:sys_enter_fsync,0,100.00,,\n\
                         56,,syscalls:sys_enter_fdatasync,1001670039,100.00,,\n";
        assert_eq!(parse(uncounted), None);
        assert_eq!(parse("56,,syscalls:sys_enter_fdatasync,1,100.00,,\n"), None);
    }

    #[test]
    fn counts_the_syncs_of_a_process_on_this_machine() {
        // The benchmarks' machines have perf; elsewhere the report shows no figure.
        if Command::new("perf").arg("--version").output().is_err() {
            eprintln!("perf is not installed here; nothing to check");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let counter = SyncCounter::start(dir.path(), "syncs").expect("perf starts");
        let file = dir.path().join("f");
        let f = std::fs::File::create(&file).expect("create");
        for _ in 0..20 {
            f.sync_all().expect("fsync");
        }
        let n = counter.stop().expect("perf counts the syscall tracepoints");
        assert!(n >= 20, "counted {n} of at least 20 fsyncs");
    }
}
