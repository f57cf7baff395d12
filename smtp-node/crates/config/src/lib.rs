//! The node's configuration: the one definition of the contract between the operator (which
//! renders this type into a ConfigMap) and the SMTP node (which reads it).
//!
//! The file is YAML (JSON is accepted too, being a subset). Field names are camelCase and unknown
//! fields are refused, so a typo is an error rather than a silently ignored setting.
//!
//! Value formats:
//! * durations ([`HumanDuration`]) are humantime strings (`"30s"`, `"5m"`, `"1h 30m"`) or an
//!   integer number of seconds;
//! * sizes ([`ByteSize`]) are an integer number of bytes or a string with a binary (`Ki`, `Mi`,
//!   `Gi`) or decimal (`K`, `M`, `G`) suffix, as in Kubernetes quantities (`"25Mi"`);
//! * relative file paths are resolved against the directory of the config file
//!   ([`NodeConfig::load`]).
//!
//! [`NodeConfig::validate`] checks everything that can be checked without touching the network
//! and reports every problem at once, each with the path of the offending field.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Environment variable that overrides the default NATS URL.
pub const NATS_URL_ENV: &str = "NATS_URL";
/// Environment variable that gives the default nameservers (`ip:port`, comma separated), as
/// the local cluster exports it.
pub const DNS_SERVER_ENV: &str = "DNS_SERVER";
/// NATS URL used when neither the config nor `NATS_URL` name one.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// Default message size limit: 25 MiB, what large providers accept.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 25 * 1024 * 1024;
/// RFC 5321 4.5.3.1.8: a server MUST be able to take at least 100 recipients.
pub const DEFAULT_MAX_RECIPIENTS: u32 = 100;
/// Hard ceiling for `maxMessageSize`: bodies are held in memory while received.
pub const MAX_MESSAGE_SIZE_CEILING: u64 = 1024 * 1024 * 1024;
/// Ceiling for `auth.failuresPerUser`: each user name keeps up to that many failure times
/// (in memory and in the shared stream), so the limit bounds their size.
pub const MAX_AUTH_FAILURES_PER_USER: u32 = 1000;
/// Shortest `auth.failuresPerUserWindow`; NATS refuses a stream `max_age` under 100 ms.
const MIN_AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(1);
/// Longest `auth.failuresPerUserWindow`: a lockout measured in weeks is a typo, not a policy.
const MAX_AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
/// Range of `auth.sharedCounterTimeout`: every AUTH may wait that long for NATS.
const MIN_SHARED_COUNTER_TIMEOUT: Duration = Duration::from_millis(100);
const MAX_SHARED_COUNTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    ReadConfigFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse config file {path}: {source}")]
    ParseConfigFile {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("invalid config:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// The whole configuration of one SMTP node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeConfig {
    /// Fully qualified host name: used in the greeting, the EHLO reply and `Received` headers.
    pub hostname: String,
    /// SMTP listeners (at least one).
    pub listeners: Vec<ListenerConfig>,
    /// Certificate and key for STARTTLS and implicit TLS. Required when any listener uses TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// The JetStream queue.
    #[serde(default)]
    pub nats: NatsConfig,
    /// Mail domains this node serves: local recipients (MX) and submission users.
    #[serde(default)]
    pub domains: Vec<DomainConfig>,
    /// Per-phase timeouts (RFC 5321 4.5.3.2).
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Minimum DATA/BDAT transfer rate in bytes per second; slower clients are disconnected
    /// with `421 4.4.2`. Each read earns `bytes / minDataRate` seconds of extra time, never more
    /// than `timeouts.dataBlock` in total (Postfix `smtpd_min_data_rate`). 0 disables the check.
    #[serde(default = "default_min_data_rate")]
    pub min_data_rate: u64,
    /// Concurrent SMTP connections over all listeners; more get `421 4.7.0`.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Concurrent SMTP connections from one client IP; more get `421 4.7.0`.
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: u32,
    /// Failed commands (syntax, sequence, unknown, refused) before `421 4.7.0` and disconnect.
    #[serde(default = "default_max_errors_per_session")]
    pub max_errors_per_session: u32,
    /// Authentication limits.
    #[serde(default)]
    pub auth: AuthConfig,
    /// The HTTP endpoint for `/healthz`, `/readyz` and `/metrics`.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Graceful shutdown.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// The DNS resolver for MX delivery and inbound SPF/DKIM/DMARC checks.
    #[serde(default)]
    pub dns: DnsConfig,
    /// Delivery workers: retries, timeouts, connection limits, outbound TLS.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// SPF, DKIM and DMARC checks of mail arriving on MX listeners.
    #[serde(default)]
    pub inbound_auth: InboundAuthConfig,
}

/// One SMTP listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique name (used in logs and metrics), e.g. `mx`, `submission`, `submissions`.
    pub name: String,
    /// What the listener is for.
    pub kind: ListenerKind,
    /// Socket address to bind, e.g. `0.0.0.0:25` or `[::]:587`.
    pub address: SocketAddr,
    /// Expect a PROXY protocol v1 or v2 header on every connection and use the client address
    /// it carries for policy and logs. Only enable behind a load balancer that sends it.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// What to do with a bare CR or LF in commands and message data.
    #[serde(default)]
    pub bare_line_endings: BareLineEndings,
    /// Require STARTTLS before MAIL (and before AUTH). Default: true for `submission`, false for
    /// `mx`. Always satisfied on `implicitTls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_tls: Option<bool>,
}

/// The role of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ListenerKind {
    /// Port 25: inbound mail for local domains, no AUTH, STARTTLS offered.
    Mx,
    /// Port 587: authenticated submission after STARTTLS.
    Submission,
    /// Port 465: authenticated submission over implicit TLS (RFC 8314).
    ImplicitTls,
}

/// Handling of bare CR / bare LF (SMTP smuggling defence). In every mode only
/// `<CRLF>.<CRLF>` ends DATA.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BareLineEndings {
    /// Refuse the command or the message with a 5xx; nothing of that transaction is queued.
    #[default]
    Reject,
    /// Accept and rewrite bare line endings to CRLF before queueing.
    Normalize,
}

/// TLS certificate files (PEM). They are re-read when they change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// How often to check the files for changes.
    #[serde(default = "default_tls_reload_interval")]
    pub reload_interval: HumanDuration,
}

/// The JetStream queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma separated. Default: `$NATS_URL`, else `nats://127.0.0.1:4222`.
    #[serde(default = "default_nats_url")]
    pub url: String,
    /// Stream holding the queue.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Queue subjects are `<subjectPrefix>.<domain>`.
    #[serde(default = "default_subject_prefix")]
    pub subject_prefix: String,
    /// NATS credentials file (JWT + NKey), if the server requires one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// How long to wait for the JetStream acknowledgement before answering `451 4.3.0`.
    #[serde(default = "default_publish_timeout")]
    pub publish_timeout: HumanDuration,
    /// Stream and object store replicas (1 on a laptop, 3 in production).
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// Stream size limit; when full, publishes fail and clients get `452 4.3.1`. Unset: no
    /// limit other than the server's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<ByteSize>,
    /// Window within which a repeated `Nats-Msg-Id` is dropped as a duplicate.
    #[serde(default = "default_duplicate_window")]
    pub duplicate_window: HumanDuration,
    /// Object store bucket for bodies too large to publish inline.
    #[serde(default = "default_body_bucket")]
    pub body_bucket: String,
    /// Bodies larger than this (or than the server's max payload minus headroom for headers)
    /// go to the object store.
    #[serde(default = "default_inline_body_limit")]
    pub inline_body_limit: ByteSize,
}

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
    /// Limits for this domain.
    #[serde(default)]
    pub limits: DomainLimits,
    /// Where mail for this domain's recipients is delivered (LMTP or SMTP). Unset: mail for
    /// it is accepted and queued but waits (deferred) until a target is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<InboundTarget>,
    /// Smarthost for this domain's outbound mail. Unset: direct delivery to the recipients'
    /// MX hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayConfig>,
    /// DKIM keys that sign this domain's outbound mail at acceptance.
    #[serde(default, skip_serializing_if = "DkimConfig::is_empty")]
    pub dkim: DkimConfig,
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

/// Per-phase timeouts. RFC 5321 4.5.3.2 gives the client-side values; the server uses them as
/// follows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// After the 220 greeting: time for the first command to arrive (4.5.3.2.1, 5 min).
    #[serde(default = "default_five_minutes")]
    pub greeting: HumanDuration,
    /// Time for each complete command line to arrive (4.5.3.2.7, 5 min). The deadline covers
    /// the whole line, so trickling one byte at a time does not extend it.
    #[serde(default = "default_five_minutes")]
    pub command: HumanDuration,
    /// After `354`: time for the first message bytes to arrive (4.5.3.2.4, 2 min).
    #[serde(default = "default_two_minutes")]
    pub data_init: HumanDuration,
    /// During DATA/BDAT: longest wait for more bytes (4.5.3.2.5, 3 min).
    #[serde(default = "default_three_minutes")]
    pub data_block: HumanDuration,
    /// After the end of data: the longest the server spends queueing before it answers
    /// (the client waits 10 min, 4.5.3.2.6); on expiry the reply is `451 4.3.0`.
    #[serde(default = "default_ten_minutes")]
    pub data_termination: HumanDuration,
    /// TLS handshake (STARTTLS and implicit TLS) and PROXY header.
    #[serde(default = "default_tls_handshake")]
    pub tls_handshake: HumanDuration,
}

/// Authentication limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthConfig {
    /// Failed AUTH attempts in one session before `421 4.7.0` and disconnect.
    #[serde(default = "default_auth_failures_per_session")]
    pub max_failures_per_session: u32,
    /// Failed AUTH attempts per client IP per minute, over all sessions; above it AUTH gets
    /// `454 4.7.0` until the rate falls. Counted by each node on its own.
    #[serde(default = "default_auth_failures_per_ip")]
    pub failures_per_ip_per_minute: u32,
    /// Failed AUTH attempts for one user name within `failuresPerUserWindow`, from any client
    /// address, counted over every node with the same NATS server, `nats.stream` and
    /// `nats.subjectPrefix` (all replicas of a MailDomain). Once that many failed, every AUTH for the user name gets
    /// `454 4.7.0` from any address, even with the right password, until the oldest of those
    /// failures is older than the window. This stops guessing spread over many addresses,
    /// which the per-IP limit cannot see. The price: someone who guesses often enough keeps
    /// that user from logging in, so keep it well above what a client with a stale password
    /// causes. Unknown user names are counted like real ones, so the replies do not tell them
    /// apart; a successful login does not clear earlier failures. 1 to 1000.
    ///
    /// The shared counter is the JetStream stream `<nats.stream>_AUTH_FAILURES` (subjects
    /// `<nats.subjectPrefix>-auth-failures.<keyed hash of the user name>`, no password, no
    /// plain user name), created by the node; nodes sharing it should use the same window and
    /// limit, as the stream keeps those of the node that set it up last. While NATS cannot
    /// answer, logins are not refused for that reason: each node then counts only its own
    /// failures.
    #[serde(default = "default_auth_failures_per_user")]
    pub failures_per_user: u32,
    /// The sliding window of `failuresPerUser`, 1 s to 7 days.
    #[serde(default = "default_auth_failures_per_user_window")]
    pub failures_per_user_window: HumanDuration,
    /// Longest an AUTH waits for the shared counter (one look-up, and one write after a
    /// failure) before going on with this node's own count; NATS then gets 5 s of rest
    /// before it is asked again. 100 ms to 30 s; raise it when NATS is far away or its
    /// store fsyncs every write on slow disks.
    #[serde(default = "default_auth_shared_counter_timeout")]
    pub shared_counter_timeout: HumanDuration,
    /// A file of at least 16 secret bytes (the same on every node) that keys the hash of user
    /// names in the shared counter, so that whoever can read the NATS stream cannot test
    /// guessed names against it. Unset: a built-in key, which keeps names out of plain sight
    /// only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_key_file: Option<PathBuf>,
}

/// The HTTP admin endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminConfig {
    /// Address for `/healthz`, `/readyz`, `/metrics`.
    #[serde(default = "default_admin_address")]
    pub address: SocketAddr,
    /// How often the queue depth and age metrics are read from JetStream.
    #[serde(default = "default_queue_sample_interval")]
    pub queue_sample_interval: HumanDuration,
}

/// Graceful shutdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After SIGTERM, how long open transactions may take to finish before the node exits.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: HumanDuration,
}

/// Resolver settings (the `dns` section of the node config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DnsConfig {
    /// Nameservers as `ip:port` (e.g. `10.96.0.10:53`, `127.0.0.1:5353`). Default:
    /// `$DNS_SERVER` when set (comma separated), else empty. Empty: the system configuration
    /// (`/etc/resolv.conf`).
    #[serde(default = "default_nameservers")]
    pub nameservers: Vec<SocketAddr>,
    /// Timeout of one query.
    #[serde(default = "default_dns_timeout")]
    pub timeout: HumanDuration,
    /// Attempts per query before the lookup counts as failed (temporary).
    #[serde(default = "default_dns_attempts")]
    pub attempts: u32,
}

/// The node-wide delivery settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Run delivery workers on this node. A node with `false` only receives.
    #[serde(default = "default_true")]
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
    #[serde(default = "default_true")]
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

/// Checks of mail arriving on the MX port (SPF, DKIM, DMARC).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundAuthConfig {
    /// Evaluate SPF, DKIM and DMARC and add an `Authentication-Results` header.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// `record` (default): only record the DMARC result. `enforce`: refuse a message that
    /// fails DMARC of a sender domain whose policy is `reject`, with `550 5.7.1` at the end
    /// of data (`quarantine` is recorded only: the node has no quarantine).
    #[serde(default)]
    pub dmarc: DmarcMode,
    /// Time for all lookups of one message; when it runs out the results say `temperror`.
    #[serde(default = "default_auth_timeout")]
    pub timeout: HumanDuration,
}

/// What to do with a DMARC failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DmarcMode {
    #[default]
    Record,
    Enforce,
}

impl NodeConfig {
    /// Reads, parses and validates a config file. Relative paths inside it are resolved
    /// against the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadConfigFile {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::from_yaml(&text).map_err(|source| ConfigError::ParseConfigFile {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    /// Parses YAML without validating or resolving paths.
    pub fn from_yaml(text: &str) -> Result<Self, serde_yaml::Error> {
        serde_yaml::from_str(text)
    }

    /// Makes every relative path absolute against `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(tls) = &mut self.tls {
            resolve(&mut tls.cert_file);
            resolve(&mut tls.key_file);
        }
        if let Some(creds) = &mut self.nats.credentials_file {
            resolve(creds);
        }
        if let Some(ca) = &mut self.delivery.tls.extra_ca_file {
            resolve(ca);
        }
        if let Some(key) = &mut self.auth.username_key_file {
            resolve(key);
        }
        for domain in &mut self.domains {
            if let Some(users) = &mut domain.users_file {
                resolve(users);
            }
            if let Some(auth) = domain.relay.as_mut().and_then(|r| r.auth.as_mut()) {
                resolve(&mut auth.username_file);
                resolve(&mut auth.password_file);
            }
            for key in &mut domain.dkim.keys {
                resolve(&mut key.key_file);
            }
        }
    }

    /// Moves every listener and the admin endpoint to `ip`, keeping their ports: for pods that
    /// share one network namespace (the local cluster), each binding its own pod IP.
    pub fn bind_to(&mut self, ip: std::net::IpAddr) {
        for listener in &mut self.listeners {
            listener.address.set_ip(ip);
        }
        self.admin.address.set_ip(ip);
    }

    /// Checks the invariants serde cannot express; reports all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        if let Err(e) = validate_domain_name(&self.hostname) {
            errors.push(format!("hostname: {e}"));
        }
        if self.listeners.is_empty() {
            errors.push("listeners: at least one listener is required".to_owned());
        }
        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            if l.name.is_empty()
                || !l
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                errors.push(format!(
                    "listeners[{i}].name: {:?} must be non-empty and use only letters, digits, '-' and '_'",
                    l.name
                ));
            }
            if !names.insert(l.name.as_str()) {
                errors.push(format!("listeners[{i}].name: duplicate name {:?}", l.name));
            }
            if !addresses.insert(l.address) {
                errors.push(format!(
                    "listeners[{i}].address: {} is used by another listener",
                    l.address
                ));
            }
            if l.address == self.admin.address {
                errors.push(format!(
                    "listeners[{i}].address: {} is also the admin address",
                    l.address
                ));
            }
            if self.tls.is_none() && l.requires_tls() {
                let why = if l.kind == ListenerKind::ImplicitTls {
                    "kind implicitTls"
                } else {
                    "requireTls (the default for submission)"
                };
                errors.push(format!(
                    "listeners[{i}]: {why} needs a tls section (certFile, keyFile)"
                ));
            }
        }
        if let Some(tls) = &self.tls
            && tls.reload_interval.0.is_zero()
        {
            errors.push("tls.reloadInterval: must be greater than 0".to_owned());
        }
        self.validate_nats(&mut errors);
        let mut domain_names = HashSet::new();
        for (i, d) in self.domains.iter().enumerate() {
            if let Err(e) = validate_domain_name(&d.name) {
                errors.push(format!("domains[{i}].name: {e}"));
            }
            if !domain_names.insert(d.name.as_str()) {
                errors.push(format!("domains[{i}].name: duplicate domain {:?}", d.name));
            }
            for (j, r) in d.recipients.iter().enumerate() {
                let local = match r.rsplit_once('@') {
                    Some((local, domain)) => {
                        if !domain.eq_ignore_ascii_case(&d.name) {
                            errors.push(format!(
                                "domains[{i}].recipients[{j}]: {r:?} is not in domain {:?}",
                                d.name
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
                        "domains[{i}].recipients[{j}]: {r:?} is not a valid local part (1-64 printable characters, no spaces)"
                    ));
                }
            }
            let limits = &d.limits;
            if limits.max_message_size.0 < 1024
                || limits.max_message_size.0 > MAX_MESSAGE_SIZE_CEILING
            {
                errors.push(format!(
                    "domains[{i}].limits.maxMessageSize: {} must be between 1Ki and 1Gi",
                    limits.max_message_size.0
                ));
            }
            if limits.max_recipients == 0 {
                errors.push(format!(
                    "domains[{i}].limits.maxRecipients: must be at least 1"
                ));
            }
            if limits.messages_per_minute_per_user == 0 {
                errors.push(format!(
                    "domains[{i}].limits.messagesPerMinutePerUser: must be at least 1"
                ));
            }
            if let Some(target) = &d.inbound {
                if target.host.trim().is_empty() {
                    errors.push(format!("domains[{i}].inbound.host: must not be empty"));
                }
                if target.port == 0 {
                    errors.push(format!("domains[{i}].inbound.port: must not be 0"));
                }
            }
            if let Some(relay) = &d.relay {
                relay.validate(&format!("domains[{i}].relay"), &mut errors);
            }
            let mut selectors = HashSet::new();
            for (j, key) in d.dkim.keys.iter().enumerate() {
                let ok = !key.selector.is_empty()
                    && key.selector.split('.').all(|label| {
                        !label.is_empty()
                            && label
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    });
                if !ok {
                    errors.push(format!(
                        "domains[{i}].dkim.keys[{j}].selector: {:?} must be DNS labels (letters, digits, '-', '_')",
                        key.selector
                    ));
                }
                if !selectors.insert(key.selector.as_str()) {
                    errors.push(format!(
                        "domains[{i}].dkim.keys[{j}].selector: duplicate selector {:?}",
                        key.selector
                    ));
                }
            }
        }
        self.delivery.validate(&mut errors);
        if self.dns.attempts == 0 {
            errors.push("dns.attempts: must be at least 1".to_owned());
        }
        if self.dns.timeout.0.is_zero() {
            errors.push("dns.timeout: must be greater than 0".to_owned());
        }
        if self.inbound_auth.timeout.0.is_zero() {
            errors.push("inboundAuth.timeout: must be greater than 0".to_owned());
        }
        let timeouts = [
            ("greeting", &self.timeouts.greeting),
            ("command", &self.timeouts.command),
            ("dataInit", &self.timeouts.data_init),
            ("dataBlock", &self.timeouts.data_block),
            ("dataTermination", &self.timeouts.data_termination),
            ("tlsHandshake", &self.timeouts.tls_handshake),
        ];
        for (name, t) in timeouts {
            if t.0.is_zero() {
                errors.push(format!("timeouts.{name}: must be greater than 0"));
            }
        }
        if self.max_connections == 0 {
            errors.push("maxConnections: must be at least 1".to_owned());
        }
        if self.max_connections_per_ip == 0 || self.max_connections_per_ip > self.max_connections {
            errors.push(format!(
                "maxConnectionsPerIp: {} must be between 1 and maxConnections ({})",
                self.max_connections_per_ip, self.max_connections
            ));
        }
        if self.max_errors_per_session == 0 {
            errors.push("maxErrorsPerSession: must be at least 1".to_owned());
        }
        if self.auth.max_failures_per_session == 0 {
            errors.push("auth.maxFailuresPerSession: must be at least 1".to_owned());
        }
        if self.auth.failures_per_ip_per_minute == 0 {
            errors.push("auth.failuresPerIpPerMinute: must be at least 1".to_owned());
        }
        if !(1..=MAX_AUTH_FAILURES_PER_USER).contains(&self.auth.failures_per_user) {
            errors.push(format!(
                "auth.failuresPerUser: {} must be between 1 and {MAX_AUTH_FAILURES_PER_USER}",
                self.auth.failures_per_user
            ));
        }
        let window = self.auth.failures_per_user_window.0;
        if !(MIN_AUTH_FAILURE_WINDOW..=MAX_AUTH_FAILURE_WINDOW).contains(&window) {
            errors.push(format!(
                "auth.failuresPerUserWindow: {} must be between 1s and 7days",
                humantime::format_duration(window)
            ));
        }
        let timeout = self.auth.shared_counter_timeout.0;
        if !(MIN_SHARED_COUNTER_TIMEOUT..=MAX_SHARED_COUNTER_TIMEOUT).contains(&timeout) {
            errors.push(format!(
                "auth.sharedCounterTimeout: {} must be between 100ms and 30s",
                humantime::format_duration(timeout)
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    fn validate_nats(&self, errors: &mut Vec<String>) {
        let nats = &self.nats;
        if nats.url.trim().is_empty() {
            errors.push("nats.url: must not be empty".to_owned());
        }
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !name_ok(&nats.stream) {
            errors.push(format!(
                "nats.stream: {:?} must use only letters, digits, '-' and '_'",
                nats.stream
            ));
        }
        if !name_ok(&nats.body_bucket) {
            errors.push(format!(
                "nats.bodyBucket: {:?} must use only letters, digits, '-' and '_'",
                nats.body_bucket
            ));
        }
        let prefix_ok = !nats.subject_prefix.is_empty()
            && nats.subject_prefix.split('.').all(|token| {
                !token.is_empty()
                    && token
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
            });
        if !prefix_ok {
            errors.push(format!(
                "nats.subjectPrefix: {:?} must be dot-separated non-empty tokens without wildcards",
                nats.subject_prefix
            ));
        }
        if nats.publish_timeout.0.is_zero() {
            errors.push("nats.publishTimeout: must be greater than 0".to_owned());
        }
        if nats.duplicate_window.0.is_zero() {
            errors.push("nats.duplicateWindow: must be greater than 0".to_owned());
        }
        if !(1..=5).contains(&nats.replicas) {
            errors.push(format!("nats.replicas: {} must be 1 to 5", nats.replicas));
        }
        if nats.inline_body_limit.0 < 1024 {
            errors.push("nats.inlineBodyLimit: must be at least 1Ki".to_owned());
        }
    }

    /// The configured domain with this name (ASCII case-insensitive).
    pub fn domain(&self, name: &str) -> Option<&DomainConfig> {
        self.domains
            .iter()
            .find(|d| d.name.eq_ignore_ascii_case(name))
    }

    /// The largest message any domain accepts: what EHLO advertises as SIZE.
    pub fn max_message_size(&self) -> u64 {
        self.domains
            .iter()
            .map(|d| d.limits.max_message_size.0)
            .max()
            .unwrap_or(DEFAULT_MAX_MESSAGE_SIZE)
    }
}

impl ListenerConfig {
    /// Whether STARTTLS must precede MAIL and AUTH on this listener.
    pub fn requires_tls(&self) -> bool {
        match self.kind {
            ListenerKind::Mx => self.require_tls.unwrap_or(false),
            ListenerKind::Submission => self.require_tls.unwrap_or(true),
            ListenerKind::ImplicitTls => true,
        }
    }

    /// Whether clients must authenticate before MAIL (submission ports).
    pub fn requires_auth(&self) -> bool {
        self.kind != ListenerKind::Mx
    }
}

impl DomainConfig {
    /// Whether `local_part` is a recipient of this domain.
    pub fn has_recipient(&self, local_part: &str) -> bool {
        self.catch_all
            || self.recipients.iter().any(|r| {
                let local = r.rsplit_once('@').map_or(r.as_str(), |(l, _)| l);
                local.eq_ignore_ascii_case(local_part)
            })
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: default_nats_url(),
            stream: default_stream(),
            subject_prefix: default_subject_prefix(),
            credentials_file: None,
            publish_timeout: default_publish_timeout(),
            replicas: default_replicas(),
            max_bytes: None,
            duplicate_window: default_duplicate_window(),
            body_bucket: default_body_bucket(),
            inline_body_limit: default_inline_body_limit(),
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

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            greeting: default_five_minutes(),
            command: default_five_minutes(),
            data_init: default_two_minutes(),
            data_block: default_three_minutes(),
            data_termination: default_ten_minutes(),
            tls_handshake: default_tls_handshake(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            max_failures_per_session: default_auth_failures_per_session(),
            failures_per_ip_per_minute: default_auth_failures_per_ip(),
            failures_per_user: default_auth_failures_per_user(),
            failures_per_user_window: default_auth_failures_per_user_window(),
            shared_counter_timeout: default_auth_shared_counter_timeout(),
            username_key_file: None,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            address: default_admin_address(),
            queue_sample_interval: default_queue_sample_interval(),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_timeout: default_drain_timeout(),
        }
    }
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            nameservers: default_nameservers(),
            timeout: default_dns_timeout(),
            attempts: default_dns_attempts(),
        }
    }
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

impl Default for InboundAuthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dmarc: DmarcMode::Record,
            timeout: default_auth_timeout(),
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
                if let Err(e) = crate::delivery::address_policy::Network::parse(net) {
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

/// A duration written the human way (`"5m"`, `"30s"`) or as integer seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Seconds(s) => Ok(Self(Duration::from_secs(s))),
            Raw::Text(t) => humantime::parse_duration(t.trim())
                .map(Self)
                .map_err(|e| serde::de::Error::custom(format!("invalid duration {t:?}: {e}"))),
        }
    }
}

impl JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "HumanDuration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A duration: a humantime string such as \"30s\", \"5m\", \"1h 30m\", or integer seconds.",
            "anyOf": [
                { "type": "string" },
                { "type": "integer", "minimum": 0 }
            ]
        })
    }
}

/// A size in bytes, written as an integer or with a suffix (`"25Mi"`, `"512Ki"`, `"1M"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, suffix) = s.split_at(split);
        let number: u64 = digits
            .parse()
            .map_err(|_| format!("invalid size {s:?}: expected digits then an optional unit"))?;
        let factor: u64 = match suffix.trim() {
            "" => 1,
            "K" | "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            other => {
                return Err(format!(
                    "invalid size {s:?}: unknown unit {other:?} (use K, M, G, Ki, Mi or Gi)"
                ));
            }
        };
        number
            .checked_mul(factor)
            .map(Self)
            .ok_or_else(|| format!("invalid size {s:?}: too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(Self(b)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A size in bytes: an integer, or a string with a unit K, M, G, Ki, Mi or Gi (\"25Mi\").",
            "anyOf": [
                { "type": "integer", "minimum": 0 },
                { "type": "string", "pattern": "^[0-9]+(K|k|M|G|Ki|Mi|Gi)?$" }
            ]
        })
    }
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

fn default_nameservers() -> Vec<SocketAddr> {
    parse_nameservers(&std::env::var(DNS_SERVER_ENV).unwrap_or_default())
}

/// `ip:port` or `ip` (port 53) entries separated by commas or spaces; invalid ones are
/// skipped (the variable is a convenience for local runs, not the contract).
fn parse_nameservers(text: &str) -> Vec<SocketAddr> {
    text.split([',', ' '])
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .filter_map(|t| {
            t.parse::<SocketAddr>().ok().or_else(|| {
                t.parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, 53))
            })
        })
        .collect()
}

fn default_nats_url() -> String {
    std::env::var(NATS_URL_ENV)
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_NATS_URL.to_owned())
}
fn default_stream() -> String {
    "KUBEMAIL".to_owned()
}
fn default_subject_prefix() -> String {
    "kubemail.queue".to_owned()
}
fn default_body_bucket() -> String {
    "KUBEMAIL_BODIES".to_owned()
}
fn default_publish_timeout() -> HumanDuration {
    HumanDuration::from_secs(10)
}
// NATS' own default; our publisher does not retry on its own, so 2 min covers its horizon.
fn default_duplicate_window() -> HumanDuration {
    HumanDuration::from_secs(120)
}
fn default_replicas() -> u32 {
    1
}
// Well under the NATS default max_payload of 1 MiB, leaving room for envelope headers.
fn default_inline_body_limit() -> ByteSize {
    ByteSize(512 * 1024)
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
fn default_five_minutes() -> HumanDuration {
    HumanDuration::from_secs(5 * 60)
}
fn default_two_minutes() -> HumanDuration {
    HumanDuration::from_secs(2 * 60)
}
fn default_three_minutes() -> HumanDuration {
    HumanDuration::from_secs(3 * 60)
}
fn default_ten_minutes() -> HumanDuration {
    HumanDuration::from_secs(10 * 60)
}
fn default_tls_handshake() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_tls_reload_interval() -> HumanDuration {
    HumanDuration::from_secs(5)
}
// Postfix smtpd_min_data_rate.
fn default_min_data_rate() -> u64 {
    500
}
fn default_max_connections() -> u32 {
    1000
}
// Postfix smtpd_client_connection_count_limit.
fn default_max_connections_per_ip() -> u32 {
    50
}
// Postfix smtpd_hard_error_limit.
fn default_max_errors_per_session() -> u32 {
    20
}
fn default_auth_failures_per_session() -> u32 {
    3
}
fn default_auth_failures_per_ip() -> u32 {
    10
}
// Twenty guesses an hour per user (480 a day) from the whole internet, while a phone retrying
// a stale password every few minutes stays under it.
fn default_auth_failures_per_user() -> u32 {
    20
}
fn default_auth_failures_per_user_window() -> HumanDuration {
    HumanDuration::from_secs(3600)
}
fn default_auth_shared_counter_timeout() -> HumanDuration {
    HumanDuration::from_secs(1)
}
fn default_admin_address() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}
/// A common Prometheus scrape interval: fresher samples would not be seen.
fn default_queue_sample_interval() -> HumanDuration {
    HumanDuration::from_secs(15)
}
fn default_drain_timeout() -> HumanDuration {
    HumanDuration::from_secs(30)
}

// resolv.conf defaults (timeout:5, attempts:2).
fn default_dns_timeout() -> HumanDuration {
    HumanDuration::from_secs(5)
}
fn default_dns_attempts() -> u32 {
    2
}

fn default_true() -> bool {
    true
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
fn default_relay_name() -> String {
    "relay".to_owned()
}
// RFC 6409 submission port, what smarthosts offer.
fn default_relay_port() -> u16 {
    587
}
fn default_auth_timeout() -> HumanDuration {
    HumanDuration::from_secs(20)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
hostname: mx.example.test
listeners:
  - { name: mx, kind: mx, address: "127.0.0.1:2525" }
domains:
  - name: example.test
    recipients: [bob, "postmaster@example.test"]
"#;

    #[test]
    fn minimal_config_gets_rfc_defaults() {
        let c = NodeConfig::from_yaml(MINIMAL).unwrap();
        c.validate().unwrap();
        assert_eq!(c.timeouts.command.0, Duration::from_secs(300));
        assert_eq!(c.timeouts.data_init.0, Duration::from_secs(120));
        assert_eq!(c.timeouts.data_block.0, Duration::from_secs(180));
        assert_eq!(c.timeouts.data_termination.0, Duration::from_secs(600));
        assert_eq!(c.domains[0].limits.max_message_size.0, 25 * 1024 * 1024);
        assert_eq!(c.domains[0].limits.max_recipients, 100);
        assert_eq!(c.nats.stream, "KUBEMAIL");
        assert_eq!(c.listeners[0].bare_line_endings, BareLineEndings::Reject);
        assert!(!c.listeners[0].requires_tls());
        assert!(c.domains[0].has_recipient("BOB"));
        assert!(c.domains[0].has_recipient("postmaster"));
        assert!(!c.domains[0].has_recipient("alice"));
    }

    #[test]
    fn sizes_and_durations_accept_units() {
        let yaml = format!(
            "{MINIMAL}    limits: {{ maxMessageSize: 10Mi }}\ntimeouts: {{ command: 90s, dataBlock: 2m, greeting: 30 }}\n"
        );
        let c = NodeConfig::from_yaml(&yaml).unwrap();
        assert_eq!(c.domains[0].limits.max_message_size.0, 10 << 20);
        assert_eq!(c.timeouts.command.0, Duration::from_secs(90));
        assert_eq!(c.timeouts.data_block.0, Duration::from_secs(120));
        assert_eq!(c.timeouts.greeting.0, Duration::from_secs(30));
        assert_eq!("1M".parse::<ByteSize>().unwrap().0, 1_000_000);
        assert!("12Xi".parse::<ByteSize>().is_err());
        assert!("99999999999999999999Gi".parse::<ByteSize>().is_err());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let yaml = format!("{MINIMAL}maxConnection: 5\n");
        let err = NodeConfig::from_yaml(&yaml).unwrap_err().to_string();
        assert!(err.contains("maxConnection"), "{err}");
    }

    #[test]
    fn validate_reports_every_problem_with_its_path() {
        let yaml = r#"
hostname: "MX.Example.test."
listeners:
  - { name: sub, kind: submission, address: "127.0.0.1:2587" }
  - { name: sub, kind: mx, address: "127.0.0.1:2587" }
domains:
  - { name: example.test, recipients: ["bob@other.test"], limits: { maxRecipients: 0 } }
maxConnectionsPerIp: 0
"#;
        let err = NodeConfig::from_yaml(yaml)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        for needle in [
            "hostname:",
            "listeners[0]: requireTls (the default for submission) needs a tls section",
            "listeners[1].name: duplicate",
            "listeners[1].address",
            "recipients[0]",
            "maxRecipients",
            "maxConnectionsPerIp",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
    }

    #[test]
    fn auth_limits_have_defaults_and_bounds() {
        let c = NodeConfig::from_yaml(MINIMAL).unwrap();
        assert_eq!(c.auth.failures_per_user, 20);
        assert_eq!(c.auth.failures_per_user_window.0, Duration::from_secs(3600));
        assert_eq!(c.auth.username_key_file, None);
        assert_eq!(c.auth.shared_counter_timeout.0, Duration::from_secs(1));
        let yaml = format!(
            "{MINIMAL}auth: {{ failuresPerUser: 0, failuresPerUserWindow: 500ms, usernameKeyFile: k, sharedCounterTimeout: 10ms }}\n"
        );
        let mut c = NodeConfig::from_yaml(&yaml).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("auth.failuresPerUser: 0"), "{err}");
        assert!(err.contains("auth.failuresPerUserWindow: 500ms"), "{err}");
        assert!(err.contains("auth.sharedCounterTimeout: 10ms"), "{err}");
        c.resolve_paths(Path::new("/etc/kubemail"));
        assert_eq!(
            c.auth.username_key_file.as_deref(),
            Some(Path::new("/etc/kubemail/k"))
        );
        let yaml = format!(
            "{MINIMAL}auth: {{ failuresPerUser: 1001, failuresPerUserWindow: 8d, sharedCounterTimeout: 31s }}\n"
        );
        let err = NodeConfig::from_yaml(&yaml)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("failuresPerUser: 1001"), "{err}");
        assert!(err.contains("failuresPerUserWindow: 8days"), "{err}");
        assert!(err.contains("sharedCounterTimeout: 31s"), "{err}");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let yaml = format!(
            "{MINIMAL}    usersFile: users\ntls: {{ certFile: c.pem, keyFile: /abs/k.pem }}\n"
        );
        let mut c = NodeConfig::from_yaml(&yaml).unwrap();
        c.resolve_paths(Path::new("/etc/kubemail"));
        let tls = c.tls.as_ref().unwrap();
        assert_eq!(tls.cert_file, Path::new("/etc/kubemail/c.pem"));
        assert_eq!(tls.key_file, Path::new("/abs/k.pem"));
        assert_eq!(
            c.domains[0].users_file.as_deref(),
            Some(Path::new("/etc/kubemail/users"))
        );
    }

    #[test]
    fn serialises_back_to_an_equal_config() {
        let c = NodeConfig::from_yaml(MINIMAL).unwrap();
        let text = serde_yaml::to_string(&c).unwrap();
        assert_eq!(NodeConfig::from_yaml(&text).unwrap(), c);
        let schema = serde_json::to_string(&schemars::schema_for!(NodeConfig)).unwrap();
        assert!(schema.contains("maxConnectionsPerIp"));
    }

    #[test]
    fn nameservers_from_the_environment_format() {
        assert_eq!(
            parse_nameservers("127.0.0.1:15353, 10.0.0.1 bogus [::1]:5353"),
            vec![
                "127.0.0.1:15353".parse::<SocketAddr>().unwrap(),
                "10.0.0.1:53".parse().unwrap(),
                "[::1]:5353".parse().unwrap(),
            ]
        );
        assert!(parse_nameservers("").is_empty());
    }

    #[test]
    fn delivery_sections_parse_validate_and_resolve_paths() {
        let yaml = format!(
            r#"{MINIMAL}    inbound: {{ host: dovecot.mail.svc, port: 24 }}
    relay:
      host: smtp.relay.test
      auth: {{ usernameFile: relay/username, passwordFile: relay/password }}
      messagesPerSecond: 5
    dkim:
      keys:
        - {{ selector: k1-rsa, keyFile: dkim/rsa.pem }}
        - {{ selector: k1-ed, keyFile: /abs/ed.pem }}
dns: {{ nameservers: ["127.0.0.1:5353"], timeout: 2s }}
delivery:
  mxPort: 2525
  allowedNetworks: ["127.0.0.0/8"]
  retry: {{ minBackoff: 1s, maxBackoff: 2s, lifetime: 1m }}
  tls: {{ extraCaFile: ca.pem }}
inboundAuth: {{ dmarc: enforce }}
"#
        );
        let mut c = NodeConfig::from_yaml(&yaml).unwrap();
        c.validate().unwrap();
        c.resolve_paths(Path::new("/etc/kubemail"));
        let d = &c.domains[0];
        let inbound = d.inbound.as_ref().unwrap();
        assert_eq!(
            (inbound.port, inbound.protocol),
            (24, ForwardProtocol::Lmtp)
        );
        let relay = d.relay.as_ref().unwrap();
        assert_eq!((relay.port, relay.tls), (587, RelayTls::StartTlsRequired));
        assert_eq!(
            relay.auth.as_ref().unwrap().password_file,
            Path::new("/etc/kubemail/relay/password")
        );
        assert_eq!(
            d.dkim.keys[0].key_file,
            Path::new("/etc/kubemail/dkim/rsa.pem")
        );
        assert_eq!(d.dkim.keys[1].key_file, Path::new("/abs/ed.pem"));
        assert_eq!(
            c.delivery.tls.extra_ca_file.as_deref(),
            Some(Path::new("/etc/kubemail/ca.pem"))
        );
        assert_eq!(c.dns.nameservers[0].port(), 5353);
        assert_eq!(c.inbound_auth.dmarc, DmarcMode::Enforce);
        let text = serde_yaml::to_string(&c).unwrap();
        assert_eq!(NodeConfig::from_yaml(&text).unwrap(), c, "round trip");

        let bad = yaml
            .replace("k1-ed", "k1-rsa")
            .replace("port: 24", "port: 0");
        let err = NodeConfig::from_yaml(&bad)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("dkim.keys[1].selector: duplicate"), "{err}");
        assert!(err.contains("domains[0].inbound.port"), "{err}");
    }

    #[test]
    fn defaults_follow_rfc_5321_and_postfix() {
        let c: DeliveryConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(c, DeliveryConfig::default());
        assert_eq!(c.mx_port, 25);
        assert_eq!(c.retry.min_backoff.0, Duration::from_secs(300));
        assert_eq!(c.retry.lifetime.0, Duration::from_secs(432_000));
        assert_eq!(c.timeouts.data_init.0, Duration::from_secs(120));
        assert_eq!(c.timeouts.data_termination.0, Duration::from_secs(600));
        assert_eq!(c.tls.mx, MxTlsPolicy::Opportunistic);
        let mut errors = Vec::new();
        c.validate(&mut errors);
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn validation_names_fields() {
        let c: DeliveryConfig = serde_yaml::from_str(
            "concurrency: 0\nallowedNetworks: [\"127.0.0.0/33\"]\nretry: { minBackoff: 10s, maxBackoff: 5s }\nconsumer: { maxDeliver: 1 }\n",
        )
        .unwrap();
        let mut errors = Vec::new();
        c.validate(&mut errors);
        let text = errors.join("\n");
        for needle in [
            "delivery.concurrency",
            "delivery.allowedNetworks[0]",
            "delivery.retry.maxBackoff",
            "delivery.consumer.maxDeliver",
        ] {
            assert!(text.contains(needle), "missing {needle} in {text}");
        }
        let relay: RelayConfig = serde_yaml::from_str(
            "host: smtp.example.net\ntls: opportunistic\nauth: { usernameFile: u, passwordFile: p }\n",
        )
        .unwrap();
        let mut errors = Vec::new();
        relay.validate("domains[0].relay", &mut errors);
        assert!(errors[0].contains("domains[0].relay.tls"), "{errors:?}");
    }

    #[test]
    fn bind_to_moves_listeners_and_admin_keeping_ports() {
        let mut c = NodeConfig::from_yaml(MINIMAL).unwrap();
        let ports: Vec<u16> = c.listeners.iter().map(|l| l.address.port()).collect();
        let ip: std::net::IpAddr = "127.1.0.7".parse().unwrap();
        c.bind_to(ip);
        assert!(c.listeners.iter().all(|l| l.address.ip() == ip));
        let after: Vec<u16> = c.listeners.iter().map(|l| l.address.port()).collect();
        assert_eq!(ports, after);
        assert_eq!(c.admin.address.ip(), ip);
        c.validate().unwrap();
    }
}
