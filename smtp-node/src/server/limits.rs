//! Connection caps: the node-wide total (a semaphore, like mini-redis) and the count per
//! client IP. A permit and a slot are held for the life of a connection and released on drop.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Counts open connections per client IP. A clone shares the counts (a config reload hands
/// the same limits to the next generation of the server context).
#[derive(Clone)]
pub struct ConnectionLimits {
    total: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, u32>>>,
    max_per_ip: u32,
}

/// Held while a connection counts against its IP.
pub struct IpSlot {
    per_ip: Arc<Mutex<HashMap<IpAddr, u32>>>,
    ip: IpAddr,
}

impl ConnectionLimits {
    pub fn new(max_total: u32, max_per_ip: u32) -> Self {
        Self {
            total: Arc::new(Semaphore::new(max_total as usize)),
            per_ip: Arc::new(Mutex::new(HashMap::new())),
            max_per_ip,
        }
    }

    /// A node-wide slot, or `None` when `maxConnections` are open.
    pub fn try_total(&self) -> Option<OwnedSemaphorePermit> {
        self.total.clone().try_acquire_owned().ok()
    }

    /// A slot for `ip`, or `None` when it has `maxConnectionsPerIp` open.
    pub fn try_ip(&self, ip: IpAddr) -> Option<IpSlot> {
        let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let count = map.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            return None;
        }
        *count += 1;
        Some(IpSlot {
            per_ip: self.per_ip.clone(),
            ip,
        })
    }

    /// Open connections from `ip`.
    pub fn count(&self, ip: IpAddr) -> u32 {
        self.per_ip
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ip)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = map.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_total_and_per_ip() {
        let limits = ConnectionLimits::new(3, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let s1 = limits.try_ip(a).unwrap();
        let _s2 = limits.try_ip(a).unwrap();
        assert!(limits.try_ip(a).is_none());
        assert!(limits.try_ip(b).is_some());
        drop(s1);
        assert!(limits.try_ip(a).is_some());

        let p: Vec<_> = (0..3).map(|_| limits.try_total().unwrap()).collect();
        assert!(limits.try_total().is_none());
        drop(p);
        assert!(limits.try_total().is_some());
    }
}
