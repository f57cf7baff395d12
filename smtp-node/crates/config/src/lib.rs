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
//!
//! The modules follow the sections of the file: [`listener`], [`tls`], [`nats`], [`domain`]
//! (per-domain settings: limits, inbound target, relay, DKIM), [`timeouts`], [`auth`],
//! [`admin`], [`shutdown`], [`dns`], [`delivery`], [`inbound_auth`],
//! [`recipient_verification`], [`limits`] and [`events`]; [`units`] holds the value formats
//! and [`network`] the CIDR networks of the delivery address policy. Each section checks its
//! own fields. Two more contracts between the operator and the node live here: the users file
//! ([`users_file`]) and the site-wide overlay of node settings
//! ([`overlay`]). Every public item is re-exported at the crate root.

pub mod admin;
pub mod auth;
pub mod delivery;
pub mod dns;
pub mod domain;
pub mod events;
pub mod inbound_auth;
pub mod limits;
pub mod listener;
pub mod nats;
pub mod network;
pub mod overlay;
pub mod recipient_verification;
pub mod shutdown;
pub mod timeouts;
pub mod tls;
pub mod tls_policy;
pub mod units;
pub mod users_file;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::admin::AdminConfig;
pub use crate::auth::{AuthConfig, MAX_AUTH_FAILURES_PER_USER};
pub use crate::delivery::{
    BackoffConfig, ClientTimeouts, ConnectionConfig, ConsumerConfig, DeliveryConfig, MxTlsPolicy,
    OutboundTlsConfig, RetryConfig, ShapingConfig, ShapingLimits, ShapingRule, builtin_rules,
};
pub use crate::dns::{DNS_SERVER_ENV, DnsConfig};
pub use crate::domain::{
    DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_MAX_RECIPIENTS, DkimConfig, DkimKeyConfig, DomainConfig,
    DomainLimits, DomainTls, ForwardProtocol, InboundTarget, InboundTls, MAX_MESSAGE_SIZE_CEILING,
    RelayAuth, RelayConfig, RelayTls, validate_domain_name,
};
pub use crate::events::{BounceClass, ClassificationRule, EventsConfig, SuppressionConfig};
pub use crate::inbound_auth::{DmarcMode, InboundAuthConfig};
pub use crate::limits::{DEFAULT_MESSAGE_BYTES_IN_MEMORY, MIN_MESSAGE_BYTES_IN_MEMORY, NodeLimits};
pub use crate::listener::{BareLineEndings, ListenerConfig, ListenerKind, NulBytes};
pub use crate::nats::{DEFAULT_NATS_URL, NATS_URL_ENV, NatsConfig};
pub use crate::network::Network;
pub use crate::overlay::NodeConfigOverlay;
pub use crate::recipient_verification::RecipientVerificationConfig;
pub use crate::shutdown::ShutdownConfig;
pub use crate::timeouts::Timeouts;
pub use crate::tls::TlsConfig;
pub use crate::tls_policy::{
    DaneConfig, MtaStsConfig, MtaStsServerConfig, TlsPolicyMode, TlsPolicyOverride, TlsRptConfig,
};
pub use crate::units::{ByteSize, HumanDuration};

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
    #[serde(default = "NatsConfig::from_env")]
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
    /// Concurrent SMTP connections from one client (an IPv4 address or an IPv6 prefix of
    /// `clientIpv6Prefix` bits); more get `421 4.7.0`.
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: u32,
    /// The IPv6 prefix length that makes one client for the per-client limits
    /// (`maxConnectionsPerIp`, `auth.failuresPerIpPerMinute`): a single host is usually given
    /// a whole /64, so counting each address on its own would leave it unlimited. IPv4
    /// addresses always count one by one. 32 to 128 (128: every IPv6 address on its own).
    #[serde(default = "default_client_ipv6_prefix")]
    pub client_ipv6_prefix: u8,
    /// Failed commands (syntax, sequence, unknown, refused) before `421 4.7.0` and disconnect.
    #[serde(default = "default_max_errors_per_session")]
    pub max_errors_per_session: u32,
    /// Commands that do not move a transaction forward (NOOP, RSET, HELP, VRFY, a repeated
    /// HELO/EHLO, a duplicate RCPT, a RCPT over the recipient limit) a session may send
    /// between accepted messages; past it the session gets `421 4.7.0` and is closed, so that
    /// one connection cannot hold a slot forever (Postfix `smtpd_junk_command_limit`).
    #[serde(default = "default_max_junk_commands")]
    pub max_junk_commands: u32,
    /// Probing the inbound target of catch-all domains for each recipient at RCPT time.
    #[serde(default)]
    pub recipient_verification: RecipientVerificationConfig,
    /// Node-wide limits: message bytes in memory.
    #[serde(default)]
    pub limits: NodeLimits,
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
    #[serde(default = "DnsConfig::from_env")]
    pub dns: DnsConfig,
    /// Delivery workers: retries, timeouts, connection limits, outbound TLS.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// SPF, DKIM and DMARC checks of mail arriving on MX listeners.
    #[serde(default)]
    pub inbound_auth: InboundAuthConfig,
    /// How often the node looks at its config file; a changed file (by content) swaps the
    /// domains (users, DKIM keys, certificates, limits, routes, delivery consumers) and the
    /// per-session settings for new sessions, without a restart and without touching open
    /// sessions. Listeners, NATS, admin and delivery settings still need a restart.
    #[serde(default = "default_config_reload_interval")]
    pub config_reload_interval: HumanDuration,
    /// The HTTPS listener serving the domains' own MTA-STS policies (`domains[].mtaStsPolicy`).
    /// Unset: none is served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mta_sts_server: Option<MtaStsServerConfig>,
    /// Delivery events, bounce classification and the suppression list.
    #[serde(default)]
    pub events: EventsConfig,
}

impl NodeConfig {
    /// A config with these listeners and the built-in defaults for everything else (no
    /// environment variables consulted, no domains).
    pub fn new(hostname: String, listeners: Vec<ListenerConfig>) -> Self {
        Self {
            hostname,
            listeners,
            tls: None,
            nats: NatsConfig::default(),
            domains: Vec::new(),
            timeouts: Timeouts::default(),
            min_data_rate: default_min_data_rate(),
            max_connections: default_max_connections(),
            max_connections_per_ip: default_max_connections_per_ip(),
            client_ipv6_prefix: default_client_ipv6_prefix(),
            max_errors_per_session: default_max_errors_per_session(),
            max_junk_commands: default_max_junk_commands(),
            recipient_verification: RecipientVerificationConfig::default(),
            limits: NodeLimits::default(),
            auth: AuthConfig::default(),
            admin: AdminConfig::default(),
            shutdown: ShutdownConfig::default(),
            dns: DnsConfig::default(),
            delivery: DeliveryConfig::default(),
            inbound_auth: InboundAuthConfig::default(),
            config_reload_interval: default_config_reload_interval(),
            mta_sts_server: None,
            events: EventsConfig::default(),
        }
    }

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
        if let Some(ca) = &mut self.nats.ca_file {
            resolve(ca);
        }
        if let Some(ca) = &mut self.delivery.tls.extra_ca_file {
            resolve(ca);
        }
        if let Some(anchor) = &mut self.delivery.tls.dane.trust_anchor_file {
            resolve(anchor);
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
            if let Some(tls) = &mut domain.tls {
                resolve(&mut tls.cert_file);
                resolve(&mut tls.key_file);
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
            l.validate(&format!("listeners[{i}]"), &mut errors);
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
        if let Some(tls) = &self.tls {
            tls.validate(&mut errors);
        }
        self.nats.validate(&mut errors);
        let mut domain_names = HashSet::new();
        let mut sni_names = HashSet::new();
        for (i, d) in self.domains.iter().enumerate() {
            d.validate(&format!("domains[{i}]"), &mut errors);
            if !domain_names.insert(d.name.as_str()) {
                errors.push(format!("domains[{i}].name: duplicate domain {:?}", d.name));
            }
            if let Some(tls) = &d.tls {
                if self.tls.is_none() {
                    errors.push(format!(
                        "domains[{i}].tls: a domain certificate needs the node's tls section (the default certificate)"
                    ));
                }
                if !sni_names.insert(tls.hostname.to_ascii_lowercase()) {
                    errors.push(format!(
                        "domains[{i}].tls.hostname: {:?} is another domain's too",
                        tls.hostname
                    ));
                }
            }
        }
        if self.config_reload_interval.0.is_zero() {
            errors.push("configReloadInterval: must be greater than 0".to_owned());
        }
        self.delivery.validate(&mut errors);
        self.dns.validate(&mut errors);
        self.inbound_auth.validate(&mut errors);
        self.timeouts.validate(&mut errors);
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
        if self.max_junk_commands == 0 {
            errors.push("maxJunkCommands: must be at least 1".to_owned());
        }
        if !(32..=128).contains(&self.client_ipv6_prefix) {
            errors.push(format!(
                "clientIpv6Prefix: {} must be between 32 and 128",
                self.client_ipv6_prefix
            ));
        }
        self.recipient_verification.validate(&mut errors);
        self.auth.validate(&mut errors);
        self.events.validate(&mut errors);
        if let Some(server) = &self.mta_sts_server {
            if self.tls.is_none() {
                errors.push(
                    "mtaStsServer: needs a tls section (its certificate must name mta-sts.<domain>)"
                        .to_owned(),
                );
            }
            if addresses.contains(&server.address) || server.address == self.admin.address {
                errors.push(format!(
                    "mtaStsServer.address: {} is used by another listener",
                    server.address
                ));
            }
        }
        self.limits.validate(self.max_message_size(), &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
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

// Postfix smtpd_min_data_rate.
// Five seconds: a new domain of a shared pool is served within seconds of its ConfigMap
// reaching the pod (the kubelet's own sync adds up to a minute), for one stat and one read.
fn default_config_reload_interval() -> HumanDuration {
    HumanDuration::from_secs(5)
}

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
// Postfix smtpd_junk_command_limit.
fn default_max_junk_commands() -> u32 {
    100
}
// RFC 6177: a site (and often a single host) gets a /64 or more.
fn default_client_ipv6_prefix() -> u8 {
    64
}
pub(crate) fn default_true() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::*;
    use crate::dns::parse_nameservers;

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
        assert!(c.nats.group_commit, "group commit is on unless turned off");
        assert_eq!(c.listeners[0].bare_line_endings, BareLineEndings::Reject);
        assert!(!c.listeners[0].requires_tls());
        assert!(c.domains[0].has_recipient("BOB"));
        assert!(c.domains[0].has_recipient("postmaster"));
        assert!(!c.domains[0].has_recipient("alice"));
    }

    #[test]
    fn new_is_a_file_with_only_hostname_and_listeners() {
        let mut parsed = NodeConfig::from_yaml(MINIMAL).unwrap();
        parsed.domains.clear();
        // A file without `nats` or `dns` takes $NATS_URL and $DNS_SERVER; `new` never looks.
        parsed.nats.url = DEFAULT_NATS_URL.to_owned();
        parsed.dns.nameservers.clear();
        let built = NodeConfig::new("mx.example.test".into(), parsed.listeners.clone());
        assert_eq!(built, parsed);
        let text = serde_yaml::to_string(&built).unwrap();
        assert_eq!(
            NodeConfig::from_yaml(&text).unwrap(),
            built,
            "written out, read back"
        );
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
    fn the_memory_budget_must_hold_the_largest_message() {
        let c = NodeConfig::from_yaml(MINIMAL).unwrap();
        assert_eq!(c.limits, NodeLimits::default());
        assert_eq!(c.limits.message_bytes_in_memory, None, "sized by the node");
        assert_eq!(c.limits.memory_wait.0, Duration::from_secs(10));
        let yaml = format!("{MINIMAL}limits: {{ messageBytesInMemory: 16Mi, memoryWait: 0s }}\n");
        let err = NodeConfig::from_yaml(&yaml)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        for needle in [
            "limits.messageBytesInMemory: 16777216 must be at least twice the largest maxMessageSize (26214400)",
            "limits.memoryWait",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
        let yaml = format!("{MINIMAL}limits: {{ messageBytesInMemory: 50Mi, memoryWait: 30s }}\n");
        let c = NodeConfig::from_yaml(&yaml).unwrap();
        c.validate().unwrap();
        assert_eq!(c.limits.message_bytes_in_memory, Some(ByteSize(50 << 20)));
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
    fn hostile_client_limits_have_defaults_and_bounds() {
        let c = NodeConfig::from_yaml(MINIMAL).unwrap();
        assert_eq!(c.max_junk_commands, 100);
        assert_eq!(c.client_ipv6_prefix, 64);
        assert_eq!(c.listeners[0].nul_bytes, NulBytes::Reject);
        assert!(c.recipient_verification.enabled);
        assert_eq!(c.auth.max_concurrent_verifications, None);
        assert!(c.auth.verification_slots() >= 1);
        assert_eq!(c.auth.verification_wait.0, Duration::from_secs(5));
        let yaml = format!(
            "{MINIMAL}maxJunkCommands: 0\nclientIpv6Prefix: 16\nauth: {{ maxConcurrentVerifications: 0, verificationWait: 2m }}\nrecipientVerification: {{ positiveTtl: 0s, maxConcurrent: 0 }}\n"
        );
        let err = NodeConfig::from_yaml(&yaml)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        for needle in [
            "maxJunkCommands",
            "clientIpv6Prefix: 16",
            "auth.maxConcurrentVerifications",
            "auth.verificationWait: 2m",
            "recipientVerification.positiveTtl",
            "recipientVerification.maxConcurrent",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
    }

    #[test]
    fn proxy_protocol_requires_trusted_proxies() {
        let yaml = r#"
hostname: mx.example.test
listeners:
  - { name: lb, kind: mx, address: "127.0.0.1:2525", proxyProtocol: true }
  - { name: lb2, kind: mx, address: "127.0.0.1:2526", proxyProtocol: true, trustedProxies: ["10.0.0.0/8", "bogus"] }
  - { name: lb3, kind: mx, address: "127.0.0.1:2527", proxyProtocol: true, trustedProxies: ["10.0.0.0/8", "2001:db8::1"], nulBytes: strip }
"#;
        let c = NodeConfig::from_yaml(yaml).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("listeners[0].trustedProxies: required when proxyProtocol is on"),
            "{err}"
        );
        assert!(err.contains("listeners[1].trustedProxies[1]"), "{err}");
        assert!(!err.contains("listeners[2]"), "{err}");
        let lb = &c.listeners[2];
        assert_eq!(lb.nul_bytes, NulBytes::Strip);
        assert!(lb.trusts_proxy("10.1.2.3".parse().unwrap()));
        assert!(lb.trusts_proxy("::ffff:10.1.2.3".parse().unwrap()));
        assert!(lb.trusts_proxy("2001:db8::1".parse().unwrap()));
        assert!(!lb.trusts_proxy("2001:db8::2".parse().unwrap()));
        assert!(!lb.trusts_proxy("192.0.2.1".parse().unwrap()));
        assert!(!c.listeners[0].trusts_proxy("10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn allowed_senders_narrow_or_widen_what_a_user_may_send_as() {
        let yaml = format!(
            "{MINIMAL}    allowedSenders:\n      alice: [alice@example.test, \"*@lists.example.test\", team@other.test]\n"
        );
        let c = NodeConfig::from_yaml(&yaml).unwrap();
        c.validate().unwrap();
        let d = &c.domains[0];
        let alice = "alice@example.test";
        assert!(d.sender_allowed(alice, "Alice@Example.test"));
        assert!(d.sender_allowed(alice, "news@lists.example.test"));
        assert!(d.sender_allowed(alice, "team@other.test"));
        assert!(
            !d.sender_allowed(alice, "bob@example.test"),
            "listed: only the list"
        );
        assert!(!d.sender_allowed(alice, "x@other.test"));
        // A user without a list may use any address of the domain, and only that.
        assert!(d.sender_allowed("bob@example.test", "anyone@example.test"));
        assert!(!d.sender_allowed("bob@example.test", "bob@example.test.evil"));
        assert!(!d.sender_allowed("bob@example.test", "no-domain"));
        let bad = format!(
            "{MINIMAL}    allowedSenders:\n      carol@other.test: [x@example.test]\n      dave: [\"@example.test\", \"*@Bad_Domain\"]\n"
        );
        let err = NodeConfig::from_yaml(&bad)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"carol@other.test\" is not a user"), "{err}");
        assert!(err.contains("allowedSenders[\"dave\"][0]"), "{err}");
        assert!(err.contains("allowedSenders[\"dave\"][1]"), "{err}");
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
