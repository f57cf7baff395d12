//! Connection caps: the node-wide total (a semaphore, like mini-redis) and the count per
//! client. A permit and a slot are held for the life of a connection and released on drop.
//!
//! A client is an IPv4 address, or an IPv6 prefix of `clientIpv6Prefix` bits ([`client_key`]):
//! one host usually holds a whole /64, so counting IPv6 addresses one by one would let it
//! open unlimited connections. The AUTH failure limit per client uses the same key.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The key a client's limits are kept under: an IPv4 address as it is (also in its
/// IPv4-mapped IPv6 form), an IPv6 address with everything after its first `ipv6_prefix`
/// bits cleared.
pub fn client_key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let prefix = u32::from(ipv6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// Counts open connections per client. A clone shares the counts (a config reload hands
/// the same limits to the next generation of the server context).
#[derive(Clone)]
pub struct ConnectionLimits {
    total: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, u32>>>,
    max_per_ip: u32,
    ipv6_prefix: u8,
}

/// Held while a connection counts against its IP.
pub struct IpSlot {
    per_ip: Arc<Mutex<HashMap<IpAddr, u32>>>,
    ip: IpAddr,
}

impl ConnectionLimits {
    /// `max_per_ip` connections per client, IPv6 clients grouped by `ipv6_prefix` bits.
    pub fn new(max_total: u32, max_per_ip: u32, ipv6_prefix: u8) -> Self {
        Self {
            total: Arc::new(Semaphore::new(max_total as usize)),
            per_ip: Arc::new(Mutex::new(HashMap::new())),
            max_per_ip,
            ipv6_prefix,
        }
    }

    /// A node-wide slot, or `None` when `maxConnections` are open.
    pub fn try_total(&self) -> Option<OwnedSemaphorePermit> {
        self.total.clone().try_acquire_owned().ok()
    }

    /// A slot for `ip`, or `None` when its client (its IPv6 prefix) has `maxConnectionsPerIp`
    /// open.
    pub fn try_ip(&self, ip: IpAddr) -> Option<IpSlot> {
        let ip = client_key(ip, self.ipv6_prefix);
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

    /// Open connections from `ip`'s client.
    pub fn count(&self, ip: IpAddr) -> u32 {
        let ip = client_key(ip, self.ipv6_prefix);
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
        let limits = ConnectionLimits::new(3, 2, 64);
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

    #[test]
    fn ipv6_clients_count_per_prefix() {
        let limits = ConnectionLimits::new(100, 2, 64);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let _a = limits.try_ip(ip("2001:db8:1:2::1")).unwrap();
        let _b = limits.try_ip(ip("2001:db8:1:2:ffff::9")).unwrap();
        assert!(
            limits.try_ip(ip("2001:db8:1:2:dead:beef:0:1")).is_none(),
            "a third address of the same /64"
        );
        assert_eq!(limits.count(ip("2001:db8:1:2::77")), 2);
        assert!(
            limits.try_ip(ip("2001:db8:1:3::1")).is_some(),
            "the next /64"
        );
        // IPv4 stays per address, in either notation.
        let _c = limits.try_ip(ip("192.0.2.1")).unwrap();
        let _d = limits.try_ip(ip("::ffff:192.0.2.1")).unwrap();
        assert!(limits.try_ip(ip("192.0.2.1")).is_none());
        assert!(limits.try_ip(ip("192.0.2.2")).is_some());
        assert_eq!(
            client_key(ip("2001:db8:1:2:3:4:5:6"), 48),
            ip("2001:db8:1::")
        );
        assert_eq!(client_key(ip("2001:db8::1"), 128), ip("2001:db8::1"));
    }
}
