//! `delivery.tls` beyond the MX default: how outbound mail is protected in transit. MTA-STS
//! (RFC 8461) and DANE (RFC 7672) policies of recipient domains, per-destination overrides,
//! and the daily TLS-RPT reports (RFC 8460) sent to the domains that ask for them. Also the
//! node's own MTA-STS policy server (`mtaStsServer`), which serves what the operator renders.

use std::net::SocketAddr;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, HumanDuration};

/// MTA-STS of recipient domains (RFC 8461).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtaStsConfig {
    /// Look up and apply recipient domains' MTA-STS policies.
    #[serde(default = "crate::default_true")]
    pub enabled: bool,
    /// TCP port of the policy host (443; tests use their own HTTPS server).
    #[serde(default = "default_https_port")]
    pub https_port: u16,
    /// Longest time a policy fetch may take (RFC 8461 3.3 suggests at most a minute).
    #[serde(default = "default_fetch_timeout")]
    pub fetch_timeout: HumanDuration,
    /// Largest policy body accepted (RFC 8461 3.3: 64 KiB).
    #[serde(default = "default_max_policy_size")]
    pub max_policy_size: ByteSize,
    /// How often the background task re-checks cached policies (their `_mta-sts` id) so a
    /// changed policy is picked up before its `max_age` runs out (RFC 8461 5.1).
    #[serde(default = "default_refresh_interval")]
    pub refresh_interval: HumanDuration,
}

/// DANE for SMTP (RFC 7672): TLSA records of MX hosts, found with a DNSSEC-validating resolver.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DaneConfig {
    /// Validate DNSSEC and apply TLSA records. Needs nameservers that pass DNSSEC records
    /// (RRSIG, DNSKEY, DS, NSEC) through: with a resolver that strips them every signed zone
    /// looks bogus and its mail is deferred.
    #[serde(default)]
    pub enabled: bool,
    /// DNSKEY records (zone-file syntax) trusted as anchors; unset: the IANA root keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_anchor_file: Option<PathBuf>,
}

/// A fixed TLS policy for one recipient domain, instead of what its DNS says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsPolicyOverride {
    /// The recipient domain (lower case, no trailing dot).
    pub domain: String,
    /// `verify`: STARTTLS with a certificate valid (WebPKI) for the MX host name, else defer.
    /// `dane`: only MX hosts with DNSSEC-signed TLSA records that match, else defer.
    /// `none`: no MTA-STS or DANE lookups, opportunistic TLS.
    pub mode: TlsPolicyMode,
}

/// The mode of a [`TlsPolicyOverride`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum TlsPolicyMode {
    Verify,
    Dane,
    None,
}

/// Daily aggregate TLS reports (RFC 8460) to recipient domains that publish `_smtp._tls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsRptConfig {
    /// Record policy outcomes and send the daily reports.
    #[serde(default = "crate::default_true")]
    pub enabled: bool,
    /// `organization-name` of the reports; default: the sending domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization_name: Option<String>,
    /// `contact-info` of the reports; default: `postmaster@<sending domain>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact_info: Option<String>,
    /// How often a node looks for a finished day whose reports nobody has sent yet.
    #[serde(default = "default_report_check_interval")]
    pub check_interval: HumanDuration,
}

/// The HTTPS listener that serves `https://mta-sts.<domain>/.well-known/mta-sts.txt` for the
/// node's domains that have an `mtaStsPolicy`, with the node's certificate (`tls`), which must
/// carry `mta-sts.<domain>` among its names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MtaStsServerConfig {
    /// Socket address to bind, e.g. `0.0.0.0:8443` (the Service maps 443 onto it).
    pub address: SocketAddr,
}

impl Default for MtaStsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            https_port: default_https_port(),
            fetch_timeout: default_fetch_timeout(),
            max_policy_size: default_max_policy_size(),
            refresh_interval: default_refresh_interval(),
        }
    }
}

impl Default for TlsRptConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            organization_name: None,
            contact_info: None,
            check_interval: default_report_check_interval(),
        }
    }
}

impl MtaStsConfig {
    pub(crate) fn validate(&self, errors: &mut Vec<String>) {
        if self.https_port == 0 {
            errors.push("delivery.tls.mtaSts.httpsPort: must not be 0".to_owned());
        }
        if self.fetch_timeout.0.is_zero() {
            errors.push("delivery.tls.mtaSts.fetchTimeout: must be greater than 0".to_owned());
        }
        if self.max_policy_size.0 < 1024 {
            errors.push("delivery.tls.mtaSts.maxPolicySize: must be at least 1Ki".to_owned());
        }
        if self.refresh_interval.0.is_zero() {
            errors.push("delivery.tls.mtaSts.refreshInterval: must be greater than 0".to_owned());
        }
    }
}

/// Checks the overrides: valid, distinct domains; `dane` only with DANE enabled.
pub(crate) fn validate_overrides(
    policies: &[TlsPolicyOverride],
    dane: &DaneConfig,
    errors: &mut Vec<String>,
) {
    let mut seen = std::collections::HashSet::new();
    for (i, p) in policies.iter().enumerate() {
        if let Err(e) = crate::validate_domain_name(&p.domain) {
            errors.push(format!("delivery.tls.policies[{i}].domain: {e}"));
        }
        if !seen.insert(p.domain.as_str()) {
            errors.push(format!(
                "delivery.tls.policies[{i}].domain: duplicate domain {:?}",
                p.domain
            ));
        }
        if p.mode == TlsPolicyMode::Dane && !dane.enabled {
            errors.push(format!(
                "delivery.tls.policies[{i}].mode: dane needs delivery.tls.dane.enabled"
            ));
        }
    }
}

fn default_https_port() -> u16 {
    443
}
// RFC 8461 3.3: "a timeout of 1 minute".
fn default_fetch_timeout() -> HumanDuration {
    HumanDuration::from_secs(60)
}
// RFC 8461 3.3: policies "SHOULD NOT exceed 64 KB".
fn default_max_policy_size() -> ByteSize {
    ByteSize(64 * 1024)
}
fn default_refresh_interval() -> HumanDuration {
    HumanDuration::from_secs(3600)
}
fn default_report_check_interval() -> HumanDuration {
    HumanDuration::from_secs(3600)
}
