//! The queue contract of kubemail: what an accepted message looks like in the durable queue,
//! written by the SMTP session and by the delivery workers, read by the delivery workers, and
//! named alike by the node and the operator. This crate doc is the one description of it;
//! [`QueueEntry`] is its one codec and [`names`] derives every name from it.
//!
//! # Stream
//! One JetStream stream (`nats.stream`, default [`DEFAULT_STREAM`]) with file storage,
//! work-queue retention, `discard: new` (a full stream refuses new mail, which the client sees
//! as `452 4.3.1`, instead of silently dropping queued mail), no `max_age` (mail never expires
//! inside NATS; the 5-day lifetime is the delivery side's business), a duplicate window
//! for `Nats-Msg-Id`, atomic batch publishes allowed (`allow_atomic`, nats-server 2.12+: a
//! node writes the entries of many transactions as one batch, all or none, synced once), and
//! `nats.replicas` replicas. Whoever manages the JetStream objects creates and checks it: the
//! operator when NATS is authenticated (the nodes' credentials may not create streams, see
//! [`permissions`]), else the node (`kubemail_smtp_node::queue::stream`, `nats.manageStreams`).
//!
//! # Subjects
//! [`subject`]: `<nats.subjectPrefix>.<lower-cased domain>` (default
//! `kubemail.queue.example.com`), one per MailDomain, so each MailDomain's durable consumer
//! filters exactly its own subject. Valid domain names are lower case already; both sides
//! lower-case anyway, so an entry can never land on a subject no consumer reads.
//! * *outbound* (authenticated submission on 587/465): the authenticated user's domain, which
//!   is also the sender's domain (a user may only send as its own domain). One entry carries
//!   every recipient; local recipients among them are routed inbound by the worker;
//! * *inbound* (the MX port, unauthenticated, local recipients only): the recipient's domain.
//!   A transaction with recipients in several local domains becomes one entry per domain, each
//!   with that domain's recipients; all of them are acknowledged before the `250`.
//!
//! # Entry
//! The payload is the message as received (with our `Received` header, and a `Message-ID`
//! added on submission when missing), CRLF line endings, no dot-stuffing. The NATS headers
//! (names in [`headers`]) carry the envelope:
//! * always: `Kubemail-Queue-Id`, `Kubemail-Mail-From` (`<>` for the null sender, else
//!   `<addr>`), `Kubemail-Rcpt-To` (one JSON array of the recipient addresses, e.g.
//!   `["bob@example.com","carol@example.com"]`: repeated NATS headers are collapsed by some
//!   client code paths, and JSON is unambiguous for any address, quoted local parts
//!   included), `Kubemail-Direction` (`inbound`/`outbound`), `Kubemail-Domain` (lower case),
//!   `Kubemail-Accepted-At` (RFC 3339, UTC, see [`rfc3339`]) and `Nats-Msg-Id`;
//! * when present: `Kubemail-Message-Id`, `traceparent` (W3C trace context of the accepting
//!   `smtp.transaction` span, the parent of every delivery attempt; kept unchanged by
//!   retries, while a DSN entry carries the failing attempt's context), `Kubemail-Auth-User`,
//!   `Kubemail-Client-Ip`, `Kubemail-Helo`, `Kubemail-Body-Type` (`8BITMIME`),
//!   `Kubemail-Smtputf8` (`true`), `Kubemail-Dsn-Envid`, `Kubemail-Dsn-Ret`,
//!   `Kubemail-Body-Ref`, `Kubemail-Body-Size` (octets of the body, inline or stored),
//!   `Kubemail-Require-Tls` (`true`: REQUIRETLS, RFC 8689), `Kubemail-Tls-Optional` (`true`:
//!   the message says `TLS-Required: No` and carries no REQUIRETLS), `Kubemail-Sender-Auth`
//!   (inbound mail: `spf`, `dkim`, `spf,dkim` or `none`, how the envelope sender was
//!   authenticated at acceptance; [`SenderAuth`]: only a sender that passed gets a DSN).
//!
//! An optional header is written only when its value is present and not empty, and read back
//! as absent when it is missing or empty. Values never contain control characters (they would
//! break the NATS framing: the writer replaces them with `?`) nor surrounding white space
//! (the NATS wire format drops it). Unknown headers are ignored, so a newer writer may add
//! some.
//!
//! # Large bodies
//! NATS refuses messages above the server's `max_payload` (1 MiB by default). A body larger
//! than `nats.inlineBodyLimit` (or than `max_payload` minus 64 KiB of header room) is first
//! stored in the domain's JetStream object store bucket [`body_bucket`] (`nats.bodyBucket`,
//! default [`DEFAULT_BODY_BUCKET`], a `-` and the encoded domain) under [`QueueEntry::body_object_name`] (`<queue id>.<domain>`);
//! the queue entry then has `Kubemail-Body-Ref: <bucket>/<object name>` ([`body_ref`]), and
//! the message is the entry's payload followed by the object. The payload is empty when the
//! body was stored whole at the end of data. When the body was stored while it arrived, the
//! payload is the header section (with the fields the node added), the object the body after
//! it, and the reference is `<bucket>+head/<object name>` ([`body_ref_after_head`]): a node of
//! an earlier release cannot open that bucket and defers the entry rather than deliver the
//! object alone. [`split_body_ref`] reads both forms. `Kubemail-Body-Size` is the size of the
//! whole message either way. The object is
//! written (and acknowledged) before the entry, so an entry never refers to a missing body. The delivery side deletes the object after the last
//! recipient is done. Once its entry is stored, the node marks the object (its description
//! says a stored entry refers to it); an unmarked object that is more than an hour old and
//! that no entry refers to (its entry was never stored) is deleted by the node's sweeper.
//!
//! # Delivery state
//! Each MailDomain has one durable pull consumer, [`consumer_name`], filtered on its
//! subject, shared by every replica of the domain. Per-recipient state lives in the entry
//! itself: after an attempt, recipients that were delivered or failed are done; the others
//! are *republished* as a new entry that carries only them, the same queue id, acceptance
//! time and body (or body reference), and these headers:
//! * `Kubemail-Attempts`: attempts made so far (absent: none);
//! * `Kubemail-Not-Before`: RFC 3339 time of the next attempt (an entry pulled earlier is
//!   nak'd with the remaining delay);
//! * `Kubemail-Last-Error`: the last temporary error, for logs;
//! * `Kubemail-Delay-Warned` (`true`): a "delayed" DSN was sent already;
//! * `Kubemail-Suspended`: whole seconds the entry spent held or waiting for a pause, added
//!   to its lifetime ([`QueueEntry::expires_at`]);
//! * `Kubemail-Paused-By`: the pause ([`pause::Pause::key`]) the entry waits for;
//! * `Kubemail-Attempt-Log`: the last [`MAX_ATTEMPT_LOG`] attempts that deferred it, JSON
//!   `[{"at": "<RFC 3339>", "reply": "<text>"}]`, for `queue show`.
//!
//! Only then is the old entry acked (publish-then-ack: a crash in between can repeat an
//! attempt, never lose a recipient). A recipient that got the message is never in a later
//! entry, so it is never sent again by a retry; the remaining duplicate window is a crash
//! between the remote `250` and the ack.
//!
//! # Operators' actions (`kubectl kubemail queue ...`)
//! An action never changes an entry in place: it publishes the replacement, then deletes the
//! old message with the stream's message delete API (publish-then-delete, like a retry:
//! a crash in between leaves a duplicate entry, never a lost one). The replacement's
//! `Nats-Msg-Id` is [`QueueEntry::action_msg_id`].
//! * *retry*: the same entry without `Kubemail-Not-Before`, deliverable at once;
//! * *hold*: the entry moves to [`held_subject`] (`<prefix>._held.<domain>`), which no
//!   consumer reads, with `Kubemail-Held-At` and `Kubemail-Hold-Reason`;
//! * *release*: back to the queue subject, deliverable at once, the time held added to
//!   `Kubemail-Suspended`;
//! * *delete with a notice*: the entry with `Kubemail-Cancel: bounce`, deliverable at once;
//!   the next worker bounces every recipient (one DSN, `Nats-Msg-Id`
//!   `<entry id>.cancel<attempts>`) instead of attempting delivery;
//! * *delete silently*: the message and its body object are deleted.
//!
//! An action marks the entry it replaces in [`REPLACED_BUCKET`] ([`replaced_key`]) between
//! the publish and the delete. A worker that attempted that entry meanwhile finds the mark
//! before it republishes the recipients left, sets it to `yielded` and does not republish:
//! the operator's replacement is the entry from then on (the recipients of that attempt may
//! get the message again). When the delete then finds the entry gone, the action keeps its
//! replacement if the mark says `yielded`, and takes it back otherwise (a worker finished
//! the entry first).
//!
//! # Pauses and shaping
//! Delivery pauses are in the KV bucket [`PAUSES_BUCKET`] ([`pause`]). An entry whose
//! recipients are paused is not attempted: it is republished unchanged but for
//! `Kubemail-Paused-By`, a `Kubemail-Not-Before` at the next check and the time added to
//! `Kubemail-Suspended` (no attempt counted, no bounce). Per-destination connection leases
//! and rate state are in [`SHAPING_LEASES_BUCKET`] and [`SHAPING_BUCKET`].
//!
//! # Message ids
//! `Nats-Msg-Id` makes a repeated publish (a retry after a lost acknowledgement) a no-op:
//! * a new entry: `c<digest>.<domain>`, or `c<digest>-<n>.<domain>` for the n-th repeat,
//!   where the digest (128 bits of SHA-256, in hex) covers what the client sent: the
//!   authenticated user, the reverse path, the MAIL parameters that reach the entry, the
//!   message as received, and the entry's domain and recipients; `n` counts how often the
//!   accepting node answered `250` to that content within the duplicate window. A client that
//!   retries a transaction it was told failed (`451`) although the stream had stored it sends
//!   the same octets again, gets the same id, and the second entry is dropped; a message sent
//!   again after its `250` is a new one. Entries written by earlier nodes used
//!   `<queue id>.<domain>`;
//! * a retry: `<queue id>.<domain>.a<attempts>` ([`QueueEntry::entry_id`] is `<queue id>.<domain>`;
//!   [`QueueEntry::msg_id`] gives the retry id, or the entry id for no attempt);
//! * bounces and delay notices are ordinary outbound entries with the null sender `<>` on
//!   the same subject and a queue id of their own; their id derives from the entry they
//!   report on, `<queue id>.<domain>.bounce<attempts>` / `.delay<attempts>`
//!   ([`QueueEntry::notice_msg_id`]), so the same report is queued once.

pub mod credentials;
pub mod events;
pub mod headers;
pub mod names;
pub mod pause;
pub mod permissions;
pub mod streams;
pub mod suppression;
pub mod sweep;

mod entry;
mod rfc3339;

pub use entry::{
    Action, AdminState, AttemptRecord, Direction, EntryError, MAX_ATTEMPT_LOG, Notice, QueueEntry,
    QueueId, SenderAuth, StaticNames, entry_id,
};
pub use names::{
    AFTER_HEAD_MARK, DEFAULT_BODY_BUCKET, DEFAULT_STREAM, DEFAULT_SUBJECT_PREFIX,
    MTA_STS_CACHE_BUCKET, PAUSES_BUCKET, REPLACED_BUCKET, SHAPING_BUCKET, SHAPING_LEASE_TIME,
    SHAPING_LEASES_BUCKET, TLSRPT_CLAIMS_BUCKET, TLSRPT_STREAM, auth_failure_stream,
    auth_failure_subject_prefix, auth_failure_subjects, body_bucket, body_ref, body_ref_after_head,
    consumer_name, domain_token, held_subject, inbox_prefix, is_held_subject, is_legacy_consumer,
    legacy_consumer_name, pause_key, pool_inbox_prefix, replaced_key, split_body_ref, subject,
    tlsrpt_claim_key, tlsrpt_day_filter, tlsrpt_subject,
};
pub use permissions::{Permissions, QueueNames, node_permissions, node_permissions_with_inbox};
pub use rfc3339::{parse_rfc3339, rfc3339};
