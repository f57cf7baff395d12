//! A nats-server with JetStream for one kubemail run, in its own directory and on a free
//! loopback port, configured for one durability class:
//! * [`Durability::SyncAlways`]: `jetstream { sync_interval: always }`, an fsync of the
//!   stream before every acknowledgement, the same promise Postfix makes when it fsyncs each
//!   queue file before `250`;
//! * [`Durability::Default`]: JetStream's defaults (fsync every 2 minutes), reported as a
//!   separate, weaker class.

use std::path::Path;
use std::process::Stdio;

use serde::Serialize;

use super::{
    ManagedChild, PeerError, START_TIMEOUT, create_dir, free_port, log_file, server_command,
    wait_for_port, write_file,
};

/// What JetStream promises when it acknowledges a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Durability {
    /// fsync before the acknowledgement.
    SyncAlways,
    /// JetStream defaults: written to the OS, fsynced every 2 minutes.
    Default,
}

/// A running nats-server, or several forming one JetStream cluster.
pub struct NatsServer {
    child: ManagedChild,
    pub port: u16,
    /// The other servers of a cluster, with their client ports.
    others: Vec<(ManagedChild, u16)>,
}

impl NatsServer {
    /// Starts `binary` with a config file in `dir` (store under `dir/jetstream`).
    pub fn start(binary: &Path, dir: &Path, durability: Durability) -> Result<Self, PeerError> {
        create_dir(dir)?;
        let port = free_port()?;
        let store = dir.join("jetstream");
        let sync = match durability {
            Durability::SyncAlways => "\n  sync_interval: always",
            Durability::Default => "",
        };
        let config = format!(
            "# kubemail benchmark: one JetStream server, loopback only.\n\
             listen: \"127.0.0.1:{port}\"\n\
             jetstream {{\n  store_dir: \"{store}\"{sync}\n}}\n",
            store = store.display()
        );
        let config_path = dir.join("nats.conf");
        write_file(&config_path, &config)?;
        let log = log_file(&dir.join("nats.log"))?;
        let mut child = server_command(binary)
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(spawn_error)?)
            .stderr(log)
            .spawn()
            .map_err(spawn_error)?;
        wait_for_port(port, "nats-server", Some(&mut child), START_TIMEOUT)?;
        Ok(Self {
            child: ManagedChild::new(child, "nats-server"),
            port,
            others: Vec::new(),
        })
    }

    /// Starts `n` servers on loopback forming one JetStream cluster (routes on loopback), each
    /// with its store under `dir/n<i>`.
    pub fn start_cluster(
        binary: &Path,
        dir: &Path,
        n: usize,
        durability: Durability,
    ) -> Result<Self, PeerError> {
        create_dir(dir)?;
        let mut ports = Vec::new();
        let mut monitors = Vec::new();
        for _ in 0..n {
            ports.push((free_port()?, free_port()?));
            monitors.push(free_port()?);
        }
        let sync = match durability {
            Durability::SyncAlways => "\n  sync_interval: always",
            Durability::Default => "",
        };
        let mut children = Vec::new();
        for (i, (port, route)) in ports.iter().enumerate() {
            let routes: Vec<String> = ports
                .iter()
                .filter(|(_, r)| r != route)
                .map(|(_, r)| format!("nats-route://127.0.0.1:{r}"))
                .collect();
            let store = dir.join(format!("n{i}"));
            let config = format!(
                "# kubemail benchmark: server {i} of a {n}-server JetStream cluster, loopback only.\n\
                 server_name: n{i}\nlisten: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{}\"\n\
                 jetstream {{\n  store_dir: \"{store}\"{sync}\n}}\n\
                 cluster {{\n  name: bench\n  listen: \"127.0.0.1:{route}\"\n  routes: [{}]\n}}\n",
                monitors[i],
                routes.join(", "),
                store = store.display()
            );
            let config_path = dir.join(format!("n{i}.conf"));
            write_file(&config_path, &config)?;
            let log = log_file(&dir.join(format!("n{i}.log")))?;
            let child = server_command(binary)
                .arg("-c")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(spawn_error)?)
                .stderr(log)
                .spawn()
                .map_err(spawn_error)?;
            children.push((child, *port));
        }
        let mut managed = Vec::new();
        for (mut child, port) in children {
            wait_for_port(port, "nats-server", Some(&mut child), START_TIMEOUT)?;
            managed.push((ManagedChild::new(child, "nats-server"), port));
        }
        // A fresh cluster first elects its JetStream meta leader; until then every JetStream
        // request of the node would wait for its timeout.
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        for monitor in &monitors {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], *monitor));
            while super::kubemail::http_status(addr, "/healthz") != Some(200) {
                if std::time::Instant::now() > deadline {
                    return Err(PeerError::NotReady {
                        what: "nats-server cluster".to_owned(),
                        reason: format!("/healthz not 200 after {START_TIMEOUT:?}"),
                    });
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        let (child, port) = managed.remove(0);
        Ok(Self {
            child,
            port,
            others: managed,
        })
    }

    /// Every server's client URL, comma separated (the node's `nats.url` syntax).
    pub fn url(&self) -> String {
        std::iter::once(self.port)
            .chain(self.others.iter().map(|(_, p)| *p))
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Every server's process id.
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(self.child.pid())
            .chain(self.others.iter().map(|(c, _)| c.pid()))
            .collect()
    }

    pub fn stop(&mut self) {
        self.child.stop();
        for (child, _) in &mut self.others {
            child.stop();
        }
    }
}

fn spawn_error(source: std::io::Error) -> PeerError {
    PeerError::Spawn {
        what: "nats-server".to_owned(),
        source,
    }
}
