//! The hand-over between a pooled MailDomain and its MailPool, and the pool's names. A pooled
//! MailDomain writes ConfigMap `<md>-pool` in its own namespace: its node `DomainConfig` with
//! bare file names (`domain.yaml`) and, for each file, the Secret and key it comes from
//! (`files.yaml`). The pool copies the files into its own namespace, where its pods mount them
//! permanently (pods cannot mount Secrets of other namespaces), and rewrites the names into
//! paths under its mounts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Key of the domain's node config in `<md>-pool`.
pub const DOMAIN_KEY: &str = "domain.yaml";
/// Key of the file sources in `<md>-pool`.
pub const FILES_KEY: &str = "files.yaml";
/// Label of a pool's children naming the pool.
pub const POOL_LABEL: &str = "kubemail.io/mailpool";
/// Secrets holding the attached domains' files, each mounted at
/// `<DOMAINS_DIR>/<shard>/`. Fixed, so attaching never changes the pod spec: a domain's files
/// (certificate, DKIM keys, users; about 6 KiB) go to the shard its name hashes to, and 16
/// Secrets of at most 1 MiB hold well over a thousand domains.
pub const SHARDS: u32 = 16;
/// Where the pods mount the shards.
pub const DOMAINS_DIR: &str = "/etc/kubemail/domains";

/// Where one file of a pooled domain comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSource {
    /// A Secret in the MailDomain's namespace.
    pub secret: String,
    pub key: String,
}

/// File name (as written in `domain.yaml`) to its source.
pub type Files = BTreeMap<String, FileSource>;

/// The ConfigMap a pooled MailDomain hands to its pool.
pub fn pool_domain(md: &str) -> String {
    format!("{md}-pool")
}

/// The pool's Deployment, Service and PDB.
pub fn nodes(pool: &str) -> String {
    format!("mailpool-{pool}")
}
/// The pool's node config.
pub fn node_config(pool: &str) -> String {
    format!("mailpool-{pool}-config")
}
/// The pool's default certificate and the key of its nodes' shared AUTH failure count.
pub fn node_secret(pool: &str) -> String {
    format!("mailpool-{pool}-node")
}
/// The pool's NATS credentials (covering every attached domain) and CA.
pub fn nats_secret(pool: &str) -> String {
    format!("mailpool-{pool}-nats")
}
/// The NetworkPolicy of the pool's pods.
pub fn network_policy(pool: &str) -> String {
    format!("mailpool-{pool}")
}
/// Shard `i` of the domains' files.
pub fn shard_secret(pool: &str, i: u32) -> String {
    format!("mailpool-{pool}-domains-{i}")
}

/// The domains a pool's nodes serve, sorted: what the nodes' NATS credentials must cover (one
/// credential per pool, minted for exactly this list, replaced when it changes; a dedicated
/// MailDomain's nodes serve its one domain).
pub fn served_domains(attached: &[crate::crd::mail_pool::AttachedDomain]) -> Vec<String> {
    let mut domains: Vec<String> = attached.iter().map(|d| d.domain.clone()).collect();
    domains.sort();
    domains
}

/// The shard of `domain`: FNV-1a of its name, so it never moves.
pub fn shard_of(domain: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in domain.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % SHARDS
}

/// The key of `file` of `domain` in its shard: `_` appears in no domain name, so the split is
/// unambiguous and two domains never share a key.
pub fn shard_key(domain: &str, file: &str) -> String {
    format!("{domain}_{file}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_spread_and_keys_are_distinct() {
        assert_eq!(shard_of("example.com"), shard_of("example.com"));
        let used: std::collections::BTreeSet<u32> = (0..200)
            .map(|i| shard_of(&format!("d{i}.bench.test")))
            .collect();
        assert_eq!(used.len(), SHARDS as usize, "200 domains use every shard");
        for (domain, file) in [("a.com", "tls.crt"), ("xn--a-b.test", "kubemail1.pem")] {
            assert_eq!(
                shard_key(domain, file).split_once('_'),
                Some((domain, file))
            );
        }
        assert!(shard_key("xn--bcher-kva.example", "users").is_ascii());
    }
}
