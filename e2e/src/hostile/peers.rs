//! The remote side of the hostile cases: Knot DNS serving zones the case writes (MX records
//! pointing wherever the case wants), Postfix's `smtp-sink` as a remote MX with its fault
//! options (`-q .` drops the connection after the final dot, `-W cmd:delay` stalls a reply),
//! a silent server that accepts connections and never speaks, and a scripted LMTP mail store
//! that knows its mailboxes. All on 127.x addresses.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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

// ---- a mail store that knows its mailboxes -------------------------------------------------

/// A scripted LMTP server (RFC 2033) on `127.0.0.1`, the inbound target of a catch-all domain:
/// `RCPT` is answered `250` for the local parts it knows, `451 4.3.0` for local parts that
/// start with `busy` (a store that cannot say now) and `550 5.1.1` for anything else. Local
/// parts in `gone` pass RCPT but fail after the data with `550 5.1.1` (a mailbox deleted
/// between the recipient check and the delivery). Counts RCPT commands and keeps every
/// message it took. At most [`MAIL_STORE_MAX_CONNECTIONS`], each read bounded by 30 s;
/// stops on drop.
pub struct MailStore {
    pub addr: SocketAddr,
    rcpts: Arc<AtomicUsize>,
    messages: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Connections a [`MailStore`] serves in its life (a recipient check costs one).
pub const MAIL_STORE_MAX_CONNECTIONS: usize = 2000;

/// What the store knows (local parts, lower case).
#[derive(Clone)]
struct Mailboxes {
    exist: Vec<String>,
    gone: Vec<String>,
}

impl MailStore {
    pub fn start(exist: &[&str], gone: &[&str]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind mail store");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let boxes = Mailboxes {
            exist: exist.iter().map(|s| s.to_ascii_lowercase()).collect(),
            gone: gone.iter().map(|s| s.to_ascii_lowercase()).collect(),
        };
        let rcpts = Arc::new(AtomicUsize::new(0));
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, m, s) = (rcpts.clone(), messages.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut served = 0;
            while !s.load(Ordering::Relaxed) && served < MAIL_STORE_MAX_CONNECTIONS {
                match listener.accept() {
                    Ok((conn, _)) => {
                        served += 1;
                        let (boxes, r, m) = (boxes.clone(), r.clone(), m.clone());
                        std::thread::spawn(move || {
                            let _ = serve_lmtp(conn, &boxes, &r, &m);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            addr,
            rcpts,
            messages,
            stop,
            thread: Some(thread),
        }
    }

    /// RCPT commands received so far (recipient checks and deliveries).
    pub fn rcpt_commands(&self) -> usize {
        self.rcpts.load(Ordering::Relaxed)
    }

    /// The messages taken so far, as received (dot-unstuffed, CRLF line ends).
    pub fn messages(&self) -> Vec<String> {
        self.messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for MailStore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_lmtp(
    conn: TcpStream,
    boxes: &Mailboxes,
    rcpts: &AtomicUsize,
    messages: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut out = conn.try_clone()?;
    let mut lines = BufReader::new(conn);
    out.write_all(b"220 store.test LMTP\r\n")?;
    // Per transaction: the accepted recipients, and whether each is gone.
    let mut accepted: Vec<bool> = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let upper = line.trim_end().to_ascii_uppercase();
        let reply: String = if upper.starts_with("LHLO") || upper.starts_with("EHLO") {
            "250-store.test\r\n250 ENHANCEDSTATUSCODES\r\n".into()
        } else if upper.starts_with("MAIL") || upper.starts_with("RSET") {
            accepted.clear();
            "250 2.0.0 ok\r\n".into()
        } else if let Some(rest) = upper.strip_prefix("RCPT TO:<") {
            rcpts.fetch_add(1, Ordering::Relaxed);
            let local = rest.split('@').next().unwrap_or("").to_ascii_lowercase();
            if local.starts_with("busy") {
                "451 4.3.0 mailbox store busy, try again later\r\n".into()
            } else if boxes.exist.contains(&local) || boxes.gone.contains(&local) {
                accepted.push(boxes.gone.contains(&local));
                "250 2.1.5 ok\r\n".into()
            } else {
                "550 5.1.1 no such mailbox\r\n".into()
            }
        } else if upper == "DATA" {
            out.write_all(b"354 go ahead\r\n")?;
            let mut message = String::new();
            loop {
                line.clear();
                if lines.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                if line == ".\r\n" {
                    break;
                }
                message.push_str(line.strip_prefix('.').unwrap_or(&line));
            }
            messages
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(message);
            accepted
                .drain(..)
                .map(|gone| {
                    if gone {
                        "550 5.1.1 mailbox deleted\r\n"
                    } else {
                        "250 2.0.0 delivered\r\n"
                    }
                })
                .collect()
        } else if upper == "QUIT" {
            out.write_all(b"221 2.0.0 bye\r\n")?;
            return Ok(());
        } else if upper == "NOOP" {
            "250 2.0.0 ok\r\n".into()
        } else {
            "500 5.5.1 unknown command\r\n".into()
        };
        out.write_all(reply.as_bytes())?;
    }
}
