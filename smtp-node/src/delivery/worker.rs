//! One queue entry, from pull to acknowledgement.
//!
//! 1. Read the envelope and retry state from the headers ([`QueueEntry`]). Unusable
//!    headers: log, count, `term` (there is no sender to tell).
//! 2. Not due yet (`Kubemail-Not-Before` in the future): `nak` with the remaining delay.
//! 3. **Poison check** ([`is_poison`]): if this is the second-to-last delivery JetStream
//!    will make (`max_deliver`), earlier workers died or panicked on this entry every time (a
//!    retry is a new entry, so only crashes, restarts and a retry's one early pull count). It
//!    is not attempted again: every recipient fails with `5.3.0`, the sender gets a bounce,
//!    the entry is termed. The last delivery stays spare in case queueing that bounce fails.
//! 4. Otherwise attempt delivery in one `delivery.attempt` span whose OpenTelemetry parent
//!    is the entry's `traceparent` (the accepting transaction's span; see
//!    [`crate::telemetry`]), so every attempt, on any pod and however late, joins the
//!    message's trace: load the body (inline or from the object store), group recipients by
//!    route, deliver the groups in parallel, one outcome per recipient. While this runs a
//!    progress ack goes out every third of `ackWait`, so a slow remote (up to 10 minutes
//!    for the final reply) never makes the server hand the entry to another worker. A panic
//!    is caught at this boundary and the entry is nak'd (and counts towards the poison
//!    limit).
//! 5. Decide with [`outcome::plan`]: queue the bounce for failed recipients (never for a
//!    null sender), the optional delay notice, republish the deferred recipients with their
//!    retry time, then ack (or term when everything failed) and delete a large body from the
//!    object store once no recipient is left. Every publish comes before the ack, so a crash
//!    repeats work but never loses a recipient.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{AckKind, Message};
use bytes::Bytes;
use futures::FutureExt as _;
use tokio::io::AsyncReadExt as _;
use tracing::Instrument as _;

use super::DeliveryContext;
use super::client::{
    ClientError, ConnectOptions, Credentials, Outgoing, Protocol, SmtpClient, TlsPolicy,
};
use super::dsn::{self, DsnInput, DsnKind};
use super::limits::Checkout;
use super::metrics::{self, DomainLabels};
use super::mx::{self, Target};
use super::outcome::{self, Diagnostic, Disposition, PlanInput, RecipientOutcome};
use super::policy::tlsrpt::SessionResult;
use super::policy::{Check, MessageTls, Planned, ReportPolicy, ResultType};
use super::relay;
use super::route::Route;
use super::{admin, pause, shaping};
use crate::config::{ForwardProtocol, InboundTls};
use crate::events;
use crate::protocol::EnhancedCode;
use crate::queue::{Direction, EntryError, Notice, QueueEntry, QueueId};
use crate::telemetry::propagation;
use kubemail_queue::Action;

/// An entry that comes back this much before its retry time is attempted anyway.
const NOT_BEFORE_SLACK: Duration = Duration::from_millis(250);
/// Publishes (retries, DSNs) are tried this often before the entry is nak'd.
const PUBLISH_ATTEMPTS: u32 = 5;
/// First pause between publish attempts; doubled each time.
const PUBLISH_BACKOFF: Duration = Duration::from_millis(200);
/// Longest delay of a nak after a local failure (NATS trouble, a panic).
const LOCAL_FAILURE_RETRY: Duration = Duration::from_secs(30);

/// Handles one entry pulled from `domain`'s consumer.
pub async fn handle(ctx: &DeliveryContext, domain: &str, message: Message) {
    let delivered = message.info().map(|i| i.delivered).unwrap_or(1).max(1) as u32;
    let entry = match message
        .headers
        .as_ref()
        .ok_or(EntryError::Missing("headers"))
        .and_then(QueueEntry::from_headers)
    {
        Ok(e) => e,
        Err(error) => {
            tracing::error!(%domain, %error, subject = %message.subject, "dropping a queue entry with unusable headers");
            ctx.metrics
                .delivery
                .malformed
                .get_or_create(&DomainLabels {
                    domain: domain.to_owned(),
                })
                .inc();
            ack(&message, AckKind::Term).await;
            return;
        }
    };
    if let Some(not_before) = entry.not_before
        && let Ok(wait) = not_before.duration_since(SystemTime::now())
        && wait > NOT_BEFORE_SLACK
    {
        ack(&message, AckKind::Nak(Some(wait))).await;
        return;
    }
    // A child of the message's transaction span, wherever and whenever it runs: the
    // entry's `traceparent` is its parent (see `crate::telemetry`).
    let span = tracing::info_span!(
        parent: None,
        "delivery.attempt",
        otel.kind = "consumer",
        queue_id = %entry.queue_id,
        trace_id = tracing::field::Empty,
        message_id = entry.message_id.as_deref().unwrap_or(""),
        %domain,
        attempt = entry.attempts + 1,
        delivery = delivered,
        recipients = entry.recipients.len(),
        delivery.outcome = tracing::field::Empty,
        delivery.delivered = tracing::field::Empty,
        delivery.deferred = tracing::field::Empty,
        delivery.failed = tracing::field::Empty,
        delivery.bounce = tracing::field::Empty,
        delivery.retry_in_seconds = tracing::field::Empty,
        delivery.last_error = tracing::field::Empty,
    );
    let traceparent = entry.traceparent.as_deref();
    propagation::set_remote_parent(&span, traceparent);
    propagation::record_trace_id(&span, traceparent.and_then(propagation::trace_id_of));
    process(ctx, domain, &message, entry, delivered)
        .instrument(span)
        .await;
}

async fn process(
    ctx: &DeliveryContext,
    domain: &str,
    message: &Message,
    entry: QueueEntry,
    delivered: u32,
) {
    let started = Instant::now();
    let max_deliver = ctx.config.consumer.max_deliver;
    let mut paused = Vec::new();
    let mut suppressed = Vec::new();
    let (body, outcomes) = if entry.admin.cancelled {
        // Deleted by an operator with a notice: bounce every recipient, attempt nothing.
        let body = with_progress(ctx, message, load_body(ctx, message, &entry))
            .await
            .ok();
        (body, admin::cancelled_outcomes(&entry))
    } else if is_poison(delivered, max_deliver) {
        tracing::error!(
            delivered,
            max_deliver,
            "entry failed on every delivery so far; bouncing it instead of trying again"
        );
        ctx.metrics
            .delivery
            .poison
            .get_or_create(&DomainLabels {
                domain: domain.to_owned(),
            })
            .inc();
        let body = with_progress(ctx, message, load_body(ctx, message, &entry))
            .await
            .ok();
        let d = Diagnostic::local(
            EnhancedCode(5, 3, 0),
            format!(
                "delivery was interrupted {} times (the delivery worker failed); giving up",
                delivered - 1
            ),
        );
        let outcomes = entry
            .recipients
            .iter()
            .map(|r| (r.clone(), RecipientOutcome::Failed(d.clone())))
            .collect();
        (body, outcomes)
    } else {
        // Suppressed recipients are not attempted; they fail with the list's reason.
        let (to_attempt, found) = ctx.suppression.split(&entry).await;
        suppressed = found;
        let attempt = AssertUnwindSafe(attempt(ctx, message, &to_attempt)).catch_unwind();
        let abort = ctx.shutdown.abort_token().clone();
        let result = tokio::select! {
            r = with_progress(ctx, message, attempt) => r,
            _ = abort.cancelled() => {
                tracing::warn!("shutting down during a delivery; the entry goes back to the queue");
                ack(message, AckKind::Nak(None)).await;
                return;
            }
        };
        match result {
            Ok((body, mut outcomes, held_back)) => {
                paused = held_back;
                outcomes.extend(
                    suppressed
                        .iter()
                        .map(|(r, found)| (r.clone(), crate::suppression::outcome(found))),
                );
                (body, outcomes)
            }
            Err(_panic) => {
                tracing::error!("delivery attempt panicked; the entry will be retried");
                ack(message, AckKind::Nak(Some(local_retry(ctx)))).await;
                return;
            }
        }
    };
    ctx.metrics
        .delivery
        .attempt_seconds
        .get_or_create(&DomainLabels {
            domain: domain.to_owned(),
        })
        .observe(started.elapsed().as_secs_f64());
    let finish = finish(
        ctx,
        domain,
        message,
        &entry,
        body,
        outcomes,
        paused,
        &suppressed,
    );
    with_progress(ctx, message, finish).await;
}

/// Whether delivery `delivered` (1-based) of an entry is the one to give up on: the
/// second-to-last JetStream will make, leaving the last one spare in case queueing the bounce
/// fails. Earlier deliveries were attempts that never finished (a crash, a kill, a panic)
/// or, for a retry, the one early pull that is nak'd until its time; with the minimum
/// `maxDeliver` of 4 every entry gets at least one real attempt.
pub fn is_poison(delivered: u32, max_deliver: u32) -> bool {
    delivered.saturating_add(1) >= max_deliver
}

/// Runs `work`, sending a progress ack every third of the ack wait so the server keeps the
/// entry with this worker however long the work takes.
async fn with_progress<T>(
    ctx: &DeliveryContext,
    message: &Message,
    work: impl Future<Output = T>,
) -> T {
    let period = (ctx.config.consumer.ack_wait.0 / 3).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(work);
    loop {
        tokio::select! {
            result = &mut work => return result,
            _ = tick.tick() => {
                if let Err(error) = message.ack_with(AckKind::Progress).await {
                    tracing::debug!(%error, "progress ack failed");
                }
            }
        }
    }
}

/// One attempt: the body (if it could be read), one outcome per recipient attempted, and the
/// recipients a delivery pause holds back (not attempted).
async fn attempt(
    ctx: &DeliveryContext,
    message: &Message,
    entry: &QueueEntry,
) -> (
    Option<Bytes>,
    Vec<(String, RecipientOutcome)>,
    Vec<pause::Paused>,
) {
    let body = match load_body(ctx, message, entry).await {
        Ok(b) => b,
        Err(BodyError::Missing(what)) => {
            tracing::error!(%what, "message body is missing from the queue store");
            let d = Diagnostic::local(
                EnhancedCode(5, 3, 0),
                "the message body was lost from the queue store",
            );
            return (
                None,
                all(&entry.recipients, RecipientOutcome::Failed(d)),
                Vec::new(),
            );
        }
        Err(BodyError::Unavailable(what)) => {
            tracing::warn!(%what, "cannot read the message body now");
            let d = Diagnostic::local(
                EnhancedCode(4, 3, 0),
                format!("cannot read the message body: {what}"),
            );
            return (
                None,
                all(&entry.recipients, RecipientOutcome::Deferred(d)),
                Vec::new(),
            );
        }
    };
    let groups = ctx
        .domains()
        .routing
        .group(entry.direction, &entry.domain, &entry.recipients);
    let (groups, paused) = pause::split(ctx, entry, groups).await;
    let deliveries = groups
        .iter()
        .map(|(route, rcpts)| deliver_group(ctx, entry, route, rcpts, &body));
    let results = futures::future::join_all(deliveries).await;
    (Some(body), results.into_iter().flatten().collect(), paused)
}

#[derive(Debug)]
enum BodyError {
    Missing(String),
    Unavailable(String),
}

async fn load_body(
    ctx: &DeliveryContext,
    message: &Message,
    entry: &QueueEntry,
) -> Result<Bytes, BodyError> {
    let Some(reference) = &entry.body_ref else {
        return Ok(message.payload.clone());
    };
    let Some((bucket, name)) = kubemail_queue::split_body_ref(reference) else {
        return Err(BodyError::Missing(format!(
            "invalid body reference {reference:?}"
        )));
    };
    let store = ctx
        .object_store(bucket)
        .await
        .map_err(|e| BodyError::Unavailable(format!("object store {bucket}: {e}")))?;
    let mut object = match store.get(name).await {
        Ok(o) => o,
        Err(e) if e.kind() == async_nats::jetstream::object_store::GetErrorKind::NotFound => {
            return Err(BodyError::Missing(reference.clone()));
        }
        Err(e) => return Err(BodyError::Unavailable(format!("{reference}: {e}"))),
    };
    // The entry carries what comes before the object: nothing, or the header section of a
    // body stored while it arrived.
    let mut body = Vec::with_capacity(entry.body_size.unwrap_or(0).min(64 << 20) as usize);
    body.extend_from_slice(&message.payload);
    object
        .read_to_end(&mut body)
        .await
        .map_err(|e| BodyError::Unavailable(format!("{reference}: {e}")))?;
    Ok(Bytes::from(body))
}

fn all(recipients: &[String], outcome: RecipientOutcome) -> Vec<(String, RecipientOutcome)> {
    recipients
        .iter()
        .map(|r| (r.clone(), outcome.clone()))
        .collect()
}

/// Delivers one group of recipients that share a route.
async fn deliver_group(
    ctx: &DeliveryContext,
    entry: &QueueEntry,
    route: &Route,
    rcpts: &[String],
    body: &Bytes,
) -> Vec<(String, RecipientOutcome)> {
    deliver_route(ctx, entry, route, rcpts, body)
        .instrument(tracing::info_span!(
            "delivery.route",
            %route,
            recipients = rcpts.len()
        ))
        .await
}

async fn deliver_route(
    ctx: &DeliveryContext,
    entry: &QueueEntry,
    route: &Route,
    rcpts: &[String],
    body: &Bytes,
) -> Vec<(String, RecipientOutcome)> {
    let deferred = |status: EnhancedCode, text: String| {
        all(
            rcpts,
            RecipientOutcome::Deferred(Diagnostic::local(status, text)),
        )
    };
    match route {
        Route::Unroutable {
            status,
            text,
            permanent,
        } => {
            let d = Diagnostic::local(EnhancedCode(status.0, status.1, status.2), text.clone());
            all(
                rcpts,
                if *permanent {
                    RecipientOutcome::Failed(d)
                } else {
                    RecipientOutcome::Deferred(d)
                },
            )
        }
        Route::Mx { domain } => {
            let lookup = tracing::info_span!(
                "delivery.mx_lookup",
                %domain,
                mx.targets = tracing::field::Empty,
                error = tracing::field::Empty,
            );
            let resolved = mx::resolve_targets(
                ctx.resolver.as_ref(),
                domain,
                ctx.config.mx_port,
                &ctx.policy,
            )
            .instrument(lookup.clone())
            .await;
            match &resolved {
                Ok(t) => {
                    let hosts: Vec<String> =
                        t.iter().map(|t| format!("{} {}", t.host, t.addr)).collect();
                    lookup.record("mx.targets", hosts.join(", ").as_str());
                }
                Err(e) => {
                    lookup.record("error", e.to_string().as_str());
                }
            }
            let targets = match resolved {
                Ok(t) => t,
                Err(e) => {
                    tracing::info!(%domain, error = %e, "no MX target");
                    let d = Diagnostic::local(e.status().1, e.to_string());
                    return all(
                        rcpts,
                        if e.is_permanent() {
                            RecipientOutcome::Failed(d)
                        } else {
                            RecipientOutcome::Deferred(d)
                        },
                    );
                }
            };
            // Choose the TLS policy for these targets (MTA-STS, DANE, overrides, REQUIRETLS).
            let message = MessageTls {
                require_tls: entry.require_tls,
                tls_optional: entry.tls_optional,
            };
            let planned = match ctx.policies.plan(domain, targets, message).await {
                Ok(p) => p,
                Err(refusal) => {
                    tracing::info!(%domain, reason = %refusal.diagnostic.summary(), "no MX host meets the TLS policy");
                    if let Some((report, result)) = refusal.report {
                        record_tls(
                            ctx,
                            entry,
                            &report,
                            result,
                            None,
                            Some(refusal.diagnostic.text.clone()),
                        )
                        .await;
                    }
                    return all(
                        rcpts,
                        if refusal.permanent {
                            RecipientOutcome::Failed(refusal.diagnostic)
                        } else {
                            RecipientOutcome::Deferred(refusal.diagnostic)
                        },
                    );
                }
            };
            send_via(
                ctx,
                entry,
                route,
                &planned,
                Protocol::Smtp,
                None,
                rcpts,
                body,
                domain,
            )
            .await
        }
        Route::Relay { domain } => {
            let table = ctx.domains();
            let Some(relay) = table.relays.get(domain) else {
                return deferred(
                    EnhancedCode(4, 3, 5),
                    format!("no relay is configured for {domain}"),
                );
            };
            let credentials = match relay.credentials() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(relay = %relay.config.name, error = %e, "cannot read relay credentials");
                    return deferred(
                        EnhancedCode(4, 3, 5),
                        "relay credentials are not readable".to_owned(),
                    );
                }
            };
            let targets = match relay.targets().await {
                Ok(t) if !t.is_empty() => t,
                Ok(_) => {
                    return deferred(
                        EnhancedCode(4, 4, 3),
                        format!("relay host {} has no address", relay.config.host),
                    );
                }
                Err(e) => {
                    return deferred(
                        EnhancedCode(4, 4, 3),
                        format!("cannot resolve relay host {}: {e}", relay.config.host),
                    );
                }
            };
            let verify = relay.config.verify_certificate;
            if entry.require_tls && (relay.tls_policy() == TlsPolicy::Opportunistic || !verify) {
                // RFC 8689 4.2.1: a REQUIRETLS message needs verified TLS to the relay too.
                return all(
                    rcpts,
                    RecipientOutcome::Failed(Diagnostic::local(
                        EnhancedCode(5, 7, 10),
                        format!(
                            "REQUIRETLS: the relay {} is not used with verified TLS",
                            relay.config.name
                        ),
                    )),
                );
            }
            relay.wait_for_turn().await;
            let planned = uniform(targets, relay.tls_policy(), verify);
            send_via(
                ctx,
                entry,
                route,
                &planned,
                Protocol::Smtp,
                credentials.as_ref(),
                rcpts,
                body,
                domain,
            )
            .await
        }
        Route::Inbound { domain } => {
            let Some(target) = ctx
                .domains()
                .routing
                .domain(domain)
                .and_then(|d| d.inbound.clone())
            else {
                return deferred(
                    EnhancedCode(4, 3, 5),
                    format!("no inbound target is configured for {domain}"),
                );
            };
            let targets = match relay::resolve_configured(&target.host, target.port).await {
                Ok(t) if !t.is_empty() => t,
                Ok(_) => {
                    return deferred(
                        EnhancedCode(4, 4, 3),
                        format!("inbound target {} has no address", target.host),
                    );
                }
                Err(e) => {
                    return deferred(
                        EnhancedCode(4, 4, 3),
                        format!("cannot resolve inbound target {}: {e}", target.host),
                    );
                }
            };
            let protocol = match target.protocol {
                ForwardProtocol::Lmtp => Protocol::Lmtp,
                ForwardProtocol::Smtp => Protocol::Smtp,
            };
            let (tls, verify) = match target.tls {
                InboundTls::Opportunistic => (TlsPolicy::Opportunistic, false),
                InboundTls::Required => (TlsPolicy::Required, true),
                InboundTls::None => (TlsPolicy::None, false),
            };
            let planned = uniform(targets, tls, verify);
            send_via(
                ctx, entry, route, &planned, protocol, None, rcpts, body, domain,
            )
            .await
        }
    }
}

/// Sends to the first target that takes the transaction; reuses an idle connection to the
/// same destination first (when it is as protected as this message needs). Recipients are
/// deferred with the last error when no target works; bounced when every target failed the
/// message's REQUIRETLS demands.
#[allow(clippy::too_many_arguments)]
async fn send_via(
    ctx: &DeliveryContext,
    entry: &QueueEntry,
    route: &Route,
    targets: &[Planned],
    protocol: Protocol,
    credentials: Option<&Credentials>,
    rcpts: &[String],
    body: &Bytes,
    next_hop: &str,
) -> Vec<(String, RecipientOutcome)> {
    let outgoing = Outgoing {
        mail_from: &entry.mail_from,
        recipients: rcpts,
        body,
        eight_bit: entry.eight_bit,
        smtputf8: entry.smtputf8,
        require_tls: entry.require_tls,
    };
    let zip = |outcomes: Vec<RecipientOutcome>, client: &SmtpClient| {
        let peer = peer_of(client);
        rcpts
            .iter()
            .cloned()
            .zip(outcomes.into_iter().map(|o| o.with_peer(&peer)))
            .collect::<Vec<(String, RecipientOutcome)>>()
    };
    // REQUIRETLS is a relaying matter (RFC 8689 4.2); the final hop to our own store is not.
    let require_tls = entry.require_tls && !matches!(route, Route::Inbound { .. });
    let must_verify = require_tls || targets.iter().any(|p| p.enforce);
    let mut last: Option<Diagnostic> = None;
    let mut only_requiretls_failures = true;
    // Cluster-wide connection and rate limits of this destination (`super::shaping`).
    let hosts: Vec<&str> = targets.iter().map(|p| p.target.host.as_str()).collect();
    let dest = ctx.shaper.destination(route, &hosts);
    let dest = dest.as_ref();
    let mut permit = match ctx.pool.checkout(route).await {
        Checkout::Reused(mut client, permit, idle) => {
            let fits = !must_verify
                || (client.is_verified()
                    && targets
                        .iter()
                        .any(|p| p.target.host == client.target().host)
                    && (!require_tls || client.capabilities().requiretls));
            // Whether the RSET was skipped; `None`: not usable for this message.
            let unchecked = if fits {
                client.prepare_reuse(idle).await.ok()
            } else {
                None
            };
            if let Some(unchecked) = unchecked {
                if let Err(d) = shaping::before_send(&ctx.shaper, dest).await {
                    ctx.pool.checkin(route, *client, permit).await;
                    return all(rcpts, RecipientOutcome::Deferred(d));
                }
                match client.send(&outgoing).await {
                    Ok(outcomes) => {
                        log_outcomes(client.target(), rcpts, &outcomes, true);
                        shaping::after(&ctx.shaper, dest, outcomes.iter().filter_map(diagnostic))
                            .await;
                        let outcomes = zip(outcomes, &client);
                        ctx.pool.checkin(route, *client, permit).await;
                        return outcomes;
                    }
                    // Gone while idle: what the skipped RSET would have found. Nothing
                    // was committed; a new connection follows.
                    Err(e) if unchecked && e.is_connection_lost() => {
                        tracing::debug!(host = %client.target().host, error = %e, "pooled connection closed by the server; connecting again");
                        client.quit().await;
                    }
                    Err(e) => {
                        tracing::info!(host = %client.target().host, error = %e, "reused connection failed");
                        let d = e.diagnostic(&client.target().host);
                        shaping::after(&ctx.shaper, dest, [&d]).await;
                        last = Some(d);
                        only_requiretls_failures = false;
                        client.quit().await;
                    }
                }
            } else {
                client.quit().await;
            }
            permit
        }
        Checkout::Fresh(permit) => permit,
    };
    if let Err(d) = shaping::connect_slot(&ctx.shaper, dest, &mut permit).await {
        return all(rcpts, RecipientOutcome::Deferred(d));
    }
    for planned in targets {
        let target = &planned.target;
        let options = ConnectOptions {
            target,
            helo: &ctx.hostname,
            protocol,
            tls: planned.tls,
            verify_certificate: planned.verify_certificate,
            credentials,
            timeouts: &ctx.config.timeouts,
            tls_config: &ctx.tls,
            check: &planned.check,
            enforce: planned.enforce,
            next_hop,
        };
        let mut client = match connect(&options).await {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(host = %target.host, addr = %target.addr, error = %e, "cannot use host");
                if let Some(report) = &planned.report {
                    let result = match &e {
                        ClientError::TlsPolicy(f) => Some(f.result),
                        ClientError::TlsUnavailable(_) => Some(ResultType::StarttlsNotSupported),
                        ClientError::Tls(_) | ClientError::StartTlsInjection => {
                            Some(ResultType::ValidationFailure)
                        }
                        _ => None,
                    };
                    if let Some(result) = result {
                        record_tls(
                            ctx,
                            entry,
                            report,
                            result,
                            Some(target),
                            Some(e.to_string()),
                        )
                        .await;
                    }
                }
                let d = e.diagnostic(&target.host);
                shaping::after(&ctx.shaper, dest, [&d]).await;
                last = Some(d);
                only_requiretls_failures = false;
                continue;
            }
        };
        if let Some(report) = &planned.report {
            let (result, reason) = match (client.tls_failure(), planned.known_failure) {
                (Some(f), _) => (f.result, Some(f.reason.clone())),
                (None, Some(known)) => (known, None),
                (None, None) if client.tls_info().is_none() => {
                    (ResultType::StarttlsNotSupported, None)
                }
                (None, None) => (ResultType::Success, None),
            };
            record_tls(ctx, entry, report, result, Some(target), reason).await;
        }
        if require_tls {
            // RFC 8689 4.2.1: verified TLS, and a server that promises to keep it up.
            let refusal = if !client.is_verified() {
                Some((
                    EnhancedCode(5, 7, 10),
                    "the server's certificate was not verified",
                ))
            } else if !client.capabilities().requiretls {
                Some((
                    EnhancedCode(5, 7, 30),
                    "the server does not support REQUIRETLS",
                ))
            } else {
                None
            };
            if let Some((status, why)) = refusal {
                tracing::info!(host = %target.host, reason = why, "REQUIRETLS not satisfied");
                let mut d = Diagnostic::local(status, format!("REQUIRETLS: {why}"));
                d.remote_mta = Some(target.host.clone());
                last = Some(d);
                client.quit().await;
                continue;
            }
        }
        if let Err(d) = shaping::before_send(&ctx.shaper, dest).await {
            ctx.pool.checkin(route, client, permit).await;
            return all(rcpts, RecipientOutcome::Deferred(d));
        }
        match client.send(&outgoing).await {
            Ok(outcomes) => {
                log_outcomes(target, rcpts, &outcomes, false);
                shaping::after(&ctx.shaper, dest, outcomes.iter().filter_map(diagnostic)).await;
                let outcomes = zip(outcomes, &client);
                ctx.pool.checkin(route, client, permit).await;
                return outcomes;
            }
            Err(e) => {
                tracing::info!(host = %target.host, addr = %target.addr, error = %e, "transaction failed; trying the next host");
                let d = e.diagnostic(&target.host);
                shaping::after(&ctx.shaper, dest, [&d]).await;
                last = Some(d);
                only_requiretls_failures = false;
                client.quit().await;
            }
        }
    }
    drop(permit);
    match last {
        Some(d) if require_tls && only_requiretls_failures && d.status.0 == 5 => {
            all(rcpts, RecipientOutcome::Failed(d))
        }
        last => {
            let d = last.unwrap_or_else(|| {
                Diagnostic::local(EnhancedCode(4, 4, 1), "no host could be reached")
            });
            all(rcpts, RecipientOutcome::Deferred(d))
        }
    }
}

/// The connection's remote side, for events.
fn peer_of(client: &SmtpClient) -> outcome::Peer {
    outcome::Peer {
        host: client.target().host.clone(),
        ip: Some(client.target().addr.ip()),
        tls: client.tls_info().cloned(),
        verified: client.is_verified(),
    }
}

/// The diagnostic of a recipient that was not delivered.
fn diagnostic(outcome: &RecipientOutcome) -> Option<&Diagnostic> {
    match outcome {
        RecipientOutcome::Delivered { .. } => None,
        RecipientOutcome::Deferred(d) | RecipientOutcome::Failed(d) => Some(d),
    }
}

/// The same TLS settings for every target (relays, inbound targets).
fn uniform(targets: Vec<Target>, tls: TlsPolicy, verify: bool) -> Vec<Planned> {
    targets
        .into_iter()
        .map(|target| Planned {
            target,
            tls,
            verify_certificate: verify,
            check: Check::None,
            enforce: false,
            report: None,
            known_failure: None,
        })
        .collect()
}

/// Records one TLS-RPT session result of the entry's sending domain.
async fn record_tls(
    ctx: &DeliveryContext,
    entry: &QueueEntry,
    report: &ReportPolicy,
    result: ResultType,
    target: Option<&Target>,
    reason: Option<String>,
) {
    ctx.tlsrpt
        .record(
            &entry.domain,
            SessionResult {
                policy: report.clone(),
                result,
                sending_mta_ip: None,
                receiving_mx_hostname: target.map(|t| t.host.clone()),
                receiving_ip: target.map(|t| t.addr.ip().to_string()),
                failure_reason_code: reason
                    .filter(|_| result != ResultType::Success)
                    .map(|r| r.chars().take(200).collect()),
            },
        )
        .await;
}

/// Connects; for opportunistic TLS a failed handshake is retried once in plaintext (the
/// handshake failing is no reason to keep the mail back when plaintext was acceptable).
async fn connect(options: &ConnectOptions<'_>) -> Result<SmtpClient, ClientError> {
    match SmtpClient::connect(options).await {
        Err(ClientError::Tls(reason)) if options.tls == TlsPolicy::Opportunistic => {
            tracing::info!(host = %options.target.host, %reason, "opportunistic TLS failed; retrying without TLS");
            let plain = ConnectOptions {
                tls: TlsPolicy::None,
                ..*options
            };
            SmtpClient::connect(&plain).await
        }
        other => other,
    }
}

fn log_outcomes(target: &Target, rcpts: &[String], outcomes: &[RecipientOutcome], reused: bool) {
    for (rcpt, outcome) in rcpts.iter().zip(outcomes) {
        match outcome {
            RecipientOutcome::Delivered { reply, .. } => {
                tracing::info!(recipient = %rcpt, host = %target.host, addr = %target.addr, reused, reply = %reply, "delivered");
            }
            RecipientOutcome::Deferred(d) => {
                tracing::info!(recipient = %rcpt, host = %target.host, reason = %d.summary(), "deferred");
            }
            RecipientOutcome::Failed(d) => {
                tracing::info!(recipient = %rcpt, host = %target.host, reason = %d.summary(), "failed");
            }
        }
    }
}

/// Acts on the outcomes: events, bounce, delay notice, republish (with the recipients a pause
/// holds back), ack. `outcomes` include the `suppressed` recipients' failures.
#[allow(clippy::too_many_arguments)]
async fn finish(
    ctx: &DeliveryContext,
    domain: &str,
    message: &Message,
    entry: &QueueEntry,
    body: Option<Bytes>,
    outcomes: Vec<(String, RecipientOutcome)>,
    paused: Vec<pause::Paused>,
    suppressed: &[(String, kubemail_queue::suppression::SuppressionEntry)],
) {
    let now = SystemTime::now();
    if !paused.is_empty() {
        ctx.metrics
            .delivery
            .paused
            .get_or_create(&DomainLabels {
                domain: domain.to_owned(),
            })
            .inc_by(paused.len() as u64);
    }
    if outcomes.is_empty() && !paused.is_empty() {
        // Only paused recipients: no attempt was made, none is counted.
        let at = pause::next_check(ctx, &paused, None, now);
        let next = pause::waiting_entry(entry, entry.recipients.clone(), &paused, at, now);
        let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        tracing::Span::current().record("delivery.outcome", "paused");
        tracing::info!(pause = %paused[0].pause, recipients = paused.len(), next_check = ?at.duration_since(now).unwrap_or_default(), "held back by a delivery pause");
        republish(
            ctx,
            message,
            entry,
            next,
            &entry.action_msg_id(Action::Pause, sequence),
        )
        .await;
        return;
    }
    // Suppressed recipients alone are no attempt: the paused rest keeps its attempt count.
    let attempted = outcomes.len() > suppressed.len();
    let delivered_info = events::attempt::delivered_of(&outcomes);
    let retry = ctx.retry_config(&entry.domain);
    let plan = outcome::plan(
        outcomes,
        PlanInput {
            retry: &retry,
            accepted_at: entry.accepted_at + entry.admin.suspended,
            attempt: entry.attempts + 1,
            now,
            null_sender: entry.is_null_sender(),
            may_notify: may_notify(entry),
            delay_warned: entry.delay_warned,
            jitter: rand::random::<f64>(),
        },
    );
    let m = &ctx.metrics.delivery;
    // Per remote domain first: whoever saw the per-domain totals move finds these moved too.
    for rcpt in &plan.delivered {
        m.count_remote(domain, rcpt, "delivered");
    }
    for (rcpt, _) in &plan.deferred {
        m.count_remote(domain, rcpt, "deferred");
    }
    for (rcpt, _) in &plan.failed {
        m.count_remote(
            domain,
            rcpt,
            if plan.bounce { "bounced" } else { "dropped" },
        );
    }
    m.count(domain, "delivered", plan.delivered.len());
    m.count(domain, "deferred", plan.deferred.len());
    record_outcome(&tracing::Span::current(), &plan);
    let mut batch = events::Batch::new(&ctx.events, entry, now);
    events::attempt::record(ctx, &mut batch, entry, &delivered_info, &plan, suppressed).await;
    if entry.direction == Direction::Inbound
        && entry.attempts == 0
        && let Some(body) = &body
    {
        batch.extend(events::inbound::events(ctx, entry, body).await);
    }
    for (rcpt, d) in &plan.failed {
        tracing::warn!(recipient = %rcpt, reason = %d.summary(), bounce = plan.bounce, "delivery failed permanently");
    }
    if plan.bounce {
        m.count(domain, "bounced", plan.failed.len());
        if let Err(error) = publish_dsn(
            ctx,
            entry,
            DsnKind::Failure,
            &plan.failed,
            body.as_deref(),
            None,
        )
        .await
        {
            tracing::error!(%error, "cannot queue the bounce; the entry will be retried");
            ack(message, AckKind::Nak(Some(local_retry(ctx)))).await;
            return;
        }
        for (rcpt, _) in &plan.failed {
            batch.dsn_sent(rcpt, "failure");
        }
    } else {
        // A null sender (a bounce is never bounced), or one that was not authenticated and
        // may be forged: nobody to tell.
        m.count(domain, "dropped", plan.failed.len());
        if !plan.failed.is_empty() && !entry.is_null_sender() {
            tracing::warn!(sender = %entry.mail_from, "no bounce: the sender passed neither SPF nor DKIM when the message was accepted");
        }
    }
    let mut delay_warned = entry.delay_warned;
    if plan.delay_notice {
        let until = entry.expires_at(super::retry::lifetime(&retry, false));
        match publish_dsn(
            ctx,
            entry,
            DsnKind::Delay,
            &plan.deferred,
            body.as_deref(),
            Some(until),
        )
        .await
        {
            Ok(()) => {
                delay_warned = true;
                for (rcpt, _) in &plan.deferred {
                    batch.dsn_sent(rcpt, "delay");
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot queue the delay notice; will try at the next attempt")
            }
        }
    }
    // Before the republish and the ack: a crash from here on repeats the events (same ids),
    // never loses them.
    batch.publish().await;
    let retry_at = match plan.disposition {
        Disposition::Deferred { retry_at, .. } => Some(retry_at),
        Disposition::Done | Disposition::Failed => None,
    };
    if retry_at.is_some() || !paused.is_empty() {
        let mut recipients: Vec<String> = plan.deferred.iter().map(|(r, _)| r.clone()).collect();
        recipients.extend(paused.iter().map(|p| p.recipient.clone()));
        let mut next = QueueEntry {
            recipients,
            attempts: entry.attempts + u32::from(attempted),
            not_before: retry_at,
            last_error: plan
                .deferred
                .first()
                .map(|(_, d)| d.summary())
                .or_else(|| entry.last_error.clone()),
            delay_warned,
            ..entry.clone()
        };
        next.admin.paused_by = None;
        if let Some((_, d)) = plan.deferred.first() {
            next.admin.log_attempt(now, &d.summary());
        }
        if !paused.is_empty() {
            let at = pause::next_check(ctx, &paused, retry_at, now);
            let recipients = next.recipients.clone();
            next = pause::waiting_entry(&next, recipients, &paused, at, now);
        }
        let retry_in = next
            .not_before
            .and_then(|t| t.duration_since(now).ok())
            .unwrap_or_default();
        // Without an attempt the attempt count (and so the usual id) stays the same: the new
        // entry gets the id a pause's republish gets.
        let msg_id = if attempted {
            next.msg_id()
        } else {
            let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
            entry.action_msg_id(Action::Pause, sequence)
        };
        if !republish(ctx, message, entry, next.clone(), &msg_id).await {
            return;
        }
        m.retries
            .get_or_create(&DomainLabels {
                domain: domain.to_owned(),
            })
            .inc();
        tracing::Span::current().record("delivery.retry_in_seconds", retry_in.as_secs());
        tracing::info!(remaining = next.recipients.len(), paused = paused.len(), retry_in = ?retry_in, "deferred");
        return;
    }
    match plan.disposition {
        Disposition::Deferred { .. } => {}
        Disposition::Done => settle(ctx, message, entry, AckKind::Ack).await,
        Disposition::Failed => settle(ctx, message, entry, AckKind::Term).await,
    }
}

/// Whether the entry's sender may get delivery status notifications: always for submitted
/// mail (our own user); for inbound mail only when its sender passed SPF or an aligned DKIM
/// signature at acceptance, since anyone can put someone else's address in MAIL FROM and a
/// bounce would then spam that victim (backscatter).
pub fn may_notify(entry: &QueueEntry) -> bool {
    match entry.direction {
        Direction::Outbound => true,
        Direction::Inbound => entry.sender_auth.is_some_and(|a| a.verified()),
    }
}

/// Publishes `next` (the rest of `entry`) as `msg_id` and acks the old entry; returns
/// whether that happened. When an operator replaced or deleted the old entry during the
/// attempt, its replacement is the entry from now on and nothing is republished.
async fn republish(
    ctx: &DeliveryContext,
    message: &Message,
    entry: &QueueEntry,
    next: QueueEntry,
    msg_id: &str,
) -> bool {
    if admin::replaced_meanwhile(ctx, message, entry).await {
        tracing::info!(
            "the entry was changed by an operator during the attempt; keeping their version"
        );
        confirm_ack(message, AckKind::Ack).await;
        return false;
    }
    let headers = next.to_headers(msg_id);
    if let Err(error) = publish(ctx, &entry.domain, headers, message.payload.clone()).await {
        tracing::error!(%error, "cannot queue the retry; the entry will be retried as a whole");
        ack(message, AckKind::Nak(Some(local_retry(ctx)))).await;
        return false;
    }
    confirm_ack(message, AckKind::Ack).await;
    true
}

/// Records the attempt's result on its span: what a reader of the trace looks for first.
fn record_outcome(span: &tracing::Span, plan: &outcome::Plan) {
    let (delivered, deferred, failed) =
        (plan.delivered.len(), plan.deferred.len(), plan.failed.len());
    let outcome = match (delivered > 0, deferred > 0, failed > 0) {
        (true, false, false) => "delivered",
        (false, true, false) => "deferred",
        (false, false, true) => "failed",
        (false, false, false) => "none",
        _ => "partial",
    };
    span.record("delivery.outcome", outcome);
    span.record("delivery.delivered", delivered);
    span.record("delivery.deferred", deferred);
    span.record("delivery.failed", failed);
    span.record("delivery.bounce", plan.bounce);
    if let Some((_, d)) = plan.deferred.first().or(plan.failed.first()) {
        span.record("delivery.last_error", d.summary().as_str());
    }
}

/// Queues a DSN about `recipients` to the entry's sender, DKIM-signed for the entry's
/// domain when keys are configured.
async fn publish_dsn(
    ctx: &DeliveryContext,
    entry: &QueueEntry,
    kind: DsnKind,
    recipients: &[(String, Diagnostic)],
    original: Option<&[u8]>,
    retry_until: Option<SystemTime>,
) -> Result<(), PublishError> {
    let now = SystemTime::now();
    let unique = QueueId::new();
    let dsn = dsn::build(&DsnInput {
        kind,
        reporting_mta: &ctx.hostname,
        from_domain: &entry.domain,
        to: &entry.mail_from,
        queue_id: entry.queue_id.as_str(),
        envid: entry.dsn_envid.as_deref(),
        // RFC 8689 5: a REQUIRETLS message's bounce carries its headers only.
        ret: if entry.require_tls {
            Some("HDRS")
        } else {
            entry.dsn_ret.as_deref()
        },
        arrival: entry.accepted_at,
        now,
        recipients,
        retry_until,
        original,
        // The whole original goes back only to our own senders; anyone else gets its
        // header (a DSN must never carry content to an address that did not write it).
        headers_only: !sender_is_local(ctx, &entry.mail_from),
        original_message_id: entry.message_id.as_deref(),
        size_limit: usize::try_from(ctx.config.bounce_size_limit.0).unwrap_or(usize::MAX),
        unique: unique.as_str(),
    });
    let mut message = dsn.message;
    if let Some(signer) = &ctx.domains().signer {
        match signer.sign_for(&message, &entry.domain) {
            Ok(Some(headers)) => {
                let mut signed = headers.into_bytes();
                signed.extend_from_slice(&message);
                message = signed;
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "cannot DKIM-sign the DSN; sending it unsigned"),
        }
    }
    let dsn_entry = QueueEntry {
        queue_id: unique,
        mail_from: String::new(),
        recipients: vec![entry.mail_from.clone()],
        direction: Direction::Outbound,
        domain: entry.domain.clone(),
        accepted_at: now,
        message_id: Some(dsn.message_id),
        // The report continues the message's trace below the attempt that produced it.
        traceparent: Some(propagation::traceparent(&tracing::Span::current())),
        auth_user: None,
        client_ip: None,
        helo: None,
        sender_auth: None,
        eight_bit: dsn.eight_bit,
        smtputf8: false,
        dsn_envid: None,
        dsn_ret: None,
        body_ref: None,
        body_size: Some(message.len() as u64),
        // RFC 8689 5: the notice about a REQUIRETLS message travels under REQUIRETLS too.
        require_tls: entry.require_tls,
        tls_optional: false,
        attempts: 0,
        not_before: None,
        last_error: None,
        delay_warned: false,
        admin: Default::default(),
    };
    let (notice, tag) = match kind {
        // An operator's delete has an id of its own: the entry's attempt may have queued a
        // bounce of the same attempt number.
        DsnKind::Failure if entry.admin.cancelled => (Notice::Cancel, "cancel"),
        DsnKind::Failure => (Notice::Bounce, "bounce"),
        DsnKind::Delay => (Notice::Delay, "delay"),
    };
    // Deterministic, so a repeated publish of the same report is dropped as a duplicate.
    let msg_id = entry.notice_msg_id(notice);
    publish(
        ctx,
        &entry.domain,
        dsn_entry.to_headers(&msg_id),
        Bytes::from(message),
    )
    .await?;
    ctx.metrics
        .delivery
        .dsns
        .get_or_create(&metrics::DomainResultLabels {
            domain: entry.domain.clone(),
            result: match kind {
                DsnKind::Failure => "failure",
                DsnKind::Delay => "delay",
            },
        })
        .inc();
    tracing::info!(kind = tag, to = %entry.mail_from, recipients = recipients.len(), "queued a delivery status notification");
    Ok(())
}

/// Whether `sender` is an address of one of our domains.
fn sender_is_local(ctx: &DeliveryContext, sender: &str) -> bool {
    sender.rsplit_once('@').is_some_and(|(_, d)| {
        ctx.domains()
            .routing
            .domain(d.trim_end_matches('.'))
            .is_some()
    })
}

/// Why a publish failed after every attempt.
#[derive(Debug, thiserror::Error)]
#[error("publishing to the queue failed {attempts} times: {last}")]
pub struct PublishError {
    attempts: u32,
    last: String,
}

/// Publishes to `domain`'s subject and waits for the acknowledgement, with a few retries.
#[tracing::instrument(
    name = "queue.publish",
    skip_all,
    fields(otel.kind = "producer", messaging.system = "nats", messaging.destination.name = %kubemail_queue::subject(&ctx.nats.subject_prefix, domain))
)]
async fn publish(
    ctx: &DeliveryContext,
    domain: &str,
    headers: async_nats::HeaderMap,
    payload: Bytes,
) -> Result<(), PublishError> {
    let subject = kubemail_queue::subject(&ctx.nats.subject_prefix, domain);
    // Doubling; the attempts are few enough that no cap is reached.
    let mut pause = crate::backoff::delays(PUBLISH_BACKOFF, PUBLISH_BACKOFF * 64);
    let mut last = String::new();
    for attempt in 1..=PUBLISH_ATTEMPTS {
        let result = async {
            ctx.js
                .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(ack) => {
                tracing::debug!(
                    sequence = ack.sequence,
                    duplicate = ack.duplicate,
                    "published"
                );
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(attempt, error = %e, "publish failed");
                last = e;
            }
        }
        if attempt < PUBLISH_ATTEMPTS {
            tokio::time::sleep(pause.next_delay()).await;
        }
    }
    Err(PublishError {
        attempts: PUBLISH_ATTEMPTS,
        last,
    })
}

/// Removes the large body of an entry whose last recipient is done. A failure leaves an
/// orphan object (space, not mail) and is only logged.
async fn delete_body(ctx: &DeliveryContext, entry: &QueueEntry) {
    let Some((bucket, name)) = entry
        .body_ref
        .as_deref()
        .and_then(kubemail_queue::split_body_ref)
    else {
        return;
    };
    match ctx.object_store(bucket).await {
        Ok(store) => {
            if let Err(error) = store.delete(name).await {
                tracing::warn!(%error, object = %name, "cannot delete the message body object");
            }
        }
        Err(error) => tracing::warn!(%error, "cannot open the body bucket to delete a body"),
    }
}

/// Acknowledges an entry whose every recipient is done (`kind`: ack or term). A body in the
/// object store is deleted once the server has confirmed the ack (an entry that may still
/// come back needs it); an inline body needs no confirmation, and the ack goes out without
/// waiting for one: a lost ack brings the entry back after the ack wait, as an unconfirmed
/// one would.
async fn settle(ctx: &DeliveryContext, message: &Message, entry: &QueueEntry, kind: AckKind) {
    if entry.body_ref.is_none() {
        ack(message, kind).await;
    } else if confirm_ack(message, kind).await {
        delete_body(ctx, entry).await;
    }
}

fn local_retry(ctx: &DeliveryContext) -> Duration {
    ctx.config.retry.min_backoff.0.min(LOCAL_FAILURE_RETRY)
}

async fn ack(message: &Message, kind: AckKind) {
    if let Err(error) = message.ack_with(kind).await {
        tracing::warn!(%error, "acknowledgement failed; the entry will come back after the ack wait");
    }
}

/// Acks and waits for the server's confirmation, so that "done" is really recorded before
/// the next step (deleting a body object: an entry that may come back still needs it).
async fn confirm_ack(message: &Message, kind: AckKind) -> bool {
    match message.double_ack_with(kind).await {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(%error, "acknowledgement not confirmed; the entry may be delivered again after the ack wait");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poison_after_the_second_to_last_delivery() {
        // maxDeliver 4: attempts on deliveries 1 and 2, give up on 3, 4 is spare.
        assert!(!is_poison(1, 4));
        assert!(!is_poison(2, 4));
        assert!(is_poison(3, 4));
        assert!(is_poison(4, 4));
        // The default of 10 allows 8 interrupted attempts.
        assert!(!is_poison(8, 10));
        assert!(is_poison(9, 10));
    }
}
