//! Start-up and shutdown of a whole node: load certificates and users, connect the queue,
//! bind every socket, serve until asked to stop, then drain.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::admin::{self, Readiness};
use crate::auth::Authenticator;
use crate::config::NodeConfig;
use crate::queue::jetstream::JetStreamQueue;
use crate::server::{self, ServerContext};
use crate::shutdown::Shutdown;
use crate::tls::TlsServer;

/// How long to wait for NATS to flush at exit.
const NATS_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot load the TLS certificate")]
    LoadTls(#[from] crate::tls::TlsError),
    #[error("cannot load users")]
    LoadUsers(#[from] crate::auth::UsersFileError),
    #[error("cannot set up the NATS client")]
    ConnectQueue(#[from] crate::queue::jetstream::ConnectError),
    #[error("cannot start the SMTP listeners")]
    StartServer(#[from] server::ServerError),
    #[error("admin endpoint")]
    Admin(#[from] admin::AdminError),
}

/// Checks everything `check-config` can check without the network: the config itself
/// (already validated by [`NodeConfig::load`]), the certificate and key, the users files.
pub fn check(config: &NodeConfig) -> Result<(), NodeError> {
    if let Some(tls) = &config.tls {
        TlsServer::load(tls)?;
    }
    Authenticator::load(config)?;
    Ok(())
}

/// Runs the node until `shutdown` is stopped (by the caller, on SIGTERM), then drains open
/// sessions for up to `shutdown.drainTimeout`.
pub async fn run(config: NodeConfig, shutdown: Shutdown) -> Result<(), NodeError> {
    let config = Arc::new(config);
    let background = CancellationToken::new();

    let tls = match &config.tls {
        Some(tls_config) => {
            let tls = TlsServer::load(tls_config)?;
            tokio::spawn(
                tls.clone()
                    .watch(tls_config.reload_interval.0, background.clone()),
            );
            Some(tls)
        }
        None => None,
    };
    let auth = Arc::new(Authenticator::load(&config)?);
    tokio::spawn(auth.clone().watch(background.clone()));

    let queue = JetStreamQueue::connect(&config.nats).await?;
    tokio::spawn(queue.clone().run_setup(background.clone()));

    let listeners = server::bind_listeners(&config).await?;
    let admin_socket = admin::bind(config.admin.address).await?;
    let readiness = Readiness::new(queue.clone(), shutdown.stop_token().clone());
    readiness.set_listeners_bound();
    let admin_task = tokio::spawn(admin::serve(admin_socket, readiness, background.clone()));

    let ctx = ServerContext::new(config.clone(), tls, auth, queue.clone(), shutdown.clone());
    tracing::info!(hostname = %config.hostname, "smtp node started");
    server::run(listeners, ctx).await;

    tracing::info!(drain = ?config.shutdown.drain_timeout.0, "draining sessions");
    let drained = shutdown.drain(config.shutdown.drain_timeout.0).await;
    if !drained {
        tracing::warn!("some sessions did not end in time");
    }
    background.cancel();
    // Every acknowledged publish is already stored; this only tidies up. With NATS away a
    // flush would wait for a reconnect forever, so it gets a short deadline.
    match tokio::time::timeout(NATS_FLUSH_TIMEOUT, queue.client().flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::debug!(%error, "flushing NATS at exit"),
        Err(_) => tracing::debug!("NATS flush at exit timed out"),
    }
    if let Ok(Err(error)) = admin_task.await {
        tracing::warn!(%error, "admin endpoint");
    }
    tracing::info!("smtp node stopped");
    Ok(())
}
