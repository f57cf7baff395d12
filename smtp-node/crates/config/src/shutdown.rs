//! `shutdown`: how long a node drains after SIGTERM.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::HumanDuration;

/// Graceful shutdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After SIGTERM, how long open transactions may take to finish before the node exits.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: HumanDuration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_timeout: default_drain_timeout(),
        }
    }
}

fn default_drain_timeout() -> HumanDuration {
    HumanDuration::from_secs(30)
}
