//! An in-memory [`Queue`] for unit tests: records what was queued and can be told to fail.

use std::sync::Mutex;

use futures::future::BoxFuture;

use super::{EnqueueError, Queue, QueuedMessage};

/// Test double of the queue.
#[derive(Default)]
pub struct MemoryQueue {
    entries: Mutex<Vec<QueuedMessage>>,
    failure: Mutex<Option<EnqueueError>>,
}

impl MemoryQueue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every entry queued so far.
    pub fn entries(&self) -> Vec<QueuedMessage> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Makes every later enqueue fail with `error` (`None`: succeed again).
    pub fn fail_with(&self, error: Option<EnqueueError>) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }
}

impl Queue for MemoryQueue {
    fn enqueue(&self, entries: Vec<QueuedMessage>) -> BoxFuture<'_, Result<(), EnqueueError>> {
        Box::pin(async move {
            if let Some(e) = self
                .failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                return Err(e);
            }
            self.entries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(entries);
            Ok(())
        })
    }

    fn is_ready(&self) -> bool {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    }
}
