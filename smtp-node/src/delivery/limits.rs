//! Per-destination limits and connection reuse.
//!
//! A destination is a [`Route`]: a recipient domain's MX set, a relay, or an inbound target.
//! Each has a semaphore of `connections.perDestination` permits; a permit is held by every
//! open connection to it, busy or idle, so this node never has more connections to one
//! destination than the limit (a receiving MTA limits connections per client IP and
//! answers 421 beyond it). A finished connection that is still good goes back to an idle
//! list with its permit; the next delivery to the same destination reuses it (after an
//! RSET when it was idle for more than a moment, see [`super::client::UNCHECKED_REUSE`]),
//! which saves the TCP, TLS and EHLO round trips. Idle connections are closed after
//! `connections.idleTimeout` and a connection is retired after
//! `connections.maxMessagesPerConnection` messages.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::client::SmtpClient;
use super::route::Route;
use super::shaping::Lease;
use crate::config::ConnectionConfig;

/// The connection a delivery starts with.
pub enum Checkout {
    /// An idle connection to reuse, and how long it was idle
    /// ([`SmtpClient::prepare_reuse`] before the next transaction).
    Reused(Box<SmtpClient>, Slot, Duration),
    /// Permission to open a new connection.
    Fresh(Slot),
}

/// The right to one open connection to a destination: this node's permit and, when the
/// destination has a cluster-wide connection limit, its lease ([`super::shaping`]). Both
/// are given back when the connection closes.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    lease: Option<Lease>,
}

impl Slot {
    /// Whether it holds a cluster-wide lease already.
    pub fn has_lease(&self) -> bool {
        self.lease.is_some()
    }

    pub fn set_lease(&mut self, lease: Option<Lease>) {
        self.lease = lease;
    }
}

struct Idle {
    client: SmtpClient,
    permit: Slot,
    since: Instant,
}

struct Destination {
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Idle>>,
    returned: Notify,
}

/// Connection limits and the idle connection cache of this node.
pub struct ConnectionPool {
    config: ConnectionConfig,
    destinations: Mutex<HashMap<Route, Arc<Destination>>>,
}

impl ConnectionPool {
    pub fn new(config: ConnectionConfig) -> Self {
        Self {
            config,
            destinations: Mutex::new(HashMap::new()),
        }
    }

    fn destination(&self, route: &Route) -> Arc<Destination> {
        let mut map = self
            .destinations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry(route.clone())
            .or_insert_with(|| {
                Arc::new(Destination {
                    permits: Arc::new(Semaphore::new(self.config.per_destination.max(1) as usize)),
                    idle: Mutex::new(Vec::new()),
                    returned: Notify::new(),
                })
            })
            .clone()
    }

    /// An idle connection to `route`, or a permit for a new one; waits while the
    /// destination is at its limit.
    pub async fn checkout(&self, route: &Route) -> Checkout {
        let dest = self.destination(route);
        loop {
            if let Some(idle) = take_idle(&dest) {
                return Checkout::Reused(Box::new(idle.client), idle.permit, idle.since.elapsed());
            }
            let notified = dest.returned.notified();
            tokio::select! {
                permit = dest.permits.clone().acquire_owned() => {
                    match permit {
                        Ok(permit) => return Checkout::Fresh(Slot { _permit: permit, lease: None }),
                        // The semaphore is never closed; should it be, do not spin.
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                _ = notified => {}
            }
        }
    }

    /// Returns a connection after a transaction: kept for reuse when it is still good and
    /// has not carried too many messages, closed otherwise.
    pub async fn checkin(&self, route: &Route, client: SmtpClient, permit: Slot) {
        let reusable = client.is_usable()
            && client.messages_sent() < self.config.max_messages_per_connection.max(1);
        if !reusable {
            client.quit().await;
            drop(permit);
            return;
        }
        let dest = self.destination(route);
        dest.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Idle {
                client,
                permit,
                since: Instant::now(),
            });
        dest.returned.notify_one();
    }

    /// Closes idle connections older than the idle timeout.
    pub async fn close_idle(&self) {
        self.close_idle_older_than(self.config.idle_timeout.0).await;
    }

    /// Closes every idle connection (at shutdown).
    pub async fn close_all(&self) {
        self.close_idle_older_than(Duration::ZERO).await;
    }

    async fn close_idle_older_than(&self, age: Duration) {
        let dests: Vec<Arc<Destination>> = self
            .destinations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let mut expired = Vec::new();
        for dest in dests {
            let mut idle = dest
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (old, keep): (Vec<Idle>, Vec<Idle>) =
                idle.drain(..).partition(|i| i.since.elapsed() >= age);
            *idle = keep;
            expired.extend(old);
        }
        for i in expired {
            i.client.quit().await;
            drop(i.permit);
        }
    }

    /// Runs [`ConnectionPool::close_idle`] periodically until `stop` fires, then closes
    /// everything.
    pub async fn run_reaper(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let period = (self.config.idle_timeout.0 / 2).max(Duration::from_millis(200));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => self.close_idle().await,
            }
        }
        self.close_all().await;
    }

    /// Connections (busy and idle) currently open to `route`.
    pub fn open_connections(&self, route: &Route) -> usize {
        let dest = self.destination(route);
        self.config.per_destination.max(1) as usize - dest.permits.available_permits()
    }
}

fn take_idle(dest: &Destination) -> Option<Idle> {
    dest.idle
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .pop()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    #[tokio::test]
    async fn caps_connections_per_destination() {
        let pool = Arc::new(ConnectionPool::new(ConnectionConfig {
            per_destination: 2,
            idle_timeout: HumanDuration::from_secs(1),
            max_messages_per_connection: 10,
        }));
        let a = Route::Mx {
            domain: "a.test".into(),
        };
        let b = Route::Mx {
            domain: "b.test".into(),
        };
        let Checkout::Fresh(p1) = pool.checkout(&a).await else {
            panic!()
        };
        let Checkout::Fresh(_p2) = pool.checkout(&a).await else {
            panic!()
        };
        assert_eq!(pool.open_connections(&a), 2);
        // A third checkout for `a` waits; `b` is independent.
        let Checkout::Fresh(_b1) = pool.checkout(&b).await else {
            panic!()
        };
        let waiting = {
            let pool = pool.clone();
            let a = a.clone();
            tokio::spawn(async move { matches!(pool.checkout(&a).await, Checkout::Fresh(_)) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the third connection must wait");
        drop(p1);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), waiting)
                .await
                .unwrap()
                .unwrap()
        );
    }
}
