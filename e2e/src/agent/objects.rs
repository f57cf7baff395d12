//! The API objects a pod's env and volumes read: ConfigMaps, Secrets and ServiceAccount tokens.
//! They are fetched before each container start (and on the periodic volume refresh), so env
//! resolution and volume materialisation stay pure functions of a [`PodObjects`] snapshot.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use kube::api::PostParams;
use kube::{Api, Client};

/// The kubelet's default lifetime for projected service account tokens (1 h + 7 s, which makes
/// the API server hand out a long-lived token when it extends bound tokens).
pub const DEFAULT_TOKEN_EXPIRATION_SECONDS: i64 = 3607;

/// Fetching a referenced object failed for another reason than "not found".
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("get configmap {namespace}/{name}")]
    GetConfigMap {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("get secret {namespace}/{name}")]
    GetSecret {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("request a token for service account {namespace}/{service_account}")]
    RequestToken {
        namespace: String,
        service_account: String,
        #[source]
        source: kube::Error,
    },
    #[error("token request for service account {namespace}/{service_account} returned no token")]
    EmptyToken {
        namespace: String,
        service_account: String,
    },
}

/// One projected token the pod asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenKey {
    /// `None`: the API server's default audience.
    pub audience: Option<String>,
    pub expiration_seconds: i64,
}

/// What a pod references, by name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct References {
    pub config_maps: BTreeSet<String>,
    pub secrets: BTreeSet<String>,
    pub tokens: BTreeSet<TokenKey>,
}

/// A snapshot of the referenced objects; an absent name means the object does not exist.
#[derive(Debug, Default, Clone)]
pub struct PodObjects {
    pub config_maps: HashMap<String, ConfigMap>,
    pub secrets: HashMap<String, Secret>,
    pub tokens: HashMap<TokenKey, String>,
}

/// Tokens already issued for this pod, reused until 80 % of their lifetime has passed (the
/// kubelet's rule), so the refresh loop does not mint a token every few seconds.
#[derive(Debug, Default)]
pub struct TokenCache {
    tokens: HashMap<TokenKey, (String, Instant)>,
}

/// Every ConfigMap, Secret and token the pod's containers and volumes reference.
pub fn references(pod: &Pod) -> References {
    let mut refs = References::default();
    let Some(spec) = &pod.spec else { return refs };
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers);
    for c in containers {
        for e in c.env.iter().flatten() {
            if let Some(from) = &e.value_from {
                if let Some(k) = &from.config_map_key_ref {
                    refs.config_maps.insert(k.name.clone());
                }
                if let Some(k) = &from.secret_key_ref {
                    refs.secrets.insert(k.name.clone());
                }
            }
        }
        for e in c.env_from.iter().flatten() {
            if let Some(r) = &e.config_map_ref {
                refs.config_maps.insert(r.name.clone());
            }
            if let Some(r) = &e.secret_ref {
                refs.secrets.insert(r.name.clone());
            }
        }
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(cm) = &v.config_map {
            refs.config_maps.insert(cm.name.clone());
        }
        if let Some(s) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            refs.secrets.insert(s);
        }
        for source in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(cm) = &source.config_map {
                refs.config_maps.insert(cm.name.clone());
            }
            if let Some(s) = &source.secret {
                refs.secrets.insert(s.name.clone());
            }
            if let Some(t) = &source.service_account_token {
                refs.tokens
                    .insert(token_key(t.audience.as_deref(), t.expiration_seconds));
            }
        }
    }
    refs
}

/// The cache key for a `serviceAccountToken` projection.
pub fn token_key(audience: Option<&str>, expiration_seconds: Option<i64>) -> TokenKey {
    TokenKey {
        audience: audience.filter(|a| !a.is_empty()).map(str::to_string),
        expiration_seconds: expiration_seconds.unwrap_or(DEFAULT_TOKEN_EXPIRATION_SECONDS),
    }
}

/// Reads everything `refs` names from the pod's namespace; tokens come from the TokenRequest
/// API on the pod's service account, bound to the pod like the kubelet's.
pub async fn fetch(
    client: &Client,
    pod: &Pod,
    refs: &References,
    cache: &mut TokenCache,
) -> Result<PodObjects, FetchError> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut objects = PodObjects::default();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    for name in &refs.config_maps {
        match config_maps.get_opt(name).await {
            Ok(Some(cm)) => {
                objects.config_maps.insert(name.clone(), cm);
            }
            Ok(None) => {}
            Err(source) => {
                return Err(FetchError::GetConfigMap {
                    namespace,
                    name: name.clone(),
                    source,
                });
            }
        }
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    for name in &refs.secrets {
        match secrets.get_opt(name).await {
            Ok(Some(s)) => {
                objects.secrets.insert(name.clone(), s);
            }
            Ok(None) => {}
            Err(source) => {
                return Err(FetchError::GetSecret {
                    namespace,
                    name: name.clone(),
                    source,
                });
            }
        }
    }
    for key in &refs.tokens {
        let token = cache.get_or_request(client, pod, key).await?;
        objects.tokens.insert(key.clone(), token);
    }
    Ok(objects)
}

impl TokenCache {
    async fn get_or_request(
        &mut self,
        client: &Client,
        pod: &Pod,
        key: &TokenKey,
    ) -> Result<String, FetchError> {
        if let Some((token, refresh_at)) = self.tokens.get(key)
            && Instant::now() < *refresh_at
        {
            return Ok(token.clone());
        }
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let service_account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_string());
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(key.audience.iter().cloned().collect()),
                expiration_seconds: Some(key.expiration_seconds),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
            }),
            ..Default::default()
        };
        let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
        let answer = api
            .create_token_request(&service_account, &PostParams::default(), &request)
            .await
            .map_err(|source| FetchError::RequestToken {
                namespace: namespace.clone(),
                service_account: service_account.clone(),
                source,
            })?;
        let status = answer.status.unwrap_or_default();
        let token = status
            .token
            .filter(|t| !t.is_empty())
            .ok_or(FetchError::EmptyToken {
                namespace,
                service_account,
            })?;
        // Refresh after 80 % of the lifetime the API server actually granted.
        let now = k8s_openapi::jiff::Timestamp::now();
        let lifetime = status
            .expiration_timestamp
            .map_or(key.expiration_seconds, |t| {
                t.0.duration_since(now).as_secs()
            })
            .max(60);
        let refresh_after = Duration::from_secs(u64::try_from(lifetime).unwrap_or(60) * 8 / 10);
        self.tokens
            .insert(key.clone(), (token.clone(), Instant::now() + refresh_after));
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_cover_env_env_from_and_volumes() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n"},
            "spec": {
                "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "s-init"}}]}],
                "containers": [{"name": "c", "env": [
                    {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cm-env", "key": "k"}}},
                    {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s-env", "key": "k"}}},
                    {"name": "C", "value": "x"}
                ], "envFrom": [{"configMapRef": {"name": "cm-from"}}]}],
                "volumes": [
                    {"name": "v1", "configMap": {"name": "cm-vol"}},
                    {"name": "v2", "secret": {"secretName": "s-vol"}},
                    {"name": "v3", "projected": {"sources": [
                        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                        {"serviceAccountToken": {"path": "t2", "audience": "nats"}},
                        {"configMap": {"name": "kube-root-ca.crt"}},
                        {"downwardAPI": {"items": []}}
                    ]}},
                    {"name": "v4", "emptyDir": {}}
                ]
            }
        }))
        .unwrap();
        let refs = references(&pod);
        let names = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>();
        assert_eq!(
            names(&refs.config_maps),
            ["cm-env", "cm-from", "cm-vol", "kube-root-ca.crt"]
        );
        assert_eq!(names(&refs.secrets), ["s-env", "s-init", "s-vol"]);
        assert_eq!(
            refs.tokens.into_iter().collect::<Vec<_>>(),
            [
                TokenKey {
                    audience: None,
                    expiration_seconds: 3607
                },
                TokenKey {
                    audience: Some("nats".into()),
                    expiration_seconds: 3607
                },
            ]
        );
    }
}
