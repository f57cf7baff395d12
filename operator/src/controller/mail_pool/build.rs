//! Build: a MailPool's children from the pool and its attached domains. Pure, so the same
//! inputs give the same objects and a second reconcile writes nothing.
//!
//! ```text
//! MailPool shared ─┬─ ConfigMap  mailpool-shared-config      node.yaml: every attached domain
//!                  ├─ Secret     mailpool-shared-node        default certificate, username key
//!                  ├─ Secret     mailpool-shared-domains-<i> the domains' files, 16 shards
//!                  ├─ Deployment mailpool-shared             smtp-node pods (spec never depends
//!                  ├─ Service    mailpool-shared             25/465/587   on the domains)
//!                  └─ PDB        mailpool-shared             maxUnavailable 1
//! ```
//!
//! The pod template carries a checksum of the node settings that need a restart (listeners,
//! NATS, delivery, ...), computed without the domains: attaching or detaching a domain changes
//! only the ConfigMap and the shards, which the nodes reload, and never rolls the pods.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Resource;
use kube::api::ObjectMeta;
use kubemail_config::{DomainConfig, NodeConfig};
use sha2::{Digest, Sha256};

use super::contract::{
    self, DOMAINS_DIR, POOL_LABEL, SHARDS, node_secret, shard_key, shard_of, shard_secret,
};
use crate::certs::{TLS_CERT_KEY, TLS_KEY_KEY};
use crate::controller::mail_domain::build::{
    BuildConfig, BuildError, NodePods, SecretMount, base_node_config, node_deployment, node_pdb,
    node_service,
};
use crate::controller::mail_domain::names::{
    CHECKSUM_ANNOTATION, NATS_DIR, NODE_CONFIG_KEY, TLS_DIR,
};
use crate::controller::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::crd::mail_pool::{AttachedDomain, MailPool};
use crate::users::USERNAME_KEY_KEY;

/// One attached domain: its node config with bare file names, and those files' bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct PooledDomain {
    pub namespace: String,
    pub name: String,
    pub config: DomainConfig,
    pub files: BTreeMap<String, Vec<u8>>,
}

/// The pool's own material: its default certificate and the key of the shared AUTH count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolMaterial {
    pub cert_pem: String,
    pub key_pem: String,
    pub username_key: String,
}

/// Every child of a pool.
#[derive(Debug, Clone)]
pub struct PoolChildren {
    pub config_map: ConfigMap,
    pub node_secret: Secret,
    pub shards: Vec<Secret>,
    pub deployment: Deployment,
    pub service: Service,
    pub pdb: PodDisruptionBudget,
    /// The domains in the node config, sorted.
    pub attached: Vec<AttachedDomain>,
    /// The node config in `config_map` (what the nodes' NATS credentials must cover).
    pub node: NodeConfig,
}

/// Labels every child of `pool` carries.
pub fn labels(pool: &str) -> BTreeMap<String, String> {
    let mut l = selector(pool);
    l.insert(
        "app.kubernetes.io/component".to_owned(),
        "smtp-node".to_owned(),
    );
    l.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
    l
}

/// Labels that select the pool's pods (a MailDomain's pods never carry [`POOL_LABEL`]).
pub fn selector(pool: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "kubemail-smtp-node".to_owned(),
        ),
        (
            "app.kubernetes.io/instance".to_owned(),
            contract::nodes(pool),
        ),
        (POOL_LABEL.to_owned(), pool.to_owned()),
    ])
}

/// [`selector`] as a label selector string (the scale subresource's `status.selector`).
pub fn selector_string(pool: &str) -> String {
    selector(pool)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Builds every child; `domains` are the attached ones, in any order.
pub fn build(
    pool: &MailPool,
    domains: &[PooledDomain],
    material: &PoolMaterial,
    config: &BuildConfig,
) -> Result<PoolChildren, BuildError> {
    let name = pool.metadata.name.clone().unwrap_or_default();
    let namespace = pool.metadata.namespace.clone().unwrap_or_default();
    let mut owner = pool
        .controller_owner_ref(&())
        .ok_or(BuildError::MissingUid)?;
    owner.block_owner_deletion = Some(true);
    let meta = |object: String| ObjectMeta {
        name: Some(object),
        namespace: Some(namespace.clone()),
        labels: Some(labels(&name)),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    };

    let mut sorted: Vec<&PooledDomain> = domains.iter().collect();
    sorted.sort_by(|a, b| a.config.name.cmp(&b.config.name));

    // The reply inbox and the memory budget are the pool's, not its domains': both are read
    // at start-up, and attaching a domain must not roll the pods.
    let mut node = base_node_config(
        &pool.spec.hostname,
        Some(Path::new(TLS_DIR).join(USERNAME_KEY_KEY)),
        kubemail_queue::pool_inbox_prefix(&namespace, &name),
        kubemail_config::DEFAULT_MAX_MESSAGE_SIZE,
        pool.spec
            .service
            .proxy_protocol
            .as_ref()
            .filter(|p| p.enabled)
            .map(|p| p.trusted_cidrs.as_slice()),
        config,
    )?;
    // What the pods read only at start-up: the config without its domains.
    let restart_checksum =
        checksum(&serde_yaml::to_string(&node).map_err(|e| BuildError::NodeConfig(e.to_string()))?);
    let mut shards: Vec<BTreeMap<String, ByteString>> = vec![BTreeMap::new(); SHARDS as usize];
    let mut attached = Vec::with_capacity(sorted.len());
    for d in &sorted {
        let shard = shard_of(&d.config.name);
        let mut domain = d.config.clone();
        let dir = Path::new(DOMAINS_DIR).join(shard.to_string());
        let place = |p: &mut PathBuf| {
            let file = p.to_string_lossy().into_owned();
            *p = dir.join(shard_key(&d.config.name, &file));
        };
        for_each_path(&mut domain, place);
        for (file, bytes) in &d.files {
            shards[shard as usize]
                .insert(shard_key(&d.config.name, file), ByteString(bytes.clone()));
        }
        attached.push(AttachedDomain {
            namespace: d.namespace.clone(),
            name: d.name.clone(),
            domain: d.config.name.clone(),
        });
        node.domains.push(domain);
    }
    node.validate()
        .map_err(|e| BuildError::NodeConfig(e.to_string()))?;
    let body = serde_yaml::to_string(&node).map_err(|e| BuildError::NodeConfig(e.to_string()))?;
    let node_yaml = format!(
        "# Rendered by kubemail-operator from MailPool {namespace}/{name} and its {} attached MailDomain(s); do not edit.\n{body}",
        attached.len()
    );

    let secret = |object: String, data: BTreeMap<String, ByteString>| Secret {
        metadata: meta(object),
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Default::default()
    };
    let node_secret = secret(
        node_secret(&name),
        BTreeMap::from([
            (
                TLS_CERT_KEY.to_owned(),
                ByteString(material.cert_pem.clone().into_bytes()),
            ),
            (
                TLS_KEY_KEY.to_owned(),
                ByteString(material.key_pem.clone().into_bytes()),
            ),
            (
                USERNAME_KEY_KEY.to_owned(),
                ByteString(material.username_key.clone().into_bytes()),
            ),
        ]),
    );
    let shards: Vec<Secret> = shards
        .into_iter()
        .enumerate()
        .map(|(i, data)| {
            secret(
                shard_secret(&name, u32::try_from(i).unwrap_or_default()),
                data,
            )
        })
        .collect();

    let mut mounts = vec![SecretMount {
        volume: "tls".to_owned(),
        secret: node_secret.metadata.name.clone().unwrap_or_default(),
        path: TLS_DIR.to_owned(),
        optional: false,
    }];
    // The pool's NATS credentials (for every attached domain) and CA: the content changes
    // as domains attach, the mount never.
    if config.nats_auth || config.nats_tls {
        mounts.push(SecretMount {
            volume: "nats".to_owned(),
            secret: contract::nats_secret(&name),
            path: NATS_DIR.to_owned(),
            optional: false,
        });
    }
    for i in 0..SHARDS {
        mounts.push(SecretMount {
            volume: format!("domains-{i}"),
            secret: shard_secret(&name, i),
            path: format!("{DOMAINS_DIR}/{i}"),
            optional: true,
        });
    }
    let pods = NodePods {
        replicas: pool.spec.replicas,
        labels: labels(&name),
        selector: selector(&name),
        annotations: BTreeMap::from([(CHECKSUM_ANNOTATION.to_owned(), restart_checksum)]),
        config_map: contract::node_config(&name),
        secrets: mounts,
        shape: pool.spec.pod.clone(),
    };
    let deployment = node_deployment(&pods, meta(contract::nodes(&name)), &node, config)?;
    let service = node_service(
        selector(&name),
        &pool.spec.service,
        false,
        meta(contract::nodes(&name)),
    )?;
    let pdb = node_pdb(selector(&name), meta(contract::nodes(&name)));
    Ok(PoolChildren {
        config_map: ConfigMap {
            metadata: meta(contract::node_config(&name)),
            data: Some(BTreeMap::from([(NODE_CONFIG_KEY.to_owned(), node_yaml)])),
            ..Default::default()
        },
        node_secret,
        shards,
        deployment,
        service,
        pdb,
        attached,
        node,
    })
}

/// Calls `f` on every file path of a domain's config.
pub fn for_each_path(domain: &mut DomainConfig, mut f: impl FnMut(&mut PathBuf)) {
    if let Some(users) = &mut domain.users_file {
        f(users);
    }
    for key in &mut domain.dkim.keys {
        f(&mut key.key_file);
    }
    if let Some(auth) = domain.relay.as_mut().and_then(|r| r.auth.as_mut()) {
        f(&mut auth.username_file);
        f(&mut auth.password_file);
    }
    if let Some(tls) = &mut domain.tls {
        f(&mut tls.cert_file);
        f(&mut tls.key_file);
    }
}

fn checksum(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use kubemail_config::{DkimConfig, DkimKeyConfig, DomainLimits, DomainTls, NodeConfig};

    use super::*;
    use crate::controller::mail_domain::build::tests::config;
    use crate::crd::mail_pool::MailPoolSpec;

    fn pool() -> MailPool {
        let mut p = MailPool::new(
            "shared",
            MailPoolSpec {
                hostname: "mx.pool.test".into(),
                replicas: 3,
                service: Default::default(),
                pod: Default::default(),
                allowed_domains: Default::default(),
            },
        );
        p.metadata.namespace = Some("mail".into());
        p.metadata.uid = Some("pool-uid".into());
        p
    }

    fn domain(ns: &str, name: &str, domain: &str) -> PooledDomain {
        PooledDomain {
            namespace: ns.into(),
            name: name.into(),
            config: DomainConfig {
                name: domain.into(),
                recipients: vec!["bob".into()],
                catch_all: false,
                users_file: Some("users".into()),
                allowed_senders: Default::default(),
                limits: DomainLimits {
                    max_message_size: kubemail_config::ByteSize(1 << 20),
                    max_recipients: 10,
                    messages_per_minute_per_user: 5,
                },
                inbound: None,
                relay: None,
                mta_sts_policy: None,
                retry_intervals: Vec::new(),
                dkim: DkimConfig {
                    keys: vec![DkimKeyConfig {
                        selector: "kubemail1".into(),
                        key_file: "kubemail1.pem".into(),
                    }],
                },
                tls: Some(DomainTls {
                    hostname: format!("mx.{domain}"),
                    cert_file: "tls.crt".into(),
                    key_file: "tls.key".into(),
                }),
            },
            files: ["users", "kubemail1.pem", "tls.crt", "tls.key"]
                .iter()
                .map(|f| ((*f).to_owned(), format!("{domain} {f}").into_bytes()))
                .collect(),
        }
    }

    fn material() -> PoolMaterial {
        PoolMaterial {
            cert_pem: "cert".into(),
            key_pem: "key".into(),
            username_key: "00".repeat(32),
        }
    }

    fn node(children: &PoolChildren) -> NodeConfig {
        NodeConfig::from_yaml(&children.config_map.data.as_ref().unwrap()[NODE_CONFIG_KEY]).unwrap()
    }

    #[test]
    fn every_attached_domain_is_in_the_node_config_with_its_files_in_its_shard() {
        let a = domain("tenant-a", "shop", "a.test");
        let b = domain("tenant-b", "blog", "b.test");
        let children = build(&pool(), &[b.clone(), a.clone()], &material(), &config()).unwrap();
        let node = node(&children);
        node.validate().unwrap();
        assert_eq!(node.hostname, "mx.pool.test");
        let names: Vec<&str> = node.domains.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(
            names,
            ["a.test", "b.test"],
            "sorted, so the order never churns"
        );
        for d in [&a, &b] {
            let rendered = node.domain(&d.config.name).unwrap();
            let shard = shard_of(&d.config.name);
            let dir = format!("{DOMAINS_DIR}/{shard}/");
            let users = rendered
                .users_file
                .as_ref()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            assert_eq!(users, format!("{dir}{}_users", d.config.name));
            let tls = rendered.tls.as_ref().unwrap();
            assert_eq!(tls.hostname, format!("mx.{}", d.config.name));
            assert!(tls.cert_file.starts_with(&dir));
            let data = children.shards[shard as usize].data.as_ref().unwrap();
            for (file, bytes) in &d.files {
                assert_eq!(data[&shard_key(&d.config.name, file)].0, *bytes);
            }
        }
        assert_eq!(children.shards.len(), SHARDS as usize);
        assert_eq!(children.attached.len(), 2);
        assert_eq!(children.attached[0].namespace, "tenant-a");
        let deployment = children.deployment.spec.as_ref().unwrap();
        assert_eq!(deployment.replicas, Some(3));
        assert_eq!(
            deployment.selector.match_labels.as_ref().unwrap()[POOL_LABEL],
            "shared"
        );
        assert_eq!(
            children.node_secret.data.as_ref().unwrap()[TLS_CERT_KEY].0,
            b"cert"
        );
        assert!(
            node.auth
                .username_key_file
                .as_ref()
                .unwrap()
                .starts_with(TLS_DIR)
        );
    }

    #[test]
    fn attaching_and_detaching_never_change_the_pod_template() {
        let a = domain("tenant-a", "shop", "a.test");
        let b = domain("tenant-b", "blog", "b.test");
        let template = |domains: &[PooledDomain]| {
            let c = build(&pool(), domains, &material(), &config()).unwrap();
            serde_json::to_value(&c.deployment).unwrap()
        };
        let none = template(&[]);
        assert_eq!(none, template(std::slice::from_ref(&a)));
        assert_eq!(none, template(&[a.clone(), b.clone()]));
        assert_eq!(none, template(&[b]));
        // Every shard is mounted from the start, optional, at its fixed path.
        let c = build(&pool(), &[], &material(), &config()).unwrap();
        let spec = c.deployment.spec.unwrap().template.spec.unwrap();
        let volumes = spec.volumes.unwrap();
        let shards: Vec<_> = volumes
            .iter()
            .filter(|v| v.name.starts_with("domains-"))
            .collect();
        assert_eq!(shards.len(), SHARDS as usize);
        assert!(
            shards
                .iter()
                .all(|v| v.secret.as_ref().unwrap().optional == Some(true))
        );
    }

    #[test]
    fn with_authenticated_nats_the_pool_mounts_one_credential_and_keeps_its_inbox() {
        let mut cfg = config();
        cfg.nats_auth = true;
        cfg.nats_tls = true;
        let a = domain("tenant-a", "shop", "a.test");
        let b = domain("tenant-b", "blog", "b.test");
        let one = build(&pool(), std::slice::from_ref(&a), &material(), &cfg).unwrap();
        let two = build(&pool(), &[a, b], &material(), &cfg).unwrap();
        // The credentials cover exactly the domains in the node config.
        assert_eq!(
            contract::served_domains(&two.attached),
            ["a.test", "b.test"]
        );
        let served: Vec<&str> = two.node.domains.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(served, ["a.test", "b.test"]);
        // One reply inbox for the pool, whatever is attached; the operator manages the objects.
        let inbox = kubemail_queue::pool_inbox_prefix("mail", "shared");
        for c in [&one, &two] {
            assert_eq!(c.node.nats.inbox_prefix.as_deref(), Some(inbox.as_str()));
            assert!(!c.node.nats.manage_streams);
            assert_eq!(
                c.node.nats.credentials_file.as_deref(),
                Some(Path::new(NATS_DIR).join("nats.creds").as_path())
            );
        }
        // The pool's NATS Secret is mounted from the start: attaching changes no pod spec.
        assert_eq!(
            serde_json::to_value(&one.deployment).unwrap(),
            serde_json::to_value(&two.deployment).unwrap()
        );
        let spec = one.deployment.spec.unwrap().template.spec.unwrap();
        let nats = spec
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "nats")
            .unwrap();
        assert_eq!(
            nats.secret.unwrap().secret_name.as_deref(),
            Some("mailpool-shared-nats")
        );
    }

    #[test]
    fn a_scale_or_a_restart_only_setting_is_what_changes_the_deployment() {
        let a = domain("tenant-a", "shop", "a.test");
        let base = build(&pool(), std::slice::from_ref(&a), &material(), &config()).unwrap();
        let mut scaled = pool();
        scaled.spec.replicas = 5;
        let scaled = build(&scaled, std::slice::from_ref(&a), &material(), &config()).unwrap();
        let annotations = |c: &PoolChildren| {
            c.deployment
                .spec
                .as_ref()
                .unwrap()
                .template
                .metadata
                .as_ref()
                .unwrap()
                .annotations
                .clone()
                .unwrap()
        };
        assert_eq!(
            annotations(&base),
            annotations(&scaled),
            "scaling rolls nothing"
        );
        let other_nats = BuildConfig {
            nats_url: "nats://elsewhere:4222".into(),
            ..config()
        };
        let moved = build(&pool(), &[a], &material(), &other_nats).unwrap();
        assert_ne!(
            annotations(&base),
            annotations(&moved),
            "a NATS change needs a restart"
        );
    }

    #[test]
    fn the_pools_pod_shape_and_load_balancer_reach_its_deployment_and_service() {
        let mut p = pool();
        p.spec.pod = serde_yaml::from_str(
            "{ nodeSelector: { pool: mail }, priorityClassName: mail-critical, topologySpreadConstraints: [] }",
        )
        .unwrap();
        p.spec.service = serde_yaml::from_str(
            "{ loadBalancerClass: x.example/lb, loadBalancerSourceRanges: [198.51.100.0/24] }",
        )
        .unwrap();
        let children = build(&p, &[], &material(), &config()).unwrap();
        let pod = children
            .deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        assert_eq!(
            pod.node_selector,
            Some(BTreeMap::from([("pool".into(), "mail".into())]))
        );
        assert_eq!(pod.priority_class_name.as_deref(), Some("mail-critical"));
        assert_eq!(pod.topology_spread_constraints, None, "explicitly none");
        let service = children.service.spec.as_ref().unwrap();
        assert_eq!(service.load_balancer_class.as_deref(), Some("x.example/lb"));
        assert_eq!(
            service.load_balancer_source_ranges,
            Some(vec!["198.51.100.0/24".to_owned()])
        );

        // The default spread selects the pool's pods, not a domain's.
        let children = build(&pool(), &[], &material(), &config()).unwrap();
        let spread = children
            .deployment
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .topology_spread_constraints
            .unwrap();
        assert_eq!(
            spread[0].label_selector.as_ref().unwrap().match_labels,
            Some(selector("shared"))
        );

        // What Kubernetes or the node would refuse is a reason on the pool's Ready condition.
        let mut bad = pool();
        bad.spec.service.load_balancer_source_ranges = vec!["198.51.100.0".into()];
        let err = build(&bad, &[], &material(), &config()).unwrap_err();
        assert_eq!(err.reason(), "InvalidLoadBalancerSourceRanges");
        let mut small = pool();
        small.spec.pod =
            serde_yaml::from_str("{ resources: { limits: { memory: 64Mi } } }").unwrap();
        let err = build(&small, &[], &material(), &config()).unwrap_err();
        assert_eq!(err.reason(), "InvalidPodResources");
    }
}
