//! Graceful shutdown: one signal fanned out to every task, and a tracker to wait for them.
//!
//! Two phases, as an MTA needs them:
//! 1. **stop** (SIGTERM): listeners close first (so a client that saw a `421` can rely on new
//!    connections being refused), then idle sessions answer `421 4.3.0` and end, sessions in
//!    a transaction may finish it (the client gets its `250`), delivery stops pulling;
//! 2. **abort** (the drain deadline passed): the remaining sessions answer `421 4.3.0` without
//!    queueing anything more and close.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// After the abort signal, how long tasks get to write their 421 and close.
const ABORT_GRACE: Duration = Duration::from_secs(5);
/// How long a graceful stop waits for the accept loops to drop their sockets before it
/// signals the sessions anyway (they end at their next poll; this only bounds a stuck loop).
const LISTENER_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Shutdown signals and the set of tasks that must end before the process exits.
#[derive(Clone, Default)]
pub struct Shutdown {
    accept: CancellationToken,
    stop: CancellationToken,
    abort: CancellationToken,
    tracker: TaskTracker,
    listeners: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Fires when the listeners should close (first thing on SIGTERM; readiness follows it).
    pub fn accept_token(&self) -> &CancellationToken {
        &self.accept
    }

    /// Fires when the node should stop taking new work, after the listeners closed.
    pub fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }

    /// Fires when in-flight work must be abandoned.
    pub fn abort_token(&self) -> &CancellationToken {
        &self.abort
    }

    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Tracks tasks that must finish before exit (one per SMTP session).
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Tracks the accept loops, so that a graceful stop knows when their sockets are closed.
    pub fn listeners(&self) -> &TaskTracker {
        &self.listeners
    }

    /// Starts phase 1 at once, listeners and sessions together.
    pub fn stop(&self) {
        self.accept.cancel();
        self.stop.cancel();
    }

    /// Starts phase 1 in order: closes the listeners, waits (bounded) until every accept loop
    /// has dropped its socket, then stops the sessions and workers. What SIGTERM does.
    pub async fn stop_gracefully(&self) {
        self.accept.cancel();
        self.listeners.close();
        if tokio::time::timeout(LISTENER_CLOSE_WAIT, self.listeners.wait())
            .await
            .is_err()
        {
            tracing::warn!("accept loops did not stop in time; stopping sessions anyway");
        }
        self.stop.cancel();
    }

    /// Runs both phases: stop, wait up to `drain` for the tracked tasks, then abort and wait a
    /// little more. Returns whether every task ended in time.
    pub async fn drain(&self, drain: Duration) -> bool {
        self.stop();
        self.tracker.close();
        if tokio::time::timeout(drain, self.tracker.wait())
            .await
            .is_ok()
        {
            return true;
        }
        tracing::warn!(
            remaining = self.tracker.len(),
            "drain timeout reached; aborting open sessions"
        );
        self.abort.cancel();
        tokio::time::timeout(ABORT_GRACE, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// Waits for SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            r = tokio::signal::ctrl_c() => r?,
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_tasks_then_aborts() {
        let s = Shutdown::new();
        let stop = s.stop_token().clone();
        let abort = s.abort_token().clone();
        // A task that ends as soon as stop fires.
        s.tracker().spawn(async move { stop.cancelled().await });
        // A task that only ends on abort.
        s.tracker().spawn(async move { abort.cancelled().await });
        let ok = s.drain(Duration::from_secs(30)).await;
        assert!(ok, "both tasks end: one on stop, one on abort");
        assert!(s.abort_token().is_cancelled());

        let s = Shutdown::new();
        let stop = s.stop_token().clone();
        s.tracker().spawn(async move { stop.cancelled().await });
        assert!(s.drain(Duration::from_secs(30)).await);
        assert!(
            !s.abort_token().is_cancelled(),
            "no abort when drain finished"
        );
    }
}
