//! Which IP addresses delivery may connect to (catalogue MX-06, SSRF).
//!
//! MX and address records are controlled by whoever owns the recipient domain. Without a
//! check, a hostile domain whose MX points at `127.0.0.1`, `10.96.0.1` or `169.254.169.254`
//! would make our workers open SMTP sessions to NATS, the kube-apiserver or a cloud metadata
//! service from inside the cluster. So every address that came from the DNS is checked
//! against a list of blocked ranges (loopback, private, shared/CGNAT, link-local, multicast,
//! reserved, documentation, IPv6 ULA and link-local, and IPv4 embedded in IPv6 is checked as
//! IPv4) before connecting. The config can add ranges (`blockedNetworks`: the cluster's own
//! ranges if they are public) and punch holes (`allowedNetworks`: tests allow `127.0.0.0/8`).
//!
//! Configured destinations (a domain's inbound target, a relay) are trusted configuration and
//! are not checked: an inbound target is normally a cluster service.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::Network;

/// The ranges no MX-derived connection may reach, with the reason shown in logs and DSNs.
const DEFAULT_BLOCKED: [(Network, &str); 22] = [
    (Network::v4(0, 0, 0, 0, 8), "this-network"),
    (Network::v4(10, 0, 0, 0, 8), "private"),
    (Network::v4(100, 64, 0, 0, 10), "shared address space"),
    (Network::v4(127, 0, 0, 0, 8), "loopback"),
    (Network::v4(169, 254, 0, 0, 16), "link-local"),
    (Network::v4(172, 16, 0, 0, 12), "private"),
    (Network::v4(192, 0, 0, 0, 24), "IETF protocol assignments"),
    (Network::v4(192, 0, 2, 0, 24), "documentation"),
    (Network::v4(192, 168, 0, 0, 16), "private"),
    (Network::v4(198, 18, 0, 0, 15), "benchmarking"),
    (Network::v4(198, 51, 100, 0, 24), "documentation"),
    (Network::v4(203, 0, 113, 0, 24), "documentation"),
    (Network::v4(224, 0, 0, 0, 4), "multicast"),
    (Network::v4(240, 0, 0, 0, 4), "reserved"),
    (Network::v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified"),
    (Network::v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback"),
    (
        Network::v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64),
        "discard-only",
    ),
    (
        Network::v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32),
        "documentation",
    ),
    (
        Network::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
        "unique local",
    ),
    (Network::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    (Network::v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), "site-local"),
    (Network::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast"),
];

/// Why an address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("address {ip} is in a blocked range ({range}, {reason})")]
pub struct Refused {
    pub ip: IpAddr,
    pub range: String,
    pub reason: String,
}

/// The address check applied to every MX-derived destination.
#[derive(Debug, Clone)]
pub struct AddressPolicy {
    allowed: Vec<Network>,
    blocked: Vec<(Network, String)>,
}

impl AddressPolicy {
    /// The default blocked ranges plus `blocked`, with `allowed` as exceptions.
    pub fn new(allowed: &[String], blocked: &[String]) -> Result<Self, String> {
        let allowed = allowed
            .iter()
            .map(|n| Network::parse(n))
            .collect::<Result<Vec<_>, _>>()?;
        let mut all: Vec<(Network, String)> = DEFAULT_BLOCKED
            .iter()
            .map(|(n, r)| (*n, (*r).to_owned()))
            .collect();
        for n in blocked {
            all.push((Network::parse(n)?, "blocked by configuration".to_owned()));
        }
        Ok(Self {
            allowed,
            blocked: all,
        })
    }

    /// Whether delivery may connect to `ip`.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refused> {
        if self.allowed.iter().any(|n| n.contains(ip)) {
            return Ok(());
        }
        // IPv4-mapped (::ffff:a.b.c.d) and NAT64 (64:ff9b::a.b.c.d) addresses reach the
        // embedded IPv4 address: judge that one too.
        if let IpAddr::V6(v6) = ip
            && let Some(v4) = embedded_ipv4(v6)
        {
            self.check(IpAddr::V4(v4))
                .map_err(|r| Refused { ip, ..r })?;
        }
        match self.blocked.iter().find(|(n, _)| n.contains(ip)) {
            Some((n, reason)) => Err(Refused {
                ip,
                range: n.to_string(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }
}

fn embedded_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    // RFC 6052 well-known NAT64 prefix 64:ff9b::/96.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [a, b] = s[6].to_be_bytes();
        let [c, d] = s[7].to_be_bytes();
        return Some(Ipv4Addr::new(a, b, c, d));
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (see notes/common.md)
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_internal_ranges_and_allows_public_ones() {
        let p = AddressPolicy::new(&[], &[]).unwrap();
        for blocked in [
            "127.0.0.1",
            "127.8.9.10",
            "10.96.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(p.check(ip(blocked)).is_err(), "{blocked} must be refused");
        }
        for allowed in [
            "8.8.8.8",
            "172.32.0.1",
            "1.1.1.1",
            "2a00:1450::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(p.check(ip(allowed)).is_ok(), "{allowed} must be allowed");
        }
        let e = p.check(ip("127.0.0.1")).unwrap_err();
        assert_eq!(e.range, "127.0.0.0/8");
        assert!(e.to_string().contains("loopback"), "{e}");
    }

    #[test]
    fn configuration_adds_blocks_and_exceptions() {
        let p = AddressPolicy::new(&["127.0.0.0/8".into()], &["203.0.114.0/24".into()]).unwrap();
        assert!(p.check(ip("127.0.0.1")).is_ok());
        assert!(
            p.check(ip("::ffff:127.0.0.1")).is_ok(),
            "mapped form of an allowed address"
        );
        assert!(
            p.check(ip("::1")).is_err(),
            "allowing 127/8 does not allow ::1"
        );
        assert!(p.check(ip("10.0.0.1")).is_err());
        assert!(p.check(ip("203.0.114.7")).is_err());
        assert!(p.check(ip("203.0.115.7")).is_ok());
    }
}
