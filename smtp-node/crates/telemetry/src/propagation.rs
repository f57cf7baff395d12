//! Moving a trace across the queue: the W3C `traceparent` of a span (written into a queue
//! entry with OpenTelemetry's trace-context propagator) and back (a delivery attempt's span
//! gets it as its parent). Also puts the trace id into a span's `trace_id` field, which is
//! what log lines show.
//!
//! Without the OpenTelemetry layer (unit tests drive sessions without a subscriber) a span
//! has no context; [`traceparent`] then makes up a random, valid one so that every queue
//! entry still carries an id to correlate by.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{SpanContext, TraceContextExt as _, TraceFlags};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The header (and map key) of the W3C trace context.
const TRACEPARENT: &str = "traceparent";

/// The W3C `traceparent` of `span`; a fresh random one when it has no OpenTelemetry
/// context.
pub fn traceparent(span: &tracing::Span) -> String {
    let cx = span.context();
    let otel_span = cx.span();
    let sc = otel_span.span_context();
    if sc.is_valid() {
        // What the W3C propagator writes (version 00, only the sampled flag), without its
        // map: this runs for every message.
        let flags = (sc.trace_flags() & TraceFlags::SAMPLED).to_u8();
        return format!("00-{}-{}-{flags:02x}", sc.trace_id(), sc.span_id());
    }
    random_traceparent()
}

/// The trace id (32 lower-case hex digits) in a `traceparent` value.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_version, trace) = (parts.next()?, parts.next()?);
    (trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit())).then_some(trace)
}

/// Makes `span` a child of the span that `traceparent` names (from a queue entry). Call
/// before the span is entered. Returns false (and leaves the span alone) when the value is
/// missing or not a valid trace context.
pub fn set_remote_parent(span: &tracing::Span, traceparent: Option<&str>) -> bool {
    let Some(tp) = traceparent else {
        return false;
    };
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), tp.trim().to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if !cx.span().span_context().is_valid() {
        return false;
    }
    span.set_parent(cx).is_ok()
}

/// Makes `span` the root of a new trace, linked to `from` (the session a transaction runs
/// in). Call before the span is entered.
pub fn start_linked_trace(span: &tracing::Span, from: &tracing::Span) {
    let link: SpanContext = from.context().span().span_context().clone();
    if span.set_parent(opentelemetry::Context::new()).is_ok() && link.is_valid() {
        span.add_link(link);
    }
}

/// Records the span's trace id in its `trace_id` field (declared `Empty` at creation) and
/// returns it. `fallback` is used when the span has no OpenTelemetry context.
pub fn record_trace_id(span: &tracing::Span, fallback: Option<&str>) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    let id = if sc.is_valid() {
        Some(sc.trace_id().to_string())
    } else {
        fallback.map(str::to_owned)
    };
    if let Some(id) = &id {
        span.record("trace_id", id.as_str());
    }
    id
}

fn random_traceparent() -> String {
    let trace: u128 = rand::random::<u128>().max(1);
    let span: u64 = rand::random::<u64>().max(1);
    format!("00-{trace:032x}-{span:016x}-01")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    fn with_otel<T>(f: impl FnOnce() -> T) -> T {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f)
    }

    #[test]
    fn a_child_span_continues_the_trace_of_a_traceparent() {
        with_otel(|| {
            let parent = tracing::info_span!("smtp.transaction", trace_id = tracing::field::Empty);
            let tp = traceparent(&parent);
            // What the W3C propagator itself writes.
            let mut carrier: HashMap<String, String> = HashMap::new();
            TraceContextPropagator::new().inject_context(&parent.context(), &mut carrier);
            assert_eq!(carrier.get(TRACEPARENT), Some(&tp));
            let trace = trace_id_of(&tp).unwrap().to_owned();
            assert_eq!(
                record_trace_id(&parent, None).as_deref(),
                Some(trace.as_str())
            );

            // A delivery attempt elsewhere, not a tracing child of the transaction.
            let attempt = tracing::info_span!(parent: None, "delivery.attempt");
            assert!(set_remote_parent(&attempt, Some(&tp)));
            let child_tp = traceparent(&attempt);
            assert_eq!(trace_id_of(&child_tp), Some(trace.as_str()));
            assert_ne!(child_tp, tp, "a span of its own in the same trace");
        });
    }

    #[test]
    fn a_transaction_starts_its_own_trace_linked_to_the_session() {
        with_otel(|| {
            let session = tracing::info_span!("smtp.session");
            let _entered = session.enter();
            let tx = tracing::info_span!("smtp.transaction");
            start_linked_trace(&tx, &session);
            let s = trace_id_of(&traceparent(&session)).unwrap().to_owned();
            let t = trace_id_of(&traceparent(&tx)).unwrap().to_owned();
            assert_ne!(s, t);
        });
    }

    #[test]
    fn invalid_or_missing_contexts_are_ignored() {
        with_otel(|| {
            let span = tracing::info_span!("delivery.attempt");
            assert!(!set_remote_parent(&span, None));
            assert!(!set_remote_parent(&span, Some("garbage")));
            assert!(!set_remote_parent(
                &span,
                Some("00-00000000000000000000000000000000-0000000000000000-01")
            ));
        });
    }

    #[test]
    fn without_opentelemetry_a_random_valid_context_is_made_up() {
        let span = tracing::Span::none();
        let tp = traceparent(&span);
        assert_eq!(tp.len(), 55, "{tp}");
        assert!(trace_id_of(&tp).is_some(), "{tp}");
        assert_eq!(record_trace_id(&span, Some("abc")).as_deref(), Some("abc"));
    }
}
