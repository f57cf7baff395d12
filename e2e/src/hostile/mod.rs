//! The hostile-input suite: what the internet will throw at an SMTP node, as tests that run
//! in CI (short) and on demand (`make hostile`, `make fuzz`: long). `e2e/hostile/README.md`
//! lists the cases and every finding with its fix.
//!
//! * [`fuzz`]: fuzz targets for every parser that takes untrusted bytes, and their bounded
//!   stable-Rust runs (the libFuzzer crate `smtp-node/fuzz` runs the same targets long);
//! * [`report`]: what each case sent and got, printed as it happens;
//! * [`process`], [`nats`], [`node`], [`peers`]: the real parts (nats-server clusters, the
//!   `smtp-node` binary, Knot DNS, Postfix's smtp-sink, scripted remote MX hosts and a
//!   scripted LMTP mail store), started on loopback and stopped on drop;
//! * [`smtp`]: a raw SMTP client that records the dialogue.
//!
//! Every load loop is bounded in count and time, and everything talks to 127.0.0.0/8 only.
//! `HOSTILE_LONG=1` makes the cases use their long-run sizes ([`long_run`]).

pub mod fuzz;
pub mod nats;
pub mod node;
pub mod peers;
pub mod process;
pub mod report;
pub mod smtp;

/// Whether the long versions of the cases run (`make hostile` sets `HOSTILE_LONG=1`).
pub fn long_run() -> bool {
    std::env::var_os("HOSTILE_LONG").is_some_and(|v| v != "0" && !v.is_empty())
}

/// `short` in CI, `long` under `HOSTILE_LONG=1`.
pub fn scale<T>(short: T, long: T) -> T {
    if long_run() { long } else { short }
}

/// A multi-threaded tokio runtime for a case's async parts (the setup and the fault
/// schedule stay on the test thread, where blocking is fine).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The `Subject:` tokens of queue entries or dumps that contain `prefix`, one per entry.
pub fn subject_tokens<'a>(texts: impl IntoIterator<Item = &'a str>, prefix: &str) -> Vec<String> {
    texts
        .into_iter()
        .filter_map(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .filter(|s| s.starts_with(prefix))
                .map(|s| s.trim().to_owned())
        })
        .collect()
}
