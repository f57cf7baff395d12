//! Attach rules: whether a MailDomain may attach to the MailPool its `spec.poolRef` names, as
//! Gateway API decides whether a route may attach to a Gateway (`allowedRoutes.namespaces`:
//! `Same`, `All`, or a namespace label `Selector`). Pure: the namespace's labels come in.

use std::collections::BTreeMap;

use kube::ResourceExt;

use crate::crd::mail_domain::{MailDomain, PoolRef};
use crate::crd::mail_pool::{FromNamespaces, LabelSelector, MailPool, SelectorOperator};

/// `Accepted=False` reason: the pool does not exist.
pub const POOL_NOT_FOUND: &str = "PoolNotFound";
/// `Accepted=False` reason: the pool's `allowedDomains` does not let the namespace in.
pub const NOT_ALLOWED_BY_POOL: &str = "NotAllowedByPool";
/// `Accepted=True` reason.
pub const ACCEPTED: &str = "Accepted";

/// The outcome for one MailDomain and its pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub accepted: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The namespace and name of the pool `md` refers to.
pub fn pool_key(md: &MailDomain, pool_ref: &PoolRef) -> (String, String) {
    (
        pool_ref
            .namespace
            .clone()
            .unwrap_or_else(|| md.namespace().unwrap_or_default()),
        pool_ref.name.clone(),
    )
}

/// Whether a MailDomain in namespace `md_namespace` (with `namespace_labels`) may attach to
/// `pool` (`None`: the pool does not exist).
pub fn decide(
    pool: Option<&MailPool>,
    pool_namespace: &str,
    pool_name: &str,
    md_namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
) -> Decision {
    let Some(pool) = pool else {
        return Decision {
            accepted: false,
            reason: POOL_NOT_FOUND,
            message: format!(
                "spec.poolRef names MailPool {pool_namespace}/{pool_name}, which does not exist"
            ),
        };
    };
    let rule = &pool.spec.allowed_domains.namespaces;
    let (allowed, why) = match rule.from {
        FromNamespaces::Same => (
            md_namespace == pool_namespace,
            "it admits MailDomains of its own namespace only",
        ),
        FromNamespaces::All => (true, ""),
        FromNamespaces::Selector => (
            rule.selector
                .as_ref()
                .is_some_and(|s| selector_matches(s, namespace_labels)),
            "the labels of this namespace do not match its namespace selector",
        ),
    };
    if allowed {
        Decision {
            accepted: true,
            reason: ACCEPTED,
            message: format!("attached to MailPool {pool_namespace}/{pool_name}"),
        }
    } else {
        Decision {
            accepted: false,
            reason: NOT_ALLOWED_BY_POOL,
            message: format!(
                "MailPool {pool_namespace}/{pool_name} does not allow MailDomains of namespace {md_namespace}: {why}"
            ),
        }
    }
}

/// Whether `labels` match `selector` (`matchLabels` and every `matchExpressions` term).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector
        .match_labels
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().all(|e| {
        let value = labels.get(&e.key);
        match e.operator {
            SelectorOperator::In => value.is_some_and(|v| e.values.contains(v)),
            SelectorOperator::NotIn => value.is_none_or(|v| !e.values.contains(v)),
            SelectorOperator::Exists => value.is_some(),
            SelectorOperator::DoesNotExist => value.is_none(),
        }
    });
    by_labels && by_expressions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::mail_pool::{
        AllowedDomains, AllowedNamespaces, LabelSelectorRequirement, MailPoolSpec,
    };

    fn pool(from: FromNamespaces, selector: Option<LabelSelector>) -> MailPool {
        MailPool::new(
            "shared",
            MailPoolSpec {
                hostname: "mx.pool.test".into(),
                replicas: 2,
                service: Default::default(),
                pod: Default::default(),
                allowed_domains: AllowedDomains {
                    namespaces: AllowedNamespaces { from, selector },
                },
            },
        )
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn same_admits_only_the_pools_namespace_and_says_why() {
        let p = pool(FromNamespaces::Same, None);
        assert!(decide(Some(&p), "mail", "shared", "mail", &labels(&[])).accepted);
        let d = decide(Some(&p), "mail", "shared", "tenant-a", &labels(&[]));
        assert!(!d.accepted);
        assert_eq!(d.reason, NOT_ALLOWED_BY_POOL);
        assert!(
            d.message.contains("mail/shared") && d.message.contains("tenant-a"),
            "{}",
            d.message
        );
    }

    #[test]
    fn all_admits_every_namespace_and_a_missing_pool_is_its_own_reason() {
        let p = pool(FromNamespaces::All, None);
        assert!(decide(Some(&p), "mail", "shared", "anything", &labels(&[])).accepted);
        let d = decide(None, "mail", "shared", "mail", &labels(&[]));
        assert_eq!((d.accepted, d.reason), (false, POOL_NOT_FOUND));
    }

    #[test]
    fn selector_admits_namespaces_whose_labels_match() {
        let p = pool(
            FromNamespaces::Selector,
            Some(LabelSelector {
                match_labels: labels(&[("mail", "shared")]),
                match_expressions: vec![LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: SelectorOperator::NotIn,
                    values: vec!["blocked".into()],
                }],
            }),
        );
        let ok = |l: &[(&str, &str)]| decide(Some(&p), "mail", "shared", "t", &labels(l)).accepted;
        assert!(ok(&[("mail", "shared")]));
        assert!(ok(&[("mail", "shared"), ("tier", "gold")]));
        assert!(!ok(&[("mail", "shared"), ("tier", "blocked")]));
        assert!(!ok(&[("mail", "other")]));
        assert!(!ok(&[]));
        // Selector without a selector (the CEL rule refuses it at admission) admits nobody.
        let p = pool(FromNamespaces::Selector, None);
        assert!(!decide(Some(&p), "mail", "shared", "mail", &labels(&[])).accepted);
    }

    #[test]
    fn expression_operators() {
        use SelectorOperator::*;
        let sel = |operator, values: &[&str]| LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![LabelSelectorRequirement {
                key: "k".into(),
                operator,
                values: values.iter().map(|v| (*v).to_owned()).collect(),
            }],
        };
        let with = labels(&[("k", "a")]);
        let without = labels(&[]);
        assert!(selector_matches(&sel(In, &["a"]), &with));
        assert!(!selector_matches(&sel(In, &["b"]), &with));
        assert!(!selector_matches(&sel(In, &["a"]), &without));
        assert!(selector_matches(&sel(NotIn, &["a"]), &without));
        assert!(!selector_matches(&sel(NotIn, &["a"]), &with));
        assert!(selector_matches(&sel(Exists, &[]), &with));
        assert!(selector_matches(&sel(DoesNotExist, &[]), &without));
        assert!(!selector_matches(&sel(DoesNotExist, &[]), &with));
    }
}
