//! What the NATS credentials of a set of SMTP nodes may do: exactly the queue contract of the
//! domains they serve, and nothing else. The operator writes these lists into the user JWTs it
//! mints; a test holds them against a real nats-server.
//!
//! For each domain the nodes serve:
//! * publish entries to its queue subject ([`subject`]) and wait for the JetStream ack;
//! * use its durable consumer ([`consumer_name`]): `CONSUMER.INFO`, `CONSUMER.MSG.NEXT`, and
//!   the acks (`$JS.ACK.<stream>.<consumer>.>`), never `CONSUMER.CREATE` or `DELETE`;
//! * use its body bucket ([`body_bucket`]): chunks and metadata (`$O.<bucket>.>`), the
//!   bucket stream's info, message reads and purges (how the object store deletes a body),
//!   and the ordered consumer a read uses;
//! * publish its AUTH failures (`<prefix>-auth-failures.<domain>.*`) and read the failure
//!   stream's per-subject counts (`STREAM.INFO`: counts of keyed hashes, never names).
//!
//! For the delivery side's TLS policy (their names in [`crate::names`]):
//! * the cluster-wide MTA-STS policy cache (`$KV.KUBEMAIL_MTA_STS.>`, read and write: it holds
//!   remote domains' public policies, shared by every node);
//! * its domains' TLS-RPT results (`kubemail.tlsrpt.<domain token>.>`) and report claims
//!   (`$KV.KUBEMAIL_TLSRPT_CLAIMS.<domain token>.>`), the results stream's info and the ordered
//!   consumer that reads a day's results.
//!
//! For delivery events and the suppression list:
//! * publish its domains' events (`kubemail.events.<domain token>.>`) and read the events
//!   stream's info;
//! * add entries to its domains' suppression lists (`$KV.KUBEMAIL_SUPPRESSION.<domain
//!   token>.>`), read the bucket's info (key counts: keys are hashes) and read its domains'
//!   entries through subject-scoped direct gets only.
//!
//! For pauses, shaping and operators' actions (names in [`crate::names`]):
//! * the delivery pauses, read only: the bucket's info and a pull-based ordered consumer on it
//!   (`KV_KUBEMAIL_PAUSES`), never `$KV.KUBEMAIL_PAUSES.>` (only the operator writes);
//! * the cluster-wide connection leases and rate state, read and write
//!   (`$KV.KUBEMAIL_SHAPING_LEASES.>`, `$KV.KUBEMAIL_SHAPING.>`: remote destinations, shared
//!   by every tenant like the MTA-STS cache);
//! * its domains' replaced-entry marks (`$KV.KUBEMAIL_REPLACED.<domain token>.>`).
//!
//! Plus subscribing to its own reply inbox ([`inbox_prefix`]`.>`): JetStream answers every
//! request there. Everything else is denied by omission: no stream create, update, delete
//! or purge of the queue stream, no consumer create or delete, no other domain's subject,
//! consumer, bucket or inbox, no `_INBOX.>` (another client's replies), no `$SYS`.
//!
//! [`subject`]: crate::subject
//! [`consumer_name`]: crate::consumer_name
//! [`body_bucket`]: crate::body_bucket
//! [`inbox_prefix`]: crate::inbox_prefix

use crate::names::{
    auth_failure_stream, auth_failure_subject_prefix, body_bucket, consumer_name, inbox_prefix,
    subject,
};

/// The names every permission derives from (the node config's `nats` section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNames {
    /// The queue stream (`nats.stream`).
    pub stream: String,
    /// Queue subjects are `<subject_prefix>.<domain>` (`nats.subjectPrefix`).
    pub subject_prefix: String,
    /// Body buckets are `<body_bucket_base>-<domain>` (`nats.bodyBucket`).
    pub body_bucket_base: String,
}

impl Default for QueueNames {
    fn default() -> Self {
        Self {
            stream: crate::DEFAULT_STREAM.to_owned(),
            subject_prefix: crate::DEFAULT_SUBJECT_PREFIX.to_owned(),
            body_bucket_base: crate::DEFAULT_BODY_BUCKET.to_owned(),
        }
    }
}

/// Subjects a user may publish to and subscribe to (NATS allow lists; the rest is denied).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// The permissions of the nodes that serve `domains` (see the module doc).
pub fn node_permissions<S: AsRef<str>>(names: &QueueNames, domains: &[S]) -> Permissions {
    node_permissions_with_inbox(names, domains, &inbox_prefix(domains))
}

/// [`node_permissions`] with the reply inbox `inbox` (a pool's nodes use one that stays the
/// same while domains attach and detach: [`crate::pool_inbox_prefix`]).
pub fn node_permissions_with_inbox<S: AsRef<str>>(
    names: &QueueNames,
    domains: &[S],
    inbox: &str,
) -> Permissions {
    let stream = &names.stream;
    let mut publish = Vec::new();
    let failures = auth_failure_stream(stream);
    publish.push(format!("$JS.API.STREAM.INFO.{failures}"));
    for domain in domains {
        let domain = domain.as_ref();
        publish.push(subject(&names.subject_prefix, domain));
        let consumer = consumer_name(domain);
        publish.push(format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"));
        publish.push(format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"));
        publish.push(format!("$JS.ACK.{stream}.{consumer}.>"));
        let bucket = body_bucket(&names.body_bucket_base, domain);
        let bucket_stream = format!("OBJ_{bucket}");
        publish.push(format!("$O.{bucket}.>"));
        for api in [
            "STREAM.INFO",
            "STREAM.MSG.GET",
            "STREAM.PURGE",
            "CONSUMER.CREATE",
        ] {
            publish.push(format!("$JS.API.{api}.{bucket_stream}"));
        }
        for api in [
            "DIRECT.GET",
            "CONSUMER.CREATE",
            "CONSUMER.INFO",
            "CONSUMER.DELETE",
        ] {
            publish.push(format!("$JS.API.{api}.{bucket_stream}.>"));
        }
        // Flow control replies of the ordered consumer that reads a body.
        publish.push(format!("$JS.FC.{bucket_stream}.>"));
        publish.push(format!(
            "{}.*",
            auth_failure_subject_prefix(&names.subject_prefix, domain)
        ));
    }
    let kv = |bucket: &str, keys: &str, publish: &mut Vec<String>| {
        let stream = format!("KV_{bucket}");
        publish.push(format!("$KV.{bucket}.{keys}"));
        publish.push(format!("$JS.API.STREAM.INFO.{stream}"));
        publish.push(format!("$JS.API.STREAM.MSG.GET.{stream}"));
        publish.push(format!("$JS.API.DIRECT.GET.{stream}.$KV.{bucket}.{keys}"));
    };
    kv(crate::MTA_STS_CACHE_BUCKET, ">", &mut publish);
    // Pauses, shaping and replaced-entry marks: only what their use needs (open the bucket,
    // direct gets, writes where allowed, the watch's ordered consumer), since every subject
    // makes the user JWT, sent in the CONNECT line, longer.
    let lean_kv = |bucket: &str, keys: &str, write: bool, publish: &mut Vec<String>| {
        let stream = format!("KV_{bucket}");
        publish.push(format!("$JS.API.STREAM.INFO.{stream}"));
        publish.push(format!("$JS.API.DIRECT.GET.{stream}.$KV.{bucket}.{keys}"));
        if write {
            publish.push(format!("$KV.{bucket}.{keys}"));
        }
    };
    lean_kv(crate::SHAPING_LEASES_BUCKET, ">", true, &mut publish);
    lean_kv(crate::SHAPING_BUCKET, ">", true, &mut publish);
    // Pauses: read only, followed with a pull-based ordered consumer.
    let pauses = format!("KV_{}", crate::PAUSES_BUCKET);
    publish.push(format!("$JS.API.STREAM.INFO.{pauses}"));
    publish.push(format!("$JS.API.CONSUMER.CREATE.{pauses}"));
    for api in [
        "CONSUMER.CREATE",
        "CONSUMER.MSG.NEXT",
        "CONSUMER.DELETE",
        "CONSUMER.INFO",
    ] {
        publish.push(format!("$JS.API.{api}.{pauses}.>"));
    }
    let tlsrpt = crate::TLSRPT_STREAM;
    publish.push(format!("$JS.API.STREAM.INFO.{tlsrpt}"));
    publish.push(format!("$JS.API.CONSUMER.CREATE.{tlsrpt}"));
    publish.push(format!("$JS.API.CONSUMER.CREATE.{tlsrpt}.>"));
    // The ordered consumer's own calls (its name is random, made per read).
    for api in ["CONSUMER.INFO", "CONSUMER.MSG.NEXT", "CONSUMER.DELETE"] {
        publish.push(format!("$JS.API.{api}.{tlsrpt}.>"));
    }
    publish.push(format!("$JS.FC.{tlsrpt}.>"));
    for domain in domains {
        let token = crate::domain_token(domain.as_ref());
        publish.push(format!("kubemail.tlsrpt.{token}.>"));
        kv(
            crate::TLSRPT_CLAIMS_BUCKET,
            &format!("{token}.>"),
            &mut publish,
        );
        lean_kv(
            crate::REPLACED_BUCKET,
            &format!("{token}.>"),
            true,
            &mut publish,
        );
    }
    let events = crate::events::EVENTS_STREAM;
    publish.push(format!("$JS.API.STREAM.INFO.{events}"));
    let suppression = crate::suppression::SUPPRESSION_BUCKET;
    publish.push(format!("$JS.API.STREAM.INFO.KV_{suppression}"));
    for domain in domains {
        let token = crate::domain_token(domain.as_ref());
        publish.push(format!("kubemail.events.{token}.>"));
        publish.push(format!("$KV.{suppression}.{token}.>"));
        publish.push(format!(
            "$JS.API.DIRECT.GET.KV_{suppression}.$KV.{suppression}.{token}.>"
        ));
    }
    publish.sort();
    publish.dedup();
    Permissions {
        publish,
        subscribe: vec![format!("{inbox}.>")],
    }
}

/// The permissions of the operator's own connection: the JetStream API (it creates and
/// updates the streams, consumers and buckets, and reads queue entries' headers to count
/// what each delivery pause holds back) and its own replies. It never writes queue entries.
/// It writes delivery pauses; for event sinks it acknowledges events it dispatched (and
/// answers the flow control of the ordered consumer a listing uses); for `Suppression` objects
/// and tools it writes suppression entries. For the sweep of orphaned bodies
/// ([`crate::sweep`]) it lists body buckets (flow control of their ordered consumers) and
/// writes body objects' metadata (`$O.*.M.>`: the mark, and the deletion marker before the
/// chunks are purged), never a body's chunks.
pub fn operator_permissions(inbox: &str) -> Permissions {
    let suppression = crate::suppression::SUPPRESSION_BUCKET;
    Permissions {
        publish: vec![
            "$JS.API.>".to_owned(),
            format!("$JS.ACK.{}.>", crate::events::EVENTS_STREAM),
            format!("$KV.{suppression}.>"),
            // Flow control of ordered consumers: suppression listings, body bucket listings.
            "$JS.FC.>".to_owned(),
            "$O.*.M.>".to_owned(),
            format!("$KV.{}.>", crate::PAUSES_BUCKET),
        ],
        subscribe: vec![format!("{inbox}.>")],
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_keeps_its_inbox_while_its_domains_change() {
        let inbox = crate::pool_inbox_prefix("platform", "shared");
        let one = node_permissions_with_inbox(&QueueNames::default(), &["a.test"], &inbox);
        let two =
            node_permissions_with_inbox(&QueueNames::default(), &["a.test", "b.test"], &inbox);
        assert_eq!(one.subscribe, vec![format!("{inbox}.>")]);
        assert_eq!(one.subscribe, two.subscribe);
        assert!(two.publish.contains(&"kubemail.queue.b.test".to_owned()));
        assert!(!one.publish.contains(&"kubemail.queue.b.test".to_owned()));
        assert_ne!(inbox, crate::pool_inbox_prefix("platform", "other"));
        assert_ne!(inbox, inbox_prefix(&["a.test"]));
    }

    #[test]
    fn a_domain_gets_its_own_names_only() {
        let p = node_permissions(&QueueNames::default(), &["example.com"]);
        assert!(p.publish.contains(&"kubemail.queue.example.com".to_owned()));
        assert!(
            p.publish
                .contains(&"$JS.API.CONSUMER.MSG.NEXT.KUBEMAIL.kubemail-example_com".to_owned())
        );
        assert!(
            p.publish
                .contains(&"$O.KUBEMAIL_BODIES-example_com.>".to_owned())
        );
        assert!(
            p.publish
                .contains(&"kubemail.queue-auth-failures.example.com.*".to_owned())
        );
        assert!(
            p.publish
                .contains(&"$KV.KUBEMAIL_REPLACED.example_com.>".to_owned())
        );
        assert!(
            p.publish
                .contains(&"$KV.KUBEMAIL_SHAPING_LEASES.>".to_owned())
        );
        assert_eq!(
            p.subscribe,
            vec![format!("{}.>", inbox_prefix(&["example.com"]))]
        );
        for s in &p.publish {
            assert!(!s.contains("STREAM.CREATE"), "{s}");
            assert!(!s.contains("STREAM.DELETE"), "{s}");
            assert!(!s.contains("CONSUMER.DELETE.KUBEMAIL."), "{s}");
            assert!(
                !s.starts_with("$JS.API.STREAM.PURGE.KUBEMAIL") || s.contains("OBJ_"),
                "{s}"
            );
            assert!(!s.contains("other"), "{s}");
            assert!(
                !s.starts_with("$KV.KUBEMAIL_PAUSES"),
                "nodes never write pauses: {s}"
            );
            // No wildcard that reaches beyond this domain's names.
            assert!(
                !s.ends_with("KUBEMAIL.>") && s != "$JS.API.>" && s != ">",
                "{s}"
            );
        }
    }

    #[test]
    fn a_pool_of_domains_gets_each_domains_names() {
        let names = QueueNames::default();
        let both = node_permissions(&names, &["a.example", "b.example"]);
        for d in ["a.example", "b.example"] {
            let one = node_permissions(&names, &[d]);
            for s in one.publish {
                assert!(both.publish.contains(&s), "{s}");
            }
        }
    }
}
