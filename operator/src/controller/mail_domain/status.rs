//! Status: computes the MailDomain's status from what was *applied* (the Deployment the API
//! server returned) and provisioned, and the events a person should see; then patches the
//! status subresource by server-side apply, only when it changed. Conditions keep their
//! `lastTransitionTime` while their status holds, so an unchanged domain gets no write.
//!
//! Conditions: `DkimKeyReady`, `CertificateReady`, `DnsRecordsReady`, `RelayResolved`, and
//! `Ready` (pods ready, certificate ready, relay resolved). DNS records are not part of
//! `Ready`: the nodes serve mail whether or not a person has published them yet. The
//! `DnsPublished` condition (whether DNS answers with the records) is the DNS check's
//! (`controller::dns_check`), which writes it with a field manager of its own.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Resource;
use kube::runtime::events::{Event, EventType};

use super::build::{Children, Observed};
use super::names;
use super::provision::{Provisioned, TlsMaterial};
use super::validate::{Invalid, RelayResolution, ValidatedDomain};
use crate::controller::{Context, Error, condition};
use crate::crd::mail_domain::{CertificateStatus, MailDomain, MailDomainStatus, ServiceType};
use crate::timestamps::{UnixSeconds, rfc3339};

pub const READY: &str = "Ready";
pub const DKIM_KEY_READY: &str = "DkimKeyReady";
pub const CERTIFICATE_READY: &str = "CertificateReady";
pub const DNS_RECORDS_READY: &str = "DnsRecordsReady";
pub const RELAY_RESOLVED: &str = "RelayResolved";
pub const ACCEPTED: &str = "Accepted";

/// How a pooled MailDomain stands with its MailPool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    /// `<namespace>/<name>` of the pool.
    pub pool: String,
    /// The pool lists this MailDomain among the domains its nodes serve.
    pub attached: bool,
    pub ready_replicas: i32,
    pub replicas: i32,
    pub selector: Option<String>,
}

/// A Kubernetes event to publish about the MailDomain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainEvent {
    pub warning: bool,
    pub reason: String,
    pub action: String,
    pub note: String,
}

/// Everything the status is computed from.
pub struct StatusInputs<'a> {
    pub v: &'a ValidatedDomain,
    pub provisioned: &'a Provisioned,
    pub children: &'a Children,
    pub deployment: &'a Deployment,
    pub observed: &'a Observed,
    /// With `spec.poolRef`: the pool's view, which replaces `deployment`.
    pub pool: Option<&'a PoolView>,
}

/// The new status and the events describing what changed. Pure.
pub fn compute(
    md: &MailDomain,
    inputs: &StatusInputs<'_>,
    now: UnixSeconds,
) -> (MailDomainStatus, Vec<DomainEvent>) {
    let StatusInputs {
        v,
        provisioned: p,
        children,
        deployment,
        observed,
        pool,
    } = inputs;
    let previous = md.status.clone().unwrap_or_default();
    let prev = &previous.conditions;
    let generation = md.metadata.generation;
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        condition(prev, type_, ok, reason, message, generation, now)
    };
    let mut events = Vec::new();

    let published: Vec<String> = {
        let mut s: Vec<String> = p
            .dkim
            .keys
            .iter()
            .map(|k| k.record.selector.clone())
            .collect();
        s.sort();
        s
    };
    let dkim = cond(
        DKIM_KEY_READY,
        !children.signing_selectors.is_empty(),
        if children.signing_selectors.is_empty() {
            "NoSigningKey"
        } else {
            "KeysPublished"
        },
        format!(
            "signing with {}; published selectors: {} (Secret {})",
            display_list(&children.signing_selectors),
            display_list(&published),
            names::dkim_secret(&v.name)
        ),
    );
    if !p.dkim.generated.is_empty() {
        events.push(DomainEvent {
            warning: false,
            reason: "DkimKeyGenerated".into(),
            action: "GenerateKey".into(),
            note: format!(
                "generated DKIM key(s) {}; publish the TXT record(s) {}",
                p.dkim.generated.join(", "),
                p.dkim
                    .generated
                    .iter()
                    .map(|s| format!("{s}._domainkey.{}", v.domain))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    if !p.dkim.retired.is_empty() {
        events.push(DomainEvent {
            warning: false,
            reason: "DkimKeyRetired".into(),
            action: "RetireKey".into(),
            note: format!(
                "retired DKIM key(s) {}; their TXT records can be removed",
                p.dkim.retired.join(", ")
            ),
        });
    }
    if !previous.signing_selectors.is_empty()
        && previous.signing_selectors != children.signing_selectors
    {
        events.push(DomainEvent {
            warning: false,
            reason: "DkimSigningKeyChanged".into(),
            action: "RotateKey".into(),
            note: format!(
                "nodes now sign with {}",
                display_list(&children.signing_selectors)
            ),
        });
    }

    let (certificate, cert_status) = match &p.tls {
        TlsMaterial::OperatorCa { leaf, issued, .. } => {
            let renew = crate::certs::renew_after(leaf.not_before, leaf.not_after);
            if let Some(reason) = issued {
                events.push(DomainEvent {
                    warning: false,
                    reason: "CertificateIssued".into(),
                    action: "IssueCertificate".into(),
                    note: format!(
                        "issued a certificate for {} valid until {} ({})",
                        v.hostname,
                        rfc3339(leaf.not_after),
                        reason.describe()
                    ),
                });
            }
            (
                cond(
                    CERTIFICATE_READY,
                    true,
                    "Issued",
                    format!(
                        "certificate for {} issued by the operator CA, valid until {}, renewed after {}",
                        v.hostname,
                        rfc3339(leaf.not_after),
                        rfc3339(renew)
                    ),
                ),
                CertificateStatus {
                    secret_name: names::tls_secret(&v.name),
                    source: "operator-ca".into(),
                    not_after: Some(rfc3339(leaf.not_after)),
                    renew_after: Some(rfc3339(renew)),
                },
            )
        }
        TlsMaterial::CertManager {
            ready,
            reason,
            message,
            not_after,
        } => (
            cond(
                CERTIFICATE_READY,
                *ready,
                if *ready {
                    "CertManagerReady"
                } else {
                    "CertManagerNotReady"
                },
                format!(
                    "cert-manager Certificate {}: {reason}{}{message}",
                    names::certificate(&v.name),
                    if message.is_empty() { "" } else { ": " }
                ),
            ),
            CertificateStatus {
                secret_name: names::tls_secret(&v.name),
                source: "cert-manager".into(),
                not_after: not_after.clone(),
                renew_after: None,
            },
        ),
    };

    let where_written = if observed.external_dns {
        format!(
            "status.dnsRecords, ConfigMap {} and DNSEndpoint {}",
            names::dns_config(&v.name),
            names::dns_endpoint(&v.name)
        )
    } else {
        format!(
            "status.dnsRecords and ConfigMap {}",
            names::dns_config(&v.name)
        )
    };
    let dns = if !observed.addresses.is_empty() {
        cond(
            DNS_RECORDS_READY,
            true,
            "Computed",
            format!(
                "{} records to publish, in {where_written}",
                children.dns_records.len()
            ),
        )
    } else if v.service_type == ServiceType::LoadBalancer {
        cond(
            DNS_RECORDS_READY,
            false,
            "AwaitingLoadBalancerAddress",
            format!(
                "the Service {} has no load-balancer address yet, so the A/AAAA records of {} are missing and SPF uses 'mx'; the other records are in {where_written}",
                names::service(&v.name),
                v.hostname
            ),
        )
    } else {
        cond(
            DNS_RECORDS_READY,
            true,
            "ComputedWithoutAddresses",
            format!(
                "{} records to publish, in {where_written}; the Service is {:?}, so publish A/AAAA records of {} for the address your traffic arrives on",
                children.dns_records.len(),
                v.service_type,
                v.hostname
            ),
        )
    };
    if !previous.dns_records.is_empty() && previous.dns_records != children.dns_records {
        events.push(DomainEvent {
            warning: false,
            reason: "DnsRecordsChanged".into(),
            action: "ComputeDnsRecords".into(),
            note: format!("the DNS records changed; publish the new set from {where_written}"),
        });
    }

    let relay = match &v.relay {
        RelayResolution::Direct => cond(
            RELAY_RESOLVED,
            true,
            "DirectDelivery",
            "no relayRef: mail is delivered to the recipients' MX hosts".into(),
        ),
        RelayResolution::Resolved { name, .. } => cond(
            RELAY_RESOLVED,
            true,
            "Resolved",
            format!("outbound mail goes through Relay {name}"),
        ),
        RelayResolution::NotFound { name } => cond(
            RELAY_RESOLVED,
            false,
            "RelayNotFound",
            format!(
                "spec.relayRef names Relay {name}, which does not exist in namespace {}; outbound delivery is paused (mail is accepted and queued) until it does",
                v.namespace
            ),
        ),
        RelayResolution::NotReady { name, message } => cond(
            RELAY_RESOLVED,
            false,
            "RelayNotReady",
            format!(
                "Relay {name} is not ready: {message}; outbound delivery is paused (mail is accepted and queued) until it is"
            ),
        ),
    };

    let status = deployment.status.clone().unwrap_or_default();
    let (ready_replicas, replicas, pods_ready, selector) = match pool {
        Some(p) => (
            p.ready_replicas,
            p.replicas,
            p.attached && p.ready_replicas > 0,
            p.selector.clone(),
        ),
        None => {
            let ready_replicas = status.ready_replicas.unwrap_or(0);
            let updated = status.updated_replicas.unwrap_or(0);
            let rolled_out = deployment.metadata.generation.unwrap_or(0)
                <= status.observed_generation.unwrap_or(0);
            (
                ready_replicas,
                status.replicas.unwrap_or(0),
                rolled_out
                    && ready_replicas >= v.replicas
                    && (v.replicas == 0 || updated >= v.replicas),
                Some(names::selector_string(&v.name)),
            )
        }
    };
    let updated = status.updated_replicas.unwrap_or(0);
    let ready = if relay.status != "True" {
        cond(READY, false, "RelayNotResolved", relay.message.clone())
    } else if cert_status_false(&certificate) {
        cond(
            READY,
            false,
            "CertificateNotReady",
            certificate.message.clone(),
        )
    } else if let Some(p) = pool.filter(|_| !pods_ready) {
        let (reason, message) = if p.attached {
            (
                "PodsNotReady",
                format!("no node of MailPool {} is ready yet", p.pool),
            )
        } else {
            (
                "NotYetAttached",
                format!(
                    "waiting for MailPool {} to serve the domain (it picks up the hand-over within seconds)",
                    p.pool
                ),
            )
        };
        cond(READY, false, reason, message)
    } else if let Some(p) = pool {
        cond(
            READY,
            true,
            "Ready",
            format!(
                "attached to MailPool {} ({} of {} SMTP node pods ready); its nodes serve the domain once they reload their config, within the kubelet's volume sync (up to about a minute) and a few seconds",
                p.pool, p.ready_replicas, p.replicas
            ),
        )
    } else if !pods_ready {
        cond(
            READY,
            false,
            "PodsNotReady",
            format!(
                "{ready_replicas} of {} SMTP node pods ready ({updated} updated)",
                v.replicas
            ),
        )
    } else {
        cond(
            READY,
            true,
            "Ready",
            format!("{ready_replicas} of {} SMTP node pods ready", v.replicas),
        )
    };

    let mut conditions = vec![ready, dkim, certificate, dns, relay];
    if let Some(p) = pool {
        conditions.push(cond(
            ACCEPTED,
            true,
            "Accepted",
            format!("attached to MailPool {}", p.pool),
        ));
    }
    for c in &conditions {
        let before = prev.iter().find(|p| p.type_ == c.type_);
        if before.map(|b| b.status.as_str()) != Some(c.status.as_str()) {
            let ok = c.status == "True";
            // A first True of the supporting conditions is routine; say when things go wrong
            // and when the domain as a whole becomes ready.
            if ok && c.type_ != READY {
                continue;
            }
            events.push(DomainEvent {
                warning: !ok,
                reason: c.reason.clone(),
                action: "Reconcile".into(),
                note: c.message.clone(),
            });
        }
    }

    (
        MailDomainStatus {
            observed_generation: generation,
            ready_replicas,
            replicas,
            addresses: observed.addresses.iter().map(ToString::to_string).collect(),
            selector,
            selectors: published,
            signing_selectors: children.signing_selectors.clone(),
            certificate: Some(cert_status),
            dns_records: children.dns_records.clone(),
            conditions,
        },
        events,
    )
}

/// The status when the spec is invalid: `Ready` false with the reason; other conditions and
/// fields stay as they were.
pub fn invalid(
    md: &MailDomain,
    invalid: &Invalid,
    now: UnixSeconds,
) -> (MailDomainStatus, Vec<DomainEvent>) {
    not_ready(md, invalid.reason, &invalid.message, now)
}

/// The status of a pooled MailDomain its pool does not accept: `Accepted` and `Ready` false
/// with the attach reason (`PoolNotFound`, `NotAllowedByPool`).
pub fn not_accepted(
    md: &MailDomain,
    reason: &str,
    message: &str,
    now: UnixSeconds,
) -> (MailDomainStatus, Vec<DomainEvent>) {
    let (mut status, events) = not_ready(md, reason, message, now);
    let accepted = condition(
        &status.conditions,
        ACCEPTED,
        false,
        reason,
        message.to_owned(),
        md.metadata.generation,
        now,
    );
    status.conditions.retain(|c| c.type_ != ACCEPTED);
    status.conditions.push(accepted);
    status.ready_replicas = 0;
    status.replicas = 0;
    (status, events)
}

/// The status of a later claim of a domain (see [`super::ownership`]): `Ready` false with
/// reason `DomainConflict`, and nothing that describes served mail (no DNS records, no
/// selectors, no certificate, no ready pods), since this MailDomain serves none.
pub fn conflict(
    md: &MailDomain,
    message: &str,
    now: UnixSeconds,
) -> (MailDomainStatus, Vec<DomainEvent>) {
    let (status, events) = not_ready(md, super::ownership::DOMAIN_CONFLICT, message, now);
    let ready = status
        .conditions
        .into_iter()
        .filter(|c| c.type_ == READY)
        .collect();
    (
        MailDomainStatus {
            observed_generation: status.observed_generation,
            conditions: ready,
            ..MailDomainStatus::default()
        },
        events,
    )
}

/// The status when a reconcile failed half-way (transient): `Ready` false, reason
/// `ReconcileFailed`.
pub fn failed(
    md: &MailDomain,
    message: &str,
    now: UnixSeconds,
) -> (MailDomainStatus, Vec<DomainEvent>) {
    not_ready(md, "ReconcileFailed", message, now)
}

/// The status when the finalizer could not clean up: `Ready` false, reason `CleanupFailed`;
/// the object stays until cleanup succeeds.
pub fn cleanup_failed(
    md: &MailDomain,
    message: &str,
    now: UnixSeconds,
) -> (MailDomainStatus, Vec<DomainEvent>) {
    not_ready(md, "CleanupFailed", message, now)
}

/// The status while the finalizer waits for the pods to stop: `Ready` false, reason
/// `Terminating`.
pub fn terminating(
    md: &MailDomain,
    message: &str,
    now: UnixSeconds,
) -> (MailDomainStatus, Vec<DomainEvent>) {
    let (status, mut events) = not_ready(md, "Terminating", message, now);
    // Terminating is expected, not a warning.
    events.iter_mut().for_each(|e| e.warning = false);
    (status, events)
}

fn not_ready(
    md: &MailDomain,
    reason: &str,
    message: &str,
    now: UnixSeconds,
) -> (MailDomainStatus, Vec<DomainEvent>) {
    let mut status = md.status.clone().unwrap_or_default();
    let ready = condition(
        &status.conditions,
        READY,
        false,
        reason,
        message.to_owned(),
        md.metadata.generation,
        now,
    );
    let mut events = Vec::new();
    let before = status.conditions.iter().find(|c| c.type_ == READY);
    if before.map(|c| (c.status.as_str(), c.reason.as_str())) != Some(("False", reason)) {
        events.push(DomainEvent {
            warning: true,
            reason: reason.to_owned(),
            action: "Reconcile".into(),
            note: message.to_owned(),
        });
    }
    status.conditions.retain(|c| c.type_ != READY);
    status.conditions.insert(0, ready);
    status.observed_generation = md.metadata.generation;
    (status, events)
}

/// Patches the status (server-side apply) when it differs, then publishes the events.
pub async fn publish(
    ctx: &Context,
    md: &MailDomain,
    status: MailDomainStatus,
    events: Vec<DomainEvent>,
) -> Result<(), Error> {
    // `DnsPublished` is the DNS check's (its own field manager): left out here, it is
    // neither removed nor overwritten with what this reconcile read.
    let without_dns_check = |mut s: MailDomainStatus| {
        s.conditions
            .retain(|c| c.type_ != crate::dns_check::DNS_PUBLISHED);
        s
    };
    let current = md.status.clone().map(without_dns_check);
    let status = without_dns_check(status);
    crate::controller::apply_status(ctx, md, current.as_ref(), &status).await?;
    let reference = md.object_ref(&());
    for e in events {
        let event = Event {
            type_: if e.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: e.reason,
            note: Some(e.note),
            action: e.action,
            secondary: None,
        };
        if let Err(err) = ctx.recorder.publish(&event, &reference).await {
            // Events are for people; failing to record one must not fail the reconcile.
            tracing::warn!(error = %err, "cannot publish an event");
        }
    }
    Ok(())
}

fn cert_status_false(c: &Condition) -> bool {
    c.status != "True"
}

fn display_list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}
