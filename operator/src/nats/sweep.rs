//! The operator's sweep of orphaned body objects (what an orphan is and how a sweep finds it:
//! [`kubemail_queue::sweep`]). With authenticated NATS the nodes' per-domain credentials may
//! not read the queue stream by sequence, so the operator, which manages the JetStream
//! objects, sweeps for them: every [`INTERVAL`] (plus a random part of it, so a new leader does
//! not sweep at once after a failover), every MailDomain's body bucket, one connection per
//! round. Only the leader runs it (it runs beside the controllers).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use kubemail_config::NatsConfig;
use kubemail_queue::sweep::{GRACE, INTERVAL, SweepError, sweep};
use tokio_util::sync::CancellationToken;

use super::{ManageError, NatsAccess};
use crate::controller::Context;

/// Why one domain's bucket was not swept.
#[derive(Debug, thiserror::Error)]
pub enum DomainSweepError {
    #[error("cannot open the body bucket {bucket}")]
    OpenBucket {
        bucket: String,
        #[source]
        source: async_nats::jetstream::context::ObjectStoreError,
    },
    #[error(transparent)]
    Sweep(#[from] SweepError),
}

/// Sweeps the body buckets of `domains` over one connection, objects unmarked for at least
/// `grace`. Returns, per domain, how many objects were deleted or why it was not swept.
pub async fn sweep_domains(
    access: &NatsAccess,
    nats: &NatsConfig,
    domains: &[String],
    grace: Duration,
) -> Result<Vec<(String, Result<usize, DomainSweepError>)>, ManageError> {
    let client = access.connect().await?;
    let mut js = jetstream::new(client);
    js.set_timeout(access.timeout);
    let mut outcomes = Vec::with_capacity(domains.len());
    for domain in domains {
        let bucket = kubemail_queue::body_bucket(&nats.body_bucket, domain);
        let outcome = match js.get_object_store(&bucket).await {
            Ok(store) => sweep(&js, nats, domain, &store, grace)
                .await
                .map_err(DomainSweepError::from),
            Err(source) => Err(DomainSweepError::OpenBucket { bucket, source }),
        };
        outcomes.push((domain.clone(), outcome));
    }
    Ok(outcomes)
}

/// Sweeps every MailDomain's bucket every [`INTERVAL`] until `stop`, when the operator
/// manages the JetStream objects (authenticated NATS); counts what it deletes.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    if !ctx.config.nats.authenticated() {
        return;
    }
    let nats = crate::controller::mail_domain::build::config::queue_nats(&ctx.config.build);
    let domains = || {
        ctx.domains
            .snapshot()
            .iter()
            .map(|md| md.spec.domain.clone())
            .collect()
    };
    let access = || async {
        ctx.nats_access()
            .await
            .map_err(|e| crate::controller::chain(&e))
    };
    let schedule = Schedule {
        interval: INTERVAL,
        grace: GRACE,
    };
    let deleted = |n| ctx.metrics.orphan_bodies_deleted(n);
    run_with(access, &nats, domains, schedule, &stop, deleted).await;
}

/// When sweeps run and what they may delete.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Between two sweeps of every domain (plus up to half of it at random).
    pub interval: Duration,
    /// How long an object stays unmarked before a sweep looks at it.
    pub grace: Duration,
}

/// [`run`]'s loop: every `schedule.interval`, sweeps the body buckets of `domains()` over a
/// connection from `access()`, and reports what it deleted to `deleted`.
pub async fn run_with<A, F>(
    access: impl Fn() -> F,
    nats: &NatsConfig,
    domains: impl Fn() -> Vec<String>,
    schedule: Schedule,
    stop: &CancellationToken,
    deleted: impl Fn(usize),
) where
    F: std::future::Future<Output = Result<NatsAccess, A>>,
    A: std::fmt::Display,
{
    loop {
        let offset = schedule.interval.mul_f64(rand::random::<f64>() / 2.0);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(schedule.interval + offset) => {}
        }
        let mut names = domains();
        names.sort();
        names.dedup();
        if names.is_empty() {
            continue;
        }
        let round = async {
            let access = access().await.map_err(|e| e.to_string())?;
            sweep_domains(&access, nats, &names, schedule.grace)
                .await
                .map_err(|e| crate::controller::chain(&e))
        };
        let outcomes = tokio::select! {
            () = stop.cancelled() => return,
            outcomes = round => outcomes,
        };
        let outcomes = match outcomes {
            Ok(outcomes) => outcomes,
            Err(error) => {
                tracing::warn!(%error, "body sweep could not start");
                continue;
            }
        };
        for (domain, outcome) in outcomes {
            match outcome {
                Ok(0) => {}
                Ok(n) => {
                    deleted(n);
                    tracing::info!(%domain, deleted = n, "deleted body objects no queue entry refers to");
                }
                Err(e) => {
                    tracing::warn!(%domain, error = %crate::controller::chain(&e), "body sweep failed")
                }
            }
        }
    }
}
