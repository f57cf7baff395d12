//! The queue contract: what an accepted message looks like when it is handed to the durable
//! queue, and the [`Queue`] seam the session calls before it may answer `250`.
//!
//! # Contract (read by the delivery workers)
//!
//! **Stream.** One JetStream stream (`nats.stream`, default `KUBEMAIL`) with file storage,
//! work-queue retention, `discard: new` (a full stream refuses new mail, which the client sees
//! as `452 4.3.1`, instead of silently dropping queued mail), no `max_age` (mail never expires
//! inside NATS; the 5-day lifetime is the delivery side's business) and a duplicate window
//! for `Nats-Msg-Id`. See [`stream`].
//!
//! **Subjects.** `<nats.subjectPrefix>.<domain>` (default `kubemail.queue.example.com`), one per
//! MailDomain, so each MailDomain's durable consumer filters exactly its own subject:
//! * *outbound* (authenticated submission on 587/465): the authenticated user's domain, which
//!   is also the sender's domain (a user may only send as its own domain). One entry carries
//!   every recipient; local recipients among them are routed inbound by the worker;
//! * *inbound* (the MX port, unauthenticated, local recipients only): the recipient's domain.
//!   A transaction with recipients in several local domains becomes one entry per domain, each
//!   with that domain's recipients; all of them are acknowledged before the `250`.
//!
//! **Entry.** The payload is the message as received (with our `Received` header, and a
//! `Message-ID` added on submission when missing), CRLF line endings, no dot-stuffing. The
//! NATS headers (names in [`headers`]) carry the envelope: `Kubemail-Mail-From` (`<>` for the
//! null sender, else `<addr>`), `Kubemail-Rcpt-To` (a JSON array of the recipient addresses,
//! e.g. `["bob@example.com","carol@example.com"]`),
//! `Kubemail-Direction` (`inbound`/`outbound`), `Kubemail-Domain`, `Kubemail-Queue-Id`,
//! `Kubemail-Accepted-At` (RFC 3339, UTC), `Kubemail-Message-Id`, `traceparent` (W3C trace
//! context of the accepting `smtp.transaction` span, the parent of every delivery attempt;
//! kept unchanged by retries, while a DSN entry carries the failing attempt's context),
//! optional `Kubemail-Auth-User`, `Kubemail-Client-Ip`, `Kubemail-Helo`, `Kubemail-Body-Type`
//! (`8BITMIME`), `Kubemail-Smtputf8`, `Kubemail-Dsn-Envid`, `Kubemail-Dsn-Ret`, and
//! `Nats-Msg-Id` = `<queue id>.<domain>` so a repeated publish is dropped by the server.
//!
//! **Large bodies.** NATS refuses messages above the server's `max_payload` (1 MiB by
//! default). A body larger than `nats.inlineBodyLimit` (or than `max_payload` minus 64 KiB of
//! header room) is first stored in the JetStream object store bucket `nats.bodyBucket`
//! (default `KUBEMAIL_BODIES`) under the name `<queue id>.<domain>`; the queue entry then has
//! an empty payload, `Kubemail-Body-Ref: <bucket>/<object name>` and `Kubemail-Body-Size`.
//! The object is written (and acknowledged) before the entry, so an entry never refers to a
//! missing body. The delivery side deletes the object after the last recipient is done.
//!
//! **Delivery state** (written by [`crate::delivery`], see `delivery::entry`). Each MailDomain
//! has one durable pull consumer, `kubemail-<domain with dots as dashes>`, filtered on its
//! subject. After an attempt the recipients still to deliver are republished as a new entry
//! with the same queue id, acceptance time and body (or body reference), plus
//! `Kubemail-Attempts`, `Kubemail-Not-Before` (RFC 3339), `Kubemail-Last-Error` and
//! `Kubemail-Delay-Warned`, and `Nats-Msg-Id` = `<queue id>.<domain>.a<attempts>`; then the
//! old entry is acked. Bounces and delay notices are ordinary outbound entries with the null
//! sender `<>` on the same subject (`Nats-Msg-Id` `<entry id>.bounce<n>` / `.delay<n>`).

pub mod jetstream;
pub mod memory;
pub mod sampler;
pub mod setup;
pub mod stream;

use std::fmt;
use std::net::IpAddr;
use std::time::SystemTime;

use bytes::Bytes;
use futures::future::BoxFuture;

/// Names of the NATS headers of a queue entry.
pub mod headers {
    pub const QUEUE_ID: &str = "Kubemail-Queue-Id";
    pub const MAIL_FROM: &str = "Kubemail-Mail-From";
    pub const RCPT_TO: &str = "Kubemail-Rcpt-To";
    pub const DIRECTION: &str = "Kubemail-Direction";
    pub const DOMAIN: &str = "Kubemail-Domain";
    pub const ACCEPTED_AT: &str = "Kubemail-Accepted-At";
    pub const MESSAGE_ID: &str = "Kubemail-Message-Id";
    pub const TRACEPARENT: &str = "traceparent";
    pub const AUTH_USER: &str = "Kubemail-Auth-User";
    pub const CLIENT_IP: &str = "Kubemail-Client-Ip";
    pub const HELO: &str = "Kubemail-Helo";
    pub const BODY_TYPE: &str = "Kubemail-Body-Type";
    pub const SMTPUTF8: &str = "Kubemail-Smtputf8";
    pub const DSN_ENVID: &str = "Kubemail-Dsn-Envid";
    pub const DSN_RET: &str = "Kubemail-Dsn-Ret";
    pub const BODY_REF: &str = "Kubemail-Body-Ref";
    pub const BODY_SIZE: &str = "Kubemail-Body-Size";
    pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
}

/// Identifies one accepted message (a UUIDv7, so ids sort by acceptance time).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QueueId(String);

impl QueueId {
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7().simple().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for QueueId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which way a message goes; decides what the delivery worker does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// For local recipients, received on the MX port.
    Inbound,
    /// Submitted by an authenticated user; to be delivered to the recipients' MX or a relay.
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// The envelope of one queue entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub queue_id: QueueId,
    /// Reverse path without brackets; empty for the null sender `<>`.
    pub mail_from: String,
    /// Forward paths without brackets.
    pub recipients: Vec<String>,
    /// The MailDomain whose subject carries this entry.
    pub domain: String,
    pub direction: Direction,
    pub accepted_at: SystemTime,
    /// The `Message-ID` header value, if the message has one.
    pub message_id: Option<String>,
    /// W3C trace context of the transaction's span (see [`crate::telemetry`]).
    pub traceparent: Option<String>,
    pub auth_user: Option<String>,
    pub client_ip: IpAddr,
    pub helo: String,
    /// `BODY=8BITMIME` was given.
    pub eight_bit: bool,
    /// `SMTPUTF8` was given.
    pub smtputf8: bool,
    /// DSN `ENVID` (xtext as received).
    pub dsn_envid: Option<String>,
    /// DSN `RET` (`FULL` or `HDRS`).
    pub dsn_ret: Option<String>,
}

impl Envelope {
    /// The `Nats-Msg-Id` / object name of this entry.
    pub fn entry_id(&self) -> String {
        format!("{}.{}", self.queue_id, self.domain)
    }
}

/// One queue entry: envelope and message bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub envelope: Envelope,
    pub body: Bytes,
}

/// Why a message could not be queued. Each maps to the SMTP reply the client gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    /// Not connected, timed out, or any other transient failure: `451 4.3.0`.
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    /// The stream or object store is full: `452 4.3.1`.
    #[error("queue full: {0}")]
    Full(String),
}

/// The durable queue as the SMTP session sees it. Success means every entry is acknowledged
/// by the queue and may be confirmed to the client with `250`.
pub trait Queue: Send + Sync + 'static {
    /// Queues all entries of one transaction (one per destination domain).
    fn enqueue(&self, entries: Vec<QueuedMessage>) -> BoxFuture<'_, Result<(), EnqueueError>>;

    /// Whether the queue is reachable and set up (for `/readyz`).
    fn is_ready(&self) -> bool;
}

/// Formats a time as RFC 3339 in UTC (`2026-11-27T23:59:01Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}
