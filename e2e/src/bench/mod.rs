//! Benchmarks of kubemail against the MTA people run today (Postfix), on the same machine in
//! the same run (`make bench`).
//!
//! * [`loadgen`]: the SMTP load generator (tokio): N sessions, M messages of size S, plain,
//!   STARTTLS or implicit TLS, optional AUTH, a fixed offered rate or open throttle, per-message
//!   latency in HDR histograms, bounded in count and time, loopback only. It also opens and
//!   holds idle connections ([`loadgen::idle`]);
//! * [`tls`]: the ECDSA test certificates both servers use and the client's TLS settings;
//! * [`procstat`]: CPU time and memory of the server processes, from `/proc`;
//! * [`syncs`]: fsyncs per message, counted by `perf stat` on the syscall tracepoints;
//! * [`cgroups`]: CPU cgroups of equal weight for the generator, the servers and the busy
//!   neighbours, for the loaded run that shares CPUs the way a Kubernetes node does;
//! * [`peers`]: starting and stopping the systems under test and their helpers (nats-server,
//!   smtp-node, a private Postfix instance, smtp-sink), each in its own directory on free
//!   loopback ports;
//! * [`scenario`]: what each benchmark does to one system and what it measures;
//! * [`runner`]: the whole run: preflight, alternating repetitions, medians;
//! * [`report`]: `BENCHMARKS.md` and `bench-results.json`.

pub mod cgroups;
pub mod loadgen;
pub mod peers;
pub mod procstat;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod syncs;
pub mod tls;
