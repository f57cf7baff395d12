//! `domains`: the mail domains a node serves, with everything that is per domain: recipients,
//! submission users, limits, the inbound target (LMTP or SMTP), the relay for outbound mail and
//! the DKIM keys that sign it.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, HumanDuration};

/// Default message size limit: 25 MiB, what large providers accept.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 25 * 1024 * 1024;
/// RFC 5321 4.5.3.1.8: a server MUST be able to take at least 100 recipients.
pub const DEFAULT_MAX_RECIPIENTS: u32 = 100;
/// Hard ceiling for `maxMessageSize`: bodies are held in memory while received.
pub const MAX_MESSAGE_SIZE_CEILING: u64 = 1024 * 1024 * 1024;

/// A mail domain served by this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DomainConfig {
    /// The domain, lower case, no trailing dot (e.g. `example.com`).
    pub name: String,
    /// Recipients that exist: local parts (`bob`) or full addresses (`bob@example.com`).
    /// Matched case-insensitively.
    #[serde(default)]
    pub recipients: Vec<String>,
    /// Accept every local part of this domain.
    #[serde(default)]
    pub catch_all: bool,
    /// Submission users: one `user:hash` per line, user being `name` or `name@domain`, hash an
    /// argon2 PHC string or a bcrypt hash. Re-read when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users_file: Option<PathBuf>,
    /// Sender addresses each submission user may use, in MAIL FROM and in the `From:` header
    /// (like Postfix's `smtpd_sender_login_maps`): the user (a local part or an address of
    /// this domain, as in the users file) mapped to a list of patterns, each an address
    /// (`team@example.com`) or `*@<domain>` (any address of that domain). A user not listed
    /// may use any address of this domain. Other senders are refused: `553 5.7.1` at MAIL,
    /// `550 5.7.1` for the `From:` header. Whatever the sender, mail is DKIM-signed only for
    /// this domain.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub allowed_senders: BTreeMap<String, Vec<String>>,
    /// Limits for this domain.
    #[serde(default)]
    pub limits: DomainLimits,
    /// Where mail for this domain's recipients is delivered (LMTP or SMTP). Unset: the domain
    /// receives no mail; its recipients are refused at RCPT with `550 5.1.1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<InboundTarget>,
    /// Smarthost for this domain's outbound mail. Unset: direct delivery to the recipients'
    /// MX hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayConfig>,
    /// DKIM keys that sign this domain's outbound mail at acceptance.
    #[serde(default, skip_serializing_if = "DkimConfig::is_empty")]
    pub dkim: DkimConfig,
    /// This domain's MTA-STS policy file (RFC 8461 3.2), served by `mtaStsServer` at
    /// `https://mta-sts.<name>/.well-known/mta-sts.txt` exactly as written here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mta_sts_policy: Option<String>,
    /// This domain's retry schedule: the waits between attempts, in order, the last one
    /// repeating until the lifetime ends. Empty: `delivery.retry.intervals`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_intervals: Vec<HumanDuration>,
    /// This domain's own certificate, served to clients that ask for `hostname` by SNI (a
    /// node serving many domains); others get the node's `tls` certificate. Re-read when the
    /// files change, like the node's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<DomainTls>,
}

/// A domain's certificate, chosen by SNI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DomainTls {
    /// The host name clients connect to for this domain (its MX target, e.g. `mx.example.com`),
    /// matched against the TLS server name indication, case-insensitively.
    pub hostname: String,
    /// Certificate chain, leaf first (PEM).
    pub cert_file: PathBuf,
    /// Private key (PEM).
    pub key_file: PathBuf,
}

/// Per-domain limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DomainLimits {
    /// Largest message accepted (SIZE), default 25 MiB.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: ByteSize,
    /// Recipients per message; more get `452 4.5.3`.
    #[serde(default = "default_max_recipients")]
    pub max_recipients: u32,
    /// Messages an authenticated user may submit per minute; more get `451 4.7.1`.
    #[serde(default = "default_messages_per_minute")]
    pub messages_per_minute_per_user: u32,
}

/// Where mail for a local domain's recipients goes (the `inbound.forward` of a MailDomain).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundTarget {
    /// Host name (resolved with the system resolver: it is usually a cluster service) or IP.
    pub host: String,
    pub port: u16,
    /// `lmtp` (RFC 2033, one reply per recipient after the data) or `smtp`.
    #[serde(default)]
    pub protocol: ForwardProtocol,
    /// STARTTLS towards the target: `opportunistic` (default), `required` or `none`.
    #[serde(default)]
    pub tls: InboundTls,
}

/// Protocol spoken to an inbound target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ForwardProtocol {
    #[default]
    Lmtp,
    Smtp,
}

/// TLS towards an inbound target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum InboundTls {
    #[default]
    Opportunistic,
    Required,
    None,
}

/// An outbound smarthost (a rendered `Relay` resource).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayConfig {
    /// Name used in logs and metrics (the Relay resource's name).
    #[serde(default = "default_relay_name")]
    pub name: String,
    pub host: String,
    #[serde(default = "default_relay_port")]
    pub port: u16,
    /// `startTlsRequired` (default), `implicit` (TLS from the first byte, port 465) or
    /// `opportunistic`. Credentials are only ever sent inside verified TLS.
    #[serde(default)]
    pub tls: RelayTls,
    /// Verify the relay's certificate (Mozilla roots plus `delivery.tls.extraCaFile`).
    #[serde(default = "crate::default_true")]
    pub verify_certificate: bool,
    /// SMTP AUTH credentials (PLAIN, else LOGIN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<RelayAuth>,
    /// Messages per second this node sends through the relay. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_second: Option<u32>,
}

/// TLS mode of a relay connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RelayTls {
    #[default]
    StartTlsRequired,
    Implicit,
    Opportunistic,
}

/// Relay credentials, read from files (a mounted Secret with keys `username` and
/// `password`), never written inline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayAuth {
    pub username_file: PathBuf,
    pub password_file: PathBuf,
}

/// DKIM signing keys of a domain. Every key signs (typically one RSA and one Ed25519).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DkimConfig {
    #[serde(default)]
    pub keys: Vec<DkimKeyConfig>,
}

/// One DKIM key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DkimKeyConfig {
    /// The selector (`s=`), published at `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// Private key, PEM: PKCS#8 (RSA of at least 2048 bits, or Ed25519) or PKCS#1 RSA. The
    /// algorithm follows from the key.
    pub key_file: PathBuf,
}

impl DomainConfig {
    /// Whether `local_part` is a recipient of this domain (listed, or the domain is
    /// catch-all).
    pub fn has_recipient(&self, local_part: &str) -> bool {
        self.catch_all || self.lists_recipient(local_part)
    }

    /// Whether `local_part` is one of the listed `recipients`.
    pub fn lists_recipient(&self, local_part: &str) -> bool {
        self.recipients.iter().any(|r| {
            let local = r.rsplit_once('@').map_or(r.as_str(), |(l, _)| l);
            local.eq_ignore_ascii_case(local_part)
        })
    }

    /// The sender patterns of the user `user` (a full address of this domain, as
    /// authentication names it), or `None` when it has no list and may use any address of
    /// this domain.
    pub fn sender_patterns(&self, user: &str) -> Option<&[String]> {
        self.allowed_senders.iter().find_map(|(key, patterns)| {
            let same = match key.rsplit_once('@') {
                Some(_) => key.eq_ignore_ascii_case(user),
                None => user.rsplit_once('@').is_some_and(|(local, domain)| {
                    local.eq_ignore_ascii_case(key) && domain.eq_ignore_ascii_case(&self.name)
                }),
            };
            same.then_some(patterns.as_slice())
        })
    }

    /// Whether the user `user` of this domain may use `address` as a sender (MAIL FROM or a
    /// `From:` mailbox): its patterns when it has a list, else any address of this domain.
    pub fn sender_allowed(&self, user: &str, address: &str) -> bool {
        let Some((_, domain)) = address.rsplit_once('@') else {
            return false;
        };
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        match self.sender_patterns(user) {
            None => domain.eq_ignore_ascii_case(&self.name),
            Some(patterns) => patterns.iter().any(|p| match p.strip_prefix("*@") {
                Some(d) => d.eq_ignore_ascii_case(domain),
                None => p.eq_ignore_ascii_case(address),
            }),
        }
    }

    /// Checks this domain's settings; `path` names it in messages (`domains[0]`).
    pub fn validate(&self, path: &str, errors: &mut Vec<String>) {
        if let Err(e) = validate_domain_name(&self.name) {
            errors.push(format!("{path}.name: {e}"));
        }
        for (j, r) in self.recipients.iter().enumerate() {
            let local = match r.rsplit_once('@') {
                Some((local, domain)) => {
                    if !domain.eq_ignore_ascii_case(&self.name) {
                        errors.push(format!(
                            "{path}.recipients[{j}]: {r:?} is not in domain {:?}",
                            self.name
                        ));
                    }
                    local
                }
                None => r.as_str(),
            };
            if local.is_empty()
                || local.len() > 64
                || local.bytes().any(|b| b <= b' ' || b == b'@' || b == 0x7f)
            {
                errors.push(format!(
                    "{path}.recipients[{j}]: {r:?} is not a valid local part (1-64 printable characters, no spaces)"
                ));
            }
        }
        crate::delivery::validate_intervals(
            &format!("{path}.retryIntervals"),
            &self.retry_intervals,
            errors,
        );
        let limits = &self.limits;
        if limits.max_message_size.0 < 1024 || limits.max_message_size.0 > MAX_MESSAGE_SIZE_CEILING
        {
            errors.push(format!(
                "{path}.limits.maxMessageSize: {} must be between 1Ki and 1Gi",
                limits.max_message_size.0
            ));
        }
        if limits.max_recipients == 0 {
            errors.push(format!("{path}.limits.maxRecipients: must be at least 1"));
        }
        if limits.messages_per_minute_per_user == 0 {
            errors.push(format!(
                "{path}.limits.messagesPerMinutePerUser: must be at least 1"
            ));
        }
        if let Some(target) = &self.inbound {
            if target.host.trim().is_empty() {
                errors.push(format!("{path}.inbound.host: must not be empty"));
            }
            if target.port == 0 {
                errors.push(format!("{path}.inbound.port: must not be 0"));
            }
        }
        if let Some(relay) = &self.relay {
            relay.validate(&format!("{path}.relay"), errors);
        }
        if let Some(tls) = &self.tls
            && let Err(e) = validate_domain_name(&tls.hostname)
        {
            errors.push(format!("{path}.tls.hostname: {e}"));
        }
        for (user, patterns) in &self.allowed_senders {
            let user_ok = match user.rsplit_once('@') {
                Some((local, domain)) => {
                    !local.is_empty() && domain.eq_ignore_ascii_case(&self.name)
                }
                None => !user.is_empty(),
            };
            if !user_ok {
                errors.push(format!(
                    "{path}.allowedSenders: {user:?} is not a user of domain {:?}",
                    self.name
                ));
            }
            for (j, pattern) in patterns.iter().enumerate() {
                if let Err(e) = validate_sender_pattern(pattern) {
                    errors.push(format!("{path}.allowedSenders[{user:?}][{j}]: {e}"));
                }
            }
        }
        if let Some(policy) = &self.mta_sts_policy
            && (!policy.starts_with("version: STSv1") || policy.len() > 64 * 1024)
        {
            errors.push(format!(
                "{path}.mtaStsPolicy: must be an MTA-STS policy starting with \"version: STSv1\" (at most 64 KiB)"
            ));
        }
        let mut selectors = HashSet::new();
        for (j, key) in self.dkim.keys.iter().enumerate() {
            let ok = !key.selector.is_empty()
                && key.selector.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
            if !ok {
                errors.push(format!(
                    "{path}.dkim.keys[{j}].selector: {:?} must be DNS labels (letters, digits, '-', '_')",
                    key.selector
                ));
            }
            if !selectors.insert(key.selector.as_str()) {
                errors.push(format!(
                    "{path}.dkim.keys[{j}].selector: duplicate selector {:?}",
                    key.selector
                ));
            }
        }
    }
}

impl Default for DomainLimits {
    fn default() -> Self {
        Self {
            max_message_size: default_max_message_size(),
            max_recipients: default_max_recipients(),
            messages_per_minute_per_user: default_messages_per_minute(),
        }
    }
}

impl DkimConfig {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl RelayConfig {
    /// Checks a relay's settings; `path` names it in messages.
    pub fn validate(&self, path: &str, errors: &mut Vec<String>) {
        if self.host.trim().is_empty() {
            errors.push(format!("{path}.host: must not be empty"));
        }
        if self.port == 0 {
            errors.push(format!("{path}.port: must not be 0"));
        }
        if self.messages_per_second == Some(0) {
            errors.push(format!(
                "{path}.messagesPerSecond: must be at least 1 (or unset)"
            ));
        }
        if self.auth.is_some() && self.tls == RelayTls::Opportunistic {
            errors.push(format!(
                "{path}.tls: opportunistic TLS cannot carry credentials; use startTlsRequired or implicit"
            ));
        }
    }
}

/// Checks one `allowedSenders` pattern: `local@domain` or `*@domain`.
fn validate_sender_pattern(pattern: &str) -> Result<(), String> {
    let Some((local, domain)) = pattern.rsplit_once('@') else {
        return Err(format!("{pattern:?} must be an address or *@<domain>"));
    };
    if local.is_empty() || local.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(format!("{pattern:?} has no usable local part"));
    }
    validate_domain_name(&domain.to_ascii_lowercase())
}

/// Checks an RFC 1035 host/domain name the way the node compares them: lower case, LDH labels,
/// no trailing dot.
pub fn validate_domain_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err(format!("{name:?} must be 1 to 253 characters"));
    }
    if name.ends_with('.') {
        return Err(format!("{name:?} must not end with a dot"));
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(format!(
                "{name:?} is not a lower-case domain name (labels of a-z, 0-9 and '-', 1-63 characters)"
            ));
        }
    }
    Ok(())
}

fn default_max_message_size() -> ByteSize {
    ByteSize(DEFAULT_MAX_MESSAGE_SIZE)
}
fn default_max_recipients() -> u32 {
    DEFAULT_MAX_RECIPIENTS
}
fn default_messages_per_minute() -> u32 {
    60
}

fn default_relay_name() -> String {
    "relay".to_owned()
}
// RFC 6409 submission port, what smarthosts offer.
fn default_relay_port() -> u16 {
    587
}
