//! Config reload: the node looks at its config file every `configReloadInterval` and, when its
//! content changed (SHA-256 of the bytes, so a ConfigMap's `..data` symlink swap, a rewrite
//! with the same mtime or a touch without change all count right), loads it, validates it and
//! swaps in what depends on the domains:
//!
//! ```text
//! config file ─► NodeConfig::load ─┬─► users (Authenticator)   ┐
//!                                  ├─► DKIM signer              ├─► next ServerContext ─► new sessions
//!                                  ├─► domain certificates (SNI table of the TlsServer)
//!                                  ├─► delivery domain table (routes, relays, signer)
//!                                  ├─► delivery pull loops (start added domains, stop removed)
//!                                  ├─► body buckets of added domains (set up in the background)
//!                                  └─► queue depth sampler (the domains' gauges)
//! ```
//!
//! The NATS credentials file (`nats.credentialsFile`) is watched the same way: when its content
//! changes (a pool's credentials re-minted for the domains now attached), the node reconnects
//! to NATS, which reads the file again, so the new permissions apply without a restart.
//! Publishes waiting for an acknowledgement across the reconnection are retried by the client
//! or answered with a temporary error; nothing accepted is lost.
//!
//! Sessions already open keep the context they started with; nothing is restarted, no socket
//! closes and no queued entry is touched. A file that does not load (invalid YAML, a key that
//! cannot be read) changes nothing: the error is logged and counted once, and the file is
//! tried again at every tick (the files it names may still be arriving). What cannot change at
//! run time (listeners, NATS, the admin endpoint, delivery settings, connection caps) is kept
//! as started, with a warning that it needs a restart.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::auth_limits::JetStreamFailures;
use crate::config::NodeConfig;
use crate::context::{ContextCell, MessageChecks};
use crate::delivery::Delivery;
use crate::delivery::route::DomainRouting;
use crate::dkim::DkimSigner;
use crate::metrics::DomainLabels;
use crate::queue::jetstream::JetStreamQueue;

/// Why a changed config file was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("cannot load the config")]
    Load(#[from] crate::config::ConfigError),
    #[error("cannot load the users")]
    LoadUsers(#[from] crate::auth::UsersFileError),
    #[error("cannot load the DKIM keys")]
    LoadDkim(#[from] crate::dkim::DkimError),
}

/// What a reload changed, for the log and for tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub domains: usize,
}

/// Everything a reload replaces or updates.
pub struct Reloader {
    path: PathBuf,
    listen_ip: Option<IpAddr>,
    digest: Option<[u8; 32]>,
    /// The content that last failed to apply: retried every tick (a file it names may still
    /// be on its way, e.g. the next volume of a pod), reported once.
    failed: Option<[u8; 32]>,
    config: Arc<NodeConfig>,
    cell: Arc<ContextCell>,
    delivery: Delivery,
    auth_failures: Arc<JetStreamFailures>,
    queue: Arc<JetStreamQueue>,
    /// The content of the NATS credentials file the connection was made with.
    credentials: Option<[u8; 32]>,
    /// Stops the users-file watcher and the queue sampler of the current generation.
    generation: CancellationToken,
    background: CancellationToken,
}

impl Reloader {
    /// Takes over the node's running parts. `config` is what the node started with (already
    /// moved to `listen_ip`); `generation` stops the tasks that a reload replaces.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        path: PathBuf,
        listen_ip: Option<IpAddr>,
        config: Arc<NodeConfig>,
        cell: Arc<ContextCell>,
        delivery: Delivery,
        auth_failures: Arc<JetStreamFailures>,
        queue: Arc<JetStreamQueue>,
        generation: CancellationToken,
        background: CancellationToken,
    ) -> Self {
        let digest = std::fs::read(&path).ok().map(|b| sha256(&b));
        let credentials = credentials_digest(&config);
        Self {
            path,
            listen_ip,
            digest,
            failed: None,
            config,
            cell,
            delivery,
            auth_failures,
            queue,
            credentials,
            generation,
            background,
        }
    }

    /// Polls the file until `background` fires.
    pub async fn run(mut self) {
        let mut ticker = tokio::time::interval(self.config.config_reload_interval.0);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = self.background.cancelled() => return,
                _ = ticker.tick() => {}
            }
            self.reconnect_if_credentials_changed().await;
            let Ok(bytes) = std::fs::read(&self.path) else {
                // Mid-swap or briefly missing: look again at the next tick.
                continue;
            };
            let digest = sha256(&bytes);
            if Some(digest) == self.digest {
                continue;
            }
            let started = Instant::now();
            match self.apply() {
                Ok(applied) => {
                    self.digest = Some(digest);
                    self.failed = None;
                    self.cell.current().metrics.config_reloads.inc();
                    tracing::info!(
                        domains = applied.domains,
                        added = ?applied.added,
                        removed = ?applied.removed,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "config reloaded"
                    );
                }
                Err(error) => {
                    if self.failed != Some(digest) {
                        self.failed = Some(digest);
                        self.cell.current().metrics.config_reload_failures.inc();
                        tracing::error!(error = %chain(&error), "the changed config cannot be applied; keeping the previous one and trying again");
                    }
                }
            }
        }
    }

    /// Reconnects to NATS when the credentials file's content changed, so the connection
    /// carries the new permissions (a domain just attached). An unreadable file (mid-swap)
    /// waits for the next tick.
    async fn reconnect_if_credentials_changed(&mut self) {
        let Some(digest) = credentials_digest(&self.config) else {
            return;
        };
        if Some(digest) == self.credentials {
            return;
        }
        self.credentials = Some(digest);
        tracing::info!("the NATS credentials changed; reconnecting with them");
        if let Err(error) = self.queue.client().force_reconnect().await {
            tracing::warn!(%error, "cannot reconnect to NATS; the client keeps trying");
        }
    }

    /// Loads the file and swaps in its domains. Public for tests.
    pub fn apply(&mut self) -> Result<Applied, ReloadError> {
        let mut config = NodeConfig::load(&self.path)?;
        if let Some(ip) = self.listen_ip {
            config.bind_to(ip);
        }
        warn_about_restart_only_changes(&self.config, &config);
        let config = Arc::new(config);
        // Everything that can fail first, so a bad file changes nothing.
        let auth = Arc::new(Authenticator::load(&config)?);
        let current = self.cell.current();
        let metrics = current.metrics.clone();
        let signer = DkimSigner::load(config.domains.iter().map(|d| (d.name.as_str(), &d.dkim)))?
            .counted_in(metrics.dkim_signatures.clone());
        let signer = (!signer.is_empty()).then(|| Arc::new(signer));
        if let Some(tls) = &current.tls {
            for (hostname, error) in
                tls.set_domain_certificates(config.domains.iter().filter_map(|d| d.tls.as_ref()))
            {
                metrics.tls_reload_failures.inc();
                tracing::error!(%hostname, %error, "cannot load a domain's certificate; its clients get the default one");
            }
        }

        let generation = self.background.child_token();
        auth.attach_shared_failures(
            self.auth_failures.clone(),
            metrics.auth_shared_counter_errors.clone(),
        );
        tokio::spawn(auth.clone().watch(generation.clone()));
        let checks = MessageChecks {
            dkim: signer.clone(),
            inbound_auth: current.checks.inbound_auth.clone(),
            suppression: current.checks.suppression.clone(),
            recipients: current.checks.recipients.clone(),
        };
        self.cell
            .replace(current.successor(config.clone(), auth, checks));

        let routing: Vec<DomainRouting> = config
            .domains
            .iter()
            .map(|d| DomainRouting {
                name: d.name.clone(),
                inbound: d.inbound.clone(),
                relay: d.relay.clone(),
            })
            .collect();
        self.delivery.context().set_domains(
            &routing,
            signer,
            crate::delivery::retry_by_domain(&config),
        );
        let names: Vec<String> = config.domains.iter().map(|d| d.name.clone()).collect();
        let (added, removed) = self.delivery.set_domains(&names);
        self.queue.set_domains(&names, self.background.clone());
        for domain in &removed {
            let labels = DomainLabels {
                domain: domain.clone(),
            };
            metrics.queue_messages.remove(&labels);
            metrics.queue_oldest_age_seconds.remove(&labels);
        }
        tokio::spawn(crate::queue::sampler::run(
            self.delivery.context().js.clone(),
            config.nats.clone(),
            names,
            config.admin.queue_sample_interval.0,
            generation.clone(),
            metrics.clone(),
        ));
        self.generation.cancel();
        self.generation = generation;
        let domains = config.domains.len();
        self.config = config;
        Ok(Applied {
            added,
            removed,
            domains,
        })
    }
}

/// SHA-256 of the NATS credentials file `config` names, if it names one and it can be read.
fn credentials_digest(config: &NodeConfig) -> Option<[u8; 32]> {
    let path = config.nats.credentials_file.as_ref()?;
    std::fs::read(path).ok().map(|b| sha256(&b))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// An error with its causes, `a: b: c`.
fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Settings read only at start-up: a change is logged, not applied.
fn warn_about_restart_only_changes(old: &NodeConfig, new: &NodeConfig) {
    let changed: Vec<&str> = [
        ("listeners", old.listeners != new.listeners),
        ("nats", old.nats != new.nats),
        ("admin", old.admin != new.admin),
        ("delivery", old.delivery != new.delivery),
        ("tls", old.tls != new.tls),
        ("dns", old.dns != new.dns),
        (
            "maxConnections",
            old.max_connections != new.max_connections
                || old.max_connections_per_ip != new.max_connections_per_ip,
        ),
    ]
    .into_iter()
    .filter_map(|(name, differs)| differs.then_some(name))
    .collect();
    if !changed.is_empty() {
        tracing::warn!(sections = ?changed, "these config sections changed but apply only after a restart");
    }
}
