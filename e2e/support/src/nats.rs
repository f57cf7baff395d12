//! Real nats-server processes on loopback for integration tests: one server or a JetStream
//! cluster of several (routes on loopback), each with its own store, with extra configuration
//! (TLS, operator-mode trust, `sync_interval`), which a test may kill with SIGKILL and start
//! again on the same ports and store.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::ports::free_port;
use crate::wait::wait_for_port;

/// The nats-server binary on `PATH` (built by `e2e/tools/setup.sh`).
pub fn binary() -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("nats-server is not on PATH (e2e/tools/setup.sh builds it)"))
}

/// One server of a [`NatsCluster`].
pub struct NatsServer {
    pub name: String,
    pub port: u16,
    pub cluster_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Whether the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Servers that form one JetStream cluster (or a single server), stopped on drop.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `n` servers. `extra` is appended to every server's configuration (top level),
    /// e.g. a `tls {}` block or the operator-mode trust; `jetstream_extra` goes inside the
    /// `jetstream {}` block (e.g. `sync_interval: always`).
    pub fn start(n: usize, extra: &str, jetstream_extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let mut servers = Vec::new();
        for (i, (port, cluster_port)) in ports.iter().enumerate() {
            let name = format!("n{i}");
            let store = dir.path().join(&name);
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, c))| format!("nats-route://127.0.0.1:{c}"))
                .collect();
            let cluster = if n > 1 {
                format!(
                    "cluster {{\n  name: kubemail-test\n  listen: 127.0.0.1:{cluster_port}\n  routes: [{}]\n}}\n",
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let config = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{port}\n\
                 jetstream {{\n  store_dir: {store:?}\n  {jetstream_extra}\n}}\n{cluster}{extra}\n",
            );
            let path = dir.path().join(format!("{name}.conf"));
            std::fs::write(&path, config).expect("write nats config");
            servers.push(NatsServer {
                name: name.clone(),
                port: *port,
                cluster_port: *cluster_port,
                config: path,
                log: dir.path().join(format!("{name}.log")),
                child: None,
            });
        }
        let mut cluster = Self { servers, dir };
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_listening(i);
        }
        cluster
    }

    /// The directory holding configs, stores and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every client URL, comma separated (the node's `nats.url` syntax), with `scheme`.
    pub fn urls(&self, scheme: &str) -> String {
        self.servers
            .iter()
            .map(|s| format!("{scheme}://127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Stops server `i` at once, as a crash would (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts server `i` again on its ports with its store.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_listening(i);
    }

    fn spawn(&mut self, i: usize) {
        let server = &mut self.servers[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&server.log)
            .expect("open nats log");
        let child = Command::new(binary())
            .arg("-c")
            .arg(&server.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        server.child = Some(child);
    }

    fn wait_listening(&mut self, i: usize) {
        let server = &mut self.servers[i];
        let port = server.port;
        let name = server.name.clone();
        let mut child = server.child.take().expect("started");
        wait_for_port(
            ([127, 0, 0, 1], port).into(),
            &format!("nats-server {name}"),
            &mut child,
            Duration::from_secs(30),
        );
        server.child = Some(child);
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }
}
