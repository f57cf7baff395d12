//! [`QueueEntry`]: the envelope and delivery state of one queue entry, and its codec to and
//! from NATS headers (the contract is in the crate doc).

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, IntoHeaderValue};

use crate::headers;
use crate::rfc3339::{parse_rfc3339, rfc3339};

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

/// A queue id read from an entry (any non-empty text: ids are opaque to the reader).
impl From<String> for QueueId {
    fn from(id: String) -> Self {
        Self(id)
    }
}

/// Which way a message goes; decides what the delivery worker does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// For local recipients, received on the MX port.
    Inbound,
    /// Submitted by an authenticated user; to be delivered to the recipients' MX or a relay.
    Outbound,
}

impl Direction {
    /// The `Kubemail-Direction` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }

    /// Reads a `Kubemail-Direction` value.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "inbound" => Some(Self::Inbound),
            "outbound" => Some(Self::Outbound),
            _ => None,
        }
    }
}

/// The kind of a delivery status notification about an entry (its `Nats-Msg-Id` tag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// The bounce for failed recipients.
    Bounce,
    /// The "delayed" notice.
    Delay,
    /// The bounce of an entry an operator deleted with a notice.
    Cancel,
}

impl Notice {
    fn tag(self) -> &'static str {
        match self {
            Self::Bounce => "bounce",
            Self::Delay => "delay",
            Self::Cancel => "cancel",
        }
    }
}

/// What authenticated the envelope sender of an inbound message when it was accepted: an SPF
/// pass for its domain, or a DKIM signature that passed for a domain aligned with it
/// (relaxed alignment, RFC 7489 3.1.1). Only such a sender ever gets a delivery status
/// notification for unauthenticated (MX) mail; anyone else could be a forged address that
/// the notification would spam (backscatter).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct SenderAuth {
    pub spf: bool,
    pub dkim: bool,
}

impl SenderAuth {
    /// Whether the sender passed either check.
    pub fn verified(self) -> bool {
        self.spf || self.dkim
    }

    /// The `Kubemail-Sender-Auth` value: `spf`, `dkim`, `spf,dkim` or `none`.
    pub fn as_str(self) -> &'static str {
        match (self.spf, self.dkim) {
            (true, true) => "spf,dkim",
            (true, false) => "spf",
            (false, true) => "dkim",
            (false, false) => "none",
        }
    }

    /// Reads a `Kubemail-Sender-Auth` value; unknown methods are ignored (a newer writer may
    /// add some), so they never count as a pass.
    pub fn parse(value: &str) -> Self {
        let mut auth = Self::default();
        for method in value.split(',').map(str::trim) {
            if method.eq_ignore_ascii_case("spf") {
                auth.spf = true;
            } else if method.eq_ignore_ascii_case("dkim") {
                auth.dkim = true;
            }
        }
        auth
    }
}

/// An operator's action on an entry ([`QueueEntry::action_msg_id`]): each replaces the entry
/// by a new one and deletes the old one from the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Deliverable at once (`Kubemail-Not-Before` cleared).
    Retry,
    /// Moved to the held subject.
    Hold,
    /// Moved back from the held subject, deliverable at once.
    Release,
    /// Returned to the sender by the next worker.
    Cancel,
    /// Put back by a worker to wait for a delivery pause (not an operator's action, but the
    /// same kind of replacement: same attempts, so it needs an id of its own).
    Pause,
}

impl Action {
    pub fn tag(self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::Hold => "hold",
            Self::Release => "release",
            Self::Cancel => "cancel",
            Self::Pause => "pause",
        }
    }
}

/// Attempts kept in `Kubemail-Attempt-Log` (the newest).
pub const MAX_ATTEMPT_LOG: usize = 10;
/// Characters of a reply kept in the attempt log.
const MAX_LOGGED_REPLY: usize = 300;

/// One attempt in the attempt log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    pub at: SystemTime,
    /// What the attempt ended with (the remote's reply or our own diagnostic).
    pub reply: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct AttemptJson {
    at: String,
    reply: String,
}

/// What operators and pauses did to an entry, and its recent attempts; empty (the default)
/// on a new entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AdminState {
    /// The last attempts that deferred it (at most [`MAX_ATTEMPT_LOG`], oldest first).
    pub attempt_log: Vec<AttemptRecord>,
    /// Time spent held or waiting for a pause: added to the lifetime, so mail that was only
    /// held back is never bounced for its age.
    pub suspended: Duration,
    /// The pause the entry waits for ([`crate::pause::Pause::key`]).
    pub paused_by: Option<String>,
    /// When the entry was put on hold (set only on the held subject).
    pub held_at: Option<SystemTime>,
    /// Why it was put on hold.
    pub hold_reason: Option<String>,
    /// An operator deleted it with a notice: the next worker bounces every recipient.
    pub cancelled: bool,
}

/// Why headers are not a usable queue entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("queue entry has no {0} header")]
    Missing(&'static str),
    #[error("queue entry header {name} is invalid: {value:?}")]
    Invalid { name: &'static str, value: String },
}

/// One queue entry: the envelope written at acceptance and the delivery state written by
/// retries. The message itself is the NATS payload or a stored object ([`Self::body_ref`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    pub queue_id: QueueId,
    /// Reverse path without brackets; empty for the null sender `<>`.
    pub mail_from: String,
    /// Forward paths without brackets: the recipients still to deliver.
    pub recipients: Vec<String>,
    pub direction: Direction,
    /// The MailDomain whose subject carries this entry (lower-cased on the wire).
    pub domain: String,
    pub accepted_at: SystemTime,
    /// The `Message-ID` header value, if the message has one.
    pub message_id: Option<String>,
    /// W3C trace context of the span the delivery attempts are children of.
    pub traceparent: Option<String>,
    /// The authenticated user who submitted the message.
    pub auth_user: Option<String>,
    pub client_ip: Option<IpAddr>,
    /// The client's EHLO/HELO name.
    pub helo: Option<String>,
    /// Inbound mail: how the envelope sender was authenticated at acceptance (`None`: not
    /// checked, which counts as not authenticated).
    pub sender_auth: Option<SenderAuth>,
    /// `BODY=8BITMIME` was given.
    pub eight_bit: bool,
    /// `SMTPUTF8` was given.
    pub smtputf8: bool,
    /// DSN `ENVID` (xtext as received).
    pub dsn_envid: Option<String>,
    /// DSN `RET` (`FULL` or `HDRS`).
    pub dsn_ret: Option<String>,
    /// `<bucket>/<object>` when the body is in the object store ([`crate::body_ref`]).
    pub body_ref: Option<String>,
    /// Octets of the body, inline or stored.
    pub body_size: Option<u64>,
    /// `REQUIRETLS` was given (RFC 8689): never sent without verified TLS.
    pub require_tls: bool,
    /// The message has `TLS-Required: No` (RFC 8689 5): no MTA-STS or DANE enforcement.
    pub tls_optional: bool,
    /// Delivery attempts made so far.
    pub attempts: u32,
    /// No attempt before this time.
    pub not_before: Option<SystemTime>,
    /// The last temporary error, for logs.
    pub last_error: Option<String>,
    /// A "delayed" notice was sent already.
    pub delay_warned: bool,
    /// Holds, pauses and cancellation.
    pub admin: AdminState,
}

impl AdminState {
    /// Adds an attempt to the log, dropping the oldest beyond [`MAX_ATTEMPT_LOG`].
    pub fn log_attempt(&mut self, at: SystemTime, reply: &str) {
        let reply: String = clean(reply.trim()).chars().take(MAX_LOGGED_REPLY).collect();
        self.attempt_log.push(AttemptRecord { at, reply });
        let extra = self.attempt_log.len().saturating_sub(MAX_ATTEMPT_LOG);
        self.attempt_log.drain(..extra);
    }
}

impl QueueEntry {
    /// A new entry of `domain` as accepted at `accepted_at`: the envelope only, no attempt
    /// yet, every optional header absent. Callers set what else they know with struct
    /// update syntax (`QueueEntry { body_size: Some(n), ..QueueEntry::new(...) }`).
    pub fn new(
        queue_id: QueueId,
        mail_from: String,
        recipients: Vec<String>,
        direction: Direction,
        domain: String,
        accepted_at: SystemTime,
    ) -> Self {
        Self {
            queue_id,
            mail_from,
            recipients,
            direction,
            domain,
            accepted_at,
            message_id: None,
            traceparent: None,
            auth_user: None,
            client_ip: None,
            helo: None,
            sender_auth: None,
            eight_bit: false,
            smtputf8: false,
            dsn_envid: None,
            dsn_ret: None,
            body_ref: None,
            body_size: None,
            require_tls: false,
            tls_optional: false,
            attempts: 0,
            not_before: None,
            last_error: None,
            delay_warned: false,
            admin: AdminState::default(),
        }
    }

    /// `<queue id>.<domain>`: the entry's id in the contract (its first `Nats-Msg-Id`, the
    /// base of every later one).
    pub fn entry_id(&self) -> String {
        entry_id(&self.queue_id, &self.domain)
    }

    /// The `Nats-Msg-Id` to publish this entry with: [`Self::entry_id`] for a new entry,
    /// `<entry id>.a<attempts>` for a retry.
    pub fn msg_id(&self) -> String {
        if self.attempts == 0 {
            self.entry_id()
        } else {
            format!("{}.a{}", self.entry_id(), self.attempts)
        }
    }

    /// The `Nats-Msg-Id` of a notice about this entry's current attempt.
    pub fn notice_msg_id(&self, notice: Notice) -> String {
        format!("{}.{}{}", self.entry_id(), notice.tag(), self.attempts)
    }

    /// The `Nats-Msg-Id` of the entry that replaces the stream message `sequence` (this entry)
    /// after an operator's `action`: `<entry id>.a<attempts>.<action><sequence>`. Derived from
    /// the replaced message, so repeating the same action on it (a retried command) is
    /// dropped as a duplicate, while a later action on the replacement gets a new id.
    pub fn action_msg_id(&self, action: Action, sequence: u64) -> String {
        format!(
            "{}.a{}.{}{sequence}",
            self.entry_id(),
            self.attempts,
            action.tag()
        )
    }

    /// The end of this entry's lifetime of `lifetime`: acceptance plus the time it spent
    /// held or paused.
    pub fn expires_at(&self, lifetime: Duration) -> SystemTime {
        self.accepted_at + self.admin.suspended + lifetime
    }

    /// The object store name of this entry's body when it is too large to go inline.
    pub fn body_object_name(&self) -> String {
        self.entry_id()
    }

    pub fn is_null_sender(&self) -> bool {
        self.mail_from.is_empty()
    }

    /// The NATS headers of this entry, with `msg_id` as `Nats-Msg-Id`.
    pub fn to_headers(&self, msg_id: &str) -> HeaderMap {
        let mut h = StaticNames(HeaderMap::new());
        h.insert(headers::NATS_MSG_ID, header_text(msg_id));
        h.insert(headers::QUEUE_ID, header_text(self.queue_id.as_str()));
        h.insert(headers::MAIL_FROM, format!("<{}>", clean(&self.mail_from)));
        let recipients: Vec<String> = self.recipients.iter().map(|r| clean(r)).collect();
        // JSON of strings cannot fail; the fallback only keeps this free of a panic path.
        let json = serde_json::to_string(&recipients).unwrap_or_else(|_| "[]".to_owned());
        h.insert(headers::RCPT_TO, json);
        h.insert(headers::DIRECTION, self.direction.as_str());
        h.insert(
            headers::DOMAIN,
            header_text(&self.domain).to_ascii_lowercase(),
        );
        h.insert(headers::ACCEPTED_AT, rfc3339(self.accepted_at));
        let optional = [
            (headers::MESSAGE_ID, &self.message_id),
            (headers::TRACEPARENT, &self.traceparent),
            (headers::AUTH_USER, &self.auth_user),
            (headers::HELO, &self.helo),
            (headers::DSN_ENVID, &self.dsn_envid),
            (headers::DSN_RET, &self.dsn_ret),
            (headers::BODY_REF, &self.body_ref),
            (headers::LAST_ERROR, &self.last_error),
        ];
        for (name, value) in optional {
            if let Some(v) = value.as_deref().map(header_text)
                && !v.is_empty()
            {
                h.insert(name, v);
            }
        }
        if let Some(ip) = self.client_ip {
            h.insert(headers::CLIENT_IP, ip.to_string());
        }
        if let Some(auth) = self.sender_auth {
            h.insert(headers::SENDER_AUTH, auth.as_str());
        }
        if self.eight_bit {
            h.insert(headers::BODY_TYPE, "8BITMIME");
        }
        if self.smtputf8 {
            h.insert(headers::SMTPUTF8, "true");
        }
        if self.require_tls {
            h.insert(headers::REQUIRE_TLS, "true");
        }
        if self.tls_optional {
            h.insert(headers::TLS_OPTIONAL, "true");
        }
        if let Some(size) = self.body_size {
            h.insert(headers::BODY_SIZE, size.to_string());
        }
        if self.attempts > 0 {
            h.insert(headers::ATTEMPTS, self.attempts.to_string());
        }
        if let Some(t) = self.not_before {
            h.insert(headers::NOT_BEFORE, rfc3339(t));
        }
        if self.delay_warned {
            h.insert(headers::DELAY_WARNED, "true");
        }
        let a = &self.admin;
        if !a.suspended.is_zero() {
            h.insert(headers::SUSPENDED, a.suspended.as_secs().to_string());
        }
        for (name, value) in [
            (headers::PAUSED_BY, &a.paused_by),
            (headers::HOLD_REASON, &a.hold_reason),
        ] {
            if let Some(v) = value.as_deref().map(header_text)
                && !v.is_empty()
            {
                h.insert(name, v);
            }
        }
        if let Some(t) = a.held_at {
            h.insert(headers::HELD_AT, rfc3339(t));
        }
        if a.cancelled {
            h.insert(headers::CANCEL, "bounce");
        }
        if !a.attempt_log.is_empty() {
            let log: Vec<AttemptJson> = a
                .attempt_log
                .iter()
                .map(|r| AttemptJson {
                    at: rfc3339(r.at),
                    reply: clean(&r.reply),
                })
                .collect();
            if let Ok(json) = serde_json::to_string(&log) {
                h.insert(headers::ATTEMPT_LOG, json);
            }
        }
        h.0
    }

    /// Reads an entry from its NATS headers.
    pub fn from_headers(h: &HeaderMap) -> Result<Self, EntryError> {
        let get = |name: &'static str| {
            h.get(name)
                .map(|v| v.as_str().trim())
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        let required = |name: &'static str| get(name).ok_or(EntryError::Missing(name));
        let invalid = |name: &'static str, value: &str| EntryError::Invalid {
            name,
            value: value.to_owned(),
        };
        let queue_id = QueueId(required(headers::QUEUE_ID)?);
        let mail_from = unbracket(&required(headers::MAIL_FROM)?);
        let recipients = parse_recipients(h)?;
        let direction = required(headers::DIRECTION)?;
        let direction =
            Direction::parse(&direction).ok_or_else(|| invalid(headers::DIRECTION, &direction))?;
        let domain = required(headers::DOMAIN)?.to_ascii_lowercase();
        let accepted_at = required(headers::ACCEPTED_AT)?;
        let accepted_at = parse_rfc3339(&accepted_at)
            .ok_or_else(|| invalid(headers::ACCEPTED_AT, &accepted_at))?;
        let not_before = get(headers::NOT_BEFORE)
            .map(|v| parse_rfc3339(&v).ok_or_else(|| invalid(headers::NOT_BEFORE, &v)))
            .transpose()?;
        let attempts = get(headers::ATTEMPTS)
            .map(|v| v.parse().map_err(|_| invalid(headers::ATTEMPTS, &v)))
            .transpose()?
            .unwrap_or(0);
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
            // Informational: an unreadable address is dropped rather than the entry.
            client_ip: get(headers::CLIENT_IP).and_then(|v| v.parse().ok()),
            helo: get(headers::HELO),
            sender_auth: get(headers::SENDER_AUTH).map(|v| SenderAuth::parse(&v)),
            eight_bit: get(headers::BODY_TYPE).is_some_and(|v| v.eq_ignore_ascii_case("8BITMIME")),
            smtputf8: get(headers::SMTPUTF8).is_some_and(|v| v.eq_ignore_ascii_case("true")),
            dsn_envid: get(headers::DSN_ENVID),
            dsn_ret: get(headers::DSN_RET),
            body_ref: get(headers::BODY_REF),
            // A size hint only (buffer capacity): unreadable means unknown.
            body_size: get(headers::BODY_SIZE).and_then(|v| v.parse().ok()),
            require_tls: get(headers::REQUIRE_TLS).is_some_and(|v| v.eq_ignore_ascii_case("true")),
            tls_optional: get(headers::TLS_OPTIONAL)
                .is_some_and(|v| v.eq_ignore_ascii_case("true")),
            attempts,
            not_before,
            last_error: get(headers::LAST_ERROR),
            delay_warned: get(headers::DELAY_WARNED).is_some_and(|v| v == "true"),
            admin: AdminState {
                // Unreadable means none: the entry may then expire early, never late.
                suspended: get(headers::SUSPENDED)
                    .and_then(|v| v.parse().ok())
                    .map(Duration::from_secs)
                    .unwrap_or_default(),
                paused_by: get(headers::PAUSED_BY),
                held_at: get(headers::HELD_AT).and_then(|v| parse_rfc3339(&v)),
                hold_reason: get(headers::HOLD_REASON),
                cancelled: get(headers::CANCEL).is_some_and(|v| v == "bounce"),
                // Informational: an unreadable log is dropped rather than the entry.
                attempt_log: get(headers::ATTEMPT_LOG)
                    .and_then(|v| serde_json::from_str::<Vec<AttemptJson>>(&v).ok())
                    .map(|list| {
                        list.into_iter()
                            .filter_map(|r| {
                                Some(AttemptRecord {
                                    at: parse_rfc3339(&r.at)?,
                                    reply: r.reply,
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            },
        })
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

/// A text value as it travels: cleaned, without the surrounding white space that the NATS
/// wire format would drop anyway.
fn header_text(value: &str) -> String {
    clean(value.trim())
}

/// Header values must not contain control characters (they would break the NATS framing).
/// Input reaching here has passed the SMTP parser; this is a second line of defence.
fn clean(value: &str) -> String {
    // The control characters are C0 and DEL (one byte each) and C1 (U+0080..U+009F, encoded
    // as 0xC2 0x80..0x9F): a value without any of those bytes is copied as it is.
    if !value.bytes().any(|b| b < 0x20 || b == 0x7f || b == 0xc2) {
        return value.to_owned();
    }
    value
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `<queue id>.<domain>`: the id of the new entry of `domain` of a transaction
/// ([`QueueEntry::entry_id`]), also the name of its body object.
pub fn entry_id(queue_id: &QueueId, domain: &str) -> String {
    format!("{}.{}", queue_id, domain.to_ascii_lowercase())
}

/// A header map filled with the `'static` names of [`headers`]: a name made with
/// [`HeaderName::from_static`] needs neither a copy nor a check, where a `&str` name gets
/// both at every insert (an entry is written on the accept path of every message).
pub struct StaticNames(pub HeaderMap);

impl StaticNames {
    pub fn insert(&mut self, name: &'static str, value: impl IntoHeaderValue) {
        self.0.insert(HeaderName::from_static(name), value);
    }
}
