//! Typed delivery results, per recipient and per queue entry, and the pure decision of what
//! to do with an entry after an attempt ([`plan`]).
//!
//! | per recipient | meaning | entry |
//! |---|---|---|
//! | [`RecipientOutcome::Delivered`] | a 2xx after the data | done with it |
//! | [`RecipientOutcome::Deferred`] | 4xx, connection, TLS or DNS trouble | retried later |
//! | [`RecipientOutcome::Failed`] | 5xx, null MX, policy, or expired | reported in one DSN |
//!
//! The entry's [`Disposition`]: `Done` → ack; `Deferred { retry_after }` → the remaining
//! recipients are republished with their retry time and the entry is acked (so the delivered
//! ones are never sent again; the republished entry is nak'd with the remaining delay when a
//! worker pulls it early); `Failed` (every recipient failed) → term, after the bounce is
//! queued. A null sender is never bounced: its failures are only logged; nor is a sender that
//! may not be notified (inbound mail from a sender that passed neither SPF nor DKIM).

use std::time::{Duration, SystemTime};

use super::retry::{self, RetryDecision};
use crate::config::RetryConfig;
use crate::protocol::client::status_of;
use crate::protocol::{EnhancedCode, Reply};

/// Why a recipient was not delivered (yet): what goes into logs, retry headers and DSNs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// RFC 3463 status for the DSN's `Status:` field.
    pub status: EnhancedCode,
    /// The remote server's reply, when it gave one (DSN `Diagnostic-Code: smtp; ...`).
    pub reply: Option<Reply>,
    /// Our own explanation when there is no reply (DNS, connection, policy), or context.
    pub text: String,
    /// The host that answered (DSN `Remote-MTA`).
    pub remote_mta: Option<String>,
    /// The connection the reply came on, when there was one (for events; boxed to keep
    /// results small).
    pub peer: Option<Box<Peer>>,
}

/// The server a delivery talked to: what events say about the remote side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub host: String,
    pub ip: Option<std::net::IpAddr>,
    /// TLS of the connection; `None` for plaintext.
    pub tls: Option<crate::tls::TlsInfo>,
    /// Whether the server's certificate was verified.
    pub verified: bool,
}

impl Diagnostic {
    /// A diagnostic from a remote reply.
    pub fn from_reply(reply: Reply, remote_mta: Option<String>) -> Self {
        Self {
            status: status_of(&reply),
            text: String::new(),
            reply: Some(reply),
            remote_mta,
            peer: None,
        }
    }

    /// A diagnostic of our own (no remote reply).
    pub fn local(status: EnhancedCode, text: impl Into<String>) -> Self {
        Self {
            status,
            reply: None,
            text: text.into(),
            remote_mta: None,
            peer: None,
        }
    }

    /// The same diagnostic, on `peer`'s connection.
    pub fn with_peer(mut self, peer: Peer) -> Self {
        self.peer = Some(Box::new(peer));
        self
    }

    /// The RFC 3464 `Diagnostic-Code` value: `smtp; <reply>` for a remote reply, else
    /// `x-kubemail; <text>`.
    pub fn diagnostic_code(&self) -> String {
        match &self.reply {
            Some(r) => format!("smtp; {}", one_line(&r.to_string())),
            None => format!("x-kubemail; {}", one_line(&self.text)),
        }
    }

    /// One line for logs and headers.
    pub fn summary(&self) -> String {
        let base = match &self.reply {
            Some(r) => match &self.remote_mta {
                Some(host) => format!("{host} said: {r}"),
                None => r.to_string(),
            },
            None => self.text.clone(),
        };
        let text = if self.reply.is_some() && !self.text.is_empty() {
            format!("{} ({base})", self.text)
        } else {
            base
        };
        one_line(&text)
    }

    /// The diagnostic of a recipient whose lifetime ran out: status 4.4.7 (RFC 3463 "delivery
    /// time expired", a transient condition that lasted too long), keeping the last reply.
    fn expired(mut self) -> Self {
        let last = self.summary();
        self.status = EnhancedCode(4, 4, 7);
        self.text = format!("delivery time expired; last error: {last}");
        self
    }
}

/// Keeps text on one line and bounded: it goes into NATS headers and DSN fields.
pub fn one_line(text: &str) -> String {
    /// DSN fields and NATS header values should stay well under the 998-octet line limit.
    const MAX: usize = 500;
    let mut s: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() > MAX {
        let mut cut = MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// The result of one delivery attempt for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientOutcome {
    Delivered {
        reply: Reply,
        remote_mta: String,
        /// The connection, when known (for events).
        peer: Option<Box<Peer>>,
    },
    Deferred(Diagnostic),
    Failed(Diagnostic),
}

impl RecipientOutcome {
    /// The outcome a remote reply means: 2xx delivered, 4xx deferred, 5xx failed.
    pub fn from_reply(reply: Reply, remote_mta: &str) -> Self {
        if (200..300).contains(&reply.code) {
            Self::Delivered {
                reply,
                remote_mta: remote_mta.to_owned(),
                peer: None,
            }
        } else if reply.is_permanent() {
            Self::Failed(Diagnostic::from_reply(reply, Some(remote_mta.to_owned())))
        } else {
            Self::Deferred(Diagnostic::from_reply(reply, Some(remote_mta.to_owned())))
        }
    }

    /// The same outcome, on `peer`'s connection.
    pub fn with_peer(self, peer: &Peer) -> Self {
        match self {
            Self::Delivered {
                reply, remote_mta, ..
            } => Self::Delivered {
                reply,
                remote_mta,
                peer: Some(Box::new(peer.clone())),
            },
            Self::Deferred(d) => Self::Deferred(d.with_peer(peer.clone())),
            Self::Failed(d) => Self::Failed(d.with_peer(peer.clone())),
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Self::Delivered { .. } => "delivered",
            Self::Deferred(_) => "deferred",
            Self::Failed(_) => "failed",
        }
    }
}

/// What happens to the queue entry after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// No recipient left: ack.
    Done,
    /// Some recipients wait for another attempt after `retry_after` (at `retry_at`).
    Deferred {
        retry_after: Duration,
        retry_at: SystemTime,
    },
    /// Every recipient failed permanently: term.
    Failed,
}

/// What the worker does after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub delivered: Vec<String>,
    /// Recipients to report as failed (in the bounce, unless the sender is null).
    pub failed: Vec<(String, Diagnostic)>,
    /// Recipients still to deliver.
    pub deferred: Vec<(String, Diagnostic)>,
    pub disposition: Disposition,
    /// Queue a failure DSN to the sender.
    pub bounce: bool,
    /// Queue a "delayed" DSN to the sender.
    pub delay_notice: bool,
}

/// The facts [`plan`] decides on besides the outcomes.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    pub retry: &'a RetryConfig,
    /// When the message was accepted, moved by the time it spent held or paused: the start
    /// of its lifetime.
    pub accepted_at: SystemTime,
    /// The number of this attempt (1 = the first).
    pub attempt: u32,
    pub now: SystemTime,
    pub null_sender: bool,
    /// The sender may get delivery status notifications: false for inbound mail whose
    /// sender was not authenticated at acceptance (it may be forged: backscatter).
    pub may_notify: bool,
    pub delay_warned: bool,
    /// Random number in `[0, 1)` for the retry jitter.
    pub jitter: f64,
}

/// Decides the entry's fate from the recipients' outcomes.
pub fn plan(outcomes: Vec<(String, RecipientOutcome)>, input: PlanInput<'_>) -> Plan {
    let mut delivered = Vec::new();
    let mut failed = Vec::new();
    let mut deferred = Vec::new();
    for (rcpt, outcome) in outcomes {
        match outcome {
            RecipientOutcome::Delivered { .. } => delivered.push(rcpt),
            RecipientOutcome::Failed(d) => failed.push((rcpt, d)),
            RecipientOutcome::Deferred(d) => deferred.push((rcpt, d)),
        }
    }
    let mut disposition = Disposition::Done;
    let mut delay_notice = false;
    if !deferred.is_empty() {
        let lifetime = retry::lifetime(input.retry, input.null_sender);
        match retry::next_attempt(
            input.retry,
            lifetime,
            input.accepted_at,
            input.now,
            input.attempt,
            input.jitter,
        ) {
            RetryDecision::Expired => {
                failed.extend(deferred.drain(..).map(|(r, d)| (r, d.expired())));
            }
            RetryDecision::RetryAt(at) => {
                disposition = Disposition::Deferred {
                    retry_after: at.duration_since(input.now).unwrap_or(Duration::ZERO),
                    retry_at: at,
                };
                delay_notice = input.may_notify
                    && retry::delay_warning_due(
                        input.retry,
                        input.accepted_at,
                        input.now,
                        input.null_sender,
                        input.delay_warned,
                    );
            }
        }
    }
    if deferred.is_empty() && delivered.is_empty() && !failed.is_empty() {
        disposition = Disposition::Failed;
    }
    Plan {
        bounce: !failed.is_empty() && !input.null_sender && input.may_notify,
        delivered,
        failed,
        deferred,
        disposition,
        delay_notice,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn ok() -> RecipientOutcome {
        RecipientOutcome::from_reply(Reply::ok("queued"), "mx.remote.test")
    }
    fn temp() -> RecipientOutcome {
        RecipientOutcome::from_reply(
            Reply::new(450, EnhancedCode(4, 2, 0), "mailbox busy"),
            "mx.remote.test",
        )
    }
    fn perm() -> RecipientOutcome {
        RecipientOutcome::from_reply(
            Reply::new(550, EnhancedCode(5, 1, 1), "no such user"),
            "mx.remote.test",
        )
    }

    fn input(retry: &RetryConfig, now: u64, null_sender: bool) -> PlanInput<'_> {
        PlanInput {
            retry,
            accepted_at: at(0),
            now: at(now),
            null_sender,
            may_notify: true,
            delay_warned: false,
            attempt: 1,
            jitter: 0.0,
        }
    }

    fn outcomes(list: Vec<(&str, RecipientOutcome)>) -> Vec<(String, RecipientOutcome)> {
        list.into_iter().map(|(r, o)| (r.to_owned(), o)).collect()
    }

    #[test]
    fn replies_map_to_outcomes() {
        assert_eq!(ok().label(), "delivered");
        assert_eq!(temp().label(), "deferred");
        assert_eq!(perm().label(), "failed");
        let RecipientOutcome::Failed(d) = perm() else {
            panic!()
        };
        assert_eq!(d.diagnostic_code(), "smtp; 550 5.1.1 no such user");
        assert_eq!(d.summary(), "mx.remote.test said: 550 5.1.1 no such user");
        let d = Diagnostic::local(EnhancedCode(4, 4, 1), "connection refused\r\nInjected: x");
        assert_eq!(
            d.diagnostic_code(),
            "x-kubemail; connection refused  Injected: x"
        );
    }

    #[test]
    fn mixed_outcomes_retry_only_the_deferred_and_bounce_the_failed() {
        let retry = RetryConfig::default();
        let p = plan(
            outcomes(vec![
                ("a@r.test", ok()),
                ("b@r.test", temp()),
                ("c@r.test", perm()),
            ]),
            input(&retry, 60, false),
        );
        assert_eq!(p.delivered, vec!["a@r.test"]);
        assert_eq!(p.deferred.len(), 1);
        assert_eq!(p.failed.len(), 1);
        assert!(p.bounce);
        assert!(!p.delay_notice);
        assert_eq!(
            p.disposition,
            Disposition::Deferred {
                retry_after: Duration::from_secs(300),
                retry_at: at(360)
            }
        );
    }

    #[test]
    fn all_done_all_failed_and_null_senders() {
        let retry = RetryConfig::default();
        let p = plan(outcomes(vec![("a@r.test", ok())]), input(&retry, 1, false));
        assert_eq!(p.disposition, Disposition::Done);
        assert!(!p.bounce);
        let p = plan(
            outcomes(vec![("a@r.test", perm())]),
            input(&retry, 1, false),
        );
        assert_eq!(p.disposition, Disposition::Failed);
        assert!(p.bounce);
        let p = plan(outcomes(vec![("a@r.test", perm())]), input(&retry, 1, true));
        assert_eq!(p.disposition, Disposition::Failed);
        assert!(!p.bounce, "a bounce is never bounced");
    }

    #[test]
    fn unauthenticated_inbound_senders_get_no_notification() {
        let retry = RetryConfig {
            lifetime: HumanDuration::from_secs(100),
            delay_warning: Some(HumanDuration::from_secs(50)),
            ..RetryConfig::default()
        };
        let quiet = |now| PlanInput {
            may_notify: false,
            ..input(&retry, now, false)
        };
        let p = plan(outcomes(vec![("a@r.test", perm())]), quiet(1));
        assert_eq!(p.disposition, Disposition::Failed);
        assert_eq!(p.failed.len(), 1, "the failure is still reported in logs");
        assert!(!p.bounce, "no bounce to a sender that may be forged");
        let p = plan(outcomes(vec![("a@r.test", temp())]), quiet(60));
        assert!(!p.delay_notice, "no delay notice either");
        let p = plan(outcomes(vec![("a@r.test", temp())]), quiet(100));
        assert!(!p.bounce, "nor a bounce at expiry");
    }

    #[test]
    fn expiry_turns_deferrals_into_failures_with_4_4_7() {
        let retry = RetryConfig {
            lifetime: HumanDuration::from_secs(100),
            ..RetryConfig::default()
        };
        let p = plan(
            outcomes(vec![("a@r.test", temp()), ("b@r.test", ok())]),
            input(&retry, 100, false),
        );
        assert!(p.deferred.is_empty());
        assert_eq!(
            p.disposition,
            Disposition::Done,
            "b was delivered, a is reported"
        );
        assert!(p.bounce);
        let (_, d) = &p.failed[0];
        assert_eq!(d.status, EnhancedCode(4, 4, 7));
        assert!(d.text.contains("450 4.2.0 mailbox busy"), "{}", d.text);
        assert_eq!(
            d.diagnostic_code(),
            "smtp; 450 4.2.0 mailbox busy",
            "last remote reply"
        );
    }

    #[test]
    fn delay_notice_once() {
        let retry = RetryConfig {
            delay_warning: Some(HumanDuration::from_secs(50)),
            ..RetryConfig::default()
        };
        let p = plan(
            outcomes(vec![("a@r.test", temp())]),
            input(&retry, 60, false),
        );
        assert!(p.delay_notice);
        let mut i = input(&retry, 60, false);
        i.delay_warned = true;
        assert!(!plan(outcomes(vec![("a@r.test", temp())]), i).delay_notice);
    }

    #[test]
    fn one_line_bounds_text() {
        let long = "é".repeat(400);
        let s = one_line(&long);
        assert!(s.len() <= 503 && s.ends_with("..."));
    }
}
