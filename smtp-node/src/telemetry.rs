//! Log output: `tracing` events as JSON lines when `LOG_FORMAT=json` (what a log pipeline
//! wants), otherwise human-readable. The level filter comes from `RUST_LOG` (default `info`).
//! OpenTelemetry export is not wired here yet; the queue carries a W3C `traceparent` per
//! message so traces can be joined once it is.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// Environment variable choosing the log format.
pub const LOG_FORMAT_ENV: &str = "LOG_FORMAT";

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var(LOG_FORMAT_ENV).is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_span_events(FmtSpan::NONE);
    // A second init (tests) is harmless: the first subscriber stays.
    if json {
        let _ = builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init();
    } else {
        let _ = builder.try_init();
    }
}
