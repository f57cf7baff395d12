//! `inboundAuth`: SPF, DKIM and DMARC checks of mail arriving on MX listeners.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::HumanDuration;

/// Checks of mail arriving on the MX port (SPF, DKIM, DMARC).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundAuthConfig {
    /// Evaluate SPF, DKIM and DMARC and add an `Authentication-Results` header.
    #[serde(default = "crate::default_true")]
    pub enabled: bool,
    /// `record` (default): only record the DMARC result. `enforce`: refuse a message that
    /// fails DMARC of a sender domain whose policy is `reject`, with `550 5.7.1` at the end
    /// of data (`quarantine` is recorded only: the node has no quarantine).
    #[serde(default)]
    pub dmarc: DmarcMode,
    /// Time for all lookups of one message; when it runs out the results say `temperror`.
    #[serde(default = "default_auth_timeout")]
    pub timeout: HumanDuration,
}

/// What to do with a DMARC failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DmarcMode {
    #[default]
    Record,
    Enforce,
}

impl Default for InboundAuthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dmarc: DmarcMode::Record,
            timeout: default_auth_timeout(),
        }
    }
}

impl InboundAuthConfig {
    pub(crate) fn validate(&self, errors: &mut Vec<String>) {
        if self.timeout.0.is_zero() {
            errors.push("inboundAuth.timeout: must be greater than 0".to_owned());
        }
    }
}

fn default_auth_timeout() -> HumanDuration {
    HumanDuration::from_secs(20)
}
