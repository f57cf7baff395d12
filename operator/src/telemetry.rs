//! Logging and tracing of the operator: the node's set-up ([`kubemail_telemetry`])
//! with the operator's name. Logs go to stderr as text or JSON (`--log-format`, default
//! `auto`: JSON when `LOG_FORMAT=json` or inside Kubernetes, text otherwise), filtered by
//! `RUST_LOG` (default `info`). Traces are exported over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`OTEL_SERVICE_NAME` default `kubemail-operator`);
//! each reconcile is a root span (`reconcile`, with the controller, namespace, name and the
//! `trace_id` its log lines carry). Spans lost to a slow or absent collector are counted in
//! `kubemail_operator_otel_spans_dropped_total`; reconciles never wait for the collector.

use std::sync::OnceLock;

use kubemail_telemetry as node_telemetry;
pub use kubemail_telemetry::Telemetry;
use kubemail_telemetry::{ExportMetrics, Settings};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON inside Kubernetes (or with `LOG_FORMAT=json`), text elsewhere.
    Auto,
    Text,
    Json,
}

impl LogFormat {
    fn resolve(self) -> node_telemetry::LogFormat {
        match self {
            Self::Auto => node_telemetry::LogFormat::from_env(),
            Self::Text => node_telemetry::LogFormat::Text,
            Self::Json => node_telemetry::LogFormat::Json,
        }
    }
}

/// The exporter's span counters, registered in the operator's registry by
/// [`crate::metrics::Metrics::new`].
pub fn export_metrics() -> &'static ExportMetrics {
    static EXPORT: OnceLock<ExportMetrics> = OnceLock::new();
    EXPORT.get_or_init(ExportMetrics::default)
}

/// Installs the global subscriber (once; later calls keep the first). Call inside the tokio
/// runtime's context (`runtime.enter()`): the OTLP client runs on it. Call
/// [`Telemetry::shutdown`] at exit to send the spans still queued.
pub fn init(format: LogFormat) -> Telemetry {
    node_telemetry::init(Settings {
        service_name: "kubemail-operator",
        service_version: env!("CARGO_PKG_VERSION"),
        attributes: Vec::new(),
        log_format: format.resolve(),
        export_metrics: export_metrics().clone(),
    })
}

/// Records the current span's trace id in its `trace_id` field, for the log lines.
pub fn record_trace_id() {
    node_telemetry::propagation::record_trace_id(&tracing::Span::current(), None);
}
