//! `delivery`: the sending side of a node: workers, the retry schedule and queue lifetime,
//! SMTP client timeouts, connection reuse, TLS towards MX hosts and the JetStream consumer.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::network::Network;
use crate::timeouts::{
    default_five_minutes, default_ten_minutes, default_three_minutes, default_two_minutes,
};
use crate::tls_policy::{DaneConfig, MtaStsConfig, TlsPolicyOverride, TlsRptConfig};
use crate::units::{ByteSize, HumanDuration};

/// The node-wide delivery settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Run delivery workers on this node. A node with `false` only receives.
    #[serde(default = "crate::default_true")]
    pub enabled: bool,
    /// Messages this node delivers at the same time, per domain consumer.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// TCP port of remote MX hosts (25; tests point it at a local fake MX).
    #[serde(default = "default_mx_port")]
    pub mx_port: u16,
    /// Networks (CIDR) delivery may connect to although they are in a blocked range
    /// (loopback, private, link-local, ...). Only for tests and special set-ups:
    /// `["127.0.0.0/8"]` lets a test MX on loopback receive mail.
    #[serde(default)]
    pub allowed_networks: Vec<String>,
    /// More networks (CIDR) delivery must never connect to, e.g. the cluster's pod and service
    /// ranges when they are public addresses.
    #[serde(default)]
    pub blocked_networks: Vec<String>,
    /// Retry schedule and queue lifetime.
    #[serde(default)]
    pub retry: RetryConfig,
    /// SMTP client timeouts (RFC 5321 4.5.3.2).
    #[serde(default)]
    pub timeouts: ClientTimeouts,
    /// Connection reuse and per-destination limits.
    #[serde(default)]
    pub connections: ConnectionConfig,
    /// TLS towards remote MX hosts.
    #[serde(default)]
    pub tls: OutboundTlsConfig,
    /// The JetStream consumer each domain's workers share.
    #[serde(default)]
    pub consumer: ConsumerConfig,
    /// Largest part of the original message quoted in a bounce (Postfix `bounce_size_limit`);
    /// larger originals are returned as headers only.
    #[serde(default = "default_bounce_size_limit")]
    pub bounce_size_limit: ByteSize,
    /// How often an entry held back by a delivery pause is looked at again: after a pause
    /// ends (deleted or expired) its mail goes out within this time.
    #[serde(default = "default_pause_check_interval")]
    pub pause_check_interval: HumanDuration,
    /// Per-destination connection and rate limits shared by every node.
    #[serde(default)]
    pub shaping: ShapingConfig,
}

/// Per-destination traffic shaping, enforced across every node through JetStream KV: a
/// connection needs one of the destination's `maxConnections` leases, a message needs a
/// send time from its `messagesPerMinute`. A destination is the first rule whose
/// `domains` or `mxHosts` match (user rules first, then the built-in providers), else the
/// recipient domain with the `default` limits. A `421` or `4.7.x` answer halves the
/// destination's rate (for every node); each `backoff.recoverAfter` without one doubles it
/// back, up to the configured rate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShapingConfig {
    /// Enforce the limits cluster-wide. `false`: only this node's
    /// `connections.perDestination`, no rates, no back-off.
    #[serde(default = "crate::default_true")]
    pub enabled: bool,
    /// Longest wait for a connection slot or a send time; after it the entry is put back
    /// for a few seconds, without counting an attempt.
    #[serde(default = "default_max_wait")]
    pub max_wait: HumanDuration,
    /// Limits of destinations no rule names.
    #[serde(default)]
    pub default: ShapingLimits,
    /// Named destinations, matched in order before the built-in providers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<ShapingRule>,
    /// Match the big providers' MX hosts with built-in rules ([`builtin_rules`]) after
    /// `destinations`.
    #[serde(default = "crate::default_true")]
    pub builtin_providers: bool,
    /// Reaction to `421` and `4.7.x` answers.
    #[serde(default)]
    pub backoff: BackoffConfig,
}

/// Connection and rate limits of a destination, over all nodes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShapingLimits {
    /// Connections open to it at once (busy or idle). Unset: no cluster-wide limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Messages sent to it per minute. Unset: no limit until it answers `421`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_minute: Option<u32>,
}

/// A named destination: a provider's MX hosts or a set of recipient domains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShapingRule {
    /// Its name (letters, digits, `-`): the key of its shared state and its metrics label.
    pub name: String,
    /// Recipient domains (`example.com`, or `*.example.com` for its subdomains).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    /// MX host names, same patterns (`*.google.com` is every Gmail MX).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mx_hosts: Vec<String>,
    /// Connections open to it at once over all nodes. Unset: no cluster-wide limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Messages sent to it per minute over all nodes. Unset: no limit until it answers `421`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_minute: Option<u32>,
}

impl ShapingRule {
    /// Its limits.
    pub fn limits(&self) -> ShapingLimits {
        ShapingLimits {
            max_connections: self.max_connections,
            messages_per_minute: self.messages_per_minute,
        }
    }
}

/// The automatic back-off after `421` / `4.7.x` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackoffConfig {
    /// Time without such an answer after which the rate is doubled again.
    #[serde(default = "default_recover_after")]
    pub recover_after: HumanDuration,
    /// The rate a destination without `messagesPerMinute` starts from when it first answers
    /// `421`.
    #[serde(default = "default_unlimited_rate")]
    pub initial_messages_per_minute: u32,
    /// The rate never goes below this.
    #[serde(default = "default_min_rate")]
    pub min_messages_per_minute: u32,
}

impl Default for ShapingConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_wait: default_max_wait(),
            default: ShapingLimits::default(),
            destinations: Vec::new(),
            builtin_providers: true,
            backoff: BackoffConfig::default(),
        }
    }
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            recover_after: default_recover_after(),
            initial_messages_per_minute: default_unlimited_rate(),
            min_messages_per_minute: default_min_rate(),
        }
    }
}

/// The built-in provider rules: starting points from the providers' published sender
/// guidelines (connection counts they tolerate from one sending cluster without `421`s);
/// rates are left to the back-off. Override one by a `destinations` rule of the same MX
/// hosts.
pub fn builtin_rules() -> Vec<ShapingRule> {
    let rule = |name: &str, mx: &[&str], connections: u32| ShapingRule {
        name: name.to_owned(),
        domains: Vec::new(),
        mx_hosts: mx.iter().map(|m| (*m).to_owned()).collect(),
        max_connections: Some(connections),
        messages_per_minute: None,
    };
    vec![
        rule("gmail", &["*.google.com", "*.googlemail.com"], 20),
        rule("microsoft", &["*.protection.outlook.com"], 10),
        rule("yahoo", &["*.yahoodns.net"], 5),
        rule("icloud", &["*.mail.icloud.com"], 5),
    ]
}

/// When to try again and when to give up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConfig {
    /// Shortest wait before a retry (Postfix `minimal_backoff_time`, 300 s).
    #[serde(default = "default_min_backoff")]
    pub min_backoff: HumanDuration,
    /// Longest wait between retries (Postfix `maximal_backoff_time`, 4000 s).
    #[serde(default = "default_max_backoff")]
    pub max_backoff: HumanDuration,
    /// How long a message may stay queued before it is returned to the sender (RFC 5321
    /// 4.5.4.1: at least 4-5 days).
    #[serde(default = "default_lifetime")]
    pub lifetime: HumanDuration,
    /// The same for bounces (null sender), which are dropped, not bounced, when it ends.
    #[serde(default = "default_lifetime")]
    pub bounce_lifetime: HumanDuration,
    /// Send the sender one "delayed" notice when a message is still queued after this long.
    /// Unset: never (Postfix `delay_warning_time` 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_warning: Option<HumanDuration>,
    /// The waits between attempts, in order (`["5m", "15m", "1h", "4h"]`), the last one
    /// repeating until the lifetime ends; a domain's `retryIntervals` replace them. Empty:
    /// the message's age clamped to `[minBackoff, maxBackoff]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub intervals: Vec<HumanDuration>,
}

impl RetryConfig {
    /// The wait after attempt number `attempts` (1 = the first attempt) of a message that is
    /// `age` old, before jitter: `intervals[attempts - 1]` (the last one repeating), or the
    /// age clamped to `[minBackoff, maxBackoff]`.
    pub fn base_wait(&self, attempts: u32, age: Duration) -> Duration {
        match self.intervals.as_slice() {
            [] => age.clamp(
                self.min_backoff.0,
                self.max_backoff.0.max(self.min_backoff.0),
            ),
            list => {
                let i = (attempts.max(1) as usize - 1).min(list.len() - 1);
                list[i].0
            }
        }
    }

    /// The attempt times still planned for a message accepted at `accepted_at` (plus its
    /// time held or paused, `suspended`) whose next attempt (number `attempts + 1`) is at
    /// `next`, without jitter, up to the end of its lifetime (the last attempt exactly
    /// there). At most `limit` times.
    pub fn planned(
        &self,
        accepted_at: SystemTime,
        suspended: Duration,
        attempts: u32,
        next: SystemTime,
        null_sender: bool,
        limit: usize,
    ) -> Vec<SystemTime> {
        let lifetime = if null_sender {
            self.bounce_lifetime.0
        } else {
            self.lifetime.0
        };
        let start = accepted_at + suspended;
        let end = start + lifetime;
        let mut out = Vec::new();
        let mut at = next;
        // The number of the attempt at `at`; the wait after it depends on it.
        let mut n = attempts + 1;
        while out.len() < limit {
            let t = at.min(end);
            out.push(t);
            if t >= end {
                break;
            }
            let age = t.duration_since(start).unwrap_or(Duration::ZERO);
            at = t + self.base_wait(n, age).max(Duration::from_secs(1));
            n += 1;
        }
        out
    }

    /// This config with a domain's own intervals, when it has some.
    pub fn for_domain(&self, intervals: &[HumanDuration]) -> Self {
        if intervals.is_empty() {
            self.clone()
        } else {
            Self {
                intervals: intervals.to_vec(),
                ..self.clone()
            }
        }
    }
}

/// Checks a list of retry intervals: every wait at least a second.
pub fn validate_intervals(path: &str, intervals: &[HumanDuration], errors: &mut Vec<String>) {
    for (i, d) in intervals.iter().enumerate() {
        if d.0 < Duration::from_secs(1) {
            errors.push(format!("{path}[{i}]: must be at least 1s"));
        }
    }
}

/// SMTP client timeouts; RFC 5321 4.5.3.2 gives the minimums for the SMTP phases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientTimeouts {
    /// TCP connect (Postfix `smtp_connect_timeout`, 30 s).
    #[serde(default = "default_connect")]
    pub connect: HumanDuration,
    /// Initial 220 greeting (4.5.3.2.1, 5 min).
    #[serde(default = "default_five_minutes")]
    pub greeting: HumanDuration,
    /// EHLO/LHLO, STARTTLS, AUTH, RSET replies and the TLS handshake (Postfix
    /// `smtp_helo_timeout`, 5 min).
    #[serde(default = "default_five_minutes")]
    pub command: HumanDuration,
    /// MAIL reply (4.5.3.2.2, 5 min).
    #[serde(default = "default_five_minutes")]
    pub mail: HumanDuration,
    /// Each RCPT reply (4.5.3.2.3, 5 min).
    #[serde(default = "default_five_minutes")]
    pub rcpt: HumanDuration,
    /// DATA initiation, waiting for 354 (4.5.3.2.4, 2 min).
    #[serde(default = "default_two_minutes")]
    pub data_init: HumanDuration,
    /// Each write of message data (4.5.3.2.5, 3 min).
    #[serde(default = "default_three_minutes")]
    pub data_block: HumanDuration,
    /// Reply after the final dot (4.5.3.2.6, 10 min).
    #[serde(default = "default_ten_minutes")]
    pub data_termination: HumanDuration,
}

/// Connection reuse and per-destination concurrency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionConfig {
    /// Connections this node keeps open to one destination (a recipient domain, a relay or
    /// an inbound target) at the same time (Postfix
    /// `default_destination_concurrency_limit`, 20).
    #[serde(default = "default_per_destination")]
    pub per_destination: u32,
    /// How long an idle connection is kept for reuse (Postfix
    /// `smtp_connection_cache_time_limit`, 2 s; a little longer suits a queue that pulls in
    /// batches).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// Messages sent over one connection before it is closed (Postfix
    /// `smtp_connection_reuse_count_limit`, 0 = unlimited; a bound spreads load after DNS
    /// changes).
    #[serde(default = "default_max_messages_per_connection")]
    pub max_messages_per_connection: u32,
}

/// TLS policy towards MX hosts (relays and inbound targets have their own).
///
/// Precedence for a recipient domain (README "Outbound TLS policy"): a `policies` entry for
/// it; else DANE where its MX hosts have DNSSEC-signed TLSA records (RFC 8461 2: DANE wins
/// over MTA-STS); else its MTA-STS policy; else `mx`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundTlsConfig {
    /// `opportunistic` (default): STARTTLS when offered, without certificate verification,
    /// plaintext when not offered or when the handshake fails (RFC 7435; what MTAs do without
    /// MTA-STS or DANE). `required`: STARTTLS with a verified certificate, else defer.
    #[serde(default)]
    pub mx: MxTlsPolicy,
    /// Extra CA certificates (PEM) trusted in addition to the Mozilla roots, for relays and
    /// verified MX connections (a private smarthost CA, or a test CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_ca_file: Option<PathBuf>,
    /// MTA-STS of recipient domains (RFC 8461).
    #[serde(default)]
    pub mta_sts: MtaStsConfig,
    /// DANE (RFC 7672) with a DNSSEC-validating resolver.
    #[serde(default)]
    pub dane: DaneConfig,
    /// Fixed policies for some recipient domains (a partner that must always get verified
    /// TLS), instead of what their DNS says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<TlsPolicyOverride>,
    /// Daily TLS-RPT reports (RFC 8460).
    #[serde(default)]
    pub reports: TlsRptConfig,
}

/// How MX connections use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MxTlsPolicy {
    #[default]
    Opportunistic,
    Required,
}

/// The durable JetStream pull consumer of a domain, shared by all its replicas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Time the server waits for an acknowledgement before redelivering. Workers send
    /// progress acknowledgements every third of it while a delivery runs, so a long delivery
    /// keeps its message; a crashed worker's messages come back after this long.
    #[serde(default = "default_ack_wait")]
    pub ack_wait: HumanDuration,
    /// Deliveries of one queue entry before the server stops (JetStream `max_deliver`, at
    /// least 4). A retry is a new entry, so this counts interrupted attempts (crashes,
    /// restarts) and a retry's one early pull; an entry that reaches its second-to-last
    /// delivery is bounced instead of attempted (a poison message), the last one stays spare.
    #[serde(default = "default_max_deliver")]
    pub max_deliver: u32,
    /// Entries handed out and not yet acknowledged, over all replicas. Deferred entries wait
    /// for their retry time as pending entries, so this bounds the deferred queue that is
    /// being timed (Postfix `qmgr_message_active_limit`, 20000).
    #[serde(default = "default_max_ack_pending")]
    pub max_ack_pending: u32,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            concurrency: default_concurrency(),
            mx_port: default_mx_port(),
            allowed_networks: Vec::new(),
            blocked_networks: Vec::new(),
            retry: RetryConfig::default(),
            timeouts: ClientTimeouts::default(),
            connections: ConnectionConfig::default(),
            tls: OutboundTlsConfig::default(),
            consumer: ConsumerConfig::default(),
            bounce_size_limit: default_bounce_size_limit(),
            pause_check_interval: default_pause_check_interval(),
            shaping: ShapingConfig::default(),
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            min_backoff: default_min_backoff(),
            max_backoff: default_max_backoff(),
            lifetime: default_lifetime(),
            bounce_lifetime: default_lifetime(),
            delay_warning: None,
            intervals: Vec::new(),
        }
    }
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        Self {
            connect: default_connect(),
            greeting: default_five_minutes(),
            command: default_five_minutes(),
            mail: default_five_minutes(),
            rcpt: default_five_minutes(),
            data_init: default_two_minutes(),
            data_block: default_three_minutes(),
            data_termination: default_ten_minutes(),
        }
    }
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        Self {
            per_destination: default_per_destination(),
            idle_timeout: default_idle_timeout(),
            max_messages_per_connection: default_max_messages_per_connection(),
        }
    }
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            ack_wait: default_ack_wait(),
            max_deliver: default_max_deliver(),
            max_ack_pending: default_max_ack_pending(),
        }
    }
}

impl DeliveryConfig {
    /// Checks what serde cannot; each problem is reported with its field path.
    pub fn validate(&self, errors: &mut Vec<String>) {
        if self.concurrency == 0 {
            errors.push("delivery.concurrency: must be at least 1".to_owned());
        }
        if self.mx_port == 0 {
            errors.push("delivery.mxPort: must not be 0".to_owned());
        }
        for (field, list) in [
            ("allowedNetworks", &self.allowed_networks),
            ("blockedNetworks", &self.blocked_networks),
        ] {
            for (i, net) in list.iter().enumerate() {
                if let Err(e) = Network::parse(net) {
                    errors.push(format!("delivery.{field}[{i}]: {e}"));
                }
            }
        }
        let r = &self.retry;
        if r.min_backoff.0.is_zero() {
            errors.push("delivery.retry.minBackoff: must be greater than 0".to_owned());
        }
        if r.max_backoff < r.min_backoff {
            errors.push("delivery.retry.maxBackoff: must not be less than minBackoff".to_owned());
        }
        if r.lifetime.0.is_zero() || r.bounce_lifetime.0.is_zero() {
            errors
                .push("delivery.retry.lifetime/bounceLifetime: must be greater than 0".to_owned());
        }
        validate_intervals("delivery.retry.intervals", &r.intervals, errors);
        if self.pause_check_interval.0 < Duration::from_secs(1) {
            errors.push("delivery.pauseCheckInterval: must be at least 1s".to_owned());
        }
        self.shaping.validate(errors);
        if self.connections.per_destination == 0 {
            errors.push("delivery.connections.perDestination: must be at least 1".to_owned());
        }
        let c = &self.consumer;
        // Progress acknowledgements go out every third of ackWait; below a second that is a
        // flood of acks for nothing.
        if c.ack_wait.0 < std::time::Duration::from_secs(1) {
            errors.push("delivery.consumer.ackWait: must be at least 1s".to_owned());
        }
        // A retry's early pull, one real attempt, the poison bounce and a spare.
        if c.max_deliver < 4 {
            errors.push("delivery.consumer.maxDeliver: must be at least 4".to_owned());
        }
        if c.max_ack_pending == 0 {
            errors.push("delivery.consumer.maxAckPending: must be at least 1".to_owned());
        }
        self.tls.mta_sts.validate(errors);
        crate::tls_policy::validate_overrides(&self.tls.policies, &self.tls.dane, errors);
        if self.tls.reports.check_interval.0.is_zero() {
            errors.push("delivery.tls.reports.checkInterval: must be greater than 0".to_owned());
        }
        let t = &self.timeouts;
        for (name, value) in [
            ("connect", t.connect),
            ("greeting", t.greeting),
            ("command", t.command),
            ("mail", t.mail),
            ("rcpt", t.rcpt),
            ("dataInit", t.data_init),
            ("dataBlock", t.data_block),
            ("dataTermination", t.data_termination),
        ] {
            if value.0.is_zero() {
                errors.push(format!("delivery.timeouts.{name}: must be greater than 0"));
            }
        }
    }
}

impl ShapingConfig {
    fn validate(&self, errors: &mut Vec<String>) {
        if self.max_wait.0.is_zero() {
            errors.push("delivery.shaping.maxWait: must be greater than 0".to_owned());
        }
        let limits = |path: &str, l: &ShapingLimits, errors: &mut Vec<String>| {
            if l.max_connections == Some(0) {
                errors.push(format!(
                    "{path}.maxConnections: must be at least 1 (or unset)"
                ));
            }
            if l.messages_per_minute == Some(0) {
                errors.push(format!(
                    "{path}.messagesPerMinute: must be at least 1 (or unset)"
                ));
            }
        };
        limits("delivery.shaping.default", &self.default, errors);
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.destinations.iter().enumerate() {
            let path = format!("delivery.shaping.destinations[{i}]");
            let name_ok = !r.name.is_empty()
                && r.name.len() <= 63
                && r.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !name_ok {
                errors.push(format!(
                    "{path}.name: {:?} must be 1-63 lower-case letters, digits and '-'",
                    r.name
                ));
            }
            if !names.insert(r.name.as_str()) {
                errors.push(format!("{path}.name: {:?} is used twice", r.name));
            }
            if r.domains.is_empty() && r.mx_hosts.is_empty() {
                errors.push(format!("{path}: name at least one of domains and mxHosts"));
            }
            for p in r.domains.iter().chain(&r.mx_hosts) {
                let bare = p.strip_prefix("*.").unwrap_or(p);
                if crate::domain::validate_domain_name(&bare.to_ascii_lowercase()).is_err() {
                    errors.push(format!(
                        "{path}: {p:?} is not a host name or *.name pattern"
                    ));
                }
            }
            limits(&path, &r.limits(), errors);
        }
        let b = &self.backoff;
        if b.recover_after.0 < Duration::from_secs(1) {
            errors.push("delivery.shaping.backoff.recoverAfter: must be at least 1s".to_owned());
        }
        if b.min_messages_per_minute == 0 || b.initial_messages_per_minute == 0 {
            errors.push(
                "delivery.shaping.backoff: minMessagesPerMinute and initialMessagesPerMinute must be at least 1"
                    .to_owned(),
            );
        }
    }
}

fn default_pause_check_interval() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_max_wait() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_recover_after() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_unlimited_rate() -> u32 {
    120
}
fn default_min_rate() -> u32 {
    2
}

fn default_concurrency() -> u32 {
    16
}
fn default_mx_port() -> u16 {
    25
}
// Postfix bounce_size_limit.
fn default_bounce_size_limit() -> ByteSize {
    ByteSize(50_000)
}
fn default_min_backoff() -> HumanDuration {
    HumanDuration::from_secs(300)
}
fn default_max_backoff() -> HumanDuration {
    HumanDuration::from_secs(4000)
}
fn default_lifetime() -> HumanDuration {
    HumanDuration::from_secs(5 * 24 * 3600)
}
fn default_connect() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_per_destination() -> u32 {
    20
}
fn default_idle_timeout() -> HumanDuration {
    HumanDuration::from_secs(10)
}
fn default_max_messages_per_connection() -> u32 {
    100
}
// The JetStream default.
fn default_ack_wait() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_max_deliver() -> u32 {
    10
}
fn default_max_ack_pending() -> u32 {
    20_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn intervals_replace_the_age_based_schedule_and_the_last_one_repeats() {
        let age_based = RetryConfig::default();
        assert_eq!(
            age_based.base_wait(3, Duration::from_secs(10)),
            Duration::from_secs(300)
        );
        let listed = RetryConfig {
            intervals: vec![HumanDuration::from_secs(60), HumanDuration::from_secs(600)],
            lifetime: HumanDuration::from_secs(3600),
            ..RetryConfig::default()
        };
        assert_eq!(listed.base_wait(1, Duration::ZERO), Duration::from_secs(60));
        assert_eq!(
            listed.base_wait(2, Duration::ZERO),
            Duration::from_secs(600)
        );
        assert_eq!(
            listed.base_wait(9, Duration::ZERO),
            Duration::from_secs(600)
        );
        // Accepted at 0, one attempt made, the next one at 60 s: then every 600 s, the last
        // one exactly at the end of the hour.
        let plan = listed.planned(at(0), Duration::ZERO, 1, at(60), false, 100);
        let secs: Vec<u64> = plan
            .iter()
            .map(|t| t.duration_since(at(0)).unwrap_or_default().as_secs())
            .collect();
        assert_eq!(secs, [60, 660, 1260, 1860, 2460, 3060, 3600]);
        // Time held or paused moves the end; `limit` caps the list.
        let later = listed.planned(at(0), Duration::from_secs(600), 1, at(60), false, 100);
        assert_eq!(later.last(), Some(&at(4200)));
        assert_eq!(
            listed
                .planned(at(0), Duration::ZERO, 1, at(60), false, 2)
                .len(),
            2
        );
        assert_eq!(
            listed.for_domain(&[]).intervals,
            listed.intervals,
            "no domain intervals: the node's"
        );
        assert_eq!(
            age_based
                .for_domain(&[HumanDuration::from_secs(5)])
                .intervals,
            [HumanDuration::from_secs(5)]
        );
    }

    #[test]
    fn shaping_rules_are_checked() {
        let mut config = DeliveryConfig::default();
        config.shaping.destinations = builtin_rules();
        let mut errors = Vec::new();
        config.validate(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        config.shaping.destinations.push(ShapingRule {
            name: "Bad Name".into(),
            domains: Vec::new(),
            mx_hosts: vec!["not a host".into()],
            max_connections: Some(0),
            messages_per_minute: None,
        });
        config.retry.intervals = vec![HumanDuration(Duration::from_millis(10))];
        config.validate(&mut errors);
        let all = errors.join("\n");
        for needle in [
            "destinations[4].name",
            "\"not a host\"",
            "destinations[4].maxConnections",
            "delivery.retry.intervals[0]",
        ] {
            assert!(all.contains(needle), "{needle} missing in:\n{all}");
        }
    }
}
