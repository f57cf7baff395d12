//! The node-wide budget of message bytes in memory (`limits.messageBytesInMemory`): every
//! body being received (DATA, BDAT) and every body waiting for the queue's acknowledgement
//! holds a [`Reservation`] of the bytes it has allocated, so that many sessions with honest,
//! near-limit messages (some trickling at the minimum data rate) cannot together take more
//! memory than the pod has. A session that needs more than is free waits up to
//! `limits.memoryWait` (the oldest waiter first, so a large message is not starved by small
//! ones) and is then refused with `452 4.3.1`.
//!
//! The budget is counted in KiB (a tokio semaphore of permits), so a reservation is rounded up
//! to whole KiB. Without a configured size the budget is half the container's memory limit
//! (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`), else
//! [`DEFAULT_MESSAGE_BYTES_IN_MEMORY`]; the other half is for everything else the node holds
//! (connections, TLS, the NATS client's buffers, delivery).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use prometheus_client::metrics::gauge::Gauge;

use crate::config::{DEFAULT_MESSAGE_BYTES_IN_MEMORY, NodeConfig};

/// The unit of the budget.
const UNIT: u64 = 1024;

/// Where a container's memory limit is found (cgroup v2, then v1).
const CGROUP_LIMIT_FILES: [&str; 2] = [
    "/sys/fs/cgroup/memory.max",
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
];

/// cgroup v1 writes a huge number (about 2^63, rounded to pages) for "no limit".
const NO_LIMIT_ABOVE: u64 = 1 << 60;

/// The budget was not free within the wait: the session answers `452 4.3.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no room for the message in memory (messageBytesInMemory)")]
pub struct NoRoom;

/// The node's budget of message bytes in memory.
#[derive(Debug, Clone)]
pub struct MessageMemory {
    permits: Arc<Semaphore>,
    total_units: u64,
    wait: Duration,
    /// Bytes held now (`message_memory_bytes`).
    held: Gauge,
}

impl MessageMemory {
    /// A budget of `bytes` (at least one KiB); a session waits up to `wait` for room.
    pub fn new(bytes: u64, wait: Duration) -> Self {
        let units = (bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS as u64);
        Self {
            permits: Arc::new(Semaphore::new(units as usize)),
            total_units: units,
            wait,
            held: Gauge::default(),
        }
    }

    /// The budget `config` asks for, sized from the container's memory limit when unset; the
    /// bytes held are shown in `held`.
    pub fn from_config(config: &NodeConfig, held: Gauge) -> Self {
        let bytes = match config.limits.message_bytes_in_memory {
            Some(size) => size.0,
            None => {
                let bytes = default_budget(container_memory_limit());
                let largest = config.max_message_size();
                if bytes < largest.saturating_mul(2) {
                    tracing::warn!(
                        budget = bytes,
                        largest_message = largest,
                        "the memory budget (half the container's memory limit) is less than twice the largest message size, so such a message may never fit; set limits.messageBytesInMemory or raise the memory limit"
                    );
                }
                bytes
            }
        };
        tracing::info!(bytes, "message memory budget");
        Self {
            held,
            ..Self::new(bytes, config.limits.memory_wait.0)
        }
    }

    /// The budget in bytes.
    pub fn total(&self) -> u64 {
        self.total_units * UNIT
    }

    /// Bytes not reserved now.
    pub fn available(&self) -> u64 {
        self.permits.available_permits() as u64 * UNIT
    }

    /// How long a session waits for room.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// An empty reservation; it grows as its message does and gives everything back on drop.
    pub fn reservation(&self) -> Reservation {
        Reservation {
            permits: self.permits.clone(),
            total_units: self.total_units,
            held_units: 0,
            gauge: self.held.clone(),
        }
    }
}

/// Bytes of the budget held by one message. Released when dropped.
#[derive(Debug)]
pub struct Reservation {
    permits: Arc<Semaphore>,
    total_units: u64,
    held_units: u64,
    gauge: Gauge,
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.held_units * UNIT
    }

    /// Holds at least `bytes`, waiting until `deadline` for the budget to have room. A request
    /// larger than the whole budget fails at once.
    pub async fn grow_to(&mut self, bytes: u64, deadline: Instant) -> Result<(), NoRoom> {
        let want = bytes.div_ceil(UNIT);
        if want <= self.held_units {
            return Ok(());
        }
        if want > self.total_units {
            return Err(NoRoom);
        }
        let more = u32::try_from(want - self.held_units).map_err(|_| NoRoom)?;
        let acquire = self.permits.acquire_many(more);
        match tokio::time::timeout_at(deadline, acquire).await {
            Ok(Ok(permit)) => {
                // Held by the count in `held_units` and given back in `shrink_to` / drop.
                permit.forget();
                self.held_units = want;
                self.gauge.inc_by(i64::from(more) * UNIT as i64);
                Ok(())
            }
            // The semaphore is never closed; a timeout is the usual way here.
            Ok(Err(_)) | Err(_) => Err(NoRoom),
        }
    }

    /// Holds at most `bytes` (rounded up to the unit), giving the rest back.
    pub fn shrink_to(&mut self, bytes: u64) {
        let keep = bytes.div_ceil(UNIT);
        if keep >= self.held_units {
            return;
        }
        let give = self.held_units - keep;
        self.held_units = keep;
        // `give` units were taken from this semaphore, so they fit its permit range.
        self.permits.add_permits(give as usize);
        self.gauge.dec_by(give as i64 * UNIT as i64);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.shrink_to(0);
    }
}

/// Half the container limit, else the built-in default.
fn default_budget(limit: Option<u64>) -> u64 {
    limit.map_or(DEFAULT_MESSAGE_BYTES_IN_MEMORY, |l| l / 2)
}

/// The memory limit of the container this process runs in, if any.
fn container_memory_limit() -> Option<u64> {
    CGROUP_LIMIT_FILES
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| parse_limit(&text))
}

/// A cgroup limit file's content: bytes, or `max` (v2) / a huge number (v1) for none.
fn parse_limit(text: &str) -> Option<u64> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|&bytes| bytes > 0 && bytes < NO_LIMIT_ABOVE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(50)
    }

    #[tokio::test]
    async fn reservations_share_the_budget_and_give_it_back() {
        let memory = MessageMemory::new(100 * 1024, Duration::from_millis(50));
        assert_eq!(memory.total(), 100 * 1024);
        let mut a = memory.reservation();
        a.grow_to(60 * 1024, soon()).await.unwrap();
        // Rounded up to whole KiB.
        a.grow_to(60 * 1024 + 1, soon()).await.unwrap();
        assert_eq!(a.bytes(), 61 * 1024);
        let mut b = memory.reservation();
        assert_eq!(b.grow_to(40 * 1024, soon()).await, Err(NoRoom));
        assert_eq!(b.bytes(), 0, "a failed wait holds nothing");
        a.shrink_to(20 * 1024);
        b.grow_to(40 * 1024, soon()).await.unwrap();
        assert_eq!(memory.available(), 40 * 1024);
        drop(a);
        drop(b);
        assert_eq!(memory.available(), 100 * 1024);
    }

    #[tokio::test]
    async fn a_waiting_session_gets_room_when_another_finishes() {
        let memory = MessageMemory::new(64 * 1024, Duration::from_secs(5));
        let mut a = memory.reservation();
        a.grow_to(64 * 1024, soon()).await.unwrap();
        let waiter = {
            let memory = memory.clone();
            tokio::spawn(async move {
                let mut b = memory.reservation();
                b.grow_to(32 * 1024, Instant::now() + Duration::from_secs(5))
                    .await
                    .map(|()| b.bytes())
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(a);
        assert_eq!(waiter.await.unwrap(), Ok(32 * 1024));
    }

    #[tokio::test]
    async fn more_than_the_whole_budget_fails_at_once() {
        let memory = MessageMemory::new(64 * 1024, Duration::from_secs(60));
        let mut a = memory.reservation();
        let started = std::time::Instant::now();
        let far = Instant::now() + Duration::from_secs(60);
        assert_eq!(a.grow_to(65 * 1024, far).await, Err(NoRoom));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn the_default_is_half_the_container_limit() {
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(
            parse_limit("9223372036854771712\n"),
            None,
            "cgroup v1: none"
        );
        assert_eq!(parse_limit("536870912\n"), Some(512 << 20));
        assert_eq!(default_budget(Some(1 << 30)), 512 << 20);
        assert_eq!(default_budget(None), DEFAULT_MESSAGE_BYTES_IN_MEMORY);
    }
}
