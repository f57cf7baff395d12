//! Event sinks: where a MailDomain's delivery events go beyond the events stream.
//!
//! **Who dispatches.** The operator, not the nodes: a sink's HMAC key is a Secret the
//! operator reads anyway (nodes would need it in their config), the sink's health belongs in
//! the `EventSink` status the operator writes, ordered delivery needs exactly one sender per
//! sink (the operator's leader election gives that; every node of a domain would compete),
//! and mail nodes make no HTTP calls to tenant URLs. The nodes only publish to the stream
//! (at least once, before acknowledging the queue entry); a sink that is down, or an
//! operator that restarts, loses nothing the stream still holds.
//!
//! * [`dispatcher`]: one durable consumer per webhook sink, ordered, retried with backoff,
//!   paused on `410 Gone`;
//! * [`signature`]: the `Kubemail-Signature` header a receiver verifies.

pub mod dispatcher;
pub mod signature;
