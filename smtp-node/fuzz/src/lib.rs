//! The fuzz targets of the SMTP node. The functions live in the e2e crate (one definition,
//! also run briefly by `cargo test`); this crate compiles the same file for libFuzzer.

#[path = "../../../e2e/src/hostile/fuzz/targets.rs"]
mod targets;

pub use targets::*;
