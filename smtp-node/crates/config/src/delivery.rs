//! `delivery`: the sending side of a node: workers, the retry schedule and queue lifetime,
//! SMTP client timeouts, connection reuse, TLS towards MX hosts and the JetStream consumer.

use std::path::PathBuf;

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
