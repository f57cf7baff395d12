//! Names of the NATS headers of a queue entry (what each carries: the crate doc).

// The envelope, written when the message is accepted.
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
pub const SENDER_AUTH: &str = "Kubemail-Sender-Auth";
/// REQUIRETLS was given (RFC 8689).
pub const REQUIRE_TLS: &str = "Kubemail-Require-Tls";
/// The message carries `TLS-Required: No` (RFC 8689 5) and no REQUIRETLS.
pub const TLS_OPTIONAL: &str = "Kubemail-Tls-Optional";

// The delivery state, written when an entry is republished after an attempt.
pub const ATTEMPTS: &str = "Kubemail-Attempts";
pub const NOT_BEFORE: &str = "Kubemail-Not-Before";
pub const LAST_ERROR: &str = "Kubemail-Last-Error";
pub const DELAY_WARNED: &str = "Kubemail-Delay-Warned";

/// JetStream's de-duplication id.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";

// What operators and pauses did to the entry (`crate::AdminState`).
/// Seconds the entry spent held or paused so far; they do not count towards its lifetime.
pub const SUSPENDED: &str = "Kubemail-Suspended";
/// The pause ([`crate::pause::Pause::key`]) the entry is waiting for.
pub const PAUSED_BY: &str = "Kubemail-Paused-By";
/// When the entry was put on hold (only on the held subject).
pub const HELD_AT: &str = "Kubemail-Held-At";
/// Why it was put on hold, as the operator gave it.
pub const HOLD_REASON: &str = "Kubemail-Hold-Reason";
/// The last attempts' results: a JSON array of `{"at": RFC 3339, "reply": text}`, oldest
/// first, at most [`crate::MAX_ATTEMPT_LOG`] of them.
pub const ATTEMPT_LOG: &str = "Kubemail-Attempt-Log";
/// `bounce`: deleted by an operator; the next worker returns it to the sender.
pub const CANCEL: &str = "Kubemail-Cancel";
