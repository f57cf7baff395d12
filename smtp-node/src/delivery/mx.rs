//! From a recipient domain to the list of addresses to try, in order (RFC 5321 5.1).
//!
//! * MX records sorted by preference, equal preferences in random order (load spreading);
//! * no MX record but the name exists: the domain itself is the implicit MX (its A/AAAA);
//! * a null MX (`MX 0 .`, RFC 7505): the domain accepts no mail, a permanent failure
//!   (`556 5.1.10`), as is a domain that does not exist (`5.1.2`);
//! * a lookup that fails for any other reason (SERVFAIL, timeout) is temporary (`4.4.3`);
//! * an MX host named by an IP address is invalid (RFC 5321 5.1: it must be a name) and
//!   skipped;
//! * every address goes through the [`AddressPolicy`]; when every address of every host is
//!   refused, the domain is refused permanently (`5.4.4`): its DNS points into our network.
//!
//! The number of hosts and addresses tried per attempt is bounded, so a domain with hundreds
//! of MX records cannot keep a worker busy.

use std::net::{IpAddr, SocketAddr};

use rand::Rng;
use rand::seq::SliceRandom;

use super::address_policy::{AddressPolicy, Refused};
use crate::dns::{DnsError, MxRecord, Resolver};
use crate::protocol::EnhancedCode;

/// MX hosts considered per delivery attempt (Postfix `smtp_mx_address_limit` is 5 addresses;
/// hosts are cheap to skip, addresses cost a connection).
pub const MAX_MX_HOSTS: usize = 10;
/// Addresses (connection attempts) per delivery attempt.
pub const MAX_TARGETS: usize = 10;

/// One address to connect to, and the host name it belongs to (for TLS and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub addr: SocketAddr,
}

/// Why a domain has no address to try.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MxError {
    #[error("{domain} does not accept mail (null MX, RFC 7505)")]
    NullMx { domain: String },
    #[error("domain {domain} does not exist")]
    NoSuchDomain { domain: String },
    #[error("DNS lookup failed temporarily: {0}")]
    Temporary(String),
    #[error("MX hosts of {domain} have no usable address: {detail}")]
    NoAddress {
        domain: String,
        detail: String,
        permanent: bool,
    },
    #[error("every address of {domain} is refused by policy: {first}")]
    Refused { domain: String, first: Refused },
}

impl MxError {
    /// Whether the sender should get a bounce now rather than a retry later.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::NullMx { .. } | Self::NoSuchDomain { .. } | Self::Refused { .. } => true,
            Self::NoAddress { permanent, .. } => *permanent,
            Self::Temporary(_) => false,
        }
    }

    /// The basic reply code and enhanced status for the DSN.
    pub fn status(&self) -> (u16, EnhancedCode) {
        match self {
            Self::NullMx { .. } => (556, EnhancedCode(5, 1, 10)),
            Self::NoSuchDomain { .. } => (550, EnhancedCode(5, 1, 2)),
            Self::Refused { .. } => (550, EnhancedCode(5, 4, 4)),
            Self::NoAddress {
                permanent: true, ..
            } => (550, EnhancedCode(5, 4, 4)),
            Self::NoAddress {
                permanent: false, ..
            }
            | Self::Temporary(_) => (451, EnhancedCode(4, 4, 3)),
        }
    }
}

/// The MX hosts to try, in order; `Err(NullMx)` for a null MX. `records` as the DNS gave
/// them; an empty list means "no MX" and yields the implicit MX `domain`.
pub fn order_hosts(
    domain: &str,
    records: &[MxRecord],
    rng: &mut impl Rng,
) -> Result<Vec<String>, MxError> {
    if records.is_empty() {
        return Ok(vec![domain.to_owned()]);
    }
    let real: Vec<&MxRecord> = records.iter().filter(|r| !r.exchange.is_empty()).collect();
    // RFC 7505 3: a null MX must be the only record; if other records exist anyway the
    // domain evidently wants mail, so use them.
    if real.is_empty() {
        return Err(MxError::NullMx {
            domain: domain.to_owned(),
        });
    }
    let mut sorted = real;
    sorted.shuffle(rng);
    // A stable sort keeps the shuffled order within one preference.
    sorted.sort_by_key(|r| r.preference);
    let mut hosts: Vec<String> = Vec::new();
    for r in sorted {
        if !hosts.contains(&r.exchange) {
            hosts.push(r.exchange.clone());
        }
    }
    hosts.truncate(MAX_MX_HOSTS);
    Ok(hosts)
}

/// Resolves `domain` to the addresses to try, checked against `policy`.
pub async fn resolve_targets(
    resolver: &dyn Resolver,
    domain: &str,
    port: u16,
    policy: &AddressPolicy,
) -> Result<Vec<Target>, MxError> {
    // An address literal (`user@[192.0.2.1]`) names the host directly (RFC 5321 4.1.3).
    if let Some(literal) = address_literal(domain) {
        let ip = literal.ok_or_else(|| MxError::NoSuchDomain {
            domain: domain.to_owned(),
        })?;
        return match policy.check(ip) {
            Ok(()) => Ok(vec![Target {
                host: domain.to_owned(),
                addr: SocketAddr::new(ip, port),
            }]),
            Err(first) => Err(MxError::Refused {
                domain: domain.to_owned(),
                first,
            }),
        };
    }
    let records = match resolver.mx(domain).await {
        Ok(r) => r,
        Err(DnsError::NxDomain { .. }) => {
            return Err(MxError::NoSuchDomain {
                domain: domain.to_owned(),
            });
        }
        Err(e @ DnsError::Temporary { .. }) => return Err(MxError::Temporary(e.to_string())),
    };
    let hosts = order_hosts(domain, &records, &mut rand::rng())?;
    let mut targets = Vec::new();
    let mut refused: Option<Refused> = None;
    let mut problems: Vec<String> = Vec::new();
    let mut any_temporary = false;
    for host in hosts {
        if host.parse::<IpAddr>().is_ok() {
            problems.push(format!("MX host {host} is an IP address, not a name"));
            continue;
        }
        match resolver.ips(&host).await {
            Ok(ips) if ips.is_empty() => problems.push(format!("{host} has no address")),
            Ok(ips) => {
                for ip in ips {
                    match policy.check(ip) {
                        Ok(()) => targets.push(Target {
                            host: host.clone(),
                            addr: SocketAddr::new(ip, port),
                        }),
                        Err(r) => {
                            tracing::warn!(%domain, %host, error = %r, "MX address refused by policy");
                            refused.get_or_insert(r);
                        }
                    }
                }
            }
            Err(e) => {
                any_temporary |= !e.is_nx_domain();
                problems.push(e.to_string());
            }
        }
        if targets.len() >= MAX_TARGETS {
            break;
        }
    }
    targets.truncate(MAX_TARGETS);
    if !targets.is_empty() {
        return Ok(targets);
    }
    if let Some(first) = refused
        && !any_temporary
    {
        return Err(MxError::Refused {
            domain: domain.to_owned(),
            first,
        });
    }
    Err(MxError::NoAddress {
        domain: domain.to_owned(),
        detail: problems.join("; "),
        permanent: !any_temporary,
    })
}

/// `Some(Some(ip))` for a valid `[...]` literal, `Some(None)` for an invalid one, `None` for
/// a domain name.
fn address_literal(domain: &str) -> Option<Option<IpAddr>> {
    let inner = domain.strip_prefix('[')?.strip_suffix(']');
    Some(inner.and_then(|i| {
        let i = i
            .strip_prefix("IPv6:")
            .or_else(|| i.strip_prefix("ipv6:"))
            .unwrap_or(i);
        i.parse().ok()
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::dns::ZoneResolver;

    fn mx(preference: u16, exchange: &str) -> MxRecord {
        MxRecord {
            preference,
            exchange: exchange.into(),
        }
    }

    #[test]
    fn orders_by_preference_and_shuffles_equals() {
        let records = [
            mx(20, "c"),
            mx(10, "a"),
            mx(10, "b"),
            mx(30, "d"),
            mx(10, "a"),
        ];
        let mut seen_first = std::collections::HashSet::new();
        for seed in 0..32 {
            let hosts = order_hosts("x.test", &records, &mut StdRng::seed_from_u64(seed)).unwrap();
            assert_eq!(hosts.len(), 4, "duplicates removed: {hosts:?}");
            assert_eq!(&hosts[2..], &["c", "d"]);
            seen_first.insert(hosts[0].clone());
        }
        assert_eq!(seen_first.len(), 2, "equal preferences are randomised");
    }

    #[test]
    fn implicit_and_null_mx() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            order_hosts("x.test", &[], &mut rng).unwrap(),
            vec!["x.test"]
        );
        assert!(matches!(
            order_hosts("x.test", &[mx(0, "")], &mut rng),
            Err(MxError::NullMx { .. })
        ));
        assert_eq!(
            order_hosts("x.test", &[mx(0, ""), mx(10, "mx")], &mut rng).unwrap(),
            vec!["mx"]
        );
    }

    const ZONE: &str = r#"
remote.test.     MX 10 mx.remote.test.
remote.test.     MX 20 backup.remote.test.
mx.remote.test.  A 198.51.200.1
backup.remote.test. A 10.1.2.3
implicit.test.   A 198.51.200.9
null.test.       MX 0 .
evil.test.       MX 10 inside.evil.test.
inside.evil.test. A 127.0.0.1
inside.evil.test. AAAA ::1
literal.test.    MX 10 192.0.2.1.
lame.test.       MX 10 gone.lame.test.
flaky.test.      MX 10 mx.flaky.test.
mx.flaky.test.   SERVFAIL
broken.test.     SERVFAIL
"#;

    async fn targets(domain: &str, allowed: &[&str]) -> Result<Vec<String>, MxError> {
        let z = ZoneResolver::from_zone(ZONE).unwrap();
        let allowed: Vec<String> = allowed.iter().map(|s| (*s).to_owned()).collect();
        let policy = AddressPolicy::new(&allowed, &[]).unwrap();
        resolve_targets(&z, domain, 2525, &policy).await.map(|t| {
            t.into_iter()
                .map(|t| format!("{} {}", t.host, t.addr))
                .collect()
        })
    }

    #[tokio::test]
    async fn resolves_in_order_and_applies_the_policy() {
        assert_eq!(
            targets("remote.test", &[]).await.unwrap(),
            vec!["mx.remote.test 198.51.200.1:2525"],
            "the private backup address is skipped"
        );
        assert_eq!(
            targets("remote.test", &["10.0.0.0/8"]).await.unwrap(),
            vec![
                "mx.remote.test 198.51.200.1:2525",
                "backup.remote.test 10.1.2.3:2525"
            ]
        );
        assert_eq!(
            targets("implicit.test", &[]).await.unwrap(),
            vec!["implicit.test 198.51.200.9:2525"]
        );
        assert_eq!(
            targets("[198.51.200.7]", &[]).await.unwrap(),
            vec!["[198.51.200.7] 198.51.200.7:2525"]
        );
    }

    #[tokio::test]
    async fn classifies_failures() {
        let e = targets("evil.test", &[]).await.unwrap_err();
        assert!(
            matches!(e, MxError::Refused { .. }) && e.is_permanent(),
            "{e}"
        );
        assert_eq!(e.status(), (550, EnhancedCode(5, 4, 4)));
        assert_eq!(
            targets("evil.test", &["127.0.0.0/8"]).await.unwrap(),
            vec!["inside.evil.test 127.0.0.1:2525"],
            "allowing loopback allows 127/8 only"
        );
        let e = targets("null.test", &[]).await.unwrap_err();
        assert_eq!(e.status(), (556, EnhancedCode(5, 1, 10)));
        let e = targets("nowhere.test", &[]).await.unwrap_err();
        assert_eq!(e.status(), (550, EnhancedCode(5, 1, 2)));
        let e = targets("broken.test", &[]).await.unwrap_err();
        assert!(!e.is_permanent(), "SERVFAIL defers: {e}");
        assert_eq!(e.status().1, EnhancedCode(4, 4, 3));
        let e = targets("flaky.test", &[]).await.unwrap_err();
        assert!(!e.is_permanent(), "{e}");
        let e = targets("lame.test", &[]).await.unwrap_err();
        assert!(e.is_permanent(), "MX host does not exist: {e}");
        let e = targets("literal.test", &[]).await.unwrap_err();
        assert!(e.to_string().contains("IP address"), "{e}");
        let e = targets("[not-an-ip]", &[]).await.unwrap_err();
        assert!(e.is_permanent());
    }
}
