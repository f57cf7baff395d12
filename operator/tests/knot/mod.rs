//! Knot DNS on a free loopback port serving one zone below `test.`, for the DNS check's tests;
//! killed on drop. Needs `/usr/sbin/knotd` (Debian package knot).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kubemail_test_support::knot::{self, Prepared};
use kubemail_test_support::ports::free_port;
use kubemail_test_support::wait::wait_until;

const KNOTD: &str = "/usr/sbin/knotd";

pub struct Knot {
    child: Option<Child>,
    port: u16,
    origin: String,
    dir: tempfile::TempDir,
}

impl Knot {
    /// Serves `origin` with `records` (zone-file lines; SOA and NS are added).
    pub fn start(origin: &str, records: &str) -> Self {
        assert!(
            Path::new(KNOTD).is_file(),
            "{KNOTD} is missing (Debian package knot)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let prepared = knot::prepare(dir.path(), &[(origin, records.to_owned())]);
        for _ in 0..5 {
            let port = free_port();
            if let Some(child) = spawn(dir.path(), &prepared, port) {
                return Self {
                    child: Some(child),
                    port,
                    origin: origin.to_owned(),
                    dir,
                };
            }
        }
        panic!(
            "knotd did not start on a free port after 5 attempts:\n{}",
            log(dir.path())
        );
    }

    /// Serves `records` instead, on the same port (a restart of knotd).
    pub fn replace(&mut self, records: &str) {
        self.stop();
        let prepared = knot::prepare(
            self.dir.path(),
            &[(self.origin.as_str(), records.to_owned())],
        );
        self.child = Some(
            spawn(self.dir.path(), &prepared, self.port).unwrap_or_else(|| {
                panic!(
                    "knotd did not start again on port {}:\n{}",
                    self.port,
                    log(self.dir.path())
                )
            }),
        );
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("---- knotd log ----\n{}", log(self.dir.path()));
        }
    }
}

/// knotd on `port`, once it serves every zone; `None` when it exited first (port taken).
fn spawn(dir: &Path, prepared: &Prepared, port: u16) -> Option<Child> {
    let conf = dir.join("knot.conf");
    std::fs::write(&conf, prepared.config(port)).expect("knot.conf");
    let log = std::fs::File::create(dir.join("knot.log")).expect("knot log");
    let mut child = Command::new(KNOTD)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn knotd");
    let served = wait_until(Duration::from_secs(20), "knotd to serve its zones", || {
        if prepared.serves_all(port) {
            Some(true)
        } else if matches!(child.try_wait(), Ok(Some(_))) {
            Some(false)
        } else {
            None
        }
    });
    if served {
        Some(child)
    } else {
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("knot.log")).unwrap_or_default()
}
