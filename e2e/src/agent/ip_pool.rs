//! Pod addresses. Every pod gets its own loopback address so that replicas can listen on the
//! same ports: Linux routes all of 127.0.0.0/8 to `lo`, so a process can bind 127.1.0.7 without
//! any interface set-up, and nothing outside the machine can ever reach it (the project's
//! network rule). The pool hands out the lowest free address and takes freed ones back.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::str::FromStr;

/// The default pod range: 127.1.0.0/16, clear of 127.0.0.1 where the control plane listens.
pub const DEFAULT_POD_RANGE: &str = "127.1.0.0/16";

/// Why an address could not be handed out or a range not parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpPoolError {
    #[error("every address of {range} is in use")]
    Exhausted { range: String },
    #[error("invalid pod address range {range:?}: {reason}")]
    ParseRange { range: String, reason: &'static str },
}

/// An IPv4 range in CIDR form, restricted to loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopbackRange {
    network: u32,
    prefix: u8,
}

impl LoopbackRange {
    /// First and last usable address as integers (the network and broadcast addresses are
    /// skipped out of habit; on `lo` they would work, but nobody expects a pod at x.x.0.0).
    fn bounds(&self) -> (u32, u32) {
        let size = 1u64 << (32 - u32::from(self.prefix));
        let last = u64::from(self.network) + size - 1;
        let last = u32::try_from(last).unwrap_or(u32::MAX);
        if size <= 2 {
            (self.network, last)
        } else {
            (self.network + 1, last - 1)
        }
    }

    /// Whether `ip` is a usable address of this range.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let (first, last) = self.bounds();
        (first..=last).contains(&u32::from(ip))
    }
}

impl FromStr for LoopbackRange {
    type Err = IpPoolError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| IpPoolError::ParseRange {
            range: s.to_string(),
            reason,
        };
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| err("expected a.b.c.d/prefix"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| err("not an IPv4 address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| err("prefix is not a number"))?;
        // /8 would be all of loopback (127.0.0.1 included); /30 leaves too few addresses.
        if !(9..=30).contains(&prefix) {
            return Err(err("prefix must be between 9 and 30"));
        }
        if !addr.is_loopback() {
            return Err(err("pods only get loopback addresses (127.0.0.0/8)"));
        }
        let mask = u32::MAX << (32 - u32::from(prefix));
        let network = u32::from(addr) & mask;
        let range = LoopbackRange { network, prefix };
        if range.contains(Ipv4Addr::LOCALHOST) {
            return Err(err(
                "range must not contain 127.0.0.1, where the control plane listens",
            ));
        }
        Ok(range)
    }
}

impl std::fmt::Display for LoopbackRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.network), self.prefix)
    }
}

/// Which pod (by UID) holds which address.
#[derive(Debug)]
pub struct IpPool {
    range: LoopbackRange,
    by_ip: BTreeMap<u32, String>,
    by_uid: HashMap<String, Ipv4Addr>,
}

impl IpPool {
    pub fn new(range: LoopbackRange) -> Self {
        IpPool {
            range,
            by_ip: BTreeMap::new(),
            by_uid: HashMap::new(),
        }
    }

    pub fn range(&self) -> LoopbackRange {
        self.range
    }

    /// The address of pod `uid`: the one it already holds, else the lowest free one.
    pub fn allocate(&mut self, uid: &str) -> Result<Ipv4Addr, IpPoolError> {
        if let Some(ip) = self.by_uid.get(uid) {
            return Ok(*ip);
        }
        let (first, last) = self.range.bounds();
        // Walk the taken addresses in order; the first gap is the lowest free address.
        let mut candidate = first;
        for &taken in self.by_ip.keys() {
            if taken > candidate {
                break;
            }
            if taken == candidate {
                candidate = candidate.saturating_add(1);
            }
        }
        if candidate > last || self.by_ip.contains_key(&candidate) {
            return Err(IpPoolError::Exhausted {
                range: self.range.to_string(),
            });
        }
        self.take(uid, candidate);
        Ok(Ipv4Addr::from(candidate))
    }

    /// Give pod `uid` the address it had before (an agent restart keeps pod IPs stable).
    /// Returns false when the address is outside the range or held by another pod.
    pub fn reserve(&mut self, uid: &str, ip: Ipv4Addr) -> bool {
        if !self.range.contains(ip) {
            return false;
        }
        match self.by_ip.get(&u32::from(ip)) {
            Some(holder) => holder == uid,
            None => {
                if self.by_uid.contains_key(uid) {
                    return false;
                }
                self.take(uid, u32::from(ip));
                true
            }
        }
    }

    /// Free the address of pod `uid`, if it held one.
    pub fn release(&mut self, uid: &str) -> Option<Ipv4Addr> {
        let ip = self.by_uid.remove(uid)?;
        self.by_ip.remove(&u32::from(ip));
        Some(ip)
    }

    pub fn in_use(&self) -> usize {
        self.by_uid.len()
    }

    fn take(&mut self, uid: &str, ip: u32) {
        self.by_ip.insert(ip, uid.to_string());
        self.by_uid.insert(uid.to_string(), Ipv4Addr::from(ip));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> IpPool {
        IpPool::new(DEFAULT_POD_RANGE.parse().unwrap())
    }

    #[test]
    fn hands_out_lowest_free_address_from_127_1_0_1() {
        let mut p = pool();
        assert_eq!(p.allocate("a").unwrap(), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(p.allocate("b").unwrap(), Ipv4Addr::new(127, 1, 0, 2));
        assert_eq!(p.allocate("c").unwrap(), Ipv4Addr::new(127, 1, 0, 3));
        assert_eq!(
            p.allocate("b").unwrap(),
            Ipv4Addr::new(127, 1, 0, 2),
            "same pod, same address"
        );
        assert_eq!(p.release("b"), Some(Ipv4Addr::new(127, 1, 0, 2)));
        assert_eq!(
            p.allocate("d").unwrap(),
            Ipv4Addr::new(127, 1, 0, 2),
            "freed address reused"
        );
        assert_eq!(p.allocate("e").unwrap(), Ipv4Addr::new(127, 1, 0, 4));
        assert_eq!(p.in_use(), 4);
    }

    #[test]
    fn reserve_keeps_previous_addresses_and_refuses_conflicts() {
        let mut p = pool();
        assert!(p.reserve("old", Ipv4Addr::new(127, 1, 0, 1)));
        assert!(p.reserve("old", Ipv4Addr::new(127, 1, 0, 1)), "idempotent");
        assert!(
            !p.reserve("other", Ipv4Addr::new(127, 1, 0, 1)),
            "taken by another pod"
        );
        assert!(
            !p.reserve("x", Ipv4Addr::new(127, 0, 0, 1)),
            "outside the range"
        );
        assert!(
            !p.reserve("x", Ipv4Addr::new(10, 1, 0, 1)),
            "outside the range"
        );
        assert!(
            !p.reserve("old", Ipv4Addr::new(127, 1, 0, 9)),
            "a pod holds one address"
        );
        assert_eq!(p.allocate("new").unwrap(), Ipv4Addr::new(127, 1, 0, 2));
    }

    #[test]
    fn small_range_runs_out() {
        let mut p = IpPool::new("127.9.9.0/30".parse().unwrap());
        assert_eq!(p.allocate("a").unwrap(), Ipv4Addr::new(127, 9, 9, 1));
        assert_eq!(p.allocate("b").unwrap(), Ipv4Addr::new(127, 9, 9, 2));
        assert!(matches!(
            p.allocate("c"),
            Err(IpPoolError::Exhausted { .. })
        ));
        p.release("a");
        assert_eq!(p.allocate("c").unwrap(), Ipv4Addr::new(127, 9, 9, 1));
    }

    #[test]
    fn ranges_must_be_loopback_and_avoid_the_control_plane() {
        assert!("127.1.0.0/16".parse::<LoopbackRange>().is_ok());
        assert!(
            "127.1.2.3/16".parse::<LoopbackRange>().is_ok(),
            "host bits are masked"
        );
        assert!("10.0.0.0/16".parse::<LoopbackRange>().is_err());
        assert!(
            "127.0.0.0/16".parse::<LoopbackRange>().is_err(),
            "contains 127.0.0.1"
        );
        assert!("127.0.0.0/8".parse::<LoopbackRange>().is_err());
        assert!("127.1.0.0".parse::<LoopbackRange>().is_err());
        assert_eq!(
            "127.1.2.3/16".parse::<LoopbackRange>().unwrap().to_string(),
            "127.1.0.0/16"
        );
    }
}
