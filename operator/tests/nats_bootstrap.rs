//! The bundled NATS's bootstrap against the real local control plane: the operator (leader)
//! makes the trust chain and the server certificate in Secrets once, keeps them across
//! restarts, and a real nats-server started from exactly those Secrets (as the chart's
//! StatefulSet mounts them) serves TLS with that certificate and accepts the users the operator
//! mints, with JetStream enabled for the account.
//!
//! Needs `e2e/local-cluster up` and its env (`. .kubemail-local/env`).

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Operator, OperatorOptions, TestNamespace, client, install_crds, wait_for};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kubemail_operator::nats::jetstream::client_tls;
use kubemail_operator::nats::{credentials, trust::AccountKeys};
use kubemail_test_support::nats::NatsCluster;

fn data(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    secret
        .data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect()
}

#[tokio::test]
async fn bundled_nats_bootstrap_gives_a_trust_chain_and_certificate_nats_accepts() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "natsboot").await;
    let n = ns.name.as_str();
    let mut opts = OperatorOptions::for_namespace(&ns, "natsboot-a");
    opts.extra_args = [
        "--nats-bootstrap",
        "--nats-account-secret",
        "kubemail-nats-account",
        "--nats-tls-secret",
        "kubemail-nats-tls",
        "--nats-server-names",
        "localhost,127.0.0.1",
    ]
    .map(str::to_owned)
    .to_vec();
    let first = Operator::start(&opts);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), n);
    let read = |name: &'static str| {
        let secrets = secrets.clone();
        async move { secrets.get_opt(name).await.ok().flatten() }
    };
    let account = wait_for("the trust chain Secret", Duration::from_secs(60), || {
        read("kubemail-nats-account")
    })
    .await;
    let tls = wait_for(
        "the NATS certificate Secret",
        Duration::from_secs(60),
        || read("kubemail-nats-tls"),
    )
    .await;
    drop(first);

    // A restarted operator keeps both as they are.
    let second = Operator::start(&OperatorOptions {
        identity: "natsboot-b".to_owned(),
        ..opts.clone()
    });
    wait_for(
        "the new operator to lead",
        Duration::from_secs(30),
        || async { second.is_leader().then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        data(&read("kubemail-nats-account").await.unwrap()),
        data(&account)
    );
    assert_eq!(data(&read("kubemail-nats-tls").await.unwrap()), data(&tls));

    // A nats-server configured from exactly these Secrets.
    let account = data(&account);
    let tls = data(&tls);
    let dir = tempfile::tempdir().unwrap();
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        std::fs::write(dir.path().join(key), &tls[key]).unwrap();
    }
    let resolver = String::from_utf8(account["resolver.conf"].clone()).unwrap();
    let tls_block = format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  timeout: 2\n}}\n",
        dir.path().join("tls.crt"),
        dir.path().join("tls.key")
    );
    let nats = NatsCluster::start(1, &format!("{resolver}\n{tls_block}"), "");
    let url = nats.urls("tls");
    let ca = String::from_utf8(tls["ca.crt"].clone()).unwrap();

    let keys = AccountKeys::from_secret_data(&account).unwrap();
    let user = credentials::node_credentials(
        &keys,
        &kubemail_queue::QueueNames::default(),
        &["boot.example"],
        kubemail_operator::timestamps::now(),
        3600,
    )
    .unwrap();
    let node = async_nats::ConnectOptions::with_credentials(&user.creds)
        .unwrap()
        .custom_inbox_prefix(kubemail_queue::inbox_prefix(&["boot.example"]))
        .tls_client_config(client_tls(&ca).unwrap())
        .require_tls(true)
        .connect(url.clone())
        .await
        .expect("a minted user connects, verifying the server certificate with the CA");
    node.flush().await.unwrap();
    // The operator's own access: JetStream is enabled for the account.
    let access = kubemail_operator::nats::NatsAccess {
        url,
        ca_pem: Some(ca),
        account: Some(keys),
        timeout: Duration::from_secs(10),
    };
    access
        .ensure(
            &kubemail_config::NatsConfig::default(),
            &kubemail_config::AuthConfig::default(),
            &kubemail_config::ConsumerConfig::default(),
            &["boot.example".to_owned()],
        )
        .await
        .expect("the operator creates the JetStream objects in the bootstrapped account");
}
