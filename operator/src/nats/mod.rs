//! kubemail's queue tier security: NATS decentralized JWT authentication with least privilege.
//!
//! * [`jwt`]: the operator, account and user JWTs (our own small encoder, checked against a
//!   real nats-server);
//! * [`trust`]: the trust chain (operator, system account, kubemail account with a signing
//!   key) that the operator makes for the bundled NATS, and the account keys it mints with;
//! * [`credentials`]: per-domain (per set of nodes) user credentials with the permissions of
//!   the queue contract, finite expiry and renewal at half-life;
//! * [`jetstream`]: the operator's own connection (TLS, a user minted per connection) and the
//!   JetStream objects it manages because the nodes may not;
//! * [`domain`]: the NATS step of a MailDomain's reconcile (objects, credentials Secret,
//!   NetworkPolicy); [`network_policy`]: the NetworkPolicy of the domain's pods;
//! * [`sweep`]: the sweep of body objects no queue entry refers to, which the nodes' own
//!   credentials cannot do;
//! * [`tools`]: `kubemail-operator nats-trust`, the administrator's part for a NATS outside
//!   the chart;
//! * [`settings`]: the operator's NATS flags, how to reach NATS, and the bootstrap of the
//!   bundled NATS (trust chain and server certificate in Secrets).

pub mod credentials;
pub mod domain;
pub mod jetstream;
pub mod jwt;
pub mod network_policy;
pub mod settings;
pub mod sweep;
pub mod tools;
pub mod trust;

pub use credentials::{Minted, node_credentials};
pub use jetstream::{ManageError, NatsAccess};
pub use settings::{Bootstrap, NatsSettings, NetworkPolicySettings, access};
pub use trust::{AccountKeys, Trust};
