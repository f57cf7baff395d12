//! kubemail SMTP node: receives mail on the MX, submission and implicit-TLS ports and puts
//! every accepted message durably into NATS JetStream before answering `250`.
//!
//! The crate is laid out by responsibility (the folder tree is the architecture):
//! * [`config`]: the node configuration type, shared with the operator (which renders it);
//! * [`protocol`]: the sans-IO SMTP wire syntax (commands, replies, DATA/BDAT framing);
//! * [`session`]: the per-connection state machine, one file per verb;
//! * [`server`]: listeners, accept loops, connection caps, PROXY protocol, implicit TLS;
//! * [`tls`]: rustls configuration with certificate reload;
//! * [`auth`]: submission users, login throttling, sender and rate policy;
//! * [`queue`]: the queue contract and its JetStream implementation;
//! * [`node`]: start-up and shutdown of the whole node;
//! * [`admin`], [`metrics`], [`telemetry`], [`shutdown`]: operations.

pub mod admin;
pub mod auth;
pub mod config;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod queue;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
