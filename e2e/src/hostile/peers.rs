//! The remote side of the hostile cases: Knot DNS serving zones the case writes (MX records
//! pointing wherever the case wants), Postfix's `smtp-sink` as a remote MX with its fault
//! options (`-q .` drops the connection after the final dot, `-W cmd:delay` stalls a reply),
//! and a silent server that accepts connections and never speaks. All on 127.x addresses.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::process::{Proc, free_port, require_tool, wait_until};

// ---- Knot DNS -----------------------------------------------------------------------------

/// An authoritative Knot DNS server on 127.0.0.1 for the zones given.
pub struct Knot {
    _proc: Proc,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Knot {
    /// Starts knotd with `zones`: (origin, records relative to it); SOA and NS are added, and
    /// the parent `test.` zone is always served (resolvers walk up for DMARC).
    pub fn start(zones: &[(&str, String)]) -> Self {
        let knotd = require_tool("knotd");
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let prepared = kubemail_test_support::knot::prepare(d, zones);
        for _ in 0..5 {
            let port = free_port();
            std::fs::write(d.join("knot.conf"), prepared.config(port)).expect("knot.conf");
            let log = std::fs::File::create(d.join("knot.log")).expect("knot log");
            let child = Command::new(&knotd)
                .arg("-c")
                .arg(d.join("knot.conf"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("spawn knotd");
            let mut proc = Proc::new(child, "knotd");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && proc.running() {
                if prepared.serves_all(port) {
                    return Self {
                        _proc: proc,
                        port,
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!(
            "knotd did not serve its zones:\n{}",
            std::fs::read_to_string(d.join("knot.log")).unwrap_or_default()
        );
    }

    /// `127.0.0.1:port`, for the node's `dns.nameservers`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

// ---- smtp-sink ----------------------------------------------------------------------------

/// Postfix's `smtp-sink` on `ip:port`, dumping each transaction it completes into a file.
pub struct Sink {
    proc: Option<Proc>,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Sink {
    /// Starts smtp-sink on `ip:port` with extra options (e.g. `["-q", "."]`).
    pub fn start(ip: IpAddr, port: u16, options: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let dumps = dir.path().join("dumps");
        std::fs::create_dir_all(&dumps).expect("dumps dir");
        // smtp-sink drops privileges to `nobody` (required as root) and writes as it.
        let _ = Command::new("chmod")
            .args(["777", &dumps.display().to_string()])
            .status();
        let mut sink = Self {
            proc: None,
            addr: SocketAddr::new(ip, port),
            dir,
        };
        sink.restart(options);
        sink
    }

    /// Stops it and starts it again on the same address with `options`.
    pub fn restart(&mut self, options: &[&str]) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
        let binary = require_tool("smtp-sink");
        let template = format!("{}/msg.", self.dir.path().join("dumps").display());
        let child = Command::new(binary)
            .args(["-u", "nobody", "-d", &template])
            .args(options)
            .arg(self.addr.to_string())
            .arg("64")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn smtp-sink");
        let mut proc = Proc::new(child, "smtp-sink");
        let addr = self.addr;
        wait_until(Duration::from_secs(20), "smtp-sink to listen", || {
            assert!(proc.running(), "smtp-sink exited (port {addr} taken?)");
            TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .is_ok()
                .then_some(())
        });
        self.proc = Some(proc);
    }

    /// The transactions it completed (dump files: envelope as `X-` lines, then the message).
    pub fn transactions(&self) -> Vec<String> {
        kubemail_test_support::smtp_sink::transactions(&self.dir.path().join("dumps"))
    }

    /// How many completed transactions contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        kubemail_test_support::smtp_sink::count(&self.dir.path().join("dumps"), needle)
    }
}

// ---- a server that never speaks ---------------------------------------------------------

/// Accepts connections on `ip:port` and holds them open without writing a byte (a remote
/// that is slow past every timeout). Counts connections. Stops (and closes them) on drop.
pub struct Silent {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Silent {
    pub fn start(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).expect("bind silent server");
        listener.set_nonblocking(true).expect("nonblocking");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            // Bounded: it lives as long as its case, and holds at most 1000 sockets.
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) if held.len() < 1000 => {
                        a.fetch_add(1, Ordering::Relaxed);
                        held.push(conn);
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
