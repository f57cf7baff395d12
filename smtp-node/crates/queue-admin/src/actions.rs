//! Retry now, hold, release and delete: each replaces a queue entry as the queue contract's
//! "Operators' actions" says (publish the replacement, then delete the old message), so the
//! delivery workers of every replica see the result and nothing else changes the entry.
//!
//! * The old message is read again right before acting: an entry that a worker took
//!   meanwhile is reported as gone, not acted on. A bulk action ([`Queue::act`]) then looks
//!   for the same message (queue id and domain) written again under a later sequence while
//!   it ran (a worker rewrites a paused entry at every pause check, and a deferred one after
//!   each attempt) and acts on that one; only a message no longer queued stays gone.
//! * Between the publish and the delete the old entry is marked as replaced
//!   ([`kubemail_queue::REPLACED_BUCKET`]): a worker attempting it then does not republish it
//!   and answers the mark with `yielded`. When the old message vanished before the delete
//!   and no worker yielded (a worker finished it in that moment), the replacement is deleted
//!   again: an action never adds a second live entry.
//! * A dry run reads and decides exactly the same way and changes nothing.
//! * Every change is logged (target `kubemail::audit`) with the actor and published as a
//!   `queue_action` event (best effort: no events stream, no event).

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv::Store;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use futures::TryStreamExt as _;
use kubemail_queue::{Action, QueueEntry, held_subject, is_held_subject, replaced_key, subject};
use serde::Serialize;

use crate::{AdminError, Filter, Queue};

/// Scans a bulk action makes after the first for entries that moved while it ran.
pub const FOLLOW_PASSES: usize = 3;

/// What a bulk action has done so far, by message (queue id and domain).
#[derive(Default)]
struct Seen {
    /// Messages acted on (changed, would change, skipped).
    done: HashSet<(String, String)>,
    /// Messages whose entry was gone, counted as such in the summary.
    gone: HashSet<(String, String)>,
    /// The replacements this action wrote: never acted on again.
    written: HashSet<u64>,
}

impl Seen {
    fn key(listed: &crate::Listed) -> (String, String) {
        (
            listed.entry.queue_id.to_string(),
            listed.entry.domain.clone(),
        )
    }

    /// Whether `listed` is a message the action has still to act on.
    fn is_open(&self, listed: &crate::Listed) -> bool {
        !self.written.contains(&listed.sequence) && !self.done.contains(&Self::key(listed))
    }

    fn record(&mut self, listed: &crate::Listed, outcome: &Outcome, summary: &mut Summary) {
        let key = Self::key(listed);
        if let Some(new) = outcome.new_sequence {
            self.written.insert(new);
        }
        if self.gone.remove(&key) {
            summary.replace_gone(&outcome.result);
        } else {
            summary.add(&outcome.result);
        }
        if outcome.result == Result_::Gone {
            self.gone.insert(key);
        } else {
            self.done.insert(key);
        }
    }
}

/// How long an action waits for its event to be stored.
const EVENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What to do with the selected entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Make a deferred (or paused) entry deliverable now.
    Retry,
    /// Stop delivery until released.
    Hold { reason: Option<String> },
    /// Deliver a held entry now.
    Release,
    /// Remove the entry: with a delivery status notification to the sender (`notify`, sent
    /// by the next worker, DKIM-signed like every DSN) or silently. A bounce (null sender) is
    /// always removed silently.
    Delete { notify: bool },
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::Hold { .. } => "hold",
            Self::Release => "release",
            Self::Delete { notify: true } => "delete-with-dsn",
            Self::Delete { notify: false } => "delete",
        }
    }
}

/// What happened to one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    pub sequence: u64,
    pub queue_id: String,
    pub domain: String,
    pub result: Result_,
    /// The replacement's stream sequence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_sequence: Option<u64>,
}

/// The result of an action on one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "result", content = "reason")]
pub enum Result_ {
    Changed,
    /// Dry run: this entry would be changed.
    WouldChange,
    /// Not applicable to this entry (e.g. releasing an entry that is not held).
    Skipped(String),
    /// A worker took it meanwhile (delivered, or retried as a new entry).
    Gone,
}

/// Counts over a whole action.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub matched: u64,
    pub changed: u64,
    pub would_change: u64,
    pub skipped: u64,
    pub gone: u64,
}

impl Summary {
    /// Counts the outcome of a message counted as gone before (its entry had moved).
    fn replace_gone(&mut self, r: &Result_) {
        self.gone = self.gone.saturating_sub(1);
        self.matched = self.matched.saturating_sub(1);
        self.add(r);
    }

    fn add(&mut self, r: &Result_) {
        self.matched += 1;
        match r {
            Result_::Changed => self.changed += 1,
            Result_::WouldChange => self.would_change += 1,
            Result_::Skipped(_) => self.skipped += 1,
            Result_::Gone => self.gone += 1,
        }
    }
}

impl Queue {
    /// Applies `kind` to every entry `filter` selects (scanned up to the stream's end when it
    /// starts), calling `each` with every outcome as it happens.
    ///
    /// A worker may write a selected message again under a later sequence while the action
    /// runs (a paused entry at every pause check, a deferred one after an attempt), before
    /// the scan reaches it or between reading and acting (then it is gone). So a further
    /// scan looks past that end for messages accepted before the action started that it has
    /// not acted on yet, and acts on them; new mail is left alone. Up to [`FOLLOW_PASSES`]
    /// such scans, while one still finds an entry gone. The summary counts each message
    /// once, by its last outcome.
    pub async fn act(
        &self,
        kind: &Kind,
        filter: Filter,
        dry_run: bool,
        mut each: impl FnMut(&Outcome),
    ) -> Result<Summary, AdminError> {
        let started = SystemTime::now();
        let (_, end) = self.extent().await?;
        let mut seen = Seen::default();
        let mut summary = Summary::default();
        let mut entries = self.scan(0, filter.clone()).await?;
        while let Some(listed) = entries.try_next().await? {
            let outcome = self.act_on(kind, listed.sequence, dry_run).await?;
            seen.record(&listed, &outcome, &mut summary);
            each(&outcome);
        }
        for _ in 0..FOLLOW_PASSES {
            let mut entries = self.scan(end, filter.clone()).await?;
            let mut gone_again = false;
            while let Some(listed) = entries.try_next().await? {
                if listed.entry.accepted_at >= started || !seen.is_open(&listed) {
                    continue;
                }
                let outcome = self.act_on(kind, listed.sequence, dry_run).await?;
                gone_again |= outcome.result == Result_::Gone;
                seen.record(&listed, &outcome, &mut summary);
                each(&outcome);
            }
            if !gone_again {
                break;
            }
        }
        Ok(summary)
    }

    /// Applies `kind` to stream message `sequence`.
    pub async fn act_on(
        &self,
        kind: &Kind,
        sequence: u64,
        dry_run: bool,
    ) -> Result<Outcome, AdminError> {
        let now = SystemTime::now();
        let message = match self.stream.get_raw_message(sequence).await {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                return Ok(Outcome {
                    sequence,
                    queue_id: String::new(),
                    domain: String::new(),
                    result: Result_::Gone,
                    new_sequence: None,
                });
            }
            Err(source) => return Err(AdminError::ReadMessage { sequence, source }),
        };
        let outcome = |entry: &QueueEntry, result: Result_, new_sequence: Option<u64>| Outcome {
            sequence,
            queue_id: entry.queue_id.to_string(),
            domain: entry.domain.clone(),
            result,
            new_sequence,
        };
        let entry = match QueueEntry::from_headers(&message.headers) {
            Ok(e) => e,
            Err(error) => {
                return Ok(Outcome {
                    sequence,
                    queue_id: String::new(),
                    domain: String::new(),
                    result: Result_::Skipped(format!("unreadable entry: {error}")),
                    new_sequence: None,
                });
            }
        };
        let held = is_held_subject(&self.prefix, &message.subject);
        let plan = match decide(kind, &entry, held, now) {
            Ok(plan) => plan,
            Err(why) => return Ok(outcome(&entry, Result_::Skipped(why.to_owned()), None)),
        };
        if dry_run {
            return Ok(outcome(&entry, Result_::WouldChange, None));
        }
        let Some((next, action, to_held)) = plan else {
            // Silent delete.
            let gone = self.delete_silently(sequence, &entry).await?;
            if !gone {
                self.publish_event(&entry, sequence, kind).await;
            }
            let result = if gone {
                Result_::Gone
            } else {
                Result_::Changed
            };
            return Ok(outcome(&entry, result, None));
        };
        let target = if to_held {
            held_subject(&self.prefix, &entry.domain)
        } else {
            subject(&self.prefix, &entry.domain)
        };
        let headers = next.to_headers(&entry.action_msg_id(action, sequence));
        let ack = async {
            self.js
                .publish_with_headers(target, headers, message.payload.clone())
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        }
        .await
        .map_err(|reason| AdminError::Publish { sequence, reason })?;
        let marks = self.mark_replaced(&entry.domain, sequence).await?;
        match self.stream.delete_message(sequence).await {
            Ok(_) => {}
            Err(error) => {
                if self.exists(sequence).await? {
                    return Err(AdminError::DeleteMessage {
                        sequence,
                        source: error,
                    });
                }
                if yielded(&marks, &entry.domain, sequence).await {
                    // A worker attempted it meanwhile and left the entry to our replacement.
                    tracing::info!(target: "kubemail::audit", actor = %self.actor, action = kind.name(), queue_id = %entry.queue_id, domain = %entry.domain, sequence, new_sequence = ack.sequence, "queue entry changed (a worker yielded it)");
                    self.publish_event(&entry, sequence, kind).await;
                    return Ok(outcome(&entry, Result_::Changed, Some(ack.sequence)));
                }
                // A worker finished the old entry while we replaced it: take the
                // replacement back, so the message is not queued twice.
                if !ack.duplicate {
                    let _ = self.stream.delete_message(ack.sequence).await;
                }
                tracing::info!(target: "kubemail::audit", actor = %self.actor, action = kind.name(), queue_id = %entry.queue_id, domain = %entry.domain, sequence, "entry was taken by a worker meanwhile; nothing changed");
                return Ok(outcome(&entry, Result_::Gone, None));
            }
        }
        tracing::info!(
            target: "kubemail::audit",
            actor = %self.actor,
            action = kind.name(),
            queue_id = %entry.queue_id,
            domain = %entry.domain,
            recipients = entry.recipients.len(),
            sequence,
            new_sequence = ack.sequence,
            "queue entry changed"
        );
        self.publish_event(&entry, sequence, kind).await;
        Ok(outcome(&entry, Result_::Changed, Some(ack.sequence)))
    }

    /// Publishes the `queue_action` event of a change (best effort: the audit log line is
    /// written whatever happens; a cluster without the events stream gets none).
    async fn publish_event(&self, entry: &QueueEntry, sequence: u64, kind: &Kind) {
        use kubemail_queue::events::{
            EventType, QueueActionInfo, event_subject, queue_action_event,
        };
        let event = queue_action_event(
            entry,
            sequence,
            QueueActionInfo {
                name: kind.name().to_owned(),
                actor: self.actor.clone(),
                recipients: entry.recipients.clone(),
                reason: match kind {
                    Kind::Hold { reason } => reason.clone(),
                    _ => None,
                },
            },
            SystemTime::now(),
        );
        let payload = match serde_json::to_vec(&event) {
            Ok(p) => p,
            Err(error) => {
                tracing::warn!(%error, "cannot encode the queue action event");
                return;
            }
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", event.id.as_str());
        let subject = event_subject(&entry.domain, EventType::QueueAction);
        let sent = async {
            self.js
                .publish_with_headers(subject, headers, payload.into())
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(EVENT_TIMEOUT, sent).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, queue_id = %entry.queue_id, "the queue action event was not published")
            }
            Err(_) => {
                tracing::warn!(queue_id = %entry.queue_id, "the queue action event was not published in time")
            }
        }
    }

    /// Deletes message `sequence` and its stored body; returns true when it was gone
    /// already.
    async fn delete_silently(&self, sequence: u64, entry: &QueueEntry) -> Result<bool, AdminError> {
        let marks = self.mark_replaced(&entry.domain, sequence).await?;
        if let Err(error) = self.stream.delete_message(sequence).await {
            if self.exists(sequence).await? {
                return Err(AdminError::DeleteMessage {
                    sequence,
                    source: error,
                });
            }
            // Gone: finished by a worker, unless it yielded to this delete.
            return Ok(!yielded(&marks, &entry.domain, sequence).await);
        }
        if let Some((bucket, name)) = entry
            .body_ref
            .as_deref()
            .and_then(kubemail_queue::split_body_ref)
        {
            match self.js.get_object_store(bucket).await {
                Ok(store) => {
                    if let Err(error) = store.delete(name).await {
                        tracing::warn!(%error, object = name, "cannot delete the body of a deleted entry");
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, bucket, "cannot open the body bucket of a deleted entry")
                }
            }
        }
        tracing::info!(
            target: "kubemail::audit",
            actor = %self.actor,
            action = "delete",
            queue_id = %entry.queue_id,
            domain = %entry.domain,
            recipients = entry.recipients.len(),
            sequence,
            "queue entry deleted without notice"
        );
        Ok(false)
    }

    /// Marks stream message `sequence` of `domain` as replaced, for a worker attempting it now.
    async fn mark_replaced(&self, domain: &str, sequence: u64) -> Result<Store, AdminError> {
        let store = match self.js.get_key_value(kubemail_queue::REPLACED_BUCKET).await {
            Ok(s) => s,
            Err(_) => self
                .js
                .create_key_value(kubemail_queue::streams::replaced_config(1))
                .await
                .map_err(|e| AdminError::Bucket {
                    bucket: kubemail_queue::REPLACED_BUCKET.to_owned(),
                    reason: e.to_string(),
                })?,
        };
        store
            .put(replaced_key(domain, sequence), "replaced".into())
            .await
            .map_err(|e| AdminError::Bucket {
                bucket: kubemail_queue::REPLACED_BUCKET.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(store)
    }

    async fn exists(&self, sequence: u64) -> Result<bool, AdminError> {
        match self.stream.get_raw_message(sequence).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
            Err(source) => Err(AdminError::ReadMessage { sequence, source }),
        }
    }
}

/// Whether a worker answered the mark of `sequence` with `yielded`.
async fn yielded(marks: &Store, domain: &str, sequence: u64) -> bool {
    matches!(
        marks.get(replaced_key(domain, sequence)).await,
        Ok(Some(v)) if v.as_ref() == b"yielded"
    )
}

/// The replacement for an entry (`None`: delete it silently), the action it records and
/// whether it goes to the held subject; or why the action does not apply.
type Plan = Option<(QueueEntry, Action, bool)>;

fn decide(
    kind: &Kind,
    entry: &QueueEntry,
    held: bool,
    now: SystemTime,
) -> Result<Plan, &'static str> {
    let mut next = entry.clone();
    match kind {
        Kind::Retry => {
            if held {
                return Err("held: release it instead");
            }
            if entry.admin.cancelled {
                return Err("deleted already");
            }
            if entry.not_before.is_none_or(|t| t <= now) {
                return Err("due already");
            }
            next.not_before = None;
            next.admin.paused_by = None;
            Ok(Some((next, Action::Retry, false)))
        }
        Kind::Hold { reason } => {
            if held {
                return Err("held already");
            }
            if entry.admin.cancelled {
                return Err("deleted already");
            }
            next.admin.held_at = Some(now);
            next.admin.hold_reason = reason.clone();
            Ok(Some((next, Action::Hold, true)))
        }
        Kind::Release => {
            if !held {
                return Err("not held");
            }
            release(&mut next, now);
            Ok(Some((next, Action::Release, false)))
        }
        Kind::Delete { notify } => {
            if entry.admin.cancelled {
                return Err("deleted already");
            }
            if !notify || entry.is_null_sender() {
                return Ok(None);
            }
            release(&mut next, now);
            next.admin.cancelled = true;
            Ok(Some((next, Action::Cancel, false)))
        }
    }
}

/// Takes an entry off hold: due now, the time held added to its suspended time (whole
/// seconds, rounded up, as the header carries them).
fn release(entry: &mut QueueEntry, now: SystemTime) {
    if let Some(since) = entry.admin.held_at.take() {
        let held = now.duration_since(since).unwrap_or(Duration::ZERO);
        let secs = held.as_secs() + u64::from(held.subsec_nanos() > 0);
        entry.admin.suspended += Duration::from_secs(secs);
    }
    entry.admin.hold_reason = None;
    entry.admin.paused_by = None;
    entry.not_before = None;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use kubemail_queue::{Direction, QueueId};

    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn entry() -> QueueEntry {
        QueueEntry {
            attempts: 1,
            not_before: Some(at(600)),
            ..QueueEntry::new(
                QueueId::from("q1".to_owned()),
                "alice@example.com".into(),
                vec!["bob@remote.test".into()],
                Direction::Outbound,
                "example.com".into(),
                at(0),
            )
        }
    }

    #[test]
    fn retry_clears_the_wait_of_deferred_entries_only() {
        let (next, action, held) = decide(&Kind::Retry, &entry(), false, at(100))
            .unwrap()
            .unwrap();
        assert_eq!(
            (next.not_before, action, held),
            (None, Action::Retry, false)
        );
        assert_eq!(next.attempts, 1, "a retry now keeps the attempt count");
        assert_eq!(
            decide(&Kind::Retry, &entry(), false, at(700)),
            Err("due already")
        );
        assert!(decide(&Kind::Retry, &entry(), true, at(100)).is_err());
    }

    #[test]
    fn hold_then_release_adds_the_time_held() {
        let hold = Kind::Hold {
            reason: Some("customer".into()),
        };
        let (held, _, to_held) = decide(&hold, &entry(), false, at(100)).unwrap().unwrap();
        assert!(to_held);
        assert_eq!(held.admin.held_at, Some(at(100)));
        assert_eq!(decide(&hold, &held, true, at(100)), Err("held already"));
        assert_eq!(
            decide(&Kind::Release, &entry(), false, at(100)),
            Err("not held")
        );
        let (released, action, to_held) = decide(&Kind::Release, &held, true, at(3700))
            .unwrap()
            .unwrap();
        assert_eq!((action, to_held), (Action::Release, false));
        assert_eq!(released.admin.suspended, Duration::from_secs(3600));
        assert_eq!(released.admin.held_at, None);
        assert_eq!(released.admin.hold_reason, None);
        assert_eq!(released.not_before, None, "a released entry is due at once");
    }

    #[test]
    fn delete_with_notice_marks_the_entry_and_bounces_are_deleted_silently() {
        let (next, action, to_held) =
            decide(&Kind::Delete { notify: true }, &entry(), false, at(1))
                .unwrap()
                .unwrap();
        assert!(next.admin.cancelled && next.not_before.is_none() && !to_held);
        assert_eq!(action, Action::Cancel);
        assert_eq!(
            decide(&Kind::Delete { notify: false }, &entry(), false, at(1)),
            Ok(None)
        );
        let mut bounce = entry();
        bounce.mail_from = String::new();
        assert_eq!(
            decide(&Kind::Delete { notify: true }, &bounce, false, at(1)),
            Ok(None)
        );
        assert_eq!(
            decide(&Kind::Delete { notify: true }, &next, false, at(1)),
            Err("deleted already")
        );
    }
}
