//! DNS as the delivery side needs it, behind the [`Resolver`] seam: MX, address and TXT
//! lookups with the distinctions an MTA acts on (NXDOMAIN bounces, "no records" falls back to
//! the implicit MX, anything else is temporary).
//!
//! * [`HickoryResolver`]: the real implementation, hickory-resolver 0.26 with configurable
//!   nameservers (address and port, so tests and a local cluster can point it at their own
//!   DNS server) or the system's `/etc/resolv.conf`. It also hands out the same resolver as a
//!   `mail_auth::MessageAuthenticator` for SPF/DKIM/DMARC ([`crate::authres`]).
//! * [`ZoneResolver`]: a test double that answers from zone-file text (the subset of RFC 1035
//!   master file syntax that test zones use), plus a `SERVFAIL` pseudo-type to simulate a
//!   broken zone and `SECURE` / `BOGUS` pseudo-types that give a name's answers that DNSSEC
//!   status. Unit tests use it; integration tests run a real DNS server (knotd) instead.
//!
//! DANE (RFC 7672) needs to know whether an answer is DNSSEC-*secure*, *insecure* (no chain of
//! trust: an unsigned zone) or *bogus* (a chain that should validate and does not: an attack
//! or a broken zone, never to be read as insecure). The `*_validated` and [`Resolver::tlsa`]
//! lookups say so ([`Validated`]); the real resolver answers them through a second, validating
//! hickory resolver (feature `dnssec-ring`) whose trust anchor is configurable
//! (`delivery.tls.dane.trustAnchorFile`, the IANA root keys by default), so the tests use a
//! zone signed by their own Knot DNS. Everything else keeps the plain lookups.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub use crate::config::DnsConfig;
use futures::future::BoxFuture;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
    ResolverOpts,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::dnssec::{Proof, TrustAnchors};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};

/// Longest CNAME chain the zone double follows (real resolvers use similar small limits).
const MAX_CNAME_CHAIN: usize = 8;

/// One MX record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxRecord {
    pub preference: u16,
    /// The exchange, lower case, without the trailing dot; empty for the null MX `.`
    /// (RFC 7505).
    pub exchange: String,
}

/// Why a lookup gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The name does not exist (NXDOMAIN): a permanent condition for mail routing.
    #[error("{name}: no such domain (NXDOMAIN)")]
    NxDomain { name: String },
    /// SERVFAIL, timeout, refused, network trouble: try again later.
    #[error("{name}: temporary DNS failure: {reason}")]
    Temporary { name: String, reason: String },
}

impl DnsError {
    pub fn is_nx_domain(&self) -> bool {
        matches!(self, Self::NxDomain { .. })
    }
}

/// The DNSSEC status of an answer (RFC 4035 4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dnssec {
    /// A chain of signatures from a trust anchor proves it.
    Secure,
    /// No chain of trust reaches it (an unsigned zone), or the resolver does not validate.
    Insecure,
    /// A chain should exist and does not validate: an attack or a broken zone.
    Bogus,
}

/// Records with the DNSSEC status of their answer. A bogus answer carries no records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated<T> {
    pub records: T,
    pub dnssec: Dnssec,
}

impl<T> Validated<T> {
    fn insecure(records: T) -> Self {
        Self {
            records,
            dnssec: Dnssec::Insecure,
        }
    }
}

/// One TLSA record (RFC 6698 2.1): certificate usage, selector, matching type, data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsaRecord {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

/// The DNS lookups delivery needs. `Ok(vec![])` means the name exists but has no record of
/// that type (NODATA).
pub trait Resolver: Send + Sync + 'static {
    /// MX records of `domain`.
    fn mx<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<Vec<MxRecord>, DnsError>>;
    /// IPv4 and IPv6 addresses of `host` (A before AAAA).
    fn ips<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, DnsError>>;
    /// TXT records of `name`, each with its character-strings concatenated.
    fn txt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<String>, DnsError>>;

    /// MX records of `domain` with their DNSSEC status. A resolver that does not validate
    /// answers with the plain lookup, insecure.
    fn mx_validated<'a>(
        &'a self,
        domain: &'a str,
    ) -> BoxFuture<'a, Result<Validated<Vec<MxRecord>>, DnsError>> {
        Box::pin(async move { self.mx(domain).await.map(Validated::insecure) })
    }

    /// Addresses of `host` with their DNSSEC status (secure only when every address RRset
    /// that exists is).
    fn ips_validated<'a>(
        &'a self,
        host: &'a str,
    ) -> BoxFuture<'a, Result<Validated<Vec<IpAddr>>, DnsError>> {
        Box::pin(async move { self.ips(host).await.map(Validated::insecure) })
    }

    /// TLSA records of `name` (`_25._tcp.<mx host>`) with their DNSSEC status. A resolver
    /// that does not validate has none (TLSA records count only when secure).
    fn tlsa<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Validated<Vec<TlsaRecord>>, DnsError>> {
        let _ = name;
        Box::pin(async move { Ok(Validated::insecure(Vec::new())) })
    }
}

/// The real resolver (hickory-resolver).
#[derive(Clone)]
pub struct HickoryResolver {
    inner: TokioResolver,
    /// The DNSSEC-validating twin of `inner`, for DANE; `None`: DANE is off.
    validating: Option<TokioResolver>,
}

/// Why the resolver could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildResolverError {
    #[error("cannot read the system DNS configuration: {0}")]
    ReadSystemConfig(#[source] NetError),
    #[error("cannot build the DNS resolver: {0}")]
    Build(#[source] NetError),
    #[error("cannot read the DNSSEC trust anchor file {path}: {reason}")]
    ReadTrustAnchor { path: PathBuf, reason: String },
}

impl HickoryResolver {
    /// Builds a resolver for `config`: its nameservers (UDP with TCP fallback) or, when none
    /// are given, the system's.
    pub fn new(config: &DnsConfig) -> Result<Self, BuildResolverError> {
        Ok(Self {
            inner: build(config, None)?,
            validating: None,
        })
    }

    /// The same, plus a DNSSEC-validating twin trusting `trust_anchor_file` (DNSKEY records)
    /// or, when `None`, the IANA root keys.
    pub fn with_dnssec(
        config: &DnsConfig,
        trust_anchor_file: Option<&Path>,
    ) -> Result<Self, BuildResolverError> {
        let anchors = match trust_anchor_file {
            Some(path) => {
                TrustAnchors::from_file(path).map_err(|e| BuildResolverError::ReadTrustAnchor {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?
            }
            None => TrustAnchors::default(),
        };
        Ok(Self {
            inner: build(config, None)?,
            validating: Some(build(config, Some(anchors))?),
        })
    }

    /// The same resolver, as mail-auth's authenticator (SPF, DKIM, DMARC lookups).
    pub fn authenticator(&self) -> mail_auth::MessageAuthenticator {
        mail_auth::MessageAuthenticator(self.inner.clone())
    }

    /// A lookup through the validating resolver: the records of `kind` and their status.
    async fn validated(
        &self,
        resolver: &TokioResolver,
        name: &str,
        kind: RecordType,
    ) -> Result<Validated<Vec<RData>>, DnsError> {
        match resolver.lookup(fqdn(name), kind).await {
            Ok(lookup) => {
                let answers: Vec<_> = lookup
                    .answers()
                    .iter()
                    .filter(|r| r.record_type() == kind)
                    .collect();
                let dnssec = if answers.iter().any(|r| r.proof == Proof::Bogus) {
                    Dnssec::Bogus
                } else if !answers.is_empty() && answers.iter().all(|r| r.proof == Proof::Secure) {
                    Dnssec::Secure
                } else {
                    Dnssec::Insecure
                };
                let records = if dnssec == Dnssec::Bogus {
                    Vec::new()
                } else {
                    answers.into_iter().map(|r| r.data.clone()).collect()
                };
                Ok(Validated { records, dnssec })
            }
            Err(e) => classify_validated(name, &e),
        }
    }
}

/// A hickory resolver for `config`, validating DNSSEC with `anchors` when given.
fn build(
    config: &DnsConfig,
    anchors: Option<TrustAnchors>,
) -> Result<TokioResolver, BuildResolverError> {
    {
        let (resolver_config, mut opts) = if config.nameservers.is_empty() {
            hickory_resolver::system_conf::read_system_conf()
                .map_err(BuildResolverError::ReadSystemConfig)?
        } else {
            let servers = config
                .nameservers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            (
                ResolverConfig::from_name_servers(servers),
                ResolverOpts::default(),
            )
        };
        opts.timeout = config.timeout.0;
        opts.attempts = config.attempts.max(1) as usize;
        // Mail routing must follow the DNS only: /etc/hosts entries such as "localhost" must
        // not become delivery targets.
        opts.use_hosts_file = ResolveHosts::Never;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.try_tcp_on_error = true;
        let mut builder =
            TokioResolver::builder_with_config(resolver_config, TokioRuntimeProvider::default())
                .with_options(opts);
        if let Some(anchors) = anchors {
            builder = builder.with_trust_anchor(std::sync::Arc::new(anchors));
        }
        builder.build().map_err(BuildResolverError::Build)
    }
}

/// A failed validating lookup: bogus proofs become a bogus answer; a proven (or insecure)
/// absence an empty one; the rest as [`classify`].
fn classify_validated<T: Default>(name: &str, error: &NetError) -> Result<Validated<T>, DnsError> {
    let empty = |dnssec| {
        Ok(Validated {
            records: T::default(),
            dnssec,
        })
    };
    match error {
        NetError::Dns(hickory_resolver::net::DnsError::DnssecBogus) => empty(Dnssec::Bogus),
        NetError::Dns(hickory_resolver::net::DnsError::Nsec {
            proof, response, ..
        }) => match proof {
            Proof::Bogus | Proof::Indeterminate => empty(Dnssec::Bogus),
            _ if response.response_code == ResponseCode::NXDomain => Err(DnsError::NxDomain {
                name: name.to_owned(),
            }),
            Proof::Secure => empty(Dnssec::Secure),
            _ => empty(Dnssec::Insecure),
        },
        other => match classify(name, other) {
            None => empty(Dnssec::Insecure),
            Some(e) => Err(e),
        },
    }
}

/// `name` as an absolute name, so no search domain is ever appended.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    }
}

fn classify(name: &str, error: &NetError) -> Option<DnsError> {
    if error.is_nx_domain() {
        Some(DnsError::NxDomain {
            name: name.to_owned(),
        })
    } else if error.is_no_records_found() {
        None
    } else {
        Some(DnsError::Temporary {
            name: name.to_owned(),
            reason: error.to_string(),
        })
    }
}

impl Resolver for HickoryResolver {
    fn mx<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<Vec<MxRecord>, DnsError>> {
        Box::pin(async move {
            match self.inner.lookup(fqdn(domain), RecordType::MX).await {
                Ok(lookup) => Ok(lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some(MxRecord {
                            preference: mx.preference,
                            exchange: normalise_name(&mx.exchange.to_ascii()),
                        }),
                        _ => None,
                    })
                    .collect()),
                Err(e) => classify(domain, &e).map_or(Ok(Vec::new()), Err),
            }
        })
    }

    fn ips<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, DnsError>> {
        Box::pin(async move {
            match self.inner.lookup_ip(fqdn(host)).await {
                Ok(lookup) => Ok(lookup.iter().collect()),
                Err(e) => classify(host, &e).map_or(Ok(Vec::new()), Err),
            }
        })
    }

    fn txt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<String>, DnsError>> {
        Box::pin(async move {
            match self.inner.lookup(fqdn(name), RecordType::TXT).await {
                Ok(lookup) => Ok(lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::TXT(txt) => Some(
                            txt.txt_data
                                .iter()
                                .map(|s| String::from_utf8_lossy(s).into_owned())
                                .collect::<String>(),
                        ),
                        _ => None,
                    })
                    .collect()),
                Err(e) => classify(name, &e).map_or(Ok(Vec::new()), Err),
            }
        })
    }

    fn mx_validated<'a>(
        &'a self,
        domain: &'a str,
    ) -> BoxFuture<'a, Result<Validated<Vec<MxRecord>>, DnsError>> {
        Box::pin(async move {
            let Some(validating) = &self.validating else {
                return self.mx(domain).await.map(Validated::insecure);
            };
            let v = self.validated(validating, domain, RecordType::MX).await?;
            Ok(Validated {
                records: v
                    .records
                    .iter()
                    .filter_map(|r| match r {
                        RData::MX(mx) => Some(MxRecord {
                            preference: mx.preference,
                            exchange: normalise_name(&mx.exchange.to_ascii()),
                        }),
                        _ => None,
                    })
                    .collect(),
                dnssec: v.dnssec,
            })
        })
    }

    fn ips_validated<'a>(
        &'a self,
        host: &'a str,
    ) -> BoxFuture<'a, Result<Validated<Vec<IpAddr>>, DnsError>> {
        Box::pin(async move {
            let Some(validating) = &self.validating else {
                return self.ips(host).await.map(Validated::insecure);
            };
            let a = self.validated(validating, host, RecordType::A).await?;
            let aaaa = self.validated(validating, host, RecordType::AAAA).await?;
            let statuses = [&a, &aaaa];
            let dnssec = if statuses.iter().any(|v| v.dnssec == Dnssec::Bogus) {
                Dnssec::Bogus
            } else if statuses.iter().any(|v| v.dnssec == Dnssec::Secure)
                && statuses
                    .iter()
                    .all(|v| v.dnssec == Dnssec::Secure || v.records.is_empty())
            {
                Dnssec::Secure
            } else {
                Dnssec::Insecure
            };
            let records = a
                .records
                .iter()
                .chain(aaaa.records.iter())
                .filter_map(|r| match r {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })
                .collect();
            Ok(Validated { records, dnssec })
        })
    }

    fn tlsa<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Validated<Vec<TlsaRecord>>, DnsError>> {
        Box::pin(async move {
            let Some(validating) = &self.validating else {
                return Ok(Validated::insecure(Vec::new()));
            };
            let v = self.validated(validating, name, RecordType::TLSA).await?;
            Ok(Validated {
                records: v
                    .records
                    .iter()
                    .filter_map(|r| match r {
                        RData::TLSA(t) => Some(TlsaRecord {
                            usage: t.cert_usage.into(),
                            selector: t.selector.into(),
                            matching: t.matching.into(),
                            data: t.cert_data.clone(),
                        }),
                        _ => None,
                    })
                    .collect(),
                dnssec: v.dnssec,
            })
        })
    }
}

/// Lower case, no trailing dot ("." itself becomes the empty string).
fn normalise_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// A record of the zone double.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ZoneRecord {
    A(IpAddr),
    Mx(MxRecord),
    Txt(String),
    Cname(String),
    Tlsa(TlsaRecord),
    /// Pseudo-record: every lookup of this name fails temporarily.
    ServFail,
    /// Pseudo-record: this name's answers are DNSSEC-secure.
    Secure,
    /// Pseudo-record: this name's answers are DNSSEC-bogus.
    Bogus,
}

/// Why zone text could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("zone line {line}: {reason}")]
pub struct ZoneParseError {
    pub line: usize,
    pub reason: String,
}

/// A resolver answering from zone-file text; for unit tests.
///
/// Supported syntax: `$ORIGIN`, `$TTL` (ignored), `@`, relative and absolute owner names, a
/// blank owner (repeat the previous one), optional TTL and class `IN`, parentheses within
/// one line, the types `A`, `AAAA`,
/// `MX`, `TXT` (one or more quoted strings), `CNAME`, `TLSA` (usage, selector, matching
/// type, hex data), and the pseudo-types `SERVFAIL`, `SECURE` and `BOGUS` (the DNSSEC status
/// of the name's answers; without either they are insecure); comments after `;`. Names are
/// case-insensitive.
#[derive(Debug, Clone, Default)]
pub struct ZoneResolver {
    records: HashMap<String, Vec<ZoneRecord>>,
}

impl ZoneResolver {
    /// Parses zone text.
    pub fn from_zone(text: &str) -> Result<Self, ZoneParseError> {
        let mut records: HashMap<String, Vec<ZoneRecord>> = HashMap::new();
        let mut origin = String::new();
        let mut previous_owner: Option<String> = None;
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let err = |reason: String| ZoneParseError { line, reason };
            let content = strip_comment(raw);
            if content.trim().is_empty() {
                continue;
            }
            let tokens = tokenize(content).map_err(err)?;
            let Some(first) = tokens.first() else {
                continue;
            };
            if first.eq_ignore_ascii_case("$ORIGIN") {
                let name = tokens
                    .get(1)
                    .ok_or_else(|| err("$ORIGIN needs a name".into()))?;
                origin = normalise_name(name);
                continue;
            }
            if first.starts_with('$') {
                continue;
            }
            let starts_blank = raw.starts_with([' ', '\t']);
            let mut rest: &[String] = &tokens;
            let owner = if starts_blank {
                previous_owner
                    .clone()
                    .ok_or_else(|| err("record without an owner name".into()))?
            } else {
                rest = &tokens[1..];
                absolute(first, &origin)
            };
            previous_owner = Some(owner.clone());
            // Optional TTL and class, in either order.
            while let Some(t) = rest.first() {
                if t.bytes().all(|b| b.is_ascii_digit()) || t.eq_ignore_ascii_case("IN") {
                    rest = &rest[1..];
                } else {
                    break;
                }
            }
            let kind = rest
                .first()
                .ok_or_else(|| err("missing record type".into()))?
                .to_ascii_uppercase();
            let data = &rest[1..];
            let need = |n: usize| {
                if data.len() < n {
                    Err(err(format!("{kind} needs {n} data field(s)")))
                } else {
                    Ok(())
                }
            };
            let record = match kind.as_str() {
                "A" | "AAAA" => {
                    need(1)?;
                    let ip: IpAddr = data[0]
                        .parse()
                        .map_err(|_| err(format!("invalid address {:?}", data[0])))?;
                    if (kind == "A") != ip.is_ipv4() {
                        return Err(err(format!("{kind} record with address {ip}")));
                    }
                    ZoneRecord::A(ip)
                }
                "MX" => {
                    need(2)?;
                    let preference = data[0]
                        .parse()
                        .map_err(|_| err(format!("invalid MX preference {:?}", data[0])))?;
                    let exchange = if data[1] == "." {
                        String::new()
                    } else {
                        absolute(&data[1], &origin)
                    };
                    ZoneRecord::Mx(MxRecord {
                        preference,
                        exchange,
                    })
                }
                "TXT" => {
                    need(1)?;
                    ZoneRecord::Txt(data.concat())
                }
                "CNAME" => {
                    need(1)?;
                    ZoneRecord::Cname(absolute(&data[0], &origin))
                }
                "TLSA" => {
                    need(4)?;
                    let number = |i: usize| {
                        data[i]
                            .parse::<u8>()
                            .map_err(|_| err(format!("invalid TLSA field {:?}", data[i])))
                    };
                    let hex = data[3..].concat();
                    let bytes = (0..hex.len())
                        .step_by(2)
                        .map(|i| {
                            hex.get(i..i + 2)
                                .and_then(|h| u8::from_str_radix(h, 16).ok())
                                .ok_or_else(|| err(format!("invalid TLSA data {hex:?}")))
                        })
                        .collect::<Result<Vec<u8>, _>>()?;
                    ZoneRecord::Tlsa(TlsaRecord {
                        usage: number(0)?,
                        selector: number(1)?,
                        matching: number(2)?,
                        data: bytes,
                    })
                }
                "SERVFAIL" => ZoneRecord::ServFail,
                "SECURE" => ZoneRecord::Secure,
                "BOGUS" => ZoneRecord::Bogus,
                // Other types (SOA, NS, ...) do not matter to mail routing.
                _ => continue,
            };
            records.entry(owner).or_default().push(record);
        }
        Ok(Self { records })
    }

    /// The records of `name` after following CNAMEs, or the lookup error.
    fn resolve(&self, name: &str) -> Result<&[ZoneRecord], DnsError> {
        let mut current = normalise_name(name);
        for _ in 0..MAX_CNAME_CHAIN {
            let Some(records) = self.records.get(&current) else {
                return Err(DnsError::NxDomain {
                    name: name.to_owned(),
                });
            };
            if records.contains(&ZoneRecord::ServFail) {
                return Err(DnsError::Temporary {
                    name: name.to_owned(),
                    reason: "SERVFAIL".into(),
                });
            }
            match records.iter().find_map(|r| match r {
                ZoneRecord::Cname(target) => Some(target.clone()),
                _ => None,
            }) {
                Some(target) => current = target,
                None => return Ok(records),
            }
        }
        Err(DnsError::Temporary {
            name: name.to_owned(),
            reason: "CNAME chain too long".into(),
        })
    }
}

impl ZoneResolver {
    /// The DNSSEC status the zone gives `records`.
    fn status(records: &[ZoneRecord]) -> Dnssec {
        if records.contains(&ZoneRecord::Bogus) {
            Dnssec::Bogus
        } else if records.contains(&ZoneRecord::Secure) {
            Dnssec::Secure
        } else {
            Dnssec::Insecure
        }
    }

    /// `pick`ed records of `name` with the name's status; bogus answers carry none.
    fn validated<T>(
        &self,
        name: &str,
        pick: impl Fn(&ZoneRecord) -> Option<T>,
    ) -> Result<Validated<Vec<T>>, DnsError> {
        self.resolve(name).map(|records| {
            let dnssec = Self::status(records);
            let records = if dnssec == Dnssec::Bogus {
                Vec::new()
            } else {
                records.iter().filter_map(pick).collect()
            };
            Validated { records, dnssec }
        })
    }
}

impl Resolver for ZoneResolver {
    fn mx_validated<'a>(
        &'a self,
        domain: &'a str,
    ) -> BoxFuture<'a, Result<Validated<Vec<MxRecord>>, DnsError>> {
        let result = self.validated(domain, |r| match r {
            ZoneRecord::Mx(mx) => Some(mx.clone()),
            _ => None,
        });
        Box::pin(async move { result })
    }

    fn ips_validated<'a>(
        &'a self,
        host: &'a str,
    ) -> BoxFuture<'a, Result<Validated<Vec<IpAddr>>, DnsError>> {
        let result = self.validated(host, |r| match r {
            ZoneRecord::A(ip) => Some(*ip),
            _ => None,
        });
        Box::pin(async move { result })
    }

    fn tlsa<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Validated<Vec<TlsaRecord>>, DnsError>> {
        let result = match self.validated(name, |r| match r {
            ZoneRecord::Tlsa(t) => Some(t.clone()),
            _ => None,
        }) {
            // No TLSA name at all is an empty (insecure) answer for DANE's purposes.
            Err(DnsError::NxDomain { .. }) => Ok(Validated::insecure(Vec::new())),
            other => other,
        };
        Box::pin(async move { result })
    }

    fn mx<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, Result<Vec<MxRecord>, DnsError>> {
        let result = self.resolve(domain).map(|records| {
            records
                .iter()
                .filter_map(|r| match r {
                    ZoneRecord::Mx(mx) => Some(mx.clone()),
                    _ => None,
                })
                .collect()
        });
        Box::pin(async move { result })
    }

    fn ips<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, DnsError>> {
        let result = self.resolve(host).map(|records| {
            let mut ips: Vec<IpAddr> = records
                .iter()
                .filter_map(|r| match r {
                    ZoneRecord::A(ip) => Some(*ip),
                    _ => None,
                })
                .collect();
            // A before AAAA, like the real resolver's strategy.
            ips.sort_by_key(|ip| ip.is_ipv6());
            ips
        });
        Box::pin(async move { result })
    }

    fn txt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<String>, DnsError>> {
        let result = self.resolve(name).map(|records| {
            records
                .iter()
                .filter_map(|r| match r {
                    ZoneRecord::Txt(t) => Some(t.clone()),
                    _ => None,
                })
                .collect()
        });
        Box::pin(async move { result })
    }
}

/// Everything before a `;` that is not inside quotes.
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}

/// Splits on white space; a quoted string is one token without its quotes (`\"` and `\\`
/// unescaped).
fn tokenize(line: &str) -> Result<Vec<String>, String> {
    let mut tokens = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        // Parentheses group a record over several tokens (RFC 1035 5.1); on one line
        // they are just separators.
        if c.is_whitespace() || c == '(' || c == ')' {
            chars.next();
        } else if c == '"' {
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next() {
                    None => return Err("unterminated quoted string".into()),
                    Some('"') => break,
                    Some('\\') => {
                        if let Some(n) = chars.next() {
                            s.push(n);
                        }
                    }
                    Some(other) => s.push(other),
                }
            }
            tokens.push(s);
        } else {
            let mut s = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || c == '(' || c == ')' {
                    break;
                }
                s.push(c);
                chars.next();
            }
            tokens.push(s);
        }
    }
    Ok(tokens)
}

/// An owner or target name made absolute against `origin`, normalised.
fn absolute(name: &str, origin: &str) -> String {
    if name == "@" {
        origin.to_owned()
    } else if name.ends_with('.') || origin.is_empty() {
        normalise_name(name)
    } else {
        format!("{}.{}", name.to_ascii_lowercase(), origin)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use std::time::Duration;

    use super::*;

    const ZONE: &str = r#"
$ORIGIN remote.test.
$TTL 300
@        IN MX 20 backup      ; lower priority
@        IN MX 10 mx1.remote.test.
         IN TXT "v=spf1 " "ip4:192.0.2.1 -all"
mx1      300 IN A 127.0.0.1
         AAAA ::1
backup   A 192.0.2.25
alias    CNAME mx1
null.test.  MX 0 .
broken.test. SERVFAIL
text.test. TXT "a;b \"q\""
long.test. IN TXT ( "first " "second" )
"#;

    fn zone() -> ZoneResolver {
        ZoneResolver::from_zone(ZONE).unwrap()
    }

    #[tokio::test]
    async fn answers_mx_a_aaaa_txt_and_follows_cnames() {
        let z = zone();
        let mut mx = z.mx("Remote.Test").await.unwrap();
        mx.sort_by_key(|m| m.preference);
        assert_eq!(
            mx,
            vec![
                MxRecord {
                    preference: 10,
                    exchange: "mx1.remote.test".into()
                },
                MxRecord {
                    preference: 20,
                    exchange: "backup.remote.test".into()
                },
            ]
        );
        assert_eq!(
            z.ips("mx1.remote.test").await.unwrap(),
            vec![
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );
        assert_eq!(
            z.ips("alias.remote.test.").await.unwrap(),
            z.ips("mx1.remote.test").await.unwrap()
        );
        assert_eq!(
            z.txt("remote.test").await.unwrap(),
            vec!["v=spf1 ip4:192.0.2.1 -all".to_owned()]
        );
        assert_eq!(
            z.txt("text.test").await.unwrap(),
            vec!["a;b \"q\"".to_owned()]
        );
        assert_eq!(
            z.txt("long.test").await.unwrap(),
            vec!["first second".to_owned()]
        );
    }

    #[tokio::test]
    async fn distinguishes_nodata_nxdomain_servfail_and_null_mx() {
        let z = zone();
        assert_eq!(z.mx("mx1.remote.test").await.unwrap(), vec![], "NODATA");
        assert!(z.mx("nope.test").await.unwrap_err().is_nx_domain());
        assert!(matches!(
            z.ips("broken.test").await.unwrap_err(),
            DnsError::Temporary { .. }
        ));
        assert_eq!(
            z.mx("null.test").await.unwrap(),
            vec![MxRecord {
                preference: 0,
                exchange: String::new()
            }]
        );
    }

    #[test]
    fn reports_bad_lines() {
        let e = ZoneResolver::from_zone("x.test. A 999.1.1.1\n").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(ZoneResolver::from_zone("x.test. AAAA 127.0.0.1").is_err());
        assert!(ZoneResolver::from_zone("x.test. MX ten mx").is_err());
        assert!(ZoneResolver::from_zone("x.test. TXT \"open").is_err());
        assert!(
            ZoneResolver::from_zone("  A 127.0.0.1").is_err(),
            "no owner yet"
        );
    }

    #[test]
    fn config_defaults_and_nameserver_ports() {
        let c: DnsConfig =
            serde_yaml::from_str("nameservers: [\"127.0.0.1:5353\"]\ntimeout: 2s\n").unwrap();
        assert_eq!(c.nameservers[0].port(), 5353);
        assert_eq!(c.timeout.0, Duration::from_secs(2));
        assert_eq!(c.attempts, 2);
        // Building with explicit nameservers touches no system file and no network.
        HickoryResolver::new(&c).unwrap();
    }
}
