//! MTA-STS (RFC 8461) for outbound mail: discovery, fetch, the cluster-wide cache and the
//! background refresh.
//!
//! * **Discovery** (3.1): exactly one TXT record at `_mta-sts.<domain>` starting with
//!   `v=STSv1`, with an `id`. Several or none: no policy (a cached one stays in force).
//! * **Fetch** (3.3): `GET https://mta-sts.<domain>/.well-known/mta-sts.txt`, certificate
//!   checked against the node's roots (Mozilla plus `delivery.tls.extraCaFile`), no
//!   redirects, `200` with `text/plain` only, at most `maxPolicySize` bytes within
//!   `fetchTimeout`. The policy host is resolved with the delivery resolver and every address
//!   goes through the delivery address policy first (the same SSRF guard as MX hosts: a
//!   hostile domain must not make us fetch from `169.254.169.254` or the cluster's services).
//! * **Policy** (3.2): `version: STSv1`, `mode` (`enforce`, `testing`, `none`), `max_age` (at
//!   most a year), `mx` patterns (`mx.example.com` or `*.example.com`, one label).
//! * **Cache** (5.1): JetStream KV [`kubemail_queue::MTA_STS_CACHE_BUCKET`], keyed by domain,
//!   shared by every node, so one fetch serves the cluster. A cached policy is used while its
//!   `max_age` lasts, as long as the TXT id is unchanged (a new id is fetched; a failed fetch
//!   keeps the cached policy), and also when the TXT record disappears or the DNS fails.
//! * **Refresh**: a background task re-checks the cached domains every `refreshInterval` and
//!   fetches those whose id changed or whose `max_age` is running out, so a policy in use
//!   never lapses between messages.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use super::ResultType;
use crate::config::MtaStsConfig;
use crate::delivery::address_policy::AddressPolicy;
use crate::delivery::tls::ClientTls;
use crate::dns::Resolver;

/// RFC 8461 3.2: `max_age` is at most 31557600 seconds.
pub const MAX_AGE_LIMIT: u64 = 31_557_600;

/// A policy's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

/// A parsed policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub mode: Mode,
    pub max_age: u64,
    /// The `mx` patterns, lower case.
    pub mx: Vec<String>,
}

/// Why a policy text is not a policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MTA-STS policy: {0}")]
pub struct PolicyError(pub String);

impl Policy {
    /// Parses a policy file (RFC 8461 3.2): `key: value` lines (CRLF or LF); unknown keys are
    /// ignored, the first of repeated single-valued keys counts.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let mut version = None;
        let mut mode = None;
        let mut max_age = None;
        let mut mx = Vec::new();
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once(':')
                .ok_or_else(|| PolicyError(format!("line without a colon: {line:?}")))?;
            let value = value.trim();
            match key.trim() {
                "version" => {
                    version.get_or_insert(value.to_owned());
                }
                "mode" => {
                    let m = match value {
                        "enforce" => Mode::Enforce,
                        "testing" => Mode::Testing,
                        "none" => Mode::None,
                        other => return Err(PolicyError(format!("unknown mode {other:?}"))),
                    };
                    mode.get_or_insert(m);
                }
                "max_age" => {
                    // 1*10DIGIT.
                    if value.is_empty()
                        || value.len() > 10
                        || !value.bytes().all(|b| b.is_ascii_digit())
                    {
                        return Err(PolicyError(format!("invalid max_age {value:?}")));
                    }
                    let age: u64 = value
                        .parse()
                        .map_err(|_| PolicyError(format!("invalid max_age {value:?}")))?;
                    max_age.get_or_insert(age.min(MAX_AGE_LIMIT));
                }
                "mx" => {
                    let pattern = value.to_ascii_lowercase();
                    if !valid_pattern(&pattern) {
                        return Err(PolicyError(format!("invalid mx pattern {value:?}")));
                    }
                    mx.push(pattern);
                }
                _ => {}
            }
        }
        if version.as_deref() != Some("STSv1") {
            return Err(PolicyError("version is not STSv1".to_owned()));
        }
        let mode = mode.ok_or_else(|| PolicyError("no mode".to_owned()))?;
        let max_age = max_age.ok_or_else(|| PolicyError("no max_age".to_owned()))?;
        if mode != Mode::None && mx.is_empty() {
            return Err(PolicyError("no mx pattern".to_owned()));
        }
        Ok(Self { mode, max_age, mx })
    }

    /// Whether the MX host `host` is named by a pattern (RFC 8461 4.1: a wildcard stands for
    /// exactly one leftmost label).
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|p| match p.strip_prefix("*.") {
            Some(suffix) => host
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
            None => *p == host,
        })
    }

    /// The policy as TLS-RPT's `policy-string` lines (RFC 8460 4.4).
    pub fn lines(&self) -> Vec<String> {
        let mode = match self.mode {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        };
        let mut out = vec!["version: STSv1".to_owned(), format!("mode: {mode}")];
        out.extend(self.mx.iter().map(|m| format!("mx: {m}")));
        out.push(format!("max_age: {}", self.max_age));
        out
    }
}

fn valid_pattern(p: &str) -> bool {
    let name = p.strip_prefix("*.").unwrap_or(p);
    !name.is_empty()
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The policy id of the TXT records at `_mta-sts.<domain>` (RFC 8461 3.1), or `None` when
/// there is not exactly one valid STSv1 record.
pub fn txt_id(records: &[String]) -> Option<String> {
    let sts: Vec<&String> = records
        .iter()
        .filter(|r| r.starts_with("v=STSv1"))
        .collect();
    let [record] = sts.as_slice() else {
        return None;
    };
    let mut fields = record.split(';').map(str::trim);
    if fields.next() != Some("v=STSv1") {
        return None;
    }
    fields
        .find_map(|f| f.strip_prefix("id="))
        .filter(|id| {
            !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric())
        })
        .map(str::to_owned)
}

/// A cached policy: what the KV bucket holds per domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cached {
    pub id: String,
    pub policy: Policy,
    /// Unix seconds of the fetch.
    pub fetched_at: u64,
}

impl Cached {
    /// Whether `max_age` still covers `now`.
    pub fn is_fresh(&self, now: SystemTime) -> bool {
        unix(now) < self.fetched_at.saturating_add(self.policy.max_age)
    }
}

/// What a domain's MTA-STS says for one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// No policy (or `mode: none`).
    NoPolicy,
    /// A policy in force.
    Policy(Cached),
    /// A TXT record announces a policy that could not be fetched or parsed and none is
    /// cached: deliver as without a policy, and report it (RFC 8461 5.1, RFC 8460 4.3.2).
    Failed { result: ResultType, reason: String },
}

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("policy host {host}: {reason}")]
    Fetch { host: String, reason: String },
    #[error("policy host {host}: certificate not accepted: {reason}")]
    Certificate { host: String, reason: String },
    #[error(transparent)]
    Invalid(#[from] PolicyError),
}

impl FetchError {
    fn result(&self) -> ResultType {
        match self {
            Self::Fetch { .. } => ResultType::StsPolicyFetchError,
            Self::Certificate { .. } => ResultType::StsWebpkiInvalid,
            Self::Invalid(_) => ResultType::StsPolicyInvalid,
        }
    }
}

/// MTA-STS for the node: fetcher, cluster cache, settings.
pub struct MtaSts {
    config: MtaStsConfig,
    resolver: Arc<dyn Resolver>,
    address_policy: AddressPolicy,
    tls: ClientTls,
    js: async_nats::jetstream::Context,
    store: OnceCell<Option<kv::Store>>,
}

impl MtaSts {
    pub fn new(
        config: MtaStsConfig,
        resolver: Arc<dyn Resolver>,
        address_policy: AddressPolicy,
        tls: ClientTls,
        js: async_nats::jetstream::Context,
    ) -> Self {
        Self {
            config,
            resolver,
            address_policy,
            tls,
            js,
            store: OnceCell::new(),
        }
    }

    /// The policy for a delivery to `domain` now.
    #[tracing::instrument(name = "mta_sts.lookup", skip(self), fields(%domain))]
    pub async fn lookup(&self, domain: &str) -> Lookup {
        let domain = domain.to_ascii_lowercase();
        let now = SystemTime::now();
        let cached = self.cached(&domain).await.filter(|c| c.is_fresh(now));
        let id = match self.resolver.txt(&format!("_mta-sts.{domain}")).await {
            Ok(records) => txt_id(&records),
            Err(error) => {
                tracing::debug!(%error, "no _mta-sts record");
                None
            }
        };
        let in_force = |c: Cached| {
            if c.policy.mode == Mode::None {
                Lookup::NoPolicy
            } else {
                Lookup::Policy(c)
            }
        };
        match (id, cached) {
            (Some(id), Some(c)) if c.id == id => in_force(c),
            (Some(id), cached) => match self.fetch(&domain).await {
                Ok(policy) => {
                    let c = Cached {
                        id,
                        policy,
                        fetched_at: unix(now),
                    };
                    self.store_cached(&domain, &c).await;
                    in_force(c)
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot fetch the MTA-STS policy");
                    match cached {
                        Some(c) => in_force(c),
                        None => Lookup::Failed {
                            result: error.result(),
                            reason: error.to_string(),
                        },
                    }
                }
            },
            (None, Some(c)) => in_force(c),
            (None, None) => Lookup::NoPolicy,
        }
    }

    /// Fetches and parses `domain`'s policy file.
    pub async fn fetch(&self, domain: &str) -> Result<Policy, FetchError> {
        let host = format!("mta-sts.{domain}");
        let fail = |reason: String| FetchError::Fetch {
            host: host.clone(),
            reason,
        };
        let ips = self
            .resolver
            .ips(&host)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let port = self.config.https_port;
        let allowed: Vec<SocketAddr> = ips
            .iter()
            .filter(|ip| match self.address_policy.check(**ip) {
                Ok(()) => true,
                Err(refused) => {
                    tracing::warn!(%host, error = %refused, "MTA-STS policy host address refused by policy");
                    false
                }
            })
            .map(|ip| SocketAddr::new(*ip, port))
            .collect();
        if allowed.is_empty() {
            return Err(fail(if ips.is_empty() {
                "no address".to_owned()
            } else {
                "every address is in a blocked range".to_owned()
            }));
        }
        let tls = rustls::ClientConfig::builder_with_provider(self.tls.provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| fail(e.to_string()))?
            .with_root_certificates(self.tls.roots())
            .with_no_client_auth();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(self.config.fetch_timeout.0)
            .resolve_to_addrs(&host, &allowed)
            .no_proxy()
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let url = if port == 443 {
            format!("https://{host}/.well-known/mta-sts.txt")
        } else {
            format!("https://{host}:{port}/.well-known/mta-sts.txt")
        };
        let mut response = client.get(&url).send().await.map_err(|e| {
            if is_certificate_error(&e) {
                FetchError::Certificate {
                    host: host.clone(),
                    reason: error_chain(&e),
                }
            } else {
                fail(error_chain(&e))
            }
        })?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(fail(format!("HTTP status {}", response.status())));
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !content_type.starts_with("text/plain") {
            return Err(fail(format!(
                "content type {content_type:?}, not text/plain"
            )));
        }
        let limit = usize::try_from(self.config.max_policy_size.0).unwrap_or(usize::MAX);
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| fail(error_chain(&e)))? {
            if body.len() + chunk.len() > limit {
                return Err(fail(format!("policy larger than {limit} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        let text = String::from_utf8(body).map_err(|_| PolicyError("not UTF-8".to_owned()))?;
        Ok(Policy::parse(&text)?)
    }

    /// Re-checks every cached policy every `refreshInterval` until `stop`.
    pub async fn run_refresh(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let period = self.config.refresh_interval.0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            if let Err(error) = self.refresh_all(period).await {
                tracing::debug!(%error, "MTA-STS refresh pass failed");
            }
        }
    }

    /// One refresh pass: fetches the policies whose id changed or that expire within two
    /// refresh periods.
    async fn refresh_all(&self, period: Duration) -> Result<(), String> {
        let Some(store) = self.store().await else {
            return Ok(());
        };
        let mut keys = store.keys().await.map_err(|e| e.to_string())?;
        let mut domains = Vec::new();
        while let Some(key) = keys.next().await {
            domains.push(key.map_err(|e| e.to_string())?);
        }
        let now = SystemTime::now();
        for domain in domains {
            let Some(c) = self.cached(&domain).await else {
                continue;
            };
            let id = self
                .resolver
                .txt(&format!("_mta-sts.{domain}"))
                .await
                .ok()
                .and_then(|r| txt_id(&r));
            let expiring = unix(now + period * 2) >= c.fetched_at.saturating_add(c.policy.max_age);
            let changed = id.as_ref().is_some_and(|id| *id != c.id);
            if !(expiring || changed) {
                continue;
            }
            let Some(id) = id else {
                continue;
            };
            match self.fetch(&domain).await {
                Ok(policy) => {
                    tracing::info!(%domain, %id, "refreshed the MTA-STS policy");
                    self.store_cached(
                        &domain,
                        &Cached {
                            id,
                            policy,
                            fetched_at: unix(now),
                        },
                    )
                    .await;
                }
                Err(error) => tracing::warn!(%domain, %error, "cannot refresh the MTA-STS policy"),
            }
        }
        Ok(())
    }

    async fn cached(&self, domain: &str) -> Option<Cached> {
        let store = self.store().await?;
        match store.get(domain).await {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).ok(),
            Ok(None) => None,
            Err(error) => {
                tracing::warn!(%domain, %error, "cannot read the MTA-STS cache");
                None
            }
        }
    }

    async fn store_cached(&self, domain: &str, cached: &Cached) {
        let Some(store) = self.store().await else {
            return;
        };
        let Ok(json) = serde_json::to_vec(cached) else {
            return;
        };
        if let Err(error) = store.put(domain, Bytes::from(json)).await {
            tracing::warn!(%domain, %error, "cannot write the MTA-STS cache");
        }
    }

    /// The shared bucket, created on first use. Without it (NATS trouble, no permission)
    /// every delivery fetches for itself, which is slower but still correct.
    async fn store(&self) -> Option<&kv::Store> {
        self.store
            .get_or_init(|| async {
                let bucket = kubemail_queue::MTA_STS_CACHE_BUCKET;
                match self.js.get_key_value(bucket).await {
                    Ok(store) => Some(store),
                    Err(_) => match self
                        .js
                        .create_key_value(kubemail_queue::streams::mta_sts_cache_config(1))
                        .await
                    {
                        Ok(store) => Some(store),
                        Err(error) => {
                            tracing::warn!(%error, "no MTA-STS cache bucket; policies are fetched per delivery");
                            None
                        }
                    },
                }
            })
            .await
            .as_ref()
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The error and its causes in one line (reqwest's own message hides the TLS reason).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn is_certificate_error(e: &reqwest::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if let Some(rustls::Error::InvalidCertificate(_)) = s.downcast_ref::<rustls::Error>() {
            return true;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)))
        {
            return true;
        }
        source = s.source();
    }
    false
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_policies_and_refuses_broken_ones() {
        let p = Policy::parse(
            "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.com\r\nmx: *.Example.net\r\nmax_age: 604800\r\n",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.max_age, 604_800);
        assert_eq!(p.mx, ["mx1.example.com", "*.example.net"]);
        // LF only, unknown keys, a huge max_age capped at a year.
        let p = Policy::parse(
            "version: STSv1\nmode: testing\nmx: a.test\nfoo: bar\nmax_age: 9999999999\n",
        )
        .unwrap();
        assert_eq!((p.mode, p.max_age), (Mode::Testing, MAX_AGE_LIMIT));
        assert_eq!(
            Policy::parse("version: STSv1\nmode: none\nmax_age: 1\n")
                .unwrap()
                .mode,
            Mode::None
        );
        for bad in [
            "mode: enforce\nmx: a.test\nmax_age: 1\n",
            "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
            "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a.test\n",
            "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
            "version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 1\n",
            "<html>not a policy</html>",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wildcards_stand_for_exactly_one_label() {
        let p = Policy::parse(
            "version: STSv1\nmode: enforce\nmx: *.example.com\nmx: mx.other.test\nmax_age: 1\n",
        )
        .unwrap();
        assert!(p.matches("mx1.example.com"));
        assert!(p.matches("MX1.Example.Com."));
        assert!(!p.matches("a.b.example.com"));
        assert!(!p.matches("example.com"));
        assert!(p.matches("mx.other.test"));
        assert!(!p.matches("mx.other.test.evil"));
    }

    #[test]
    fn exactly_one_sts_record_gives_an_id() {
        let one = |r: &[&str]| txt_id(&r.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert_eq!(
            one(&["v=STSv1; id=20261127T1"]).as_deref(),
            Some("20261127T1")
        );
        assert_eq!(
            one(&["v=spf1 -all", "v=STSv1;id=abc;"]).as_deref(),
            Some("abc")
        );
        assert_eq!(one(&["v=STSv1; id=a", "v=STSv1; id=b"]), None);
        assert_eq!(one(&["v=STSv1"]), None);
        assert_eq!(one(&["v=STSv1; id=not-alnum"]), None);
        assert_eq!(one(&[]), None);
    }

    #[test]
    fn a_cached_policy_lasts_its_max_age() {
        let c = Cached {
            id: "a".into(),
            policy: Policy {
                mode: Mode::Enforce,
                max_age: 60,
                mx: vec!["mx.test".into()],
            },
            fetched_at: 1_000,
        };
        assert!(c.is_fresh(UNIX_EPOCH + Duration::from_secs(1_059)));
        assert!(!c.is_fresh(UNIX_EPOCH + Duration::from_secs(1_060)));
    }
}
