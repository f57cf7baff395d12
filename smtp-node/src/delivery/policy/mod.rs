//! Outbound transport security: which MX hosts a message may go to and what their TLS must
//! prove, decided before connecting and checked right after the handshake.
//!
//! The worker asks [`Policies::plan`] for the MX targets of a recipient domain (choose
//! policy), connects to each planned target with its [`Check`] (the client checks the chain
//! before EHLO, [`verify`]), and reports what happened to [`tlsrpt`] (verify → record).
//!
//! Precedence for a recipient domain:
//! 1. a message with `TLS-Required: No` (RFC 8689 5): opportunistic TLS, nothing enforced;
//! 2. an override in `delivery.tls.policies` (`verify`, `dane`, `none`);
//! 3. DANE (RFC 7672) for every MX host with secure TLSA records: DANE takes precedence over
//!    MTA-STS (RFC 8461 2), host by host; a bogus DNSSEC answer makes a host unusable;
//! 4. MTA-STS (RFC 8461): `enforce` keeps only MX hosts the policy names and requires a
//!    WebPKI-valid certificate for the host name; `testing` checks the same, reports
//!    failures and delivers anyway;
//! 5. `delivery.tls.mx` (opportunistic by default).
//!
//! REQUIRETLS (RFC 8689 4.2.1) on top: the MX hosts must come from a DNSSEC-secure MX answer
//! or an MTA-STS policy (any mode), the certificate must verify (DANE, else WebPKI for the MX
//! name), and the server must announce REQUIRETLS; otherwise the message bounces (`5.7.10`,
//! `5.7.30`), it never goes out unprotected.

pub mod dane;
pub mod mta_sts;
pub mod tlsrpt;
pub mod verify;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use self::dane::HostDane;
use self::mta_sts::{Lookup, Mode, MtaSts};
use super::client::TlsPolicy;
use super::mx::Target;
use super::outcome::Diagnostic;
use crate::config::{MxTlsPolicy, OutboundTlsConfig, TlsPolicyMode};
use crate::dns::{Resolver, TlsaRecord};
use crate::protocol::EnhancedCode;

/// RFC 8460 4.4 `policy-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PolicyType {
    #[serde(rename = "sts")]
    Sts,
    #[serde(rename = "tlsa")]
    Tlsa,
    #[serde(rename = "no-policy-found")]
    NoPolicyFound,
}

/// RFC 8460 4.3 result types (and `success`, for the counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResultType {
    Success,
    StarttlsNotSupported,
    CertificateHostMismatch,
    CertificateExpired,
    CertificateNotTrusted,
    ValidationFailure,
    TlsaInvalid,
    DnssecInvalid,
    DaneRequired,
    StsPolicyFetchError,
    StsPolicyInvalid,
    StsWebpkiInvalid,
}

impl ResultType {
    /// The RFC 8460 name (also the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::StarttlsNotSupported => "starttls-not-supported",
            Self::CertificateHostMismatch => "certificate-host-mismatch",
            Self::CertificateExpired => "certificate-expired",
            Self::CertificateNotTrusted => "certificate-not-trusted",
            Self::ValidationFailure => "validation-failure",
            Self::TlsaInvalid => "tlsa-invalid",
            Self::DnssecInvalid => "dnssec-invalid",
            Self::DaneRequired => "dane-required",
            Self::StsPolicyFetchError => "sts-policy-fetch-error",
            Self::StsPolicyInvalid => "sts-policy-invalid",
            Self::StsWebpkiInvalid => "sts-webpki-invalid",
        }
    }
}

/// The policy a TLS-RPT result is about (RFC 8460 4.4 `policy`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReportPolicy {
    pub policy_type: PolicyType,
    /// The policy's text lines (MTA-STS) or TLSA records in presentation form.
    pub policy_string: Vec<String>,
    /// The recipient domain.
    pub policy_domain: String,
    /// The MX patterns of an MTA-STS policy.
    pub mx_host: Vec<String>,
}

/// What the chain of one connection must satisfy, checked after the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Nothing beyond the route's own TLS settings.
    None,
    /// A certificate valid (WebPKI) for the MX host name.
    WebPki,
    /// A certificate chain matching one of these TLSA records (RFC 7672).
    Dane(Arc<[TlsaRecord]>),
}

/// One MX target with what its connection must do.
#[derive(Debug, Clone)]
pub struct Planned {
    pub target: Target,
    pub tls: TlsPolicy,
    /// Handshake with the verified configuration (the `mx: required` default).
    pub verify_certificate: bool,
    pub check: Check,
    /// A failed check refuses the host (`false`: MTA-STS testing, report only).
    pub enforce: bool,
    /// The policy TLS-RPT results of this host are counted under, if any.
    pub report: Option<Arc<ReportPolicy>>,
    /// A failure known before connecting (testing mode: the MX is not in the policy).
    pub known_failure: Option<ResultType>,
}

/// Why no MX target may be used now.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub diagnostic: Diagnostic,
    /// Bounce rather than retry (REQUIRETLS).
    pub permanent: bool,
    /// Report it to TLS-RPT under this policy.
    pub report: Option<(Arc<ReportPolicy>, ResultType)>,
}

/// A message's demands on transport security.
#[derive(Debug, Clone, Copy, Default)]
pub struct MessageTls {
    /// REQUIRETLS (RFC 8689).
    pub require_tls: bool,
    /// `TLS-Required: No` (RFC 8689 5).
    pub tls_optional: bool,
}

/// The node's outbound TLS policies.
pub struct Policies {
    config: OutboundTlsConfig,
    mx_port: u16,
    resolver: Arc<dyn Resolver>,
    pub mta_sts: Arc<MtaSts>,
}

impl Policies {
    pub fn new(
        config: OutboundTlsConfig,
        mx_port: u16,
        resolver: Arc<dyn Resolver>,
        mta_sts: Arc<MtaSts>,
    ) -> Self {
        Self {
            config,
            mx_port,
            resolver,
            mta_sts,
        }
    }

    /// The targets of `domain` that may be used for this message, in order, with their checks.
    #[tracing::instrument(name = "delivery.tls_policy", skip_all, fields(%domain, policy = tracing::field::Empty))]
    pub async fn plan(
        &self,
        domain: &str,
        targets: Vec<Target>,
        message: MessageTls,
    ) -> Result<Vec<Planned>, Refusal> {
        let domain = domain.to_ascii_lowercase();
        let base = |target: Target| Planned {
            target,
            tls: match self.config.mx {
                MxTlsPolicy::Opportunistic => TlsPolicy::Opportunistic,
                MxTlsPolicy::Required => TlsPolicy::Required,
            },
            verify_certificate: self.config.mx == MxTlsPolicy::Required,
            check: Check::None,
            enforce: false,
            report: None,
            known_failure: None,
        };
        let opportunistic = |target: Target| Planned {
            tls: TlsPolicy::Opportunistic,
            verify_certificate: false,
            ..base(target)
        };
        let required = |target: Target, check: Check, report: Option<Arc<ReportPolicy>>| Planned {
            tls: TlsPolicy::Required,
            verify_certificate: false,
            check,
            enforce: true,
            report,
            ..base(target)
        };
        let span = tracing::Span::current();
        if message.tls_optional {
            span.record("policy", "tls-required-no");
            return Ok(targets.into_iter().map(opportunistic).collect());
        }
        let hosts: Vec<String> = dedup(targets.iter().map(|t| t.host.clone()));
        let override_mode = self
            .config
            .policies
            .iter()
            .find(|p| p.domain.eq_ignore_ascii_case(&domain))
            .map(|p| p.mode);
        let needs_dane = self.config.dane.enabled || override_mode == Some(TlsPolicyMode::Dane);
        let dane = if needs_dane || message.require_tls {
            dane::lookup(self.resolver.as_ref(), &domain, &hosts, self.mx_port).await
        } else {
            dane::DomainDane::default()
        };
        if dane.mx_bogus && (needs_dane || message.require_tls) {
            span.record("policy", "dnssec-bogus");
            return Err(Refusal {
                diagnostic: Diagnostic::local(
                    EnhancedCode(4, 7, 5),
                    format!(
                        "the MX records of {domain} are DNSSEC-bogus (signatures do not validate)"
                    ),
                ),
                permanent: false,
                report: Some((self.report_tlsa(&domain, &[]), ResultType::DnssecInvalid)),
            });
        }
        let mut planned = Vec::new();
        let mut refused: Vec<(String, Option<ResultType>)> = Vec::new();

        match override_mode {
            Some(TlsPolicyMode::None) => {
                span.record("policy", "override-none");
                return Ok(targets.into_iter().map(opportunistic).collect());
            }
            Some(TlsPolicyMode::Verify) => {
                span.record("policy", "override-verify");
                return self.finish(
                    targets
                        .into_iter()
                        .map(|t| required(t, Check::WebPki, None))
                        .collect(),
                    Vec::new(),
                    message,
                    &dane,
                    false,
                    &domain,
                );
            }
            Some(TlsPolicyMode::Dane) => {
                span.record("policy", "override-dane");
                for t in targets {
                    match dane.host(&t.host) {
                        HostDane::Tlsa(records) => {
                            let report = self.report_tlsa(&domain, &records);
                            planned.push(required(t, Check::Dane(records), Some(report)));
                        }
                        HostDane::Bogus(why) => {
                            refused.push((why, Some(ResultType::DnssecInvalid)))
                        }
                        HostDane::None => refused.push((
                            format!(
                                "{} has no DNSSEC-signed TLSA records and {domain} requires DANE",
                                t.host
                            ),
                            Some(ResultType::DaneRequired),
                        )),
                    }
                }
                return self.finish(planned, refused, message, &dane, false, &domain);
            }
            None => {}
        }

        // DANE first, host by host; MTA-STS for the others.
        let mut rest = Vec::new();
        for t in targets {
            match dane.host(&t.host) {
                HostDane::Tlsa(records) if needs_dane || message.require_tls => {
                    let report = self.report_tlsa(&domain, &records);
                    planned.push(required(t, Check::Dane(records), Some(report)));
                }
                HostDane::Bogus(why) if needs_dane || message.require_tls => {
                    refused.push((why, Some(ResultType::DnssecInvalid)));
                }
                _ => rest.push(t),
            }
        }
        if rest.is_empty() {
            span.record("policy", "dane");
            return self.finish(planned, refused, message, &dane, false, &domain);
        }
        let sts = if self.config.mta_sts.enabled {
            self.mta_sts.lookup(&domain).await
        } else {
            Lookup::NoPolicy
        };
        let mut sts_listed = false;
        match sts {
            Lookup::Policy(cached) => {
                let policy = &cached.policy;
                let report = Arc::new(ReportPolicy {
                    policy_type: PolicyType::Sts,
                    policy_string: policy.lines(),
                    policy_domain: domain.clone(),
                    mx_host: policy.mx.clone(),
                });
                let enforce = policy.mode == Mode::Enforce || message.require_tls;
                span.record(
                    "policy",
                    if enforce {
                        "mta-sts-enforce"
                    } else {
                        "mta-sts-testing"
                    },
                );
                for t in rest {
                    let listed = policy.matches(&t.host);
                    sts_listed |= listed;
                    if enforce && !listed {
                        refused.push((
                            format!(
                                "MX host {} is not named by the MTA-STS policy of {domain}",
                                t.host
                            ),
                            Some(ResultType::ValidationFailure),
                        ));
                        continue;
                    }
                    let mut p = required(t, Check::WebPki, Some(report.clone()));
                    if !enforce {
                        p.tls = TlsPolicy::Opportunistic;
                        p.enforce = false;
                        p.known_failure = (!listed).then_some(ResultType::ValidationFailure);
                    }
                    planned.push(p);
                }
                if planned.is_empty()
                    && let Some((why, result)) = refused.first().cloned()
                {
                    let _ = why;
                    return self
                        .finish(planned, refused, message, &dane, sts_listed, &domain)
                        .map_err(|mut r| {
                            r.report = result.map(|res| (report.clone(), res));
                            r
                        });
                }
            }
            Lookup::Failed { result, reason } => {
                span.record("policy", "mta-sts-unavailable");
                let report = Arc::new(ReportPolicy {
                    policy_type: PolicyType::Sts,
                    policy_string: Vec::new(),
                    policy_domain: domain.clone(),
                    mx_host: Vec::new(),
                });
                tracing::info!(%reason, "MTA-STS policy unavailable; delivering as without one");
                for t in rest {
                    let mut p = base(t);
                    p.report = Some(report.clone());
                    p.known_failure = Some(result);
                    planned.push(p);
                }
            }
            Lookup::NoPolicy => {
                span.record("policy", if planned.is_empty() { "none" } else { "dane" });
                let report = Arc::new(ReportPolicy {
                    policy_type: PolicyType::NoPolicyFound,
                    policy_string: Vec::new(),
                    policy_domain: domain.clone(),
                    mx_host: Vec::new(),
                });
                for t in rest {
                    let mut p = base(t);
                    p.report = Some(report.clone());
                    planned.push(p);
                }
            }
        }
        self.finish(planned, refused, message, &dane, sts_listed, &domain)
    }

    /// Applies REQUIRETLS and turns an empty plan into a refusal.
    fn finish(
        &self,
        mut planned: Vec<Planned>,
        refused: Vec<(String, Option<ResultType>)>,
        message: MessageTls,
        dane: &dane::DomainDane,
        sts_listed: bool,
        domain: &str,
    ) -> Result<Vec<Planned>, Refusal> {
        if message.require_tls {
            // RFC 8689 4.2.1: an authenticated MX (DNSSEC or MTA-STS) and a verified
            // certificate; whatever would go unchecked is raised to WebPKI for the MX name.
            let authenticated_mx = dane.mx_secure || sts_listed;
            planned.retain(|p| authenticated_mx || matches!(p.check, Check::Dane(_)));
            for p in &mut planned {
                if p.check == Check::None {
                    p.check = Check::WebPki;
                }
                p.tls = TlsPolicy::Required;
                p.verify_certificate = false;
                p.enforce = true;
                p.known_failure = None;
            }
            if planned.is_empty() {
                return Err(Refusal {
                    diagnostic: Diagnostic::local(
                        EnhancedCode(5, 7, 10),
                        format!(
                            "REQUIRETLS: no MX host of {domain} is authenticated by DNSSEC or MTA-STS{}",
                            refused
                                .first()
                                .map(|(w, _)| format!(" ({w})"))
                                .unwrap_or_default()
                        ),
                    ),
                    permanent: true,
                    report: None,
                });
            }
        }
        if planned.is_empty() {
            let (why, result) = refused
                .into_iter()
                .next()
                .unwrap_or_else(|| (format!("no usable MX host for {domain}"), None));
            return Err(Refusal {
                diagnostic: Diagnostic::local(EnhancedCode(4, 7, 5), why),
                permanent: false,
                report: result.map(|r| (self.report_tlsa(domain, &[]), r)),
            });
        }
        for (why, _) in &refused {
            tracing::info!(reason = %why, "MX host skipped by the TLS policy");
        }
        Ok(planned)
    }

    fn report_tlsa(&self, domain: &str, records: &[TlsaRecord]) -> Arc<ReportPolicy> {
        Arc::new(ReportPolicy {
            policy_type: PolicyType::Tlsa,
            policy_string: records
                .iter()
                .map(|r| {
                    let hex: String = r.data.iter().map(|b| format!("{b:02X}")).collect();
                    format!("{} {} {} {hex}", r.usage, r.selector, r.matching)
                })
                .collect(),
            policy_domain: domain.to_owned(),
            mx_host: Vec::new(),
        })
    }
}

fn dedup(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}
