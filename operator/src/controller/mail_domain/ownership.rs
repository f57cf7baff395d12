//! Domain ownership: a mail domain is served by exactly one MailDomain among those the operator
//! watches (they share one queue stream, where a domain has one subject and one delivery
//! consumer). The first claim owns it: the earliest `creationTimestamp`, ties broken by
//! namespace and then name, so every reconcile and every operator replica decides the same.
//! A later claim stays inactive: no pods, no consumer, no DNS records, and deleting it never
//! touches the owner's consumer or queued mail. Pure: the claims come in as a list.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::crd::mail_domain::MailDomain;

/// `Ready=False` reason of a claim that lost.
pub const DOMAIN_CONFLICT: &str = "DomainConflict";

/// What a MailDomain may do with its `spec.domain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// The first claim: it serves the domain.
    Owner,
    /// Another MailDomain claimed the domain first. The message names nothing of the other
    /// claim (it may belong to another tenant).
    Conflict { message: String },
}

/// The order of claims: earlier creation first; an object the API server has not stamped yet
/// (only in tests) sorts last. Namespace and name make the order total.
fn claim_key(md: &MailDomain) -> (bool, Option<&Time>, String, String) {
    let created = md.metadata.creation_timestamp.as_ref();
    (
        created.is_none(),
        created,
        md.namespace().unwrap_or_default(),
        md.name_any(),
    )
}

/// Whether `md` owns its domain among `claims` (every MailDomain the operator watches; `md`
/// itself may or may not be among them). Terminating claims still count: the owner's
/// finalizer is what stops its pods and removes its consumer, and until it is gone nobody
/// else may start pulling from the domain's subject.
pub fn decide<'a>(md: &MailDomain, claims: impl IntoIterator<Item = &'a MailDomain>) -> Ownership {
    let uid = md.metadata.uid.as_deref();
    let (namespace, name) = (md.namespace(), md.name_any());
    let earlier = claims.into_iter().any(|other| {
        let same_object = match (uid, other.metadata.uid.as_deref()) {
            (Some(a), Some(b)) => a == b,
            _ => other.namespace() == namespace && other.name_any() == name,
        };
        !same_object && other.spec.domain == md.spec.domain && claim_key(other) < claim_key(md)
    });
    if earlier {
        Ownership::Conflict {
            message: format!(
                "the domain {} is already served by another MailDomain that claimed it earlier; \
                 this one creates no pods, queue consumer or DNS records, and takes over only \
                 once the earlier claim is deleted",
                md.spec.domain
            ),
        }
    } else {
        Ownership::Owner
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;
    use kube::api::ObjectMeta;

    use super::*;
    use crate::crd::mail_domain::MailDomainSpec;

    fn claim(ns: &str, name: &str, domain: &str, created: Option<i64>) -> MailDomain {
        let mut md = MailDomain::new(
            name,
            serde_json::from_value::<MailDomainSpec>(serde_json::json!({ "domain": domain }))
                .unwrap(),
        );
        md.metadata = ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            uid: Some(format!("uid-{ns}-{name}")),
            creation_timestamp: created.map(|s| Time(Timestamp::from_second(s).unwrap())),
            ..Default::default()
        };
        md
    }

    #[test]
    fn the_earliest_claim_owns_the_domain_in_any_namespace() {
        let first = claim("tenant-b", "shop", "example.test", Some(100));
        let second = claim("tenant-a", "example", "example.test", Some(200));
        let other_domain = claim("tenant-a", "other", "other.test", Some(50));
        let all = [first.clone(), second.clone(), other_domain.clone()];
        assert_eq!(decide(&first, &all), Ownership::Owner);
        assert_eq!(decide(&other_domain, &all), Ownership::Owner);
        let Ownership::Conflict { message } = decide(&second, &all) else {
            panic!("the later claim must lose");
        };
        assert!(message.contains("example.test"), "{message}");
        // Nothing about the other tenant's object.
        for secret in ["tenant-b", "shop"] {
            assert!(!message.contains(secret), "{message}");
        }
    }

    #[test]
    fn ties_are_broken_by_namespace_then_name_the_same_way_from_either_side() {
        let a = claim("ns-a", "zeta", "example.test", Some(100));
        let b = claim("ns-b", "alpha", "example.test", Some(100));
        let c = claim("ns-a", "beta", "example.test", Some(100));
        let all = [a.clone(), b.clone(), c.clone()];
        assert_eq!(decide(&c, &all), Ownership::Owner, "ns-a/beta sorts first");
        assert!(matches!(decide(&a, &all), Ownership::Conflict { .. }));
        assert!(matches!(decide(&b, &all), Ownership::Conflict { .. }));
        // The order of the list does not matter.
        let reversed = [c.clone(), b.clone(), a.clone()];
        assert_eq!(decide(&c, &reversed), Ownership::Owner);
        assert!(matches!(decide(&a, &reversed), Ownership::Conflict { .. }));
    }

    #[test]
    fn a_claim_is_never_in_conflict_with_itself_or_a_newer_copy_of_itself() {
        let md = claim("ns", "example", "example.test", Some(100));
        assert_eq!(decide(&md, [&md]), Ownership::Owner);
        assert_eq!(decide(&md, []), Ownership::Owner);
        // The store may hold an older copy of the object (same uid).
        let mut stale = md.clone();
        stale.metadata.creation_timestamp = Some(Time(Timestamp::from_second(1).unwrap()));
        assert_eq!(decide(&md, [&stale]), Ownership::Owner);
    }

    #[test]
    fn a_terminating_owner_still_owns_until_it_is_gone_and_then_the_next_claim_takes_over() {
        let mut owner = claim("ns-a", "example", "example.test", Some(100));
        owner.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(300).unwrap()));
        let next = claim("ns-b", "example", "example.test", Some(200));
        assert!(matches!(
            decide(&next, [&owner, &next]),
            Ownership::Conflict { .. }
        ));
        assert_eq!(decide(&next, [&next]), Ownership::Owner);
    }

    #[test]
    fn an_unstamped_claim_sorts_after_every_stamped_one() {
        let stamped = claim("ns-z", "z", "example.test", Some(i64::from(i32::MAX)));
        let fresh = claim("ns-a", "a", "example.test", None);
        assert!(matches!(
            decide(&fresh, [&stamped]),
            Ownership::Conflict { .. }
        ));
        assert_eq!(decide(&stamped, [&fresh]), Ownership::Owner);
    }
}
