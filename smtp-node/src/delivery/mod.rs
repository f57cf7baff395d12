//! The sending side: delivery workers that take queue entries from JetStream and deliver
//! them to inbound targets, relays and remote MX hosts, retrying and bouncing as needed.
//!
//! * [`consumer`]: the per-domain durable pull consumer and the pull loop;
//! * [`worker`]: one entry from pull to ack: route, deliver, decide, republish, bounce;
//! * [`route`]: which destination each recipient goes to;
//! * [`mx`]: MX resolution and ordering; [`address_policy`]: which addresses may be reached;
//! * [`policy`]: outbound transport security: MTA-STS, DANE, overrides, REQUIRETLS, TLS-RPT;
//! * [`client`]: the SMTP/LMTP client (its wire syntax is [`crate::protocol::client`]);
//!   [`tls`]: client TLS;
//! * [`relay`]: smarthosts; [`limits`]: per-destination connection caps and reuse;
//! * [`outcome`]: typed results and the entry decision; [`retry`]: the schedule;
//! * [`dsn`]: bounces and delay notices;
//! * [`admin`]: what operators' actions on the queue mean to a worker; [`pause`]: delivery
//!   pauses; [`shaping`]: cluster-wide connection and rate limits per destination;
//! * [`metrics`]: counters and latencies. The settings are in [`crate::config`].
//!
//! Entries are read and written with the queue contract's one codec,
//! [`kubemail_queue::QueueEntry`] (envelope and retry state in the entry's headers).

pub mod address_policy;
pub mod admin;
pub mod client;
pub mod consumer;
pub mod dsn;
pub mod limits;
pub mod metrics;
pub mod mx;
pub mod outcome;
pub mod pause;
pub mod policy;
pub mod relay;
pub mod retry;
pub mod route;
pub mod shaping;
pub mod tls;
pub mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::object_store::ObjectStore;

use self::address_policy::AddressPolicy;
use self::limits::ConnectionPool;
use self::relay::Relay;
use self::route::{DomainRouting, RoutingTable};
use self::tls::ClientTls;
use crate::clock::Clock;
use crate::config::{DeliveryConfig, NatsConfig, RetryConfig};
use crate::dkim::DkimSigner;
use crate::dns::Resolver;
use crate::shutdown::Shutdown;

/// Why delivery could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartDeliveryError {
    #[error("invalid network in delivery.allowedNetworks/blockedNetworks: {0}")]
    Networks(String),
    #[error("cannot set up outbound TLS")]
    Tls(#[from] tls::ClientTlsError),
}

/// What the delivery side needs from the node configuration.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// Our host name: EHLO name, `Reporting-MTA` of DSNs.
    pub hostname: String,
    pub delivery: DeliveryConfig,
    pub nats: NatsConfig,
    /// Our domains with their inbound targets and relays.
    pub domains: Vec<DomainRouting>,
    /// Domains with a retry schedule of their own (`retryIntervals`).
    pub retry_by_domain: HashMap<String, RetryConfig>,
}

impl DeliverySettings {
    /// The delivery view of the node configuration.
    pub fn from_config(config: &crate::config::NodeConfig) -> Self {
        Self {
            hostname: config.hostname.clone(),
            delivery: config.delivery.clone(),
            nats: config.nats.clone(),
            domains: config
                .domains
                .iter()
                .map(|d| DomainRouting {
                    name: d.name.clone(),
                    inbound: d.inbound.clone(),
                    relay: d.relay.clone(),
                })
                .collect(),
            retry_by_domain: config
                .domains
                .iter()
                .filter(|d| !d.retry_intervals.is_empty())
                .map(|d| {
                    (
                        d.name.to_ascii_lowercase(),
                        config.delivery.retry.for_domain(&d.retry_intervals),
                    )
                })
                .collect(),
        }
    }
}

/// Everything a worker uses, shared by all workers of the node.
pub struct DeliveryContext {
    pub hostname: String,
    pub config: DeliveryConfig,
    pub nats: NatsConfig,
    pub routing: RoutingTable,
    pub relays: HashMap<String, Relay>,
    pub resolver: Arc<dyn Resolver>,
    pub policy: AddressPolicy,
    pub tls: ClientTls,
    pub pool: Arc<ConnectionPool>,
    pub signer: Option<Arc<DkimSigner>>,
    pub js: async_nats::jetstream::Context,
    pub shutdown: Shutdown,
    /// MTA-STS, DANE and the overrides of `delivery.tls`.
    pub policies: policy::Policies,
    /// TLS-RPT results and reports.
    pub tlsrpt: Arc<policy::tlsrpt::TlsRpt>,
    /// Delivery pauses in force.
    pub pauses: Arc<pause::Pauses>,
    /// Cluster-wide connection and rate limits.
    pub shaper: Arc<shaping::Shaper>,
    /// Marks of entries operators replaced.
    pub replaced: admin::ReplacedMarks,
    retry_by_domain: HashMap<String, RetryConfig>,
    bodies: Mutex<HashMap<String, ObjectStore>>,
}

impl DeliveryContext {
    /// Builds the context; touches no network. `clock` dates the TLS-RPT results and reports.
    pub fn new(
        settings: DeliverySettings,
        client: async_nats::Client,
        resolver: Arc<dyn Resolver>,
        signer: Option<Arc<DkimSigner>>,
        shutdown: Shutdown,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StartDeliveryError> {
        let d = &settings.delivery;
        let policy = AddressPolicy::new(&d.allowed_networks, &d.blocked_networks)
            .map_err(StartDeliveryError::Networks)?;
        let tls = ClientTls::new(d.tls.extra_ca_file.as_deref())?;
        let relays = settings
            .domains
            .iter()
            .filter_map(|dom| {
                dom.relay
                    .clone()
                    .map(|r| (dom.name.to_ascii_lowercase(), Relay::new(r)))
            })
            .collect();
        let mut js = async_nats::jetstream::new(client);
        js.set_timeout(settings.nats.publish_timeout.0);
        let mta_sts = Arc::new(policy::mta_sts::MtaSts::new(
            d.tls.mta_sts.clone(),
            resolver.clone(),
            policy.clone(),
            tls.clone(),
            js.clone(),
        ));
        let policies = policy::Policies::new(d.tls.clone(), d.mx_port, resolver.clone(), mta_sts);
        let tlsrpt = Arc::new(policy::tlsrpt::TlsRpt::new(
            d.tls.reports.clone(),
            js.clone(),
            clock,
        ));
        let shaper = shaping::Shaper::new(
            d.shaping.clone(),
            js.clone(),
            // Objects a node creates itself are R1, as for the TLS policy cache.
            1,
            &settings.hostname,
        );
        Ok(Self {
            pauses: pause::Pauses::new(),
            shaper,
            replaced: admin::ReplacedMarks::default(),
            retry_by_domain: settings.retry_by_domain,
            hostname: settings.hostname,
            pool: Arc::new(ConnectionPool::new(d.connections.clone())),
            config: settings.delivery,
            nats: settings.nats,
            routing: RoutingTable::new(settings.domains.clone()),
            relays,
            resolver,
            policy,
            tls,
            signer,
            js,
            shutdown,
            policies,
            tlsrpt,
            bodies: Mutex::new(HashMap::new()),
        })
    }

    /// The retry schedule of `domain`'s entries.
    pub fn retry_config(&self, domain: &str) -> RetryConfig {
        self.retry_by_domain
            .get(&domain.to_ascii_lowercase())
            .cloned()
            .unwrap_or_else(|| self.config.retry.clone())
    }

    /// The object store `bucket`, opened once.
    pub(crate) async fn object_store(
        &self,
        bucket: &str,
    ) -> Result<ObjectStore, async_nats::jetstream::context::ObjectStoreError> {
        if let Some(store) = self
            .bodies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(bucket)
        {
            return Ok(store.clone());
        }
        let store = self.js.get_object_store(bucket).await?;
        self.bodies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(bucket.to_owned(), store.clone());
        Ok(store)
    }
}

/// Starts one pull loop per domain and the connection reaper; they run until the node's
/// stop signal. Returns the tasks' handles.
pub fn start(ctx: Arc<DeliveryContext>, domains: &[String]) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for domain in domains {
        metrics::global().init_domain(domain);
    }
    if !ctx.config.enabled {
        tracing::info!("delivery is disabled on this node");
        return tasks;
    }
    tasks.push(tokio::spawn(
        ctx.pool
            .clone()
            .run_reaper(ctx.shutdown.stop_token().clone()),
    ));
    tasks.push(tokio::spawn(pause::run_watch(
        ctx.js.clone(),
        ctx.pauses.clone(),
        ctx.shutdown.stop_token().clone(),
    )));
    tasks.push(tokio::spawn(
        ctx.shaper
            .clone()
            .run_renewal(ctx.shutdown.stop_token().clone()),
    ));
    for domain in domains {
        tasks.push(tokio::spawn(consumer::run(ctx.clone(), domain.clone())));
    }
    let stop = ctx.shutdown.stop_token().clone();
    tasks.push(tokio::spawn(
        ctx.policies.mta_sts.clone().run_refresh(stop.clone()),
    ));
    let report_ctx = ctx.clone();
    tasks.push(tokio::spawn(ctx.tlsrpt.clone().run(
        move || policy::tlsrpt::ReportContextOwned {
            hostname: report_ctx.hostname.clone(),
            subject_prefix: report_ctx.nats.subject_prefix.clone(),
            resolver: report_ctx.resolver.clone(),
            signer: report_ctx.signer.clone(),
        },
        domains.to_vec(),
        stop,
    )));
    tasks
}
