//! MailDomain helpers shared by the operator's cluster tests: apply, read conditions, wait for
//! one, and check the children's Secrets and owner references.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use kubemail_operator::crd::MailDomain;
use kubemail_operator::queue::consumer_name;
use serde_json::{Value, json};

use super::{Operator, TEST_MANAGER, TestNamespace};

/// The ConfigMap Kubernetes puts in every namespace (not the operator's).
pub const ROOT_CA_CONFIG_MAP: &str = "kube-root-ca.crt";

pub fn md_api(client: &Client, ns: &str) -> Api<MailDomain> {
    Api::namespaced(client.clone(), ns)
}

/// Server-side applies MailDomain `name` with `spec` (the tests' field manager).
pub async fn apply_md(client: &Client, ns: &str, name: &str, spec: Value) {
    let obj = json!({
        "apiVersion": "kubemail.io/v1alpha1",
        "kind": "MailDomain",
        "metadata": { "name": name },
        "spec": spec,
    });
    md_api(client, ns)
        .patch(
            name,
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap_or_else(|e| panic!("apply MailDomain {name}: {e}"));
}

pub fn condition<'a>(md: &'a MailDomain, type_: &str) -> Option<&'a Condition> {
    md.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Waits until condition `type_` has `status` for the current generation.
pub async fn wait_condition(
    client: &Client,
    ns: &str,
    name: &str,
    type_: &str,
    status: &str,
    timeout: Duration,
    op: &Operator,
) -> MailDomain {
    wait_condition_by(client, ns, name, type_, |c| c.status == status, timeout, op).await
}

/// Waits until condition `type_` satisfies `ok` for the current generation; on timeout the
/// panic shows the status and the operator's logs.
pub async fn wait_condition_by(
    client: &Client,
    ns: &str,
    name: &str,
    type_: &str,
    ok: impl Fn(&Condition) -> bool,
    timeout: Duration,
    op: &Operator,
) -> MailDomain {
    let api = md_api(client, ns);
    let start = Instant::now();
    loop {
        let md = api.get_opt(name).await.ok().flatten();
        if let Some(md) = &md
            && condition(md, type_).is_some_and(&ok)
            && md.status.as_ref().and_then(|s| s.observed_generation) == md.metadata.generation
        {
            return md.clone();
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for the {type_} condition of MailDomain {ns}/{name}; status:\n{}\n(is the smtp-node binary built? cargo build -p kubemail-smtp-node)\noperator logs:\n{}",
            serde_yaml::to_string(&md.and_then(|m| m.status)).unwrap_or_default(),
            op.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    s.data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect()
}

/// The text under `key` of a Secret (empty when missing or not UTF-8).
pub fn text(s: &Secret, key: &str) -> String {
    String::from_utf8(secret_data(s).remove(key).unwrap_or_default()).unwrap_or_default()
}

/// The object is controlled by `md` and by nothing else.
pub fn assert_owned(meta: &ObjectMeta, md: &MailDomain, what: &str) {
    let owners = meta.owner_references.clone().unwrap_or_default();
    assert!(
        owners.len() == 1
            && owners
                .iter()
                .all(|o| Some(&o.uid) == md.metadata.uid.as_ref()
                    && o.kind == "MailDomain"
                    && o.controller == Some(true)
                    && o.block_owner_deletion == Some(true)),
        "{what} must be controlled by MailDomain {} alone: {owners:?}",
        md.name_any()
    );
}

/// What must not change when an operator restarts after convergence: resourceVersions of the
/// objects nobody else writes, generations of the ones whose status controllers update, the
/// ReplicaSets and MailDomain `name`'s generation and status.
pub async fn snapshot(client: &Client, ns: &str, name: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for s in Api::<Secret>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap()
    {
        out.insert(
            format!("Secret/{}", s.name_any()),
            s.resource_version().unwrap_or_default(),
        );
    }
    for c in Api::<ConfigMap>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap()
    {
        if c.name_any() != ROOT_CA_CONFIG_MAP {
            out.insert(
                format!("ConfigMap/{}", c.name_any()),
                c.resource_version().unwrap_or_default(),
            );
        }
    }
    for s in Api::<Service>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap()
    {
        out.insert(
            format!("Service/{}", s.name_any()),
            s.resource_version().unwrap_or_default(),
        );
    }
    for d in Api::<Deployment>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap()
    {
        let checksum = d
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get("kubemail.io/config-checksum"))
            .cloned()
            .unwrap_or_default();
        out.insert(
            format!("Deployment/{}", d.name_any()),
            format!(
                "generation {:?}, checksum {checksum}",
                d.metadata.generation
            ),
        );
    }
    for p in Api::<PodDisruptionBudget>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap()
    {
        out.insert(
            format!("PodDisruptionBudget/{}", p.name_any()),
            format!("generation {:?}", p.metadata.generation),
        );
    }
    let replica_sets: Vec<String> = Api::<ReplicaSet>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap()
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    out.insert("ReplicaSets".into(), replica_sets.join(","));
    let md = md_api(client, ns).get(name).await.unwrap();
    out.insert(
        "MailDomain".into(),
        format!(
            "generation {:?}, status {}",
            md.metadata.generation,
            serde_json::to_string(&md.status).unwrap()
        ),
    );
    out
}

/// Creates (or finds) the test namespace's queue stream and `domain`'s durable consumer, as the
/// nodes' delivery workers would, so a test can watch the finalizer delete it. Returns the
/// JetStream context to look for it afterwards.
pub async fn ensure_delivery_consumer(ns: &TestNamespace, domain: &str) -> jetstream::Context {
    let js = jetstream::new(super::nats_connect().await.expect("NATS"));
    let stream = js
        .get_or_create_stream(stream::Config {
            name: ns.nats_stream(),
            subjects: vec![format!("{}.>", ns.subject_prefix())],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .expect("stream");
    stream
        .get_or_create_consumer(
            &consumer_name(domain),
            consumer::pull::Config {
                durable_name: Some(consumer_name(domain)),
                filter_subject: format!("{}.{domain}", ns.subject_prefix()),
                ..Default::default()
            },
        )
        .await
        .expect("consumer");
    js
}
