//! nats-server for the hostile cases: one server, or a 3-server JetStream cluster on loopback
//! (`cluster {}` with routes between the three), each with its own store directory, every
//! server with `sync_interval: always` (fsync before each acknowledgement, the promise the
//! node's `250` relies on). Servers can be killed and restarted on
//! the same ports and stores, and a store can be given a size limit.
//!
//! Reading a stream back ([`read_stream`]) uses direct gets by sequence, so it does not
//! consume the work-queue entries.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{Proc, START_TIMEOUT, free_ports, require_tool, wait_for_port};

/// How the servers are set up.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// JetStream `max_file_store` per server (e.g. `"2MB"`); unset: the disk is the limit.
    pub max_file_store: Option<String>,
    /// Store directories to use instead of fresh temporary ones (e.g. a small tmpfs).
    pub store_dirs: Vec<PathBuf>,
}

/// One server of a [`Nats`] set.
struct Server {
    proc: Option<Proc>,
    client_port: u16,
    config: PathBuf,
}

/// One nats-server, or a 3-server cluster.
pub struct Nats {
    servers: Vec<Server>,
    _dir: tempfile::TempDir,
}

impl Nats {
    /// A single JetStream server (`sync_interval: always`).
    pub fn single(options: NatsOptions) -> Self {
        Self::start(1, options)
    }

    /// A 3-server JetStream cluster (R3 streams possible), `sync_interval: always` on each.
    pub fn cluster3(options: NatsOptions) -> Self {
        Self::start(3, options)
    }

    fn start(n: usize, options: NatsOptions) -> Self {
        let binary = require_tool("nats-server");
        let dir = tempfile::tempdir().expect("tempdir");
        // Clients and cluster routes: 2 ports per server, chosen together.
        let ports = free_ports::<6>();
        let (client, route) = (&ports[..n], &ports[3..3 + n]);
        let routes: Vec<String> = route
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect();
        let mut servers = Vec::new();
        for i in 0..n {
            let store = options
                .store_dirs
                .get(i)
                .cloned()
                .unwrap_or_else(|| dir.path().join(format!("store-{i}")));
            std::fs::create_dir_all(&store).expect("store dir");
            let limit = options
                .max_file_store
                .as_ref()
                .map(|l| format!("\n  max_file_store: {l}"))
                .unwrap_or_default();
            let cluster = if n > 1 {
                format!(
                    "cluster {{\n  name: hostile\n  listen: \"127.0.0.1:{}\"\n  routes: [{}]\n}}\n",
                    route[i],
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let text = format!(
                "# hostile suite: loopback only\nserver_name: n{i}\nlisten: \"127.0.0.1:{}\"\n\
                 jetstream {{\n  store_dir: \"{}\"\n  sync_interval: always{limit}\n}}\n{cluster}",
                client[i],
                store.display()
            );
            let config = dir.path().join(format!("nats-{i}.conf"));
            std::fs::write(&config, text).expect("nats config");
            servers.push(Server {
                proc: None,
                client_port: client[i],
                config,
            });
        }
        let mut nats = Self { servers, _dir: dir };
        for i in 0..n {
            nats.spawn(i, &binary);
        }
        nats.wait_jetstream(START_TIMEOUT);
        nats
    }

    fn spawn(&mut self, i: usize, binary: &std::path::Path) {
        let server = &mut self.servers[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(server.config.with_extension("log"))
            .expect("nats log");
        let mut child = Command::new(binary)
            .arg("-c")
            .arg(&server.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        let addr = SocketAddr::from(([127, 0, 0, 1], server.client_port));
        wait_for_port(addr, "nats-server", &mut child, START_TIMEOUT);
        server.proc = Some(Proc::new(child, format!("nats-server n{i}")));
    }

    /// Waits until JetStream answers (a cluster needs a meta leader first).
    pub fn wait_jetstream(&mut self, limit: Duration) {
        let url = self.live_url();
        let deadline = Instant::now() + limit;
        let rt = runtime();
        loop {
            let result = rt.block_on(async {
                let client =
                    match tokio::time::timeout(Duration::from_secs(3), async_nats::connect(&url))
                        .await
                    {
                        Ok(Ok(c)) => c,
                        Ok(Err(e)) => return Err(format!("connect: {e}")),
                        Err(_) => return Err("connect timed out".to_owned()),
                    };
                let js = async_nats::jetstream::new(client);
                match tokio::time::timeout(Duration::from_secs(3), js.query_account()).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("account info: {e}")),
                    Err(_) => Err("account info timed out".to_owned()),
                }
            });
            let Err(error) = result else {
                return;
            };
            assert!(
                Instant::now() < deadline,
                "JetStream at {url} not ready within {limit:?} ({error}):\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The first server's URL. The node and the helpers here connect to one URL and learn
    /// the other servers of a cluster from it (`connect_urls`), because async-nats does not
    /// take a comma-separated list in one string (see [`Nats::url_list`]).
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.servers[0].client_port)
    }

    /// Every server's URL, comma separated (the form the node's config documents).
    pub fn url_list(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The URL of the first server that is running.
    pub fn live_url(&mut self) -> String {
        for s in &mut self.servers {
            if s.proc.as_mut().is_some_and(Proc::running) {
                return format!("nats://127.0.0.1:{}", s.client_port);
            }
        }
        self.url()
    }

    /// Number of servers.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// SIGKILL server `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.servers[i].proc.take() {
            p.kill();
        }
    }

    /// Starts server `i` again (same port, config and store).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let binary = require_tool("nats-server");
        self.spawn(i, &binary);
    }

    /// The servers' logs, for failure messages.
    pub fn logs(&self) -> String {
        self.servers
            .iter()
            .map(|s| {
                let log =
                    std::fs::read_to_string(s.config.with_extension("log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                format!(
                    "---- {} (last lines) ----\n{}",
                    s.config.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A small runtime for the blocking helpers here.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// One queue entry as stored in the stream.
#[derive(Debug, Clone)]
pub struct StoredEntry {
    pub sequence: u64,
    pub headers: HashMap<String, String>,
    pub payload: Vec<u8>,
}

impl StoredEntry {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// Every entry of `stream` (without consuming it); empty when the stream does not exist.
/// Bodies stored in the object store are not resolved (the cases send small messages).
pub async fn read_stream(url: &str, stream: &str) -> Result<Vec<StoredEntry>, String> {
    let client = tokio::time::timeout(Duration::from_secs(10), async_nats::connect(url))
        .await
        .map_err(|_| format!("connect to {url} timed out"))?
        .map_err(|e| format!("connect to {url}: {e}"))?;
    let js = async_nats::jetstream::new(client);
    let mut s = match js.get_stream(stream).await {
        Ok(s) => s,
        Err(e) if e.to_string().contains("not found") => return Ok(Vec::new()),
        Err(e) => return Err(format!("get stream {stream}: {e}")),
    };
    let state = s
        .info()
        .await
        .map_err(|e| format!("stream info: {e}"))?
        .state
        .clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        let Ok(m) = s.get_raw_message(seq).await else {
            continue;
        };
        let headers = m
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    v.first().map(|v| v.as_str().to_owned()).unwrap_or_default(),
                )
            })
            .collect();
        out.push(StoredEntry {
            sequence: seq,
            headers,
            payload: m.payload.to_vec(),
        });
    }
    Ok(out)
}
