//! A queue entry as the delivery side reads and writes it: the envelope headers of the queue
//! contract ([`crate::queue`]) plus the per-recipient delivery state.
//!
//! **Per-recipient state lives in the entry itself.** After an attempt, recipients that were
//! delivered or failed are done; the others are *republished* as a new entry that carries
//! only them, the same queue id and acceptance time, and these extra headers:
//!
//! * `Kubemail-Attempts`: attempts made so far;
//! * `Kubemail-Not-Before`: RFC 3339 time of the next attempt (an entry pulled earlier is
//!   nak'd with the remaining delay);
//! * `Kubemail-Last-Error`: the last temporary error, for logs;
//! * `Kubemail-Delay-Warned`: a "delayed" DSN was sent already.
//!
//! The republished entry's `Nats-Msg-Id` is `<queue id>.<domain>.a<attempts>`, so publishing
//! it twice (a retry after a lost PubAck) stores it once. Only then is the old entry acked
//! (publish-then-ack: a crash in between can repeat an attempt, never lose a recipient). A
//! recipient that got the message is never in a later entry, so it is never sent again by a
//! retry; the remaining duplicate window is a crash between the remote `250` and the ack.

use std::net::IpAddr;
use std::time::SystemTime;

use async_nats::HeaderMap;
use time::format_description::well_known::Rfc3339;

use crate::queue::{Direction, headers, rfc3339};

/// Delivery-state header names (in addition to [`crate::queue::headers`]).
pub mod state_headers {
    pub const ATTEMPTS: &str = "Kubemail-Attempts";
    pub const NOT_BEFORE: &str = "Kubemail-Not-Before";
    pub const LAST_ERROR: &str = "Kubemail-Last-Error";
    pub const DELAY_WARNED: &str = "Kubemail-Delay-Warned";
}

/// Why headers are not a usable queue entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("queue entry has no {0} header")]
    Missing(&'static str),
    #[error("queue entry header {name} is invalid: {value:?}")]
    Invalid { name: &'static str, value: String },
}

/// One queue entry's envelope and delivery state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryEntry {
    pub queue_id: String,
    /// Reverse path without brackets; empty for the null sender.
    pub mail_from: String,
    /// Recipients still to deliver, without brackets.
    pub recipients: Vec<String>,
    pub direction: Direction,
    /// The MailDomain whose subject carries the entry.
    pub domain: String,
    pub accepted_at: SystemTime,
    pub message_id: Option<String>,
    pub traceparent: Option<String>,
    pub auth_user: Option<String>,
    pub client_ip: Option<IpAddr>,
    pub helo: Option<String>,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub dsn_envid: Option<String>,
    pub dsn_ret: Option<String>,
    /// `<bucket>/<object>` when the body is in the object store.
    pub body_ref: Option<String>,
    pub body_size: Option<u64>,
    pub attempts: u32,
    pub not_before: Option<SystemTime>,
    pub last_error: Option<String>,
    pub delay_warned: bool,
}

impl DeliveryEntry {
    /// Reads an entry from its NATS headers.
    pub fn from_headers(h: &HeaderMap) -> Result<Self, EntryError> {
        let get = |name: &'static str| h.get(name).map(|v| v.as_str().trim().to_owned());
        let required = |name: &'static str| get(name).ok_or(EntryError::Missing(name));
        let queue_id = required(headers::QUEUE_ID)?;
        let mail_from = unbracket(&required(headers::MAIL_FROM)?);
        let recipients = parse_recipients(h)?;
        let direction = match required(headers::DIRECTION)?.as_str() {
            "inbound" => Direction::Inbound,
            "outbound" => Direction::Outbound,
            other => {
                return Err(EntryError::Invalid {
                    name: headers::DIRECTION,
                    value: other.to_owned(),
                });
            }
        };
        let domain = required(headers::DOMAIN)?.to_ascii_lowercase();
        let accepted_at = parse_time(headers::ACCEPTED_AT, &required(headers::ACCEPTED_AT)?)?;
        let not_before = get(state_headers::NOT_BEFORE)
            .map(|v| parse_time(state_headers::NOT_BEFORE, &v))
            .transpose()?;
        let attempts = match get(state_headers::ATTEMPTS) {
            Some(v) => v.parse().map_err(|_| EntryError::Invalid {
                name: state_headers::ATTEMPTS,
                value: v,
            })?,
            None => 0,
        };
        Ok(Self {
            queue_id,
            mail_from,
            recipients,
            direction,
            domain,
            accepted_at,
            message_id: get(headers::MESSAGE_ID),
            traceparent: get(headers::TRACEPARENT),
            auth_user: get(headers::AUTH_USER),
            client_ip: get(headers::CLIENT_IP).and_then(|v| v.parse().ok()),
            helo: get(headers::HELO),
            eight_bit: get(headers::BODY_TYPE).is_some_and(|v| v.eq_ignore_ascii_case("8BITMIME")),
            smtputf8: get(headers::SMTPUTF8).is_some_and(|v| v.eq_ignore_ascii_case("true")),
            dsn_envid: get(headers::DSN_ENVID),
            dsn_ret: get(headers::DSN_RET),
            body_ref: get(headers::BODY_REF).filter(|v| !v.is_empty()),
            body_size: get(headers::BODY_SIZE).and_then(|v| v.parse().ok()),
            attempts,
            not_before,
            last_error: get(state_headers::LAST_ERROR),
            delay_warned: get(state_headers::DELAY_WARNED).is_some_and(|v| v == "true"),
        })
    }

    /// `<queue id>.<domain>`: the entry's id in the contract (first `Nats-Msg-Id`, object
    /// name of a large body).
    pub fn entry_id(&self) -> String {
        format!("{}.{}", self.queue_id, self.domain)
    }

    pub fn is_null_sender(&self) -> bool {
        self.mail_from.is_empty()
    }

    /// The NATS headers of this entry, with `msg_id` as `Nats-Msg-Id`.
    pub fn to_headers(&self, msg_id: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(headers::NATS_MSG_ID, clean(msg_id));
        h.insert(headers::QUEUE_ID, clean(&self.queue_id));
        h.insert(headers::MAIL_FROM, format!("<{}>", clean(&self.mail_from)));
        let rcpts = serde_json::to_string(&self.recipients).unwrap_or_else(|_| "[]".to_owned());
        h.insert(headers::RCPT_TO, clean(&rcpts));
        h.insert(headers::DIRECTION, self.direction.as_str());
        h.insert(headers::DOMAIN, clean(&self.domain));
        h.insert(headers::ACCEPTED_AT, rfc3339(self.accepted_at));
        let optional = [
            (headers::MESSAGE_ID, &self.message_id),
            (headers::TRACEPARENT, &self.traceparent),
            (headers::AUTH_USER, &self.auth_user),
            (headers::HELO, &self.helo),
            (headers::DSN_ENVID, &self.dsn_envid),
            (headers::DSN_RET, &self.dsn_ret),
            (headers::BODY_REF, &self.body_ref),
            (state_headers::LAST_ERROR, &self.last_error),
        ];
        for (name, value) in optional {
            if let Some(v) = value {
                h.insert(name, clean(v));
            }
        }
        if let Some(ip) = self.client_ip {
            h.insert(headers::CLIENT_IP, ip.to_string());
        }
        if self.eight_bit {
            h.insert(headers::BODY_TYPE, "8BITMIME");
        }
        if self.smtputf8 {
            h.insert(headers::SMTPUTF8, "true");
        }
        if let Some(size) = self.body_size {
            h.insert(headers::BODY_SIZE, size.to_string());
        }
        if self.attempts > 0 {
            h.insert(state_headers::ATTEMPTS, self.attempts.to_string());
        }
        if let Some(t) = self.not_before {
            h.insert(state_headers::NOT_BEFORE, rfc3339(t));
        }
        if self.delay_warned {
            h.insert(state_headers::DELAY_WARNED, "true");
        }
        h
    }
}

/// The recipients: one `Kubemail-Rcpt-To` header holding a JSON array (the contract), or,
/// tolerated for entries written by hand, repeated `<addr>` values.
fn parse_recipients(h: &HeaderMap) -> Result<Vec<String>, EntryError> {
    let values: Vec<&str> = h
        .get_all(headers::RCPT_TO)
        .map(|v| v.as_str().trim())
        .collect();
    let recipients: Vec<String> = match values.as_slice() {
        [json] if json.starts_with('[') => {
            serde_json::from_str::<Vec<String>>(json).map_err(|_| EntryError::Invalid {
                name: headers::RCPT_TO,
                value: (*json).to_owned(),
            })?
        }
        list => list.iter().map(|v| unbracket(v)).collect(),
    };
    let recipients: Vec<String> = recipients.into_iter().filter(|r| !r.is_empty()).collect();
    if recipients.is_empty() {
        return Err(EntryError::Missing(headers::RCPT_TO));
    }
    Ok(recipients)
}

fn unbracket(v: &str) -> String {
    let v = v.trim();
    v.strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or(v)
        .to_owned()
}

fn parse_time(name: &'static str, value: &str) -> Result<SystemTime, EntryError> {
    time::OffsetDateTime::parse(value, &Rfc3339)
        .map(SystemTime::from)
        .map_err(|_| EntryError::Invalid {
            name,
            value: value.to_owned(),
        })
}

/// Header values must not contain control characters (they would break the NATS framing).
fn clean(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (see notes/common.md)
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::queue::jetstream::envelope_headers;
    use crate::queue::{Envelope, QueueId, QueuedMessage};

    #[test]
    fn reads_what_the_session_writes_and_round_trips_state() {
        let accepted = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let queued = QueuedMessage {
            envelope: Envelope {
                queue_id: QueueId::new(),
                mail_from: "alice@example.test".into(),
                recipients: vec!["carol@remote.test".into(), "dave@remote.test".into()],
                domain: "example.test".into(),
                direction: Direction::Outbound,
                accepted_at: accepted,
                message_id: Some("<m@x>".into()),
                traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
                auth_user: Some("alice@example.test".into()),
                client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                helo: "client.test".into(),
                eight_bit: true,
                smtputf8: false,
                dsn_envid: Some("ENV1".into()),
                dsn_ret: Some("HDRS".into()),
            },
            body: Bytes::from_static(b"Subject: x\r\n\r\nhi\r\n"),
        };
        let h = envelope_headers(&queued);
        let mut e = DeliveryEntry::from_headers(&h).unwrap();
        assert_eq!(e.queue_id, queued.envelope.queue_id.to_string());
        assert_eq!(e.mail_from, "alice@example.test");
        assert_eq!(e.recipients, ["carol@remote.test", "dave@remote.test"]);
        assert_eq!(e.direction, Direction::Outbound);
        assert_eq!(e.accepted_at, accepted);
        assert!(e.eight_bit);
        assert_eq!(e.body_size, Some(18));
        assert_eq!(e.attempts, 0);
        assert_eq!(e.entry_id(), queued.envelope.entry_id());

        e.recipients.truncate(1);
        e.attempts = 3;
        e.not_before = Some(accepted + Duration::from_secs(600));
        e.last_error = Some("451 4.3.0 try\r\nlater".into());
        e.delay_warned = true;
        let again = DeliveryEntry::from_headers(&e.to_headers("id.a3")).unwrap();
        assert_eq!(again.last_error.as_deref(), Some("451 4.3.0 try??later"));
        e.last_error = again.last_error.clone();
        assert_eq!(again, e);
    }

    #[test]
    fn refuses_incomplete_entries() {
        let mut h = HeaderMap::new();
        assert_eq!(
            DeliveryEntry::from_headers(&h).unwrap_err(),
            EntryError::Missing(headers::QUEUE_ID)
        );
        h.insert(headers::QUEUE_ID, "q");
        h.insert(headers::MAIL_FROM, "<>");
        assert_eq!(
            DeliveryEntry::from_headers(&h).unwrap_err(),
            EntryError::Missing(headers::RCPT_TO)
        );
        h.insert(headers::RCPT_TO, "[\"b@x.test\", \"\\\"a b\\\"@x.test\"]");
        h.insert(headers::DIRECTION, "sideways");
        assert!(matches!(
            DeliveryEntry::from_headers(&h).unwrap_err(),
            EntryError::Invalid { .. }
        ));
        h.insert(headers::DIRECTION, "inbound");
        h.insert(headers::DOMAIN, "x.test");
        h.insert(headers::ACCEPTED_AT, "yesterday");
        assert!(DeliveryEntry::from_headers(&h).is_err());
        h.insert(headers::ACCEPTED_AT, "2026-11-27T23:59:01Z");
        let e = DeliveryEntry::from_headers(&h).unwrap();
        assert!(e.is_null_sender());
        assert_eq!(e.recipients, ["b@x.test", "\"a b\"@x.test"]);
        h.insert(headers::RCPT_TO, "<legacy@x.test>");
        h.append(headers::RCPT_TO, "<second@x.test>");
        assert_eq!(
            DeliveryEntry::from_headers(&h).unwrap().recipients,
            ["legacy@x.test", "second@x.test"]
        );
        h.insert(headers::RCPT_TO, "[not json");
        assert!(DeliveryEntry::from_headers(&h).is_err());
    }
}
