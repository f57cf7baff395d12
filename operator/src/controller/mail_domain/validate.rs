//! Validate: turns a MailDomain and what [`dereference`](super::dereference) found into a
//! [`ValidatedDomain`] with every value parsed, or an [`Invalid`] with a reason and a message a
//! person can act on. No client: everything it needs has been read already.
//!
//! The CRD's CEL rules refuse most bad specs at admission; this step checks what only the
//! operator can know (durations relative to each other, referenced objects, installed CRDs)
//! and re-checks names with the node's own rule, so the node never gets a config it refuses.

use std::net::IpAddr;
use std::time::Duration;

use kube::ResourceExt;
use kubemail_config::{ByteSize, MAX_MESSAGE_SIZE_CEILING, validate_domain_name};

use super::dereference::Dereferenced;
use crate::crd::mail_domain::{
    DmarcSpec, InboundSpec, IssuerRef, MailDomain, MtaStsMode, ServiceSpec, ServiceType, SpfSpec,
    TlsPolicyRule,
};
use crate::crd::pod::PodShape;
use crate::crd::relay::{Relay, RelaySpec};
use crate::dkim::RotationPolicy;
use crate::dns_records::{MAX_SPF_LOOKUPS, MtaSts};
use crate::timestamps::{parse_duration, seconds};
use crate::users::{self, SourceUsers};

/// RFC 8461 3.2: `max_age` is at most 31557600 seconds (a year).
const MTA_STS_MAX_AGE_LIMIT: u64 = 31_557_600;
/// How often to look again for CRDs that are not installed yet.
pub const CRD_RECHECK: Duration = Duration::from_secs(60);

/// Where the certificate comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TlsSource {
    /// The operator's CA issues it.
    OperatorCa,
    /// cert-manager issues it.
    CertManager(IssuerRef),
}

/// How outbound mail leaves.
#[derive(Debug, Clone, PartialEq)]
pub enum RelayResolution {
    /// No relayRef: direct MX delivery.
    Direct,
    /// The Relay exists and is Ready.
    Resolved {
        name: String,
        spf_include: Option<String>,
        spec: Box<RelaySpec>,
    },
    /// relayRef names no Relay.
    NotFound { name: String },
    /// The Relay exists but is not Ready (e.g. its credentials Secret is missing).
    NotReady { name: String, message: String },
}

/// Submission users as read from their Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsersSource {
    pub secret_name: String,
    pub users: SourceUsers,
}

/// Message limits, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_message_size: u64,
    pub max_recipients: i32,
    pub messages_per_minute_per_user: i32,
}

/// A MailDomain with every value checked and parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedDomain {
    pub name: String,
    pub namespace: String,
    pub generation: Option<i64>,
    pub domain: String,
    pub hostname: String,
    pub replicas: i32,
    pub service_type: ServiceType,
    /// The Service settings (type, annotations, load balancer), checked.
    pub service: ServiceSpec,
    /// Scheduling and resources of the node pods (resources are checked against the node's
    /// memory budget when the Deployment is built).
    pub pod: PodShape,
    /// Networks trusted to send the PROXY header; `None`: no PROXY protocol.
    pub proxy_protocol: Option<Vec<String>>,
    pub tls: TlsSource,
    pub dkim: RotationPolicy,
    pub spf: SpfSpec,
    pub dmarc: DmarcSpec,
    pub mta_sts: Option<MtaSts>,
    pub tls_rpt: Option<String>,
    pub relay: RelayResolution,
    pub inbound: InboundSpec,
    pub users: Option<UsersSource>,
    pub limits: Limits,
    pub ttl: i32,
    /// Fixed outbound TLS policies per recipient domain.
    pub outbound_tls_policies: Vec<TlsPolicyRule>,
    /// The waits between delivery attempts (empty: the node default).
    pub retry_intervals: Vec<Duration>,
}

impl ValidatedDomain {
    /// The names the nodes' certificate carries: the host name, and `mta-sts.<domain>` when
    /// the nodes serve the domain's MTA-STS policy.
    pub fn certificate_names(&self) -> Vec<String> {
        let mut names = vec![self.hostname.clone()];
        if self.mta_sts.is_some() {
            names.push(format!("mta-sts.{}", self.domain));
        }
        names
    }
}

/// Why a spec cannot be reconciled as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// CamelCase reason for the `Ready` condition and the event.
    pub reason: &'static str,
    pub message: String,
    /// Look again after this long (for things no watch reports, such as a CRD being
    /// installed); `None`: wait for a change of the MailDomain or what it refers to.
    pub retry_after: Option<Duration>,
}

impl Invalid {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// Checks and parses the spec.
pub fn validate(md: &MailDomain, refs: &Dereferenced) -> Result<ValidatedDomain, Invalid> {
    let spec = &md.spec;
    validate_domain_name(&spec.domain)
        .map_err(|e| Invalid::new("InvalidDomain", format!("spec.domain: {e}")))?;
    let hostname = spec.effective_hostname();
    validate_domain_name(&hostname)
        .map_err(|e| Invalid::new("InvalidHostname", format!("spec.hostname: {e}")))?;

    let duration = |field: &str, text: &str| {
        parse_duration(text).map_err(|e| Invalid::new("InvalidDuration", format!("{field}: {e}")))
    };
    let publish_ahead = duration("spec.dkim.publishAhead", &spec.dkim.publish_ahead)?;
    let retain_after = duration("spec.dkim.retainAfter", &spec.dkim.retain_after)?;
    let retry_intervals = spec
        .delivery
        .as_ref()
        .map(|d| d.retry_intervals.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|t| duration("spec.delivery.retryIntervals", t))
        .collect::<Result<Vec<Duration>, Invalid>>()?;
    if let Some(short) = retry_intervals.iter().find(|d| d.as_secs() < 1) {
        return Err(Invalid::new(
            "InvalidDuration",
            format!("spec.delivery.retryIntervals: {short:?} is shorter than a second"),
        ));
    }
    let rotate_every = spec
        .dkim
        .rotate_every
        .as_deref()
        .map(|t| duration("spec.dkim.rotateEvery", t))
        .transpose()?;
    if let Some(every) = rotate_every
        && every <= publish_ahead
    {
        return Err(Invalid::new(
            "DkimRotationTooShort",
            format!(
                "spec.dkim.rotateEvery ({}) must be longer than spec.dkim.publishAhead ({}): a new key has to be in DNS before it signs",
                spec.dkim.rotate_every.as_deref().unwrap_or_default(),
                spec.dkim.publish_ahead
            ),
        ));
    }
    let mut algorithms = spec.dkim.algorithms.clone();
    algorithms.sort();
    algorithms.dedup();

    let mta_sts = spec
        .mta_sts
        .as_ref()
        .map(|s| {
            let max_age = duration("spec.mtaSts.maxAge", &s.max_age)?.as_secs();
            if max_age == 0 || max_age > MTA_STS_MAX_AGE_LIMIT {
                return Err(Invalid::new(
                    "InvalidMtaStsMaxAge",
                    format!(
                        "spec.mtaSts.maxAge ({}) must be between 1s and 365d (RFC 8461 3.2)",
                        s.max_age
                    ),
                ));
            }
            Ok(MtaSts {
                mode: s.mode,
                max_age_seconds: max_age,
            })
        })
        .transpose()?;

    if mta_sts
        .as_ref()
        .is_some_and(|s| s.mode == MtaStsMode::Enforce)
        && spec
            .tls
            .as_ref()
            .and_then(|t| t.issuer_ref.as_ref())
            .is_none()
    {
        return Err(Invalid::new(
            "MtaStsEnforceNeedsPublicCertificate",
            "spec.mtaSts.mode enforce needs a certificate senders can verify: set spec.tls.issuerRef (cert-manager with a public CA); the operator's own CA is trusted by nobody else, so senders would refuse to deliver",
        ));
    }

    let max_message_size: ByteSize =
        spec.limits.max_message_size.parse().map_err(|e: String| {
            Invalid::new("InvalidLimits", format!("spec.limits.maxMessageSize: {e}"))
        })?;
    if max_message_size.0 > MAX_MESSAGE_SIZE_CEILING {
        return Err(Invalid::new(
            "InvalidLimits",
            "spec.limits.maxMessageSize must be at most 1Gi (messages are held in memory while received)",
        ));
    }

    let tls = match spec.tls.as_ref().and_then(|t| t.issuer_ref.clone()) {
        None => TlsSource::OperatorCa,
        Some(issuer) if refs.cert_manager_installed => TlsSource::CertManager(issuer),
        Some(issuer) => {
            return Err(Invalid {
                reason: "CertManagerNotInstalled",
                message: format!(
                    "spec.tls.issuerRef names {} {}, but cert-manager's Certificate CRD (certificates.cert-manager.io) is not installed; install cert-manager or remove spec.tls.issuerRef to use the operator's CA",
                    match issuer.kind {
                        crate::crd::mail_domain::IssuerKind::Issuer => "Issuer",
                        crate::crd::mail_domain::IssuerKind::ClusterIssuer => "ClusterIssuer",
                    },
                    issuer.name
                ),
                retry_after: Some(CRD_RECHECK),
            });
        }
    };

    let users = match &spec.submission {
        None => None,
        Some(sub) => {
            let secret_name = sub.users_secret_ref.name.clone();
            let own = md.name_any();
            let reserved = [
                super::names::users_secret(&own),
                super::names::dkim_secret(&own),
                super::names::tls_secret(&own),
            ];
            if reserved.contains(&secret_name) {
                return Err(Invalid::new(
                    "UsersSecretNameReserved",
                    format!(
                        "spec.submission.usersSecretRef names Secret {secret_name}, which the operator itself writes for this MailDomain; give the users Secret another name (e.g. {own}-users)"
                    ),
                ));
            }
            let Some(secret) = refs.users_source.as_ref() else {
                return Err(Invalid::new(
                    "UsersSecretNotFound",
                    format!(
                        "spec.submission.usersSecretRef names Secret {secret_name}, which does not exist in namespace {}; create it (keys: user names, values: passwords or argon2/bcrypt hashes)",
                        md.namespace().unwrap_or_default()
                    ),
                ));
            };
            let users = users::parse_source(secret, &spec.domain)
                .map_err(|e| Invalid::new("InvalidUsersSecret", e.to_string()))?;
            Some(UsersSource { secret_name, users })
        }
    };

    let proxy_protocol = match spec.service.proxy_protocol.as_ref().filter(|p| p.enabled) {
        None => None,
        Some(p) => {
            if p.trusted_cidrs.is_empty() {
                return Err(Invalid::new(
                    "InvalidProxyProtocol",
                    "spec.service.proxyProtocol.trustedCidrs must list the load balancer's networks when enabled is true",
                ));
            }
            for (i, cidr) in p.trusted_cidrs.iter().enumerate() {
                if let Err(e) = kubemail_config::Network::parse(cidr) {
                    return Err(Invalid::new(
                        "InvalidProxyProtocol",
                        format!("spec.service.proxyProtocol.trustedCidrs[{i}]: {e}"),
                    ));
                }
            }
            Some(p.trusted_cidrs.clone())
        }
    };

    // A pooled domain runs on the pool's pods behind the pool's Service: its own pod and
    // load-balancer settings are not used, so they cannot make it invalid either.
    let (service, pod) = if spec.pool_ref.is_some() {
        let service = ServiceSpec {
            load_balancer_source_ranges: Vec::new(),
            ..spec.service.clone()
        };
        (service, PodShape::default())
    } else {
        check_source_ranges(&spec.service)
            .map_err(|message| Invalid::new("InvalidLoadBalancerSourceRanges", message))?;
        (spec.service.clone(), spec.pod.clone())
    };

    let relay = resolve_relay(md, refs.relay.as_ref());
    let relay_lookups = usize::from(matches!(
        &relay,
        RelayResolution::Resolved {
            spf_include: Some(_),
            ..
        }
    ));
    // `mx` stands in for the addresses until they are known: count it.
    let lookups = spec.spf.include.len() + relay_lookups + 1;
    if lookups > MAX_SPF_LOOKUPS {
        return Err(Invalid::new(
            "SpfTooManyLookups",
            format!(
                "the SPF record would need {lookups} DNS lookups at its first level, more than the {MAX_SPF_LOOKUPS} RFC 7208 4.6.4 allows; remove entries from spec.spf.include"
            ),
        ));
    }

    Ok(ValidatedDomain {
        name: md.name_any(),
        namespace: md.namespace().unwrap_or_default(),
        generation: md.metadata.generation,
        domain: spec.domain.clone(),
        hostname,
        replicas: spec.replicas,
        service_type: spec.service.type_,
        service,
        pod,
        proxy_protocol,
        tls,
        dkim: RotationPolicy {
            base: spec.dkim.selector.clone(),
            algorithms,
            rotate_every: rotate_every.map(seconds),
            publish_ahead: seconds(publish_ahead),
            retain_after: seconds(retain_after),
        },
        spf: spec.spf.clone(),
        dmarc: spec.dmarc.clone(),
        mta_sts,
        tls_rpt: spec.tls_rpt.as_ref().map(|t| t.rua.clone()),
        relay,
        inbound: spec.inbound.clone(),
        users,
        limits: Limits {
            max_message_size: max_message_size.0,
            max_recipients: spec.limits.max_recipients,
            messages_per_minute_per_user: spec.limits.messages_per_minute_per_user,
        },
        ttl: spec.dns.ttl,
        outbound_tls_policies: spec
            .outbound_tls
            .as_ref()
            .map(|o| o.policies.clone())
            .unwrap_or_default(),
        retry_intervals,
    })
}

/// Checks `loadBalancerSourceRanges`: every entry a CIDR range (`198.51.100.0/24`), as
/// Kubernetes wants it. The CRD refuses most bad entries at admission; this catches what
/// was stored before that rule, so the person sees a condition instead of a failed apply.
pub fn check_source_ranges(spec: &ServiceSpec) -> Result<(), String> {
    for (i, range) in spec.load_balancer_source_ranges.iter().enumerate() {
        parse_cidr(range).map_err(|why| {
            format!(
                "spec.service.loadBalancerSourceRanges[{i}] ({range:?}) {why}; write a CIDR range such as 198.51.100.0/24 or 2001:db8::/48"
            )
        })?;
    }
    Ok(())
}

/// An `address/prefix` pair with the prefix in range for the address family.
fn parse_cidr(text: &str) -> Result<(IpAddr, u8), &'static str> {
    let (address, prefix) = text
        .split_once('/')
        .ok_or("is not a CIDR range: the /prefix is missing")?;
    let address: IpAddr = address.parse().map_err(|_| "has no valid IP address")?;
    let prefix: u8 = prefix
        .parse()
        .map_err(|_| "has a prefix length that is not a number")?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err("has a prefix length too long for its address family");
    }
    Ok((address, prefix))
}

fn resolve_relay(md: &MailDomain, relay: Option<&Relay>) -> RelayResolution {
    let Some(reference) = &md.spec.relay_ref else {
        return RelayResolution::Direct;
    };
    let name = reference.name.clone();
    let Some(relay) = relay else {
        return RelayResolution::NotFound { name };
    };
    let ready = relay
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(c) if c.status == "True" => RelayResolution::Resolved {
            name,
            spf_include: relay.spec.spf_include.clone(),
            spec: Box::new(relay.spec.clone()),
        },
        Some(c) => RelayResolution::NotReady {
            name,
            message: c.message.clone(),
        },
        None => RelayResolution::NotReady {
            name,
            message: "the Relay has not been checked yet".to_owned(),
        },
    }
}
