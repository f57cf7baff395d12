//! `listeners`: the SMTP ports a node opens and what each is for.

use std::net::{IpAddr, SocketAddr};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::network::Network;

/// One SMTP listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique name (used in logs and metrics), e.g. `mx`, `submission`, `submissions`.
    pub name: String,
    /// What the listener is for.
    pub kind: ListenerKind,
    /// Socket address to bind, e.g. `0.0.0.0:25` or `[::]:587`.
    pub address: SocketAddr,
    /// Expect a PROXY protocol v1 or v2 header on every connection and use the client address
    /// it carries for policy and logs. Only enable behind a load balancer that sends it, and
    /// list its addresses in `trustedProxies`.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// The peers that may send a PROXY header (CIDR networks or single addresses, e.g. the load
    /// balancer's `10.0.0.0/8`). Required when `proxyProtocol` is on: a client that reaches the
    /// listener directly could otherwise claim any source address. A connection from any other
    /// peer is closed without a greeting and counted in
    /// `kubemail_smtp_connections_refused_total{reason="untrusted_proxy"}`.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// What to do with a bare CR or LF in commands and message data.
    #[serde(default)]
    pub bare_line_endings: BareLineEndings,
    /// What to do with NUL bytes in message data (DATA and BDAT). A downstream that drops
    /// them would read `<CRLF><NUL>.<CRLF>` as the end of the data, so they never pass as
    /// they are.
    #[serde(default)]
    pub nul_bytes: NulBytes,
    /// Require STARTTLS before MAIL (and before AUTH). Default: true for `submission`, false for
    /// `mx`. Always satisfied on `implicitTls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_tls: Option<bool>,
}

/// The role of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ListenerKind {
    /// Port 25: inbound mail for local domains, no AUTH, STARTTLS offered.
    Mx,
    /// Port 587: authenticated submission after STARTTLS.
    Submission,
    /// Port 465: authenticated submission over implicit TLS (RFC 8314).
    ImplicitTls,
}

/// Handling of bare CR / bare LF (SMTP smuggling defence). In every mode only
/// `<CRLF>.<CRLF>` ends DATA.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BareLineEndings {
    /// Refuse the command or the message with a 5xx; nothing of that transaction is queued.
    #[default]
    Reject,
    /// Accept and rewrite bare line endings to CRLF before queueing.
    Normalize,
}

/// Handling of NUL bytes in message data (RFC 5321 2.4 and RFC 5322 3.5 allow none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum NulBytes {
    /// Refuse the message with `554 5.6.0`; nothing of it is queued.
    #[default]
    Reject,
    /// Accept the message and remove every NUL before it is checked, signed and queued.
    Strip,
}

impl ListenerConfig {
    /// Whether STARTTLS must precede MAIL and AUTH on this listener.
    pub fn requires_tls(&self) -> bool {
        match self.kind {
            ListenerKind::Mx => self.require_tls.unwrap_or(false),
            ListenerKind::Submission => self.require_tls.unwrap_or(true),
            ListenerKind::ImplicitTls => true,
        }
    }

    /// Whether clients must authenticate before MAIL (submission ports).
    pub fn requires_auth(&self) -> bool {
        self.kind != ListenerKind::Mx
    }

    /// Whether `peer` may send this listener a PROXY header: one of `trustedProxies`
    /// (an invalid entry, which validation refuses, trusts nobody).
    pub fn trusts_proxy(&self, peer: IpAddr) -> bool {
        let peer = unmap(peer);
        self.trusted_proxies
            .iter()
            .filter_map(|n| Network::parse(n).ok())
            .any(|n| n.contains(peer))
    }

    /// Checks the PROXY settings; `path` names the listener in messages (`listeners[0]`).
    pub(crate) fn validate(&self, path: &str, errors: &mut Vec<String>) {
        if self.proxy_protocol && self.trusted_proxies.is_empty() {
            errors.push(format!(
                "{path}.trustedProxies: required when proxyProtocol is on (the addresses of the load balancers that send the PROXY header)"
            ));
        }
        for (j, n) in self.trusted_proxies.iter().enumerate() {
            if let Err(e) = Network::parse(n) {
                errors.push(format!("{path}.trustedProxies[{j}]: {e}"));
            }
        }
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack socket reports for an
/// IPv4 peer) as the IPv4 address it is.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}
