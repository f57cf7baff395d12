//! `limits`: what one node may hold for all its sessions together. The per-domain limits
//! (message size, recipients, rates) are in [`crate::domain`].

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, HumanDuration};

/// Smallest memory budget accepted: a few ordinary messages must fit.
pub const MIN_MESSAGE_BYTES_IN_MEMORY: u64 = 1 << 20;
/// The budget when neither the config nor a container memory limit gives one.
pub const DEFAULT_MESSAGE_BYTES_IN_MEMORY: u64 = 512 << 20;
/// Longest configurable wait for room in the budget: a client waits 10 minutes for the reply
/// to the end of data (RFC 5321 4.5.3.2.6), and the wait must end well before that.
const MAX_MEMORY_WAIT_SECS: u64 = 300;

/// Node-wide limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeLimits {
    /// Message bytes all sessions of the node together may hold in memory: bodies being
    /// received and bodies waiting for the queue's acknowledgement. A session that finds no
    /// room waits up to `memoryWait` and then gets `452 4.3.1`; the node never takes more.
    /// At least twice the largest `maxMessageSize` (a growing buffer briefly exists twice):
    /// a message past the inline body limit holds only its header section and a few chunks
    /// while its body goes to the object store, but one whose header section does not end, or
    /// whose body cannot be stored while it arrives, is held whole.
    /// Unset: half the container's memory limit (cgroup), or 512Mi without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_bytes_in_memory: Option<ByteSize>,
    /// How long a session waits for room in `messageBytesInMemory` before it is refused.
    #[serde(default = "default_memory_wait")]
    pub memory_wait: HumanDuration,
}

impl Default for NodeLimits {
    fn default() -> Self {
        Self {
            message_bytes_in_memory: None,
            memory_wait: default_memory_wait(),
        }
    }
}

impl NodeLimits {
    /// `largest_message`: the largest `maxMessageSize` of any domain.
    pub(crate) fn validate(&self, largest_message: u64, errors: &mut Vec<String>) {
        if let Some(budget) = self.message_bytes_in_memory {
            if budget.0 < MIN_MESSAGE_BYTES_IN_MEMORY {
                errors.push(format!(
                    "limits.messageBytesInMemory: {} must be at least 1Mi",
                    budget.0
                ));
            } else if budget.0 < largest_message.saturating_mul(2) {
                // A message's buffer doubles as it grows, and while it grows the old and the
                // new buffer both exist: alone, the largest message needs twice its size.
                errors.push(format!(
                    "limits.messageBytesInMemory: {} must be at least twice the largest maxMessageSize ({largest_message})",
                    budget.0
                ));
            }
        }
        if self.memory_wait.0.is_zero() || self.memory_wait.0.as_secs() > MAX_MEMORY_WAIT_SECS {
            errors.push(format!(
                "limits.memoryWait: {} must be greater than 0 and at most 5m",
                humantime::format_duration(self.memory_wait.0)
            ));
        }
    }
}

fn default_memory_wait() -> HumanDuration {
    HumanDuration::from_secs(10)
}
