//! Which IP addresses delivery may connect to.
//!
//! MX and address records are controlled by whoever owns the recipient domain. Without a
//! check, a hostile domain whose MX points at `127.0.0.1`, `10.96.0.1` or `169.254.169.254`
//! would make our workers open SMTP sessions to NATS, the kube-apiserver or a cloud metadata
//! service from inside the cluster. So every address that came from the DNS is checked
//! against a list of blocked ranges (loopback, private, shared/CGNAT, link-local, multicast,
//! reserved, documentation, IPv6 ULA and link-local) before connecting. An IPv6 address that
//! carries an IPv4 address reaches that one through a translator or tunnel, so the embedded
//! address is checked as IPv4 too: IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`,
//! NAT64 `64:ff9b::/96` and the local-use `64:ff9b:1::/48` (RFC 8215, every RFC 6052 layout
//! that fits the address), 6to4 `2002::/16` and Teredo `2001::/32` (its server and its
//! obfuscated client address). The config can add ranges (`blockedNetworks`: the cluster's own
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
        // Translated and tunnelled forms reach the embedded IPv4 address: judge that too.
        if let IpAddr::V6(v6) = ip {
            for v4 in embedded_ipv4(v6) {
                self.check(IpAddr::V4(v4))
                    .map_err(|r| Refused { ip, ..r })?;
            }
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

/// The IPv4 addresses `v6` may lead to (none for an ordinary IPv6 address).
fn embedded_ipv4(v6: Ipv6Addr) -> Vec<Ipv4Addr> {
    let bits = u128::from(v6);
    // The 32 bits of `bits` that start `from` bits after the top.
    let at = |from: u32| Ipv4Addr::from((bits >> (96 - from)) as u32);
    let s = v6.segments();
    if let Some(v4) = v6.to_ipv4_mapped() {
        return vec![v4];
    }
    // IPv4-compatible ::a.b.c.d (RFC 4291 2.5.5.1, deprecated but still routed by some
    // stacks); `::` and `::1` are blocked as they are.
    if s[..6] == [0; 6] && bits > 1 {
        return vec![at(96)];
    }
    // RFC 6052 well-known NAT64 prefix 64:ff9b::/96.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return vec![at(96)];
    }
    // RFC 8215 local-use NAT64 64:ff9b:1::/48: the operator picks the prefix length (48, 56,
    // 64 or 96), which the address does not tell. Every layout whose reserved suffix bits
    // are zero is possible; all of them must be harmless.
    if s[..3] == [0x64, 0xff9b, 1] {
        let u_octet_free = |v: u128| v & (0xff << 56) == 0;
        let mut out = Vec::new();
        // /96: bits 96..128.
        if bits & (((1u128 << 48) - 1) << 32) == 0 {
            out.push(at(96));
        }
        // /64: bits 72..104, suffix 104..128 zero.
        if u_octet_free(bits) && bits & 0xff_ffff == 0 {
            out.push(at(72));
        }
        // /56: bits 56..64 and 72..96, suffix 96..128 zero.
        if u_octet_free(bits) && bits as u32 == 0 {
            let hi = ((bits >> 64) & 0xff) as u32;
            let lo = ((bits >> 32) & 0xff_ffff) as u32;
            out.push(Ipv4Addr::from((hi << 24) | lo));
        }
        // /48: bits 48..64 and 72..88, suffix 88..128 zero.
        if u_octet_free(bits) && bits & ((1u128 << 40) - 1) == 0 {
            let hi = ((bits >> 64) & 0xffff) as u32;
            let lo = ((bits >> 40) & 0xffff) as u32;
            out.push(Ipv4Addr::from((hi << 16) | lo));
        }
        if out.is_empty() {
            // No layout fits: judge it as the /96 form, the usual one.
            out.push(at(96));
        }
        return out;
    }
    // 6to4 (RFC 3056): 2002:a.b.c.d::/48.
    if s[0] == 0x2002 {
        return vec![at(16)];
    }
    // Teredo (RFC 4380): 2001:0:<server>:<flags>:<port>:<client XOR 0xffffffff>.
    if s[..2] == [0x2001, 0] {
        let client = Ipv4Addr::from(!(bits as u32));
        return vec![at(32), client];
    }
    Vec::new()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
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
    fn ipv4_behind_translators_and_tunnels_is_judged_as_ipv4() {
        let p = AddressPolicy::new(&[], &[]).unwrap();
        for (blocked, why) in [
            ("::127.0.0.1", "IPv4-compatible loopback"),
            ("::10.1.2.3", "IPv4-compatible private"),
            ("::169.254.169.254", "IPv4-compatible metadata"),
            ("64:ff9b:1::a9fe:a9fe", "local NAT64 /96, metadata"),
            ("64:ff9b:1::7f00:1", "local NAT64 /96, loopback"),
            ("64:ff9b:1:0:a:0:0:0", "local NAT64 /64 layout of 10.0.0.0"),
            ("64:ff9b:1:7f:0:1::", "local NAT64 /56 layout of 127.0.0.1"),
            (
                "64:ff9b:1:7f00:0:1::",
                "local NAT64 /48 layout of 127.0.0.1",
            ),
            ("2002:7f00:1::1", "6to4 of 127.0.0.1"),
            ("2002:a9fe:a9fe::", "6to4 of the metadata address"),
            ("2002:c0a8:101:1::1", "6to4 of 192.168.1.1"),
            ("2001:0:7f00:1::1", "Teredo server 127.0.0.1"),
            (
                "2001:0:4136:e378:8000:63bf:80ff:fffe",
                "Teredo client 127.0.0.1",
            ),
            (
                "2001:0:4136:e378:8000:63bf:f5ff:fffe",
                "Teredo client 10.0.0.1",
            ),
        ] {
            let e = p.check(ip(blocked)).err();
            assert!(e.is_some(), "{blocked} ({why}) must be refused");
            assert_eq!(
                e.unwrap().ip,
                ip(blocked),
                "the refusal names the address asked for"
            );
        }
        for allowed in [
            "64:ff9b:1::808:808",
            "64:ff9b:1:8:8:808::",
            "2002:808:808::1",
            "2001:0:4136:e378:8000:63bf:f7f7:f7f7",
            "::8.8.8.8",
            "2a00:1450:4001:81d::200e",
        ] {
            assert!(p.check(ip(allowed)).is_ok(), "{allowed} must be allowed");
        }
        // An allowed IPv4 range covers its embedded forms too (as for mapped addresses).
        let lo = AddressPolicy::new(&["127.0.0.0/8".into()], &[]).unwrap();
        assert!(lo.check(ip("2002:7f00:1::1")).is_ok());
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
