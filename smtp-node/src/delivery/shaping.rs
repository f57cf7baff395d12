//! Per-destination traffic shaping shared by every node (`delivery.shaping`): how many
//! connections the whole cluster keeps open to a destination, how many messages per minute
//! it sends there, and the back-off when the destination answers `421` or `4.7.x`.
//!
//! **Destinations.** An MX delivery goes to the first rule whose `domains` match the
//! recipient domain or whose `mxHosts` match one of its MX hosts (user rules, then the
//! built-in providers: all Gmail MX hosts are one destination, whatever domain they serve);
//! otherwise to the recipient domain itself with the `default` limits. A relay is a
//! destination named after its host. Inbound targets (our own mail store) are not shaped.
//!
//! **Connections.** A connection needs one of `maxConnections` leases, keys
//! `<slot>.<destination>` in [`kubemail_queue::SHAPING_LEASES_BUCKET`], taken with a KV
//! `create` (which fails while another node holds that slot). The bucket's `max_age` is the
//! lease time ([`kubemail_queue::SHAPING_LEASE_TIME`]); holders renew their leases every
//! third of it (busy and idle connections alike:
//! the remote counts open connections), so the slots of a node that died free themselves. A
//! connection gives its lease back when it closes. This node's own
//! `connections.perDestination` still applies on top.
//!
//! **Rate.** `messagesPerMinute` is a GCRA ("virtual scheduling"): one key per destination
//! in [`kubemail_queue::SHAPING_BUCKET`] holds the earliest time the next message may go;
//! a sender reserves a time with compare-and-set and waits for it, so replicas share one
//! rate without a leader.
//!
//! **Back-off.** A `421` reply or a `4.7.x` status raises the destination's back-off level
//! (at most once a second, whoever sees it: the level is shared in KV, and a node reads it
//! there no more than once every 250 ms, [`BACKOFF_REFRESH`]); each level halves the
//! rate (from `backoff.initialMessagesPerMinute` for a destination without a rate). Every
//! `backoff.recoverAfter` without such an answer lowers the level by one, so the rate comes
//! back step by step to the configured one.
//!
//! Waiting for a slot or a send time is bounded by `maxWait`; after it the recipients are
//! deferred like any temporary failure. When NATS cannot be reached for shaping, delivery
//! goes on with this node's own limits (logged): shaping protects remote reputations, it must
//! not stop mail.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv::{self, CreateErrorKind, Store, UpdateErrorKind};
use kubemail_queue::names::{DestinationKind, backoff_key, destination_token, lease_key, rate_key};
use kubemail_queue::pause::name_matches;
use prometheus_client::encoding::EncodeLabelSet;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use super::outcome::Diagnostic;
use super::route::Route;
use crate::config::{ShapingConfig, ShapingLimits, ShapingRule, builtin_rules};

/// Highest back-off level: the rate divided by 256 (then `minMessagesPerMinute`).
const MAX_LEVEL: u32 = 8;
/// Two throttling answers closer than this raise the level once (a burst of replicas all
/// seeing the same `421` is one signal).
const DEBOUNCE: Duration = Duration::from_secs(1);
/// Compare-and-set rounds before giving up on a contended key.
const CAS_ROUNDS: usize = 50;

/// The shaping destination of a delivery: its name and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Label for logs and metrics: the rule name, or the domain/host.
    pub name: String,
    /// Its KV key token ([`destination_token`]).
    pub token: String,
    pub limits: ShapingLimits,
}

/// Labels of the per-destination metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    pub destination: String,
}

/// No connection slot or send time within `maxWait`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{destination} is at its cluster-wide {what} limit; waited {waited:?}")]
pub struct Busy {
    pub destination: String,
    pub what: &'static str,
    pub waited: Duration,
}

/// A connection slot held in the lease bucket; given back when dropped.
pub struct Lease {
    key: String,
    shaper: Arc<Shaper>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let revision = self
            .shaper
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.key);
        let (Some(revision), Ok(handle)) = (revision, tokio::runtime::Handle::try_current()) else {
            return;
        };
        let shaper = self.shaper.clone();
        let key = std::mem::take(&mut self.key);
        handle.spawn(async move {
            if let Ok(store) = shaper.leases().await
                && let Err(error) = store.delete_expect_revision(&key, Some(revision)).await
            {
                tracing::debug!(%error, lease = %key, "giving back a connection lease failed; it expires by itself");
            }
        });
    }
}

/// The rules and arithmetic of shaping (pure).
pub struct Policy {
    config: ShapingConfig,
    rules: Vec<ShapingRule>,
}

/// Cluster-wide shaping of this node.
pub struct Shaper {
    policy: Policy,
    config: ShapingConfig,
    js: async_nats::jetstream::Context,
    replicas: u32,
    /// Who holds a lease (for people reading the bucket).
    holder: String,
    leases: OnceCell<Store>,
    state: OnceCell<Store>,
    /// Leases this node holds: key → revision.
    live: Mutex<HashMap<String, u64>>,
    /// Back-off levels read lately, by destination token ([`BackoffCache`]).
    backoffs: BackoffCache,
    metrics: Arc<crate::metrics::Metrics>,
}

/// How long a back-off level read from KV is used before it is read again. Every message
/// to a shaped destination needs the level, and a KV read per message is a NATS request per
/// message; another replica's raised level reaches this node within this time (the level
/// moves at most once a second, [`DEBOUNCE`]), and this node's own at once.
const BACKOFF_REFRESH: Duration = Duration::from_millis(250);

/// The back-off levels of destinations as last read or written by this node, with when.
#[derive(Default)]
struct BackoffCache(Mutex<HashMap<String, (Backoff, std::time::Instant)>>);

impl BackoffCache {
    /// The level of `token` when it was read or written less than [`BACKOFF_REFRESH`]
    /// before `now`.
    fn fresh(&self, token: &str, now: std::time::Instant) -> Option<Backoff> {
        let map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(token)
            .filter(|(_, at)| now.saturating_duration_since(*at) < BACKOFF_REFRESH)
            .map(|(b, _)| *b)
    }

    /// Keeps `backoff` for `token`. An entry is of use for [`BACKOFF_REFRESH`] only: once
    /// there are [`BACKOFF_CACHE_PRUNE`] of them (a sender to many domains), the stale ones
    /// go, so the map holds the destinations of the last moment, not of the node's life.
    fn put(&self, token: &str, backoff: Backoff, at: std::time::Instant) {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= BACKOFF_CACHE_PRUNE {
            map.retain(|_, (_, read)| at.saturating_duration_since(*read) < BACKOFF_REFRESH);
        }
        map.insert(token.to_owned(), (backoff, at));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

/// Entries of the [`BackoffCache`] above which its stale ones are dropped.
const BACKOFF_CACHE_PRUNE: usize = 1024;

/// The stored back-off of a destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Backoff {
    level: u32,
    /// Unix milliseconds of the last throttling answer.
    last_ms: u64,
}

impl Shaper {
    pub fn new(
        config: ShapingConfig,
        js: async_nats::jetstream::Context,
        replicas: u32,
        hostname: &str,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            holder: format!("{hostname}/{}", std::process::id()),
            policy: Policy::new(config.clone()),
            config,
            js,
            replicas,
            leases: OnceCell::new(),
            state: OnceCell::new(),
            live: Mutex::new(HashMap::new()),
            backoffs: BackoffCache::default(),
            metrics,
        })
    }

    /// The destination of a delivery over `route` to `hosts`; `None` when it is not shaped.
    pub fn destination(&self, route: &Route, hosts: &[&str]) -> Option<Destination> {
        self.policy.destination(route, hosts)
    }

    /// A connection slot of `dest`, waiting up to `maxWait` for one; `None` when the
    /// destination has no connection limit (or the bucket is unreachable).
    pub async fn connection(self: &Arc<Self>, dest: &Destination) -> Result<Option<Lease>, Busy> {
        let Some(max) = dest.limits.max_connections else {
            return Ok(None);
        };
        let store = match self.leases().await {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(%error, destination = %dest.name, "connection leases unavailable; using this node's limit only");
                return Ok(None);
            }
        };
        let started = tokio::time::Instant::now();
        let mut pause =
            crate::backoff::delays(Duration::from_millis(50), Duration::from_millis(500));
        loop {
            for slot in 0..max {
                let key = lease_key(&dest.token, slot);
                match store.create(&key, self.holder.clone().into()).await {
                    Ok(revision) => {
                        self.live
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .insert(key.clone(), revision);
                        tracing::debug!(destination = %dest.name, slot, "connection lease taken");
                        return Ok(Some(Lease {
                            key,
                            shaper: self.clone(),
                        }));
                    }
                    Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {}
                    Err(error) => {
                        tracing::warn!(%error, destination = %dest.name, "cannot take a connection lease; using this node's limit only");
                        return Ok(None);
                    }
                }
            }
            let waited = started.elapsed();
            if waited >= self.config.max_wait.0 {
                return Err(Busy {
                    destination: dest.name.clone(),
                    what: "connection",
                    waited,
                });
            }
            tokio::time::sleep(pause.next_delay().min(self.config.max_wait.0 - waited)).await;
        }
    }

    /// Waits for `dest`'s next send time (its rate after back-off); returns at once for a
    /// destination without a rate.
    pub async fn pace(&self, dest: &Destination) -> Result<(), Busy> {
        let store = match self.state().await {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(%error, destination = %dest.name, "rate state unavailable; sending unpaced");
                return Ok(());
            }
        };
        let now = now_ms();
        let backoff = match self.backoffs.fresh(&dest.token, std::time::Instant::now()) {
            Some(b) => b,
            None => {
                let read_at = std::time::Instant::now();
                let b = read_backoff(&store, &dest.token).await.0;
                self.backoffs.put(&dest.token, b, read_at);
                b
            }
        };
        let rate = self.policy.rate(dest, backoff, now);
        self.metrics
            .delivery
            .shaping_rate
            .get_or_create(&DestinationLabels {
                destination: dest.name.clone(),
            })
            .set(i64::from(rate.unwrap_or(0)));
        let Some(rate) = rate else {
            return Ok(());
        };
        let interval = 60_000 / u64::from(rate.max(1));
        let key = rate_key(&dest.token);
        for _ in 0..CAS_ROUNDS {
            let (next_free, revision) = match store.entry(&key).await {
                Ok(Some(e)) if e.operation == kv::Operation::Put => (
                    std::str::from_utf8(&e.value)
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0),
                    e.revision,
                ),
                Ok(Some(e)) => (0, e.revision),
                Ok(None) => (0, 0),
                Err(error) => {
                    tracing::warn!(%error, destination = %dest.name, "cannot read the rate state; sending unpaced");
                    return Ok(());
                }
            };
            let now = now_ms();
            let at = next_free.max(now);
            let wait = Duration::from_millis(at - now);
            if wait > self.config.max_wait.0 {
                return Err(Busy {
                    destination: dest.name.clone(),
                    what: "rate",
                    waited: Duration::ZERO,
                });
            }
            let value = (at + interval).to_string();
            let written = if revision == 0 {
                store
                    .create(&key, value.into())
                    .await
                    .map(|_| ())
                    .map_err(|e| (e.kind() == CreateErrorKind::AlreadyExists, e.to_string()))
            } else {
                store
                    .update(&key, value.into(), revision)
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        (
                            e.kind() == UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    })
            };
            match written {
                Ok(()) => {
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    return Ok(());
                }
                // Another sender took this time: read again.
                Err((true, _)) => continue,
                Err((false, error)) => {
                    tracing::warn!(%error, destination = %dest.name, "cannot write the rate state; sending unpaced");
                    return Ok(());
                }
            }
        }
        tracing::warn!(destination = %dest.name, "rate state too contended; sending unpaced");
        Ok(())
    }

    /// Records a reply of `dest`: a `421` or a `4.7.x` status raises its back-off level.
    pub async fn observe(&self, dest: &Destination, diagnostic: &Diagnostic) {
        if !is_throttling(diagnostic) {
            return;
        }
        self.metrics
            .delivery
            .shaping_throttled
            .get_or_create(&DestinationLabels {
                destination: dest.name.clone(),
            })
            .inc();
        let Ok(store) = self.state().await else {
            return;
        };
        let key = backoff_key(&dest.token);
        for _ in 0..CAS_ROUNDS {
            let read_at = std::time::Instant::now();
            let (stored, revision) = read_backoff(&store, &dest.token).await;
            self.backoffs.put(&dest.token, stored, read_at);
            let now = now_ms();
            if now.saturating_sub(stored.last_ms) < DEBOUNCE.as_millis() as u64 {
                return;
            }
            let level = (self.policy.level(stored, now) + 1).min(MAX_LEVEL);
            let value = Backoff {
                level,
                last_ms: now,
            };
            let Ok(bytes) = serde_json::to_vec(&value) else {
                return;
            };
            let written = if revision == 0 {
                store.create(&key, bytes.into()).await.is_ok()
            } else {
                store.update(&key, bytes.into(), revision).await.is_ok()
            };
            if written {
                self.backoffs
                    .put(&dest.token, value, std::time::Instant::now());
                tracing::warn!(destination = %dest.name, level, reason = %diagnostic.summary(), "destination throttles us; lowering its rate");
                return;
            }
        }
    }

    /// Renews this node's leases every third of the lease time until `stop`.
    pub async fn run_renewal(self: Arc<Self>, stop: CancellationToken) {
        let period = kubemail_queue::SHAPING_LEASE_TIME / 3;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let held: Vec<(String, u64)> = self
                .live
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .map(|(k, r)| (k.clone(), *r))
                .collect();
            if held.is_empty() {
                continue;
            }
            let Ok(store) = self.leases().await else {
                continue;
            };
            for (key, revision) in held {
                match store
                    .update(&key, self.holder.clone().into(), revision)
                    .await
                {
                    Ok(next) => {
                        let mut live = self
                            .live
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        // Only if the connection still holds it (it may have closed meanwhile).
                        if let Some(r) = live.get_mut(&key) {
                            *r = next;
                        }
                    }
                    Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                        tracing::warn!(lease = %key, "a connection lease expired before it was renewed; another node may use the slot");
                        self.live
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .remove(&key);
                    }
                    Err(error) => tracing::debug!(%error, lease = %key, "renewing a lease failed"),
                }
            }
        }
    }

    async fn leases(&self) -> Result<Store, String> {
        self.leases
            .get_or_try_init(|| {
                open(
                    &self.js,
                    kubemail_queue::streams::shaping_leases_config(self.replicas),
                )
            })
            .await
            .cloned()
    }

    async fn state(&self) -> Result<Store, String> {
        self.state
            .get_or_try_init(|| {
                open(
                    &self.js,
                    kubemail_queue::streams::shaping_state_config(self.replicas),
                )
            })
            .await
            .cloned()
    }
}

impl Policy {
    pub fn new(config: ShapingConfig) -> Self {
        let mut rules = config.destinations.clone();
        if config.builtin_providers {
            rules.extend(builtin_rules());
        }
        Self { config, rules }
    }

    /// The destination of a delivery over `route` to `hosts`; `None` when it is not shaped.
    pub fn destination(&self, route: &Route, hosts: &[&str]) -> Option<Destination> {
        if !self.config.enabled {
            return None;
        }
        match route {
            Route::Mx { domain } => {
                let rule = self.rules.iter().find(|r| {
                    r.domains.iter().any(|p| name_matches(p, domain))
                        || r.mx_hosts
                            .iter()
                            .any(|p| hosts.iter().any(|h| name_matches(p, h)))
                });
                Some(match rule {
                    Some(r) => Destination {
                        name: r.name.clone(),
                        token: destination_token(DestinationKind::Group, &r.name),
                        limits: r.limits(),
                    },
                    None => Destination {
                        name: domain.to_ascii_lowercase(),
                        token: destination_token(DestinationKind::Domain, domain),
                        limits: self.config.default.clone(),
                    },
                })
            }
            Route::Relay { .. } => hosts.first().map(|host| Destination {
                name: host.to_ascii_lowercase(),
                token: destination_token(DestinationKind::Domain, host),
                limits: self.config.default.clone(),
            }),
            Route::Inbound { .. } | Route::Unroutable { .. } => None,
        }
    }

    /// The back-off level of `stored` at `now` (one level less per `recoverAfter` since the
    /// last throttling answer).
    fn level(&self, stored: Backoff, now: u64) -> u32 {
        let recover = self.config.backoff.recover_after.0.as_millis().max(1) as u64;
        let steps = now.saturating_sub(stored.last_ms) / recover;
        stored
            .level
            .saturating_sub(u32::try_from(steps).unwrap_or(u32::MAX))
    }

    /// Messages per minute for `dest` now; `None`: unlimited.
    fn rate(&self, dest: &Destination, stored: Backoff, now: u64) -> Option<u32> {
        let level = self.level(stored, now);
        let b = &self.config.backoff;
        match (dest.limits.messages_per_minute, level) {
            (base, 0) => base,
            (Some(base), l) => Some((base >> l.min(31)).max(b.min_messages_per_minute)),
            (None, l) => Some(
                (b.initial_messages_per_minute >> (l - 1).min(31)).max(b.min_messages_per_minute),
            ),
        }
    }
}

/// What the worker calls around a transaction: `dest` is `None` for unshaped routes.
///
/// Before a new connection: a cluster-wide slot for `slot` (a temporary failure when none
/// comes free within `maxWait`).
pub async fn connect_slot(
    shaper: &Arc<Shaper>,
    dest: Option<&Destination>,
    slot: &mut super::limits::Slot,
) -> Result<(), Diagnostic> {
    let Some(dest) = dest else {
        return Ok(());
    };
    if slot.has_lease() {
        return Ok(());
    }
    match shaper.connection(dest).await {
        Ok(lease) => {
            slot.set_lease(lease);
            Ok(())
        }
        Err(busy) => Err(busy_diagnostic(&busy)),
    }
}

/// Before each message: its send time.
pub async fn before_send(shaper: &Shaper, dest: Option<&Destination>) -> Result<(), Diagnostic> {
    match dest {
        Some(d) => shaper.pace(d).await.map_err(|busy| busy_diagnostic(&busy)),
        None => Ok(()),
    }
}

/// After a transaction or a failed connection: back off when the answer says so.
pub async fn after<'a>(
    shaper: &Shaper,
    dest: Option<&Destination>,
    diagnostics: impl IntoIterator<Item = &'a Diagnostic>,
) {
    let Some(dest) = dest else {
        return;
    };
    if let Some(d) = diagnostics.into_iter().find(|d| is_throttling(d)) {
        shaper.observe(dest, d).await;
    }
}

fn busy_diagnostic(busy: &Busy) -> Diagnostic {
    Diagnostic::local(crate::protocol::EnhancedCode(4, 4, 5), busy.to_string())
}

/// Opens a bucket, creating it when missing (another node may create it at the same time;
/// with the operator's credentials only the operator creates it).
async fn open(js: &async_nats::jetstream::Context, config: kv::Config) -> Result<Store, String> {
    let name = config.bucket.clone();
    if let Ok(store) = js.get_key_value(&name).await {
        return Ok(store);
    }
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        Err(create) => js
            .get_key_value(&name)
            .await
            .map_err(|_| format!("cannot open or create bucket {name}: {create}")),
    }
}

async fn read_backoff(store: &Store, token: &str) -> (Backoff, u64) {
    match store.entry(backoff_key(token)).await {
        Ok(Some(e)) if e.operation == kv::Operation::Put => (
            serde_json::from_slice(&e.value).unwrap_or_default(),
            e.revision,
        ),
        Ok(Some(e)) => (Backoff::default(), e.revision),
        _ => (Backoff::default(), 0),
    }
}

/// Whether a reply says "slow down": `421` (RFC 5321 4.2.3, the service is closing the
/// channel) or an enhanced status `4.7.x` (RFC 3463: a policy, usually a rate, refused it
/// for now).
pub fn is_throttling(d: &Diagnostic) -> bool {
    let code_421 = d.reply.as_ref().is_some_and(|r| r.code == 421);
    let status_47x = d.status.0 == 4 && d.status.1 == 7;
    code_421 || status_47x
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;
    use crate::protocol::{EnhancedCode, Reply};

    fn shaper(config: ShapingConfig) -> Policy {
        Policy::new(config)
    }

    fn mx(domain: &str) -> Route {
        Route::Mx {
            domain: domain.into(),
        }
    }

    #[test]
    fn a_back_off_level_is_used_for_a_moment_then_read_again() {
        let cache = BackoffCache::default();
        let t0 = std::time::Instant::now();
        assert_eq!(cache.fresh("gmail", t0), None, "never read");
        let raised = Backoff {
            level: 2,
            last_ms: 1,
        };
        cache.put("gmail", raised, t0);
        assert_eq!(cache.fresh("gmail", t0), Some(raised));
        let almost = t0 + BACKOFF_REFRESH - Duration::from_millis(1);
        assert_eq!(cache.fresh("gmail", almost), Some(raised));
        assert_eq!(cache.fresh("gmail", t0 + BACKOFF_REFRESH), None, "stale");
        assert_eq!(cache.fresh("yahoo", t0), None, "per destination");
        // A write (this node's own raise) replaces what was read.
        let higher = Backoff {
            level: 3,
            last_ms: 2,
        };
        cache.put("gmail", higher, t0 + BACKOFF_REFRESH);
        assert_eq!(cache.fresh("gmail", t0 + BACKOFF_REFRESH), Some(higher));
    }

    #[test]
    fn the_back_off_cache_keeps_only_the_destinations_of_the_last_moment() {
        let cache = BackoffCache::default();
        let t0 = std::time::Instant::now();
        for i in 0..BACKOFF_CACHE_PRUNE {
            cache.put(&format!("domain-{i}"), Backoff::default(), t0);
        }
        assert_eq!(cache.len(), BACKOFF_CACHE_PRUNE);
        // Later, a sender to yet another domain: the stale thousand go.
        let later = t0 + BACKOFF_REFRESH;
        cache.put("one-more", Backoff::default(), later);
        assert_eq!(cache.len(), 1);
        // Fresh entries stay, however many.
        for i in 0..BACKOFF_CACHE_PRUNE {
            cache.put(&format!("domain-{i}"), Backoff::default(), later);
        }
        assert_eq!(cache.len(), BACKOFF_CACHE_PRUNE + 1);
    }

    #[test]
    fn destinations_by_rule_mx_host_or_domain() {
        let config = ShapingConfig {
            destinations: vec![ShapingRule {
                name: "partner".into(),
                domains: vec!["partner.test".into()],
                mx_hosts: Vec::new(),
                max_connections: Some(2),
                messages_per_minute: Some(60),
            }],
            default: ShapingLimits {
                max_connections: Some(7),
                messages_per_minute: None,
            },
            ..ShapingConfig::default()
        };
        let s = shaper(config);
        let gmail = s
            .destination(&mx("example.org"), &["alt1.aspmx.l.google.com"])
            .unwrap_or_else(|| unreachable!());
        assert_eq!(
            (gmail.name.as_str(), gmail.token.as_str()),
            ("gmail", "g.gmail")
        );
        let partner = s
            .destination(&mx("partner.test"), &["mx.partner.test"])
            .unwrap_or_else(|| unreachable!());
        assert_eq!(partner.limits.max_connections, Some(2));
        let other = s
            .destination(&mx("Remote.Test"), &["mx.remote.test"])
            .unwrap_or_else(|| unreachable!());
        assert_eq!(other.token, "d.remote.test");
        assert_eq!(other.limits.max_connections, Some(7));
        assert_eq!(
            s.destination(
                &Route::Inbound {
                    domain: "example.test".into()
                },
                &["127.0.0.1"]
            ),
            None
        );
    }

    #[test]
    fn back_off_halves_the_rate_per_level_and_recovers_step_by_step() {
        let mut config = ShapingConfig::default();
        config.backoff.recover_after = HumanDuration::from_secs(10);
        let s = shaper(config);
        let limited = Destination {
            name: "d".into(),
            token: "d.d".into(),
            limits: ShapingLimits {
                max_connections: None,
                messages_per_minute: Some(600),
            },
        };
        let unlimited = Destination {
            limits: ShapingLimits::default(),
            ..limited.clone()
        };
        let at = |level, last_ms| Backoff { level, last_ms };
        assert_eq!(s.rate(&limited, at(0, 0), 1_000), Some(600));
        assert_eq!(s.rate(&unlimited, at(0, 0), 1_000), None);
        assert_eq!(s.rate(&limited, at(2, 1_000), 1_000), Some(150));
        assert_eq!(s.rate(&unlimited, at(1, 1_000), 1_000), Some(120));
        assert_eq!(s.rate(&unlimited, at(2, 1_000), 1_000), Some(60));
        // 10 s later one level is gone, 20 s later both.
        assert_eq!(s.rate(&limited, at(2, 1_000), 11_000), Some(300));
        assert_eq!(s.rate(&limited, at(2, 1_000), 21_000), Some(600));
        assert_eq!(
            s.rate(&limited, at(8, 0), 0),
            Some(2),
            "never below the minimum"
        );
    }

    #[test]
    fn what_counts_as_throttling() {
        let d = |code, status: EnhancedCode| {
            Diagnostic::from_reply(Reply::new(code, status, "x"), Some("mx".into()))
        };
        assert!(is_throttling(&d(421, EnhancedCode(4, 3, 2))));
        assert!(is_throttling(&d(451, EnhancedCode(4, 7, 1))));
        assert!(!is_throttling(&d(450, EnhancedCode(4, 2, 0))));
        assert!(!is_throttling(&d(550, EnhancedCode(5, 7, 1))));
    }
}
