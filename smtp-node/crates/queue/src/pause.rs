//! Delivery pauses: what a `DeliveryPause` resource becomes in the KV bucket
//! [`crate::PAUSES_BUCKET`] (written by the operator, watched by every node), and which
//! deliveries it stops.
//!
//! A pause names up to four selectors; every selector it names must match (so "from
//! `shop.example` to `gmail.com`" is one pause), and within one selector any listed value
//! may match:
//! * `recipientDomains`: the recipient's domain; `*.example.com` matches its subdomains;
//! * `fromDomains`: the MailDomain whose queue holds the entry;
//! * `mxHosts`: an MX host (or relay host) the delivery would connect to, same patterns;
//! * `networks`: an address (CIDR) it would connect to.
//!
//! The last two are known only once the destination is resolved; a pause with them matches
//! a delivery when *any* of its hosts matches, so a paused provider gets no connection at all.
//! A pause with an expiry stops matching at that time, on every node, without anyone
//! deleting it.

use std::net::IpAddr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::rfc3339::{parse_rfc3339, rfc3339};

/// One pause, as stored (JSON, camelCase).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pause {
    /// Its key in the bucket ([`crate::pause_key`]): what `Kubemail-Paused-By` names.
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// RFC 3339; absent: until deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipient_domains: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_domains: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mx_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
}

/// Why a stored pause cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PauseError {
    #[error(
        "pause {key} selects nothing: name a recipient domain, a MailDomain, an MX host or a network"
    )]
    Empty { key: String },
    #[error("pause {key}: invalid network {value:?}")]
    Network { key: String, value: String },
    #[error("pause {key}: invalid expiry {value:?}")]
    Expiry { key: String, value: String },
    #[error("pause {key}: invalid pattern {value:?}")]
    Pattern { key: String, value: String },
}

/// A resolved destination host of a delivery.
#[derive(Debug, Clone, Copy)]
pub struct Host<'a> {
    pub name: &'a str,
    pub ip: IpAddr,
}

impl Pause {
    /// The expiry time, if any (checked by [`Self::validate`]).
    pub fn expiry(&self) -> Option<SystemTime> {
        self.expires_at.as_deref().and_then(parse_rfc3339)
    }

    /// Sets the expiry.
    pub fn set_expiry(&mut self, at: Option<SystemTime>) {
        self.expires_at = at.map(rfc3339);
    }

    /// Whether it still pauses at `now`.
    pub fn is_active(&self, now: SystemTime) -> bool {
        self.expiry().is_none_or(|end| now < end)
    }

    /// Checks what serde cannot: at least one selector, valid patterns, networks and expiry.
    pub fn validate(&self) -> Result<(), PauseError> {
        let key = || self.key.clone();
        if self.recipient_domains.is_empty()
            && self.from_domains.is_empty()
            && self.mx_hosts.is_empty()
            && self.networks.is_empty()
        {
            return Err(PauseError::Empty { key: key() });
        }
        for p in self
            .recipient_domains
            .iter()
            .chain(&self.from_domains)
            .chain(&self.mx_hosts)
        {
            let name = p.strip_prefix("*.").unwrap_or(p);
            let ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                && !name.starts_with('.');
            if !ok {
                return Err(PauseError::Pattern {
                    key: key(),
                    value: p.clone(),
                });
            }
        }
        for n in &self.networks {
            if Cidr::parse(n).is_none() {
                return Err(PauseError::Network {
                    key: key(),
                    value: n.clone(),
                });
            }
        }
        if let Some(v) = &self.expires_at
            && parse_rfc3339(v).is_none()
        {
            return Err(PauseError::Expiry {
                key: key(),
                value: v.clone(),
            });
        }
        Ok(())
    }

    /// Whether its host selectors need the resolved destination.
    pub fn needs_hosts(&self) -> bool {
        !self.mx_hosts.is_empty() || !self.networks.is_empty()
    }

    /// Whether the envelope selectors match mail of MailDomain `from_domain` to a recipient
    /// in `recipient_domain` (true when the pause names neither).
    pub fn matches_envelope(&self, from_domain: &str, recipient_domain: &str) -> bool {
        (self.recipient_domains.is_empty()
            || self
                .recipient_domains
                .iter()
                .any(|p| name_matches(p, recipient_domain)))
            && (self.from_domains.is_empty()
                || self
                    .from_domains
                    .iter()
                    .any(|p| name_matches(p, from_domain)))
    }

    /// Whether the host selectors match a delivery to `hosts` (true when the pause names
    /// none; with selectors, any matching host is enough).
    pub fn matches_hosts(&self, hosts: &[Host<'_>]) -> bool {
        if !self.needs_hosts() {
            return true;
        }
        hosts.iter().any(|h| {
            let by_name =
                self.mx_hosts.is_empty() || self.mx_hosts.iter().any(|p| name_matches(p, h.name));
            let by_ip = self.networks.is_empty()
                || self
                    .networks
                    .iter()
                    .filter_map(|n| Cidr::parse(n))
                    .any(|c| c.contains(h.ip));
            by_name && by_ip
        })
    }
}

/// Whether `name` matches `pattern`: equal (case and a trailing dot ignored), or a subdomain
/// of `x` for the pattern `*.x`.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(parent) => name
            .strip_suffix(parent)
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        None => name == pattern,
    }
}

/// An IPv4 or IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `a.b.c.d/n`, `x::y/n`, or a bare address (a host).
    fn parse(text: &str) -> Option<Self> {
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?),
            None => {
                let a = text.trim().parse::<IpAddr>().ok()?;
                (a, if a.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Self { addr, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn pause() -> Pause {
        Pause {
            key: "mail.p".into(),
            ..Pause::default()
        }
    }

    #[test]
    fn names_match_exactly_or_below_a_wildcard() {
        assert!(name_matches("remote.test", "Remote.Test."));
        assert!(!name_matches("remote.test", "mx.remote.test"));
        assert!(name_matches("*.google.com", "alt1.aspmx.l.google.com"));
        assert!(!name_matches("*.google.com", "google.com"));
        assert!(!name_matches("*.google.com", "evilgoogle.com"));
    }

    #[test]
    fn every_named_selector_must_match() {
        let p = Pause {
            recipient_domains: vec!["gmail.com".into()],
            from_domains: vec!["shop.example".into()],
            ..pause()
        };
        assert!(p.matches_envelope("shop.example", "gmail.com"));
        assert!(!p.matches_envelope("other.example", "gmail.com"));
        assert!(!p.matches_envelope("shop.example", "yahoo.com"));
        assert!(
            p.matches_hosts(&[]),
            "no host selector: hosts do not matter"
        );
        let only_from = Pause {
            from_domains: vec!["shop.example".into()],
            ..pause()
        };
        assert!(only_from.matches_envelope("shop.example", "anything.test"));
    }

    #[test]
    fn host_selectors_match_any_resolved_host() {
        let p = Pause {
            mx_hosts: vec!["*.google.com".into()],
            ..pause()
        };
        assert!(p.needs_hosts());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(p.matches_hosts(&[
            Host {
                name: "mx.other.test",
                ip
            },
            Host {
                name: "alt1.aspmx.l.google.com",
                ip
            },
        ]));
        assert!(!p.matches_hosts(&[Host {
            name: "mx.other.test",
            ip
        }]));
        let net = Pause {
            networks: vec!["192.0.2.0/24".into(), "2001:db8::/32".into()],
            ..pause()
        };
        assert!(net.matches_hosts(&[Host {
            name: "x",
            ip: "192.0.2.77".parse().unwrap()
        }]));
        assert!(net.matches_hosts(&[Host {
            name: "x",
            ip: "::ffff:192.0.2.77".parse().unwrap()
        }]));
        assert!(net.matches_hosts(&[Host {
            name: "x",
            ip: "2001:db8::25".parse().unwrap()
        }]));
        assert!(!net.matches_hosts(&[Host {
            name: "x",
            ip: "198.51.100.1".parse().unwrap()
        }]));
    }

    #[test]
    fn expiry_ends_a_pause_and_invalid_pauses_are_refused() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut p = Pause {
            recipient_domains: vec!["remote.test".into()],
            ..pause()
        };
        assert!(p.is_active(now));
        p.set_expiry(Some(now + Duration::from_secs(60)));
        assert!(p.is_active(now));
        assert!(!p.is_active(now + Duration::from_secs(60)));
        assert_eq!(p.validate(), Ok(()));
        let json = serde_json::to_string(&p).unwrap();
        assert!(
            json.contains("\"recipientDomains\":[\"remote.test\"]"),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Pause>(&json).unwrap(), p);

        assert!(matches!(pause().validate(), Err(PauseError::Empty { .. })));
        let bad_net = Pause {
            networks: vec!["10.0.0.0/33".into()],
            ..pause()
        };
        assert!(matches!(
            bad_net.validate(),
            Err(PauseError::Network { .. })
        ));
        let bad_name = Pause {
            mx_hosts: vec!["mx example".into()],
            ..pause()
        };
        assert!(matches!(
            bad_name.validate(),
            Err(PauseError::Pattern { .. })
        ));
        let bad_expiry = Pause {
            expires_at: Some("tomorrow".into()),
            ..p.clone()
        };
        assert!(matches!(
            bad_expiry.validate(),
            Err(PauseError::Expiry { .. })
        ));
    }
}
