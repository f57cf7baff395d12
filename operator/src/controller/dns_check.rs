//! The `DnsPublished` condition: a task beside the controllers (it runs while this replica
//! leads) that looks up every record a MailDomain should publish (its `status.dnsRecords`)
//! and reports whether DNS answers with exactly those ([`crate::dns_check`] compares).
//!
//! A domain is checked when its records change (at the next tick, within seconds) and then
//! every `--dns-check-interval`. The check is a task rather than a step of the reconcile: a
//! check is one lookup per name and type, and a slow or unreachable resolver would otherwise
//! hold a reconcile slot for seconds per domain; here a reconcile never waits for DNS.
//!
//! The task writes only its own condition, by server-side apply with a field manager of its
//! own ([`FIELD_MANAGER`]); the reconcile's status leaves that condition out
//! (`mail_domain::status::publish`), so neither overwrites the other. `DnsPublished` does not
//! feed `Ready`: a domain serves mail before its records have propagated. A change of the
//! condition's status or reason is also a Kubernetes Event, and the records not as expected
//! are the gauge `kubemail_operator_maildomain_dns_records_not_as_expected`.
//!
//! With external-dns, the DNSEndpoint's status holds only an `observedGeneration`, which says
//! nothing about whether the provider accepted the records; the lookup is the check.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::controller::{Context, Error, condition};
use crate::crd::mail_domain::{DnsRecord, MailDomain};
use crate::dns_check::resolve::{Resolver, ResolverSettings};
use crate::dns_check::{self, Answers, DNS_PUBLISHED, Verdict};

/// Field manager of the `DnsPublished` condition.
pub const FIELD_MANAGER: &str = "kubemail-operator-dns-check";
/// How often the task looks for domains that are due (changed records, interval elapsed).
const TICK: Duration = Duration::from_secs(5);
/// Domains checked at once.
const CONCURRENCY: usize = 4;
/// Deadline of one domain's lookups (a handful of names, two attempts each).
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsCheckConfig {
    /// Check every domain this often; zero: never.
    pub interval: Duration,
    pub resolver: ResolverSettings,
}

/// What was checked last for one domain.
struct Checked {
    records: Vec<DnsRecord>,
    at: Instant,
}

/// Checks the watched MailDomains until `stop` fires.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    let settings = ctx.config.dns_check.clone();
    if settings.interval.is_zero() {
        tracing::info!("DNS check off (--dns-check-interval 0s)");
        return;
    }
    let resolver = match Resolver::new(&settings.resolver) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %crate::controller::chain(&e), "the DNS check cannot run; DnsPublished is not reported");
            return;
        }
    };
    tracing::info!(resolver = %resolver.description(), interval = ?settings.interval, "DNS check started");
    let mut checked: HashMap<String, Checked> = HashMap::new();
    loop {
        let domains = ctx.domains.snapshot();
        let now = Instant::now();
        let due: Vec<Arc<MailDomain>> = domains
            .iter()
            .filter(|md| is_due(md, checked.get(&key(md)), settings.interval, now))
            .cloned()
            .collect();
        let work = futures::stream::iter(due)
            .map(|md| {
                let (ctx, resolver) = (&ctx, &resolver);
                async move {
                    let records = records(&md).to_vec();
                    check(ctx, resolver, &md).await;
                    (key(&md), records)
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<_>>();
        let done = tokio::select! {
            () = stop.cancelled() => return,
            done = work => done,
        };
        for (key, records) in done {
            checked.insert(
                key,
                Checked {
                    records,
                    at: Instant::now(),
                },
            );
        }
        checked.retain(|k, _| domains.iter().any(|md| &key(md) == k));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(TICK) => {}
        }
    }
}

/// Looks up one domain's records and reports the outcome.
async fn check(ctx: &Context, resolver: &Resolver, md: &MailDomain) {
    let expected = records(md);
    let queries = dns_check::queries(expected);
    let answers = match tokio::time::timeout(CHECK_TIMEOUT, resolver.lookup_all(&queries)).await {
        Ok(answers) => answers,
        Err(_) => queries
            .iter()
            .map(|q| {
                (
                    q.clone(),
                    Err(format!("no answer within {}s", CHECK_TIMEOUT.as_secs())),
                )
            })
            .collect::<Answers>(),
    };
    let findings = dns_check::compare(expected, &answers);
    let verdict = dns_check::verdict(expected.len(), &findings, resolver.description());
    let (ns, name) = (md.namespace().unwrap_or_default(), md.name_any());
    ctx.metrics
        .set_dns_not_as_expected(&ns, &name, verdict.not_as_expected);
    tracing::debug!(namespace = %ns, name = %name, reason = verdict.reason, "DNS check");
    if let Err(e) = report(ctx, md, &verdict).await {
        tracing::warn!(namespace = %ns, name = %name, error = %crate::controller::chain(&e), "cannot report the DNS check");
    }
}

/// Writes the condition when it changed, and an Event when its status or reason did.
async fn report(ctx: &Context, md: &MailDomain, verdict: &Verdict) -> Result<(), Error> {
    let previous = md
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let before = previous.iter().find(|c| c.type_ == DNS_PUBLISHED);
    let now = crate::timestamps::now();
    let new = condition(
        previous,
        DNS_PUBLISHED,
        verdict.published,
        verdict.reason,
        verdict.message.clone(),
        md.metadata.generation,
        now,
    );
    let unchanged = before.is_some_and(|b| {
        b.status == new.status
            && b.reason == new.reason
            && b.message == new.message
            && b.observed_generation == new.observed_generation
    });
    if unchanged {
        return Ok(());
    }
    let ns = md.namespace().unwrap_or_default();
    let api: Api<MailDomain> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = serde_json::json!({
        "apiVersion": MailDomain::api_version(&()),
        "kind": MailDomain::kind(&()),
        "status": { "conditions": [new] },
    });
    tokio::time::timeout(
        ctx.config.status_patch_timeout,
        api.patch_status(
            &md.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        ),
    )
    .await
    .map_err(|_| Error::PatchStatusTimedOut(md.name_any()))?
    .map_err(|source| Error::PatchStatus {
        name: md.name_any(),
        source,
    })?;
    let changed = before.is_none_or(|b| b.status != new.status || b.reason != new.reason);
    if changed {
        let event = Event {
            type_: if verdict.published {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: format!("Dns{}", verdict.reason),
            note: Some(verdict.message.clone()),
            action: "CheckDns".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &md.object_ref(&())).await {
            // Events are for people; the condition already says it.
            tracing::warn!(error = %e, "cannot publish an event");
        }
    }
    Ok(())
}

/// Whether `md` should be looked up now: its records changed since the last check, or the
/// interval passed. Domains without records (an invalid or conflicting claim) and domains
/// being deleted are not.
fn is_due(md: &MailDomain, last: Option<&Checked>, interval: Duration, now: Instant) -> bool {
    let records = records(md);
    if records.is_empty() || md.meta().deletion_timestamp.is_some() {
        return false;
    }
    last.is_none_or(|c| c.records != records || now.duration_since(c.at) >= interval)
}

fn records(md: &MailDomain) -> &[DnsRecord] {
    md.status
        .as_ref()
        .map(|s| s.dns_records.as_slice())
        .unwrap_or_default()
}

fn key(md: &MailDomain) -> String {
    md.uid()
        .unwrap_or_else(|| format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::mail_domain::{MailDomainSpec, MailDomainStatus};

    fn domain(records: Vec<DnsRecord>) -> MailDomain {
        let spec: MailDomainSpec =
            serde_json::from_value(serde_json::json!({"domain": "example.com"})).unwrap();
        let mut md = MailDomain::new("example-com", spec);
        md.status = Some(MailDomainStatus {
            dns_records: records,
            ..MailDomainStatus::default()
        });
        md
    }

    fn mx(value: &str) -> DnsRecord {
        DnsRecord {
            name: "example.com.".into(),
            type_: "MX".into(),
            ttl: 3600,
            value: value.into(),
        }
    }

    #[test]
    fn a_domain_is_due_when_its_records_change_or_the_interval_passed() {
        let interval = Duration::from_secs(600);
        let now = Instant::now();
        let md = domain(vec![mx("10 mx.example.com.")]);
        assert!(is_due(&md, None, interval, now), "never checked");
        let fresh = Checked {
            records: vec![mx("10 mx.example.com.")],
            at: now,
        };
        assert!(!is_due(&md, Some(&fresh), interval, now));
        assert!(is_due(&md, Some(&fresh), interval, now + interval));
        let changed = domain(vec![mx("10 mx2.example.com.")]);
        assert!(
            is_due(&changed, Some(&fresh), interval, now),
            "records changed"
        );
        assert!(
            !is_due(&domain(vec![]), None, interval, now),
            "nothing to check"
        );
    }
}
