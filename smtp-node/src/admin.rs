//! The HTTP admin endpoint (axum): `/healthz` (the process runs; liveness),
//! `/readyz` (listeners bound, queue connected and set up, not shutting down; readiness) and
//! `/metrics` (Prometheus/OpenMetrics text).
//!
//! Liveness does not depend on NATS: a queue outage makes the pod unready (taken out of the
//! Service) but must not make Kubernetes restart it in a loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::queue::Queue;

/// What `/readyz` looks at.
pub struct Readiness {
    listeners_bound: AtomicBool,
    queue: Arc<dyn Queue>,
    stopping: CancellationToken,
}

impl Readiness {
    pub fn new(queue: Arc<dyn Queue>, stopping: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            listeners_bound: AtomicBool::new(false),
            queue,
            stopping,
        })
    }

    /// Called once every listener socket is bound.
    pub fn set_listeners_bound(&self) {
        self.listeners_bound.store(true, Ordering::Release);
    }

    /// `Ok` when ready, else the reason.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.stopping.is_cancelled() {
            Err("shutting down")
        } else if !self.listeners_bound.load(Ordering::Acquire) {
            Err("listeners not bound")
        } else if !self.queue.is_ready() {
            Err("queue not connected")
        } else {
            Ok(())
        }
    }
}

/// Why the admin endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot bind the admin endpoint to {address}")]
    BindAdmin {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin endpoint failed")]
    ServeAdmin(#[source] std::io::Error),
}

/// The admin routes; `/metrics` shows `metrics`.
pub fn router(readiness: Arc<Readiness>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(move || exposition(metrics.clone())))
        .with_state(readiness)
}

/// Binds the admin address (fails fast at start-up when it is taken).
pub async fn bind(address: SocketAddr) -> Result<tokio::net::TcpListener, AdminError> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| AdminError::BindAdmin { address, source })
}

/// Serves until `cancel` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> Result<(), AdminError> {
    axum::serve(listener, router(readiness, metrics))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
        .map_err(AdminError::ServeAdmin)
}

async fn readyz(State(readiness): State<Arc<Readiness>>) -> impl IntoResponse {
    match readiness.check() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

async fn exposition(metrics: Arc<Metrics>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::queue::memory::MemoryQueue;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn readyz_follows_listeners_and_queue() {
        let queue = Arc::new(MemoryQueue::new());
        let stop = CancellationToken::new();
        let readiness = Readiness::new(queue.clone(), stop.clone());
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            readiness.clone(),
            Metrics::new(),
            cancel.clone(),
        ));

        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let r = get(addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("listeners not bound"),
            "{r}"
        );
        readiness.set_listeners_bound();
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        queue.fail_with(Some(crate::queue::EnqueueError::Unavailable("down".into())));
        assert!(get(addr, "/readyz").await.contains("queue not connected"));
        queue.fail_with(None);
        stop.cancel();
        assert!(get(addr, "/readyz").await.contains("shutting down"));
        assert!(get(addr, "/metrics").await.contains("# EOF"));
        cancel.cancel();
        server.await.unwrap().unwrap();
    }
}
