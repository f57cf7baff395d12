//! A private Postfix instance for one benchmark run: its own config directory (main.cf and
//! master.cf rendered from `e2e/bench/postfix/*.in`), queue and data directories and log
//! file, smtpd on loopback ports, started with `postfix -c DIR start` and stopped with
//! `postfix -c DIR stop` (then by pid if anything is left). The system Postfix instance (if
//! any) is never touched.
//!
//! Modes:
//! * accept-and-queue: `smtpd_end_of_data_restrictions = check_client_access static:HOLD`
//!   parks every message in the hold queue after Postfix has fsynced it, so nothing is
//!   delivered and the held count verifies what was accepted;
//! * relay: `relayhost = [127.0.0.1]:<sink>`, every message delivered to the sink.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{
    PeerError, START_TIMEOUT, create_dir, free_port, kill_pid, loopback, pid_alive, wait_for_port,
    write_file,
};
use crate::bench::procstat::{self, ServerProcesses};

const MAIN_CF: &str = include_str!("../../../bench/postfix/main.cf.in");
const MASTER_CF: &str = include_str!("../../../bench/postfix/master.cf.in");
/// Where Debian installs the postfix command.
pub const POSTFIX: &str = "/usr/sbin/postfix";

/// What the instance does with accepted mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostfixMode {
    /// Park every message in the hold queue (accept-and-queue).
    Hold,
    /// Relay everything to the sink on this port.
    RelayTo(u16),
}

/// How to run the instance.
#[derive(Debug, Clone)]
pub struct PostfixOptions {
    pub dir: PathBuf,
    pub mode: PostfixMode,
    /// `default_process_limit`: smtpd processes, i.e. concurrent connections.
    pub process_limit: u32,
    /// TLS chain files in Postfix order: key, then certificate chain.
    pub key: PathBuf,
    pub chain: PathBuf,
}

/// A running instance.
pub struct Postfix {
    pub conf_dir: PathBuf,
    pub queue_dir: PathBuf,
    /// smtpd with STARTTLS offered (`smtpd_tls_security_level = may`).
    pub smtp: SocketAddr,
    /// smtpd that requires STARTTLS before MAIL (`-o smtpd_tls_security_level=encrypt`).
    pub starttls: SocketAddr,
    pub master_pid: u32,
    pub log_file: PathBuf,
    stopped: bool,
}

impl Postfix {
    pub fn start(opts: &PostfixOptions) -> Result<Self, PeerError> {
        let conf_dir = opts.dir.join("conf");
        let queue_dir = opts.dir.join("queue");
        let data_dir = opts.dir.join("data");
        for d in [&conf_dir, &queue_dir, &data_dir] {
            create_dir(d)?;
        }
        chown_to_postfix(&data_dir)?;
        let smtp = loopback(free_port()?);
        let starttls = loopback(free_port()?);
        let log_file = opts.dir.join("maillog");
        let extra = match opts.mode {
            PostfixMode::Hold => {
                "smtpd_end_of_data_restrictions = check_client_access static:HOLD\n".to_owned()
            }
            PostfixMode::RelayTo(port) => format!("relayhost = [127.0.0.1]:{port}\n"),
        };
        let main_cf = MAIN_CF
            .replace("@QUEUE_DIR@", &queue_dir.display().to_string())
            .replace("@DATA_DIR@", &data_dir.display().to_string())
            .replace("@LOG_FILE@", &log_file.display().to_string())
            .replace("@LOG_PREFIX@", &opts.dir.display().to_string())
            .replace("@PROCESS_LIMIT@", &opts.process_limit.to_string())
            .replace(
                "@TLS_CHAIN_FILES@",
                &format!("{}, {}", opts.key.display(), opts.chain.display()),
            )
            .replace("@EXTRA@", &extra);
        let services = format!(
            "{smtp} inet n - n - - smtpd\n\
             {starttls} inet n - n - - smtpd\n  -o smtpd_tls_security_level=encrypt"
        );
        let master_cf = MASTER_CF.replace("@SMTPD_SERVICES@", &services);
        write_file(&conf_dir.join("main.cf"), &main_cf)?;
        write_file(&conf_dir.join("master.cf"), &master_cf)?;
        postfix_command(&conf_dir, "start")?;
        let mut instance = Self {
            conf_dir,
            queue_dir,
            smtp,
            starttls,
            master_pid: 0,
            log_file,
            stopped: false,
        };
        instance.master_pid = instance.read_master_pid()?;
        super::register(super::Live::Postfix {
            conf_dir: instance.conf_dir.clone(),
            master: instance.master_pid,
        });
        wait_for_port(smtp.port(), "postfix smtpd", None, START_TIMEOUT)?;
        wait_for_port(
            starttls.port(),
            "postfix smtpd (STARTTLS)",
            None,
            START_TIMEOUT,
        )?;
        Ok(instance)
    }

    /// Every process of this instance: the master and everything it forked.
    pub fn processes(&self) -> ServerProcesses {
        ServerProcesses::Tree {
            role: "postfix".to_owned(),
            root: self.master_pid,
        }
    }

    /// Messages in the hold queue.
    pub fn held(&self) -> u64 {
        count_files(&self.queue_dir.join("hold"))
    }

    /// Messages still queued for delivery (incoming, active, deferred).
    pub fn pending(&self) -> u64 {
        ["incoming", "active", "deferred"]
            .iter()
            .map(|q| count_files(&self.queue_dir.join(q)))
            .sum()
    }

    /// The last lines of the instance's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_file).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `postfix stop`, then SIGKILL for any process of the instance still alive after 15 s.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        super::unregister(&super::Live::Postfix {
            conf_dir: self.conf_dir.clone(),
            master: self.master_pid,
        });
        stop_instance(&self.conf_dir, self.master_pid);
    }

    fn read_master_pid(&self) -> Result<u32, PeerError> {
        let path = self.queue_dir.join("pid/master.pid");
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(pid) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .filter(|p| pid_alive(*p))
            {
                return Ok(pid);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(PeerError::NotReady {
            what: "postfix master".to_owned(),
            reason: format!("no live pid in {}:\n{}", path.display(), self.log_tail(20)),
        })
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops an instance: `postfix -c DIR stop`, then SIGKILL for any of its processes still
/// alive after 15 s (its master's tree is collected first: once the master exits, its
/// children are re-parented and could no longer be found).
pub fn stop_instance(conf_dir: &Path, master_pid: u32) {
    if master_pid == 0 {
        let _ = postfix_command(conf_dir, "stop");
        return;
    }
    let pids: Vec<u32> = procstat::tree(master_pid).iter().map(|s| s.pid).collect();
    let _ = postfix_command(conf_dir, "stop");
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && pids.iter().any(|p| pid_alive(*p)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in pids.iter().filter(|p| pid_alive(**p)) {
        tracing::warn!(
            pid,
            "postfix process still alive after `postfix stop`; killing it"
        );
        kill_pid(*pid);
    }
}

/// `postconf -d mail_version`.
pub fn version() -> Option<String> {
    let out = Command::new("/usr/sbin/postconf")
        .args(["-dh", "mail_version"])
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned()).filter(|v| !v.is_empty())
}

fn postfix_command(conf_dir: &Path, action: &str) -> Result<(), PeerError> {
    // The master inherits the pinning, and every process it forks inherits it from the master.
    let out = super::server_command(POSTFIX)
        .arg("-c")
        .arg(conf_dir)
        .arg(action)
        .output()
        .map_err(|source| PeerError::Spawn {
            what: format!("postfix {action}"),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    // `postfix start` logs its reasons to the instance log; a config error shows in postconf.
    let postconf = Command::new("/usr/sbin/postconf")
        .arg("-c")
        .arg(conf_dir)
        .arg("-n")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_default();
    Err(PeerError::Command {
        what: format!("postfix -c {} {action}", conf_dir.display()),
        reason: format!(
            "{} {} {postconf}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .trim()
        .to_owned(),
    })
}

/// Postfix refuses a data directory it does not own.
fn chown_to_postfix(dir: &Path) -> Result<(), PeerError> {
    let user = nix::unistd::User::from_name("postfix")
        .ok()
        .flatten()
        .ok_or_else(|| PeerError::ToolMissing {
            tool: "user postfix".to_owned(),
            hint: "install the Debian postfix package (make setup)",
        })?;
    nix::unistd::chown(dir, Some(user.uid), Some(user.gid)).map_err(|e| PeerError::WriteFile {
        path: dir.to_owned(),
        source: std::io::Error::from(e),
    })
}

/// Regular files under `dir` (queue directories are hashed one level deep at most).
fn count_files(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            Ok(t) if t.is_file() => 1,
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_have_every_placeholder() {
        for p in [
            "@QUEUE_DIR@",
            "@DATA_DIR@",
            "@LOG_FILE@",
            "@LOG_PREFIX@",
            "@PROCESS_LIMIT@",
            "@TLS_CHAIN_FILES@",
            "@EXTRA@",
        ] {
            assert!(MAIN_CF.contains(p), "{p}");
        }
        assert!(MASTER_CF.contains("@SMTPD_SERVICES@"));
        // Placeholders only where a value goes: a filled-in comment would break main.cf.
        for line in MAIN_CF.lines().filter(|l| l.starts_with('#')) {
            assert!(!line.contains('@'), "{line}");
        }
        for line in MAIN_CF.lines() {
            let setting = !line.starts_with('#') && !line.trim().is_empty();
            assert!(
                !setting || line.contains('=') || line == "@EXTRA@",
                "{line}"
            );
        }
        // No service may run chrooted: the instance has no chroot copies of /etc.
        for line in MASTER_CF
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() >= 8 {
                assert_eq!(cols[4], "n", "{line}");
            }
        }
    }
}
