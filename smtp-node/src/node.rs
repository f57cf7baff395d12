//! Start-up and shutdown of a whole node: load certificates, users and DKIM keys, connect the
//! queue, start the delivery workers, bind every socket, serve until asked to stop, then
//! drain (sessions finish their transactions, workers finish their deliveries).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::admin::{self, Readiness};
use crate::auth::Authenticator;
use crate::auth_limits::JetStreamFailures;
use crate::authres::InboundVerifier;
use crate::clock::Clock;
use crate::config::NodeConfig;
use crate::context::{ContextCell, MessageChecks, ServerContext};
use crate::delivery::{Delivery, DeliveryContext, DeliverySettings};
use crate::dkim::DkimSigner;
use crate::dns::HickoryResolver;
use crate::metrics::Metrics;
use crate::queue::jetstream::JetStreamQueue;
use crate::recipient_check::RecipientCheck;
use crate::reload::Reloader;
use crate::server;
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
    #[error("cannot load the DKIM keys")]
    LoadDkim(#[from] crate::dkim::DkimError),
    #[error("cannot set up the DNS resolver")]
    BuildResolver(#[from] crate::dns::BuildResolverError),
    #[error("cannot set up delivery")]
    StartDelivery(#[from] crate::delivery::StartDeliveryError),
    #[error("cannot bind the MTA-STS listener {address}")]
    BindMtaSts {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Checks everything `check-config` can check without the network: the config itself
/// (already validated by [`NodeConfig::load`]), the certificate and key, the users files, the
/// NATS credentials and CA files.
pub fn check(config: &NodeConfig) -> Result<(), NodeError> {
    if let Some(tls) = &config.tls {
        TlsServer::load(tls)?;
    }
    Authenticator::load(config)?;
    crate::queue::connect::options(&config.nats, "check-config")
        .map_err(crate::queue::jetstream::ConnectError::from)?;
    load_dkim(config)?;
    crate::delivery::tls::ClientTls::new(config.delivery.tls.extra_ca_file.as_deref())
        .map_err(crate::delivery::StartDeliveryError::from)?;
    Ok(())
}

/// The DKIM keys of every domain; `None` when no domain has one.
fn load_dkim(config: &NodeConfig) -> Result<Option<DkimSigner>, NodeError> {
    let signer = DkimSigner::load(config.domains.iter().map(|d| (d.name.as_str(), &d.dkim)))?;
    tracing::info!(keys = ?signer, "DKIM keys loaded");
    Ok((!signer.is_empty()).then_some(signer))
}

/// Where the node's config came from, so that a changed file can be reloaded.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: std::path::PathBuf,
    /// `--listen-ip`, applied to every reloaded config as to the first.
    pub listen_ip: Option<std::net::IpAddr>,
}

/// Runs the node until `shutdown` is stopped (by the caller, on SIGTERM), then drains open
/// sessions for up to `shutdown.drainTimeout`. `clock` is the wall clock of what is dated by
/// calendar day (TLS-RPT); everything counts in `metrics`, which `/metrics` shows.
pub async fn run(
    config: NodeConfig,
    shutdown: Shutdown,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
) -> Result<(), NodeError> {
    run_from(config, None, shutdown, clock, metrics).await
}

/// Like [`run`]; with a `source` the node also reloads the file when it changes (see
/// [`crate::reload`]).
pub async fn run_from(
    config: NodeConfig,
    source: Option<ConfigSource>,
    shutdown: Shutdown,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
) -> Result<(), NodeError> {
    let config = Arc::new(config);
    let background = CancellationToken::new();

    let tls = match &config.tls {
        Some(tls_config) => {
            let tls = TlsServer::load(tls_config)?;
            for (hostname, error) in
                tls.set_domain_certificates(config.domains.iter().filter_map(|d| d.tls.as_ref()))
            {
                // One tenant's broken certificate must not keep the others' mail out.
                metrics.tls_reload_failures.inc();
                tracing::error!(%hostname, %error, "cannot load a domain's certificate; its clients get the default one");
            }
            tokio::spawn(tls.clone().watch(
                tls_config.reload_interval.0,
                background.clone(),
                metrics.tls_reload_failures.clone(),
            ));
            Some(tls)
        }
        None => None,
    };
    let auth = Arc::new(Authenticator::load(&config)?);
    // The tasks a config reload replaces stop with their generation.
    let generation = background.child_token();
    tokio::spawn(auth.clone().watch(generation.clone()));

    let dkim = load_dkim(&config)?
        .map(|signer| Arc::new(signer.counted_in(metrics.dkim_signatures.clone())));
    let dane = &config.delivery.tls.dane;
    let resolver = if dane.enabled {
        HickoryResolver::with_dnssec(&config.dns, dane.trust_anchor_file.as_deref())?
    } else {
        HickoryResolver::new(&config.dns)?
    };
    let inbound_auth = config.inbound_auth.enabled.then(|| {
        Arc::new(InboundVerifier::new(
            resolver.authenticator(),
            &config.hostname,
            config.inbound_auth.clone(),
        ))
    });

    // The recipient probes speak to inbound targets as delivery does (same CA settings).
    let recipient_tls =
        crate::delivery::tls::ClientTls::new(config.delivery.tls.extra_ca_file.as_deref())
            .map_err(crate::delivery::StartDeliveryError::from)?
            .counted_in(metrics.tls_handshakes.clone());

    let domains: Vec<String> = config.domains.iter().map(|d| d.name.clone()).collect();
    let queue = JetStreamQueue::connect(&config.nats, &domains, metrics.clone()).await?;
    tokio::spawn(queue.clone().run_setup(background.clone()));
    tokio::spawn(
        queue
            .clone()
            .run_sweeper(crate::queue::sweeper::INTERVAL, background.clone()),
    );
    // Failed logins per user name are counted cluster-wide over the same connection.
    let auth_failures = JetStreamFailures::new(queue.client().clone(), &config.nats, &config.auth);
    tokio::spawn(auth_failures.clone().run_setup(background.clone()));
    auth.attach_shared_failures(
        auth_failures.clone(),
        metrics.auth_shared_counter_errors.clone(),
    );

    let delivery = DeliveryContext::new(
        DeliverySettings::from_config(&config),
        queue.client().clone(),
        Arc::new(resolver),
        dkim.clone(),
        shutdown.clone(),
        clock,
        metrics.clone(),
    )?;
    let delivery = Arc::new(delivery);
    queue.attach_events(delivery.events.clone());
    tokio::spawn(delivery.suppression.clone().run_sampler(
        domains.clone(),
        config.admin.queue_sample_interval.0,
        background.clone(),
    ));
    let delivery = Delivery::start(delivery, &domains);
    tokio::spawn(crate::queue::sampler::run(
        queue.jetstream().clone(),
        config.nats.clone(),
        domains.clone(),
        config.admin.queue_sample_interval.0,
        generation.clone(),
        metrics.clone(),
    ));

    let listeners = server::bind_listeners(&config).await?;
    if let (Some(server), Some(tls)) = (&config.mta_sts_server, &tls) {
        let hosts = crate::mta_sts_server::policy_hosts(&config.domains);
        let https = tls.https_config(hosts.keys().cloned().collect())?;
        let socket = tokio::net::TcpListener::bind(server.address)
            .await
            .map_err(|source| NodeError::BindMtaSts {
                address: server.address,
                source,
            })?;
        tracing::info!(address = %server.address, hosts = hosts.len(), "serving MTA-STS policies");
        tokio::spawn(crate::mta_sts_server::serve(
            socket,
            https,
            std::sync::Arc::new(hosts),
            background.clone(),
        ));
    }
    let admin_socket = admin::bind(config.admin.address).await?;
    let readiness = Readiness::new(queue.clone(), shutdown.accept_token().clone());
    readiness.set_listeners_bound();
    let admin_task = tokio::spawn(admin::serve(
        admin_socket,
        readiness,
        metrics.clone(),
        background.clone(),
    ));

    let recipients = config.recipient_verification.enabled.then(|| {
        Arc::new(RecipientCheck::new(
            config.recipient_verification.clone(),
            &config.hostname,
            recipient_tls,
            metrics.recipient_checks.clone(),
        ))
    });
    let checks = MessageChecks {
        dkim,
        inbound_auth,
        recipients,
        suppression: Some(delivery.context().suppression.clone()),
    };
    let ctx = ServerContext::with_checks(
        config.clone(),
        tls,
        auth,
        queue.clone(),
        shutdown.clone(),
        checks,
        metrics,
    );
    let cell = ContextCell::new(ctx);
    match source {
        Some(source) => {
            let reloader = Reloader::new(
                source.path,
                source.listen_ip,
                config.clone(),
                cell.clone(),
                delivery,
                auth_failures,
                queue.clone(),
                generation,
                background.clone(),
            );
            tokio::spawn(reloader.run());
        }
        // Without a file to watch the domains never change: dropping the handle leaves the
        // pull loops running until the node's stop signal.
        None => drop(delivery),
    }
    tracing::info!(hostname = %config.hostname, domains = domains.len(), "smtp node started");
    server::run(listeners, cell).await;

    tracing::info!(drain = ?config.shutdown.drain_timeout.0, "draining sessions and deliveries");
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
