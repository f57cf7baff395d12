//! DeliveryPause against the real local control plane and its NATS: the CRD's admission
//! rules, the operator writing the pause into the bucket every node watches, its status
//! (Ready, the end, how many queued messages it holds back), expiry, and deletion through
//! the finalizer. What the nodes do with a pause is `smtp-node/tests/pauses.rs`.
//!
//! Needs `e2e/local-cluster up` and its env (`. .kubemail-local/env`).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use common::{
    Operator, OperatorOptions, TEST_MANAGER, TestNamespace, client, delete_stream, install_crds,
    nats_connect, wait_for,
};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kubemail_operator::crd::DeliveryPause;
use kubemail_queue::{Direction, QueueEntry, QueueId};
use serde_json::{Value, json};

fn entry(id: &str, paused_by: Option<&str>) -> QueueEntry {
    let mut e = QueueEntry {
        not_before: Some(SystemTime::now() + Duration::from_secs(3600)),
        ..QueueEntry::new(
            QueueId::from(id.to_owned()),
            "alice@example.com".into(),
            vec!["carol@remote.test".into()],
            Direction::Outbound,
            "example.com".into(),
            SystemTime::now(),
        )
    };
    e.admin.paused_by = paused_by.map(str::to_owned);
    e
}

fn condition(dp: &DeliveryPause) -> Option<(String, String)> {
    dp.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone()))
}

async fn stored(js: &jetstream::Context, key: &str) -> Option<Value> {
    let kv = js.get_key_value(kubemail_queue::PAUSES_BUCKET).await.ok()?;
    let value = kv.get(key).await.ok()??;
    serde_json::from_slice(&value).ok()
}

#[tokio::test]
async fn a_pause_reaches_the_nodes_bucket_counts_what_it_holds_expires_and_is_finalized() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "pause").await;
    let n = ns.name.clone();
    let _op = Operator::start(&OperatorOptions::for_namespace(&ns, "pause-a"));
    let api: Api<DeliveryPause> = Api::namespaced(client.clone(), &n);

    // Admission: a pause must select something, and end one way only.
    let create = |name: &str, spec: Value| {
        let api = api.clone();
        let obj: DeliveryPause = serde_json::from_value(json!({
            "apiVersion": "kubemail.io/v1alpha1", "kind": "DeliveryPause",
            "metadata": { "name": name }, "spec": spec,
        }))
        .unwrap();
        async move { api.create(&PostParams::default(), &obj).await }
    };
    for (spec, message) in [
        (
            json!({ "reason": "nothing" }),
            "name at least one of spec.recipientDomains",
        ),
        (
            json!({ "recipientDomains": ["Gmail.COM"] }),
            "spec.recipientDomains must be lower-case domain names",
        ),
        (
            json!({ "recipientDomains": ["gmail.com"], "duration": "1h", "until": "2030-01-01T00:00:00Z" }),
            "give spec.until or spec.duration, not both",
        ),
    ] {
        match create("bad", spec).await {
            Err(kube::Error::Api(s)) => assert!(s.message.contains(message), "{}", s.message),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    // A queue as the nodes leave it: one entry waiting for this pause, one for another reason.
    let js = jetstream::new(nats_connect().await.expect("NATS"));
    js.get_or_create_stream(stream::Config {
        name: ns.nats_stream(),
        subjects: vec![format!("{}.>", ns.subject_prefix())],
        retention: stream::RetentionPolicy::WorkQueue,
        ..Default::default()
    })
    .await
    .unwrap();
    let key = format!("{n}.remote-421");
    for e in [entry("q1", Some(&key)), entry("q2", None)] {
        js.publish_with_headers(
            kubemail_queue::subject(&ns.subject_prefix(), &e.domain),
            e.to_headers(&e.msg_id()),
            Bytes::from_static(b"Subject: x\r\n\r\nx\r\n"),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }

    api.patch(
        "remote-421",
        &PatchParams::apply(TEST_MANAGER).force(),
        &Patch::Apply(json!({
            "apiVersion": "kubemail.io/v1alpha1", "kind": "DeliveryPause",
            "metadata": { "name": "remote-421" },
            "spec": { "recipientDomains": ["remote.test"], "duration": "1h", "reason": "remote.test answers 421" },
        })),
    )
    .await
    .unwrap();
    let ready = wait_for(
        "the pause Ready and counted",
        Duration::from_secs(60),
        || async {
            let dp = api.get("remote-421").await.ok()?;
            (condition(&dp) == Some(("True".into(), "Active".into()))
                && dp.status.as_ref()?.held_messages == 1)
                .then_some(dp)
        },
    )
    .await;
    let status = ready.status.unwrap();
    assert!(
        status.expires_at.is_some(),
        "the end of a 1h pause is shown"
    );
    let record = stored(&js, &key)
        .await
        .expect("the pause in the nodes' bucket");
    assert_eq!(record["recipientDomains"], json!(["remote.test"]));
    assert_eq!(record["reason"], "remote.test answers 421");
    assert!(record["expiresAt"].is_string(), "{record}");

    // A pause with an end in a few seconds expires by itself.
    let until = kubemail_queue::rfc3339(SystemTime::now() + Duration::from_secs(4));
    api.patch(
        "short",
        &PatchParams::apply(TEST_MANAGER).force(),
        &Patch::Apply(json!({
            "apiVersion": "kubemail.io/v1alpha1", "kind": "DeliveryPause",
            "metadata": { "name": "short" },
            "spec": { "mxHosts": ["*.google.com"], "until": until },
        })),
    )
    .await
    .unwrap();
    wait_for(
        "the short pause expired",
        Duration::from_secs(60),
        || async {
            let dp = api.get("short").await.ok()?;
            (condition(&dp) == Some(("False".into(), "Expired".into()))).then_some(())
        },
    )
    .await;
    assert!(
        stored(&js, &format!("{n}.short")).await.is_none(),
        "an expired pause leaves the bucket"
    );

    // Deleting the resource removes the record first (finalizer), then the resource.
    api.delete("remote-421", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the pause deleted", Duration::from_secs(60), || async {
        api.get_opt("remote-421")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        stored(&js, &key).await.is_none(),
        "a deleted pause leaves the bucket"
    );
    delete_stream(&ns.nats_stream()).await;
}

/// A tenant's pause (in a namespace other than the operator's) holds back only that
/// namespace's MailDomains: without one it is refused and never reaches the nodes' bucket;
/// with one it is written limited to that domain.
#[tokio::test]
async fn a_tenants_pause_reaches_only_the_mail_domains_of_its_namespace() {
    let client = client().await;
    install_crds(&client).await;
    let platform = TestNamespace::create(&client, "pause-op").await;
    let tenant = TestNamespace::create(&client, "pause-tenant").await;
    let t = tenant.name.clone();
    let mut options = OperatorOptions::for_namespace(&platform, "pause-scope");
    options.extra_args = vec!["--watch-namespaces".into(), t.clone()];
    let _op = Operator::start(&options);
    let api: Api<DeliveryPause> = Api::namespaced(client.clone(), &t);
    let js = jetstream::new(nats_connect().await.expect("NATS"));
    let key = format!("{t}.everything-to-gmail");

    api.patch(
        "everything-to-gmail",
        &PatchParams::apply(TEST_MANAGER).force(),
        &Patch::Apply(json!({
            "apiVersion": "kubemail.io/v1alpha1", "kind": "DeliveryPause",
            "metadata": { "name": "everything-to-gmail" },
            "spec": { "recipientDomains": ["gmail.com"] },
        })),
    )
    .await
    .unwrap();
    wait_for(
        "the pause refused for want of MailDomains",
        Duration::from_secs(60),
        || async {
            let dp = api.get("everything-to-gmail").await.ok()?;
            (condition(&dp) == Some(("False".into(), "NoMailDomains".into()))).then_some(())
        },
    )
    .await;
    assert!(
        stored(&js, &key).await.is_none(),
        "a tenant's pause without MailDomains must not reach the nodes"
    );

    // A MailDomain of the tenant: the pause now holds back exactly that domain.
    common::maildomain::apply_md(
        &client,
        &t,
        "shop",
        json!({ "domain": "shop.pause.test", "replicas": 0, "inbound": { "recipients": ["postmaster"] } }),
    )
    .await;
    wait_for(
        "the pause active for the tenant's domain",
        Duration::from_secs(90),
        || async {
            let dp = api.get("everything-to-gmail").await.ok()?;
            (condition(&dp) == Some(("True".into(), "Active".into()))).then_some(())
        },
    )
    .await;
    let record = stored(&js, &key)
        .await
        .expect("the pause in the nodes' bucket");
    assert_eq!(
        record["fromDomains"],
        json!(["shop.pause.test"]),
        "{record}"
    );
    assert_eq!(record["recipientDomains"], json!(["gmail.com"]), "{record}");

    api.delete("everything-to-gmail", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the pause deleted", Duration::from_secs(60), || async {
        api.get_opt("everything-to-gmail")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(stored(&js, &key).await.is_none());

    // The MailDomain goes while the operator runs, so its finalizer does not hold the namespace.
    let domains: Api<kubemail_operator::crd::MailDomain> = Api::namespaced(client.clone(), &t);
    domains
        .delete("shop", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the MailDomain deleted",
        Duration::from_secs(90),
        || async { domains.get_opt("shop").await.ok()?.is_none().then_some(()) },
    )
    .await;
}
