//! The operator's HTTP endpoint (axum): `/healthz` (the process runs), `/readyz` (the same:
//! a follower is as ready as the leader, it just waits), and `/metrics` (OpenMetrics text).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot bind the admin endpoint to {address}")]
    BindAdmin {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin endpoint failed")]
    ServeAdmin(#[source] std::io::Error),
}

/// A bound admin endpoint, ready to serve.
pub struct AdminServer {
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
}

impl AdminServer {
    /// Binds `address` (port 0 picks a free port; see [`AdminServer::local_addr`]).
    pub async fn bind(address: SocketAddr, metrics: Arc<Metrics>) -> Result<Self, AdminError> {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| AdminError::BindAdmin { address, source })?;
        Ok(Self { listener, metrics })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown` fires.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), AdminError> {
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(|| async { "ok\n" }))
            .route("/metrics", get(metrics))
            .with_state(self.metrics);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(AdminError::ServeAdmin)
    }
}

async fn metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
}
