//! Telemetry of a kubemail binary (the node; the operator uses the same setup): `tracing`
//! for everything, logs as text or JSON, and OpenTelemetry traces exported over OTLP.
//!
//! # Set-up ([`init`])
//!
//! * **Logs** go to stderr. JSON lines when `LOG_FORMAT=json`, or when `LOG_FORMAT` is unset
//!   and the process runs in Kubernetes (`KUBERNETES_SERVICE_HOST` is set); text otherwise
//!   (`LOG_FORMAT=text` forces text). The filter is `RUST_LOG` (default `info`). A JSON line
//!   carries the fields of every span it happened in (`spans`), so each line of a session
//!   or a delivery has its `trace_id`, `queue_id` and `message_id`; [`json`] writes them
//!   without parsing a span's fields again for every value and every line. A thread of its
//!   own writes the lines in batches ([`logsink`]): a line costs its logger a lock and a
//!   copy, not a `write(2)`, and [`Telemetry::shutdown`] (or a panic) writes what is left.
//! * **Traces** always get real OpenTelemetry ids (the `tracing-opentelemetry` layer is
//!   always installed, so the trace id in a log line or a queue entry is the one a collector
//!   would see). They are *exported* only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set and `OTEL_SDK_DISABLED` is not `true`:
//!   OTLP over gRPC (port 4317 of a collector or of Jaeger), batched by
//!   [`export::QueueProcessor`] — a bounded queue whose drops are counted in
//!   `*_otel_spans_dropped_total`, so a dead collector never slows mail down. The standard
//!   variables apply: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` (win over our
//!   defaults), `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_EXPORTER_OTLP_HEADERS`,
//!   `OTEL_TRACES_SAMPLER`, `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_QUEUE_SIZE`,
//!   `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, `OTEL_BSP_EXPORT_TIMEOUT`.
//! * **Resource**: `service.name` (default the binary's name), `service.version`,
//!   `service.instance.id` and `k8s.pod.name` (`POD_NAME`, else the host name),
//!   `k8s.namespace.name` (`POD_NAMESPACE`), plus what the caller adds (the node adds
//!   `kubemail.domain`: its MailDomains, comma separated).
//! * [`Telemetry::shutdown`] flushes what is queued (bounded wait) at exit.
//!
//! # The trace of a message
//!
//! One trace per **mail transaction**: the `smtp.transaction` span (started at `MAIL FROM`)
//! is the root. Its context is what the queue entry's `traceparent` header carries, written
//! with the W3C trace-context propagator ([`propagation`]). The `smtp.session` span of the
//! connection is a trace of its own (a session may carry thousands of messages); each
//! transaction has a *link* to its session span and repeats the session facts a reader
//! needs (client address, HELO, listener, TLS version, authenticated user id).
//!
//! ```text
//! smtp.transaction            (node A; envelope, size, TLS, enduser.id, reply code)
//! ├─ inbound.auth_check       (SPF/DKIM/DMARC of MX mail)
//! ├─ queue.publish            (one per destination domain)
//! ├─ delivery.attempt #1      (node B, parent = the traceparent header; outcome attributes)
//! │  ├─ delivery.route
//! │  │  ├─ delivery.mx_lookup
//! │  │  ├─ smtp.client.connect ── smtp.client.tls, smtp.client.reply (greeting, EHLO, ...)
//! │  │  └─ smtp.client.send       (the transaction's replies in order: smtp.replies)
//! │  └─ queue.publish         (the retry entry: it keeps the original traceparent)
//! ├─ delivery.attempt #2      (hours later, any pod: same parent)
//! └─ ...                      (a bounce entry's traceparent is the failing attempt's span,
//!                              so the DSN's own delivery hangs below that attempt)
//! ```
//!
//! **Finding the trace of a message**: our `Received:` header has a comment
//! `(trace <32 hex digits>)` after `id <queue id>`; that is the trace id (Jaeger:
//! `/trace/<id>`). Log lines carry the same `trace_id`.

pub mod export;
pub mod json;
pub mod logsink;
pub mod propagation;

use std::io::IsTerminal as _;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::resource::EnvResourceDetector;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

pub use export::ExportMetrics;

/// Environment variable choosing the log format (`json` or `text`).
pub const LOG_FORMAT_ENV: &str = "LOG_FORMAT";

/// Longest wait at exit for queued spans to reach the collector. Kept well inside a pod's
/// termination grace period; with the collector away the spans are dropped (and counted).
const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Targets whose spans never go to the OpenTelemetry layer: the OTLP client's own stack
/// (gRPC, HTTP/2), which would otherwise trace its exports of traces.
const EXPORT_STACK_TARGETS: [&str; 6] = [
    "h2",
    "hyper",
    "hyper_util",
    "tonic",
    "tower",
    "opentelemetry",
];

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with the fields of every enclosing span.
    Json,
}

impl LogFormat {
    /// `LOG_FORMAT` (`json`/`text`) when set; otherwise JSON inside Kubernetes
    /// (`KUBERNETES_SERVICE_HOST` set) and text elsewhere.
    pub fn from_env() -> Self {
        Self::choose(
            std::env::var(LOG_FORMAT_ENV).ok().as_deref(),
            std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
        )
    }

    fn choose(log_format: Option<&str>, in_kubernetes: bool) -> Self {
        match log_format.map(str::trim) {
            Some(v) if v.eq_ignore_ascii_case("json") => Self::Json,
            Some(v) if v.eq_ignore_ascii_case("text") => Self::Text,
            _ if in_kubernetes => Self::Json,
            _ => Self::Text,
        }
    }
}

/// What [`init`] needs to know about the binary.
pub struct Settings {
    /// `service.name` unless `OTEL_SERVICE_NAME` (or `service.name` in
    /// `OTEL_RESOURCE_ATTRIBUTES`) says otherwise.
    pub service_name: &'static str,
    pub service_version: &'static str,
    /// Extra resource attributes (overridden by `OTEL_RESOURCE_ATTRIBUTES`).
    pub attributes: Vec<KeyValue>,
    pub log_format: LogFormat,
    /// Where the exporter counts exported and dropped spans.
    pub export_metrics: ExportMetrics,
}

/// The installed telemetry; call [`Telemetry::shutdown`] at exit.
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
    /// The log writer thread (none when another subscriber was installed first).
    logs: Option<logsink::LogSink>,
}

impl Telemetry {
    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// Sends what is still queued (waiting at most a few seconds) and stops the exporter.
    /// Call it outside the async runtime (after `block_on` returned) while the runtime is
    /// still alive: the exporter runs on it.
    /// Then writes the log lines still buffered; later lines go straight to stderr.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown_with_timeout(SHUTDOWN_FLUSH_TIMEOUT) {
            tracing::debug!(%error, "trace exporter shutdown");
        }
        if let Some(logs) = &self.logs {
            logs.close();
        }
    }
}

impl Drop for Telemetry {
    /// An exit without [`Telemetry::shutdown`] (an early return) still writes the buffered
    /// log lines.
    fn drop(&mut self) {
        if let Some(logs) = &self.logs {
            logs.close();
        }
    }
}

/// Why the OTLP exporter could not be set up (the process then runs without export).
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP span exporter: {0}")]
    BuildExporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error(
        "cannot export traces: no async runtime (telemetry::init must run inside Runtime::enter)"
    )]
    NoRuntime,
}

/// Installs the global `tracing` subscriber: logs, and the OpenTelemetry layer. Call once,
/// inside the tokio runtime's context (`let _guard = runtime.enter();`), since the OTLP
/// client runs on it. A second call (tests) leaves the first subscriber in place.
pub fn init(settings: Settings) -> Telemetry {
    let resource = resource(&settings);
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let mut export_problem = None;
    let exporting = export_enabled();
    if exporting {
        match build_exporter() {
            Ok(exporter) => {
                let config = export::BatchConfig::from_env();
                builder = builder.with_span_processor(export::QueueProcessor::spawn(
                    exporter,
                    config,
                    settings.export_metrics.clone(),
                ));
            }
            Err(e) => export_problem = Some(e),
        }
    }
    let provider = builder.build();
    let tracer = provider.tracer(settings.service_name);

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let otel_targets = EXPORT_STACK_TARGETS.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |t, name| t.with_target(*name, LevelFilter::OFF),
    );
    // Without busy/idle timings, thread attributes and context activation: each costs work
    // on every poll of an instrumented future (a session's span is entered at every read),
    // and nothing here reads the OpenTelemetry context other than through the span itself.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_context_activation(false)
        .with_filter(otel_targets);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let logs = logsink::LogSink::stderr();
    let installed = match settings.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .fmt_fields(json::SpanFields)
                    .event_format(json::JsonLines)
                    .with_writer(logs.clone()),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_span_events(FmtSpan::NONE)
                    .with_writer(logs.clone()),
            )
            .try_init(),
    };
    let logs = if installed.is_ok() {
        logs.flush_before_panics();
        Some(logs)
    } else {
        logs.close();
        None
    };
    let exporting = exporting && export_problem.is_none();
    if installed.is_ok() {
        match export_problem {
            Some(error) => tracing::error!(%error, "traces are not exported"),
            None if exporting => tracing::info!(
                endpoint = %otlp_endpoint().unwrap_or_default(),
                "exporting traces over OTLP/gRPC"
            ),
            None => {
                tracing::debug!("OTEL_EXPORTER_OTLP_ENDPOINT is not set; traces are not exported")
            }
        }
    }
    Telemetry {
        provider,
        exporting,
        logs,
    }
}

/// Records several values on `span` with one call to the subscriber, as `Span::record`
/// records one: a name the span does not have is skipped. Each `record` goes through every
/// layer, and each layer finds the span's data again, so values known at the same moment
/// (the end of a transaction) are cheaper recorded together.
pub fn record_all<const N: usize>(span: &tracing::Span, values: [(&str, &dyn tracing::Value); N]) {
    let Some(meta) = span.metadata() else {
        return;
    };
    let fields = meta.fields();
    // A value set names fields of the span's own set; a name it lacks gets its first field
    // with no value, which no layer sees.
    let Some(any) = fields.iter().next() else {
        return;
    };
    let found: [Option<tracing::field::Field>; N] =
        std::array::from_fn(|i| fields.field(values[i].0));
    let pairs: [(&tracing::field::Field, Option<&dyn tracing::Value>); N] =
        std::array::from_fn(|i| match &found[i] {
            Some(field) => (field, Some(values[i].1)),
            None => (&any, None),
        });
    span.record_all(&fields.value_set(&pairs));
}

/// Logs only, no OpenTelemetry (for tools and commands that do not run the node).
pub fn init_logs(log_format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match log_format {
        LogFormat::Json => builder.json().with_span_list(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The resource attributes of this process: `POD_NAME`, `POD_NAMESPACE` (set by the
/// operator from the downward API) and `domains`.
pub fn node_attributes(domains: &[String]) -> Vec<KeyValue> {
    let mut attributes = Vec::new();
    if !domains.is_empty() {
        attributes.push(KeyValue::new("kubemail.domain", domains.join(",")));
    }
    attributes
}

fn resource(settings: &Settings) -> Resource {
    let pod = non_empty_env("POD_NAME").or_else(|| non_empty_env("HOSTNAME"));
    let mut defaults = vec![KeyValue::new("service.version", settings.service_version)];
    if let Some(pod) = pod {
        defaults.push(KeyValue::new("k8s.pod.name", pod.clone()));
        defaults.push(KeyValue::new("service.instance.id", pod));
    }
    if let Some(namespace) = non_empty_env("POD_NAMESPACE") {
        defaults.push(KeyValue::new("k8s.namespace.name", namespace));
    }
    let mut builder = Resource::builder_empty()
        .with_service_name(settings.service_name)
        .with_attributes(defaults)
        .with_attributes(settings.attributes.iter().cloned())
        .with_detector(Box::new(EnvResourceDetector::new()));
    if let Some(name) = non_empty_env("OTEL_SERVICE_NAME") {
        builder = builder.with_service_name(name);
    }
    builder.build()
}

/// Export is on when an OTLP endpoint is configured and the SDK is not disabled.
fn export_enabled() -> bool {
    let disabled =
        non_empty_env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let traces_off = non_empty_env("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "none");
    !disabled && !traces_off && otlp_endpoint().is_some()
}

fn otlp_endpoint() -> Option<String> {
    non_empty_env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| non_empty_env("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

fn build_exporter() -> Result<opentelemetry_otlp::SpanExporter, TelemetryError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(TelemetryError::NoRuntime);
    }
    if let Some(protocol) = non_empty_env("OTEL_EXPORTER_OTLP_PROTOCOL")
        && protocol != "grpc"
    {
        // Only gRPC is built in; say so instead of failing later in a confusing way.
        eprintln!(
            "warning: OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not supported; using grpc (point the endpoint at port 4317)"
        );
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(endpoint) = otlp_endpoint() {
        builder = builder.with_endpoint(endpoint);
    }
    Ok(builder.build()?)
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_in_kubernetes_unless_told_otherwise() {
        assert_eq!(LogFormat::choose(None, false), LogFormat::Text);
        assert_eq!(LogFormat::choose(None, true), LogFormat::Json);
        assert_eq!(LogFormat::choose(Some("json"), false), LogFormat::Json);
        assert_eq!(LogFormat::choose(Some("JSON"), false), LogFormat::Json);
        assert_eq!(LogFormat::choose(Some("text"), true), LogFormat::Text);
        assert_eq!(LogFormat::choose(Some(""), true), LogFormat::Json);
    }

    #[test]
    fn node_attributes_name_the_domains() {
        let a = node_attributes(&["example.com".into(), "example.org".into()]);
        assert_eq!(
            a,
            vec![KeyValue::new("kubemail.domain", "example.com,example.org")]
        );
        assert!(node_attributes(&[]).is_empty());
    }
}
