//! The configuration of a domain's nodes, built as smtp-node's own typed [`NodeConfig`]: what
//! the MailDomain and the operator's flags decide, then the site overlay
//! (`--node-config-overlay`), then what the Relay's state forces, checked by the node's own
//! validation. The ConfigMap's `node.yaml` is that value serialized with every field written,
//! so a node reads back exactly what was built here.
//!
//! The CRD's enums convert into the config's with `From` (a new CRD value does not compile
//! until it is mapped); the numbers the CRD keeps as `i32` (Kubernetes has no unsigned
//! integers) with `TryFrom`, refusing what the node's types cannot hold.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use kubemail_config::{
    ByteSize, DkimConfig, DkimKeyConfig, DomainConfig, DomainLimits, InboundTarget, InboundTls,
    ListenerConfig, ListenerKind, MtaStsServerConfig, NatsConfig, NodeConfig, NodeConfigOverlay,
    RelayAuth, RelayConfig, TlsConfig, TlsPolicyMode, TlsPolicyOverride,
};

use super::{BuildConfig, BuildError};
use crate::certs::{TLS_CERT_KEY, TLS_KEY_KEY};
use crate::controller::mail_domain::names::{
    ADMIN_PORT, DKIM_DIR, MTA_STS_PORT, NATS_DIR, RELAY_DIR, SMTP_PORT, SUBMISSION_PORT,
    SUBMISSIONS_PORT, TLS_DIR, USERS_DIR,
};
use crate::controller::mail_domain::validate::{Limits, RelayResolution, ValidatedDomain};
use crate::crd::mail_domain::{ForwardProtocol, ForwardSpec, ForwardTls, TlsPolicyRuleMode};
use crate::crd::relay::{RelaySpec, RelayTls};
use crate::dkim;
use crate::nats::credentials::{CA_KEY, CREDENTIALS_KEY};
use crate::users::{USERNAME_KEY_KEY, USERS_FILE_KEY};

/// Node config fields each MailDomain and the operator's flags decide; an overlay may not set
/// them.
const RESERVED_FIELDS: [&str; 5] = ["domains", "hostname", "listeners", "tls", "nats"];

/// A number from a CRD that the node's config cannot hold. The CRD schema's bounds keep it
/// from happening; this says which field if they ever do not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {value} is out of range")]
pub struct OutOfRange {
    pub field: &'static str,
    pub value: i64,
}

impl From<ForwardProtocol> for kubemail_config::ForwardProtocol {
    fn from(protocol: ForwardProtocol) -> Self {
        match protocol {
            ForwardProtocol::Lmtp => Self::Lmtp,
            ForwardProtocol::Smtp => Self::Smtp,
        }
    }
}

impl From<ForwardTls> for InboundTls {
    fn from(tls: ForwardTls) -> Self {
        match tls {
            ForwardTls::Opportunistic => Self::Opportunistic,
            ForwardTls::Required => Self::Required,
            ForwardTls::None => Self::None,
        }
    }
}

impl From<RelayTls> for kubemail_config::RelayTls {
    fn from(tls: RelayTls) -> Self {
        match tls {
            RelayTls::StartTlsRequired => Self::StartTlsRequired,
            RelayTls::Implicit => Self::Implicit,
            RelayTls::Opportunistic => Self::Opportunistic,
        }
    }
}

impl TryFrom<&ForwardSpec> for InboundTarget {
    type Error = OutOfRange;

    fn try_from(forward: &ForwardSpec) -> Result<Self, OutOfRange> {
        Ok(Self {
            host: forward.host.clone(),
            port: port(forward.port, "spec.inbound.forward.port")?,
            protocol: forward.protocol.into(),
            tls: forward.tls.into(),
        })
    }
}

impl TryFrom<&Limits> for DomainLimits {
    type Error = OutOfRange;

    fn try_from(limits: &Limits) -> Result<Self, OutOfRange> {
        Ok(Self {
            max_message_size: ByteSize(limits.max_message_size),
            max_recipients: count(limits.max_recipients, "spec.limits.maxRecipients")?,
            messages_per_minute_per_user: count(
                limits.messages_per_minute_per_user,
                "spec.limits.messagesPerMinutePerUser",
            )?,
        })
    }
}

/// The node-wide part of a node configuration (no domains): listeners on the container
/// ports, the default certificate in [`TLS_DIR`], NATS (with authenticated NATS, reply inbox
/// `inbox_prefix`), the admin endpoint, the key of the shared AUTH failure count when
/// `username_key` names it, the in-memory message budget for messages of up to
/// `max_message_size` bytes, PROXY protocol on every listener from the `proxy_from` networks
/// when the Service's load balancer sends it, then the site overlay.
pub fn base_node_config(
    hostname: &str,
    username_key: Option<PathBuf>,
    inbox_prefix: String,
    max_message_size: u64,
    proxy_from: Option<&[String]>,
    config: &BuildConfig,
) -> Result<NodeConfig, BuildError> {
    let ip = listen_ip(config)?;
    let listener = |name: &str, kind, port| ListenerConfig {
        name: name.to_owned(),
        kind,
        address: SocketAddr::new(ip, port),
        // The Service's load balancer sends PROXY headers to every port, or to none.
        proxy_protocol: proxy_from.is_some(),
        trusted_proxies: proxy_from.map(<[String]>::to_vec).unwrap_or_default(),
        bare_line_endings: Default::default(),
        nul_bytes: Default::default(),
        require_tls: None,
    };
    let mut node = NodeConfig::new(
        hostname.to_owned(),
        vec![
            listener("mx", ListenerKind::Mx, SMTP_PORT),
            listener("submission", ListenerKind::Submission, SUBMISSION_PORT),
            listener("submissions", ListenerKind::ImplicitTls, SUBMISSIONS_PORT),
        ],
    );
    node.tls = Some(TlsConfig::new(
        Path::new(TLS_DIR).join(TLS_CERT_KEY),
        Path::new(TLS_DIR).join(TLS_KEY_KEY),
    ));
    node.nats = queue_nats(config);
    // Authenticated NATS: the operator mints credentials for the domains these nodes serve
    // and manages the JetStream objects, which the credentials may not create.
    if config.nats_auth {
        node.nats.credentials_file = Some(Path::new(NATS_DIR).join(CREDENTIALS_KEY));
        node.nats.inbox_prefix = Some(inbox_prefix);
        node.nats.manage_streams = false;
    }
    if config.nats_tls {
        node.nats.ca_file = Some(Path::new(NATS_DIR).join(CA_KEY));
        node.nats.require_tls = true;
    }
    node.admin.address = SocketAddr::new(ip, ADMIN_PORT);
    // Set before the overlay, so a site-wide `auth` section can still choose its own key.
    node.auth.username_key_file = username_key;
    // Also before the overlay (a site may size it); the Deployment's memory limit is derived
    // from what the node config ends up with.
    node.limits.message_bytes_in_memory = Some(ByteSize(message_memory(max_message_size)));
    if let Some(overlay) = &config.node_overlay {
        overlay.apply_to(&mut node);
    }
    Ok(node)
}

/// Where every node finds the queue: NATS, the stream, the subjects, the body buckets (the
/// same for every MailDomain; a site overlay cannot change it). Credentials and TLS are added
/// per set of nodes.
pub fn queue_nats(config: &BuildConfig) -> NatsConfig {
    NatsConfig {
        url: config.nats_url.clone(),
        stream: config.nats_stream.clone(),
        subject_prefix: config.nats_subject_prefix.clone(),
        replicas: config.nats_replicas,
        ..NatsConfig::default()
    }
}

/// The node configuration of `v`'s nodes. `has_users`: the users Secret is mounted;
/// `signing`: the DKIM selectors that sign now.
pub fn node_config(
    v: &ValidatedDomain,
    has_users: bool,
    signing: &[String],
    config: &BuildConfig,
) -> Result<NodeConfig, BuildError> {
    let mut node = base_node_config(
        &v.hostname,
        has_users.then(|| Path::new(USERS_DIR).join(USERNAME_KEY_KEY)),
        kubemail_queue::inbox_prefix(&[&v.domain]),
        v.limits.max_message_size,
        v.proxy_protocol.as_deref(),
        config,
    )?;

    let mut domain = DomainConfig {
        name: v.domain.clone(),
        recipients: v.inbound.recipients.clone(),
        catch_all: v.inbound.catch_all,
        users_file: has_users.then(|| Path::new(USERS_DIR).join(USERS_FILE_KEY)),
        allowed_senders: Default::default(),
        limits: DomainLimits::try_from(&v.limits).map_err(out_of_range)?,
        inbound: v
            .inbound
            .forward
            .as_ref()
            .map(InboundTarget::try_from)
            .transpose()
            .map_err(out_of_range)?,
        relay: None,
        retry_intervals: v
            .retry_intervals
            .iter()
            .map(|d| kubemail_config::HumanDuration(*d))
            .collect(),
        mta_sts_policy: v
            .mta_sts
            .as_ref()
            .map(|sts| crate::dns_records::mta_sts_policy(sts, &v.hostname)),
        dkim: DkimConfig {
            keys: signing
                .iter()
                .map(|selector| DkimKeyConfig {
                    selector: selector.clone(),
                    key_file: Path::new(DKIM_DIR).join(dkim::secret_key(selector)),
                })
                .collect(),
        },
        tls: None,
    };
    match &v.relay {
        RelayResolution::Direct => {}
        RelayResolution::Resolved { name, spec, .. } => {
            domain.relay = Some(relay(name, spec, v.replicas).map_err(out_of_range)?);
        }
        // Outbound mail must not go direct when a relay was asked for: accept and queue it,
        // deliver nothing until the Relay is usable. After the overlay, which cannot undo it.
        RelayResolution::NotFound { .. } | RelayResolution::NotReady { .. } => {
            node.delivery.enabled = false;
        }
    }
    if v.mta_sts.is_some() {
        node.mta_sts_server = Some(MtaStsServerConfig {
            address: SocketAddr::new(listen_ip(config)?, MTA_STS_PORT),
        });
    }
    // The MailDomain's own rules win over a site-wide overlay's.
    if !v.outbound_tls_policies.is_empty() {
        node.delivery.tls.policies = v
            .outbound_tls_policies
            .iter()
            .map(|p| TlsPolicyOverride {
                domain: p.domain.clone(),
                mode: match p.mode {
                    TlsPolicyRuleMode::Verify => TlsPolicyMode::Verify,
                    TlsPolicyRuleMode::Dane => TlsPolicyMode::Dane,
                    TlsPolicyRuleMode::None => TlsPolicyMode::None,
                },
            })
            .collect();
    }
    node.domains = vec![domain];
    node.validate()
        .map_err(|e| BuildError::NodeConfig(e.to_string()))?;
    Ok(node)
}

/// The address the nodes' listeners bind (`--node-listen-host`).
fn listen_ip(config: &BuildConfig) -> Result<IpAddr, BuildError> {
    config.listen_host.parse().map_err(|_| {
        BuildError::NodeConfig(format!(
            "the node listen host {:?} is not an IP address",
            config.listen_host
        ))
    })
}

/// The ConfigMap text of `node`: a header naming its MailDomain, then every field.
pub fn node_yaml(v: &ValidatedDomain, node: &NodeConfig) -> Result<String, BuildError> {
    let body = serde_yaml::to_string(node).map_err(|e| BuildError::NodeConfig(e.to_string()))?;
    Ok(format!(
        "# Rendered by kubemail-operator from MailDomain {}/{}; do not edit.\n\
         # Every setting is written out, the node's defaults included.\n{body}",
        v.namespace, v.name
    ))
}

/// Why a node config overlay file was refused.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("cannot read it")]
    Read(#[source] std::io::Error),
    #[error("it is not valid YAML")]
    Parse(#[source] serde_yaml::Error),
    #[error("it must be a YAML mapping of node config fields")]
    NotAMapping,
    #[error("it may not set `{0}`: that comes from each MailDomain and the operator's flags")]
    ReservedField(&'static str),
    #[error("it is not a valid node config overlay")]
    Invalid(#[source] serde_yaml::Error),
}

/// Message bytes a node may hold in memory (`limits.messageBytesInMemory`): four of the
/// domain's largest messages (twice what the node needs for one, whose buffer briefly exists
/// twice while it grows), and never less than 256 MiB for many ordinary ones at once.
pub fn message_memory(max_message_size: u64) -> u64 {
    const FLOOR: u64 = 256 << 20;
    max_message_size.saturating_mul(4).max(FLOOR)
}

/// Reads the site-wide node config overlay (`--node-config-overlay`) at start-up. Fields that
/// each MailDomain or the operator's flags own are refused, and so is anything the node's
/// config does not have (the error names the field), rather than being found out at the first
/// reconcile or silently overridden.
pub fn load_node_overlay(path: &Path) -> Result<NodeConfigOverlay, OverlayError> {
    let text = std::fs::read_to_string(path).map_err(OverlayError::Read)?;
    parse_node_overlay(&text)
}

pub(super) fn parse_node_overlay(text: &str) -> Result<NodeConfigOverlay, OverlayError> {
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(OverlayError::Parse)?;
    let serde_yaml::Value::Mapping(map) = &value else {
        return Err(OverlayError::NotAMapping);
    };
    for reserved in RESERVED_FIELDS {
        if map.contains_key(reserved) {
            return Err(OverlayError::ReservedField(reserved));
        }
    }
    NodeConfigOverlay::from_yaml(text).map_err(OverlayError::Invalid)
}

/// The smarthost `name`, with its rate divided among the domain's `replicas`.
fn relay(name: &str, spec: &RelaySpec, replicas: i32) -> Result<RelayConfig, OutOfRange> {
    let messages_per_second = match &spec.rate_limit {
        None => None,
        Some(rate) => {
            // The Relay's limit is for all nodes together; each node gets its share.
            let total = count(
                rate.messages_per_second,
                "Relay spec.rateLimit.messagesPerSecond",
            )?;
            let replicas = count(replicas.max(1), "spec.replicas")?;
            Some(total.div_ceil(replicas))
        }
    };
    Ok(RelayConfig {
        name: name.to_owned(),
        host: spec.host.clone(),
        port: port(spec.port, "Relay spec.port")?,
        tls: spec.tls.into(),
        verify_certificate: true,
        auth: spec.auth.as_ref().map(|_| RelayAuth {
            username_file: Path::new(RELAY_DIR).join("username"),
            password_file: Path::new(RELAY_DIR).join("password"),
        }),
        messages_per_second,
    })
}

fn port(value: i32, field: &'static str) -> Result<u16, OutOfRange> {
    u16::try_from(value).map_err(|_| OutOfRange {
        field,
        value: value.into(),
    })
}

fn count(value: i32, field: &'static str) -> Result<u32, OutOfRange> {
    u32::try_from(value).map_err(|_| OutOfRange {
        field,
        value: value.into(),
    })
}

fn out_of_range(e: OutOfRange) -> BuildError {
    BuildError::NodeConfig(e.to_string())
}

#[cfg(test)]
mod tests {
    use kubemail_config::NodeConfig;

    use super::*;
    use crate::controller::mail_domain::build::tests::{FULL, config, md, refs};
    use crate::controller::mail_domain::validate::validate;
    use crate::crd::LocalObjectReference;
    use crate::crd::relay::{RateLimit, RelayAuth as CrdRelayAuth};

    /// A CRD value and the node's for it mean the same when their serialized names agree
    /// (apart from case: the CRD writes `StartTlsRequired`, the node `startTlsRequired`).
    fn same_name(crd: impl serde::Serialize, node: impl serde::Serialize) -> bool {
        let name = |v: serde_json::Value| v.as_str().unwrap_or_default().to_ascii_lowercase();
        name(serde_json::to_value(crd).unwrap()) == name(serde_json::to_value(node).unwrap())
    }

    fn relays() -> Vec<RelayResolution> {
        let mut out = vec![
            RelayResolution::Direct,
            RelayResolution::NotFound {
                name: "sendgrid".into(),
            },
            RelayResolution::NotReady {
                name: "sendgrid".into(),
                message: "credentials missing".into(),
            },
        ];
        for tls in [
            RelayTls::StartTlsRequired,
            RelayTls::Implicit,
            RelayTls::Opportunistic,
        ] {
            for auth in [false, true] {
                // The Relay CRD's CEL rule refuses credentials without verified TLS.
                if auth && tls == RelayTls::Opportunistic {
                    continue;
                }
                for rate in [None, Some(9)] {
                    out.push(RelayResolution::Resolved {
                        name: "sendgrid".into(),
                        spf_include: None,
                        spec: Box::new(RelaySpec {
                            host: "smtp.sendgrid.net".into(),
                            port: 587,
                            tls,
                            auth: auth.then(|| CrdRelayAuth {
                                secret_ref: LocalObjectReference {
                                    name: "sendgrid-auth".into(),
                                },
                            }),
                            rate_limit: rate.map(|messages_per_second| RateLimit {
                                messages_per_second,
                            }),
                            spf_include: None,
                            probe: None,
                        }),
                    });
                }
            }
        }
        out
    }

    fn forwards() -> Vec<Option<ForwardSpec>> {
        let mut out = vec![None];
        for protocol in [ForwardProtocol::Lmtp, ForwardProtocol::Smtp] {
            for tls in [
                ForwardTls::Opportunistic,
                ForwardTls::Required,
                ForwardTls::None,
            ] {
                out.push(Some(ForwardSpec {
                    host: "dovecot.mail.svc".into(),
                    port: 24,
                    protocol,
                    tls,
                }));
            }
        }
        out
    }

    #[test]
    fn every_crd_value_renders_a_config_the_node_accepts_and_reads_back_equal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.yaml");
        let base = validate(&md(FULL), &refs()).unwrap();
        let signing = ["kubemail1".to_owned(), "kubemail1-ed25519".to_owned()];
        let mut rendered = 0;
        for (listen_host, listen) in [("0.0.0.0", "0.0.0.0"), ("::", "[::]")] {
            let cfg = BuildConfig {
                listen_host: listen_host.into(),
                ..config()
            };
            for has_users in [false, true] {
                for forward in forwards() {
                    for relay in relays() {
                        let mut v = base.clone();
                        v.inbound.forward = forward.clone();
                        v.relay = relay.clone();
                        let case = format!("{listen_host} users={has_users} {forward:?} {relay:?}");
                        let node = node_config(&v, has_users, &signing, &cfg)
                            .unwrap_or_else(|e| panic!("{case}: {e}"));
                        node.validate().unwrap_or_else(|e| panic!("{case}: {e}"));

                        let addresses: Vec<String> = node
                            .listeners
                            .iter()
                            .map(|l| l.address.to_string())
                            .chain([node.admin.address.to_string()])
                            .collect();
                        assert_eq!(
                            addresses,
                            ["2525", "2587", "2465", "8080"].map(|p| format!("{listen}:{p}")),
                            "{case}"
                        );
                        let d = &node.domains[0];
                        assert_eq!(d.users_file.is_some(), has_users, "{case}");
                        assert_eq!(node.auth.username_key_file.is_some(), has_users, "{case}");
                        match (&forward, &d.inbound) {
                            (None, None) => {}
                            (Some(f), Some(t)) => {
                                assert!(same_name(f.protocol, t.protocol), "{case}");
                                assert!(same_name(f.tls, t.tls), "{case}");
                                assert_eq!((t.host.as_str(), t.port), ("dovecot.mail.svc", 24));
                            }
                            other => panic!("{case}: {other:?}"),
                        }
                        match (&relay, &d.relay) {
                            (RelayResolution::Resolved { spec, .. }, Some(r)) => {
                                assert!(same_name(spec.tls, r.tls), "{case}");
                                assert_eq!(r.auth.is_some(), spec.auth.is_some(), "{case}");
                                // 9/s over the fixture's 2 replicas, rounded up.
                                let share = spec.rate_limit.as_ref().map(|_| 5);
                                assert_eq!(r.messages_per_second, share, "{case}");
                                assert!(node.delivery.enabled, "{case}");
                            }
                            (RelayResolution::Direct, None) => assert!(node.delivery.enabled),
                            (
                                RelayResolution::NotFound { .. } | RelayResolution::NotReady { .. },
                                None,
                            ) => assert!(!node.delivery.enabled, "{case}: nothing leaves"),
                            other => panic!("{case}: {other:?}"),
                        }

                        // What the node reads from the ConfigMap is the value built here.
                        std::fs::write(&path, node_yaml(&v, &node).unwrap()).unwrap();
                        let read =
                            NodeConfig::load(&path).unwrap_or_else(|e| panic!("{case}: {e}"));
                        assert_eq!(read, node, "{case}");
                        rendered += 1;
                    }
                }
            }
        }
        // 2 listen hosts x users or not x 7 inbound targets x 13 relay states.
        assert_eq!(rendered, 2 * 2 * 7 * 13);
    }

    #[test]
    fn numbers_the_node_cannot_hold_are_refused_with_the_field() {
        let mut v = validate(&md(FULL), &refs()).unwrap();
        v.inbound.forward = Some(ForwardSpec {
            host: "dovecot.mail.svc".into(),
            port: 70_000,
            protocol: ForwardProtocol::Lmtp,
            tls: ForwardTls::None,
        });
        let err = node_config(&v, false, &[], &config()).unwrap_err();
        assert!(
            err.to_string().contains("spec.inbound.forward.port: 70000"),
            "{err}"
        );
        let cfg = BuildConfig {
            listen_host: "localhost".into(),
            ..config()
        };
        let err = node_config(&v, false, &[], &cfg).unwrap_err();
        assert!(err.to_string().contains("\"localhost\""), "{err}");
    }
}
