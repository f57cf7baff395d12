//! Every name the queue contract derives from a MailDomain: its subject, its durable
//! consumer, and the reference to a stored body; plus the defaults of the shared names.
//!
//! **Consumer names are collision-free.** A consumer name is one NATS name token (no `.`,
//! `*`, `>`, white space or path separator) and becomes a directory name in the JetStream
//! file store. The domain is lower-cased and every `.` becomes `_`: valid domain names
//! consist of LDH labels (letters, digits, `-`) and never contain `_`, so this is injective
//! (`mail.corp.com` → `kubemail-mail_corp_com`, `mail-corp.com` → `kubemail-mail-corp-com`).
//! Names are kept to [`MAX_CONSUMER_NAME_LEN`] bytes: a domain whose name would be longer
//! gets the first [`HASHED_PREFIX_LEN`] bytes of its encoding, a `-` and the SHA-256 of the
//! lower-cased domain in hex. Two such names are equal only for a SHA-256 collision
//! (collision-resistant, not injective by construction); such a name never equals a name of
//! the short form, because its last `_`-separated part is at least 65 bytes long (`-` plus 64
//! hex digits) or starts with `-`, while every label of a valid domain has 1-63 bytes and
//! starts with a letter or digit.

use sha2::{Digest as _, Sha256};

/// The default stream (`nats.stream`).
pub const DEFAULT_STREAM: &str = "KUBEMAIL";
/// The default subject prefix (`nats.subjectPrefix`).
pub const DEFAULT_SUBJECT_PREFIX: &str = "kubemail.queue";
/// The default object store bucket of large bodies (`nats.bodyBucket`).
pub const DEFAULT_BODY_BUCKET: &str = "KUBEMAIL_BODIES";

/// The JetStream KV bucket of MTA-STS policies of *remote* domains (RFC 8461), shared by every
/// node of every MailDomain: what a remote domain publishes is public and not tenant data, and
/// one fetch serves the whole cluster. Key: the remote domain, lower case (its dots are valid
/// in KV keys); value: JSON of the policy, its id and when it was fetched. Max age per entry:
/// none (each entry carries its own `max_age`). A node needs the bucket's subjects
/// `$KV.KUBEMAIL_MTA_STS.>` for publish and subscribe, and the JetStream API calls
/// `$JS.API.STREAM.INFO.KV_KUBEMAIL_MTA_STS`, `$JS.API.STREAM.CREATE.KV_KUBEMAIL_MTA_STS`,
/// `$JS.API.DIRECT.GET.KV_KUBEMAIL_MTA_STS.>` (and `$JS.API.STREAM.MSG.GET.KV_KUBEMAIL_MTA_STS`).
pub const MTA_STS_CACHE_BUCKET: &str = "KUBEMAIL_MTA_STS";

/// The JetStream stream of TLS-RPT results (RFC 8460): one message per policy outcome of an
/// outbound session, on [`tlsrpt_subject`], kept for a few days (`max_age`) until the daily
/// report of that day is sent. Per sending domain, so a node needs only its own domains'
/// subjects: `kubemail.tlsrpt.<domain token>.>` (publish, and an ordered consumer filtered on
/// it: `$JS.API.CONSUMER.CREATE.KUBEMAIL_TLSRPT.>`, `$JS.API.STREAM.INFO.KUBEMAIL_TLSRPT`,
/// `$JS.API.STREAM.CREATE.KUBEMAIL_TLSRPT`, and the consumer's deliver subject `_INBOX.>`).
pub const TLSRPT_STREAM: &str = "KUBEMAIL_TLSRPT";

/// The JetStream KV bucket where one node claims a day's report of a sending domain
/// ([`tlsrpt_claim_key`]), so it is sent once. A node needs `$KV.KUBEMAIL_TLSRPT_CLAIMS.<domain
/// token>.>` and the bucket's JetStream API calls as for [`MTA_STS_CACHE_BUCKET`].
pub const TLSRPT_CLAIMS_BUCKET: &str = "KUBEMAIL_TLSRPT_CLAIMS";

// The delivery events stream and the suppression bucket are described (contents,
// credentials) with their codecs; their names are part of this list all the same.
pub use crate::events::{EVENTS_STREAM, EVENTS_SUBJECTS, event_subject, events_domain_filter};
pub use crate::suppression::{SUPPRESSION_BUCKET, suppression_key};
/// The subject token that sets held entries apart: `_` never occurs in a domain name, so
/// `<prefix>._held.<domain>` is no domain's queue subject and no delivery consumer reads it.
pub const HELD_TOKEN: &str = "_held";

/// The held subject of `domain`: `<prefix>._held.<lower-cased domain>`. Entries put on hold
/// wait here (in the queue stream, covered by its `<prefix>.>` subjects) until released.
pub fn held_subject(prefix: &str, domain: &str) -> String {
    format!("{prefix}.{HELD_TOKEN}.{}", domain.to_ascii_lowercase())
}

/// Whether `subject` is a held subject under `prefix`.
pub fn is_held_subject(prefix: &str, subject: &str) -> bool {
    subject
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('.'))
        .and_then(|rest| rest.strip_prefix(HELD_TOKEN))
        .is_some_and(|rest| rest.starts_with('.'))
}

/// The JetStream KV bucket of delivery pauses (`DeliveryPause` resources), written by the
/// operator and watched by every node. Key: [`pause_key`]; value: JSON of a
/// [`crate::pause::Pause`]; history 1, no max age (a pause's expiry is in its value). Nodes
/// only read it ([`crate::permissions`]).
pub const PAUSES_BUCKET: &str = "KUBEMAIL_PAUSES";

/// The key of the pause `name` in `namespace`: `<namespace>.<name>`. A namespace is one DNS
/// label (no dots), so the first dot separates the two and keys never collide.
pub fn pause_key(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}")
}

/// The JetStream KV bucket of per-destination connection leases, shared by every node:
/// key [`lease_key`], value the holder; the bucket's `max_age` is [`SHAPING_LEASE_TIME`],
/// holders renew their leases every third of it, so the slot of a crashed node frees itself.
/// Remote destinations are not tenant data (all tenants share the cluster's addresses, which
/// is what a receiving MTA limits), so every node uses the whole bucket.
pub const SHAPING_LEASES_BUCKET: &str = "KUBEMAIL_SHAPING_LEASES";

/// How long a connection lease lives without renewal.
pub const SHAPING_LEASE_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// The JetStream KV bucket of per-destination rate state (the next free send time) and
/// 421 back-off, shared by every node: keys [`rate_key`] and [`backoff_key`], updated with
/// compare-and-set.
pub const SHAPING_BUCKET: &str = "KUBEMAIL_SHAPING";

/// The JetStream KV bucket where an operator's action marks the queue entry it replaced
/// ([`replaced_key`]), so that a worker attempting that entry at the same moment does not
/// republish it (it answers by setting the mark to `yielded`). Kept an hour.
pub const REPLACED_BUCKET: &str = "KUBEMAIL_REPLACED";

/// The mark of stream message `sequence` of `domain`'s queue: `<domain token>.<sequence>`,
/// so a node's credentials reach only its own domains' marks.
pub fn replaced_key(domain: &str, sequence: u64) -> String {
    format!("{}.{sequence}", domain_token(domain))
}

/// Connection slot `slot` of `destination` (a [`destination_token`]).
pub fn lease_key(destination: &str, slot: u32) -> String {
    format!("{slot}.{destination}")
}

/// The rate state of `destination`.
pub fn rate_key(destination: &str) -> String {
    format!("rate.{destination}")
}

/// The 421 back-off state of `destination`.
pub fn backoff_key(destination: &str) -> String {
    format!("backoff.{destination}")
}

/// A shaping destination as KV key tokens: `d.<domain>` for a recipient domain (or a relay
/// host), `g.<group>` for a named group of MX hosts. Both lower case; dots stay (valid in
/// keys), other characters outside `[a-z0-9-_]` become `_`.
pub fn destination_token(kind: DestinationKind, name: &str) -> String {
    let name: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let kind = match kind {
        DestinationKind::Domain => "d",
        DestinationKind::Group => "g",
    };
    format!("{kind}.{}", name.trim_matches('.'))
}

/// What a shaping destination is named after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DestinationKind {
    /// A recipient domain, a relay or an inbound host.
    Domain,
    /// A configured group of MX hosts (e.g. every Gmail MX).
    Group,
}

/// A domain as one subject token: lower case, dots as `_` (injective for valid domain
/// names, which have no `_`; see the module doc).
pub fn domain_token(domain: &str) -> String {
    domain.to_ascii_lowercase().replace('.', "_")
}

/// The subject of a TLS-RPT result: `kubemail.tlsrpt.<sending domain>.<day>.<recipient
/// domain>`, domains as [`domain_token`]s and the UTC day as `YYYYMMDD`.
pub fn tlsrpt_subject(sending_domain: &str, day: &str, recipient_domain: &str) -> String {
    format!(
        "kubemail.tlsrpt.{}.{day}.{}",
        domain_token(sending_domain),
        domain_token(recipient_domain)
    )
}

/// The filter of every TLS-RPT result of `sending_domain` on `day`.
pub fn tlsrpt_day_filter(sending_domain: &str, day: &str) -> String {
    format!("kubemail.tlsrpt.{}.{day}.*", domain_token(sending_domain))
}

/// The claim key of `sending_domain`'s reports for `day`.
pub fn tlsrpt_claim_key(sending_domain: &str, day: &str) -> String {
    format!("{}.{day}", domain_token(sending_domain))
}

/// Longest consumer name: well below the 255 bytes a file name may have, since the name is a
/// directory of the JetStream file store.
pub const MAX_CONSUMER_NAME_LEN: usize = 200;
/// Readable part of a hashed consumer name: what is left of [`MAX_CONSUMER_NAME_LEN`] after
/// the prefix, a `-` and 64 hex digits.
pub const HASHED_PREFIX_LEN: usize = MAX_CONSUMER_NAME_LEN - CONSUMER_PREFIX.len() - 1 - 64;

const CONSUMER_PREFIX: &str = "kubemail-";

/// The queue subject of `domain`: `<prefix>.<lower-cased domain>`.
pub fn subject(prefix: &str, domain: &str) -> String {
    format!("{prefix}.{}", domain.to_ascii_lowercase())
}

/// The durable consumer of `domain` (a valid domain name, any case): `kubemail-` and the
/// domain with dots as underscores, hashed when long (see the module doc).
pub fn consumer_name(domain: &str) -> String {
    domain_name_token(CONSUMER_PREFIX, domain)
}

/// The object store bucket of `domain`'s large bodies: `<base>-` and the domain encoded as in
/// [`consumer_name`] (dots as underscores, hashed when long), e.g. `KUBEMAIL_BODIES-example_com`.
/// Collision-free for the same reason, and one bucket per domain so that a domain's NATS
/// credentials can be limited to its own bodies.
pub fn body_bucket(base: &str, domain: &str) -> String {
    domain_name_token(&format!("{base}-"), domain)
}

/// The stream of failed AUTH attempts, next to the queue stream `stream`.
pub fn auth_failure_stream(stream: &str) -> String {
    format!("{stream}_AUTH_FAILURES")
}

/// Every subject of the AUTH-failure stream: `<prefix>-auth-failures.>`, next to the queue's
/// subjects, never under them (`kubemail.queue.>` does not match `kubemail.queue-auth-failures.x`).
pub fn auth_failure_subjects(prefix: &str) -> String {
    format!("{prefix}-auth-failures.>")
}

/// The AUTH-failure subjects of `domain` are `<this>.<user tag>`:
/// `<prefix>-auth-failures.<lower-cased domain>`. A tag is one token, so `<this>.*` matches
/// this domain's failures and no other domain's (a domain's tokens are fixed, and another
/// domain with one more label would need one more token).
pub fn auth_failure_subject_prefix(prefix: &str, domain: &str) -> String {
    format!("{prefix}-auth-failures.{}", domain.to_ascii_lowercase())
}

/// The reply-inbox prefix of the nodes that serve `domains` (`_INBOX_` and 24 hex digits of
/// the SHA-256 of the sorted, lower-cased, comma-joined domains). Their NATS credentials may
/// subscribe to `<this>.>` only, so no other tenant's nodes can read their JetStream replies.
/// Not a secret: the permission is what protects it.
pub fn inbox_prefix<S: AsRef<str>>(domains: &[S]) -> String {
    let mut sorted: Vec<String> = domains
        .iter()
        .map(|d| d.as_ref().to_ascii_lowercase())
        .collect();
    sorted.sort();
    sorted.dedup();
    let digest = Sha256::digest(sorted.join(",").as_bytes());
    let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("_INBOX_{hex}")
}

/// The reply-inbox prefix of the nodes of MailPool `name` in `namespace`: like
/// [`inbox_prefix`], but fixed for the pool, so attaching a domain (which changes what the
/// nodes' credentials cover) does not change what the running nodes subscribe to. The hashed
/// text holds `:` and `/`, which no list of domain names does, so it is never the prefix of a
/// set of domains.
pub fn pool_inbox_prefix(namespace: &str, name: &str) -> String {
    let digest = Sha256::digest(format!("mailpool:{namespace}/{name}").as_bytes());
    let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("_INBOX_{hex}")
}

/// `prefix` and the domain as one NATS name token (see the module doc).
fn domain_name_token(prefix: &str, domain: &str) -> String {
    let domain = domain.to_ascii_lowercase();
    let encoded = domain.replace('.', "_");
    if prefix.len() + encoded.len() <= MAX_CONSUMER_NAME_LEN {
        return format!("{prefix}{encoded}");
    }
    let room = MAX_CONSUMER_NAME_LEN.saturating_sub(prefix.len() + 1 + 64);
    let mut readable = String::with_capacity(room);
    for c in encoded.chars() {
        if readable.len() + c.len_utf8() > room {
            break;
        }
        readable.push(c);
    }
    let digest = Sha256::digest(domain.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{readable}-{hex}")
}

/// The consumer name of earlier versions, `kubemail-` and the domain with dots as dashes
/// (`mail.corp.com` and `mail-corp.com` both gave `kubemail-mail-corp-com`). Only for
/// finding and removing such a consumer on upgrade.
pub fn legacy_consumer_name(domain: &str) -> String {
    format!(
        "{CONSUMER_PREFIX}{}",
        domain.to_ascii_lowercase().replace('.', "-")
    )
}

/// Whether a consumer named `name` that filters exactly `filters` is the consumer an earlier
/// version made for `domain` on the stream of subject prefix `prefix`: the legacy name (where
/// it differs from the current one) and the domain's subject as its only filter. Only such a
/// consumer may be deleted on upgrade or by the finalizer: the legacy scheme gave
/// `mail.corp.com` and `mail-corp.com` the same name, and the other domain's consumer must
/// survive.
pub fn is_legacy_consumer(name: &str, filters: &[&str], prefix: &str, domain: &str) -> bool {
    name == legacy_consumer_name(domain)
        && name != consumer_name(domain)
        && filters == [subject(prefix, domain).as_str()]
}

/// Every filter subject of a consumer, however its configuration spells them (one
/// `filter_subject` or a list).
pub fn consumer_filters(config: &async_nats::jetstream::consumer::Config) -> Vec<&str> {
    std::iter::once(config.filter_subject.as_str())
        .filter(|f| !f.is_empty())
        .chain(config.filter_subjects.iter().map(String::as_str))
        .collect()
}

/// The `Kubemail-Body-Ref` value of a body stored as `object` in `bucket`.
pub fn body_ref(bucket: &str, object: &str) -> String {
    format!("{bucket}/{object}")
}

/// What follows the bucket in the `Kubemail-Body-Ref` of an entry that carries the first part
/// of its message (the header section) in front of the object ([`body_ref_after_head`]). It
/// makes no valid bucket name: a node of an earlier release, which would deliver the object
/// alone (the message without its header section), cannot open the bucket and defers the
/// message, for a node of this release to deliver.
pub const AFTER_HEAD_MARK: &str = "+head";

/// The `Kubemail-Body-Ref` value of a body stored as `object` in `bucket` whose entry carries
/// the message's header section in front of it.
pub fn body_ref_after_head(bucket: &str, object: &str) -> String {
    format!("{bucket}{AFTER_HEAD_MARK}/{object}")
}

/// Bucket and object name of a `Kubemail-Body-Ref` value, of either form. Bucket names have
/// no `/`, so the first one separates them.
pub fn split_body_ref(reference: &str) -> Option<(&str, &str)> {
    let (bucket, object) = reference.split_once('/')?;
    let bucket = bucket.strip_suffix(AFTER_HEAD_MARK).unwrap_or(bucket);
    (!bucket.is_empty() && !object.is_empty()).then_some((bucket, object))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn names_of_a_domain() {
        assert_eq!(
            subject("kubemail.queue", "Mail.Example.com"),
            "kubemail.queue.mail.example.com"
        );
        assert_eq!(consumer_name("mail.corp.com"), "kubemail-mail_corp_com");
        assert_eq!(consumer_name("mail-corp.com"), "kubemail-mail-corp_com");
        assert_eq!(consumer_name("Example.COM"), "kubemail-example_com");
        assert_eq!(
            legacy_consumer_name("Mail.Corp.com"),
            "kubemail-mail-corp-com"
        );
        assert_eq!(
            body_ref("KUBEMAIL_BODIES", "q1.example.com"),
            "KUBEMAIL_BODIES/q1.example.com"
        );
        assert_eq!(
            split_body_ref("B/q1.example.com"),
            Some(("B", "q1.example.com"))
        );
        assert_eq!(split_body_ref("no-slash"), None);
        // A body after the entry's header section: same bucket and object; the bucket part
        // of the reference is no bucket name an earlier release could open.
        let after_head = body_ref_after_head("B", "q1.example.com");
        assert_eq!(split_body_ref(&after_head), Some(("B", "q1.example.com")));
        let (marked, _) = after_head.split_once('/').unwrap();
        assert!(
            !marked
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "{marked}"
        );
        assert_eq!(split_body_ref("+head/x"), None);
        assert_eq!(
            body_bucket("KUBEMAIL_BODIES", "Mail.Example.com"),
            "KUBEMAIL_BODIES-mail_example_com"
        );
        assert_ne!(body_bucket("B", "a-b.c"), body_bucket("B", "a.b-c"));
        assert_eq!(
            auth_failure_subject_prefix("kubemail.queue", "Example.COM"),
            "kubemail.queue-auth-failures.example.com"
        );
        assert_eq!(
            inbox_prefix(&["b.example", "A.example"]),
            inbox_prefix(&["a.example", "b.example", "a.example"])
        );
        assert_ne!(inbox_prefix(&["a.example"]), inbox_prefix(&["b.example"]));
        assert!(inbox_prefix(&["a.example"]).starts_with("_INBOX_"));
        assert_eq!(
            held_subject("kubemail.queue", "Example.COM"),
            "kubemail.queue._held.example.com"
        );
        assert!(is_held_subject(
            "kubemail.queue",
            "kubemail.queue._held.example.com"
        ));
        assert!(!is_held_subject(
            "kubemail.queue",
            "kubemail.queue.example.com"
        ));
        assert!(!is_held_subject(
            "kubemail.queue",
            "kubemail.queue._heldx.a"
        ));
        assert_eq!(pause_key("mail", "gmail-421"), "mail.gmail-421");
        assert_eq!(
            destination_token(DestinationKind::Domain, "Remote.Test"),
            "d.remote.test"
        );
        assert_eq!(
            destination_token(DestinationKind::Group, "gmail"),
            "g.gmail"
        );
        assert_eq!(lease_key("g.gmail", 3), "3.g.gmail");
        assert_eq!(replaced_key("Mail.Example.com", 42), "mail_example_com.42");
        assert_eq!(split_body_ref("/object"), None);
    }

    #[test]
    fn only_the_domains_own_legacy_consumer_is_legacy() {
        let p = "kubemail.queue";
        let legacy = "kubemail-mail-corp-com";
        assert!(is_legacy_consumer(
            legacy,
            &["kubemail.queue.mail.corp.com"],
            p,
            "mail.corp.com"
        ));
        // The same legacy name, but the other domain's consumer.
        assert!(!is_legacy_consumer(
            legacy,
            &["kubemail.queue.mail-corp.com"],
            p,
            "mail.corp.com"
        ));
        assert!(!is_legacy_consumer(legacy, &[], p, "mail.corp.com"));
        assert!(!is_legacy_consumer(
            legacy,
            &["kubemail.queue.mail.corp.com", "kubemail.queue.x"],
            p,
            "mail.corp.com"
        ));
        assert!(!is_legacy_consumer(
            legacy,
            &["other.prefix.mail.corp.com"],
            p,
            "mail.corp.com"
        ));
        assert!(!is_legacy_consumer(
            "kubemail-mail_corp_com",
            &["kubemail.queue.mail.corp.com"],
            p,
            "mail.corp.com"
        ));
        // A domain without dots: one name in both schemes, never "legacy".
        assert!(!is_legacy_consumer(
            "kubemail-localhost",
            &["kubemail.queue.localhost"],
            p,
            "localhost"
        ));
    }

    #[test]
    fn long_domains_get_a_readable_prefix_and_a_hash() {
        // 253 bytes, the longest valid domain name.
        let label = "a".repeat(63);
        let longest = format!("{label}.{label}.{label}.{}", "c".repeat(61));
        assert_eq!(longest.len(), 253);
        let name = consumer_name(&longest);
        assert_eq!(name.len(), MAX_CONSUMER_NAME_LEN);
        assert!(name.starts_with(&format!("kubemail-{label}_{}", &label[..10])));
        let hex = name.rsplit('-').next().unwrap();
        assert_eq!(hex.len(), 64);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
        // The longest domain that keeps the plain form: 191 bytes.
        let plain = format!("{label}.{label}.{}", "b".repeat(63));
        assert_eq!(plain.len(), 191);
        assert_eq!(consumer_name(&plain).len(), 200);
        assert!(!consumer_name(&plain).contains('.'));
        let hashed = format!("{plain}x");
        assert_ne!(consumer_name(&hashed), consumer_name(&plain));
        assert_eq!(consumer_name(&hashed).len(), 200);
    }

    /// A valid domain name (`validate_domain_name` of the node configuration): 1-253 bytes of
    /// LDH labels of 1-63 bytes, no `-` at either end of a label. Labels from a tiny
    /// alphabet make near-collisions (`a-b.c` / `a.b-c`) frequent; long labels make the
    /// hashed form occur.
    fn domain() -> impl Strategy<Value = String> {
        let label = prop_oneof![
            "[ab]",
            "[ab][ab-]{0,3}[ab]",
            "[a-z0-9][a-z0-9-]{0,8}[a-z0-9]",
            "[a-z0-9][a-z0-9-]{40,61}[a-z0-9]",
        ];
        proptest::collection::vec(label, 1..8)
            .prop_map(|labels| labels.join("."))
            .prop_filter("at most 253 bytes", |d| d.len() <= 253)
    }

    /// Whether `name` is a usable NATS consumer name: one subject token, file-system safe.
    fn valid_nats_name(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= MAX_CONSUMER_NAME_LEN
            && !name
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || ".*>/\\".contains(c))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn consumer_names_are_injective_and_valid(
            domains in proptest::collection::hash_set(domain(), 1..40)
        ) {
            let mut names = std::collections::HashSet::new();
            for d in &domains {
                let name = consumer_name(d);
                prop_assert!(valid_nats_name(&name), "{:?} -> {:?}", d, name);
                let rest = name.strip_prefix("kubemail-").unwrap();
                if d.len() + "kubemail-".len() <= MAX_CONSUMER_NAME_LEN {
                    // The short form decodes back to the domain: injective by construction.
                    prop_assert_eq!(&rest.replace('_', "."), d);
                } else {
                    // The hashed form's last part is no label of a valid domain.
                    let last = rest.rsplit('_').next().unwrap();
                    prop_assert!(last.len() > 63 || last.starts_with('-'), "{:?}", name);
                }
                names.insert(name);
            }
            prop_assert_eq!(names.len(), domains.len());
        }

        #[test]
        fn dots_and_dashes_never_meet(labels in proptest::collection::vec("[a-z0-9]{1,20}", 2..6)) {
            // The collision of the legacy scheme: the same labels joined by "." and by "-".
            let dotted = labels.join(".");
            let dashed = labels.join("-");
            prop_assert_eq!(legacy_consumer_name(&dotted), legacy_consumer_name(&dashed));
            prop_assert_ne!(consumer_name(&dotted), consumer_name(&dashed));
        }

        #[test]
        fn case_does_not_matter(d in domain()) {
            prop_assert_eq!(consumer_name(&d.to_ascii_uppercase()), consumer_name(&d));
            prop_assert_eq!(subject("p", &d.to_ascii_uppercase()), subject("p", &d));
        }
    }
}
