//! `events`: delivery events, bounce classification and the suppression list.
//!
//! * the JetStream stream the node publishes its delivery events to (its limits by age and
//!   size, how long a publish may wait before the event is counted as dropped);
//! * extra bounce classification rules, tried before the built-in table: a regular
//!   expression over the remote reply text (and optionally an enhanced status code prefix)
//!   naming a [`BounceClass`];
//! * the suppression list: whether hard bounces and complaints add entries, how long an entry
//!   lasts, and whether submission refuses a suppressed recipient at `RCPT TO`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, HumanDuration};

/// What a bounce or deferral was about, from the remote reply's enhanced status code and
/// text. The names are what events, suppression entries and metrics carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BounceClass {
    /// The address does not exist (`5.1.1`, "user unknown").
    InvalidRecipient,
    /// The mailbox is over quota (`4.2.2`/`5.2.2`).
    MailboxFull,
    /// Refused by the receiver's content or policy filters (spam, virus, DMARC).
    PolicyBlock,
    /// Refused because of the sending IP's or domain's reputation (block lists).
    Reputation,
    /// The recipient domain could not be resolved (no MX, NXDOMAIN, SERVFAIL).
    DnsFailure,
    /// No acceptable TLS (MTA-STS, DANE, REQUIRETLS, handshake failures).
    TlsFailure,
    /// The message is larger than the receiver accepts (`5.3.4`, `5.2.3`).
    MessageTooLarge,
    /// The receiver asked us to slow down (too many connections or messages).
    RateLimited,
    /// Anything else.
    Other,
}

impl BounceClass {
    /// Every class, in the order of the metrics and the dashboard.
    pub const ALL: [Self; 9] = [
        Self::InvalidRecipient,
        Self::MailboxFull,
        Self::PolicyBlock,
        Self::Reputation,
        Self::DnsFailure,
        Self::TlsFailure,
        Self::MessageTooLarge,
        Self::RateLimited,
        Self::Other,
    ];

    /// The class's name (`invalid-recipient`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRecipient => "invalid-recipient",
            Self::MailboxFull => "mailbox-full",
            Self::PolicyBlock => "policy-block",
            Self::Reputation => "reputation",
            Self::DnsFailure => "dns-failure",
            Self::TlsFailure => "tls-failure",
            Self::MessageTooLarge => "message-too-large",
            Self::RateLimited => "rate-limited",
            Self::Other => "other",
        }
    }
}

impl std::fmt::Display for BounceClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Delivery events, classification and suppression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventsConfig {
    /// Publish delivery events (CloudEvents JSON) to the events stream.
    #[serde(default = "crate::default_true")]
    pub enabled: bool,
    /// Events older than this are removed from the stream (a sink that is down longer loses
    /// the oldest ones).
    #[serde(default = "default_max_age")]
    pub max_age: HumanDuration,
    /// Largest size of the events stream; the oldest events go first.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// How long a delivery waits for the stream to confirm its events before it goes on
    /// without them (they are then counted as dropped).
    #[serde(default = "default_publish_timeout")]
    pub publish_timeout: HumanDuration,
    /// Extra classification rules, tried in order before the built-in table.
    #[serde(default)]
    pub classification: Vec<ClassificationRule>,
    /// The suppression list.
    #[serde(default)]
    pub suppression: SuppressionConfig,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_age: default_max_age(),
            max_bytes: default_max_bytes(),
            publish_timeout: default_publish_timeout(),
            classification: Vec::new(),
            suppression: SuppressionConfig::default(),
        }
    }
}

impl EventsConfig {
    /// Checks the rules' patterns and the limits.
    pub fn validate(&self, errors: &mut Vec<String>) {
        if self.max_age.0.is_zero() {
            errors.push("events.maxAge: must be more than 0".to_owned());
        }
        if self.max_bytes.0 < 1024 * 1024 {
            errors.push("events.maxBytes: must be at least 1Mi".to_owned());
        }
        for (i, rule) in self.classification.iter().enumerate() {
            if let Err(e) = regex::Regex::new(&rule.pattern) {
                errors.push(format!(
                    "events.classification[{i}].pattern: not a regular expression: {e}"
                ));
            }
            if let Some(status) = &rule.status
                && !status_prefix_is_valid(status)
            {
                errors.push(format!(
                    "events.classification[{i}].status: {status:?} must be an enhanced status code or its prefix, e.g. \"5.7.\" or \"4.2.2\""
                ));
            }
        }
        if self.suppression.expire_after.0.is_zero() {
            errors.push("events.suppression.expireAfter: must be more than 0".to_owned());
        }
    }
}

/// One extra classification rule: when the reply text matches `pattern` (and its enhanced
/// status code starts with `status`, when set), the reply is of class `class`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClassificationRule {
    /// A regular expression (Rust `regex` syntax) searched in the reply text, e.g.
    /// `(?i)mailbox (is )?full`.
    pub pattern: String,
    /// An enhanced status code or its prefix the reply must have, e.g. `"5.7."`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The class of a matching reply.
    pub class: BounceClass,
}

/// The suppression list of each MailDomain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SuppressionConfig {
    /// Add hard bounces of class `invalid-recipient` and complaints to the list, and skip
    /// suppressed recipients.
    #[serde(default = "crate::default_true")]
    pub enabled: bool,
    /// How long an automatic entry lasts.
    #[serde(default = "default_expire_after")]
    pub expire_after: HumanDuration,
    /// Refuse a suppressed recipient at `RCPT TO` on submission (`550 5.7.1` with
    /// `refuseText`) instead of accepting the message and reporting it `suppressed`.
    #[serde(default)]
    pub refuse_at_rcpt: bool,
    /// The text of that refusal.
    #[serde(default = "default_refuse_text")]
    pub refuse_text: String,
}

impl Default for SuppressionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            expire_after: default_expire_after(),
            refuse_at_rcpt: false,
            refuse_text: default_refuse_text(),
        }
    }
}

/// `d.d.d`, `d.d.`, `d.` or `d` with a class digit of 2, 4 or 5.
fn status_prefix_is_valid(status: &str) -> bool {
    let mut parts = status.split('.');
    let class_ok = matches!(parts.next(), Some("2" | "4" | "5"));
    class_ok
        && parts.all(|p| p.is_empty() || (p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit())))
        && status.split('.').count() <= 3
}

fn default_max_age() -> HumanDuration {
    // A week: long enough for a sink to be down over a weekend.
    HumanDuration::from_secs(7 * 86_400)
}

fn default_max_bytes() -> ByteSize {
    ByteSize(1024 * 1024 * 1024)
}

fn default_publish_timeout() -> HumanDuration {
    HumanDuration::from_secs(2)
}

fn default_expire_after() -> HumanDuration {
    // 90 days: an address that bounced as unknown is rarely revived sooner.
    HumanDuration::from_secs(90 * 86_400)
}

fn default_refuse_text() -> String {
    "recipient address is on this domain's suppression list (earlier hard bounce or complaint)"
        .to_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rules_and_limits_are_checked() {
        let config: EventsConfig = serde_yaml::from_str(
            r#"
classification:
  - { pattern: "(?i)quota exceeded", class: mailbox-full }
  - { pattern: "(unclosed", class: other }
  - { pattern: "x", status: "7.1", class: reputation }
suppression: { expireAfter: 0 }
"#,
        )
        .unwrap();
        let mut errors = Vec::new();
        config.validate(&mut errors);
        let all = errors.join("\n");
        assert!(all.contains("classification[1].pattern"), "{all}");
        assert!(all.contains("classification[2].status"), "{all}");
        assert!(all.contains("suppression.expireAfter"), "{all}");
        assert_eq!(errors.len(), 3, "{all}");
        assert_eq!(config.classification[0].class, BounceClass::MailboxFull);
    }

    #[test]
    fn status_prefixes() {
        for ok in ["5", "5.", "5.7.", "4.2.2", "5.7.26"] {
            assert!(status_prefix_is_valid(ok), "{ok}");
        }
        for bad in ["7.1", "", "5.x", "5.1.1.1"] {
            assert!(!status_prefix_is_valid(bad), "{bad}");
        }
    }
}
