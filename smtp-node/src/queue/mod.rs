//! The queue as the SMTP session sees it: the [`Queue`] seam the session calls before it may
//! answer `250`, its JetStream implementation ([`jetstream`], [`stream`], [`setup`]), an
//! in-memory double ([`memory`]) and the depth sampler ([`sampler`]).
//!
//! The contract itself (subjects, entry headers, large bodies, delivery state, message ids,
//! consumer names) is the crate `kubemail_queue`, whose crate doc is its one description;
//! its types are re-exported here.

pub mod connect;
pub mod jetstream;
pub mod memory;
pub mod sampler;
pub mod setup;
pub mod stream;

use bytes::Bytes;
use futures::future::BoxFuture;
pub use kubemail_queue::{
    Direction, EntryError, Notice, QueueEntry, QueueId, headers, parse_rfc3339, rfc3339,
};

/// One entry handed to the queue: envelope and message bytes. The publisher fills in what
/// only it knows: `body_size`, and `body_ref` when the body goes to the object store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub entry: QueueEntry,
    pub body: Bytes,
}

/// Why a message could not be queued. Each maps to the SMTP reply the client gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    /// Not connected, timed out, or any other transient failure: `451 4.3.0`.
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    /// The stream or object store is full: `452 4.3.1`.
    #[error("queue full: {0}")]
    Full(String),
}

/// The durable queue as the SMTP session sees it. Success means every entry is acknowledged
/// by the queue and may be confirmed to the client with `250`.
pub trait Queue: Send + Sync + 'static {
    /// Queues all entries of one transaction (one per destination domain).
    fn enqueue(&self, entries: Vec<QueuedMessage>) -> BoxFuture<'_, Result<(), EnqueueError>>;

    /// Whether the queue is reachable and set up (for `/readyz`).
    fn is_ready(&self) -> bool;
}

#[cfg(test)]
mod tests {
    use crate::config::NatsConfig;

    #[test]
    fn configuration_defaults_are_the_contract_names() {
        // The operator and other tools find the queue under these names when nothing is set.
        let nats = NatsConfig::default();
        assert_eq!(nats.stream, kubemail_queue::DEFAULT_STREAM);
        assert_eq!(nats.subject_prefix, kubemail_queue::DEFAULT_SUBJECT_PREFIX);
        assert_eq!(nats.body_bucket, kubemail_queue::DEFAULT_BODY_BUCKET);
    }
}
