//! The `DnsPublished` condition and the first-contact errors against the real local control
//! plane: the operator binary checks a MailDomain's records through Knot DNS on loopback, and
//! an operator whose own namespace does not exist says so, once, with the fix.
//!
//! Needs `e2e/local-cluster up` and its env (`. .kubemail-local/env`), and `/usr/sbin/knotd`.

// Tests may unwrap: a panic is a test failure with its message.
#![allow(clippy::unwrap_used)]

mod common;
mod knot;

use std::time::Duration;

use common::maildomain::{apply_md, condition, wait_condition, wait_condition_by};
use common::{Operator, OperatorOptions, TestNamespace, client, install_crds, wait_for};
use knot::Knot;
use kubemail_operator::dns_records;
use serde_json::json;

const READY_TIMEOUT: Duration = Duration::from_secs(180);
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);
const DOMAIN: &str = "dnscheck.test";

#[tokio::test]
async fn dns_published_follows_what_dns_answers_and_leaves_ready_alone() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "dnscheck").await;
    let n = ns.name.as_str();
    // At first only an MX, and a wrong one.
    let mut knot = Knot::start(DOMAIN, "@ IN MX 10 old-mx.dnscheck.test.");
    let mut opts = OperatorOptions::for_namespace(&ns, "dnscheck");
    opts.extra_args = vec![
        "--dns-check-interval".into(),
        "3s".into(),
        "--dns-check-nameservers".into(),
        knot.addr().to_string(),
    ];
    let op = Operator::start(&opts);
    apply_md(
        &client,
        n,
        "shop",
        json!({ "domain": DOMAIN, "replicas": 0, "service": { "type": "ClusterIP" } }),
    )
    .await;
    wait_condition(&client, n, "shop", "Ready", "True", READY_TIMEOUT, &op).await;

    let md = wait_condition_by(
        &client,
        n,
        "shop",
        "DnsPublished",
        |c| c.status == "False" && c.reason == "Drifted",
        CHECK_TIMEOUT,
        &op,
    )
    .await;
    let message = &condition(&md, "DnsPublished").unwrap().message;
    for needle in [
        "dnscheck.test. MX is \"10 old-mx.dnscheck.test.\", expected \"10 mx.dnscheck.test.\"",
        "_dmarc.dnscheck.test. TXT is missing",
        &format!("looked up through {}", knot.addr()),
    ] {
        assert!(message.contains(needle), "{needle:?} in {message}");
    }
    assert_eq!(
        condition(&md, "Ready").unwrap().status,
        "True",
        "DNS does not hold back Ready"
    );
    let records = md.status.as_ref().unwrap().dns_records.clone();
    let gauge = format!(
        "kubemail_operator_maildomain_dns_records_not_as_expected{{maildomain_namespace=\"{n}\",maildomain=\"shop\"}} {}",
        records.len()
    );
    assert!(
        op.metrics().contains(&gauge),
        "{gauge} in\n{}",
        op.metrics()
    );

    // Publish exactly the operator's zone fragment: the next check finds everything.
    let fragment = dns_records::zone_fragment(DOMAIN, "shop", &records);
    let lines: Vec<&str> = fragment
        .lines()
        .filter(|l| !l.starts_with(';') && !l.starts_with('$'))
        .collect();
    knot.replace(&lines.join("\n"));
    let md = wait_condition_by(
        &client,
        n,
        "shop",
        "DnsPublished",
        |c| c.status == "True",
        CHECK_TIMEOUT,
        &op,
    )
    .await;
    let published = condition(&md, "DnsPublished").unwrap();
    assert_eq!(published.reason, "Published");
    assert_eq!(
        published.message,
        format!(
            "all {} records are published as computed (looked up through {})",
            records.len(),
            knot.addr()
        )
    );
    // The reconcile's status writes keep the check's condition.
    apply_md(
        &client,
        n,
        "shop",
        json!({ "domain": DOMAIN, "replicas": 0, "service": { "type": "ClusterIP" }, "dmarc": { "policy": "reject" } }),
    )
    .await;
    let md = wait_condition_by(
        &client,
        n,
        "shop",
        "DnsPublished",
        |c| c.status == "False" && c.message.contains("_dmarc.dnscheck.test. TXT is"),
        CHECK_TIMEOUT,
        &op,
    )
    .await;
    assert_eq!(condition(&md, "DnsPublished").unwrap().reason, "Drifted");
    wait_for("the gauge to follow", CHECK_TIMEOUT, || async {
        op.metrics()
            .contains(&format!(
                "kubemail_operator_maildomain_dns_records_not_as_expected{{maildomain_namespace=\"{n}\",maildomain=\"shop\"}} 1"
            ))
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_operator_without_its_namespace_says_how_to_fix_it_once() {
    let client = client().await;
    install_crds(&client).await;
    let ns = TestNamespace::create(&client, "nolease").await;
    let missing = format!("{}-missing", ns.name);
    let mut opts = OperatorOptions::for_namespace(&ns, "nolease");
    opts.namespace = missing.clone();
    let op = Operator::start(&opts);
    let fix = format!(
        "namespace {missing} does not exist: create it (kubectl create namespace {missing}), or set --namespace / POD_NAMESPACE"
    );
    wait_for(
        "the lease failure to be explained",
        Duration::from_secs(30),
        || async { op.logs().contains(&fix).then_some(()) },
    )
    .await;
    // The harness retries the Lease every second; the same failure is logged once.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let logs = op.logs();
    assert_eq!(
        logs.matches("lease update failed").count(),
        1,
        "logged once, not every retry:\n{logs}"
    );
    assert!(!op.is_leader());
}
