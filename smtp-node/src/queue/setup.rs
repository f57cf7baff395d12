//! The set-up loop shared by everything the node keeps in JetStream (the queue stream and body
//! bucket, the AUTH failure stream): try while NATS is connected, back off while it is not,
//! and set up again whenever a request finds the stream gone (a server that lost its store).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// First pause between two set-up attempts.
const RETRY_FIRST: Duration = Duration::from_millis(200);
/// Longest pause between two set-up attempts while NATS is unreachable.
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Whether the JetStream objects exist, and the signal to create them again.
#[derive(Debug, Default)]
pub struct StreamSetup {
    done: AtomicBool,
    redo: Notify,
}

impl StreamSetup {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the last set-up succeeded and nothing has found the objects gone since.
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// A request found the stream missing: [`StreamSetup::run`] sets it up again.
    pub fn lost(&self) {
        self.done.store(false, Ordering::Release);
        self.redo.notify_one();
    }

    /// Runs `attempt` until it succeeds (only while `client` is connected, with a growing
    /// pause in between), reports through `ready` / `failed`, then waits for [`lost`] and starts
    /// over. Returns when `cancel` fires.
    ///
    /// [`lost`]: StreamSetup::lost
    pub async fn run<E, Fut>(
        &self,
        client: &async_nats::Client,
        cancel: &CancellationToken,
        mut attempt: impl FnMut() -> Fut,
        ready: impl Fn(),
        failed: impl Fn(&E),
    ) where
        Fut: Future<Output = Result<(), E>>,
    {
        loop {
            let mut delay = crate::backoff::delays(RETRY_FIRST, RETRY_MAX);
            while !self.is_done() {
                if client.connection_state() == State::Connected {
                    match attempt().await {
                        Ok(()) => {
                            self.done.store(true, Ordering::Release);
                            ready();
                            break;
                        }
                        Err(error) => failed(&error),
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay.next_delay()) => {}
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.redo.notified() => {}
            }
        }
    }
}
