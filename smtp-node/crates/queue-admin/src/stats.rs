//! Per destination (recipient domain) statistics over the selected entries: one pass over
//! the stream, memory per destination, not per entry.

use std::collections::HashMap;
use std::time::SystemTime;

use futures::TryStreamExt as _;
use serde::Serialize;

use crate::filter::domain_of;
use crate::{AdminError, Filter, Queue, State};

/// The queue towards one recipient domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationStats {
    pub destination: String,
    /// Entries with at least one recipient there.
    pub messages: u64,
    /// Recipients there.
    pub recipients: u64,
    pub deferred: u64,
    pub paused: u64,
    pub held: u64,
    /// Acceptance time of the oldest of those entries.
    #[serde(serialize_with = "as_rfc3339")]
    pub oldest: SystemTime,
    /// The last error of the most recently stored entry that has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip)]
    last_error_sequence: u64,
}

fn as_rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&kubemail_queue::rfc3339(*t))
}

impl Queue {
    /// Statistics per recipient domain of the entries `filter` selects, most recipients
    /// first.
    pub async fn stats(&self, filter: Filter) -> Result<Vec<DestinationStats>, AdminError> {
        let now = SystemTime::now();
        let mut by: HashMap<String, DestinationStats> = HashMap::new();
        let mut entries = self.scan(0, filter).await?;
        while let Some(listed) = entries.try_next().await? {
            let state = listed.state(now);
            let mut counts: HashMap<String, u64> = HashMap::new();
            for r in &listed.entry.recipients {
                *counts.entry(domain_of(r).to_ascii_lowercase()).or_default() += 1;
            }
            for (destination, n) in counts {
                let s = by
                    .entry(destination.clone())
                    .or_insert_with(|| DestinationStats {
                        destination,
                        messages: 0,
                        recipients: 0,
                        deferred: 0,
                        paused: 0,
                        held: 0,
                        oldest: listed.entry.accepted_at,
                        last_error: None,
                        last_error_sequence: 0,
                    });
                s.messages += 1;
                s.recipients += n;
                match state {
                    State::Deferred => s.deferred += 1,
                    State::Paused => s.paused += 1,
                    State::Held => s.held += 1,
                    State::Ready | State::Cancelled => {}
                }
                s.oldest = s.oldest.min(listed.entry.accepted_at);
                if let Some(e) = &listed.entry.last_error
                    && listed.sequence >= s.last_error_sequence
                {
                    s.last_error = Some(e.clone());
                    s.last_error_sequence = listed.sequence;
                }
            }
        }
        let mut out: Vec<DestinationStats> = by.into_values().collect();
        out.sort_by(|a, b| {
            b.recipients
                .cmp(&a.recipients)
                .then_with(|| a.destination.cmp(&b.destination))
        });
        Ok(out)
    }
}
