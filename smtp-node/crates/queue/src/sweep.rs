//! Body objects that no queue entry refers to: an enqueue stores a large body before its entry,
//! and when the entry is then not stored (NATS went away, the publish timed out, the node
//! crashed in between) or turns out to be a duplicate (a client's retry of a message the
//! stream holds already, whose entry refers to the first attempt's object), the object is an
//! orphan. Space, not mail: nothing is lost, but nothing would ever delete it.
//!
//! * The enqueue deletes its object at once when it knows the entry is not stored (an error
//!   answer, or never sent after no unanswered attempt), and marks it (the object's
//!   description becomes [`MARK`]) when the entry is stored. The description, because
//!   async-nats rewrites only the name and the description of an existing object.
//! * Everything else is found by a [`sweep`]: it lists a domain's body bucket and looks at
//!   the objects that are unmarked and older than [`GRACE`]. For those it reads the domain's
//!   entries and deletes the object only when no entry refers to it (a mark lost to a crash
//!   right after the publish must not cost a queued message its body); one that is referred
//!   to is marked. Two sweeps at once do the same thing twice, which is harmless.
//! * Reading the entries needs read access to the whole queue stream (`STREAM.MSG.GET` cannot
//!   be limited to one subject), which a node's own least-privilege NATS credentials do not
//!   give ([`crate::permissions`]). So whoever manages the JetStream objects sweeps: the
//!   operator, every [`INTERVAL`], for every MailDomain, when NATS is authenticated; else each
//!   node for its own domains (`nats.manageStreams`). The operator's permissions allow it
//!   exactly the object-store metadata writes this takes (`$O.*.M.>`), never a body's chunks.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::object_store::{ObjectStore, UpdateMetadata};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, object_store};
use futures::StreamExt as _;
use kubemail_config::NatsConfig;

/// The description of a body object whose entry is stored.
pub const MARK: &str = "kubemail: a stored queue entry refers to this body";

/// How old an unmarked object must be before the sweeper looks at it: far longer than any
/// enqueue can take (the publish timeout, a client's end-of-data wait of 10 minutes).
pub const GRACE: Duration = Duration::from_secs(3600);

/// How often each sweeper (a self-managing node, the operator) sweeps a domain.
pub const INTERVAL: Duration = Duration::from_secs(15 * 60);

/// Most entries read per domain in one sweep (a bound, not an expectation).
const MAX_SCAN: u64 = 1_000_000;

/// Why a sweep stopped.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("cannot list the body bucket: {0}")]
    List(String),
    #[error("cannot read the queue stream {stream}: {reason}")]
    ReadStream { stream: String, reason: String },
}

/// Deletes an object whose entry is known not to exist; whether it was deleted.
pub async fn delete_orphan(store: &ObjectStore, object: &str) -> bool {
    match store.delete(object).await {
        Ok(()) => {
            tracing::debug!(object, "deleted a body object no entry refers to");
            true
        }
        Err(error) => {
            tracing::warn!(%error, object, "cannot delete a body object no entry refers to; the sweeper will");
            false
        }
    }
}

/// Marks an object whose entry is stored. A failure only means the sweeper checks it later.
pub async fn mark_referenced(store: &ObjectStore, object: &str) {
    let update = UpdateMetadata {
        name: object.to_owned(),
        description: Some(MARK.to_owned()),
        ..Default::default()
    };
    if let Err(error) = store.update_metadata(object, update).await {
        tracing::debug!(%error, object, "cannot mark a body object as referenced");
    }
}

/// One sweep of `domain`'s body bucket: deletes the unmarked objects older than `grace` that
/// no entry refers to, marks the others. Returns how many were deleted.
pub async fn sweep(
    js: &jetstream::Context,
    nats: &NatsConfig,
    domain: &str,
    store: &ObjectStore,
    grace: Duration,
) -> Result<usize, SweepError> {
    let now = time::OffsetDateTime::now_utc();
    let mut list = store
        .list()
        .await
        .map_err(|e| SweepError::List(e.to_string()))?;
    let mut candidates = Vec::new();
    while let Some(info) = list.next().await {
        let info = info.map_err(|e| SweepError::List(e.to_string()))?;
        if is_candidate(&info, now, grace) {
            candidates.push(info.name);
        }
    }
    if candidates.is_empty() {
        return Ok(0);
    }
    let referenced = referenced_bodies(js, nats, domain).await?;
    let bucket = crate::body_bucket(&nats.body_bucket, domain);
    let mut deleted = 0;
    for object in candidates {
        if referenced.contains(&crate::body_ref(&bucket, &object)) {
            mark_referenced(store, &object).await;
        } else {
            if delete_orphan(store, &object).await {
                deleted += 1;
            }
        }
    }
    Ok(deleted)
}

/// An object the sweeper has to check: not deleted, not marked, and old enough.
fn is_candidate(
    info: &object_store::ObjectInfo,
    now: time::OffsetDateTime,
    grace: Duration,
) -> bool {
    if info.deleted || info.description.as_deref() == Some(MARK) {
        return false;
    }
    info.modified
        .is_some_and(|modified| now - modified >= grace)
}

/// The `Kubemail-Body-Ref` of every entry queued for `domain`, held ones included (a held
/// entry keeps its body until it is released or deleted).
async fn referenced_bodies(
    js: &jetstream::Context,
    nats: &NatsConfig,
    domain: &str,
) -> Result<HashSet<String>, SweepError> {
    let failed = |reason: String| SweepError::ReadStream {
        stream: nats.stream.clone(),
        reason,
    };
    let stream = js
        .get_stream_no_info(&nats.stream)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let mut refs = HashSet::new();
    for subject in [
        crate::subject(&nats.subject_prefix, domain),
        crate::held_subject(&nats.subject_prefix, domain),
    ] {
        let mut sequence = 1;
        let mut read = 0;
        loop {
            if read == MAX_SCAN {
                // Too many to read: delete nothing this time.
                return Err(failed(format!("more than {MAX_SCAN} entries on {subject}")));
            }
            let message = match stream
                .raw_message_builder()
                .sequence(sequence)
                .next_by_subject(subject.clone())
                .send()
                .await
            {
                Ok(m) => m,
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(failed(e.to_string())),
            };
            // As `<bucket>/<object>`, whatever the form of the reference.
            if let Some((bucket, object)) = message
                .headers
                .get(crate::headers::BODY_REF)
                .and_then(|r| crate::split_body_ref(r.as_str()))
            {
                refs.insert(crate::body_ref(bucket, object));
            }
            sequence = message.sequence + 1;
            read += 1;
        }
    }
    Ok(refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, age_secs: i64, marked: bool) -> object_store::ObjectInfo {
        let now = time::OffsetDateTime::now_utc();
        object_store::ObjectInfo {
            name: name.to_owned(),
            description: marked.then(|| MARK.to_owned()),
            metadata: Default::default(),
            headers: None,
            options: None,
            bucket: "B".to_owned(),
            nuid: String::new(),
            size: 1,
            chunks: 1,
            modified: Some(now - time::Duration::seconds(age_secs)),
            digest: None,
            deleted: false,
        }
    }

    #[test]
    fn only_old_unmarked_objects_are_looked_at() {
        let now = time::OffsetDateTime::now_utc();
        let grace = Duration::from_secs(3600);
        assert!(is_candidate(
            &info("q.example.com", 7200, false),
            now,
            grace
        ));
        assert!(
            !is_candidate(&info("q.example.com", 60, false), now, grace),
            "young"
        );
        assert!(
            !is_candidate(&info("q.example.com", 7200, true), now, grace),
            "marked"
        );
        let mut gone = info("q.example.com", 7200, false);
        gone.deleted = true;
        assert!(!is_candidate(&gone, now, grace));
    }
}
