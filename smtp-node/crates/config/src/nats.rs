//! `nats`: the JetStream connection, the queue stream and the object store for large bodies.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, HumanDuration};

/// Environment variable that overrides the default NATS URL.
pub const NATS_URL_ENV: &str = "NATS_URL";

/// NATS URL used when neither the config nor `NATS_URL` name one.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// The JetStream queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma separated. Default: `$NATS_URL`, else `nats://127.0.0.1:4222`.
    #[serde(default = "default_nats_url")]
    pub url: String,
    /// Stream holding the queue.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Queue subjects are `<subjectPrefix>.<domain>`.
    #[serde(default = "default_subject_prefix")]
    pub subject_prefix: String,
    /// NATS credentials file (user JWT + NKey seed), if the server requires one. Read again at
    /// every (re)connection, so a rotated file is picked up when the old JWT expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) that sign the NATS server's certificate. Set: the connection
    /// must use TLS and the server certificate is verified against these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Refuse a NATS server that does not offer TLS (implied by `caFile`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_tls: bool,
    /// Prefix of this node's reply subjects (`<prefix>.<id>`); the NATS credentials may allow
    /// subscribing to this prefix only. Unset: NATS' `_INBOX`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbox_prefix: Option<String>,
    /// Whether the node creates and updates the JetStream objects it uses (the queue stream,
    /// its domains' consumers and body buckets, the AUTH-failure stream). True for a node on
    /// its own (developer mode, tests); the operator renders false, creates them itself and
    /// gives the node credentials that may not. When false, the node waits for the objects
    /// to exist (not ready, `451 4.3.0`) instead of creating them.
    #[serde(default = "default_true")]
    pub manage_streams: bool,
    /// How long to wait for the JetStream acknowledgement before answering `451 4.3.0`.
    #[serde(default = "default_publish_timeout")]
    pub publish_timeout: HumanDuration,
    /// Stream and object store replicas (1 on a laptop, 3 in production).
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// Stream size limit; when full, publishes fail and clients get `452 4.3.1`. Unset: no
    /// limit other than the server's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<ByteSize>,
    /// Window within which a repeated `Nats-Msg-Id` is dropped as a duplicate.
    #[serde(default = "default_duplicate_window")]
    pub duplicate_window: HumanDuration,
    /// Object store buckets for bodies too large to publish inline: one per domain,
    /// `<bodyBucket>-<domain with dots as underscores>`.
    #[serde(default = "default_body_bucket")]
    pub body_bucket: String,
    /// Bodies larger than this (or than the server's max payload minus headroom for headers)
    /// go to the object store.
    #[serde(default = "default_inline_body_limit")]
    pub inline_body_limit: ByteSize,
    /// Write the entries of sessions that finish together as one JetStream atomic batch,
    /// synced once (group commit), and likewise the delivery events of concurrent sessions
    /// and deliveries. It pays where the server syncs every write
    /// (`sync_interval: always`, the durability the `250` is meant to stand for); a single
    /// server that does not sync each write only pays for the batch's staging: turn it off
    /// there.
    #[serde(default = "crate::default_true")]
    pub group_commit: bool,
}

/// The built-in defaults, without looking at the environment: what the operator renders
/// must not depend on where the operator runs.
impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_NATS_URL.to_owned(),
            stream: default_stream(),
            subject_prefix: default_subject_prefix(),
            credentials_file: None,
            ca_file: None,
            require_tls: false,
            inbox_prefix: None,
            manage_streams: true,
            publish_timeout: default_publish_timeout(),
            replicas: default_replicas(),
            max_bytes: None,
            duplicate_window: default_duplicate_window(),
            body_bucket: default_body_bucket(),
            inline_body_limit: default_inline_body_limit(),
            group_commit: true,
        }
    }
}

impl NatsConfig {
    /// What a config file without a `nats` section means: the defaults, with `$NATS_URL`.
    pub fn from_env() -> Self {
        Self {
            url: default_nats_url(),
            ..Self::default()
        }
    }

    pub(crate) fn validate(&self, errors: &mut Vec<String>) {
        let nats = self;
        if nats.url.trim().is_empty() {
            errors.push("nats.url: must not be empty".to_owned());
        }
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !name_ok(&nats.stream) {
            errors.push(format!(
                "nats.stream: {:?} must use only letters, digits, '-' and '_'",
                nats.stream
            ));
        }
        if !name_ok(&nats.body_bucket) {
            errors.push(format!(
                "nats.bodyBucket: {:?} must use only letters, digits, '-' and '_'",
                nats.body_bucket
            ));
        }
        let prefix_ok = !nats.subject_prefix.is_empty()
            && nats.subject_prefix.split('.').all(|token| {
                !token.is_empty()
                    && token
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
            });
        if !prefix_ok {
            errors.push(format!(
                "nats.subjectPrefix: {:?} must be dot-separated non-empty tokens without wildcards",
                nats.subject_prefix
            ));
        }
        if nats.publish_timeout.0.is_zero() {
            errors.push("nats.publishTimeout: must be greater than 0".to_owned());
        }
        if nats.duplicate_window.0.is_zero() {
            errors.push("nats.duplicateWindow: must be greater than 0".to_owned());
        }
        if !(1..=5).contains(&nats.replicas) {
            errors.push(format!("nats.replicas: {} must be 1 to 5", nats.replicas));
        }
        if let Some(prefix) = &nats.inbox_prefix {
            let ok = !prefix.is_empty()
                && prefix.split('.').all(|token| {
                    !token.is_empty()
                        && token
                            .bytes()
                            .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
                });
            if !ok {
                errors.push(format!(
                    "nats.inboxPrefix: {prefix:?} must be dot-separated non-empty tokens without wildcards"
                ));
            }
        }
        if nats.inline_body_limit.0 < 1024 {
            errors.push("nats.inlineBodyLimit: must be at least 1Ki".to_owned());
        }
    }
}

fn default_nats_url() -> String {
    std::env::var(NATS_URL_ENV)
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_NATS_URL.to_owned())
}
fn default_stream() -> String {
    "KUBEMAIL".to_owned()
}
fn default_subject_prefix() -> String {
    "kubemail.queue".to_owned()
}
fn default_body_bucket() -> String {
    "KUBEMAIL_BODIES".to_owned()
}
fn default_publish_timeout() -> HumanDuration {
    HumanDuration::from_secs(10)
}
// NATS' own default; our publisher does not retry on its own, so 2 min covers its horizon.
fn default_duplicate_window() -> HumanDuration {
    HumanDuration::from_secs(120)
}
fn default_true() -> bool {
    true
}
fn default_replicas() -> u32 {
    1
}
// Well under the NATS default max_payload of 1 MiB, leaving room for envelope headers.
fn default_inline_body_limit() -> ByteSize {
    ByteSize(512 * 1024)
}
