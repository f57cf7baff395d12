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

/// A running nats-server.
pub struct NatsServer {
    child: ManagedChild,
    pub port: u16,
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
        })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn stop(&mut self) {
        self.child.stop();
    }
}

fn spawn_error(source: std::io::Error) -> PeerError {
    PeerError::Spawn {
        what: "nats-server".to_owned(),
        source,
    }
}
