//! The suppression list: addresses a MailDomain no longer sends to, one JetStream KV bucket
//! shared by every node and the operator, and the library API of it (the node checks and
//! adds entries, the operator reconciles `Suppression` objects, the CLI lists and removes).
//!
//! # Bucket
//! [`SUPPRESSION_BUCKET`] (`KUBEMAIL_SUPPRESSION`), history 1, file storage. Key:
//! [`suppression_key`] = `<domain token>.<encoded address>`: the sending domain as
//! [`domain_token`], then the lower-cased address with every byte other than ASCII letters,
//! digits, `-`, `_` and `.` written as `=XX` (hex), which is injective and keeps the key
//! within the KV key alphabet (`bob+x@r.test` → `bob=2bx=40r.test`). Value: JSON of a
//! [`SuppressionEntry`]. An entry past its `expiresAt` counts as absent (and is removed by
//! whoever notices it); the bucket itself has no `max_age`, so manual entries without expiry
//! stay.
//!
//! **Credentials.** A node of domain `d` needs `$KV.KUBEMAIL_SUPPRESSION.<d token>.>`
//! (publish and subscribe), `$JS.API.STREAM.INFO.KV_KUBEMAIL_SUPPRESSION`,
//! `$JS.API.STREAM.CREATE.KV_KUBEMAIL_SUPPRESSION` and
//! `$JS.API.DIRECT.GET.KV_KUBEMAIL_SUPPRESSION.$KV.KUBEMAIL_SUPPRESSION.<d token>.>` (and
//! `$JS.API.STREAM.MSG.GET.KV_KUBEMAIL_SUPPRESSION`), so it reads and writes only its own
//! domain's entries.

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
    let mut key = domain_token(domain);
    key.push('.');
    for b in address.to_ascii_lowercase().bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            key.push(char::from(b));
        } else {
            key.push_str(&format!("={b:02x}"));
        }
    }
    key
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
    store: kv::Store,
}

impl SuppressionList {
    /// Opens the bucket, creating it when missing.
    pub async fn open(js: &jetstream::Context) -> Result<Self, SuppressionError> {
        let store = match js.get_key_value(SUPPRESSION_BUCKET).await {
            Ok(store) => store,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: SUPPRESSION_BUCKET.to_owned(),
                    description: "kubemail suppression lists".to_owned(),
                    history: 1,
                    max_value_size: 16 * 1024,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| SuppressionError::OpenBucket(Box::new(e)))?,
        };
        Ok(Self { store })
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

    /// Removes `address` from `domain`'s list (nothing happens when it is not there).
    pub async fn remove(&self, domain: &str, address: &str) -> Result<(), SuppressionError> {
        self.store
            .purge(suppression_key(domain, address))
            .await
            .map_err(|e| SuppressionError::Write {
                address: address.to_owned(),
                source: Box::new(e),
            })
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
    fn keys_are_injective_and_in_the_kv_alphabet() {
        assert_eq!(
            suppression_key("Example.COM", "Bob+x@R.test"),
            "example_com.bob=2bx=40r.test"
        );
        assert_ne!(
            suppression_key("example.com", "a=40b@r.test"),
            suppression_key("example.com", "a@b@r.test")
        );
        let key = suppression_key("example.com", "\"odd person\"@r.test");
        assert!(
            key.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.=".contains(&b)),
            "{key}"
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
