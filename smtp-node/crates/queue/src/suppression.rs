//! The suppression list: addresses a MailDomain no longer sends to, one JetStream KV bucket
//! shared by every node and the operator, and the library API of it (the node checks and
//! adds entries, the operator reconciles `Suppression` objects, the CLI lists and removes).
//!
//! # Bucket
//! [`SUPPRESSION_BUCKET`] (`KUBEMAIL_SUPPRESSION`, [`crate::streams::suppression_bucket_config`]),
//! history 1, file storage. Key: [`suppression_key`] = `<domain token>.<hex SHA-256 of the
//! lower-cased address>`: the sending domain as [`domain_token`], and a hash, so that the key
//! names (which a stream's info can list) reveal no address. Value: JSON of a
//! [`SuppressionEntry`], which holds the address. An entry past its `expiresAt` counts as
//! absent; the bucket has no `max_age`, so manual entries without expiry stay. A removal
//! purges the key's messages, so the number of keys under a domain's prefix is the size of its
//! list (expired entries included until removed).
//!
//! **Credentials** ([`crate::permissions::node_permissions`]). A node of domain `d` may
//! publish to `$KV.KUBEMAIL_SUPPRESSION.<d token>.>` (add entries), read the bucket's stream
//! info, and read entries only through `$JS.API.DIRECT.GET.KV_KUBEMAIL_SUPPRESSION.
//! $KV.KUBEMAIL_SUPPRESSION.<d token>.>`: its own domain's entries, nothing of another's.
//! Listing and removing are for the operator and tools with the operator's access.

use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, kv};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

use crate::events::BounceClass;
use crate::names::domain_token;
use crate::{parse_rfc3339, rfc3339};

/// The KV bucket of every domain's suppression list.
pub const SUPPRESSION_BUCKET: &str = "KUBEMAIL_SUPPRESSION";

/// Why an address is suppressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SuppressionReason {
    /// A hard bounce of class `invalid-recipient` (ours or an inbound DSN).
    Bounce,
    /// A complaint (an ARF feedback report).
    Complaint,
    /// Added by hand (a `Suppression` object or the CLI).
    Manual,
}

impl SuppressionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bounce => "bounce",
            Self::Complaint => "complaint",
            Self::Manual => "manual",
        }
    }
}

/// One suppressed address of one domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SuppressionEntry {
    /// The sending MailDomain whose list this is.
    pub domain: String,
    /// The suppressed address, lower case.
    pub address: String,
    pub reason: SuppressionReason,
    /// The bounce class that caused it (for `bounce`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<BounceClass>,
    /// The id of the event that caused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_event: Option<String>,
    /// A note (the remote reply, or the reason given by hand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339; absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

impl SuppressionEntry {
    /// An entry created `now`, expiring after `ttl` (never when `None`).
    pub fn new(
        domain: &str,
        address: &str,
        reason: SuppressionReason,
        now: SystemTime,
        ttl: Option<Duration>,
    ) -> Self {
        Self {
            domain: domain.to_ascii_lowercase(),
            address: address.to_ascii_lowercase(),
            reason,
            class: None,
            source_event: None,
            note: None,
            created_at: rfc3339(now),
            expires_at: ttl.map(|t| rfc3339(now + t)),
        }
    }

    /// Whether the entry has expired at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at
            .as_deref()
            .and_then(parse_rfc3339)
            .is_some_and(|at| at <= now)
    }
}

/// The KV key of `address` in `domain`'s list (see the module doc).
pub fn suppression_key(domain: &str, address: &str) -> String {
    use sha2::{Digest as _, Sha256};
    let digest = Sha256::digest(address.to_ascii_lowercase().as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}.{hex}", domain_token(domain))
}

/// The filter of every key of `domain`'s list.
pub fn suppression_domain_filter(domain: &str) -> String {
    format!("$KV.{SUPPRESSION_BUCKET}.{}.>", domain_token(domain))
}

/// Why the suppression list could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SuppressionError {
    #[error("cannot open the suppression bucket")]
    OpenBucket(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot read the suppression entry of {address}")]
    Read {
        address: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot write the suppression entry of {address}")]
    Write {
        address: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot list the suppression entries of {domain}")]
    List {
        domain: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The suppression list of every domain, over the KV bucket.
#[derive(Clone)]
pub struct SuppressionList {
    js: jetstream::Context,
    store: kv::Store,
}

impl SuppressionList {
    /// Opens the bucket, creating it (one replica) when missing and allowed.
    pub async fn open(js: &jetstream::Context) -> Result<Self, SuppressionError> {
        let store = match js.get_key_value(SUPPRESSION_BUCKET).await {
            Ok(store) => store,
            Err(_) => js
                .create_key_value(crate::streams::suppression_bucket_config(1))
                .await
                .map_err(|e| SuppressionError::OpenBucket(Box::new(e)))?,
        };
        Ok(Self {
            js: js.clone(),
            store,
        })
    }

    /// How many keys `domain`'s list has (live and expired entries), from the stream's
    /// per-subject counts: what a node may read without listing addresses.
    pub async fn count(&self, domain: &str) -> Result<u64, SuppressionError> {
        let list_error = |e: Box<dyn std::error::Error + Send + Sync>| SuppressionError::List {
            domain: domain.to_owned(),
            source: e,
        };
        let stream = self
            .js
            .get_stream(format!("KV_{SUPPRESSION_BUCKET}"))
            .await
            .map_err(|e| list_error(Box::new(e)))?;
        let mut subjects = stream
            .info_with_subjects(suppression_domain_filter(domain))
            .await
            .map_err(|e| list_error(Box::new(e)))?;
        let mut n = 0;
        while let Some(subject) = subjects.next().await {
            subject.map_err(|e| list_error(Box::new(e)))?;
            n += 1;
        }
        Ok(n)
    }

    /// The live entry of `address` in `domain`'s list; an expired one counts as absent.
    pub async fn get(
        &self,
        domain: &str,
        address: &str,
        now: SystemTime,
    ) -> Result<Option<SuppressionEntry>, SuppressionError> {
        let value = self
            .store
            .get(suppression_key(domain, address))
            .await
            .map_err(|e| SuppressionError::Read {
                address: address.to_owned(),
                source: Box::new(e),
            })?;
        Ok(value
            .and_then(|v| serde_json::from_slice::<SuppressionEntry>(&v).ok())
            .filter(|e| !e.is_expired(now)))
    }

    /// Adds or replaces an entry.
    pub async fn put(&self, entry: &SuppressionEntry) -> Result<(), SuppressionError> {
        let write = |e: Box<dyn std::error::Error + Send + Sync>| SuppressionError::Write {
            address: entry.address.clone(),
            source: e,
        };
        let value = serde_json::to_vec(entry).map_err(|e| write(Box::new(e)))?;
        self.store
            .put(suppression_key(&entry.domain, &entry.address), value.into())
            .await
            .map_err(|e| write(Box::new(e)))?;
        Ok(())
    }

    /// Removes `address` from `domain`'s list (nothing happens when it is not there): every
    /// message of its key is purged, so no marker is left to count.
    pub async fn remove(&self, domain: &str, address: &str) -> Result<(), SuppressionError> {
        let write = |e: Box<dyn std::error::Error + Send + Sync>| SuppressionError::Write {
            address: address.to_owned(),
            source: e,
        };
        let stream = self
            .js
            .get_stream(format!("KV_{SUPPRESSION_BUCKET}"))
            .await
            .map_err(|e| write(Box::new(e)))?;
        stream
            .purge()
            .filter(format!(
                "$KV.{SUPPRESSION_BUCKET}.{}",
                suppression_key(domain, address)
            ))
            .await
            .map_err(|e| write(Box::new(e)))?;
        Ok(())
    }

    /// Every live entry of `domain`'s list, sorted by address.
    pub async fn list(
        &self,
        domain: &str,
        now: SystemTime,
    ) -> Result<Vec<SuppressionEntry>, SuppressionError> {
        let list_error = |e: Box<dyn std::error::Error + Send + Sync>| SuppressionError::List {
            domain: domain.to_owned(),
            source: e,
        };
        let prefix = format!("{}.", domain_token(domain));
        let mut keys = self
            .store
            .keys()
            .await
            .map_err(|e| list_error(Box::new(e)))?;
        let mut entries = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| list_error(Box::new(e)))?;
            if !key.starts_with(&prefix) {
                continue;
            }
            let value = self
                .store
                .get(&key)
                .await
                .map_err(|e| list_error(Box::new(e)))?;
            if let Some(entry) = value
                .and_then(|v| serde_json::from_slice::<SuppressionEntry>(&v).ok())
                .filter(|e| !e.is_expired(now))
            {
                entries.push(entry);
            }
        }
        entries.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(entries)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_domain_and_hide_the_address() {
        let key = suppression_key("Example.COM", "Bob+x@R.test");
        assert_eq!(key, suppression_key("example.com", "bob+x@r.test"));
        assert!(key.starts_with("example_com."), "{key}");
        assert_eq!(key.len(), "example_com.".len() + 64);
        assert!(!key.contains("bob"), "{key}");
        assert_ne!(key, suppression_key("example.com", "carol@r.test"));
        assert_ne!(key, suppression_key("example.org", "bob+x@r.test"));
        assert_eq!(
            suppression_domain_filter("example.com"),
            "$KV.KUBEMAIL_SUPPRESSION.example_com.>"
        );
    }

    #[test]
    fn expiry() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let e = SuppressionEntry::new(
            "example.com",
            "Bob@R.test",
            SuppressionReason::Bounce,
            now,
            Some(Duration::from_secs(60)),
        );
        assert_eq!(e.address, "bob@r.test");
        assert!(!e.is_expired(now));
        assert!(e.is_expired(now + Duration::from_secs(60)));
        let manual = SuppressionEntry::new(
            "example.com",
            "x@r.test",
            SuppressionReason::Manual,
            now,
            None,
        );
        assert!(!manual.is_expired(now + Duration::from_secs(10 * 365 * 86_400)));
    }
}
