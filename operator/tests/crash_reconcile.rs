//! The operator killed in the middle of its work: SIGKILL, so no
//! clean-up runs and the Lease is not released. The rule: **nothing is lost or left
//! inconsistent**. A standby replica takes over once the dead leader's Lease has expired and
//! converges the domain to `Ready` with exactly the children it needs; a DKIM key, CA or
//! certificate that was already written is kept (DNS may already publish it), every key,
//! certificate and DNS record agrees with the others, and a further restart writes nothing.
//!
//! Kill points of the first reconcile:
//! * **exact**, between two writes: a ResourceQuota refuses one child, so the operator stops
//!   right before it (and retries with backoff) with everything before it written; the kill
//!   lands there. The state is exactly what a crash between those two writes leaves.
//! * **mid-flight**: killed the moment a watch shows the finalizer, the CA Secret, the DKIM
//!   Secret or the Deployment appear, while the operator is generating keys or writing the
//!   next child. What exists at the kill varies from run to run; the checks compare with it.
//!
//! And a kill during deletion, after the Deployment is gone but before the JetStream consumer:
//! the finalizer holds the MailDomain until a successor finishes the clean-up.
//!
//! Needs `e2e/local-cluster up` and its env (`. .kubemail-local/env`), like `cluster.rs`.

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer;
use common::maildomain::{
    ROOT_CA_CONFIG_MAP, apply_md, assert_owned, condition, ensure_delivery_consumer, md_api,
    secret_data, snapshot, text, wait_condition_by,
};
use common::{
    Operator, OperatorOptions, TestNamespace, client, delete_stream, install_crds,
    nats_authenticated, wait_for,
};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Pod, PodSpec, ResourceQuota, ResourceQuotaSpec, Secret, Service,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher as watch_objects};
use kube::{Api, Client, Resource, ResourceExt};
use kubemail_config::NodeConfig;
use kubemail_operator::certs;
use kubemail_operator::controller::mail_domain::FINALIZER;
use kubemail_operator::controller::mail_domain::names::selector_labels;
use kubemail_operator::crd::MailDomain;
use kubemail_operator::dkim::{self, KeyRecord, PrivateKeyPem, STATE_ANNOTATION};
use kubemail_operator::queue::consumer_name;
use serde_json::json;

/// The harness starts every operator with `--lease-duration 6s`.
const LEASE_DURATION: Duration = Duration::from_secs(6);
/// A successor stamps `acquireTime` before it reads the Lease, and it started counting when it
/// first saw the dead leader's last renewal: allow it that much ahead of a full lease.
const LEASE_CLOCK_SLACK: Duration = Duration::from_secs(1);
/// From a crash to a successor's `Ready`: the lease expiry, keys, a retry after backoff, on a
/// machine shared with other tests.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// For anything else to happen (a takeover, a frozen state, a watch event, garbage collection).
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Writes the killed process had sent may still land on the API server; wait this long before
/// reading what the crash left (not an assertion: later writes only mean less is compared).
const IN_FLIGHT: Duration = Duration::from_secs(1);

const NAME: &str = "crash";
const DOMAIN: &str = "crash.example";
const USERS_SOURCE: &str = "crash-users";
/// The operator's CA Secret (its `--ca-secret` default) in its namespace, here the test's.
const CA: &str = "kubemail-ca";
/// Where the first operator dies.
enum KillPoint {
    /// A ResourceQuota refuses the write of `refused`: the operator has written everything
    /// before it (`written`) and nothing after it when it is killed.
    RefusedWrite {
        quota: (&'static str, &'static str),
        refused: String,
        written: Vec<String>,
        missing: Vec<String>,
    },
    /// Killed as soon as a watch shows this.
    Seen(Trigger),
}

enum Trigger {
    Finalizer,
    Secret(&'static str),
    Deployment,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_ca_before_the_dkim_secret_keeps_the_ca() {
    killed_during_first_reconcile(
        "crash-ca",
        KillPoint::RefusedWrite {
            // The users source Secret and the CA fit; the DKIM Secret does not.
            quota: ("secrets", "2"),
            refused: format!("Secret {NAME}-dkim"),
            written: vec![format!("Secret/{CA}"), format!("ConfigMap/{NAME}-config")],
            missing: vec![
                format!("Secret/{NAME}-dkim"),
                format!("Secret/{NAME}-tls"),
                format!("Deployment/{NAME}"),
            ],
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_dkim_secret_before_the_certificate_keeps_the_keys() {
    killed_during_first_reconcile(
        "crash-dkim",
        KillPoint::RefusedWrite {
            // The users source Secret, the CA and the DKIM Secret fit; the TLS Secret does not.
            quota: ("secrets", "3"),
            refused: format!("Secret {NAME}-tls"),
            written: vec![format!("Secret/{CA}"), format!("Secret/{NAME}-dkim")],
            missing: vec![
                format!("Secret/{NAME}-tls"),
                format!("Secret/{NAME}-users-hashed"),
                format!("Deployment/{NAME}"),
            ],
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_certificate_before_the_users_keeps_keys_and_certificate() {
    killed_during_first_reconcile(
        "crash-tls",
        KillPoint::RefusedWrite {
            // ... and the TLS Secret; the rendered users Secret does not.
            quota: ("secrets", "4"),
            refused: format!("Secret {NAME}-users-hashed"),
            written: vec![
                format!("Secret/{CA}"),
                format!("Secret/{NAME}-dkim"),
                format!("Secret/{NAME}-tls"),
            ],
            missing: vec![
                format!("Secret/{NAME}-users-hashed"),
                format!("ConfigMap/{NAME}-dns"),
                format!("Deployment/{NAME}"),
            ],
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_before_the_deployment_rewrites_nothing_already_written() {
    killed_during_first_reconcile(
        "crash-deploy",
        KillPoint::RefusedWrite {
            // Every Secret and ConfigMap fits; the Deployment (applied last) does not.
            quota: ("count/deployments.apps", "0"),
            refused: format!("Deployment {NAME}"),
            written: vec![
                format!("Secret/{CA}"),
                format!("Secret/{NAME}-dkim"),
                format!("Secret/{NAME}-tls"),
                format!("Secret/{NAME}-users-hashed"),
                format!("ConfigMap/{NAME}-config"),
                format!("ConfigMap/{NAME}-dns"),
            ],
            missing: vec![format!("Deployment/{NAME}")],
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_flight_once_the_finalizer_is_set() {
    killed_during_first_reconcile("crash-fin", KillPoint::Seen(Trigger::Finalizer)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_flight_once_the_ca_appears() {
    killed_during_first_reconcile("crash-seeca", KillPoint::Seen(Trigger::Secret(CA))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_flight_once_the_dkim_secret_appears() {
    killed_during_first_reconcile(
        "crash-seedkim",
        KillPoint::Seen(Trigger::Secret("crash-dkim")),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_flight_once_the_deployment_appears() {
    killed_during_first_reconcile("crash-seedep", KillPoint::Seen(Trigger::Deployment)).await;
}

/// Kill during deletion: the finalizer has deleted the Deployment and waits for the last pod
/// to stop before it removes the domain's JetStream consumer. The MailDomain must stay (with
/// its finalizer, children and consumer) while no operator runs, and a successor must finish:
/// consumer removed, finalizer released, children garbage-collected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_deletion_a_successor_finishes_the_cleanup() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "crash-del").await;
    let n = ns.name.as_str();
    let mut first = Operator::start(&OperatorOptions::for_namespace(&ns, "del-a"));
    apply_md(
        &client,
        n,
        NAME,
        json!({ "domain": DOMAIN, "replicas": 0, "service": { "type": "ClusterIP" } }),
    )
    .await;
    wait_condition_by(
        &client,
        n,
        NAME,
        "Ready",
        |c| c.status == "True",
        READY_TIMEOUT,
        &first,
    )
    .await;

    // The consumer the nodes' delivery workers would have made.
    let js = ensure_delivery_consumer(&ns, DOMAIN).await;
    let consumer_exists = || async {
        js.get_consumer_from_stream::<consumer::pull::Config, _, _>(
            consumer_name(DOMAIN),
            ns.nats_stream(),
        )
        .await
        .is_ok()
    };

    // An SMTP node pod still draining: it carries the domain's pod labels and is never
    // scheduled (no scheduler of that name), so it stays until the test deletes it.
    let pods: Api<Pod> = Api::namespaced(client.clone(), n);
    let draining = Pod {
        metadata: ObjectMeta {
            name: Some(format!("{NAME}-draining")),
            labels: Some(selector_labels(NAME)),
            ..Default::default()
        },
        spec: Some(PodSpec {
            scheduler_name: Some("kubemail-test-never-scheduled".to_owned()),
            containers: vec![Container {
                name: "smtp-node".to_owned(),
                image: Some("kubemail/smtp-node:test".to_owned()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    pods.create(&PostParams::default(), &draining)
        .await
        .expect("create the draining pod");

    md_api(&client, n)
        .delete(NAME, &DeleteParams::background())
        .await
        .expect("delete the MailDomain");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), n);
    let terminating = wait_for(
        "the finalizer to wait for the draining pod (Ready=False, Terminating)",
        STEP_TIMEOUT,
        || async {
            let md = md_api(&client, n).get_opt(NAME).await.ok()?;
            let Some(md) = md else {
                panic!(
                    "the finalizer finished while a pod of the domain was still there:\n{}",
                    first.logs()
                )
            };
            (condition(&md, "Ready")?.reason == "Terminating").then_some(md)
        },
    )
    .await;
    assert!(
        condition(&terminating, "Ready")
            .unwrap()
            .message
            .contains(&consumer_name(DOMAIN)),
        "{:?}",
        condition(&terminating, "Ready")
    );
    wait_for(
        "the finalizer to delete the Deployment",
        STEP_TIMEOUT,
        || async {
            deployments
                .get_opt(NAME)
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await;

    first.kill();
    tokio::time::sleep(IN_FLIGHT).await;
    let md = md_api(&client, n)
        .get_opt(NAME)
        .await
        .unwrap()
        .expect("the MailDomain must outlive a crash of its finalizer");
    assert!(md.metadata.deletion_timestamp.is_some());
    assert_eq!(md.finalizers(), [FINALIZER]);
    assert!(
        consumer_exists().await,
        "the consumer must stay while a pod of the domain may still use it"
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), n);
    assert!(
        secrets
            .get_opt(&format!("{NAME}-dkim"))
            .await
            .unwrap()
            .is_some(),
        "children stay while their owner is being finalized"
    );

    // The pod stops while no operator runs; a successor finishes the clean-up.
    pods.delete(&format!("{NAME}-draining"), &DeleteParams::default())
        .await
        .expect("delete the draining pod");
    let second = Operator::start(&OperatorOptions::for_namespace(&ns, "del-b"));
    wait_for(
        "the successor to finalize and remove the MailDomain",
        READY_TIMEOUT,
        || async {
            md_api(&client, n)
                .get_opt(NAME)
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await;
    assert!(
        !consumer_exists().await,
        "the successor must delete the domain's JetStream consumer:\n{}",
        second.logs()
    );
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), n);
    let services: Api<Service> = Api::namespaced(client.clone(), n);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), n);
    wait_for(
        "the garbage collector to remove every child",
        STEP_TIMEOUT,
        || async {
            let domain_objects = |labels: Option<&BTreeMap<String, String>>| {
                labels.is_some_and(|l| {
                    l.get("app.kubernetes.io/instance").map(String::as_str) == Some(NAME)
                })
            };
            let left = secrets
                .list(&Default::default())
                .await
                .ok()?
                .items
                .iter()
                .filter(|o| domain_objects(o.metadata.labels.as_ref()))
                .count()
                + config_maps
                    .list(&Default::default())
                    .await
                    .ok()?
                    .items
                    .iter()
                    .filter(|o| domain_objects(o.metadata.labels.as_ref()))
                    .count()
                + services.list(&Default::default()).await.ok()?.items.len()
                + pdbs.list(&Default::default()).await.ok()?.items.len()
                + deployments
                    .list(&Default::default())
                    .await
                    .ok()?
                    .items
                    .len();
            (left == 0).then_some(())
        },
    )
    .await;
    assert!(
        secrets.get_opt(CA).await.unwrap().is_some(),
        "the shared CA is not owned by a domain and stays"
    );
    delete_stream(&ns.nats_stream()).await;
}

/// Kills the leader at `point` of the first reconcile of a MailDomain, lets the standby take
/// over and checks what it converges to, then restarts again and checks that nothing changes.
async fn killed_during_first_reconcile(prefix: &str, point: KillPoint) {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, prefix).await;
    let n = ns.name.as_str();
    users_source(&client, n).await;
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), n);
    if let KillPoint::RefusedWrite {
        quota: (resource, limit),
        ..
    } = &point
    {
        // With NATS authentication the operator also writes the nodes' credentials Secret,
        // right after the CA: one more Secret fits before the refused one.
        let limit = match (*resource, nats_authenticated()) {
            ("secrets", true) => (limit.parse::<u32>().expect("a count") + 1).to_string(),
            _ => (*limit).to_owned(),
        };
        create_quota(&quotas, resource, &limit).await;
    }

    // Two replicas: the leader, and a standby that takes over once the Lease expires.
    let mut leader = Operator::start(&OperatorOptions::for_namespace(&ns, "a"));
    wait_for("the first operator to lead", STEP_TIMEOUT, || async {
        leader.is_leader().then_some(())
    })
    .await;
    let mut standby = Operator::start(&OperatorOptions::for_namespace(&ns, "b"));

    match &point {
        KillPoint::RefusedWrite { refused, .. } => {
            apply_md(&client, n, NAME, spec()).await;
            let md = wait_condition_by(
                &client,
                n,
                NAME,
                "Ready",
                |c| c.reason == "ReconcileFailed" && c.message.contains("exceeded quota"),
                STEP_TIMEOUT,
                &leader,
            )
            .await;
            let message = &condition(&md, "Ready").unwrap().message;
            assert!(
                message.contains(&format!("cannot apply {refused}")),
                "the quota must stop the operator at {refused}: {message}"
            );
        }
        KillPoint::Seen(trigger) => {
            // Watch first (the list is done), then create the domain, then kill on sight.
            let seen = match trigger {
                Trigger::Finalizer => {
                    let stream = watching(md_api(&client, n)).await;
                    apply_md(&client, n, NAME, spec()).await;
                    first_match(stream, |md: &MailDomain| {
                        md.finalizers().iter().any(|f| f == FINALIZER)
                    })
                    .await
                }
                Trigger::Secret(name) => {
                    let stream = watching(Api::<Secret>::namespaced(client.clone(), n)).await;
                    apply_md(&client, n, NAME, spec()).await;
                    first_match(stream, |s: &Secret| s.name_any() == *name).await
                }
                Trigger::Deployment => {
                    let stream = watching(Api::<Deployment>::namespaced(client.clone(), n)).await;
                    apply_md(&client, n, NAME, spec()).await;
                    first_match(stream, |d: &Deployment| d.name_any() == NAME).await
                }
            };
            assert!(
                seen,
                "the watch ended before the kill point; leader logs:\n{}",
                leader.logs()
            );
        }
    }
    assert!(
        !standby.is_leader() && standby.maildomain_reconciles() == 0.0,
        "the standby must not have reconciled before the crash"
    );
    leader.kill();
    let leases: Api<Lease> = Api::namespaced(client.clone(), n);
    tokio::time::sleep(IN_FLIGHT).await;
    let dead_lease = lease_spec(&leases).await;
    assert_eq!(
        dead_lease.holder_identity.as_deref(),
        Some(leader.identity.as_str())
    );
    let crash = Crash::capture(&client, n).await;
    eprintln!("{prefix}: the crash left {:?}", crash.names());
    if let KillPoint::RefusedWrite {
        written, missing, ..
    } = &point
    {
        for w in written {
            assert!(
                crash.names().contains(w),
                "{w} is written before the refused write: {:?}",
                crash.names()
            );
        }
        for m in missing {
            assert!(
                !crash.names().contains(m),
                "{m} comes after the refused write: {:?}",
                crash.names()
            );
        }
        quotas
            .delete("crash-quota", &DeleteParams::default())
            .await
            .expect("delete the quota");
    }

    // The standby takes over only after the dead leader's Lease expired (no release on SIGKILL).
    wait_for(
        "the standby to take over the Lease",
        STEP_TIMEOUT,
        || async { standby.is_leader().then_some(()) },
    )
    .await;
    let taken = lease_spec(&leases).await;
    assert_eq!(
        taken.holder_identity.as_deref(),
        Some(standby.identity.as_str())
    );
    assert_eq!(
        taken.lease_transitions,
        Some(dead_lease.lease_transitions.unwrap_or(0) + 1)
    );
    let waited = taken.acquire_time.unwrap().0.as_millisecond()
        - dead_lease.renew_time.unwrap().0.as_millisecond();
    assert!(
        u128::try_from(waited).unwrap_or(0) >= (LEASE_DURATION - LEASE_CLOCK_SLACK).as_millis(),
        "the standby took over {waited} ms after the dead leader's last renewal, before the \
         {LEASE_DURATION:?} lease expired"
    );

    let md = wait_condition_by(
        &client,
        n,
        NAME,
        "Ready",
        |c| c.status == "True",
        READY_TIMEOUT,
        &standby,
    )
    .await;
    verify_converged(&client, n, &md, &crash).await;

    // A further restart (a crash again) writes nothing.
    let settled = settled_snapshot(&client, n).await;
    let third = Operator::start(&OperatorOptions::for_namespace(&ns, "c"));
    standby.kill();
    wait_for(
        "the third operator to lead and finish a reconcile",
        STEP_TIMEOUT,
        || async { (third.is_leader() && completed_reconciles(&third) >= 1.0).then_some(()) },
    )
    .await;
    assert_unchanged(&settled, &snapshot(&client, n, NAME).await);
    assert_unchanged(&settled, &settled_snapshot(&client, n).await);
    for op in [&leader, &standby, &third] {
        assert!(
            !op.logs().contains("PRIVATE KEY"),
            "key material in the logs"
        );
    }
}

/// What the crash left: the Secrets and ConfigMaps (with their data and resourceVersions) and
/// whether the Deployment existed.
struct Crash {
    secrets: BTreeMap<String, Secret>,
    config_maps: BTreeMap<String, ConfigMap>,
    deployment: bool,
}

impl Crash {
    async fn capture(client: &Client, ns: &str) -> Self {
        let secrets = Api::<Secret>::namespaced(client.clone(), ns)
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|s| (s.name_any(), s))
            .collect();
        let config_maps = Api::<ConfigMap>::namespaced(client.clone(), ns)
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|c| c.name_any() != ROOT_CA_CONFIG_MAP)
            .map(|c| (c.name_any(), c))
            .collect();
        let deployment = Api::<Deployment>::namespaced(client.clone(), ns)
            .get_opt(NAME)
            .await
            .unwrap()
            .is_some();
        Self {
            secrets,
            config_maps,
            deployment,
        }
    }

    fn names(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> =
            self.secrets.keys().map(|k| format!("Secret/{k}")).collect();
        names.extend(self.config_maps.keys().map(|k| format!("ConfigMap/{k}")));
        if self.deployment {
            names.insert(format!("Deployment/{NAME}"));
        }
        names
    }
}

/// Everything a converged domain must satisfy, and that what the crash left was kept.
async fn verify_converged(client: &Client, ns: &str, md: &MailDomain, crash: &Crash) {
    let status = md.status.clone().unwrap();
    for c in [
        "Ready",
        "DkimKeyReady",
        "CertificateReady",
        "DnsRecordsReady",
        "RelayResolved",
    ] {
        assert_eq!(
            condition(md, c).map(|c| c.status.as_str()),
            Some("True"),
            "{c}: {:?}",
            condition(md, c)
        );
    }

    // Exactly the children, once each, each controlled by the domain.
    let secrets: BTreeMap<String, Secret> = Api::<Secret>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|s| (s.name_any(), s))
        .collect();
    let names = |it: &mut dyn Iterator<Item = String>| it.collect::<BTreeSet<String>>();
    assert_eq!(
        names(&mut secrets.keys().cloned()),
        names(
            &mut [
                USERS_SOURCE.to_owned(),
                CA.to_owned(),
                format!("{NAME}-dkim"),
                format!("{NAME}-tls"),
                format!("{NAME}-users-hashed")
            ]
            .into_iter()
            .chain(nats_authenticated().then(|| format!("{NAME}-nats")))
        ),
        "the Secrets after convergence"
    );
    let config_maps: BTreeMap<String, ConfigMap> = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|c| c.name_any() != ROOT_CA_CONFIG_MAP)
        .map(|c| (c.name_any(), c))
        .collect();
    assert_eq!(
        names(&mut config_maps.keys().cloned()),
        names(&mut [format!("{NAME}-config"), format!("{NAME}-dns")].into_iter()),
        "the ConfigMaps after convergence"
    );
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    let services = Api::<Service>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    let pdbs = Api::<PodDisruptionBudget>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    for (kind, list) in [
        (
            "Deployment",
            deployments.iter().map(|o| o.name_any()).collect::<Vec<_>>(),
        ),
        ("Service", services.iter().map(|o| o.name_any()).collect()),
        (
            "PodDisruptionBudget",
            pdbs.iter().map(|o| o.name_any()).collect(),
        ),
    ] {
        assert_eq!(list, [NAME], "exactly one {kind}");
    }
    for s in [
        format!("{NAME}-dkim"),
        format!("{NAME}-tls"),
        format!("{NAME}-users-hashed"),
    ] {
        assert_owned(&secrets[&s].metadata, md, &format!("Secret {s}"));
    }
    for c in config_maps.values() {
        assert_owned(&c.metadata, md, &format!("ConfigMap {}", c.name_any()));
    }
    assert_owned(&deployments[0].metadata, md, "the Deployment");
    assert_owned(&services[0].metadata, md, "the Service");
    assert_owned(&pdbs[0].metadata, md, "the PodDisruptionBudget");
    assert!(
        secrets[CA]
            .metadata
            .owner_references
            .as_ref()
            .is_none_or(Vec::is_empty),
        "the shared CA is not owned by a domain"
    );

    // What the crash left was kept: no key, certificate or rendered file made again.
    for (name, before) in &crash.secrets {
        let after = &secrets[name];
        assert_eq!(
            secret_data(before),
            secret_data(after),
            "Secret {name} was rewritten after the crash (keys or certificate made again)"
        );
        assert_eq!(
            before.annotations().get(STATE_ANNOTATION),
            after.annotations().get(STATE_ANNOTATION),
            "the DKIM schedule of {name} changed after the crash"
        );
        assert_eq!(
            before.resource_version(),
            after.resource_version(),
            "Secret {name} was written again after the crash"
        );
    }
    for (name, before) in &crash.config_maps {
        let after = &config_maps[name];
        assert_eq!(
            before.data, after.data,
            "ConfigMap {name} changed after the crash"
        );
        assert_eq!(
            before.resource_version(),
            after.resource_version(),
            "ConfigMap {name} was written again after the crash"
        );
    }

    // The certificate: signed by the one CA, for the host name, with that CA as its chain.
    let ca_cert = text(&secrets[CA], "tls.crt");
    let tls = &secrets[&format!("{NAME}-tls")];
    let leaf = certs::inspect_leaf(&text(tls, "tls.crt"), &ca_cert).expect("a certificate");
    assert!(
        leaf.signed_by_ca,
        "the leaf must be signed by the CA Secret's certificate"
    );
    assert_eq!(leaf.dns_names, [format!("mx.{DOMAIN}")]);
    assert_eq!(text(tls, "ca.crt"), ca_cert);

    // DKIM: the Secret's keys, its schedule, the published records and the nodes' config agree.
    let dkim_secret = &secrets[&format!("{NAME}-dkim")];
    let records: Vec<KeyRecord> =
        serde_json::from_str(&dkim_secret.annotations()[STATE_ANNOTATION]).expect("the schedule");
    let selectors: BTreeSet<String> = records.iter().map(|r| r.selector.clone()).collect();
    assert_eq!(
        secret_data(dkim_secret)
            .into_keys()
            .collect::<BTreeSet<_>>(),
        selectors.iter().map(|s| format!("{s}.pem")).collect(),
        "every scheduled key has its material and nothing else is in the Secret"
    );
    assert_eq!(
        status.selectors.iter().cloned().collect::<BTreeSet<_>>(),
        selectors
    );
    let zone = config_maps[&format!("{NAME}-dns")].data.clone().unwrap()["zone"].clone();
    for record in &records {
        let pem = text(dkim_secret, &format!("{}.pem", record.selector));
        let public = dkim::public_key(record.algorithm, &PrivateKeyPem::new(pem))
            .expect("a valid stored key");
        let owner = format!("{}._domainkey.{DOMAIN}.", record.selector);
        let published = status
            .dns_records
            .iter()
            .find(|r| r.name == owner && r.type_ == "TXT")
            .unwrap_or_else(|| panic!("no TXT record {owner}: {:?}", status.dns_records));
        assert!(
            published.value.ends_with(&format!("p={public}")),
            "the published key of {} is not the one in the Secret",
            record.selector
        );
        // Zone files split long TXT data into 255-octet strings: look for the start.
        assert!(
            zone.contains(&public[..public.len().min(64)]),
            "the zone fragment lacks the key of {}",
            record.selector
        );
    }
    let node = NodeConfig::from_yaml(
        &config_maps[&format!("{NAME}-config")].data.clone().unwrap()["node.yaml"],
    )
    .expect("node.yaml is a NodeConfig");
    node.validate().expect("node.yaml validates");
    let signing: Vec<String> = node.domains[0]
        .dkim
        .keys
        .iter()
        .map(|k| k.selector.clone())
        .collect();
    assert_eq!(
        signing, status.signing_selectors,
        "the nodes sign with the published selectors"
    );
    for key in &node.domains[0].dkim.keys {
        let file = key
            .key_file
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            secret_data(dkim_secret).contains_key(&file),
            "the nodes' key file {file} is not in the DKIM Secret"
        );
    }
    assert!(
        text(&secrets[&format!("{NAME}-users-hashed")], "users")
            .contains(&format!("alice@{DOMAIN}:$argon2id$")),
        "the rendered users file"
    );

    // One ReplicaSet: the pod template never changed on the way (no rollout from new keys).
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), ns);
    let owned = wait_for("the Deployment's ReplicaSet", STEP_TIMEOUT, || async {
        let list = replica_sets.list(&Default::default()).await.ok()?.items;
        (!list.is_empty()).then_some(list)
    })
    .await;
    assert_eq!(
        owned.len(),
        1,
        "one ReplicaSet: {:?}",
        owned.iter().map(ResourceExt::name_any).collect::<Vec<_>>()
    );
}

/// Fails with the entries of `after` that differ from `before`.
fn assert_unchanged(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) {
    let keys: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    let changed: Vec<String> = keys
        .into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| {
            format!(
                "{k}:\n  before: {:?}\n  after:  {:?}",
                before.get(k),
                after.get(k)
            )
        })
        .collect();
    assert!(
        changed.is_empty(),
        "a restart after convergence must not write, but changed:\n{}",
        changed.join("\n")
    );
}

/// A snapshot that stayed the same for a while (controllers of the cluster have caught up).
async fn settled_snapshot(client: &Client, ns: &str) -> BTreeMap<String, String> {
    let start = Instant::now();
    let mut last = snapshot(client, ns, NAME).await;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = snapshot(client, ns, NAME).await;
        if now == last {
            return now;
        }
        assert!(
            start.elapsed() < STEP_TIMEOUT,
            "the domain's objects keep changing:\n{last:#?}\n{now:#?}"
        );
        last = now;
    }
}

fn completed_reconciles(op: &Operator) -> f64 {
    op.metric("kubemail_operator_reconcile_duration_seconds_count{controller=\"maildomain\"}")
}

fn spec() -> serde_json::Value {
    json!({
        "domain": DOMAIN,
        "replicas": 0,
        "service": { "type": "ClusterIP" },
        "submission": { "usersSecretRef": { "name": USERS_SOURCE } },
        "dmarc": { "policy": "quarantine" },
    })
}

async fn users_source(client: &Client, ns: &str) {
    let s = Secret {
        metadata: ObjectMeta {
            name: Some(USERS_SOURCE.to_owned()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "alice".to_owned(),
            ByteString(b"looking-glass".to_vec()),
        )])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &s)
        .await
        .expect("create the users Secret");
}

/// A quota of one resource; waits until the quota controller has counted the namespace (until
/// then the API server refuses every create of that resource).
async fn create_quota(quotas: &Api<ResourceQuota>, resource: &str, limit: &str) {
    let quota = ResourceQuota {
        metadata: ObjectMeta {
            name: Some("crash-quota".to_owned()),
            ..Default::default()
        },
        spec: Some(ResourceQuotaSpec {
            hard: Some(BTreeMap::from([(
                resource.to_owned(),
                Quantity(limit.to_owned()),
            )])),
            ..Default::default()
        }),
        ..Default::default()
    };
    quotas
        .create(&PostParams::default(), &quota)
        .await
        .expect("create the quota");
    wait_for(
        "the quota controller to count the namespace",
        STEP_TIMEOUT,
        || async {
            let q = quotas.get("crash-quota").await.ok()?;
            q.status?.used?.contains_key(resource).then_some(())
        },
    )
    .await;
}

/// A watch on `api` whose initial list is done, so nothing made from now on is missed.
async fn watching<K>(
    api: Api<K>,
) -> futures::stream::BoxStream<'static, Result<Event<K>, watcher::Error>>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let mut stream = watch_objects(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    tokio::time::timeout(STEP_TIMEOUT, async {
        while let Some(event) = stream.next().await {
            if matches!(event, Ok(Event::InitDone)) {
                return;
            }
        }
        panic!("the watch ended before its initial list");
    })
    .await
    .expect("the watch's initial list");
    stream
}

/// Consumes `stream` until an object matches; `false` when the stream ended first.
async fn first_match<K>(
    mut stream: futures::stream::BoxStream<'static, Result<Event<K>, watcher::Error>>,
    matches: impl Fn(&K) -> bool,
) -> bool {
    tokio::time::timeout(STEP_TIMEOUT, async {
        loop {
            match stream.try_next().await {
                Ok(Some(Event::Apply(o) | Event::InitApply(o))) if matches(&o) => return true,
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => return false,
            }
        }
    })
    .await
    .expect("timed out waiting for the kill point")
}

async fn lease_spec(leases: &Api<Lease>) -> LeaseSpec {
    leases
        .get("kubemail-operator")
        .await
        .expect("the Lease")
        .spec
        .unwrap_or_default()
}
