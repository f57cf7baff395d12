//! Which entries a command means. Every criterion given must hold; an empty filter selects
//! every entry.

use std::time::{Duration, SystemTime};

use kubemail_queue::QueueEntry;
use kubemail_queue::pause::name_matches;
use serde::Serialize;

use crate::Listed;

/// The state of an entry, as `queue list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Due now: waiting for a worker or being delivered.
    Ready,
    /// Waiting for its next attempt after a temporary failure.
    Deferred,
    /// Waiting because a delivery pause matches it.
    Paused,
    /// On hold until released.
    Held,
    /// Deleted with a notice; the next worker bounces it.
    Cancelled,
}

impl State {
    /// The state of `entry` at `now`; `held` when it is on the held subject.
    pub fn of(entry: &QueueEntry, held: bool, now: SystemTime) -> Self {
        if held {
            Self::Held
        } else if entry.admin.cancelled {
            Self::Cancelled
        } else if entry.not_before.is_some_and(|t| t > now) {
            if entry.admin.paused_by.is_some() {
                Self::Paused
            } else {
                Self::Deferred
            }
        } else {
            Self::Ready
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Deferred => "deferred",
            Self::Paused => "paused",
            Self::Held => "held",
            Self::Cancelled => "cancelled",
        }
    }

    /// Reads a state name as typed on the command line.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text.to_ascii_lowercase().as_str() {
            "ready" | "active" | "queued" => Self::Ready,
            "deferred" => Self::Deferred,
            "paused" => Self::Paused,
            "held" | "hold" => Self::Held,
            "cancelled" | "canceled" => Self::Cancelled,
            _ => return None,
        })
    }
}

/// Selection criteria.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// The MailDomain whose queue holds the entry.
    pub domain: Option<String>,
    /// A recipient's domain (`*.example.com` for subdomains).
    pub recipient_domain: Option<String>,
    /// The sender address (`<>` or empty for the null sender), or `@domain` for any sender
    /// of that domain.
    pub sender: Option<String>,
    /// Accepted at least this long ago.
    pub older_than: Option<Duration>,
    /// Accepted at most this long ago.
    pub newer_than: Option<Duration>,
    pub state: Option<State>,
    /// Text the last error contains (case-insensitive).
    pub last_error: Option<String>,
    /// Any of these queue ids (empty: any).
    pub queue_ids: Vec<String>,
}

impl Filter {
    /// Whether `listed` is selected at `now`.
    pub fn matches(&self, listed: &Listed, now: SystemTime) -> bool {
        let e = &listed.entry;
        if !self.queue_ids.is_empty() && !self.queue_ids.iter().any(|q| q == e.queue_id.as_str()) {
            return false;
        }
        if let Some(d) = &self.domain
            && !e.domain.eq_ignore_ascii_case(d)
        {
            return false;
        }
        if let Some(pattern) = &self.recipient_domain
            && !e
                .recipients
                .iter()
                .any(|r| name_matches(pattern, domain_of(r)))
        {
            return false;
        }
        if let Some(sender) = &self.sender {
            let sender = sender.trim_start_matches('<').trim_end_matches('>');
            let ok = match sender.strip_prefix('@') {
                Some(domain) => domain_of(&e.mail_from).eq_ignore_ascii_case(domain),
                None => e.mail_from.eq_ignore_ascii_case(sender),
            };
            if !ok {
                return false;
            }
        }
        let age = now.duration_since(e.accepted_at).unwrap_or(Duration::ZERO);
        if self.older_than.is_some_and(|min| age < min) {
            return false;
        }
        if self.newer_than.is_some_and(|max| age > max) {
            return false;
        }
        if let Some(state) = self.state
            && listed.state(now) != state
        {
            return false;
        }
        if let Some(text) = &self.last_error {
            let text = text.to_ascii_lowercase();
            if !e
                .last_error
                .as_deref()
                .is_some_and(|l| l.to_ascii_lowercase().contains(&text))
            {
                return false;
            }
        }
        true
    }

    /// Whether it selects anything less than everything (actions by filter refuse an empty
    /// one unless told `--all`).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The domain of an address (after the last `@`), or the whole text.
pub fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map_or(address, |(_, d)| d)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use kubemail_queue::{Direction, QueueId};

    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn listed() -> Listed {
        Listed {
            sequence: 7,
            subject: "kubemail.queue.example.com".into(),
            stored_at: at(1000),
            held: false,
            entry: QueueEntry {
                attempts: 2,
                not_before: Some(at(2000)),
                last_error: Some("mx.remote.test said: 421 4.7.0 Try later".into()),
                ..QueueEntry::new(
                    QueueId::from("q1".to_owned()),
                    "alice@example.com".into(),
                    vec!["bob@remote.test".into(), "carol@mx.other.test".into()],
                    Direction::Outbound,
                    "example.com".into(),
                    at(1000),
                )
            },
        }
    }

    #[test]
    fn every_given_criterion_must_hold() {
        let l = listed();
        let now = at(1500);
        assert!(Filter::default().matches(&l, now));
        let f = |f: Filter| f.matches(&l, now);
        assert!(f(Filter {
            domain: Some("EXAMPLE.com".into()),
            recipient_domain: Some("remote.test".into()),
            sender: Some("<alice@example.com>".into()),
            older_than: Some(Duration::from_secs(300)),
            newer_than: Some(Duration::from_secs(600)),
            state: Some(State::Deferred),
            last_error: Some("4.7.0 try".into()),
            queue_ids: vec!["q0".into(), "q1".into()],
        }));
        assert!(f(Filter {
            recipient_domain: Some("*.other.test".into()),
            sender: Some("@Example.com".into()),
            ..Filter::default()
        }));
        for miss in [
            Filter {
                domain: Some("other.com".into()),
                ..Filter::default()
            },
            Filter {
                recipient_domain: Some("gmail.com".into()),
                ..Filter::default()
            },
            Filter {
                sender: Some("<>".into()),
                ..Filter::default()
            },
            Filter {
                older_than: Some(Duration::from_secs(600)),
                ..Filter::default()
            },
            Filter {
                newer_than: Some(Duration::from_secs(60)),
                ..Filter::default()
            },
            Filter {
                state: Some(State::Ready),
                ..Filter::default()
            },
            Filter {
                last_error: Some("5.1.1".into()),
                ..Filter::default()
            },
            Filter {
                queue_ids: vec!["q2".into()],
                ..Filter::default()
            },
        ] {
            assert!(!f(miss.clone()), "{miss:?}");
        }
    }

    #[test]
    fn states() {
        let mut l = listed();
        assert_eq!(l.state(at(1500)), State::Deferred);
        assert_eq!(l.state(at(2000)), State::Ready, "due at its time");
        l.entry.admin.paused_by = Some("mail.p".into());
        assert_eq!(l.state(at(1500)), State::Paused);
        l.entry.admin.cancelled = true;
        assert_eq!(l.state(at(1500)), State::Cancelled);
        l.held = true;
        assert_eq!(l.state(at(1500)), State::Held);
        assert_eq!(State::parse("HOLD"), Some(State::Held));
        assert_eq!(State::parse("sideways"), None);
    }
}
