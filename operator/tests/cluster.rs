//! The operator against the real local control plane (kube-apiserver, kube-controller-manager's
//! garbage collector, the node agent running SMTP node pods, nats-server): the real binary as a
//! child process, one namespace per test.
//!
//! Needs `e2e/local-cluster up` and its env (`. .kubemail-local/env`), and the `smtp-node`
//! binary built (`cargo build -p kubemail-smtp-node`; `make test` builds every binary first).

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use async_nats::jetstream::consumer;
use common::maildomain::{
    apply_md, assert_owned, condition, ensure_delivery_consumer, md_api, secret_data, snapshot,
    text, wait_condition,
};
use common::{
    Operator, OperatorOptions, TEST_MANAGER, TestNamespace, client, delete_stream, install_crds,
    wait_for,
};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams,
};
use kube::{Api, Client, Resource};
use kubemail_config::NodeConfig;
use kubemail_operator::certs;
use kubemail_operator::crd::{MailDomain, Relay};
use serde_json::{Value, json};

const READY_TIMEOUT: Duration = Duration::from_secs(180);
const CHILDREN_TIMEOUT: Duration = Duration::from_secs(60);

async fn secret(client: &Client, ns: &str, name: &str, data: &[(&str, &str)]) {
    let s = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(&s),
        )
        .await
        .unwrap_or_else(|e| panic!("apply Secret {name}: {e}"));
}

/// Makes the operator reconcile the domain again and waits until it has.
async fn poke_and_wait(client: &Client, ns: &str, name: &str, op: &Operator, round: u32) {
    let before = op.maildomain_reconciles();
    md_api(client, ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"kubemail.io/test-poke": round.to_string()}}}),
            ),
        )
        .await
        .expect("annotate");
    wait_for(
        "the operator to reconcile after the annotation",
        Duration::from_secs(30),
        || async { (op.maildomain_reconciles() > before).then_some(()) },
    )
    .await;
    // Let a reconcile in flight finish (and anything it triggers).
    tokio::time::sleep(Duration::from_secs(3)).await;
}

async fn get<K>(client: &Client, ns: &str, name: &str) -> K
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    wait_for(
        &format!("{} {ns}/{name}", K::kind(&K::DynamicType::default())),
        CHILDREN_TIMEOUT,
        || async { api.get_opt(name).await.ok().flatten() },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maildomain_reconciles_into_ready_children_idempotently_scales_and_is_finalized() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "life").await;
    let n = ns.name.as_str();
    let mut op = Operator::start(&OperatorOptions::for_namespace(&ns, "life-a"));

    secret(
        &client,
        n,
        "example-com-users-src",
        &[("alice", "wonderland")],
    )
    .await;
    apply_md(
        &client,
        n,
        "example-com",
        json!({
            "domain": "example.com",
            "replicas": 1,
            "service": { "type": "ClusterIP" },
            "inbound": { "recipients": ["postmaster", "bob"] },
            "submission": { "usersSecretRef": { "name": "example-com-users-src" } },
            "dmarc": { "policy": "quarantine", "rua": "mailto:dmarc@example.com" },
            "mtaSts": { "mode": "testing" },
        }),
    )
    .await;

    // Every child, with the expected spec and owned by the domain.
    let md = md_api(&client, n).get("example-com").await.unwrap();
    let config: ConfigMap = get(&client, n, "example-com-config").await;
    assert_owned(&config.metadata, &md, "the node ConfigMap");
    let node = NodeConfig::from_yaml(&config.data.clone().unwrap()["node.yaml"])
        .expect("node.yaml is a NodeConfig");
    node.validate().expect("node.yaml validates");
    assert_eq!(node.hostname, "mx.example.com");
    assert_eq!(node.domains[0].recipients, ["postmaster", "bob"]);
    assert_eq!(node.nats.stream, ns.nats_stream());

    let dkim: Secret = get(&client, n, "example-com-dkim").await;
    assert_owned(&dkim.metadata, &md, "the DKIM Secret");
    let keys: Vec<String> = secret_data(&dkim).into_keys().collect();
    assert_eq!(keys, ["kubemail1-ed25519.pem", "kubemail1.pem"]);
    assert!(text(&dkim, "kubemail1.pem").starts_with("-----BEGIN PRIVATE KEY-----"));

    let tls: Secret = get(&client, n, "example-com-tls").await;
    assert_owned(&tls.metadata, &md, "the TLS Secret");
    assert_eq!(tls.type_.as_deref(), Some("kubernetes.io/tls"));
    let leaf =
        certs::inspect_leaf(&text(&tls, "tls.crt"), &text(&tls, "ca.crt")).expect("a certificate");
    // The host name, and the MTA-STS policy host because the domain publishes MTA-STS.
    assert_eq!(leaf.dns_names, ["mx.example.com", "mta-sts.example.com"]);
    assert!(leaf.signed_by_ca, "the leaf is signed by the operator CA");
    let ca: Secret = get(&client, n, "kubemail-ca").await;
    assert_eq!(text(&ca, "tls.crt"), text(&tls, "ca.crt"));

    let users: Secret = get(&client, n, "example-com-users-hashed").await;
    assert_owned(&users.metadata, &md, "the users Secret");
    let users_file = text(&users, "users");
    assert!(
        users_file.contains("alice@example.com:$argon2id$"),
        "{users_file}"
    );
    assert!(!users_file.contains("wonderland"));

    let dns: ConfigMap = get(&client, n, "example-com-dns").await;
    assert_owned(&dns.metadata, &md, "the DNS ConfigMap");
    let zone = dns.data.clone().unwrap()["zone"].clone();
    assert!(
        zone.contains("example.com.\t3600\tIN\tMX\t10 mx.example.com."),
        "{zone}"
    );
    assert!(dns.data.clone().unwrap()["mta-sts.txt"].contains("mode: testing"));

    let deployment: Deployment = get(&client, n, "example-com").await;
    assert_owned(&deployment.metadata, &md, "the Deployment");
    let dspec = deployment.spec.clone().unwrap();
    assert_eq!(dspec.replicas, Some(1));
    let pod = dspec.template.spec.clone().unwrap();
    assert_eq!(
        pod.containers[0].image.as_deref(),
        Some("kubemail/smtp-node:test")
    );
    assert!(
        pod.containers[0].readiness_probe.is_some() && pod.containers[0].liveness_probe.is_some()
    );
    assert!(
        dspec
            .template
            .metadata
            .clone()
            .unwrap()
            .annotations
            .unwrap()
            .contains_key("kubemail.io/config-checksum")
    );
    let service: Service = get(&client, n, "example-com").await;
    assert_owned(&service.metadata, &md, "the Service");
    let ports: Vec<i32> = service
        .spec
        .clone()
        .unwrap()
        .ports
        .unwrap()
        .iter()
        .map(|p| p.port)
        .collect();
    // 443 serves the MTA-STS policy the domain publishes (`mtaSts.mode: testing`).
    assert_eq!(ports, [25, 465, 587, 443]);
    assert_eq!(service.spec.unwrap().type_.as_deref(), Some("ClusterIP"));
    let pdb: PodDisruptionBudget = get(&client, n, "example-com").await;
    assert_owned(&pdb.metadata, &md, "the PodDisruptionBudget");

    // Ready once the SMTP node pod is ready.
    let ready = wait_condition(
        &client,
        n,
        "example-com",
        "Ready",
        "True",
        READY_TIMEOUT,
        &op,
    )
    .await;
    let status = ready.status.clone().unwrap();
    assert_eq!(status.ready_replicas, 1);
    assert_eq!(status.selectors, ["kubemail1", "kubemail1-ed25519"]);
    for c in [
        "DkimKeyReady",
        "CertificateReady",
        "DnsRecordsReady",
        "RelayResolved",
    ] {
        assert_eq!(
            condition(&ready, c).map(|c| c.status.as_str()),
            Some("True"),
            "{c}: {:?}",
            condition(&ready, c)
        );
    }
    let types: Vec<&str> = status
        .dns_records
        .iter()
        .map(|r| r.type_.as_str())
        .collect();
    assert_eq!(
        types,
        // MX, SPF, two DKIM keys, DMARC, the policy host's CNAME and the MTA-STS record.
        ["MX", "TXT", "TXT", "TXT", "TXT", "CNAME", "TXT"],
        "{:?}",
        status.dns_records
    );

    // A second reconcile pass writes nothing.
    let before = snapshot(&client, n, "example-com").await;
    poke_and_wait(&client, n, "example-com", &op, 1).await;
    let after = snapshot(&client, n, "example-com").await;
    assert_eq!(before, after, "a reconcile without changes must not write");

    // Scaling.
    apply_md(
        &client,
        n,
        "example-com",
        json!({
            "domain": "example.com",
            "replicas": 2,
            "service": { "type": "ClusterIP" },
            "inbound": { "recipients": ["postmaster", "bob"] },
            "submission": { "usersSecretRef": { "name": "example-com-users-src" } },
            "dmarc": { "policy": "quarantine", "rua": "mailto:dmarc@example.com" },
            "mtaSts": { "mode": "testing" },
        }),
    )
    .await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), n);
    wait_for("the Deployment to scale to 2", CHILDREN_TIMEOUT, || async {
        let d = deployments.get("example-com").await.ok()?;
        (d.spec?.replicas == Some(2)).then_some(())
    })
    .await;
    let scaled = deployments.get("example-com").await.unwrap();
    assert_eq!(
        scaled
            .spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()["kubemail.io/config-checksum"],
        dspec.template.metadata.unwrap().annotations.unwrap()["kubemail.io/config-checksum"],
        "scaling does not change the config checksum"
    );

    // Deleting runs the finalizer (the JetStream consumer goes) and the children are collected.
    // The node's delivery workers may have made it already; make sure it is there.
    let js = ensure_delivery_consumer(&ns, "example.com").await;
    md_api(&client, n)
        .delete("example-com", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for(
        "the MailDomain to be finalized and removed",
        CHILDREN_TIMEOUT,
        || async {
            md_api(&client, n)
                .get_opt("example-com")
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await;
    let consumer = js
        .get_consumer_from_stream::<consumer::pull::Config, _, _>(
            kubemail_operator::queue::consumer_name("example.com"),
            ns.nats_stream(),
        )
        .await;
    assert!(
        consumer.is_err(),
        "the finalizer must delete the domain's JetStream consumer"
    );
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), n);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), n);
    wait_for(
        "the garbage collector to remove the children",
        CHILDREN_TIMEOUT,
        || async {
            let gone = config_maps
                .get_opt("example-com-config")
                .await
                .ok()?
                .is_none()
                && config_maps.get_opt("example-com-dns").await.ok()?.is_none()
                && secrets.get_opt("example-com-dkim").await.ok()?.is_none()
                && secrets.get_opt("example-com-tls").await.ok()?.is_none()
                && secrets
                    .get_opt("example-com-users-hashed")
                    .await
                    .ok()?
                    .is_none()
                && deployments.get_opt("example-com").await.ok()?.is_none();
            gone.then_some(())
        },
    )
    .await;
    assert!(
        secrets.get_opt("kubemail-ca").await.unwrap().is_some(),
        "the shared CA is not owned by a domain and stays"
    );

    // K8S-SEC-03: no key material or password in the logs.
    let logs = op.logs();
    assert!(
        !logs.contains("PRIVATE KEY"),
        "private keys leaked into the logs"
    );
    assert!(
        !logs.contains("wonderland"),
        "a password leaked into the logs"
    );
    assert!(
        op.stop(Duration::from_secs(20)),
        "the operator exits cleanly on SIGTERM:\n{logs}"
    );
    delete_stream(&ns.nats_stream()).await;
}

#[tokio::test]
async fn invalid_maildomains_are_refused_at_admission_with_the_cel_message() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "cel").await;
    let api = md_api(&client, &ns.name);
    let create = |name: &str, spec: Value| {
        let api = api.clone();
        let obj: MailDomain = serde_json::from_value(json!({
            "apiVersion": "kubemail.io/v1alpha1", "kind": "MailDomain",
            "metadata": { "name": name }, "spec": spec,
        }))
        .expect("object");
        async move { api.create(&PostParams::default(), &obj).await }
    };
    let refused = |r: Result<MailDomain, kube::Error>| match r {
        Err(kube::Error::Api(s)) => s.message,
        other => panic!("expected the API server to refuse, got {other:?}"),
    };

    let m = refused(create("bad", json!({ "domain": "Example..com" })).await);
    assert!(
        m.contains("spec.domain must be a lower-case domain name such as example.com"),
        "{m}"
    );
    let m = refused(
        create(
            "bad",
            json!({ "domain": "example.com", "dkim": { "algorithms": ["ed25519-sha256"] } }),
        )
        .await,
    );
    assert!(
        m.contains("spec.dkim.algorithms must contain rsa-sha256"),
        "{m}"
    );
    let m = refused(
        create(
            "bad",
            json!({ "domain": "example.com", "limits": { "maxMessageSize": "2Gi" } }),
        )
        .await,
    );
    assert!(
        m.contains("maxMessageSize must be a size between 1Ki and 1Gi"),
        "{m}"
    );
    let m = refused(
        create(
            "bad",
            json!({ "domain": "example.com", "spf": { "ip4": ["2001:db8::1"] } }),
        )
        .await,
    );
    assert!(m.contains("spec.spf.ip4 entries must be IPv4"), "{m}");
    let m = refused(create("bad", json!({ "domain": "example.com", "replicas": 500 })).await);
    assert!(m.contains("spec.replicas"), "{m}");
    let m = refused(create("example.com", json!({ "domain": "example.com" })).await);
    assert!(m.contains("metadata.name must be a DNS label"), "{m}");

    let m = refused(
        create(
            "bad",
            json!({ "domain": "example.com", "service": { "proxyProtocol": { "enabled": true } } }),
        )
        .await,
    );
    assert!(
        m.contains(
            "spec.service.proxyProtocol.trustedCidrs must list the load balancer's networks"
        ),
        "{m}"
    );
    create(
        "proxied",
        json!({ "domain": "example.net", "replicas": 0,
                "service": { "proxyProtocol": { "enabled": true, "trustedCidrs": ["10.0.0.0/8"] } } }),
    )
    .await
    .expect("PROXY protocol with trusted networks is accepted");

    create("good", json!({ "domain": "example.com", "replicas": 0 }))
        .await
        .expect("a valid MailDomain is accepted");
    let r = api
        .patch(
            "good",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "domain": "example.org" } })),
        )
        .await;
    let m = refused(r);
    assert!(m.contains("spec.domain is immutable"), "{m}");

    let relays: Api<Relay> = Api::namespaced(client.clone(), &ns.name);
    let relay: Relay = serde_json::from_value(json!({
        "apiVersion": "kubemail.io/v1alpha1", "kind": "Relay", "metadata": { "name": "r" },
        "spec": { "host": "smtp.example.net", "port": 70000 },
    }))
    .unwrap();
    let r = relays.create(&PostParams::default(), &relay).await;
    assert!(
        matches!(r, Err(kube::Error::Api(_))),
        "port 70000 is refused"
    );
    let relay: Relay = serde_json::from_value(json!({
        "apiVersion": "kubemail.io/v1alpha1", "kind": "Relay", "metadata": { "name": "r" },
        "spec": { "host": "smtp.example.net", "tls": "Opportunistic", "auth": { "secretRef": { "name": "x" } } },
    }))
    .unwrap();
    let m = match relays.create(&PostParams::default(), &relay).await {
        Err(kube::Error::Api(s)) => s.message,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(
        m.contains("credentials must never cross the network in clear text"),
        "{m}"
    );
}

#[tokio::test]
async fn restarting_the_operator_keeps_the_dkim_keys_and_the_certificate() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "restart").await;
    let n = ns.name.as_str();
    let mut first = Operator::start(&OperatorOptions::for_namespace(&ns, "restart-a"));
    apply_md(
        &client,
        n,
        "keep",
        json!({ "domain": "keep.example", "replicas": 0, "service": { "type": "ClusterIP" } }),
    )
    .await;
    wait_condition(&client, n, "keep", "Ready", "True", READY_TIMEOUT, &first).await;
    let dkim: Secret = get(&client, n, "keep-dkim").await;
    let tls: Secret = get(&client, n, "keep-tls").await;
    let before = snapshot(&client, n, "keep").await;
    assert!(
        first.stop(Duration::from_secs(20)),
        "clean exit:\n{}",
        first.logs()
    );

    let second = Operator::start(&OperatorOptions::for_namespace(&ns, "restart-b"));
    wait_for(
        "the new operator to lead and reconcile",
        Duration::from_secs(30),
        || async { (second.is_leader() && second.maildomain_reconciles() >= 1.0).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dkim_after: Secret = get(&client, n, "keep-dkim").await;
    let tls_after: Secret = get(&client, n, "keep-tls").await;
    assert_eq!(
        secret_data(&dkim),
        secret_data(&dkim_after),
        "DKIM keys survive a restart"
    );
    assert_eq!(
        secret_data(&tls),
        secret_data(&tls_after),
        "the certificate survives a restart"
    );
    assert_eq!(
        before,
        snapshot(&client, n, "keep").await,
        "a restart writes nothing"
    );
}

#[tokio::test]
async fn with_two_replicas_only_the_leader_reconciles_and_a_follower_takes_over() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "leader").await;
    let n = ns.name.as_str();
    let mut a = Operator::start(&OperatorOptions::for_namespace(&ns, "leader-a"));
    let mut b = Operator::start(&OperatorOptions::for_namespace(&ns, "leader-b"));
    wait_for(
        "one of the two operators to lead",
        Duration::from_secs(30),
        || async { (a.is_leader() ^ b.is_leader()).then_some(()) },
    )
    .await;
    let (leader, follower) = if a.is_leader() {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let lease = Api::<Lease>::namespaced(client.clone(), n)
        .get("kubemail-operator")
        .await
        .expect("Lease");
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some(leader.identity.as_str())
    );

    apply_md(
        &client,
        n,
        "lead",
        json!({ "domain": "lead.example", "replicas": 0, "service": { "type": "ClusterIP" } }),
    )
    .await;
    wait_condition(&client, n, "lead", "Ready", "True", READY_TIMEOUT, leader).await;
    assert!(leader.maildomain_reconciles() >= 1.0);
    assert_eq!(
        follower.maildomain_reconciles(),
        0.0,
        "the follower must not reconcile"
    );
    assert!(!follower.is_leader());

    // The leader goes away (SIGTERM releases the Lease); the follower takes over.
    assert!(
        leader.stop(Duration::from_secs(20)),
        "clean exit:\n{}",
        leader.logs()
    );
    wait_for(
        "the follower to take over the Lease",
        Duration::from_secs(30),
        || async { follower.is_leader().then_some(()) },
    )
    .await;
    apply_md(
        &client,
        n,
        "lead",
        json!({ "domain": "lead.example", "replicas": 0, "service": { "type": "ClusterIP" }, "dmarc": { "policy": "reject" } }),
    )
    .await;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), n);
    wait_for(
        "the new leader to re-render the DNS records",
        Duration::from_secs(30),
        || async {
            let cm = config_maps.get("lead-dns").await.ok()?;
            cm.data?.get("zone")?.contains("p=reject").then_some(())
        },
    )
    .await;
    assert!(follower.maildomain_reconciles() >= 1.0);
}

#[tokio::test]
async fn relays_are_validated_probed_and_re_render_the_domains_using_them() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "relay").await;
    let n = ns.name.as_str();
    let op = Operator::start(&OperatorOptions::for_namespace(&ns, "relay-a"));
    let port = fake_smtp_server().await;

    let relays: Api<Relay> = Api::namespaced(client.clone(), n);
    let relay = |include: &str| {
        json!({
            "apiVersion": "kubemail.io/v1alpha1", "kind": "Relay", "metadata": { "name": "smarthost" },
            "spec": {
                "host": "127.0.0.1", "port": port, "tls": "StartTlsRequired",
                "auth": { "secretRef": { "name": "smarthost-auth" } },
                "spfInclude": include, "probe": { "interval": "1h" },
            },
        })
    };
    relays
        .patch(
            "smarthost",
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(relay("relay-one.example")),
        )
        .await
        .expect("Relay");
    let relay_condition = |type_: &'static str, status: &'static str, reason: &'static str| {
        let relays = relays.clone();
        async move {
            wait_for(
                &format!("Relay {type_}={status} ({reason})"),
                Duration::from_secs(30),
                || async {
                    let r = relays.get("smarthost").await.ok()?;
                    let c = r
                        .status?
                        .conditions
                        .into_iter()
                        .find(|c| c.type_ == type_)?;
                    (c.status == status && c.reason == reason).then_some(())
                },
            )
            .await;
        }
    };
    relay_condition("Ready", "False", "AuthSecretNotFound").await;
    relay_condition("Reachable", "True", "ProbeSucceeded").await;
    secret(
        &client,
        n,
        "smarthost-auth",
        &[("username", "apikey"), ("password", "s3cret")],
    )
    .await;
    relay_condition("Ready", "True", "Valid").await;
    let probed = relays
        .get("smarthost")
        .await
        .unwrap()
        .status
        .unwrap()
        .last_probe
        .unwrap();
    assert!(probed.reachable && probed.starttls, "{probed:?}");

    apply_md(
        &client,
        n,
        "relayed",
        json!({ "domain": "relayed.example", "replicas": 0, "service": { "type": "ClusterIP" }, "relayRef": { "name": "smarthost" } }),
    )
    .await;
    let md = wait_condition(
        &client,
        n,
        "relayed",
        "RelayResolved",
        "True",
        Duration::from_secs(60),
        &op,
    )
    .await;
    let spf = |md: &MailDomain| {
        md.status
            .clone()
            .unwrap()
            .dns_records
            .into_iter()
            .find(|r| r.value.starts_with("v=spf1"))
            .unwrap()
            .value
    };
    assert_eq!(spf(&md), "v=spf1 mx include:relay-one.example -all");

    // A Relay change re-renders the domain.
    relays
        .patch(
            "smarthost",
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(relay("relay-two.example")),
        )
        .await
        .expect("Relay update");
    let api = md_api(&client, n);
    wait_for(
        "the domain's SPF record to follow the Relay",
        Duration::from_secs(30),
        || async {
            let md = api.get("relayed").await.ok()?;
            (spf(&md) == "v=spf1 mx include:relay-two.example -all").then_some(())
        },
    )
    .await;

    // So does a change of the Secret the Relay refers to.
    Api::<Secret>::namespaced(client.clone(), n)
        .delete("smarthost-auth", &DeleteParams::default())
        .await
        .expect("delete");
    let md = wait_condition(
        &client,
        n,
        "relayed",
        "RelayResolved",
        "False",
        Duration::from_secs(30),
        &op,
    )
    .await;
    assert_eq!(
        condition(&md, "RelayResolved").unwrap().reason,
        "RelayNotReady"
    );
    assert_eq!(condition(&md, "Ready").unwrap().status, "False");

    relays
        .delete("smarthost", &DeleteParams::default())
        .await
        .expect("delete Relay");
    wait_for("RelayNotFound", Duration::from_secs(30), || async {
        let md = api.get("relayed").await.ok()?;
        (condition(&md, "RelayResolved")?.reason == "RelayNotFound").then_some(())
    })
    .await;
    assert!(!op.logs().contains("s3cret"), "relay password in the logs");
}

#[tokio::test]
async fn cert_manager_certificate_and_external_dns_endpoint_when_their_crds_exist() {
    let client = client().await;
    install_crds(&client).await;
    install_foreign_crd(
        &client,
        "cert-manager.io",
        "v1",
        "Certificate",
        "certificates",
    )
    .await;
    install_foreign_crd(
        &client,
        "externaldns.k8s.io",
        "v1alpha1",
        "DNSEndpoint",
        "dnsendpoints",
    )
    .await;
    let ns = TestNamespace::create(&client, "cm").await;
    let n = ns.name.as_str();
    let op = Operator::start(&OperatorOptions::for_namespace(&ns, "cm-a"));
    apply_md(
        &client,
        n,
        "managed",
        json!({
            "domain": "managed.example", "replicas": 0, "service": { "type": "ClusterIP" },
            "tls": { "issuerRef": { "name": "letsencrypt", "kind": "ClusterIssuer" } },
        }),
    )
    .await;
    let certificates: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        n,
        &ApiResource {
            group: "cert-manager.io".into(),
            version: "v1".into(),
            api_version: "cert-manager.io/v1".into(),
            kind: "Certificate".into(),
            plural: "certificates".into(),
        },
    );
    let cert = wait_for("the cert-manager Certificate", CHILDREN_TIMEOUT, || async {
        certificates.get_opt("managed").await.ok().flatten()
    })
    .await;
    assert_eq!(cert.data["spec"]["secretName"], "managed-tls");
    assert_eq!(cert.data["spec"]["dnsNames"], json!(["mx.managed.example"]));
    assert_eq!(
        cert.data["spec"]["issuerRef"],
        json!({ "name": "letsencrypt", "kind": "ClusterIssuer", "group": "cert-manager.io" })
    );
    let md = wait_condition(
        &client,
        n,
        "managed",
        "CertificateReady",
        "False",
        CHILDREN_TIMEOUT,
        &op,
    )
    .await;
    assert_eq!(
        condition(&md, "Ready").unwrap().reason,
        "CertificateNotReady"
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), n);
    assert!(
        secrets.get_opt("managed-tls").await.unwrap().is_none(),
        "cert-manager writes the TLS Secret, not the operator"
    );

    // cert-manager reports the certificate ready: so does the domain.
    certificates
        .patch(
            "managed",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "conditions": [{ "type": "Ready", "status": "True", "reason": "Ready", "message": "issued" }], "notAfter": "2027-01-01T00:00:00Z" } })),
        )
        .await
        .expect("patch Certificate status");
    let md = wait_condition(
        &client,
        n,
        "managed",
        "Ready",
        "True",
        CHILDREN_TIMEOUT,
        &op,
    )
    .await;
    assert_eq!(
        md.status.unwrap().certificate.unwrap().source,
        "cert-manager"
    );

    let endpoints: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        n,
        &ApiResource {
            group: "externaldns.k8s.io".into(),
            version: "v1alpha1".into(),
            api_version: "externaldns.k8s.io/v1alpha1".into(),
            kind: "DNSEndpoint".into(),
            plural: "dnsendpoints".into(),
        },
    );
    let ep = wait_for("the DNSEndpoint", CHILDREN_TIMEOUT, || async {
        endpoints.get_opt("managed").await.ok().flatten()
    })
    .await;
    let eps = ep.data["spec"]["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        eps.iter()
            .any(|e| e["recordType"] == "MX" && e["dnsName"] == "managed.example"),
        "{eps:?}"
    );
    assert!(
        eps.iter().any(|e| e["dnsName"] == "_dmarc.managed.example"),
        "{eps:?}"
    );
}

/// Installs a minimal (schema-less) CRD standing in for a third-party one.
async fn install_foreign_crd(
    client: &Client,
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = format!("{plural}.{group}");
    if api.get_opt(&name).await.ok().flatten().is_some() {
        return;
    }
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        // *.k8s.io groups need this annotation; external-dns's own CRD carries the same one.
        "metadata": { "name": name, "annotations": { "api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/external-dns/pull/2007" } },
        "spec": {
            "group": group, "scope": "Namespaced",
            "names": { "kind": kind, "plural": plural, "singular": kind.to_lowercase() },
            "versions": [{ "name": version, "served": true, "storage": true,
                "schema": { "openAPIV3Schema": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } } }],
        },
    }))
    .unwrap();
    api.patch(
        &name,
        &PatchParams::apply(TEST_MANAGER),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap_or_else(|e| panic!("install the stand-in CRD {name}: {e}"));
    wait_for(&format!("CRD {name}"), Duration::from_secs(30), || async {
        api.get(&name)
            .await
            .ok()?
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(())
    })
    .await;
}

/// A loopback SMTP server that offers and accepts STARTTLS (then hangs up), for the probe.
async fn fake_smtp_server() -> u16 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                let _ = w.write_all(b"220 relay.test ESMTP\r\n").await;
                while let Ok(Some(line)) = lines.next_line().await {
                    let verb = line
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" => b"250-relay.test\r\n250-AUTH PLAIN\r\n250 STARTTLS\r\n",
                        "STARTTLS" => b"220 ready\r\n",
                        "QUIT" => b"221 bye\r\n",
                        _ => b"502 no\r\n",
                    };
                    let _ = w.write_all(reply).await;
                    if verb == "STARTTLS" || verb == "QUIT" {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn dkim_rotation_publishes_first_then_signs_then_retires_the_old_key() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "rotate").await;
    let n = ns.name.as_str();
    let op = Operator::start(&OperatorOptions::for_namespace(&ns, "rotate-a"));
    // Compressed time: a key signs for 20 s, its successor is published 6 s ahead, and a
    // replaced key stays published 6 s after it stopped signing.
    apply_md(
        &client,
        n,
        "rot",
        json!({
            "domain": "rot.example", "replicas": 0, "service": { "type": "ClusterIP" },
            "dkim": { "algorithms": ["rsa-sha256"], "rotateEvery": "20s", "publishAhead": "6s", "retainAfter": "6s" },
        }),
    )
    .await;
    let api = md_api(&client, n);
    let state = || async {
        let md = api.get("rot").await.ok()?;
        let s = md.status?;
        Some((s.selectors, s.signing_selectors))
    };
    let first = wait_for("the first key", Duration::from_secs(60), || async {
        state().await.filter(|(p, _)| !p.is_empty())
    })
    .await;
    assert_eq!(
        first,
        (vec!["kubemail1".to_owned()], vec!["kubemail1".to_owned()])
    );

    let published = wait_for(
        "the next key published before it signs",
        Duration::from_secs(60),
        || async { state().await.filter(|(p, _)| p.len() == 2) },
    )
    .await;
    assert_eq!(published.0, ["kubemail1", "kubemail1-g2"]);
    assert_eq!(
        published.1,
        ["kubemail1"],
        "the old key signs until the overlap ends"
    );

    let switched = wait_for("the new key to sign", Duration::from_secs(30), || async {
        state()
            .await
            .filter(|(_, s)| s == &["kubemail1-g2".to_owned()])
    })
    .await;
    assert_eq!(
        switched.0,
        ["kubemail1", "kubemail1-g2"],
        "the old key stays published after the switch"
    );

    let retired = wait_for("the old key to retire", Duration::from_secs(30), || async {
        state()
            .await
            .filter(|(p, _)| p == &["kubemail1-g2".to_owned()])
    })
    .await;
    assert_eq!(retired.1, ["kubemail1-g2"]);
    let dkim: Secret = get(&client, n, "rot-dkim").await;
    let keys: Vec<String> = secret_data(&dkim).into_keys().collect();
    assert!(
        !keys.contains(&"kubemail1.pem".to_owned()),
        "the retired key leaves the Secret: {keys:?}"
    );
    drop(op);
}

#[tokio::test]
async fn an_invalid_reference_is_reported_and_recovers_once_fixed() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "fix").await;
    let n = ns.name.as_str();
    let op = Operator::start(&OperatorOptions::for_namespace(&ns, "fix-a"));
    apply_md(
        &client,
        n,
        "fixme",
        json!({
            "domain": "fixme.example", "replicas": 0, "service": { "type": "ClusterIP" },
            "submission": { "usersSecretRef": { "name": "fixme-users" } },
        }),
    )
    .await;
    let md = wait_condition(
        &client,
        n,
        "fixme",
        "Ready",
        "False",
        Duration::from_secs(60),
        &op,
    )
    .await;
    let ready = condition(&md, "Ready").unwrap();
    assert_eq!(ready.reason, "UsersSecretNotFound");
    assert!(ready.message.contains("fixme-users"), "{}", ready.message);

    // Creating the Secret is noticed (watch), the users file is rendered, the domain is Ready.
    secret(&client, n, "fixme-users", &[("carol", "first-password")]).await;
    wait_condition(
        &client,
        n,
        "fixme",
        "Ready",
        "True",
        Duration::from_secs(60),
        &op,
    )
    .await;
    let hashed: Secret = get(&client, n, "fixme-users-hashed").await;
    let first = text(&hashed, "users");
    let username_key = text(&hashed, "username-key");
    assert_eq!(username_key.len(), 64, "a 32-byte hex user-name key");
    let carol = first
        .lines()
        .find(|l| l.starts_with("carol@fixme.example:$argon2id$"))
        .unwrap()
        .to_owned();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), n);
    let checksum = |d: Deployment| {
        d.spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()["kubemail.io/config-checksum"]
            .clone()
    };
    let before = checksum(deployments.get("fixme").await.unwrap());

    // An edit of the Secret re-renders the file; unchanged passwords keep their hash.
    secret(
        &client,
        n,
        "fixme-users",
        &[("carol", "first-password"), ("dave", "second-password")],
    )
    .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), n);
    let second = wait_for(
        "dave in the rendered users file",
        Duration::from_secs(30),
        || async {
            let s = secrets.get("fixme-users-hashed").await.ok()?;
            let t = text(&s, "users");
            t.contains("dave@fixme.example:$argon2id$").then_some(t)
        },
    )
    .await;
    assert!(
        second.contains(&carol),
        "carol's hash must not change:\n{first}\n{second}"
    );
    let rerendered = secrets.get("fixme-users-hashed").await.unwrap();
    assert_eq!(
        text(&rerendered, "username-key"),
        username_key,
        "the user-name key (and with it the shared AUTH failure counts) survives a re-render"
    );
    let after = wait_for(
        "the pods' config checksum to follow",
        Duration::from_secs(30),
        || async {
            let c = checksum(deployments.get("fixme").await.ok()?);
            (c != before).then_some(c)
        },
    )
    .await;
    assert_ne!(before, after);
    assert!(
        !op.logs().contains("first-password"),
        "a password leaked into the logs"
    );
}
