//! Leader election with a `coordination.k8s.io/v1` Lease, so that two or more operator replicas
//! are safe: only the holder of the lease runs the controllers.
//!
//! The algorithm is client-go's (`tools/leaderelection`), written against the Lease API
//! directly because no maintained crate supports kube 5 yet:
//! * every `retryPeriod` a candidate reads the Lease; the holder renews `renewTime`;
//! * another candidate takes the Lease over only after it has seen the same record unchanged
//!   for `leaseDuration` *by its own clock* (so clock skew between machines does not matter);
//! * every write carries the `resourceVersion` it read, so of two candidates racing for the
//!   Lease exactly one wins (the other gets `409 Conflict`);
//! * a leader that has not renewed within `renewDeadline` (shorter than `leaseDuration`)
//!   stops leading before anyone else can take over;
//! * on shutdown the leader releases the Lease, so a successor takes over at once.
//!
//! Like every lease without fencing, two leaders may overlap for a moment after a long pause
//! (a stopped process); the reconcilers are idempotent, which makes that harmless.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Lease settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (the pod name, plus a random suffix).
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long steps down.
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

/// Why a Lease call failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("cannot read Lease {0}")]
    ReadLease(String, #[source] kube::Error),
    #[error("cannot write Lease {0}")]
    WriteLease(String, #[source] kube::Error),
}

/// One candidate's view of the Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The last record seen (holder, renew time, resourceVersion) and when it was first seen.
    observed: Option<(String, Instant)>,
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        }
    }

    /// Campaigns until `cancel` fires, publishing on `leading` whether this replica leads.
    /// On cancellation a leader releases the Lease.
    ///
    /// A failing Lease call is logged when its explanation changes (and then every
    /// [`REMIND_EVERY`]), with the cause and the fix; a candidate that is not leading retries
    /// less often while the failure lasts (up to [`MAX_BACKOFF`]), a leader keeps retrying at
    /// the retry period so as to renew in time.
    pub async fn run(mut self, leading: watch::Sender<bool>, cancel: CancellationToken) {
        let mut last_renew: Option<Instant> = None;
        let hints = crate::diagnose::Hints {
            operator_namespace: self.config.namespace.clone(),
            ..Default::default()
        };
        let mut failing = Failing::default();
        loop {
            let attempt =
                tokio::time::timeout(self.config.retry_period, self.try_acquire_or_renew()).await;
            let is_leader = *leading.borrow();
            match attempt {
                Ok(Ok(true)) => {
                    failing.recovered();
                    last_renew = Some(Instant::now());
                    if !is_leader {
                        tracing::info!(identity = %self.config.identity, lease = %self.config.name, "became leader");
                        let _ = leading.send(true);
                    }
                }
                Ok(Ok(false)) => {
                    failing.recovered();
                    if is_leader {
                        tracing::warn!(identity = %self.config.identity, "lost the lease to another replica");
                        let _ = leading.send(false);
                    }
                    last_renew = None;
                }
                Ok(Err(e)) => failing.failed(crate::diagnose::explain(&e, &hints)),
                Err(_) => failing.failed(format!(
                    "the Lease {}/{} call got no answer within {:?}: the API server is slow or unreachable; check the server address in the kubeconfig (--kubeconfig / KUBECONFIG)",
                    self.config.namespace, self.config.name, self.config.retry_period
                )),
            }
            if *leading.borrow()
                && last_renew.is_none_or(|t| t.elapsed() > self.config.renew_deadline)
            {
                tracing::warn!(identity = %self.config.identity, "could not renew the lease in time; stepping down");
                let _ = leading.send(false);
            }
            let wait = if *leading.borrow() {
                self.config.retry_period
            } else {
                failing.delay(self.config.retry_period)
            };
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        if *leading.borrow() {
            let _ = leading.send(false);
            match self.release().await {
                Ok(()) => tracing::info!(identity = %self.config.identity, "released the lease"),
                Err(e) => {
                    tracing::warn!(error = %crate::diagnose::explain(&e, &hints), "could not release the lease")
                }
            }
        }
    }

    /// One round: `Ok(true)` when this replica holds the Lease afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaseError> {
        let name = self.config.name.clone();
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self
            .api
            .get_opt(&name)
            .await
            .map_err(|e| LeaseError::ReadLease(name.clone(), e))?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec_for_me(now.clone(), 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(LeaseError::WriteLease(name, e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let record = format!(
            "{:?}/{:?}/{:?}",
            holder,
            spec.renew_time.as_ref().map(|t| t.0),
            lease.metadata.resource_version
        );
        if self.observed.as_ref().is_none_or(|(r, _)| *r != record) {
            self.observed = Some((record, Instant::now()));
        }
        let me = holder.as_deref() == Some(self.config.identity.as_str());
        if me {
            let mut renewed = spec;
            renewed.renew_time = Some(now);
            renewed.lease_duration_seconds = Some(secs(self.config.lease_duration));
            lease.spec = Some(renewed);
        } else {
            let duration = spec
                .lease_duration_seconds
                .map_or(self.config.lease_duration, |s| {
                    Duration::from_secs(u64::try_from(s).unwrap_or(0))
                });
            let seen_for = self
                .observed
                .as_ref()
                .map_or(Duration::ZERO, |(_, t)| t.elapsed());
            if holder.is_some() && seen_for < duration {
                return Ok(false);
            }
            let transitions = spec.lease_transitions.unwrap_or(0) + 1;
            lease.spec = Some(self.spec_for_me(now, transitions));
        }
        match self
            .api
            .replace(&name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(LeaseError::WriteLease(name, e)),
        }
    }

    /// Gives the Lease up if this replica holds it.
    pub async fn release(&self) -> Result<(), LeaseError> {
        let name = self.config.name.clone();
        let Some(mut lease) = self
            .api
            .get_opt(&name)
            .await
            .map_err(|e| LeaseError::ReadLease(name.clone(), e))?
        else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        spec.lease_duration_seconds = Some(1);
        lease.spec = Some(spec);
        self.api
            .replace(&name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
            .map_err(|e| LeaseError::WriteLease(name, e))
    }

    fn spec_for_me(&self, now: MicroTime, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_duration_seconds: Some(secs(self.config.lease_duration)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }
}

/// Longest wait between attempts of a candidate whose Lease calls fail.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A failure that lasts is logged again this often.
pub const REMIND_EVERY: Duration = Duration::from_secs(300);

/// The failure of the Lease calls, for logging on change and backing off.
#[derive(Default)]
struct Failing {
    /// The explanation last logged and when.
    logged: Option<(String, Instant)>,
    /// Failed attempts in a row.
    attempts: u32,
}

impl Failing {
    fn failed(&mut self, explanation: String) {
        self.attempts = self.attempts.saturating_add(1);
        if log_again(self.logged.as_ref(), &explanation, Instant::now()) {
            tracing::warn!(error = %explanation, attempts = self.attempts, "lease update failed");
            self.logged = Some((explanation, Instant::now()));
        } else {
            tracing::debug!(error = %explanation, attempts = self.attempts, "lease update failed");
        }
    }

    fn recovered(&mut self) {
        if self.logged.take().is_some() {
            tracing::info!(attempts = self.attempts, "lease updates work again");
        }
        self.attempts = 0;
    }

    /// The wait before the next attempt: the retry period, doubled per failure in a row.
    fn delay(&self, retry_period: Duration) -> Duration {
        backoff(retry_period, self.attempts)
    }
}

/// Whether a failure explained as `explanation` is worth a log line: it differs from the one
/// last logged, or that was long ago.
fn log_again(logged: Option<&(String, Instant)>, explanation: &str, now: Instant) -> bool {
    logged.is_none_or(|(last, at)| last != explanation || now.duration_since(*at) >= REMIND_EVERY)
}

/// `retry_period` doubled per failure in a row, at most [`MAX_BACKOFF`] (never below the
/// retry period).
fn backoff(retry_period: Duration, failures: u32) -> Duration {
    retry_period
        .saturating_mul(2u32.saturating_pow(failures.min(16)))
        .min(MAX_BACKOFF)
        .max(retry_period)
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_candidates_back_off_up_to_a_minute() {
        let p = Duration::from_secs(2);
        assert_eq!(backoff(p, 0), p);
        assert_eq!(backoff(p, 1), Duration::from_secs(4));
        assert_eq!(backoff(p, 3), Duration::from_secs(16));
        assert_eq!(backoff(p, 10), MAX_BACKOFF);
        assert_eq!(backoff(p, u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn the_same_failure_is_logged_once_then_as_a_reminder() {
        let now = Instant::now();
        let logged = ("namespace x does not exist".to_owned(), now);
        assert!(log_again(None, "a", now));
        assert!(!log_again(
            Some(&logged),
            "namespace x does not exist",
            now + Duration::from_secs(2)
        ));
        assert!(log_again(
            Some(&logged),
            "forbidden",
            now + Duration::from_secs(2)
        ));
        assert!(log_again(
            Some(&logged),
            "namespace x does not exist",
            now + REMIND_EVERY
        ));
    }
}
