//! The per-user limit on failed logins against real nats-server and
//! `smtp-node` processes: two nodes that share a NATS server (replicas of one MailDomain)
//! share the count, and a node whose NATS is gone still lets the right password in while it
//! limits the failures it saw itself.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// One login attempt per password over implicit TLS; the AUTH reply of each, as
/// `"<code> <message>"`.
fn attempts(node: &Node, user: &str, passwords: &[&str]) -> Vec<String> {
    let mut steps = vec![json!(["ehlo", "client.test"])];
    steps.extend(passwords.iter().map(|p| json!(["auth", "PLAIN", user, p])));
    steps.push(json!(["quit"]));
    let replies = smtplib(node.ports.implicit_tls, "ssl", json!(steps));
    replies[1..replies.len() - 1]
        .iter()
        .map(|s| format!("{} {}", s.code, s.msg))
        .collect()
}

/// Waits until the node's failure stream exists, so that the first failures are counted in
/// NATS and not only by the node that saw them.
async fn wait_for_failure_stream(url: &str, stream: &str) {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + Duration::from_secs(20);
    while js.get_stream(stream).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "stream {stream} not created within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Subjects and message counts of `stream`.
async fn subjects(url: &str, stream: &str) -> Vec<(String, usize)> {
    use futures::TryStreamExt as _;
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(stream).await.expect("stream");
    stream
        .info_with_subjects(">")
        .await
        .expect("stream info")
        .try_collect()
        .await
        .expect("subjects")
}

#[tokio::test]
async fn two_nodes_share_the_failure_count_of_a_user() {
    let nats = Nats::start();
    // Two replicas: same stream and subjects (as the operator renders them for one
    // MailDomain), so the same failure stream.
    let id = std::process::id();
    let (stream, prefix) = (format!("AL{id}"), format!("al{id}.queue"));
    let replica = |c: &mut serde_json::Value| {
        c["nats"]["stream"] = json!(stream);
        c["nats"]["subjectPrefix"] = json!(prefix);
        c["auth"] = json!({
            "maxFailuresPerSession": 10,
            "failuresPerIpPerMinute": 100,
            "failuresPerUser": 4,
            "failuresPerUserWindow": "1h",
            // Exact counts need every look-up answered, however loaded the machine is.
            "sharedCounterTimeout": "10s",
        });
    };
    let a = Node::start_with(&nats.url(), true, replica);
    let b = Node::start_with(&nats.url(), true, replica);
    let failure_stream = format!("{stream}_AUTH_FAILURES");
    wait_for_failure_stream(&nats.url(), &failure_stream).await;

    // Four wrong passwords, two on each node: neither node reaches the limit on its own.
    assert_eq!(
        attempts(&a, USER, &["guess-a1", "guess-a2"]),
        ["535 5.7.8 Authentication credentials invalid"; 2]
    );
    assert_eq!(
        attempts(&b, USER, &["guess-b1", "guess-b2"]),
        ["535 5.7.8 Authentication credentials invalid"; 2]
    );
    // Together they did: the right password is refused on both, without being checked.
    for node in [&a, &b] {
        let replies = attempts(node, USER, &[PASSWORD]);
        assert!(
            replies[0].starts_with("454 4.7.0"),
            "the user's lockout must hold on every node: {replies:?}"
        );
    }
    // Only that user: another name still gets an answer about its credentials.
    let replies = attempts(&b, "nobody@example.test", &["whatever"]);
    assert!(replies[0].starts_with("535 5.7.8"), "{replies:?}");

    // The stream holds one subject per user name that exists, named by a keyed hash, not
    // the name; a made-up name is never written (a flood of them could not grow it).
    let held = subjects(&nats.url(), &failure_stream).await;
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(held.iter().any(|(_, n)| *n == 4), "{held:?}");
    for (subject, _) in &held {
        assert!(
            subject.starts_with(&format!("{prefix}-auth-failures.")),
            "{subject}"
        );
        assert!(
            !subject.contains("alice") && !subject.contains("nobody"),
            "{subject}"
        );
    }
    for node in [&a, &b] {
        let log = node.log();
        for secret in ["guess-a1", "guess-b2", PASSWORD, "nobody@example.test"] {
            assert!(!log.contains(secret), "node log contains {secret:?}");
        }
    }
}

#[tokio::test]
async fn without_nats_the_right_password_works_and_each_node_still_limits() {
    let mut nats = Nats::start();
    let node = Node::start_with(&nats.url(), true, |c| {
        c["auth"] = json!({
            "maxFailuresPerSession": 10,
            "failuresPerIpPerMinute": 100,
            "failuresPerUser": 3,
            "failuresPerUserWindow": "1h",
        });
    });
    wait_for_failure_stream(&nats.url(), &format!("{}_AUTH_FAILURES", node.stream)).await;
    nats.stop();

    // Fail open: the shared counter is unreachable, and the login is not refused for that.
    let replies = attempts(&node, USER, &[PASSWORD]);
    assert!(replies[0].starts_with("235"), "{replies:?}");
    // The node's own count still stops guessing.
    let replies = attempts(&node, USER, &["bad1", "bad2", "bad3", PASSWORD]);
    assert_eq!(
        replies[..3],
        ["535 5.7.8 Authentication credentials invalid"; 3]
    );
    assert!(replies[3].starts_with("454 4.7.0"), "{replies:?}");
    // The lost counter shows in the metrics, not only in the log.
    let metrics = common::http_get(node.ports.admin, "/metrics");
    let errors = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kubemail_smtp_auth_shared_counter_errors_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(
        errors.is_some_and(|n| n >= 1.0),
        "kubemail_smtp_auth_shared_counter_errors_total: {errors:?}"
    );
}
