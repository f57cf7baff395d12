//! Which MX hosts DANE applies to (RFC 7672 2.2): those named by a DNSSEC-*secure* MX RRset
//! whose own address records are secure and that have secure TLSA records at
//! `_<port>._tcp.<host>`. A *bogus* answer anywhere on that path makes the host unusable (a
//! signature that should validate and does not is an attack until shown otherwise), never
//! merely "without DANE".

use std::collections::HashMap;
use std::sync::Arc;

use crate::dns::{Dnssec, Resolver, TlsaRecord};

/// What DANE says about one MX host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostDane {
    /// No DANE for this host: deliver by the other policies.
    None,
    /// Secure TLSA records: the connection must satisfy them.
    Tlsa(Arc<[TlsaRecord]>),
    /// A bogus answer on the way: do not use the host.
    Bogus(String),
}

/// DANE for the MX hosts of a domain.
#[derive(Debug, Clone, Default)]
pub struct DomainDane {
    /// The MX RRset was secure (RFC 8689 also accepts it as the MX's authentication).
    pub mx_secure: bool,
    /// The MX RRset itself was bogus.
    pub mx_bogus: bool,
    /// The secure MX host names (lower case); hosts outside it are not the domain's.
    pub secure_hosts: Vec<String>,
    pub hosts: HashMap<String, HostDane>,
}

impl DomainDane {
    /// What applies to `host`.
    pub fn host(&self, host: &str) -> HostDane {
        self.hosts
            .get(&host.to_ascii_lowercase())
            .cloned()
            .unwrap_or(HostDane::None)
    }
}

/// Looks DANE up for `domain` and its MX `hosts` (port `port`). An implicit MX (no MX
/// records, the domain itself) counts as the MX RRset the domain's address records are.
pub async fn lookup(
    resolver: &dyn Resolver,
    domain: &str,
    hosts: &[String],
    port: u16,
) -> DomainDane {
    let mut out = DomainDane::default();
    match resolver.mx_validated(domain).await {
        Ok(v) => match v.dnssec {
            Dnssec::Bogus => {
                out.mx_bogus = true;
                return out;
            }
            Dnssec::Secure => {
                out.mx_secure = true;
                out.secure_hosts = if v.records.is_empty() {
                    vec![domain.to_ascii_lowercase()]
                } else {
                    v.records.iter().map(|m| m.exchange.clone()).collect()
                };
            }
            Dnssec::Insecure => return out,
        },
        Err(error) => {
            tracing::debug!(%domain, %error, "no validated MX answer; no DANE");
            return out;
        }
    }
    for host in hosts {
        let host = host.to_ascii_lowercase();
        if !out.secure_hosts.contains(&host) {
            continue;
        }
        let verdict = match resolver.ips_validated(&host).await {
            Ok(v) if v.dnssec == Dnssec::Bogus => {
                HostDane::Bogus(format!("the addresses of {host} are DNSSEC-bogus"))
            }
            Ok(v) if v.dnssec == Dnssec::Secure => {
                let name = format!("_{port}._tcp.{host}");
                match resolver.tlsa(&name).await {
                    Ok(t) if t.dnssec == Dnssec::Bogus => {
                        HostDane::Bogus(format!("the TLSA records {name} are DNSSEC-bogus"))
                    }
                    Ok(t) if t.dnssec == Dnssec::Secure && !t.records.is_empty() => {
                        HostDane::Tlsa(t.records.into())
                    }
                    Ok(_) => HostDane::None,
                    Err(error) => {
                        // RFC 7672 2.2.3: a TLSA lookup that fails (not NXDOMAIN/NODATA) makes
                        // the host unusable, as it may hide records.
                        HostDane::Bogus(format!("TLSA lookup of {name} failed: {error}"))
                    }
                }
            }
            _ => HostDane::None,
        };
        out.hosts.insert(host, verdict);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::dns::ZoneResolver;

    const ZONE: &str = r#"
signed.test.        SECURE
signed.test.        MX 10 mx.signed.test.
signed.test.        MX 20 plain.signed.test.
mx.signed.test.     SECURE
mx.signed.test.     A 192.0.2.10
_25._tcp.mx.signed.test. SECURE
_25._tcp.mx.signed.test. TLSA 3 1 1 0011aabb
plain.signed.test.  SECURE
plain.signed.test.  A 192.0.2.11
bogus.test.         BOGUS
bogus.test.         MX 10 mx.bogus.test.
badtlsa.test.       SECURE
badtlsa.test.       MX 10 mx.badtlsa.test.
mx.badtlsa.test.    SECURE
mx.badtlsa.test.    A 192.0.2.12
_25._tcp.mx.badtlsa.test. BOGUS
unsigned.test.      MX 10 mx.unsigned.test.
_25._tcp.mx.unsigned.test. TLSA 3 1 1 00
"#;

    fn hosts(h: &[&str]) -> Vec<String> {
        h.iter().map(|s| (*s).to_owned()).collect()
    }

    #[tokio::test]
    async fn secure_tlsa_applies_and_bogus_is_never_insecure() {
        let z = ZoneResolver::from_zone(ZONE).unwrap();
        let d = lookup(
            &z,
            "signed.test",
            &hosts(&["mx.signed.test", "plain.signed.test"]),
            25,
        )
        .await;
        assert!(d.mx_secure);
        let HostDane::Tlsa(records) = d.host("mx.signed.test") else {
            panic!("{d:?}")
        };
        assert_eq!(records[0].data, [0x00, 0x11, 0xaa, 0xbb]);
        assert_eq!(d.host("plain.signed.test"), HostDane::None);

        let d = lookup(&z, "bogus.test", &hosts(&["mx.bogus.test"]), 25).await;
        assert!(d.mx_bogus && !d.mx_secure);
        let d = lookup(&z, "badtlsa.test", &hosts(&["mx.badtlsa.test"]), 25).await;
        assert!(
            matches!(d.host("mx.badtlsa.test"), HostDane::Bogus(_)),
            "{d:?}"
        );
        // TLSA records in an unsigned zone do not count.
        let d = lookup(&z, "unsigned.test", &hosts(&["mx.unsigned.test"]), 25).await;
        assert!(!d.mx_secure);
        assert_eq!(d.host("mx.unsigned.test"), HostDane::None);
    }
}
