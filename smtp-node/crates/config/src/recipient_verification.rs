//! `recipientVerification`: asking a catch-all domain's inbound target, at RCPT time, whether a
//! recipient exists (a cached RCPT probe), so that mail for nobody is refused in the SMTP
//! dialogue instead of being accepted and bounced later (backscatter).

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::HumanDuration;

/// Longest TTL accepted for remembered answers: a mailbox deleted longer ago than this is a
/// stale entry, not a policy.
const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// RCPT-time recipient verification against the inbound target of catch-all domains.
///
/// For a domain with `catchAll` and an `inbound` target, each new recipient is probed with
/// `MAIL FROM:<>`, `RCPT TO:<recipient>` and `RSET` over LMTP or SMTP (as the target
/// speaks). A `2xx` lets the recipient in, a `5xx` is passed on as `550 5.1.1`, and a
/// temporary failure, a timeout or an unreachable target is answered `451 4.4.3` (the sender
/// retries; nothing is accepted that might bounce later). Answers are remembered per address
/// for `positiveTtl` / `negativeTtl`; temporary failures are not remembered. Local parts listed
/// in the domain's `recipients` are accepted without asking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RecipientVerificationConfig {
    /// Probe the inbound target of catch-all domains. Off: a catch-all domain takes every
    /// local part, and what its target refuses later is bounced (only to senders that passed
    /// SPF or DKIM).
    #[serde(default = "crate::default_true")]
    pub enabled: bool,
    /// How long a recipient the target accepted is remembered (1 s to 7 days).
    #[serde(default = "default_positive_ttl")]
    pub positive_ttl: HumanDuration,
    /// How long a recipient the target refused is remembered (1 s to 7 days).
    #[serde(default = "default_negative_ttl")]
    pub negative_ttl: HumanDuration,
    /// Time for one probe, connection included; also the longest a RCPT waits for a free
    /// probe slot.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Probes in flight at once per node; more RCPTs wait (up to `timeout`).
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: u32,
    /// Answers remembered per node; beyond it the oldest are forgotten first.
    #[serde(default = "default_cache_size")]
    pub cache_size: u32,
}

impl Default for RecipientVerificationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            positive_ttl: default_positive_ttl(),
            negative_ttl: default_negative_ttl(),
            timeout: default_timeout(),
            max_concurrent: default_max_concurrent(),
            cache_size: default_cache_size(),
        }
    }
}

impl RecipientVerificationConfig {
    pub(crate) fn validate(&self, errors: &mut Vec<String>) {
        for (name, ttl) in [
            ("positiveTtl", &self.positive_ttl),
            ("negativeTtl", &self.negative_ttl),
        ] {
            if !(Duration::from_secs(1)..=MAX_TTL).contains(&ttl.0) {
                errors.push(format!(
                    "recipientVerification.{name}: {} must be between 1s and 7days",
                    humantime::format_duration(ttl.0)
                ));
            }
        }
        if self.timeout.0.is_zero() {
            errors.push("recipientVerification.timeout: must be greater than 0".to_owned());
        }
        if self.max_concurrent == 0 {
            errors.push("recipientVerification.maxConcurrent: must be at least 1".to_owned());
        }
        if self.cache_size == 0 {
            errors.push("recipientVerification.cacheSize: must be at least 1".to_owned());
        }
    }
}

// Postfix's address_verify_positive_refresh_time is hours; a mailbox store answers fast, so an
// hour keeps the probes few without keeping deleted mailboxes alive for long.
fn default_positive_ttl() -> HumanDuration {
    HumanDuration::from_secs(3600)
}
// Short, so that a mailbox created after a refusal is reachable soon.
fn default_negative_ttl() -> HumanDuration {
    HumanDuration::from_secs(600)
}
fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(10)
}
fn default_max_concurrent() -> u32 {
    16
}
fn default_cache_size() -> u32 {
    10_000
}
