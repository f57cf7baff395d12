//! `timeouts`: the per-phase deadlines of an SMTP session on the receiving side (RFC 5321
//! 4.5.3.2). The same phase defaults serve the sending side (`delivery.timeouts`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::HumanDuration;

/// Per-phase timeouts. RFC 5321 4.5.3.2 gives the client-side values; the server uses them as
/// follows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// After the 220 greeting: time for the first command to arrive (4.5.3.2.1, 5 min).
    #[serde(default = "default_five_minutes")]
    pub greeting: HumanDuration,
    /// Time for each complete command line to arrive (4.5.3.2.7, 5 min). The deadline covers
    /// the whole line, so trickling one byte at a time does not extend it.
    #[serde(default = "default_five_minutes")]
    pub command: HumanDuration,
    /// After `354`: time for the first message bytes to arrive (4.5.3.2.4, 2 min).
    #[serde(default = "default_two_minutes")]
    pub data_init: HumanDuration,
    /// During DATA/BDAT: longest wait for more bytes (4.5.3.2.5, 3 min).
    #[serde(default = "default_three_minutes")]
    pub data_block: HumanDuration,
    /// After the end of data: the longest the server spends queueing before it answers
    /// (the client waits 10 min, 4.5.3.2.6); on expiry the reply is `451 4.3.0`.
    #[serde(default = "default_ten_minutes")]
    pub data_termination: HumanDuration,
    /// TLS handshake (STARTTLS and implicit TLS) and PROXY header.
    #[serde(default = "default_tls_handshake")]
    pub tls_handshake: HumanDuration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            greeting: default_five_minutes(),
            command: default_five_minutes(),
            data_init: default_two_minutes(),
            data_block: default_three_minutes(),
            data_termination: default_ten_minutes(),
            tls_handshake: default_tls_handshake(),
        }
    }
}

impl Timeouts {
    pub(crate) fn validate(&self, errors: &mut Vec<String>) {
        let timeouts = [
            ("greeting", &self.greeting),
            ("command", &self.command),
            ("dataInit", &self.data_init),
            ("dataBlock", &self.data_block),
            ("dataTermination", &self.data_termination),
            ("tlsHandshake", &self.tls_handshake),
        ];
        for (name, t) in timeouts {
            if t.0.is_zero() {
                errors.push(format!("timeouts.{name}: must be greater than 0"));
            }
        }
    }
}

pub(crate) fn default_five_minutes() -> HumanDuration {
    HumanDuration::from_secs(5 * 60)
}
pub(crate) fn default_two_minutes() -> HumanDuration {
    HumanDuration::from_secs(2 * 60)
}
pub(crate) fn default_three_minutes() -> HumanDuration {
    HumanDuration::from_secs(3 * 60)
}
pub(crate) fn default_ten_minutes() -> HumanDuration {
    HumanDuration::from_secs(10 * 60)
}
fn default_tls_handshake() -> HumanDuration {
    HumanDuration::from_secs(60)
}
