//! Where each recipient of a queue entry goes. Pure: config and addresses in, routes out.
//!
//! * a recipient in one of our domains goes to that domain's inbound target (LMTP or SMTP
//!   to a configured host);
//! * any other recipient of an *outbound* entry goes through the sending domain's relay when
//!   it has one, otherwise to the recipient domain's MX hosts;
//! * an *inbound* entry (accepted on the MX port without authentication) only ever carries
//!   local recipients. If one is not local any more (the domain was removed from the config
//!   after acceptance), relaying it would make us an open relay, so it fails permanently.
//!
//! Recipients with the same route are delivered in one SMTP transaction.

use std::collections::HashMap;

use crate::config::{InboundTarget, RelayConfig};
use crate::protocol::EnhancedCode;
use crate::queue::Direction;

/// The routing-relevant settings of one of our domains.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainRouting {
    pub name: String,
    pub inbound: Option<InboundTarget>,
    pub relay: Option<RelayConfig>,
}

/// The destination of a group of recipients; also the key of connection reuse and of the
/// per-destination connection limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Route {
    /// The inbound target of our domain `domain`.
    Inbound { domain: String },
    /// The relay of the sending domain `domain`.
    Relay { domain: String },
    /// The MX hosts of the recipient domain.
    Mx { domain: String },
    /// Cannot be delivered; `permanent` decides between bounce and retry.
    Unroutable {
        status: (u8, u16, u16),
        text: String,
        permanent: bool,
    },
}

impl Route {
    /// A short label for logs and metrics: `inbound`, `relay`, `mx` or `unroutable`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Inbound { .. } => "inbound",
            Self::Relay { .. } => "relay",
            Self::Mx { .. } => "mx",
            Self::Unroutable { .. } => "unroutable",
        }
    }

    /// The enhanced status of an unroutable destination.
    pub fn unroutable_status(&self) -> Option<EnhancedCode> {
        match self {
            Self::Unroutable { status, .. } => Some(EnhancedCode(status.0, status.1, status.2)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Inbound { domain } => write!(f, "inbound:{domain}"),
            Self::Relay { domain } => write!(f, "relay:{domain}"),
            Self::Mx { domain } => write!(f, "mx:{domain}"),
            Self::Unroutable { text, .. } => write!(f, "unroutable: {text}"),
        }
    }
}

/// Our domains by name.
#[derive(Debug, Clone, Default)]
pub struct RoutingTable {
    domains: HashMap<String, DomainRouting>,
}

impl RoutingTable {
    pub fn new(domains: impl IntoIterator<Item = DomainRouting>) -> Self {
        Self {
            domains: domains
                .into_iter()
                .map(|d| (d.name.to_ascii_lowercase(), d))
                .collect(),
        }
    }

    pub fn domain(&self, name: &str) -> Option<&DomainRouting> {
        self.domains.get(&name.to_ascii_lowercase())
    }

    /// The route of one recipient of an entry queued on `entry_domain`.
    pub fn route(&self, direction: Direction, entry_domain: &str, recipient: &str) -> Route {
        let rcpt_domain = recipient
            .rsplit_once('@')
            .map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase())
            .unwrap_or_default();
        // `<Postmaster>` without a domain (RFC 5321 4.1.1.3) is the postmaster of the
        // domain whose entry carries it.
        let rcpt_domain = if rcpt_domain.is_empty() {
            entry_domain.to_ascii_lowercase()
        } else {
            rcpt_domain
        };
        if let Some(local) = self.domain(&rcpt_domain) {
            return match &local.inbound {
                Some(_) => Route::Inbound {
                    domain: local.name.to_ascii_lowercase(),
                },
                // A configuration gap, not the sender's fault: keep the mail and retry
                // (X.3.5 "system incorrectly configured").
                None => Route::Unroutable {
                    status: (4, 3, 5),
                    text: format!("no inbound target is configured for {rcpt_domain}"),
                    permanent: false,
                },
            };
        }
        if direction == Direction::Inbound {
            return Route::Unroutable {
                status: (5, 7, 1),
                text: format!("relaying to {rcpt_domain} denied: not a local domain"),
                permanent: true,
            };
        }
        let sender = self.domain(entry_domain);
        match sender.and_then(|d| d.relay.as_ref().map(|_| d)) {
            Some(d) => Route::Relay {
                domain: d.name.to_ascii_lowercase(),
            },
            None => Route::Mx {
                domain: rcpt_domain,
            },
        }
    }

    /// The recipients grouped by route, in a stable order (routes sorted, recipients in
    /// their original order).
    pub fn group(
        &self,
        direction: Direction,
        entry_domain: &str,
        recipients: &[String],
    ) -> Vec<(Route, Vec<String>)> {
        let mut groups: Vec<(Route, Vec<String>)> = Vec::new();
        for r in recipients {
            let route = self.route(direction, entry_domain, r);
            match groups.iter_mut().find(|(g, _)| *g == route) {
                Some((_, list)) => list.push(r.clone()),
                None => groups.push((route, vec![r.clone()])),
            }
        }
        groups.sort_by(|a, b| a.0.cmp(&b.0));
        groups
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::config::{ForwardProtocol, InboundTls, RelayTls};

    fn target() -> InboundTarget {
        InboundTarget {
            host: "127.0.0.1".into(),
            port: 24,
            protocol: ForwardProtocol::Lmtp,
            tls: InboundTls::Opportunistic,
        }
    }

    fn relay() -> RelayConfig {
        RelayConfig {
            name: "smarthost".into(),
            host: "smtp.relay.test".into(),
            port: 587,
            tls: RelayTls::StartTlsRequired,
            verify_certificate: true,
            auth: None,
            messages_per_second: None,
        }
    }

    fn table() -> RoutingTable {
        RoutingTable::new([
            DomainRouting {
                name: "example.test".into(),
                inbound: Some(target()),
                relay: None,
            },
            DomainRouting {
                name: "relayed.test".into(),
                inbound: Some(target()),
                relay: Some(relay()),
            },
            DomainRouting {
                name: "noinbound.test".into(),
                inbound: None,
                relay: None,
            },
        ])
    }

    #[test]
    fn route_choice() {
        let t = table();
        use Direction::{Inbound, Outbound};
        let cases = [
            (
                Outbound,
                "example.test",
                "carol@remote.test",
                "mx:remote.test",
            ),
            (
                Outbound,
                "example.test",
                "Carol@Remote.Test.",
                "mx:remote.test",
            ),
            (
                Outbound,
                "example.test",
                "bob@example.test",
                "inbound:example.test",
            ),
            (
                Outbound,
                "example.test",
                "x@relayed.test",
                "inbound:relayed.test",
            ),
            (
                Outbound,
                "relayed.test",
                "carol@remote.test",
                "relay:relayed.test",
            ),
            (
                Outbound,
                "relayed.test",
                "bob@example.test",
                "inbound:example.test",
            ),
            (
                Inbound,
                "example.test",
                "bob@EXAMPLE.test",
                "inbound:example.test",
            ),
            (
                Inbound,
                "example.test",
                "Postmaster",
                "inbound:example.test",
            ),
        ];
        for (direction, entry, rcpt, want) in cases {
            assert_eq!(
                t.route(direction, entry, rcpt).to_string(),
                want,
                "{rcpt} from {entry}"
            );
        }
    }

    #[test]
    fn inbound_entries_never_relay_and_missing_targets_retry() {
        let t = table();
        let r = t.route(Direction::Inbound, "example.test", "carol@remote.test");
        assert!(
            matches!(
                r,
                Route::Unroutable {
                    permanent: true,
                    ..
                }
            ),
            "{r}"
        );
        assert_eq!(r.unroutable_status(), Some(EnhancedCode(5, 7, 1)));
        let r = t.route(Direction::Outbound, "example.test", "x@noinbound.test");
        assert!(
            matches!(
                r,
                Route::Unroutable {
                    permanent: false,
                    ..
                }
            ),
            "{r}"
        );
    }

    #[test]
    fn groups_recipients_by_route() {
        let t = table();
        let rcpts: Vec<String> = [
            "a@remote.test",
            "bob@example.test",
            "b@remote.test",
            "c@other.test",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let groups = t.group(Direction::Outbound, "example.test", &rcpts);
        let shown: Vec<(String, Vec<String>)> = groups
            .into_iter()
            .map(|(r, l)| (r.to_string(), l))
            .collect();
        assert_eq!(
            shown,
            vec![
                (
                    "inbound:example.test".into(),
                    vec!["bob@example.test".into()]
                ),
                ("mx:other.test".into(), vec!["c@other.test".into()]),
                (
                    "mx:remote.test".into(),
                    vec!["a@remote.test".into(), "b@remote.test".into()]
                ),
            ]
        );
    }
}
