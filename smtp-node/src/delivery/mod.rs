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
//!   [`classify`]: the bounce class of a failure;
//! * [`dsn`]: bounces and delay notices;
//! * [`admin`]: what operators' actions on the queue mean to a worker; [`pause`]: delivery
//!   pauses; [`shaping`]: cluster-wide connection and rate limits per destination;
//! * [`metrics`]: counters and latencies. The settings are in [`crate::config`].
//!
//! Entries are read and written with the queue contract's one codec,
//! [`kubemail_queue::QueueEntry`] (envelope and retry state in the entry's headers).

pub mod address_policy;
pub mod admin;
pub mod classify;
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
use std::sync::{Arc, Mutex, RwLock};

use async_nats::jetstream::object_store::ObjectStore;
use tokio_util::sync::CancellationToken;

use self::address_policy::AddressPolicy;
use self::limits::ConnectionPool;
use self::relay::Relay;
use self::route::{DomainRouting, RoutingTable};
use self::tls::ClientTls;
use crate::clock::Clock;
use crate::config::{DeliveryConfig, NatsConfig, RetryConfig};
use crate::dkim::DkimSigner;
use crate::dns::Resolver;
use crate::metrics::Metrics;
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
    /// Delivery events, classification rules and the suppression list.
    pub events: crate::config::EventsConfig,
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
            events: config.events.clone(),
            retry_by_domain: retry_by_domain(config),
        }
    }
}

/// The domains of `config` with a retry schedule of their own (`retryIntervals`).
pub fn retry_by_domain(config: &crate::config::NodeConfig) -> HashMap<String, RetryConfig> {
    config
        .domains
        .iter()
        .filter(|d| !d.retry_intervals.is_empty())
        .map(|d| {
            (
                d.name.to_ascii_lowercase(),
                config.delivery.retry.for_domain(&d.retry_intervals),
            )
        })
        .collect()
}

/// Everything a worker uses, shared by all workers of the node.
pub struct DeliveryContext {
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
    pub hostname: String,
    pub config: DeliveryConfig,
    pub nats: NatsConfig,
    pub resolver: Arc<dyn Resolver>,
    pub policy: AddressPolicy,
    pub tls: ClientTls,
    pub pool: Arc<ConnectionPool>,
    pub js: async_nats::jetstream::Context,
    pub shutdown: Shutdown,
    /// What depends on the node's domains; swapped whole by a config reload.
    domains: RwLock<Arc<DomainTable>>,
    /// MTA-STS, DANE and the overrides of `delivery.tls`.
    pub policies: policy::Policies,
    /// TLS-RPT results and reports.
    pub tlsrpt: Arc<policy::tlsrpt::TlsRpt>,
    /// Delivery events and the bounce classifier.
    pub events: Arc<crate::events::Events>,
    /// The domains' suppression lists.
    pub suppression: Arc<crate::suppression::Suppression>,
    /// Delivery pauses in force.
    pub pauses: Arc<pause::Pauses>,
    /// Cluster-wide connection and rate limits.
    pub shaper: Arc<shaping::Shaper>,
    /// Marks of entries operators replaced.
    pub replaced: admin::ReplacedMarks,
    bodies: Mutex<HashMap<String, ObjectStore>>,
}

/// The per-domain side of delivery: routes, relays, DKIM keys. A worker takes the current
/// table once per entry, so one entry is handled with one consistent set.
pub struct DomainTable {
    /// The domains' names, as configured.
    pub names: Vec<String>,
    pub routing: RoutingTable,
    pub relays: HashMap<String, Arc<Relay>>,
    pub signer: Option<Arc<DkimSigner>>,
    /// Domains with a retry schedule of their own.
    pub retry: HashMap<String, RetryConfig>,
}

impl DomainTable {
    /// The table of `domains`, keeping the relays of `previous` whose settings are unchanged
    /// (their rate limiters carry on).
    fn new(
        domains: &[DomainRouting],
        signer: Option<Arc<DkimSigner>>,
        retry: HashMap<String, RetryConfig>,
        previous: Option<&DomainTable>,
    ) -> Self {
        let relays = domains
            .iter()
            .filter_map(|dom| {
                let config = dom.relay.clone()?;
                let name = dom.name.to_ascii_lowercase();
                let kept = previous
                    .and_then(|p| p.relays.get(&name))
                    .filter(|r| r.config == config)
                    .cloned();
                Some((name, kept.unwrap_or_else(|| Arc::new(Relay::new(config)))))
            })
            .collect();
        Self {
            names: domains.iter().map(|d| d.name.clone()).collect(),
            routing: RoutingTable::new(domains.to_vec()),
            relays,
            signer,
            retry,
        }
    }
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
        metrics: Arc<Metrics>,
    ) -> Result<Self, StartDeliveryError> {
        let d = &settings.delivery;
        let policy = AddressPolicy::new(&d.allowed_networks, &d.blocked_networks)
            .map_err(StartDeliveryError::Networks)?;
        let tls = ClientTls::new(d.tls.extra_ca_file.as_deref())?
            .counted_in(metrics.tls_handshakes.clone());
        let table = DomainTable::new(
            &settings.domains,
            signer,
            settings.retry_by_domain.clone(),
            None,
        );
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
            metrics.clone(),
        ));
        let events = Arc::new(crate::events::Events::new(
            js.clone(),
            settings.hostname.clone(),
            settings.events.clone(),
            settings.nats.group_commit,
            settings.nats.manage_streams,
            metrics.clone(),
        ));
        let suppression = Arc::new(crate::suppression::Suppression::new(
            js.clone(),
            settings.events.suppression.clone(),
            metrics.clone(),
        ));
        let shaper = shaping::Shaper::new(
            d.shaping.clone(),
            js.clone(),
            // Objects a node creates itself are R1, as for the TLS policy cache.
            1,
            &settings.hostname,
            metrics.clone(),
        );
        Ok(Self {
            metrics,
            events,
            suppression,
            pauses: pause::Pauses::new(),
            shaper,
            replaced: admin::ReplacedMarks::default(),
            hostname: settings.hostname,
            pool: Arc::new(ConnectionPool::new(d.connections.clone())),
            config: settings.delivery,
            nats: settings.nats,
            resolver,
            policy,
            tls,
            js,
            shutdown,
            domains: RwLock::new(Arc::new(table)),
            policies,
            tlsrpt,
            bodies: Mutex::new(HashMap::new()),
        })
    }

    /// The retry schedule of `domain`'s entries.
    pub fn retry_config(&self, domain: &str) -> RetryConfig {
        self.domains()
            .retry
            .get(&domain.to_ascii_lowercase())
            .cloned()
            .unwrap_or_else(|| self.config.retry.clone())
    }

    /// The current per-domain table.
    pub fn domains(&self) -> Arc<DomainTable> {
        self.domains
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Swaps in the table of `domains` (a config reload); entries already being handled
    /// finish with the table they started with.
    pub fn set_domains(
        &self,
        domains: &[DomainRouting],
        signer: Option<Arc<DkimSigner>>,
        retry: HashMap<String, RetryConfig>,
    ) {
        let previous = self.domains();
        let table = DomainTable::new(domains, signer, retry, Some(&previous));
        *self
            .domains
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(table);
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

/// The delivery side of a running node: the connection reaper and one pull loop per domain,
/// started and stopped as the configured domains change.
pub struct Delivery {
    ctx: Arc<DeliveryContext>,
    consumers: HashMap<String, CancellationToken>,
}

impl Delivery {
    /// Starts the connection reaper and a pull loop for each of `domains`; they run until the
    /// node's stop signal (or, for a domain, until it is removed).
    pub fn start(ctx: Arc<DeliveryContext>, domains: &[String]) -> Self {
        let mut delivery = Self {
            ctx,
            consumers: HashMap::new(),
        };
        if delivery.ctx.config.enabled {
            tokio::spawn(
                delivery
                    .ctx
                    .pool
                    .clone()
                    .run_reaper(delivery.ctx.shutdown.stop_token().clone()),
            );
            let ctx = delivery.ctx.clone();
            let stop = ctx.shutdown.stop_token().clone();
            tokio::spawn(pause::run_watch(
                ctx.js.clone(),
                ctx.pauses.clone(),
                stop.clone(),
            ));
            tokio::spawn(ctx.shaper.clone().run_renewal(stop.clone()));
            tokio::spawn(ctx.policies.mta_sts.clone().run_refresh(stop.clone()));
            // The report task reads the current domains and DKIM keys at each check, so a
            // reload's domains are reported on (and signed for) too.
            let report_ctx = ctx.clone();
            let domains_ctx = ctx.clone();
            tokio::spawn(ctx.tlsrpt.clone().run(
                move || policy::tlsrpt::ReportContextOwned {
                    hostname: report_ctx.hostname.clone(),
                    subject_prefix: report_ctx.nats.subject_prefix.clone(),
                    resolver: report_ctx.resolver.clone(),
                    signer: report_ctx.domains().signer.clone(),
                },
                move || domains_ctx.domains().names.clone(),
                stop,
            ));
        } else {
            tracing::info!("delivery is disabled on this node");
        }
        delivery.set_domains(domains);
        delivery
    }

    /// The shared context (its domain table is swapped by [`DeliveryContext::set_domains`]).
    pub fn context(&self) -> &Arc<DeliveryContext> {
        &self.ctx
    }

    /// Runs pull loops for exactly `domains`: new ones start, removed ones stop pulling (their
    /// entries in flight finish; anything pulled but not started is redelivered by JetStream
    /// after the ack wait, to whichever node serves the domain then). Returns (started,
    /// stopped).
    pub fn set_domains(&mut self, domains: &[String]) -> (Vec<String>, Vec<String>) {
        let wanted: std::collections::BTreeSet<String> =
            domains.iter().map(|d| d.to_ascii_lowercase()).collect();
        let mut stopped = Vec::new();
        self.consumers.retain(|domain, stop| {
            let keep = wanted.contains(domain);
            if !keep {
                stop.cancel();
                stopped.push(domain.clone());
            }
            keep
        });
        let mut started = Vec::new();
        for domain in wanted {
            if self.consumers.contains_key(&domain) {
                continue;
            }
            self.ctx.metrics.delivery.init_domain(&domain);
            self.ctx.metrics.events.init_domain(&domain);
            let stop = self.ctx.shutdown.stop_token().child_token();
            if self.ctx.config.enabled {
                tokio::spawn(consumer::run_until(
                    self.ctx.clone(),
                    domain.clone(),
                    stop.clone(),
                ));
            }
            self.consumers.insert(domain.clone(), stop);
            started.push(domain);
        }
        (started, stopped)
    }
}
