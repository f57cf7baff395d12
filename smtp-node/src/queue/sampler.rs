//! Queue depth and age per MailDomain for `/metrics`, sampled from JetStream every
//! `admin.queueSampleInterval` (default 15 s, a common Prometheus scrape interval).
//!
//! * `kubemail_smtp_queue_messages{domain}`: entries on the domain's subject (the stream's
//!   per-subject count: waiting, in delivery, and waiting for a retry);
//! * `kubemail_smtp_queue_oldest_message_age_seconds{domain}`: now minus the
//!   `Kubemail-Accepted-At` of the entry at the head of the subject (the one enqueued or
//!   re-enqueued longest ago), 0 when the queue is empty. A retry is re-enqueued after each
//!   attempt, so this is the age of the longest-waiting entry rather than a scan of all of
//!   them; it rises steadily when delivery stops or a destination keeps deferring.
//!
//! With `nats.manageStreams: false` (the operator's NATS credentials) the depth comes from
//! the domain's consumer and the age is not sampled (the node may not read the shared stream).
//!
//! Every replica of a domain samples the same stream and reports the same values: alert on
//! `max by (domain)`. A failed sample (NATS away) keeps the previous values and is logged at
//! debug level (the `nats_connected` gauge already says NATS is away).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::{headers, parse_rfc3339};
use crate::config::NatsConfig;
use crate::metrics::{DomainLabels, Metrics};

/// One sample of a domain's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSample {
    pub messages: u64,
    /// Acceptance time of the head entry; `None` when the queue is empty.
    pub head_accepted_at: Option<SystemTime>,
}

/// Samples every domain until `cancel` fires.
pub async fn run(
    js: jetstream::Context,
    nats: NatsConfig,
    domains: Vec<String>,
    interval: Duration,
    cancel: CancellationToken,
    metrics: Arc<Metrics>,
) {
    // Present (as 0) from the start, so dashboards and alerts see the series.
    for domain in &domains {
        publish(
            &metrics,
            domain,
            QueueSample {
                messages: 0,
                head_accepted_at: None,
            },
            SystemTime::now(),
        );
    }
    let mut tick = tokio::time::interval(interval.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        for domain in &domains {
            match sample(&js, &nats, domain).await {
                Ok(s) => publish(&metrics, domain, s, SystemTime::now()),
                Err(error) => tracing::debug!(%domain, %error, "cannot sample the queue"),
            }
        }
    }
}

/// Reads the depth and head entry of `domain`'s subject.
pub async fn sample(
    js: &jetstream::Context,
    nats: &NatsConfig,
    domain: &str,
) -> Result<QueueSample, String> {
    if !nats.manage_streams {
        return sample_consumer(js, nats, domain).await;
    }
    let subject = kubemail_queue::subject(&nats.subject_prefix, domain);
    let stream = js
        .get_stream_no_info(&nats.stream)
        .await
        .map_err(|e| format!("stream {}: {e}", nats.stream))?;
    let mut subjects = stream
        .info_with_subjects(&subject)
        .await
        .map_err(|e| format!("stream info: {e}"))?;
    let mut messages = 0u64;
    while let Some(item) = subjects.next().await {
        let (name, count) = item.map_err(|e| format!("subject counts: {e}"))?;
        if name == subject {
            messages = count as u64;
        }
    }
    if messages == 0 {
        return Ok(QueueSample {
            messages,
            head_accepted_at: None,
        });
    }
    let head = stream
        .get_first_raw_message_by_subject(&subject, 1)
        .await
        .map_err(|e| format!("head of {subject}: {e}"))?;
    let accepted = head
        .headers
        .get(headers::ACCEPTED_AT)
        .and_then(|v| parse_rfc3339(v.as_str()))
        .unwrap_or_else(|| SystemTime::from(head.time));
    Ok(QueueSample {
        messages,
        head_accepted_at: Some(accepted),
    })
}

/// The depth as the domain's consumer sees it (waiting plus handed out), for a node whose NATS
/// credentials may read its own consumer but not the shared stream (whose per-subject counts
/// and messages belong to every domain). The head entry is not readable that way: the age
/// gauge then stays 0.
async fn sample_consumer(
    js: &jetstream::Context,
    nats: &NatsConfig,
    domain: &str,
) -> Result<QueueSample, String> {
    let name = kubemail_queue::consumer_name(domain);
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream(&name, &nats.stream)
        .await
        .map_err(|e| format!("consumer {name}: {e}"))?;
    let info = consumer
        .info()
        .await
        .map_err(|e| format!("consumer {name}: {e}"))?;
    Ok(QueueSample {
        messages: info.num_pending + info.num_ack_pending as u64,
        head_accepted_at: None,
    })
}

fn publish(m: &Metrics, domain: &str, s: QueueSample, now: SystemTime) {
    let labels = DomainLabels {
        domain: domain.to_owned(),
    };
    m.queue_messages
        .get_or_create(&labels)
        .set(i64::try_from(s.messages).unwrap_or(i64::MAX));
    m.queue_oldest_age_seconds
        .get_or_create(&labels)
        .set(age_seconds(s.head_accepted_at, now));
}

/// Whole seconds from `accepted` to `now`; 0 for an empty queue or a clock behind.
fn age_seconds(accepted: Option<SystemTime>, now: SystemTime) -> i64 {
    accepted
        .and_then(|t| now.duration_since(t).ok())
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_is_whole_seconds_and_never_negative() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(age_seconds(None, now), 0);
        assert_eq!(
            age_seconds(Some(now - Duration::from_millis(90_500)), now),
            90
        );
        assert_eq!(age_seconds(Some(now + Duration::from_secs(5)), now), 0);
    }
}
