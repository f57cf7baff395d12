//! Delivery pauses in the KV bucket [`kubemail_queue::PAUSES_BUCKET`]: the operator writes
//! one entry per `DeliveryPause`, every node watches the bucket. Whoever comes first creates
//! it from [`kubemail_queue::streams::pauses_config`].

use std::collections::HashMap;
use std::time::SystemTime;

use async_nats::jetstream::Context;
use async_nats::jetstream::kv::Store;
use futures::TryStreamExt as _;
use kubemail_queue::PAUSES_BUCKET;
use kubemail_queue::pause::Pause;

use crate::{AdminError, Filter, Queue, State};

/// Opens the pause bucket, creating it (with `replicas` copies,
/// [`kubemail_queue::streams::pauses_config`]) when it does not exist.
pub async fn open_bucket(js: &Context, replicas: u32) -> Result<Store, AdminError> {
    match js.get_key_value(PAUSES_BUCKET).await {
        Ok(store) => Ok(store),
        Err(_) => js
            .create_key_value(kubemail_queue::streams::pauses_config(replicas))
            .await
            .map_err(|e| AdminError::Bucket {
                bucket: PAUSES_BUCKET.to_owned(),
                reason: e.to_string(),
            }),
    }
}

/// Writes `pause` (checked first).
pub async fn put(store: &Store, pause: &Pause) -> Result<(), AdminError> {
    pause.validate()?;
    let value = serde_json::to_vec(pause).map_err(|e| AdminError::WritePause {
        key: pause.key.clone(),
        reason: e.to_string(),
    })?;
    store
        .put(&pause.key, value.into())
        .await
        .map_err(|e| AdminError::WritePause {
            key: pause.key.clone(),
            reason: e.to_string(),
        })?;
    Ok(())
}

/// Removes the pause `key` (nothing when it is not there).
pub async fn delete(store: &Store, key: &str) -> Result<(), AdminError> {
    store.purge(key).await.map_err(|e| AdminError::WritePause {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// Reads one stored pause value; `None` for a deletion or an unreadable value.
pub fn decode(value: &[u8]) -> Option<Pause> {
    serde_json::from_slice::<Pause>(value)
        .ok()
        .filter(|p| p.validate().is_ok())
}

/// Whether `pause` holds back mail at `now` (for status: "Active" or "Expired").
pub fn is_active(pause: &Pause, now: SystemTime) -> bool {
    pause.is_active(now)
}

impl Queue {
    /// How many entries each pause holds back now (entries waiting with its key in
    /// `Kubemail-Paused-By`), in one pass over the stream.
    pub async fn paused_counts(&self) -> Result<HashMap<String, u64>, AdminError> {
        let mut counts = HashMap::new();
        let filter = Filter {
            state: Some(State::Paused),
            ..Filter::default()
        };
        let mut entries = self.scan(0, filter).await?;
        while let Some(listed) = entries.try_next().await? {
            if let Some(key) = listed.entry.admin.paused_by {
                *counts.entry(key).or_insert(0) += 1;
            }
        }
        Ok(counts)
    }
}
