//! `admin`: the HTTP endpoint for health, readiness and metrics.

use std::net::SocketAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::HumanDuration;

/// The HTTP admin endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminConfig {
    /// Address for `/healthz`, `/readyz`, `/metrics`.
    #[serde(default = "default_admin_address")]
    pub address: SocketAddr,
    /// How often the queue depth and age metrics are read from JetStream.
    #[serde(default = "default_queue_sample_interval")]
    pub queue_sample_interval: HumanDuration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            address: default_admin_address(),
            queue_sample_interval: default_queue_sample_interval(),
        }
    }
}

fn default_admin_address() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}
/// A common Prometheus scrape interval: fresher samples would not be seen.
fn default_queue_sample_interval() -> HumanDuration {
    HumanDuration::from_secs(15)
}
