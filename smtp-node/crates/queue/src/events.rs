//! Delivery events: what happened to every message and recipient, as CloudEvents 1.0 JSON
//! (structured mode), on a JetStream stream of their own.
//!
//! # Stream
//! [`EVENTS_STREAM`] (`KUBEMAIL_EVENTS`), file storage, limits retention with `max_age` and
//! `max_bytes` from the node config (`events.maxAge`, `events.maxBytes`; the oldest events go
//! first), a duplicate window for `Nats-Msg-Id` (the event's `id`). Subjects:
//! [`event_subject`] = `kubemail.events.<domain token>.<type>` (the *sending* domain for
//! outbound mail, the recipient domain for inbound mail; [`domain_token`]), so a consumer
//! can take one domain ([`events_domain_filter`]) or one type of every domain
//! (`kubemail.events.*.bounced`).
//!
//! **Credentials** ([`crate::permissions`]). A node of domain `d` publishes on
//! `kubemail.events.<d token>.>` and reads the stream's info; it never creates the stream
//! when the operator manages the JetStream objects ([`crate::streams::events_stream_config`],
//! made by the operator with the default limits and `nats.replicas`). The operator's event
//! sink dispatcher creates one durable consumer per sink and acknowledges what it delivered.
//!
//! # Guarantee
//! At least once: the delivery worker publishes an attempt's events and waits (at most
//! `events.publishTimeout`) for the stream's acknowledgement *before* it acknowledges the
//! queue entry, so a crash of a node in between repeats the events rather than losing them.
//! With one replica the stream is written asynchronously
//! ([`crate::streams::events_stream_config`]): the server acknowledges an event before it
//! has written it, so a crash of the NATS server itself can lose the events of its last
//! moments (the queue stream, and so the mail, syncs every write as before). A repeated
//! event has the same `id` (derived from the queue id, the attempt, the type and the
//! recipient), so the stream drops repeats inside its duplicate window and a receiver can
//! drop the rest. An event whose publish is not confirmed in time is counted as dropped and
//! never holds up mail.
//!
//! # Event
//! `specversion` `1.0`, `id` (see above), `source` `/kubemail/<node host name>`, `type`
//! `io.kubemail.delivery.<type>` ([`EventType`]), `subject` the recipient address, `time`
//! (RFC 3339), `datacontenttype` `application/json`, `data` an [`EventData`]. Nothing secret
//! goes into an event: no body, no password, no AUTH data, no credentials.

use serde::{Deserialize, Serialize};

pub use kubemail_config::BounceClass;

use crate::names::domain_token;

/// The JetStream stream of delivery events.
pub const EVENTS_STREAM: &str = "KUBEMAIL_EVENTS";
/// Every subject of the events stream.
pub const EVENTS_SUBJECTS: &str = "kubemail.events.>";
/// The CloudEvents `type` prefix.
pub const TYPE_PREFIX: &str = "io.kubemail.delivery.";

/// The subject of an event of `domain`.
pub fn event_subject(domain: &str, kind: EventType) -> String {
    format!("kubemail.events.{}.{}", domain_token(domain), kind.as_str())
}

/// Every event of `domain`.
pub fn events_domain_filter(domain: &str) -> String {
    format!("kubemail.events.{}.>", domain_token(domain))
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// The message was accepted into the queue (one event per recipient).
    Received,
    /// The remote server accepted the recipient.
    Delivered,
    /// A temporary failure; another attempt follows.
    Deferred,
    /// A permanent failure, or a DSN (RFC 3464) that arrived for a message we sent.
    Bounced,
    /// The recipient's queue lifetime ran out.
    Expired,
    /// The recipient is on the domain's suppression list and was not attempted.
    Suppressed,
    /// A complaint (RFC 5965 feedback report) arrived for a message we sent.
    Complaint,
    /// We queued a DSN (a bounce or a delay notice) to the sender.
    DsnSent,
    /// A person or tool changed the queued message (`kubectl kubemail queue retry`, `hold`,
    /// `release`, `delete`): one event per message, naming the action and who took it.
    QueueAction,
}

impl EventType {
    pub const ALL: [Self; 9] = [
        Self::Received,
        Self::Delivered,
        Self::Deferred,
        Self::Bounced,
        Self::Expired,
        Self::Suppressed,
        Self::Complaint,
        Self::DsnSent,
        Self::QueueAction,
    ];

    /// The subject token and the end of the CloudEvents type.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Received => "received",
            Self::Delivered => "delivered",
            Self::Deferred => "deferred",
            Self::Bounced => "bounced",
            Self::Expired => "expired",
            Self::Suppressed => "suppressed",
            Self::Complaint => "complaint",
            Self::DsnSent => "dsn_sent",
            Self::QueueAction => "queue_action",
        }
    }

    /// The CloudEvents `type`: `io.kubemail.delivery.<type>`.
    pub fn cloudevents_type(self) -> String {
        format!("{TYPE_PREFIX}{}", self.as_str())
    }

    /// The type of a CloudEvents `type` attribute.
    pub fn from_cloudevents_type(value: &str) -> Option<Self> {
        let name = value.strip_prefix(TYPE_PREFIX)?;
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

/// One delivery event in CloudEvents 1.0 structured JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The recipient the event is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub time: String,
    pub datacontenttype: String,
    pub data: EventData,
}

impl CloudEvent {
    /// An event of `kind` from the node `hostname`, at `time`, about `data.recipient`.
    pub fn new(
        kind: EventType,
        hostname: &str,
        time: std::time::SystemTime,
        data: EventData,
    ) -> Self {
        let id = event_id(
            &data.queue_id,
            data.attempt,
            kind,
            data.recipient.as_deref().unwrap_or(""),
        );
        Self {
            specversion: "1.0".to_owned(),
            id,
            source: format!("/kubemail/{hostname}"),
            kind: kind.cloudevents_type(),
            subject: data.recipient.clone(),
            time: crate::rfc3339(time),
            datacontenttype: "application/json".to_owned(),
            data,
        }
    }

    /// The event's type, when it is one of ours.
    pub fn event_type(&self) -> Option<EventType> {
        EventType::from_cloudevents_type(&self.kind)
    }
}

/// A deterministic event id, so a repeated publish of the same event is the same event:
/// `<queue id>-<attempt>-<type>-<first 16 hex digits of SHA-256 of the recipient>`.
pub fn event_id(queue_id: &str, attempt: u32, kind: EventType, recipient: &str) -> String {
    use sha2::{Digest as _, Sha256};
    use std::fmt::Write as _;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(recipient.to_ascii_lowercase().as_bytes());
    let mut id = String::with_capacity(queue_id.len() + 40);
    let _ = write!(id, "{queue_id}-{attempt}-{}-", kind.as_str());
    for b in &digest[..8] {
        id.push(char::from(HEX[usize::from(b >> 4)]));
        id.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    id
}

/// The `data` of a delivery event.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventData {
    /// The MailDomain the event belongs to.
    pub domain: String,
    /// The queue id of the message (for `bounced`/`complaint` from a report: of the original
    /// message the report is about).
    pub queue_id: String,
    /// The message's `Message-ID`, without angle brackets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The W3C trace id of the message's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// `inbound` or `outbound`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    /// The envelope sender (empty for the null sender).
    pub sender: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// The delivery attempt (0 for `received`, 1 for the first attempt).
    pub attempt: u32,
    /// The server that answered, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteInfo>,
    /// The remote reply (`550 5.1.1 ...`) or our own explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// The RFC 3463 status (`5.1.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// What the failure was about (`deferred`, `bounced`, `expired`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounce_class: Option<BounceClass>,
    /// When the next attempt is due (`deferred`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
    /// Why the recipient was suppressed (`suppressed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppression: Option<SuppressionInfo>,
    /// The report a `bounced`/`complaint` event came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ReportInfo>,
    /// The DSN we queued (`dsn_sent`): `failure` or `delay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsn_kind: Option<String>,
    /// What was done to the queued message (`queue_action`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<QueueActionInfo>,
}

/// A change an operator made to a queued message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueActionInfo {
    /// `retry`, `hold`, `release`, `delete` or `delete-with-dsn`.
    pub name: String,
    /// Who did it (for `kubectl kubemail`: the kubeconfig user and context).
    pub actor: String,
    /// The recipients of the entry the action changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    /// Why (a hold's reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The `queue_action` event of `action` on `entry` (stream message `sequence`) by `actor`:
/// one per message, from `/kubemail/queue-admin`, its id unique to the action on that stream
/// message (a repeat of the same publish is dropped as a duplicate, two actions are two
/// events).
pub fn queue_action_event(
    entry: &crate::QueueEntry,
    sequence: u64,
    action: QueueActionInfo,
    time: std::time::SystemTime,
) -> CloudEvent {
    let data = EventData {
        domain: entry.domain.clone(),
        queue_id: entry.queue_id.to_string(),
        message_id: entry.message_id.clone(),
        direction: Some(
            match entry.direction {
                crate::Direction::Inbound => "inbound",
                crate::Direction::Outbound => "outbound",
            }
            .to_owned(),
        ),
        sender: entry.mail_from.clone(),
        attempt: entry.attempts,
        action: Some(action),
        ..Default::default()
    };
    let mut event = CloudEvent::new(EventType::QueueAction, "queue-admin", time, data);
    let name = event.data.action.as_ref().map_or("", |a| a.name.as_str());
    event.id = format!("{}-{sequence}-{}", event.data.queue_id, name);
    event
}

/// The server a delivery talked to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteInfo {
    /// The MX (or relay, or inbound target) host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mx: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// TLS of the connection; absent for plaintext or when no connection was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsDetails>,
}

/// TLS of a delivery connection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsDetails {
    pub version: String,
    pub cipher: String,
    /// Whether the server's certificate was verified.
    pub verified: bool,
}

/// Why a recipient was suppressed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SuppressionInfo {
    pub reason: crate::suppression::SuppressionReason,
    pub since: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_event: Option<String>,
}

/// The inbound report (DSN or ARF) an event came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportInfo {
    /// `dsn` or `arf`.
    pub format: String,
    /// The queue id of the message that carried the report to us.
    pub report_queue_id: String,
    /// ARF `Feedback-Type` (`abuse`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback_type: Option<String>,
    /// DSN `Reporting-MTA` or ARF `Reported-Domain`/`User-Agent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reporter: Option<String>,
    /// DSN `Action` (`failed`, `delayed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn subjects_types_and_ids() {
        assert_eq!(
            event_subject("Mail.Example.com", EventType::DsnSent),
            "kubemail.events.mail_example_com.dsn_sent"
        );
        assert_eq!(
            events_domain_filter("example.com"),
            "kubemail.events.example_com.>"
        );
        for t in EventType::ALL {
            assert_eq!(
                EventType::from_cloudevents_type(&t.cloudevents_type()),
                Some(t)
            );
        }
        let a = event_id("q1", 1, EventType::Bounced, "Bob@x.test");
        // The first 16 hex digits of SHA-256("bob@x.test"): ids stay what earlier releases
        // made, so a repeated publish is still dropped as a duplicate.
        assert_eq!(a, "q1-1-bounced-eb53bd94c884ca5e");
        assert_eq!(a, event_id("q1", 1, EventType::Bounced, "bob@x.test"));
        assert_ne!(a, event_id("q1", 2, EventType::Bounced, "bob@x.test"));
        assert_ne!(a, event_id("q1", 1, EventType::Bounced, "carol@x.test"));
    }

    #[test]
    fn event_json_is_structured_mode() {
        let e = CloudEvent::new(
            EventType::Bounced,
            "mx.example.test",
            std::time::SystemTime::UNIX_EPOCH,
            EventData {
                domain: "example.test".into(),
                queue_id: "q1".into(),
                recipient: Some("bob@x.test".into()),
                bounce_class: Some(BounceClass::InvalidRecipient),
                ..EventData::default()
            },
        );
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], "io.kubemail.delivery.bounced");
        assert_eq!(v["subject"], "bob@x.test");
        assert_eq!(v["data"]["bounceClass"], "invalid-recipient");
        let back: CloudEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }
}
