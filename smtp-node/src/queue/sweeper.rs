//! The node's body sweeper: on a node that manages its own JetStream objects
//! (`nats.manageStreams`), every `interval` it sweeps each of its domains' body buckets with
//! [`kubemail_queue::sweep`], whose doc says what an orphaned body is and how a sweep finds
//! it. With the operator's per-domain credentials the operator sweeps instead.

use async_nats::jetstream;
use async_nats::jetstream::object_store::ObjectStore;
use prometheus_client::metrics::counter::Counter;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use kubemail_queue::sweep::{
    GRACE, INTERVAL, MARK, SweepError, delete_orphan, mark_referenced, sweep,
};

use crate::config::NatsConfig;

/// Sweeps every `interval` until `cancel`. `bodies` gives each domain's bucket once it is set
/// up; the objects deleted are counted in `deleted_total`.
pub async fn run(
    js: &jetstream::Context,
    nats: &NatsConfig,
    bodies: impl Fn() -> Vec<(String, ObjectStore)>,
    interval: Duration,
    cancel: &CancellationToken,
    deleted_total: &Counter,
) {
    loop {
        // Up to half an interval later, at random: nodes started together sweep apart.
        let offset = interval.mul_f64(rand::random::<f64>() / 2.0);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval + offset) => {}
        }
        for (domain, store) in bodies() {
            match sweep(js, nats, &domain, &store, GRACE).await {
                Ok(0) => {}
                Ok(deleted) => {
                    deleted_total.inc_by(deleted as u64);
                    tracing::info!(%domain, deleted, "deleted body objects no entry refers to")
                }
                Err(error) => tracing::warn!(%domain, %error, "body sweep failed"),
            }
        }
    }
}
