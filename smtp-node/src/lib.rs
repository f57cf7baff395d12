//! kubemail SMTP node: receives mail on the MX, submission and implicit-TLS ports, puts every
//! accepted message durably into NATS JetStream before answering `250`, and delivers it from
//! there to inbound targets, relays and remote MX hosts.
//!
//! The crate is laid out by responsibility (the folder tree is the architecture):
//! * [`config`]: the node configuration, the `kubemail-config` crate shared with the operator
//!   (which renders it);
//! * [`protocol`]: the sans-IO SMTP wire syntax of both directions, the crate
//!   `kubemail-smtp-protocol` (commands, replies, DATA/BDAT framing; the client's reply and
//!   capability parsing and command and DATA encoding);
//! * [`session`]: the per-connection state machine, one file per verb;
//! * [`server`]: listeners, accept loops, PROXY protocol, implicit TLS; it hands each
//!   connection to a session;
//! * [`context`]: what every session shares (config generation, queue, checks, budgets), a
//!   leaf below both [`server`] and [`session`]; [`connection`]: one connection's addresses,
//!   the connection caps and the read-ahead stream;
//! * [`tls`]: rustls configuration with certificate reload and per-domain certificates by SNI;
//! * [`auth`]: submission users, login throttling, sender and rate policy; [`auth_limits`]:
//!   the cluster-wide per-user limit on failed logins;
//! * [`queue`]: the queue contract and its JetStream implementation;
//! * [`delivery`]: the sending side: workers, routing, MX, the SMTP client, retries, DSNs,
//!   bounce classification;
//! * [`events`]: delivery events (CloudEvents on their own stream) and inbound DSNs and
//!   feedback reports; [`suppression`]: the domains' suppression lists;
//! * [`message`]: the message header helpers both sides use (header lookup, the header
//!   section, the hop count; the Received, Message-ID and Date builders);
//! * [`dkim`]: DKIM signing at acceptance; [`authres`]: SPF/DKIM/DMARC of inbound mail;
//!   [`recipient_check`]: RCPT-time recipient probes of catch-all domains' inbound targets;
//! * [`dns`]: the resolver seam (hickory-resolver and a zone-text test double), with the
//!   DNSSEC status DANE needs;
//! * [`memory`]: the node-wide budget of message bytes in memory;
//! * [`mta_sts_server`]: the HTTPS listener serving our own domains' MTA-STS policies;
//! * [`node`]: start-up and shutdown of the whole node; [`reload`]: swapping in a changed
//!   config file's domains without a restart; [`clock`]: the wall clock as a seam;
//! * [`admin`], [`metrics`], [`telemetry`] (the `kubemail-telemetry` crate), [`shutdown`]:
//!   operations.

pub mod admin;
pub mod auth;
pub mod auth_limits;
pub mod authres;
pub mod backoff;
pub mod clock;
pub mod connection;
pub mod context;
pub mod delivery;
pub mod dkim;
pub mod dns;
pub mod events;
pub mod memory;
pub mod message;
pub mod metrics;
pub mod mta_sts_server;
pub mod node;
pub mod queue;
pub mod recipient_check;
pub mod reload;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod suppression;
pub mod tls;

// The configuration, the telemetry set-up and the wire format are crates of their own (the
// operator uses them too); these keep their old module paths, so `crate::config::…` and the
// benches, e2e harnesses and fuzz crate (`kubemail_smtp_node::protocol::…`) keep working.
pub use kubemail_config as config;
pub use kubemail_smtp_protocol as protocol;
pub use kubemail_telemetry as telemetry;
