//! MailDomain helpers shared by the operator's cluster tests: apply, read conditions, wait for
//! one, and check the children's Secrets and owner references.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use kubemail_operator::crd::MailDomain;
use serde_json::{Value, json};

use super::{Operator, TEST_MANAGER};

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
