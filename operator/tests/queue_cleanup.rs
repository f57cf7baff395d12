//! The finalizer's JetStream clean-up against a real nats-server (loopback, its own store,
//! no cluster): it deletes the domain's consumer and, for a domain last served by an earlier
//! node version, its consumer of the legacy name, but never a legacy-named consumer that
//! belongs to another domain.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use kubemail_operator::nats::NatsAccess;
use kubemail_operator::queue::{consumer_name, delete_consumer};
use kubemail_test_support::ports::free_port;
use kubemail_test_support::wait::wait_for_port;

const STREAM: &str = "KUBEMAIL_CLEANUP";
const PREFIX: &str = "t.queue";
const TIMEOUT: Duration = Duration::from_secs(10);

/// A nats-server with JetStream, killed on drop.
struct NatsServer {
    child: Child,
    port: u16,
    _store: tempfile::TempDir,
}

impl NatsServer {
    fn start() -> Self {
        let binary = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|dir| dir.join("nats-server"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("nats-server is not on PATH (e2e/tools/setup.sh builds it)"));
        let store = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut child = Command::new(binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        wait_for_port(
            ([127, 0, 0, 1], port).into(),
            "nats-server",
            &mut child,
            Duration::from_secs(20),
        );
        Self {
            child,
            port,
            _store: store,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The node's queue stream: work-queue retention, so consumers may not overlap.
async fn queue_stream(url: &str) -> stream::Stream {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.expect("connect"));
    js.create_stream(stream::Config {
        name: STREAM.to_owned(),
        subjects: vec![format!("{PREFIX}.>")],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        ..Default::default()
    })
    .await
    .expect("create stream")
}

async fn add_consumer(stream: &stream::Stream, name: &str, filter: &str) {
    stream
        .create_consumer(pull::Config {
            durable_name: Some(name.to_owned()),
            filter_subject: filter.to_owned(),
            ack_policy: AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("create consumer");
}

async fn exists(stream: &stream::Stream, name: &str) -> bool {
    stream.consumer_info(name).await.is_ok()
}

#[tokio::test]
async fn the_finalizer_deletes_both_names_of_its_domain_and_nothing_else() {
    let nats = NatsServer::start();
    let url = nats.url();
    assert!(
        !delete_consumer(
            &NatsAccess::plain(&url, TIMEOUT),
            STREAM,
            "example.com",
            TIMEOUT
        )
        .await
        .unwrap(),
        "no stream: nothing to delete"
    );
    let stream = queue_stream(&url).await;
    // mail.corp.com was last served by an earlier version: its consumer has the legacy name.
    add_consumer(&stream, "kubemail-mail-corp-com", "t.queue.mail.corp.com").await;
    let example = consumer_name("example.com");
    add_consumer(&stream, &example, "t.queue.example.com").await;

    assert!(
        delete_consumer(
            &NatsAccess::plain(&url, TIMEOUT),
            STREAM,
            "mail.corp.com",
            TIMEOUT
        )
        .await
        .unwrap()
    );
    assert!(!exists(&stream, "kubemail-mail-corp-com").await);
    assert!(exists(&stream, &example).await, "other domains keep theirs");
    assert!(
        !delete_consumer(
            &NatsAccess::plain(&url, TIMEOUT),
            STREAM,
            "mail.corp.com",
            TIMEOUT
        )
        .await
        .unwrap(),
        "a second run finds nothing"
    );
    assert!(
        delete_consumer(
            &NatsAccess::plain(&url, TIMEOUT),
            STREAM,
            "example.com",
            TIMEOUT
        )
        .await
        .unwrap()
    );
    assert!(!exists(&stream, &example).await);

    // mail-corp.com's consumer of the legacy name: the name mail.corp.com's had, but another
    // domain's filter. Deleting mail.corp.com must leave it.
    add_consumer(&stream, "kubemail-mail-corp-com", "t.queue.mail-corp.com").await;
    assert!(
        !delete_consumer(
            &NatsAccess::plain(&url, TIMEOUT),
            STREAM,
            "mail.corp.com",
            TIMEOUT
        )
        .await
        .unwrap()
    );
    assert!(
        exists(&stream, "kubemail-mail-corp-com").await,
        "another domain's consumer survives"
    );
    assert!(
        delete_consumer(
            &NatsAccess::plain(&url, TIMEOUT),
            STREAM,
            "mail-corp.com",
            TIMEOUT
        )
        .await
        .unwrap()
    );
    assert!(!exists(&stream, "kubemail-mail-corp-com").await);

    // The longest valid domain: its legacy name is longer than the server's limit for names.
    let label = "a".repeat(63);
    let longest = format!("{label}.{label}.{label}.{}", "b".repeat(61));
    let hashed = consumer_name(&longest);
    add_consumer(&stream, &hashed, &format!("t.queue.{longest}")).await;
    assert!(
        delete_consumer(&NatsAccess::plain(&url, TIMEOUT), STREAM, &longest, TIMEOUT)
            .await
            .unwrap()
    );
    assert!(!exists(&stream, &hashed).await);
}
