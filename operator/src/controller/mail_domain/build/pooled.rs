//! A pooled MailDomain's hand-over to its MailPool (see
//! [`contract`](crate::controller::mail_pool::contract)): the domain part of the node config
//! built for it, with every file path replaced by a bare file name, and where each file comes
//! from. The pool's nodes then serve it with its own certificate (by SNI), users, DKIM keys,
//! limits, routes and relay.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ObjectMeta;
use kubemail_config::{DomainConfig, DomainTls, NodeConfig};

use super::BuildError;
use crate::certs::{TLS_CERT_KEY, TLS_KEY_KEY};
use crate::controller::mail_domain::names;
use crate::controller::mail_domain::validate::{RelayResolution, ValidatedDomain};
use crate::controller::mail_pool::contract::{DOMAIN_KEY, FILES_KEY, FileSource, Files};
use crate::dkim;
use crate::users::USERS_FILE_KEY;

/// The `<md>-pool` ConfigMap of `v`, from the node config built for it; `None` while its
/// relay is not usable (the pool must not send its mail direct), so the pool does not serve
/// it yet.
pub fn pool_domain(
    v: &ValidatedDomain,
    node: &NodeConfig,
    metadata: ObjectMeta,
) -> Result<Option<ConfigMap>, BuildError> {
    let relay_secret = match &v.relay {
        RelayResolution::Direct => None,
        RelayResolution::Resolved { spec, .. } => {
            spec.auth.as_ref().map(|a| a.secret_ref.name.clone())
        }
        RelayResolution::NotFound { .. } | RelayResolution::NotReady { .. } => return Ok(None),
    };
    let (domain, files) = material(v, node, relay_secret.as_deref())?;
    Ok(Some(ConfigMap {
        metadata,
        data: Some(BTreeMap::from([
            (DOMAIN_KEY.to_owned(), to_yaml(&domain)?),
            (FILES_KEY.to_owned(), to_yaml(&files)?),
        ])),
        ..Default::default()
    }))
}

/// The domain part of `node` with bare file names, and the files' sources.
fn material(
    v: &ValidatedDomain,
    node: &NodeConfig,
    relay_secret: Option<&str>,
) -> Result<(DomainConfig, Files), BuildError> {
    let mut domain = node
        .domains
        .first()
        .cloned()
        .ok_or_else(|| BuildError::NodeConfig("the node config has no domain".into()))?;
    let mut files = Files::new();
    let mut take = |path: &mut PathBuf, secret: &str, key: &str| {
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| key.to_owned());
        files.insert(
            file.clone(),
            FileSource {
                secret: secret.to_owned(),
                key: key.to_owned(),
            },
        );
        *path = PathBuf::from(file);
    };
    if let Some(users) = &mut domain.users_file {
        take(users, &names::users_secret(&v.name), USERS_FILE_KEY);
    }
    for key in &mut domain.dkim.keys {
        let secret_key = dkim::secret_key(&key.selector);
        take(&mut key.key_file, &names::dkim_secret(&v.name), &secret_key);
    }
    if let Some(auth) = domain.relay.as_mut().and_then(|r| r.auth.as_mut()) {
        let secret = relay_secret.ok_or_else(|| {
            BuildError::NodeConfig("the relay has credentials but no Secret".into())
        })?;
        auth.username_file = PathBuf::from("relay-username");
        auth.password_file = PathBuf::from("relay-password");
        take(&mut auth.username_file, secret, "username");
        take(&mut auth.password_file, secret, "password");
    }
    let mut cert = Path::new(TLS_CERT_KEY).to_owned();
    let mut key = Path::new(TLS_KEY_KEY).to_owned();
    take(&mut cert, &names::tls_secret(&v.name), TLS_CERT_KEY);
    take(&mut key, &names::tls_secret(&v.name), TLS_KEY_KEY);
    domain.tls = Some(DomainTls {
        hostname: v.hostname.clone(),
        cert_file: cert,
        key_file: key,
    });
    Ok((domain, files))
}

fn to_yaml<T: serde::Serialize>(value: &T) -> Result<String, BuildError> {
    serde_yaml::to_string(value).map_err(|e| BuildError::NodeConfig(e.to_string()))
}
