//! The operator's own NATS connection and the JetStream objects it manages when NATS is
//! authenticated: the queue stream (its replica count follows `nats.replicas`; an R1 stream
//! is updated to R3 in place, JetStream copying what it holds to the new peers), the
//! AUTH-failure stream, and each domain's durable consumer and body bucket. The nodes'
//! credentials may use these objects but not create, change or delete them.
//!
//! The connection authenticates with a short-lived user minted at every (re)connection from
//! the account's signing key, so it never holds an expired JWT, and verifies the server's
//! certificate against the configured CA.

use std::time::Duration;

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{self, ErrorCode};
use kubemail_config::{AuthConfig, ConsumerConfig, NatsConfig};
use kubemail_queue::streams;

use super::credentials;
use super::trust::AccountKeys;
use crate::timestamps;

/// Reply-inbox prefix of the operator's connection (its credentials may read only this).
pub const OPERATOR_INBOX: &str = "_INBOX_kubemail_operator";
/// Lifetime of the operator's own user JWT: a new one is minted at every connection.
const OPERATOR_JWT_VALIDITY: i64 = 3600;

/// How the operator reaches NATS.
#[derive(Debug, Clone, Default)]
pub struct NatsAccess {
    /// Server URL(s), comma separated.
    pub url: String,
    /// CA certificate(s) (PEM) that sign the server certificate; set: TLS is required and
    /// the server must present a certificate of this CA.
    pub ca_pem: Option<String>,
    /// The account to mint users with; `None`: NATS without authentication.
    pub account: Option<AccountKeys>,
    /// Deadline of connecting and of each request.
    pub timeout: Duration,
}

/// Why a JetStream object could not be managed.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error("cannot connect to NATS at {url}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("the NATS CA certificate cannot be used: {0}")]
    InvalidCa(String),
    #[error("cannot look up stream {stream}")]
    GetStream {
        stream: String,
        #[source]
        source: async_nats::jetstream::context::GetStreamError,
    },
    #[error("cannot create stream {stream}")]
    CreateStream {
        stream: String,
        #[source]
        source: async_nats::jetstream::context::CreateStreamError,
    },
    #[error("cannot ensure the events stream {stream}")]
    EventsStream {
        stream: String,
        #[source]
        source: kubemail_queue::streams::EnsureEventsError,
    },
    #[error("cannot update stream {stream}")]
    UpdateStream {
        stream: String,
        #[source]
        source: async_nats::jetstream::context::UpdateStreamError,
    },
    #[error("stream {stream} exists with {what}, which cannot be changed in place")]
    IncompatibleStream { stream: String, what: String },
    #[error("cannot create or update consumer {consumer}")]
    Consumer {
        consumer: String,
        #[source]
        source: async_nats::jetstream::stream::ConsumerError,
    },
    #[error("cannot create object store bucket {bucket}")]
    Bucket {
        bucket: String,
        #[source]
        source: async_nats::jetstream::context::CreateObjectStoreError,
    },
    #[error("cannot create key-value bucket {bucket}")]
    KeyValue {
        bucket: String,
        #[source]
        source: async_nats::jetstream::context::CreateKeyValueError,
    },
    #[error("NATS did not answer within {0:?}")]
    TimedOut(Duration),
}

impl NatsAccess {
    /// NATS at `url` without TLS or authentication (a developer's NATS, tests).
    pub fn plain(url: &str, timeout: Duration) -> Self {
        Self {
            url: url.to_owned(),
            ca_pem: None,
            account: None,
            timeout,
        }
    }

    /// A client for one piece of work (the operator's calls are rare: a reconcile, a
    /// finalizer).
    pub async fn connect(&self) -> Result<async_nats::Client, ManageError> {
        let mut options = match &self.account {
            Some(account) => {
                let account = account.clone();
                async_nats::ConnectOptions::with_auth_callback(move |nonce| {
                    let account = account.clone();
                    async move {
                        let minted = credentials::operator_credentials(
                            &account,
                            OPERATOR_INBOX,
                            timestamps::now(),
                            OPERATOR_JWT_VALIDITY,
                        )
                        .map_err(async_nats::AuthError::new)?;
                        let (jwt, seed) = kubemail_queue::credentials::parse(&minted.creds)
                            .map_err(async_nats::AuthError::new)?;
                        let key =
                            nkeys::KeyPair::from_seed(&seed).map_err(async_nats::AuthError::new)?;
                        let mut auth = async_nats::Auth::new();
                        auth.jwt = Some(jwt);
                        auth.signature =
                            Some(key.sign(&nonce).map_err(async_nats::AuthError::new)?);
                        Ok(auth)
                    }
                })
                .custom_inbox_prefix(OPERATOR_INBOX)
            }
            None => async_nats::ConnectOptions::new(),
        };
        if let Some(ca) = &self.ca_pem {
            options = options.tls_client_config(client_tls(ca)?).require_tls(true);
        }
        let urls: Vec<&str> = self
            .url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        options
            .name("kubemail-operator")
            .connection_timeout(self.timeout)
            .request_timeout(Some(self.timeout))
            .connect(urls)
            .await
            .map_err(|source| ManageError::Connect {
                url: self.url.clone(),
                source,
            })
    }

    /// Creates or updates every shared object and those of `domains`, within the timeout.
    pub async fn ensure(
        &self,
        nats: &NatsConfig,
        auth: &AuthConfig,
        consumer: &ConsumerConfig,
        domains: &[String],
    ) -> Result<(), ManageError> {
        let work = async {
            let client = self.connect().await?;
            let mut js = jetstream::new(client);
            js.set_timeout(self.timeout);
            ensure_queue_stream(&js, nats).await?;
            ensure_failure_stream(&js, nats, auth).await?;
            ensure_tls_policy_objects(&js, nats).await?;
            ensure_event_objects(&js, nats).await?;
            ensure_delivery_buckets(&js, nats).await?;
            for domain in domains {
                ensure_domain(&js, nats, domain, consumer).await?;
            }
            Ok(())
        };
        // The whole sequence may not hang a reconcile.
        tokio::time::timeout(self.timeout * 4, work)
            .await
            .map_err(|_| ManageError::TimedOut(self.timeout * 4))?
    }
}

/// A TLS client configuration that trusts the certificates of `ca_pem` only.
pub fn client_tls(ca_pem: &str) -> Result<rustls::ClientConfig, ManageError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| ManageError::InvalidCa(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| ManageError::InvalidCa(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ManageError::InvalidCa("no certificate in it".to_owned()));
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ManageError::InvalidCa(e.to_string()))
    .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// Creates the queue stream, or brings it to the contract's settings (replicas included).
pub async fn ensure_queue_stream(
    js: &jetstream::Context,
    nats: &NatsConfig,
) -> Result<(), ManageError> {
    let desired = streams::queue_stream_config(nats);
    let name = desired.name.clone();
    let current = match js.get_stream(&name).await {
        Ok(mut s) => Some(
            s.info()
                .await
                .map(|i| i.config.clone())
                .unwrap_or_else(|_| s.cached_info().config.clone()),
        ),
        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) => {
            None
        }
        Err(source) => {
            return Err(ManageError::GetStream {
                stream: name,
                source,
            });
        }
    };
    match current {
        None => {
            js.create_stream(desired)
                .await
                .map_err(|source| ManageError::CreateStream {
                    stream: name.clone(),
                    source,
                })?;
            tracing::info!(stream = %name, replicas = nats.replicas, "created the queue stream");
        }
        Some(current) => {
            if current.retention != desired.retention || current.storage != desired.storage {
                return Err(ManageError::IncompatibleStream {
                    stream: name,
                    what: format!(
                        "retention {:?}, storage {:?}",
                        current.retention, current.storage
                    ),
                });
            }
            if streams::queue_stream_differs(&current, &desired) {
                let mut update = desired;
                // Keep subjects other tools added; add ours.
                for s in &current.subjects {
                    if !update.subjects.contains(s) {
                        update.subjects.push(s.clone());
                    }
                }
                js.update_stream(update)
                    .await
                    .map_err(|source| ManageError::UpdateStream {
                        stream: name.clone(),
                        source,
                    })?;
                tracing::info!(
                    stream = %name,
                    from_replicas = current.num_replicas,
                    replicas = nats.replicas,
                    "updated the queue stream"
                );
            }
        }
    }
    Ok(())
}

/// Creates or updates the AUTH-failure stream.
pub async fn ensure_failure_stream(
    js: &jetstream::Context,
    nats: &NatsConfig,
    auth: &AuthConfig,
) -> Result<(), ManageError> {
    let config = streams::failure_stream_config(nats, auth);
    let name = config.name.clone();
    js.create_or_update_stream(config)
        .await
        .map(drop)
        .map_err(|source| ManageError::CreateStream {
            stream: name,
            source,
        })
}

/// Creates the delivery events stream and the suppression bucket when missing (the events
/// stream with the default limits: the nodes' `events.maxAge`/`maxBytes` apply only where
/// they manage the objects themselves).
pub async fn ensure_event_objects(
    js: &jetstream::Context,
    nats: &NatsConfig,
) -> Result<(), ManageError> {
    let bucket = streams::suppression_bucket_config(nats.replicas);
    if js.get_key_value(&bucket.bucket).await.is_err() {
        let name = bucket.bucket.clone();
        js.create_key_value(bucket)
            .await
            .map_err(|source| ManageError::KeyValue {
                bucket: name,
                source,
            })?;
    }
    let events = streams::events_stream_config(
        nats.replicas,
        streams::EVENTS_DEFAULT_MAX_AGE,
        streams::EVENTS_DEFAULT_MAX_BYTES,
    );
    let name = events.name.clone();
    streams::ensure_events_stream(js, events, true)
        .await
        .map_err(|source| ManageError::EventsStream {
            stream: name,
            source,
        })?;
    Ok(())
}

/// Creates the delivery side's TLS-policy objects (MTA-STS cache, TLS-RPT results and claims)
/// when missing: the nodes may use them but not create them.
pub async fn ensure_tls_policy_objects(
    js: &jetstream::Context,
    nats: &NatsConfig,
) -> Result<(), ManageError> {
    for kv in [
        streams::mta_sts_cache_config(nats.replicas),
        streams::tlsrpt_claims_config(nats.replicas),
    ] {
        if js.get_key_value(&kv.bucket).await.is_err() {
            let bucket = kv.bucket.clone();
            js.create_key_value(kv)
                .await
                .map_err(|source| ManageError::KeyValue { bucket, source })?;
        }
    }
    let results = streams::tlsrpt_stream_config(nats.replicas);
    let name = results.name.clone();
    js.get_or_create_stream(results)
        .await
        .map(drop)
        .map_err(|source| ManageError::CreateStream {
            stream: name,
            source,
        })
}

/// Creates the buckets of delivery pauses, traffic shaping and operators' queue actions when
/// missing: the nodes may use them but not create them.
pub async fn ensure_delivery_buckets(
    js: &jetstream::Context,
    nats: &NatsConfig,
) -> Result<(), ManageError> {
    for kv in streams::delivery_buckets(nats.replicas) {
        if js.get_key_value(&kv.bucket).await.is_err() {
            let bucket = kv.bucket.clone();
            js.create_key_value(kv)
                .await
                .map_err(|source| ManageError::KeyValue { bucket, source })?;
        }
    }
    Ok(())
}

/// Creates or updates `domain`'s consumer, and creates its body bucket when missing.
pub async fn ensure_domain(
    js: &jetstream::Context,
    nats: &NatsConfig,
    domain: &str,
    consumer: &ConsumerConfig,
) -> Result<(), ManageError> {
    let stream = js
        .get_stream(&nats.stream)
        .await
        .map_err(|source| ManageError::GetStream {
            stream: nats.stream.clone(),
            source,
        })?;
    let config = streams::consumer_config(nats, domain, consumer);
    let name = kubemail_queue::consumer_name(domain);
    match stream.create_consumer(config.clone()).await {
        Ok(_) => {}
        // A consumer of the legacy name for this domain holds the filter: replace it (its
        // entries stay in the work-queue stream for the new one), as the nodes did themselves.
        Err(e) if matches!(e.kind(), ConsumerErrorKind::JetStream(j) if j.error_code() == ErrorCode::CONSUMER_WQ_CONSUMER_NOT_UNIQUE) =>
        {
            let removed = crate::queue::remove_legacy_consumer(&stream, &nats.stream, domain)
                .await
                .unwrap_or(false);
            if !removed {
                return Err(ManageError::Consumer {
                    consumer: name,
                    source: e,
                });
            }
            stream
                .create_consumer(config)
                .await
                .map_err(|source| ManageError::Consumer {
                    consumer: name.clone(),
                    source,
                })?;
        }
        Err(source) => {
            return Err(ManageError::Consumer {
                consumer: name,
                source,
            });
        }
    }
    let bucket = streams::body_bucket_config(nats, domain);
    let bucket_stream = format!("OBJ_{}", bucket.bucket);
    match js.get_stream(&bucket_stream).await {
        Ok(mut existing) => {
            // Follow the replica count like the queue stream (R1 -> R3 in place).
            let config = existing
                .info()
                .await
                .map(|i| i.config.clone())
                .unwrap_or_else(|_| existing.cached_info().config.clone());
            if config.num_replicas.max(1) != bucket.num_replicas.max(1) {
                let mut update = config;
                update.num_replicas = bucket.num_replicas;
                js.update_stream(update)
                    .await
                    .map_err(|source| ManageError::UpdateStream {
                        stream: bucket_stream,
                        source,
                    })?;
            }
        }
        Err(_) => {
            let name = bucket.bucket.clone();
            js.create_object_store(bucket)
                .await
                .map_err(|source| ManageError::Bucket {
                    bucket: name,
                    source,
                })?;
        }
    }
    Ok(())
}
