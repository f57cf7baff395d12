//! Helpers shared by the test harnesses of every kubemail crate. It depends on nothing of
//! kubemail, so `smtp-node`'s integration tests can use it without a dependency cycle through
//! the `e2e` crate.

pub mod knot;
pub mod module_graph;
pub mod nats;
pub mod ports;
pub mod scripted_sink;
pub mod smtp_sink;
pub mod wait;
