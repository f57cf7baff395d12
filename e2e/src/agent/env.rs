//! A container's environment, resolved the way the kubelet and the runtime do it: the image's
//! `Env` (for host-run containers the host's PATH and HOME stand in), the `KUBERNETES_SERVICE_*`
//! variables of the API server, then `envFrom` sources in order, then `env` (whose values may
//! refer to earlier variables with `$(NAME)`), including `valueFrom` ConfigMap/Secret keys and
//! the downward API; a later definition of a name replaces an earlier one, as the runtime lets
//! the container's env override the image's. Pure: all objects come in a [`PodObjects`].

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, ResourceFieldSelector};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::objects::PodObjects;

/// Why a container's environment could not be built; shown as the container's waiting message
/// (reason `CreateContainerConfigError`), worded like the kubelet's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("configmap \"{name}\" not found")]
    ConfigMapNotFound { name: String },
    #[error("couldn't find key {key} in ConfigMap {namespace}/{name}")]
    ConfigMapKeyNotFound {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("secret \"{name}\" not found")]
    SecretNotFound { name: String },
    #[error("couldn't find key {key} in Secret {namespace}/{name}")]
    SecretKeyNotFound {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("unsupported fieldRef path {path:?}")]
    UnsupportedFieldPath { path: String },
    #[error("unsupported resourceFieldRef resource {resource:?}")]
    UnsupportedResource { resource: String },
    #[error("invalid quantity {value:?}")]
    InvalidQuantity { value: String },
}

/// What the node has to offer, for `resourceFieldRef` on containers without limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocatable {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// Everything outside the container spec that its environment depends on.
#[derive(Debug, Clone, Copy)]
pub struct EnvInputs<'a> {
    pub pod: &'a Pod,
    pub pod_ip: Option<IpAddr>,
    pub host_ip: IpAddr,
    pub api_server_host: &'a str,
    pub api_server_port: u16,
    /// What the image sets (its `Env`), or for a container run from the host, the host's PATH
    /// and HOME: the base the pod's variables are laid over.
    pub base: &'a [(String, String)],
    pub allocatable: Allocatable,
    pub objects: &'a PodObjects,
}

/// An ordered environment where a later definition replaces an earlier one in place.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Env {
    vars: Vec<(String, String)>,
}

impl Env {
    pub fn set(&mut self, name: &str, value: String) {
        match self.vars.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.vars.push((name.to_string(), value)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn vars(&self) -> &[(String, String)] {
        &self.vars
    }

    /// Kubernetes `$(NAME)` expansion against this environment.
    pub fn expand(&self, s: &str) -> String {
        expand(s, |name| self.get(name).map(str::to_string))
    }
}

/// Resolves the full environment of `container`.
pub fn container_env(container: &Container, inputs: &EnvInputs<'_>) -> Result<Env, EnvError> {
    let pod = inputs.pod;
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut env = Env::default();
    for (name, value) in inputs.base {
        env.set(name, value.clone());
    }
    env.set("HOSTNAME", hostname(pod));
    let (host, port) = (inputs.api_server_host, inputs.api_server_port);
    env.set("KUBERNETES_SERVICE_HOST", host.to_string());
    env.set("KUBERNETES_SERVICE_PORT", port.to_string());
    env.set("KUBERNETES_SERVICE_PORT_HTTPS", port.to_string());
    env.set("KUBERNETES_PORT", format!("tcp://{host}:{port}"));

    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.as_deref().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            match inputs.objects.config_maps.get(&r.name) {
                Some(cm) => {
                    for (k, v) in cm.data.iter().flatten() {
                        set_from_source(&mut env, prefix, k, v.clone());
                    }
                }
                None if r.optional == Some(true) => {}
                None => {
                    return Err(EnvError::ConfigMapNotFound {
                        name: r.name.clone(),
                    });
                }
            }
        }
        if let Some(r) = &from.secret_ref {
            match inputs.objects.secrets.get(&r.name) {
                Some(secret) => {
                    for (k, v) in secret.data.iter().flatten() {
                        set_from_source(
                            &mut env,
                            prefix,
                            k,
                            String::from_utf8_lossy(&v.0).into_owned(),
                        );
                    }
                }
                None if r.optional == Some(true) => {}
                None => {
                    return Err(EnvError::SecretNotFound {
                        name: r.name.clone(),
                    });
                }
            }
        }
    }

    for var in container.env.iter().flatten() {
        if let Some(value) = env_var_value(var, container, inputs, &namespace, &env)? {
            env.set(&var.name, value);
        }
    }
    Ok(env)
}

/// The pod's hostname as the kubelet sets it: `spec.hostname` or the pod name, at most 63
/// characters (RFC 1123 label), without a trailing `-` or `.` left by the cut.
pub fn hostname(pod: &Pod) -> String {
    let name = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_default();
    const MAX_HOSTNAME: usize = 63;
    let mut cut: String = name.chars().take(MAX_HOSTNAME).collect();
    while cut.ends_with(['-', '.']) {
        cut.pop();
    }
    cut
}

/// The value of a downward API `fieldRef` path.
pub fn field_value(
    pod: &Pod,
    path: &str,
    pod_ip: Option<IpAddr>,
    host_ip: IpAddr,
) -> Result<String, EnvError> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let map_lookup = |map: Option<&std::collections::BTreeMap<String, String>>, key: &str| {
        map.and_then(|m| m.get(key)).cloned().unwrap_or_default()
    };
    let subscript = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix("']"))
            .map(str::to_string)
    };
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => format_map(meta.labels.as_ref()),
        "metadata.annotations" => format_map(meta.annotations.as_ref()),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.hostIP" | "status.hostIPs" => host_ip.to_string(),
        "status.podIP" | "status.podIPs" => pod_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        _ => {
            if let Some(key) = subscript("metadata.labels['") {
                map_lookup(meta.labels.as_ref(), &key)
            } else if let Some(key) = subscript("metadata.annotations['") {
                map_lookup(meta.annotations.as_ref(), &key)
            } else {
                return Err(EnvError::UnsupportedFieldPath {
                    path: path.to_string(),
                });
            }
        }
    };
    Ok(value)
}

/// The value of a `resourceFieldRef`: the container's limit or request divided by `divisor`,
/// rounded up; a missing limit falls back to what the node can allocate, as in the kubelet.
pub fn resource_value(
    container: &Container,
    selector: &ResourceFieldSelector,
    allocatable: Allocatable,
) -> Result<String, EnvError> {
    let resources = container.resources.as_ref();
    let (kind, name) =
        selector
            .resource
            .split_once('.')
            .ok_or_else(|| EnvError::UnsupportedResource {
                resource: selector.resource.clone(),
            })?;
    let set = match kind {
        "limits" => resources.and_then(|r| r.limits.as_ref()),
        "requests" => resources.and_then(|r| r.requests.as_ref()),
        _ => {
            return Err(EnvError::UnsupportedResource {
                resource: selector.resource.clone(),
            });
        }
    };
    let declared = set
        .and_then(|m| m.get(name))
        .map(parse_quantity)
        .transpose()?;
    let value = match name {
        "cpu" => declared.unwrap_or(allocatable.cpu_millis as f64 / 1000.0),
        "memory" => declared.unwrap_or(allocatable.memory_bytes as f64),
        "ephemeral-storage" => declared.unwrap_or(0.0),
        _ => {
            return Err(EnvError::UnsupportedResource {
                resource: selector.resource.clone(),
            });
        }
    };
    let divisor = selector
        .divisor
        .as_ref()
        .map(parse_quantity)
        .transpose()?
        .unwrap_or(1.0);
    if divisor <= 0.0 {
        return Err(EnvError::InvalidQuantity {
            value: format!("{divisor}"),
        });
    }
    // Cores and bytes are far below 2^53, so f64 is exact enough for a ceiling division.
    Ok(format!("{}", (value / divisor).ceil() as i64))
}

/// Parses a Kubernetes quantity (`100m`, `1.5`, `128Mi`, `2G`, `1e3`) into a plain number.
pub fn parse_quantity(q: &Quantity) -> Result<f64, EnvError> {
    let s = q.0.trim();
    let invalid = || EnvError::InvalidQuantity {
        value: s.to_string(),
    };
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (number, factor) = SUFFIXES
        .iter()
        .find_map(|(suffix, factor)| s.strip_suffix(suffix).map(|n| (n, *factor)))
        .unwrap_or((s, 1.0));
    // Exponent form (1e3) parses as a plain f64; a bare "E" suffix was handled above.
    let number: f64 = number.parse().map_err(|_| invalid())?;
    if !number.is_finite() {
        return Err(invalid());
    }
    Ok(number * factor)
}

/// Kubernetes `$(NAME)` expansion: a defined name is replaced, an undefined one stays as
/// written, `$$` is an escaped `$`, and any other `$` is literal.
pub fn expand(s: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(close) => {
                    let name = &inner[..close];
                    match lookup(name) {
                        Some(value) => out.push_str(&value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[close + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn env_var_value(
    var: &EnvVar,
    container: &Container,
    inputs: &EnvInputs<'_>,
    namespace: &str,
    env: &Env,
) -> Result<Option<String>, EnvError> {
    let Some(from) = &var.value_from else {
        return Ok(Some(env.expand(var.value.as_deref().unwrap_or_default())));
    };
    if let Some(r) = &from.config_map_key_ref {
        let optional = r.optional == Some(true);
        let Some(cm) = inputs.objects.config_maps.get(&r.name) else {
            return if optional {
                Ok(None)
            } else {
                Err(EnvError::ConfigMapNotFound {
                    name: r.name.clone(),
                })
            };
        };
        let value = cm
            .data
            .as_ref()
            .and_then(|d| d.get(&r.key).cloned())
            .or_else(|| {
                cm.binary_data
                    .as_ref()
                    .and_then(|d| d.get(&r.key))
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            });
        return match value {
            Some(v) => Ok(Some(v)),
            None if optional => Ok(None),
            None => Err(EnvError::ConfigMapKeyNotFound {
                namespace: namespace.to_string(),
                name: r.name.clone(),
                key: r.key.clone(),
            }),
        };
    }
    if let Some(r) = &from.secret_key_ref {
        let optional = r.optional == Some(true);
        let Some(secret) = inputs.objects.secrets.get(&r.name) else {
            return if optional {
                Ok(None)
            } else {
                Err(EnvError::SecretNotFound {
                    name: r.name.clone(),
                })
            };
        };
        return match secret.data.as_ref().and_then(|d| d.get(&r.key)) {
            Some(v) => Ok(Some(String::from_utf8_lossy(&v.0).into_owned())),
            None if optional => Ok(None),
            None => Err(EnvError::SecretKeyNotFound {
                namespace: namespace.to_string(),
                name: r.name.clone(),
                key: r.key.clone(),
            }),
        };
    }
    if let Some(f) = &from.field_ref {
        return field_value(inputs.pod, &f.field_path, inputs.pod_ip, inputs.host_ip).map(Some);
    }
    if let Some(r) = &from.resource_field_ref {
        // A resourceFieldRef without containerName refers to the container itself.
        let target = match r.container_name.as_deref().filter(|n| !n.is_empty()) {
            Some(name) => inputs
                .pod
                .spec
                .iter()
                .flat_map(|s| {
                    s.containers
                        .iter()
                        .chain(s.init_containers.iter().flatten())
                })
                .find(|c| c.name == name)
                .unwrap_or(container),
            None => container,
        };
        return resource_value(target, r, inputs.allocatable).map(Some);
    }
    // fileKeyRef and future sources: not supported by the agent.
    Err(EnvError::UnsupportedFieldPath {
        path: format!("valueFrom of {}", var.name),
    })
}

fn set_from_source(env: &mut Env, prefix: &str, key: &str, value: String) {
    let name = format!("{prefix}{key}");
    // The API server accepts any printable name except '='; the kubelet skips the rest.
    if name.is_empty() || name.contains('=') || name.chars().any(|c| c.is_control()) {
        return;
    }
    env.set(&name, value);
}

/// `key="value"` lines, sorted, as the downward API writes labels and annotations.
fn format_map(map: Option<&std::collections::BTreeMap<String, String>>) -> String {
    map.into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::Ipv4Addr;

    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use serde_json::json;

    use super::*;

    fn pod(containers: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "ns1", "uid": "u-1", "labels": {"app": "web"}},
            "spec": {"containers": containers, "nodeName": "local-node", "serviceAccountName": "sa"}
        }))
        .unwrap()
    }

    fn objects() -> PodObjects {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "cfg"}, "data": {"key": "from-cm", "LEVEL": "debug", "bad=name": "x"}
        }))
        .unwrap();
        let secret = Secret {
            data: Some([("key".to_string(), ByteString(b"from-secret".to_vec()))].into()),
            ..Default::default()
        };
        PodObjects {
            config_maps: HashMap::from([("cfg".to_string(), cm)]),
            secrets: HashMap::from([("sec".to_string(), secret)]),
            tokens: HashMap::new(),
        }
    }

    fn host_base() -> &'static [(String, String)] {
        static BASE: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
        BASE.get_or_init(|| {
            vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("HOME".into(), "/root".into()),
            ]
        })
    }

    fn inputs<'a>(pod: &'a Pod, objects: &'a PodObjects) -> EnvInputs<'a> {
        EnvInputs {
            pod,
            pod_ip: Some(IpAddr::V4(Ipv4Addr::new(127, 1, 0, 3))),
            host_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            api_server_host: "127.0.0.1",
            api_server_port: 16443,
            base: host_base(),
            allocatable: Allocatable {
                cpu_millis: 2000,
                memory_bytes: 8 << 30,
            },
            objects,
        }
    }

    fn resolve(containers: serde_json::Value) -> Result<Env, EnvError> {
        let pod = pod(containers);
        let objects = objects();
        let container = pod.spec.as_ref().unwrap().containers[0].clone();
        container_env(&container, &inputs(&pod, &objects))
    }

    #[test]
    fn env_has_api_server_and_defaults_and_no_pod_ip_unless_asked() {
        let env = resolve(json!([{"name": "c"}])).unwrap();
        assert_eq!(env.get("KUBERNETES_SERVICE_HOST"), Some("127.0.0.1"));
        assert_eq!(env.get("KUBERNETES_SERVICE_PORT"), Some("16443"));
        assert_eq!(env.get("HOSTNAME"), Some("web-1"));
        assert_eq!(env.get("PATH"), Some("/usr/bin:/bin"));
        assert_eq!(env.get("POD_IP"), None);
    }

    #[test]
    fn image_env_is_the_base_and_the_pod_overrides_it() {
        let pod = pod(json!([{"name": "c", "env": [
            {"name": "MODE", "value": "pod"},
            {"name": "BOTH", "value": "$(IMAGE_ONLY)-pod"}
        ]}]));
        let objects = objects();
        let base = vec![
            ("PATH".to_string(), "/usr/local/bin:/bin".to_string()),
            ("MODE".to_string(), "image".to_string()),
            ("IMAGE_ONLY".to_string(), "img".to_string()),
        ];
        let inputs = EnvInputs {
            base: &base,
            ..inputs(&pod, &objects)
        };
        let container = pod.spec.as_ref().unwrap().containers[0].clone();
        let env = container_env(&container, &inputs).unwrap();
        assert_eq!(env.get("PATH"), Some("/usr/local/bin:/bin"));
        assert_eq!(env.get("MODE"), Some("pod"));
        assert_eq!(env.get("IMAGE_ONLY"), Some("img"));
        assert_eq!(env.get("BOTH"), Some("img-pod"));
        assert_eq!(
            env.get("HOME"),
            None,
            "the runtime adds HOME from the image's passwd"
        );
        assert_eq!(
            env.vars().iter().filter(|(n, _)| n == "MODE").count(),
            1,
            "one definition per name"
        );
    }

    #[test]
    fn value_from_config_map_secret_and_downward_api() {
        let env = resolve(json!([{"name": "c", "env": [
            {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "key"}}},
            {"name": "B", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "key"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "LISTEN", "value": "$(POD_IP):2525 $$(POD_IP) $(NOPE)"}
        ]}]))
        .unwrap();
        assert_eq!(env.get("A"), Some("from-cm"));
        assert_eq!(env.get("B"), Some("from-secret"));
        assert_eq!(env.get("POD_NAME"), Some("web-1"));
        assert_eq!(env.get("POD_NAMESPACE"), Some("ns1"));
        assert_eq!(env.get("POD_IP"), Some("127.1.0.3"));
        assert_eq!(env.get("APP"), Some("web"));
        assert_eq!(env.get("LISTEN"), Some("127.1.0.3:2525 $(POD_IP) $(NOPE)"));
    }

    #[test]
    fn env_from_with_prefix_and_env_overrides_it() {
        let env = resolve(json!([{"name": "c",
            "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CM_"}, {"secretRef": {"name": "sec"}}],
            "env": [{"name": "key", "value": "explicit wins"}]
        }]))
        .unwrap();
        assert_eq!(env.get("CM_LEVEL"), Some("debug"));
        assert_eq!(env.get("CM_key"), Some("from-cm"));
        assert_eq!(env.get("CM_bad=name"), None);
        assert_eq!(env.get("key"), Some("explicit wins"));
    }

    #[test]
    fn missing_references_fail_unless_optional() {
        let err = resolve(json!([{"name": "c", "env": [
            {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k"}}}]}]));
        assert_eq!(
            err,
            Err(EnvError::ConfigMapNotFound {
                name: "nope".into()
            })
        );
        let err = resolve(json!([{"name": "c", "env": [
            {"name": "A", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "nokey"}}}]}]));
        assert_eq!(
            err.unwrap_err().to_string(),
            "couldn't find key nokey in Secret ns1/sec"
        );
        let env = resolve(json!([{"name": "c",
            "env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k", "optional": true}}}],
            "envFrom": [{"secretRef": {"name": "nope", "optional": true}}]
        }]))
        .unwrap();
        assert_eq!(env.get("A"), None);
        let err = resolve(json!([{"name": "c", "envFrom": [{"secretRef": {"name": "nope"}}]}]));
        assert_eq!(
            err,
            Err(EnvError::SecretNotFound {
                name: "nope".into()
            })
        );
    }

    #[test]
    fn resource_field_ref_uses_limits_or_node_allocatable() {
        let env = resolve(json!([{"name": "c",
            "resources": {"limits": {"memory": "128Mi"}, "requests": {"cpu": "250m"}},
            "env": [
                {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
                {"name": "CPU_REQ", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu"}}},
                {"name": "CPU_REQ_M", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}},
                {"name": "CPU_LIM", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}
            ]
        }]))
        .unwrap();
        assert_eq!(env.get("MEM"), Some("128"));
        assert_eq!(env.get("CPU_REQ"), Some("1"), "250m rounds up to one core");
        assert_eq!(env.get("CPU_REQ_M"), Some("250"));
        assert_eq!(env.get("CPU_LIM"), Some("2"), "no limit: node allocatable");
    }

    #[test]
    fn expansion_rules() {
        let lookup = |n: &str| (n == "A").then(|| "1".to_string());
        assert_eq!(expand("$(A)", lookup), "1");
        assert_eq!(expand("x$(A)y$(A)", lookup), "x1y1");
        assert_eq!(expand("$(B)", lookup), "$(B)");
        assert_eq!(expand("$$(A)", lookup), "$(A)");
        assert_eq!(expand("$$$(A)", lookup), "$1");
        assert_eq!(expand("cost $5", lookup), "cost $5");
        assert_eq!(expand("$(A", lookup), "$(A");
        assert_eq!(expand("end$", lookup), "end$");
    }

    #[test]
    fn quantities() {
        let q = |s: &str| parse_quantity(&Quantity(s.into())).unwrap();
        assert_eq!(q("100m"), 0.1);
        assert_eq!(q("2"), 2.0);
        assert_eq!(q("1Ki"), 1024.0);
        assert_eq!(q("1G"), 1e9);
        assert_eq!(q("1e3"), 1000.0);
        assert!(parse_quantity(&Quantity("abc".into())).is_err());
    }

    #[test]
    fn hostname_is_cut_to_a_dns_label() {
        let mut p = pod(json!([{"name": "c"}]));
        p.metadata.name = Some(format!("{}-x", "a".repeat(62)));
        assert_eq!(hostname(&p), "a".repeat(62));
    }
}
