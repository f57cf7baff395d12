//! The lookups of a DNS check, through hickory-resolver: the configured name servers (address
//! and port, so tests and a local cluster point it at their own DNS server) or the system's
//! `/etc/resolv.conf`. Answers are not cached, so a check right after a record was published
//! sees it (a recursive resolver in between may still hold the old answer for its TTL).

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};

use super::{Answers, Query};

/// Where and how to look records up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverSettings {
    /// Name servers to ask; empty: the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Deadline of one query attempt.
    pub timeout: Duration,
}

/// Why the resolver could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error(
        "cannot read the system DNS configuration (/etc/resolv.conf); name the servers with --dns-check-nameservers / KUBEMAIL_DNS_CHECK_NAMESERVERS"
    )]
    ReadSystemConfig(#[source] NetError),
    #[error("cannot build the DNS resolver")]
    Build(#[source] NetError),
}

/// A resolver for DNS checks.
pub struct Resolver {
    inner: TokioResolver,
    description: String,
}

impl Resolver {
    pub fn new(settings: &ResolverSettings) -> Result<Self, ResolverError> {
        let (config, mut opts, description) = if settings.nameservers.is_empty() {
            let (config, opts) = hickory_resolver::system_conf::read_system_conf()
                .map_err(ResolverError::ReadSystemConfig)?;
            (config, opts, "the system resolver".to_owned())
        } else {
            let servers = settings
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
            let description = settings
                .nameservers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            (
                ResolverConfig::from_name_servers(servers),
                ResolverOpts::default(),
                description,
            )
        };
        opts.timeout = settings.timeout;
        opts.attempts = 2;
        // The check must see what DNS says now, not what it said at the last check.
        opts.cache_size = 0;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.try_tcp_on_error = true;
        let inner = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(ResolverError::Build)?;
        Ok(Self { inner, description })
    }

    /// The name servers asked, for messages.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// One lookup per query, four at a time.
    pub async fn lookup_all(&self, queries: &[Query]) -> Answers {
        use futures::StreamExt as _;
        futures::stream::iter(queries.iter().cloned())
            .map(|q| async move {
                let answer = self.lookup(&q).await;
                (q, answer)
            })
            .buffer_unordered(4)
            .collect()
            .await
    }

    /// The data of the records of `query`'s type at its name; an absent name or type is an
    /// empty answer.
    pub async fn lookup(&self, query: &Query) -> Result<Vec<String>, String> {
        let Ok(kind) = query.type_.parse::<RecordType>() else {
            return Err(format!("unknown record type {}", query.type_));
        };
        match self.inner.lookup(query.name.as_str(), kind).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter(|r| r.record_type() == kind)
                .filter_map(|r| presentation(&r.data))
                .collect()),
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Record data in the form `status.dnsRecords` writes it.
fn presentation(data: &RData) -> Option<String> {
    match data {
        RData::MX(mx) => Some(format!("{} {}", mx.preference, mx.exchange.to_ascii())),
        RData::A(a) => Some(a.0.to_string()),
        RData::AAAA(aaaa) => Some(aaaa.0.to_string()),
        RData::CNAME(cname) => Some(cname.0.to_ascii()),
        RData::TXT(txt) => Some(
            txt.txt_data
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect(),
        ),
        _ => None,
    }
}
