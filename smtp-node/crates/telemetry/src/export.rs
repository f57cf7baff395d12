//! Export of finished spans: a bounded queue in front of the OTLP exporter, with every lost
//! span counted.
//!
//! Why not the SDK's `BatchSpanProcessor`: it drops spans when its queue is full but only
//! mentions it in an internal log line (once), so an operator cannot tell "the collector is
//! down and traces are lost" from "no traffic". Mail must never wait for tracing, so the
//! rules here are: [`QueueProcessor::on_end`](opentelemetry_sdk::trace::SpanProcessor::on_end)
//! never blocks (a full queue drops the span, `reason="queue_full"`); the exporter runs on
//! the tokio runtime (the gRPC client lives there) one batch at a time under a timeout; a
//! failed or timed-out batch is dropped (`reason="export_failed"`), never retried beyond what
//! the OTLP client itself does within its timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter, SpanProcessor};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

/// The OpenTelemetry default for `OTEL_BSP_MAX_QUEUE_SIZE`: spans held while waiting for
/// export (a few hundred bytes each, so about a megabyte).
const DEFAULT_MAX_QUEUE: usize = 2048;
/// The OpenTelemetry default for `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`.
const DEFAULT_MAX_BATCH: usize = 512;
/// The OpenTelemetry default for `OTEL_BSP_SCHEDULE_DELAY`: a batch goes out at least this
/// often.
const DEFAULT_DELAY: Duration = Duration::from_secs(5);
/// The OpenTelemetry default for `OTEL_BSP_EXPORT_TIMEOUT`: the longest one export may take
/// (the OTLP client gives up after its own 10 s `OTEL_EXPORTER_OTLP_TIMEOUT` first).
const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait of a force flush.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why spans were lost.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// `queue_full`, `export_failed` or `shutdown`.
    pub reason: &'static str,
}

/// Counters of the exporter, registered by each binary in its own registry.
#[derive(Clone, Debug)]
pub struct ExportMetrics {
    pub exported: Counter,
    pub dropped: Family<DropLabels, Counter>,
}

impl Default for ExportMetrics {
    /// Every drop reason starts at zero, so the series exist before the first drop.
    fn default() -> Self {
        let dropped: Family<DropLabels, Counter> = Family::default();
        for reason in ["queue_full", "export_failed", "shutdown"] {
            let _ = dropped.get_or_create(&DropLabels { reason });
        }
        Self {
            exported: Counter::default(),
            dropped,
        }
    }
}

impl ExportMetrics {
    /// Adds `otel_spans_exported` and `otel_spans_dropped` to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "otel_spans_exported",
            "Trace spans accepted by the OTLP collector",
            self.exported.clone(),
        );
        registry.register(
            "otel_spans_dropped",
            "Trace spans lost before reaching the collector, by reason (queue_full, export_failed, shutdown)",
            self.dropped.clone(),
        );
    }

    fn drop_spans(&self, reason: &'static str, n: usize) {
        self.dropped
            .get_or_create(&DropLabels { reason })
            .inc_by(n as u64);
    }
}

/// Queue and batch sizes, from the standard `OTEL_BSP_*` variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchConfig {
    pub max_queue: usize,
    pub max_batch: usize,
    pub delay: Duration,
    pub export_timeout: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_queue: DEFAULT_MAX_QUEUE,
            max_batch: DEFAULT_MAX_BATCH,
            delay: DEFAULT_DELAY,
            export_timeout: DEFAULT_EXPORT_TIMEOUT,
        }
    }
}

impl BatchConfig {
    /// The defaults, changed by `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`,
    /// `OTEL_BSP_SCHEDULE_DELAY` and `OTEL_BSP_EXPORT_TIMEOUT` (milliseconds).
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let number = |name: &str| get(name).and_then(|v| v.trim().parse::<u64>().ok());
        let d = Self::default();
        let max_queue = number("OTEL_BSP_MAX_QUEUE_SIZE")
            .map_or(d.max_queue, |n| n as usize)
            .max(1);
        let max_batch = number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
            .map_or(d.max_batch, |n| n as usize)
            .clamp(1, max_queue);
        Self {
            max_queue,
            max_batch,
            delay: number("OTEL_BSP_SCHEDULE_DELAY")
                .map_or(d.delay, Duration::from_millis)
                .max(Duration::from_millis(1)),
            export_timeout: number("OTEL_BSP_EXPORT_TIMEOUT")
                .map_or(d.export_timeout, Duration::from_millis)
                .max(Duration::from_millis(1)),
        }
    }
}

enum Control {
    Resource(Resource),
    Flush(std::sync::mpsc::SyncSender<()>),
    Shutdown(std::sync::mpsc::SyncSender<()>),
}

/// The span processor: a bounded queue drained by a task on the tokio runtime.
#[derive(Debug)]
pub struct QueueProcessor {
    spans: mpsc::Sender<SpanData>,
    control: mpsc::UnboundedSender<Control>,
    metrics: ExportMetrics,
    shut_down: AtomicBool,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Resource(_) => "Resource",
            Self::Flush(_) => "Flush",
            Self::Shutdown(_) => "Shutdown",
        })
    }
}

impl QueueProcessor {
    /// Starts the export task on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime context (checked by [`super::init`] first).
    pub fn spawn<E>(exporter: E, config: BatchConfig, metrics: ExportMetrics) -> Self
    where
        E: SpanExporter + 'static,
    {
        let (spans, span_rx) = mpsc::channel(config.max_queue);
        let (control, control_rx) = mpsc::unbounded_channel();
        let worker = Worker {
            exporter,
            config,
            metrics: metrics.clone(),
            failing: Arc::new(AtomicBool::new(false)),
        };
        tokio::spawn(worker.run(span_rx, control_rx));
        Self {
            spans,
            control,
            metrics,
            shut_down: AtomicBool::new(false),
        }
    }

    /// Sends `make(done)` to the worker and waits (blocking this thread) up to `timeout`.
    fn request(
        &self,
        make: impl FnOnce(std::sync::mpsc::SyncSender<()>) -> Control,
        timeout: Duration,
    ) -> OTelSdkResult {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        self.control
            .send(make(done))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        wait.recv_timeout(timeout)
            .map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        match self.spans.try_send(span) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.metrics.drop_spans("queue_full", 1),
            Err(mpsc::error::TrySendError::Closed(_)) => self.metrics.drop_spans("shutdown", 1),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.request(Control::Flush, FLUSH_TIMEOUT)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        if self.shut_down.swap(true, Ordering::AcqRel) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        self.request(Control::Shutdown, timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        let _ = self.control.send(Control::Resource(resource.clone()));
    }
}

struct Worker<E> {
    exporter: E,
    config: BatchConfig,
    metrics: ExportMetrics,
    /// The last export failed (log state changes only, not every failed batch).
    failing: Arc<AtomicBool>,
}

impl<E: SpanExporter + 'static> Worker<E> {
    async fn run(
        mut self,
        mut spans: mpsc::Receiver<SpanData>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let mut batch: Vec<SpanData> = Vec::with_capacity(self.config.max_batch);
        let mut tick = tokio::time::interval(self.config.delay);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // `recv_many` adds to what the batch holds: no more than the room left in it (at
            // least 1: a full batch was exported below).
            let room = self.config.max_batch.saturating_sub(batch.len()).max(1);
            tokio::select! {
                biased;
                message = control.recv() => match message {
                    Some(Control::Resource(resource)) => self.exporter.set_resource(&resource),
                    Some(Control::Flush(done)) => {
                        self.drain(&mut spans, &mut batch).await;
                        let _ = done.send(());
                    }
                    Some(Control::Shutdown(done)) => {
                        spans.close();
                        self.drain(&mut spans, &mut batch).await;
                        let _ = self.exporter.shutdown();
                        let _ = done.send(());
                        return;
                    }
                    None => {
                        // The provider is gone without a shutdown: send what is left.
                        spans.close();
                        self.drain(&mut spans, &mut batch).await;
                        return;
                    }
                },
                n = spans.recv_many(&mut batch, room) => {
                    if n == 0 {
                        self.export(&mut batch).await;
                        return;
                    }
                    if batch.len() >= self.config.max_batch {
                        self.export(&mut batch).await;
                    }
                }
                _ = tick.tick() => {
                    if !batch.is_empty() {
                        self.export(&mut batch).await;
                    }
                }
            }
        }
    }

    /// Exports everything queued right now, in batches.
    async fn drain(&mut self, spans: &mut mpsc::Receiver<SpanData>, batch: &mut Vec<SpanData>) {
        loop {
            while batch.len() < self.config.max_batch {
                match spans.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                return;
            }
            let full = batch.len() >= self.config.max_batch;
            self.export(batch).await;
            if !full {
                return;
            }
        }
    }

    async fn export(&self, batch: &mut Vec<SpanData>) {
        let spans = std::mem::replace(batch, Vec::with_capacity(self.config.max_batch));
        let n = spans.len();
        if n == 0 {
            return;
        }
        let result =
            tokio::time::timeout(self.config.export_timeout, self.exporter.export(spans)).await;
        match result {
            Ok(Ok(())) => {
                self.metrics.exported.inc_by(n as u64);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("trace export works again");
                }
            }
            Ok(Err(error)) => self.failed(n, &error.to_string()),
            Err(_) => self.failed(n, "timed out"),
        }
    }

    fn failed(&self, n: usize, error: &str) {
        self.metrics.drop_spans("export_failed", n);
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                %error,
                spans = n,
                "cannot export traces; spans are dropped (counted in otel_spans_dropped_total) until the collector is back"
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use std::sync::Mutex;

    use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;

    use super::*;

    /// An exporter that records batches, or fails every export.
    #[derive(Debug, Clone, Default)]
    struct Recording {
        batches: Arc<Mutex<Vec<usize>>>,
        fail: bool,
    }

    impl SpanExporter for Recording {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.fail {
                return Err(OTelSdkError::InternalFailure("collector down".into()));
            }
            self.batches.lock().unwrap().push(batch.len());
            Ok(())
        }
    }

    fn provider(exporter: Recording, config: BatchConfig, m: &ExportMetrics) -> SdkTracerProvider {
        SdkTracerProvider::builder()
            .with_span_processor(QueueProcessor::spawn(exporter, config, m.clone()))
            .build()
    }

    /// A provider that exports to a recording exporter in batches of at most 4, on shutdown
    /// only (the delay is an hour).
    fn batching_by_four() -> (Recording, ExportMetrics, SdkTracerProvider) {
        let exporter = Recording::default();
        let m = ExportMetrics::default();
        let config = BatchConfig {
            max_batch: 4,
            delay: Duration::from_secs(3600),
            ..BatchConfig::default()
        };
        let p = provider(exporter.clone(), config, &m);
        (exporter, m, p)
    }

    fn dropped(m: &ExportMetrics, reason: &'static str) -> u64 {
        m.dropped.get_or_create(&DropLabels { reason }).get()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_and_flushes_at_shutdown() {
        let (exporter, m, p) = batching_by_four();
        let tracer = p.tracer("test");
        for _ in 0..10 {
            tracer.start("span").end();
        }
        tokio::task::spawn_blocking(move || p.shutdown().unwrap())
            .await
            .unwrap();
        let batches = exporter.batches.lock().unwrap().clone();
        assert_eq!(batches.iter().sum::<usize>(), 10, "{batches:?}");
        assert!(batches.iter().all(|&n| n <= 4), "{batches:?}");
        assert_eq!(m.exported.get(), 10);
        assert_eq!(dropped(&m, "queue_full") + dropped(&m, "export_failed"), 0);
    }

    /// Spans that arrive while a batch is partly filled never make it larger than
    /// `max_batch` (one thread: the processor runs only when the test yields).
    #[tokio::test(flavor = "current_thread")]
    async fn a_partly_filled_batch_takes_no_more_than_its_room() {
        let (exporter, _metrics, p) = batching_by_four();
        let tracer = p.tracer("test");
        for _ in 0..2 {
            tracer.start("span").end();
        }
        tokio::task::yield_now().await;
        for _ in 0..4 {
            tracer.start("span").end();
        }
        tokio::task::yield_now().await;
        tokio::task::spawn_blocking(move || p.shutdown().unwrap())
            .await
            .unwrap();
        let batches = exporter.batches.lock().unwrap().clone();
        assert_eq!(batches, [4, 2]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_and_a_dead_collector_drop_and_count_without_blocking() {
        let exporter = Recording {
            fail: true,
            ..Recording::default()
        };
        let m = ExportMetrics::default();
        let config = BatchConfig {
            max_queue: 5,
            max_batch: 5,
            delay: Duration::from_secs(3600),
            ..BatchConfig::default()
        };
        let p = provider(exporter, config, &m);
        let tracer = p.tracer("test");
        // Ending spans never waits, however many there are.
        for _ in 0..1000 {
            tracer.start("span").end();
        }
        tokio::task::spawn_blocking(move || p.shutdown().unwrap())
            .await
            .unwrap();
        assert_eq!(m.exported.get(), 0);
        let lost = dropped(&m, "queue_full") + dropped(&m, "export_failed");
        assert_eq!(lost, 1000, "every span is accounted for");
        assert!(dropped(&m, "queue_full") > 0);
        assert!(dropped(&m, "export_failed") > 0);
    }

    #[test]
    fn reads_the_standard_variables() {
        let c = BatchConfig::from_vars(|name| match name {
            "OTEL_BSP_MAX_QUEUE_SIZE" => Some("100".into()),
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE" => Some("1000".into()),
            "OTEL_BSP_SCHEDULE_DELAY" => Some("250".into()),
            _ => None,
        });
        assert_eq!(c.max_queue, 100);
        assert_eq!(c.max_batch, 100, "a batch is never larger than the queue");
        assert_eq!(c.delay, Duration::from_millis(250));
        assert_eq!(c.export_timeout, DEFAULT_EXPORT_TIMEOUT);
        assert_eq!(BatchConfig::from_vars(|_| None), BatchConfig::default());
    }
}
