//! A partial node config: the settings a site applies to every node (the operator's
//! `--node-config-overlay`), merged field by field onto a config that was built without them.
//!
//! Every field is optional and only the fields written are applied, at any depth: an overlay
//! of `delivery: {retry: {minBackoff: 5s}}` changes that one value and keeps every other
//! field of `delivery` and of `delivery.retry`. Lists and scalars replace the whole value. An
//! explicit `null` unsets an optional setting (`auth: {usernameKeyFile: null}`) and is refused
//! elsewhere. Unknown fields are refused, so a typo is an error that names the field.
//!
//! What each node of a domain must have from its MailDomain and the operator (`hostname`,
//! `listeners`, `tls`, `nats`, `domains`) is not part of an overlay.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

use crate::{
    AdminConfig, AuthConfig, ByteSize, ClassificationRule, ClientTimeouts, ConnectionConfig,
    ConsumerConfig, DaneConfig, DeliveryConfig, DmarcMode, DnsConfig, EventsConfig, HumanDuration,
    InboundAuthConfig, MtaStsConfig, MxTlsPolicy, NodeConfig, NodeLimits, OutboundTlsConfig,
    RecipientVerificationConfig, RetryConfig, ShapingConfig, ShutdownConfig, SuppressionConfig,
    Timeouts, TlsPolicyOverride, TlsRptConfig,
};

/// Declares the overlay of one config section: a struct with an `Option` of every field, and
/// `apply_to`, which sets the `set` fields that are present and merges the `merge` sections
/// recursively. The target is destructured with every field named (`keep` lists those no
/// overlay may touch), so a field added to a section does not compile until its overlay says
/// what happens to it.
macro_rules! overlay {
    (
        $(#[$doc:meta])*
        $name:ident => $target:ident {
            set { $($set:ident: $set_ty:ty),* $(,)? }
            $(merge { $($merge:ident: $merge_ty:ty),* $(,)? })?
            $(keep { $($keep:ident),* $(,)? })?
        }
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct $name {
            $(
                #[serde(default, deserialize_with = "present")]
                pub $set: Option<$set_ty>,
            )*
            $($(
                #[serde(default, deserialize_with = "present")]
                pub $merge: Option<$merge_ty>,
            )*)?
        }

        impl $name {
            /// Writes the fields this overlay has into `target`, leaving the others.
            pub fn apply_to(&self, target: &mut $target) {
                let $target { $($set,)* $($($merge,)*)? $($($keep: _,)*)? } = target;
                $(
                    if let Some(value) = &self.$set {
                        *$set = value.clone();
                    }
                )*
                $($(
                    if let Some(overlay) = &self.$merge {
                        overlay.apply_to($merge);
                    }
                )*)?
            }
        }
    };
}

overlay! {
    /// Site-wide node settings: every section of [`NodeConfig`] except those each MailDomain
    /// and the operator decide.
    NodeConfigOverlay => NodeConfig {
        set {
            min_data_rate: u64,
            max_connections: u32,
            max_connections_per_ip: u32,
            client_ipv6_prefix: u8,
            max_errors_per_session: u32,
            config_reload_interval: HumanDuration,
            max_junk_commands: u32,
        }
        merge {
            timeouts: TimeoutsOverlay,
            recipient_verification: RecipientVerificationOverlay,
            auth: AuthOverlay,
            admin: AdminOverlay,
            shutdown: ShutdownOverlay,
            dns: DnsOverlay,
            delivery: DeliveryOverlay,
            inbound_auth: InboundAuthOverlay,
            events: EventsOverlay,
            limits: LimitsOverlay,
        }
        keep { hostname, listeners, tls, nats, domains, mta_sts_server }
    }
}

overlay! {
    /// Overlay of [`Timeouts`].
    TimeoutsOverlay => Timeouts {
        set {
            greeting: HumanDuration,
            command: HumanDuration,
            data_init: HumanDuration,
            data_block: HumanDuration,
            data_termination: HumanDuration,
            tls_handshake: HumanDuration,
        }
    }
}

overlay! {
    /// Overlay of [`AuthConfig`].
    AuthOverlay => AuthConfig {
        set {
            max_failures_per_session: u32,
            failures_per_ip_per_minute: u32,
            failures_per_user: u32,
            failures_per_user_window: HumanDuration,
            shared_counter_timeout: HumanDuration,
            max_concurrent_verifications: Option<u32>,
            verification_wait: HumanDuration,
            username_key_file: Option<PathBuf>,
        }
    }
}

overlay! {
    /// Overlay of [`RecipientVerificationConfig`].
    RecipientVerificationOverlay => RecipientVerificationConfig {
        set {
            enabled: bool,
            positive_ttl: HumanDuration,
            negative_ttl: HumanDuration,
            timeout: HumanDuration,
            max_concurrent: u32,
            cache_size: u32,
        }
    }
}

overlay! {
    /// Overlay of [`AdminConfig`].
    AdminOverlay => AdminConfig {
        set { address: SocketAddr, queue_sample_interval: HumanDuration }
    }
}

overlay! {
    /// Overlay of [`ShutdownConfig`].
    ShutdownOverlay => ShutdownConfig {
        set { drain_timeout: HumanDuration }
    }
}

overlay! {
    /// Overlay of [`DnsConfig`].
    DnsOverlay => DnsConfig {
        set { nameservers: Vec<SocketAddr>, timeout: HumanDuration, attempts: u32 }
    }
}

overlay! {
    /// Overlay of [`EventsConfig`].
    EventsOverlay => EventsConfig {
        set {
            enabled: bool,
            max_age: HumanDuration,
            max_bytes: ByteSize,
            publish_timeout: HumanDuration,
            classification: Vec<ClassificationRule>,
        }
        merge { suppression: SuppressionOverlay }
    }
}

overlay! {
    /// Overlay of [`SuppressionConfig`].
    SuppressionOverlay => SuppressionConfig {
        set {
            enabled: bool,
            expire_after: HumanDuration,
            refuse_at_rcpt: bool,
            refuse_text: String,
        }
    }
}

overlay! {
    /// Overlay of [`DeliveryConfig`].
    DeliveryOverlay => DeliveryConfig {
        set {
            enabled: bool,
            concurrency: u32,
            mx_port: u16,
            allowed_networks: Vec<String>,
            blocked_networks: Vec<String>,
            bounce_size_limit: ByteSize,
            pause_check_interval: HumanDuration,
            shaping: ShapingConfig,
        }
        merge {
            retry: RetryOverlay,
            timeouts: ClientTimeoutsOverlay,
            connections: ConnectionOverlay,
            tls: OutboundTlsOverlay,
            consumer: ConsumerOverlay,
        }
    }
}

overlay! {
    /// Overlay of [`RetryConfig`].
    RetryOverlay => RetryConfig {
        set {
            min_backoff: HumanDuration,
            max_backoff: HumanDuration,
            lifetime: HumanDuration,
            bounce_lifetime: HumanDuration,
            delay_warning: Option<HumanDuration>,
            intervals: Vec<HumanDuration>,
        }
    }
}

overlay! {
    /// Overlay of [`ClientTimeouts`].
    ClientTimeoutsOverlay => ClientTimeouts {
        set {
            connect: HumanDuration,
            greeting: HumanDuration,
            command: HumanDuration,
            mail: HumanDuration,
            rcpt: HumanDuration,
            data_init: HumanDuration,
            data_block: HumanDuration,
            data_termination: HumanDuration,
        }
    }
}

overlay! {
    /// Overlay of [`ConnectionConfig`].
    ConnectionOverlay => ConnectionConfig {
        set {
            per_destination: u32,
            idle_timeout: HumanDuration,
            max_messages_per_connection: u32,
        }
    }
}

overlay! {
    /// Overlay of [`OutboundTlsConfig`].
    OutboundTlsOverlay => OutboundTlsConfig {
        set {
            mx: MxTlsPolicy,
            extra_ca_file: Option<PathBuf>,
            mta_sts: MtaStsConfig,
            dane: DaneConfig,
            policies: Vec<TlsPolicyOverride>,
            reports: TlsRptConfig,
        }
    }
}

overlay! {
    /// Overlay of [`ConsumerConfig`].
    ConsumerOverlay => ConsumerConfig {
        set { ack_wait: HumanDuration, max_deliver: u32, max_ack_pending: u32 }
    }
}

overlay! {
    /// Overlay of [`InboundAuthConfig`].
    InboundAuthOverlay => InboundAuthConfig {
        set { enabled: bool, dmarc: DmarcMode, timeout: HumanDuration }
    }
}

overlay! {
    /// Overlay of [`NodeLimits`].
    LimitsOverlay => NodeLimits {
        set {
            message_bytes_in_memory: Option<ByteSize>,
            memory_wait: HumanDuration,
        }
    }
}

impl NodeConfigOverlay {
    /// Parses an overlay from YAML (or JSON). Errors name the offending field.
    pub fn from_yaml(text: &str) -> Result<Self, serde_yaml::Error> {
        serde_yaml::from_str(text)
    }
}

/// A field that is written is `Some`, even when its value is `null` (which then has to be a
/// valid value of the field: `None` of an optional setting). Missing fields are `None` through
/// `#[serde(default)]`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{ListenerConfig, ListenerKind};

    fn config() -> NodeConfig {
        let mut c = NodeConfig::new(
            "mx.example.test".into(),
            vec![ListenerConfig {
                name: "mx".into(),
                kind: ListenerKind::Mx,
                address: "127.0.0.1:2525".parse().unwrap(),
                proxy_protocol: false,
                trusted_proxies: Vec::new(),
                bare_line_endings: Default::default(),
                nul_bytes: Default::default(),
                require_tls: None,
            }],
        );
        c.auth.username_key_file = Some("/etc/kubemail/users/username-key".into());
        c.delivery.retry.max_backoff = HumanDuration::from_secs(7200);
        c
    }

    #[test]
    fn one_nested_field_changes_that_field_only() {
        let base = config();
        let overlay =
            NodeConfigOverlay::from_yaml("delivery: {retry: {minBackoff: 5s}}\n").unwrap();
        let mut merged = base.clone();
        overlay.apply_to(&mut merged);
        assert_eq!(merged.delivery.retry.min_backoff.0, Duration::from_secs(5));
        let mut expected = base;
        expected.delivery.retry.min_backoff = HumanDuration::from_secs(5);
        assert_eq!(
            merged, expected,
            "every other field is kept, at every depth"
        );
    }

    #[test]
    fn a_site_adds_classification_rules_and_suppression_settings() {
        let overlay = NodeConfigOverlay::from_yaml(
            "events: {classification: [{pattern: '(?i)quota', class: mailbox-full}], suppression: {refuseAtRcpt: true}}\n",
        )
        .unwrap();
        let mut merged = config();
        overlay.apply_to(&mut merged);
        assert_eq!(merged.events.classification.len(), 1);
        assert_eq!(
            merged.events.classification[0].class,
            crate::BounceClass::MailboxFull
        );
        assert!(merged.events.suppression.refuse_at_rcpt);
        assert_eq!(
            merged.events.suppression.expire_after,
            config().events.suppression.expire_after,
            "unset fields keep their value"
        );
    }

    #[test]
    fn every_section_and_list_can_be_set_and_null_unsets_optional_fields() {
        let overlay = NodeConfigOverlay::from_yaml(
            r#"
maxConnections: 50
maxJunkCommands: 20
clientIpv6Prefix: 56
timeouts: { command: 1m }
recipientVerification: { negativeTtl: 1m }
auth: { failuresPerUser: 5, maxConcurrentVerifications: 2, usernameKeyFile: null }
admin: { address: "127.0.0.1:9090" }
shutdown: { drainTimeout: 1m }
dns: { nameservers: ["127.0.0.1:15353"] }
delivery:
  mxPort: 1025
  allowedNetworks: ["127.0.0.0/8"]
  timeouts: { connect: 3s }
  connections: { perDestination: 2 }
  tls: { mx: required, extraCaFile: /ca.pem }
  consumer: { maxDeliver: 6 }
  retry: { delayWarning: 4h }
inboundAuth: { dmarc: enforce }
limits: { messageBytesInMemory: 256Mi }
"#,
        )
        .unwrap();
        let mut c = config();
        overlay.apply_to(&mut c);
        assert_eq!(c.max_connections, 50);
        assert_eq!(c.max_connections_per_ip, 50, "kept");
        assert_eq!((c.max_junk_commands, c.client_ipv6_prefix), (20, 56));
        assert_eq!(
            c.recipient_verification.negative_ttl.0,
            Duration::from_secs(60)
        );
        assert!(c.recipient_verification.enabled, "kept");
        assert_eq!(c.auth.max_concurrent_verifications, Some(2));
        assert_eq!(c.timeouts.command.0, Duration::from_secs(60));
        assert_eq!(c.auth.failures_per_user, 5);
        assert_eq!(c.auth.username_key_file, None, "null unsets");
        assert_eq!(c.admin.address.port(), 9090);
        assert_eq!(c.shutdown.drain_timeout.0, Duration::from_secs(60));
        assert_eq!(c.dns.nameservers, ["127.0.0.1:15353".parse().unwrap()]);
        assert_eq!(c.delivery.mx_port, 1025);
        assert_eq!(c.delivery.allowed_networks, ["127.0.0.0/8"]);
        assert_eq!(c.delivery.timeouts.connect.0, Duration::from_secs(3));
        assert_eq!(c.delivery.timeouts.greeting.0, Duration::from_secs(300));
        assert_eq!(c.delivery.connections.per_destination, 2);
        assert_eq!(c.delivery.tls.mx, MxTlsPolicy::Required);
        assert_eq!(c.delivery.consumer.max_deliver, 6);
        assert_eq!(
            c.delivery.retry.delay_warning,
            Some(HumanDuration::from_secs(4 * 3600))
        );
        assert_eq!(c.delivery.retry.max_backoff.0, Duration::from_secs(7200));
        assert_eq!(c.inbound_auth.dmarc, DmarcMode::Enforce);
        assert!(c.inbound_auth.enabled);
        assert_eq!(c.limits.message_bytes_in_memory, Some(ByteSize(256 << 20)));
        assert_eq!(
            c.limits.memory_wait,
            NodeLimits::default().memory_wait,
            "kept"
        );
        c.validate().unwrap();
    }

    #[test]
    fn typos_nulls_and_domain_sections_are_refused_naming_the_field() {
        for (text, needle) in [
            ("delivery: {retry: {minBackof: 5s}}", "minBackof"),
            ("maxConnection: 5", "maxConnection"),
            ("hostname: mx.example.test", "hostname"),
            ("domains: []", "domains"),
            ("delivery: {mxPort: null}", "delivery"),
            ("timeouts: null", "timeouts"),
        ] {
            let err = NodeConfigOverlay::from_yaml(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        assert_eq!(
            NodeConfigOverlay::from_yaml("{}").unwrap(),
            NodeConfigOverlay::default()
        );
    }
}
