//! Delivery pauses on this node: the set of pauses a KV watch keeps current (the operator
//! writes one entry per `DeliveryPause` into [`kubemail_queue::PAUSES_BUCKET`]), which
//! recipients of an entry they hold back, and how such an entry waits.
//!
//! * The bucket is read once before the first pull ([`Pauses::wait_loaded`]), then followed
//!   with a pull-based ordered consumer (last value per key, then every change), so a change
//!   reaches every node within a round trip.
//! * A pause is checked per recipient before any attempt: by recipient domain and sending
//!   MailDomain, and for pauses that name MX hosts or networks against the resolved
//!   destination (MX hosts, or the relay's host).
//! * Paused recipients are not attempted: no attempt is counted, no bounce, no DSN. The
//!   entry is republished (not nak'd: every nak counts towards the consumer's
//!   `max_deliver`) with `Kubemail-Not-Before` at the next check, `Kubemail-Paused-By` and the
//!   wait added to `Kubemail-Suspended`, so the time it waits for a pause never counts
//!   towards its lifetime. Within `delivery.pauseCheckInterval` of a pause's end (deletion or
//!   expiry) its mail goes out again.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures::StreamExt as _;
use kubemail_queue::QueueEntry;
use kubemail_queue::pause::{Host, Pause};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::DeliveryContext;
use super::mx;
use super::route::Route;

/// Pause between attempts to open or watch the bucket.
const RETRY: Duration = Duration::from_secs(2);

/// The pauses in force, as this node knows them.
pub struct Pauses {
    by_key: RwLock<HashMap<String, Pause>>,
    loaded: watch::Sender<bool>,
}

/// A recipient held back by a pause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paused {
    pub recipient: String,
    /// The pause's key.
    pub pause: String,
}

impl Pauses {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            by_key: RwLock::new(HashMap::new()),
            loaded: watch::channel(false).0,
        })
    }

    /// Sets or removes the pause `key`.
    pub fn set(&self, key: &str, pause: Option<Pause>) {
        let mut map = self
            .by_key
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match pause {
            Some(p) => {
                tracing::info!(pause = %key, reason = p.reason.as_deref().unwrap_or(""), expires = p.expires_at.as_deref().unwrap_or(""), "delivery pause in force");
                map.insert(key.to_owned(), p);
            }
            None => {
                if map.remove(key).is_some() {
                    tracing::info!(pause = %key, "delivery pause lifted");
                }
            }
        }
    }

    /// The pauses active at `now`.
    pub fn active(&self, now: SystemTime) -> Vec<Pause> {
        self.by_key
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .filter(|p| p.is_active(now))
            .cloned()
            .collect()
    }

    /// Waits until the bucket was read once, at most `limit` (NATS may be away; delivery then
    /// starts without pauses rather than not at all).
    pub async fn wait_loaded(&self, limit: Duration) {
        let mut rx = self.loaded.subscribe();
        if tokio::time::timeout(limit, rx.wait_for(|l| *l))
            .await
            .is_err()
        {
            tracing::warn!("delivery pauses not read yet; starting delivery without them");
        }
    }
}

/// Keeps `pauses` equal to the bucket until `stop` fires.
pub async fn run_watch(
    js: async_nats::jetstream::Context,
    pauses: Arc<Pauses>,
    stop: CancellationToken,
) {
    loop {
        match watch_once(&js, &pauses, &stop).await {
            Ok(()) => return,
            Err(error) => tracing::warn!(%error, "watching delivery pauses failed; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

async fn watch_once(
    js: &async_nats::jetstream::Context,
    pauses: &Pauses,
    stop: &CancellationToken,
) -> Result<(), String> {
    // The operator creates the bucket; a node on its own (tests, no operator) makes it R1.
    kubemail_queue_admin::pauses::open_bucket(js, 1)
        .await
        .map_err(|e| e.to_string())?;
    let bucket = kubemail_queue::PAUSES_BUCKET;
    let stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(|e| e.to_string())?;
    // A pull-based ordered consumer over the bucket's stream, starting with the last value of
    // every key (the same as a KV watch, on the pull API the node's credentials allow).
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: format!("$KV.{bucket}.>"),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut initial = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    let mut current: HashMap<String, Option<Pause>> = HashMap::new();
    let mut loaded = false;
    loop {
        if !loaded && initial == 0 {
            // Everything the bucket held: forget pauses that are gone, then follow changes.
            let known: Vec<String> = pauses
                .by_key
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .keys()
                .filter(|k| !current.contains_key(*k))
                .cloned()
                .collect();
            for k in known {
                pauses.set(&k, None);
            }
            for (key, pause) in current.drain() {
                pauses.set(&key, pause);
            }
            pauses.loaded.send_replace(true);
            loaded = true;
        }
        let message = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            m = messages.next() => m,
        };
        let Some(message) = message else {
            return Err("the pause watch ended".to_owned());
        };
        let message = message.map_err(|e| e.to_string())?;
        let Some(key) = message
            .subject
            .strip_prefix(&format!("$KV.{bucket}."))
            .map(str::to_owned)
        else {
            continue;
        };
        let deleted = message
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
        let pause = if deleted {
            None
        } else {
            decode(&key, &message.payload)
        };
        if loaded {
            pauses.set(&key, pause);
        } else {
            current.insert(key, pause);
            initial = message.info().map(|i| i.pending).unwrap_or(0);
        }
    }
}

fn decode(key: &str, value: &[u8]) -> Option<Pause> {
    let pause = kubemail_queue_admin::pauses::decode(value);
    if pause.is_none() {
        tracing::warn!(pause = %key, "ignoring an unreadable delivery pause");
    }
    pause
}

/// Takes the paused recipients out of `groups`: those of a route that a pause in force
/// holds back. Routes that keep recipients are returned with them.
pub async fn split(
    ctx: &DeliveryContext,
    entry: &QueueEntry,
    groups: Vec<(Route, Vec<String>)>,
) -> (Vec<(Route, Vec<String>)>, Vec<Paused>) {
    let active = ctx.pauses.active(SystemTime::now());
    if active.is_empty() {
        return (groups, Vec::new());
    }
    let mut keep = Vec::new();
    let mut paused = Vec::new();
    for (route, rcpts) in groups {
        let mut hosts: Option<Vec<(String, std::net::IpAddr)>> = None;
        let mut rest = Vec::new();
        for rcpt in rcpts {
            let rcpt_domain = rcpt.rsplit_once('@').map_or("", |(_, d)| d);
            let mut hit = None;
            for p in &active {
                if !p.matches_envelope(&entry.domain, rcpt_domain) {
                    continue;
                }
                if p.needs_hosts() {
                    if hosts.is_none() {
                        hosts = Some(destination_hosts(ctx, &route).await);
                    }
                    let list: Vec<Host<'_>> = hosts
                        .iter()
                        .flatten()
                        .map(|(name, ip)| Host { name, ip: *ip })
                        .collect();
                    if !p.matches_hosts(&list) {
                        continue;
                    }
                }
                hit = Some(p.key.clone());
                break;
            }
            match hit {
                Some(pause) => paused.push(Paused {
                    recipient: rcpt,
                    pause,
                }),
                None => rest.push(rcpt),
            }
        }
        if !rest.is_empty() {
            keep.push((route, rest));
        }
    }
    (keep, paused)
}

/// The hosts a route would connect to (empty when they cannot be resolved now: then only
/// envelope selectors can match, and the attempt finds out the rest).
async fn destination_hosts(
    ctx: &DeliveryContext,
    route: &Route,
) -> Vec<(String, std::net::IpAddr)> {
    let targets = match route {
        Route::Mx { domain } => mx::resolve_targets(
            ctx.resolver.as_ref(),
            domain,
            ctx.config.mx_port,
            &ctx.policy,
        )
        .await
        .unwrap_or_default(),
        Route::Relay { domain } => match ctx.relays.get(domain) {
            Some(relay) => relay.targets().await.unwrap_or_default(),
            None => Vec::new(),
        },
        Route::Inbound { .. } | Route::Unroutable { .. } => Vec::new(),
    };
    targets.into_iter().map(|t| (t.host, t.addr.ip())).collect()
}

/// When an entry with paused recipients is looked at again: after the check interval, or
/// at the earliest expiry of the pauses holding it, or at `retry_at` (the other recipients'
/// retry), whichever comes first.
pub fn next_check(
    ctx: &DeliveryContext,
    paused: &[Paused],
    retry_at: Option<SystemTime>,
    now: SystemTime,
) -> SystemTime {
    let mut at = now + ctx.config.pause_check_interval.0;
    let active = ctx.pauses.active(now);
    for p in paused {
        if let Some(end) = active
            .iter()
            .find(|a| a.key == p.pause)
            .and_then(Pause::expiry)
        {
            at = at.min(end.max(now + Duration::from_secs(1)));
        }
    }
    if let Some(r) = retry_at {
        at = at.min(r);
    }
    at
}

/// The entry that waits for the pause: `recipients` left, the next look at `at`, the pause
/// recorded and the wait added to its suspended time (whole seconds, rounded up).
pub fn waiting_entry(
    entry: &QueueEntry,
    recipients: Vec<String>,
    paused: &[Paused],
    at: SystemTime,
    now: SystemTime,
) -> QueueEntry {
    let mut next = QueueEntry {
        recipients,
        not_before: Some(at),
        ..entry.clone()
    };
    let wait = at.duration_since(now).unwrap_or(Duration::ZERO);
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    next.admin.suspended += Duration::from_secs(secs);
    next.admin.paused_by = paused.first().map(|p| p.pause.clone());
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_follows_puts_and_deletes_and_ignores_expired_pauses() {
        let pauses = Pauses::new();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let pause = |key: &str, expires: Option<SystemTime>| {
            let mut p = Pause {
                key: key.into(),
                recipient_domains: vec!["remote.test".into()],
                ..Pause::default()
            };
            p.set_expiry(expires);
            p
        };
        pauses.set("mail.a", Some(pause("mail.a", None)));
        pauses.set(
            "mail.b",
            Some(pause("mail.b", Some(now - Duration::from_secs(1)))),
        );
        let keys: Vec<String> = pauses.active(now).into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["mail.a"]);
        pauses.set("mail.a", None);
        assert!(pauses.active(now).is_empty());
    }
}
