//! Provision: the key material a MailDomain needs before its children can be built: DKIM keys
//! (kept, made or retired per the rotation plan), the TLS certificate (kept until renewal, or
//! issued by the operator's CA, which is created on first use), the rendered users file and the
//! key that hashes user names in the nodes' shared AUTH failure count (made once, then kept).
//!
//! This is where randomness and CPU-heavy work live (RSA key generation, argon2), on blocking
//! threads. The only cluster write is creating the shared CA Secret once; everything else is
//! applied later by [`apply`](super::apply), so a failure here leaves nothing half-written.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

use super::dereference::Dereferenced;
use super::validate::{TlsSource, ValidatedDomain};
use crate::certs::{self, CaBundle, IssuedCert, RenewReason, TLS_CERT_KEY, TLS_KEY_KEY};
use crate::controller::{Context, Error, MANAGED_BY, MANAGED_BY_LABEL};
use crate::dkim::{self, DkimKeys, PrivateKeyPem};
use crate::timestamps::UnixSeconds;
use crate::users::{self, USERNAME_KEY_KEY, USERS_FILE_KEY, UsersCache};

/// The material the children are built from.
#[derive(Debug, Clone)]
pub struct Provisioned {
    pub dkim: DkimKeys,
    pub tls: TlsMaterial,
    /// The rendered users file, when the domain has submission users.
    pub users_file: Option<String>,
    /// The key of the node's per-user AUTH failure count (hex), with the users file.
    pub username_key: Option<String>,
}

/// The certificate of the domain.
#[derive(Debug, Clone)]
pub enum TlsMaterial {
    /// Issued by the operator's CA.
    OperatorCa {
        leaf: IssuedCert,
        ca_cert_pem: String,
        /// Set when the leaf was issued in this pass, and why.
        issued: Option<RenewReason>,
    },
    /// Issued by cert-manager; what its `Certificate` reports.
    CertManager {
        ready: bool,
        reason: String,
        message: String,
        not_after: Option<String>,
    },
}

impl TlsMaterial {
    /// When the certificate the nodes serve expires: the operator's leaf (the one this
    /// reconcile writes into the TLS Secret), or what cert-manager wrote into `tls_secret`.
    pub fn not_after(&self, tls_secret: Option<&Secret>) -> Option<UnixSeconds> {
        match self {
            Self::OperatorCa { leaf, .. } => Some(leaf.not_after),
            Self::CertManager { .. } => tls_secret
                .and_then(|s| secret_text(s, TLS_CERT_KEY))
                .and_then(|pem| certs::certificate_not_after(&pem)),
        }
    }
}

/// Makes or reuses the DKIM keys, the certificate and the users file.
pub async fn provision(
    ctx: &Context,
    v: &ValidatedDomain,
    refs: &Dereferenced,
    now: UnixSeconds,
) -> Result<Provisioned, Error> {
    let dkim = {
        let secret = refs.dkim_secret.clone();
        let policy = v.dkim.clone();
        tokio::task::spawn_blocking(move || dkim::provision(secret.as_ref(), &policy, now))
            .await
            .map_err(|_| Error::BlockingTaskFailed("dkim"))?
            .map_err(Error::ProvisionDkim)?
    };
    let tls = match &v.tls {
        TlsSource::OperatorCa => {
            let ca = ensure_ca(ctx, now).await?;
            operator_certificate(
                &ca,
                v,
                refs.tls_secret.as_ref(),
                now,
                ctx.config.certificate_validity,
            )?
        }
        TlsSource::CertManager(_) => cert_manager_status(refs),
    };
    let users_file = match &v.users {
        None => None,
        Some(source) => Some(render_users(&ctx.users_cache, v, refs, source.clone()).await?),
    };
    let username_key = users_file.as_ref().map(|_| {
        users::username_key(
            refs.users_rendered
                .as_ref()
                .and_then(|s| secret_text(s, USERNAME_KEY_KEY))
                .as_deref(),
        )
    });
    Ok(Provisioned {
        dkim,
        tls,
        users_file,
        username_key,
    })
}

/// Reads the operator's CA from its Secret, creating both on first use.
pub async fn ensure_ca(ctx: &Context, now: UnixSeconds) -> Result<CaBundle, Error> {
    let ns = &ctx.config.operator_namespace;
    let name = &ctx.config.ca_secret_name;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    if let Some(existing) = api
        .get_opt(name)
        .await
        .map_err(|source| Error::ReadObject {
            kind: "Secret",
            name: format!("{ns}/{name}"),
            source,
        })?
    {
        return ca_from_secret(&existing).ok_or_else(|| Error::InvalidCa(format!("{ns}/{name}")));
    }
    let ca = certs::new_ca(now).map_err(Error::IssueCertificate)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                MANAGED_BY.to_owned(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            (
                TLS_CERT_KEY.to_owned(),
                ByteString(ca.cert_pem.clone().into_bytes()),
            ),
            (
                TLS_KEY_KEY.to_owned(),
                ByteString(ca.key_pem.expose().as_bytes().to_vec()),
            ),
        ])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %format!("{ns}/{name}"), "created the operator CA");
            Ok(ca)
        }
        // Another replica (briefly two leaders) made it first: use theirs.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let existing = api.get(name).await.map_err(|source| Error::ReadObject {
                kind: "Secret",
                name: format!("{ns}/{name}"),
                source,
            })?;
            ca_from_secret(&existing).ok_or_else(|| Error::InvalidCa(format!("{ns}/{name}")))
        }
        Err(source) => Err(Error::CreateCa {
            name: format!("{ns}/{name}"),
            source,
        }),
    }
}

fn ca_from_secret(secret: &Secret) -> Option<CaBundle> {
    let cert = secret_text(secret, TLS_CERT_KEY)?;
    let key = secret_text(secret, TLS_KEY_KEY)?;
    Some(CaBundle {
        cert_pem: cert,
        key_pem: PrivateKeyPem::new(key),
    })
}

fn operator_certificate(
    ca: &CaBundle,
    v: &ValidatedDomain,
    existing: Option<&Secret>,
    now: UnixSeconds,
    validity: std::time::Duration,
) -> Result<TlsMaterial, Error> {
    let names = v.certificate_names();
    let (leaf, issued) = operator_leaf_with_reason(ca, &names, existing, now, validity)?;
    Ok(TlsMaterial::OperatorCa {
        leaf,
        ca_cert_pem: ca.cert_pem.clone(),
        issued,
    })
}

/// The certificate for `hostname` from the operator's CA: the one stored in `existing`
/// (`tls.crt`, `tls.key`) while it needs no renewal, else a new one.
pub fn operator_leaf(
    ca: &CaBundle,
    hostname: &str,
    existing: Option<&Secret>,
    now: UnixSeconds,
    validity: std::time::Duration,
) -> Result<IssuedCert, Error> {
    operator_leaf_with_reason(ca, &[hostname.to_owned()], existing, now, validity)
        .map(|(leaf, _)| leaf)
}

/// The leaf for `names` (the first is the subject), and why it was (re)issued, if it was.
fn operator_leaf_with_reason(
    ca: &CaBundle,
    names: &[String],
    existing: Option<&Secret>,
    now: UnixSeconds,
    validity: std::time::Duration,
) -> Result<(IssuedCert, Option<RenewReason>), Error> {
    let stored_cert = existing.and_then(|s| secret_text(s, TLS_CERT_KEY));
    let stored_key = existing.and_then(|s| secret_text(s, TLS_KEY_KEY));
    let info = match (&stored_cert, &stored_key) {
        (Some(cert), Some(_)) => certs::inspect_leaf(cert, &ca.cert_pem),
        _ => None,
    };
    let reason = certs::renewal_for(info.as_ref(), stored_cert.is_some(), names, now);
    Ok(match (reason, info, stored_cert, stored_key) {
        (None, Some(info), Some(cert), Some(key)) => (
            IssuedCert {
                cert_pem: cert,
                key_pem: PrivateKeyPem::new(key),
                not_before: info.not_before,
                not_after: info.not_after,
            },
            None,
        ),
        (reason, ..) => (
            certs::issue_leaf_for(ca, names, now, validity).map_err(Error::IssueCertificate)?,
            Some(reason.unwrap_or(RenewReason::Missing)),
        ),
    })
}

fn cert_manager_status(refs: &Dereferenced) -> TlsMaterial {
    let status = refs.certificate.as_ref().and_then(|c| c.data.get("status"));
    let ready = status
        .and_then(|s| s.get("conditions"))
        .and_then(|c| c.as_array())
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.get("type").and_then(|t| t.as_str()) == Some("Ready"))
        });
    let text = |v: Option<&serde_json::Value>, key: &str| {
        v.and_then(|v| v.get(key))
            .and_then(|t| t.as_str())
            .map(str::to_owned)
    };
    match ready {
        Some(c) => TlsMaterial::CertManager {
            ready: text(Some(c), "status").as_deref() == Some("True"),
            reason: text(Some(c), "reason").unwrap_or_else(|| "Unknown".to_owned()),
            message: text(Some(c), "message").unwrap_or_default(),
            not_after: text(status, "notAfter"),
        },
        None => TlsMaterial::CertManager {
            ready: false,
            reason: "Issuing".to_owned(),
            message: "waiting for cert-manager to issue the certificate".to_owned(),
            not_after: None,
        },
    }
}

async fn render_users(
    cache: &UsersCache,
    v: &ValidatedDomain,
    refs: &Dereferenced,
    source: super::validate::UsersSource,
) -> Result<String, Error> {
    let previous = refs
        .users_rendered
        .as_ref()
        .and_then(|s| secret_text(s, USERS_FILE_KEY));
    let cache_id = format!("{}/{}", v.namespace, v.name);
    let key = refs
        .users_source
        .as_ref()
        .map(|s| UsersCache::key(s, previous.as_deref()));
    if let Some(key) = &key
        && let Some(hit) = cache.get(&cache_id, key)
    {
        return Ok(hit);
    }
    let secret_name = source.secret_name.clone();
    let prev = previous.clone();
    let rendered = tokio::task::spawn_blocking(move || {
        users::render(&source.users, prev.as_deref(), &secret_name)
    })
    .await
    .map_err(|_| Error::BlockingTaskFailed("users"))?
    .map_err(Error::RenderUsers)?;
    if let Some(source) = &refs.users_source {
        // The next pass finds `rendered` as the previous file once it has been applied.
        cache.put(
            &cache_id,
            UsersCache::key(source, Some(&rendered)),
            rendered.clone(),
        );
    }
    Ok(rendered)
}

/// A Secret value as UTF-8 text.
pub fn secret_text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .cloned()
        })
}
