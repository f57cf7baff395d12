//! `dns`: the resolver for MX delivery and the SPF/DKIM/DMARC checks of inbound mail.

use std::net::SocketAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::HumanDuration;

/// Environment variable that gives the default nameservers (`ip:port`, comma separated), as
/// the local cluster exports it.
pub const DNS_SERVER_ENV: &str = "DNS_SERVER";

/// Resolver settings (the `dns` section of the node config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DnsConfig {
    /// Nameservers as `ip:port` (e.g. `10.96.0.10:53`, `127.0.0.1:5353`). Default:
    /// `$DNS_SERVER` when set (comma separated), else empty. Empty: the system configuration
    /// (`/etc/resolv.conf`).
    #[serde(default = "default_nameservers")]
    pub nameservers: Vec<SocketAddr>,
    /// Timeout of one query.
    #[serde(default = "default_dns_timeout")]
    pub timeout: HumanDuration,
    /// Attempts per query before the lookup counts as failed (temporary).
    #[serde(default = "default_dns_attempts")]
    pub attempts: u32,
}

/// The built-in defaults, without looking at the environment (see [`DnsConfig::from_env`]).
impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            timeout: default_dns_timeout(),
            attempts: default_dns_attempts(),
        }
    }
}

impl DnsConfig {
    /// What a config file without a `dns` section means: the defaults, with `$DNS_SERVER`.
    pub fn from_env() -> Self {
        Self {
            nameservers: default_nameservers(),
            ..Self::default()
        }
    }

    pub(crate) fn validate(&self, errors: &mut Vec<String>) {
        if self.attempts == 0 {
            errors.push("dns.attempts: must be at least 1".to_owned());
        }
        if self.timeout.0.is_zero() {
            errors.push("dns.timeout: must be greater than 0".to_owned());
        }
    }
}

fn default_nameservers() -> Vec<SocketAddr> {
    parse_nameservers(&std::env::var(DNS_SERVER_ENV).unwrap_or_default())
}

/// `ip:port` or `ip` (port 53) entries separated by commas or spaces; invalid ones are
/// skipped (the variable is a convenience for local runs, not the contract).
pub(crate) fn parse_nameservers(text: &str) -> Vec<SocketAddr> {
    text.split([',', ' '])
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .filter_map(|t| {
            t.parse::<SocketAddr>().ok().or_else(|| {
                t.parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, 53))
            })
        })
        .collect()
}

// resolv.conf defaults (timeout:5, attempts:2).
fn default_dns_timeout() -> HumanDuration {
    HumanDuration::from_secs(5)
}
fn default_dns_attempts() -> u32 {
    2
}
