//! NATS authentication and TLS against a real nats-server in operator mode (loopback, its own
//! store): the trust chain the operator makes is accepted, the JetStream objects it manages
//! appear, and a domain's node credentials may do exactly what the queue contract needs for
//! that domain: publish its entries, use its consumer, its body bucket and its AUTH-failure
//! subjects, read its own replies. Everything else fails with a permission violation and
//! delivers nothing: another domain's subject, consumer, bucket, failure subjects or replies,
//! creating, deleting or purging streams, deleting consumers. Clients without credentials,
//! with expired credentials or without TLS are refused.

// Test helpers panic on purpose: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt as _;
use kubemail_config::{AuthConfig, ConsumerConfig, NatsConfig};
use kubemail_operator::certs;
use kubemail_operator::nats::jetstream::client_tls;
use kubemail_operator::nats::{NatsAccess, Trust, credentials, trust::AccountKeys};
use kubemail_queue::{QueueNames, body_bucket, consumer_name, inbox_prefix, subject};
use kubemail_test_support::nats::NatsCluster;

const A: &str = "a.example";
const B: &str = "b.example";
/// How long a denied request is given before it counts as unanswered.
const DENIED_WAIT: Duration = Duration::from_secs(2);

/// A nats-server in operator mode with TLS from a CA of its own, and what clients need.
struct SecureNats {
    cluster: NatsCluster,
    ca_pem: String,
    keys: AccountKeys,
}

impl SecureNats {
    fn start(servers: usize, jetstream_extra: &str) -> Self {
        let now = kubemail_operator::timestamps::now();
        let trust = Trust::generate();
        let keys = trust.account_keys().unwrap();
        let ca = certs::new_ca(now).unwrap();
        let leaf = certs::issue_server_certificate(
            &ca,
            &["127.0.0.1".to_owned(), "localhost".to_owned()],
            now,
            Duration::from_secs(3600),
            true,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap().keep();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&cert, &leaf.cert_pem).unwrap();
        std::fs::write(&key, leaf.key_pem.expose()).unwrap();
        let tls = format!("tls {{\n  cert_file: {cert:?}\n  key_file: {key:?}\n  timeout: 2\n}}\n");
        let cluster = NatsCluster::start(
            servers,
            &format!("{}\n{tls}", trust.resolver_config(now).unwrap()),
            jetstream_extra,
        );
        Self {
            cluster,
            ca_pem: ca.cert_pem,
            keys,
        }
    }

    fn url(&self) -> String {
        self.cluster.urls("tls")
    }

    /// The operator's access: every JetStream API, TLS verified against the CA.
    fn operator(&self) -> NatsAccess {
        NatsAccess {
            url: self.url(),
            ca_pem: Some(self.ca_pem.clone()),
            account: Some(self.keys.clone()),
            timeout: Duration::from_secs(10),
        }
    }

    /// Connects with `creds` (a credentials file's text) and the inbox prefix of `domains`;
    /// server errors (permission violations) are collected in the returned list.
    async fn node(
        &self,
        creds: &str,
        domains: &[&str],
    ) -> Result<(async_nats::Client, Arc<Mutex<Vec<String>>>), async_nats::ConnectError> {
        self.node_with_inbox(creds, &inbox_prefix(domains)).await
    }

    /// JetStream as `domain`'s nodes use it (their credentials, a denied request given
    /// [`DENIED_WAIT`]), and the connection's server errors.
    async fn node_js(&self, domain: &str) -> (jetstream::Context, Arc<Mutex<Vec<String>>>) {
        let (client, errors) = self
            .node(&node_creds(&self.keys, &[domain], 3600), &[domain])
            .await
            .unwrap();
        let mut js = jetstream::new(client);
        js.set_timeout(DENIED_WAIT);
        (js, errors)
    }

    /// Like [`SecureNats::node`], with the reply inbox `inbox`.
    async fn node_with_inbox(
        &self,
        creds: &str,
        inbox: &str,
    ) -> Result<(async_nats::Client, Arc<Mutex<Vec<String>>>), async_nats::ConnectError> {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let seen = errors.clone();
        let client = async_nats::ConnectOptions::with_credentials(creds)
            .unwrap()
            .custom_inbox_prefix(inbox)
            .tls_client_config(client_tls(&self.ca_pem).unwrap())
            .require_tls(true)
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                let seen = seen.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        seen.lock().unwrap().push(e.to_string());
                    }
                }
            })
            .connect(self.url().split(',').map(str::to_owned).collect::<Vec<_>>())
            .await?;
        Ok((client, errors))
    }
}

fn node_creds(keys: &AccountKeys, domains: &[&str], validity: i64) -> String {
    credentials::node_credentials(
        keys,
        &QueueNames::default(),
        domains,
        kubemail_operator::timestamps::now(),
        validity,
    )
    .unwrap()
    .creds
}

/// Waits until a permission violation naming `what` was reported on the connection.
async fn violation(errors: &Arc<Mutex<Vec<String>>>, what: &str) {
    for _ in 0..40 {
        if errors
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.contains("Permissions Violation") && e.contains(what))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "no permission violation for {what}; got {:?}",
        errors.lock().unwrap()
    );
}

/// Messages stored on each subject of `stream`, as the operator sees them.
async fn subject_counts(admin: &jetstream::Context, stream: &str) -> HashMap<String, usize> {
    let s = admin.get_stream(stream).await.unwrap();
    let mut subjects = s.info_with_subjects(">").await.unwrap();
    let mut out = HashMap::new();
    while let Some(Ok((subject, n))) = subjects.next().await {
        out.insert(subject, n);
    }
    out
}

#[tokio::test]
async fn a_domains_credentials_reach_its_own_queue_objects_and_nothing_else() {
    let nats = SecureNats::start(1, "");
    let config = NatsConfig::default();
    nats.operator()
        .ensure(
            &config,
            &AuthConfig::default(),
            &ConsumerConfig::default(),
            &[A.to_owned(), B.to_owned()],
        )
        .await
        .expect("the operator creates the stream, consumers and buckets");
    let admin = jetstream::new(nats.operator().connect().await.unwrap());

    let (client, errors) = nats
        .node(&node_creds(&nats.keys, &[A], 3600), &[A])
        .await
        .expect("a domain's credentials connect");
    let mut js = jetstream::new(client.clone());
    js.set_timeout(DENIED_WAIT);

    // Allowed: publish an entry and get the JetStream acknowledgement on our inbox.
    let ack = js
        .publish(subject(&config.subject_prefix, A), "entry of a".into())
        .await
        .unwrap()
        .await
        .expect("publishing to the domain's own subject is acknowledged");
    assert_eq!(ack.stream, "KUBEMAIL");
    // Allowed: the domain's consumer: info, next, ack.
    let consumer: PullConsumer = js
        .get_consumer_from_stream(consumer_name(A), "KUBEMAIL")
        .await
        .expect("the domain's consumer info");
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let message = batch.next().await.expect("one entry").unwrap();
    assert_eq!(&message.payload[..], b"entry of a");
    message.double_ack().await.expect("acks are allowed");
    // Allowed: the domain's body bucket, with a body of several chunks.
    let bucket = js
        .get_object_store(body_bucket(&config.body_bucket, A))
        .await
        .expect("the domain's bucket");
    let body = vec![b'x'; 300 * 1024];
    bucket
        .put("q1.a.example", &mut &body[..])
        .await
        .expect("store a body");
    let mut read = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(
        &mut bucket.get("q1.a.example").await.expect("read it back"),
        &mut read,
    )
    .await
    .unwrap();
    assert_eq!(read, body);
    bucket.delete("q1.a.example").await.expect("delete it");
    // Allowed: the domain's AUTH-failure subjects, and their count.
    let failure = format!(
        "{}.0123456789abcdef0123456789abcdef",
        kubemail_queue::auth_failure_subject_prefix(&config.subject_prefix, A)
    );
    js.publish(failure.clone(), "".into())
        .await
        .unwrap()
        .await
        .expect("recording a failure of the domain's own user");
    let reply: serde_json::Value = js
        .request(
            "STREAM.INFO.KUBEMAIL_AUTH_FAILURES".to_owned(),
            &serde_json::json!({ "subjects_filter": failure }),
        )
        .await
        .expect("the failure count");
    assert_eq!(reply["state"]["subjects"][&failure], 1);
    // Allowed: the delivery side's TLS policy objects, as the node uses them.
    let cache = js
        .get_key_value(kubemail_queue::MTA_STS_CACHE_BUCKET)
        .await
        .expect("the shared MTA-STS cache");
    cache
        .put("remote.example", "{}".into())
        .await
        .expect("cache a policy");
    assert!(cache.get("remote.example").await.unwrap().is_some());
    let token = kubemail_queue::domain_token(A);
    js.publish(
        format!("kubemail.tlsrpt.{token}.2026-12-06.remote_example"),
        "{}".into(),
    )
    .await
    .unwrap()
    .await
    .expect("record a TLS-RPT result of the domain");
    let results = js
        .get_stream(kubemail_queue::TLSRPT_STREAM)
        .await
        .expect("the TLS-RPT stream");
    let mut ordered = results
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: kubemail_queue::tlsrpt_day_filter(A, "2026-12-06"),
            ..Default::default()
        })
        .await
        .expect("an ordered consumer on the domain's results");
    assert_eq!(ordered.info().await.unwrap().num_pending, 1);
    let mut read = ordered.messages().await.unwrap();
    assert!(
        read.next().await.unwrap().is_ok(),
        "read the domain's result"
    );
    let claims = js
        .get_key_value(kubemail_queue::TLSRPT_CLAIMS_BUCKET)
        .await
        .expect("the claims bucket");
    claims
        .create(
            &kubemail_queue::tlsrpt_claim_key(A, "2026-12-06"),
            "claimed".into(),
        )
        .await
        .expect("claim the domain's report");
    // Allowed: the domain's delivery events and suppression entries, as the node uses them.
    js.publish(
        kubemail_queue::events::event_subject(A, kubemail_queue::events::EventType::Delivered),
        "{}".into(),
    )
    .await
    .unwrap()
    .await
    .expect("publish an event of the domain");
    let suppression = kubemail_queue::suppression::SuppressionList::open(&js)
        .await
        .expect("open the suppression bucket the operator made");
    let entry = kubemail_queue::suppression::SuppressionEntry::new(
        A,
        "gone@remote.example",
        kubemail_queue::suppression::SuppressionReason::Bounce,
        std::time::SystemTime::now(),
        None,
    );
    suppression
        .put(&entry)
        .await
        .expect("suppress for the domain");
    let read = suppression
        .get(A, "gone@remote.example", std::time::SystemTime::now())
        .await
        .expect("read the domain's entry");
    assert_eq!(
        read.as_ref().map(|e| e.address.as_str()),
        Some("gone@remote.example")
    );
    assert_eq!(
        suppression.count(A).await.expect("count the domain's keys"),
        1
    );
    assert!(
        errors.lock().unwrap().is_empty(),
        "nothing allowed was refused: {:?}",
        errors.lock().unwrap()
    );
    // Denied: another domain's TLS-RPT results and claims.
    let other_result = format!(
        "kubemail.tlsrpt.{}.2026-12-06.remote_example",
        kubemail_queue::domain_token(B)
    );
    let _ = js.publish(other_result.clone(), "{}".into()).await;
    violation(&errors, &other_result).await;
    assert!(
        claims
            .create(
                &kubemail_queue::tlsrpt_claim_key(B, "2026-12-06"),
                "claimed".into()
            )
            .await
            .is_err(),
        "claiming another domain's report"
    );

    // Denied: another domain's events and suppression entries (write and read).
    let other_event =
        kubemail_queue::events::event_subject(B, kubemail_queue::events::EventType::Bounced);
    let _ = js.publish(other_event.clone(), "{}".into()).await;
    violation(&errors, &other_event).await;
    let mut forged = entry.clone();
    forged.domain = B.to_owned();
    assert!(
        suppression.put(&forged).await.is_err(),
        "writing another domain's list"
    );
    violation(
        &errors,
        &format!("KUBEMAIL_SUPPRESSION.{}", kubemail_queue::domain_token(B)),
    )
    .await;
    assert!(
        suppression
            .get(B, "gone@remote.example", std::time::SystemTime::now())
            .await
            .is_err(),
        "reading another domain's list"
    );

    // Denied: the other domain's subject; nothing is stored there.
    let published = js
        .publish(subject(&config.subject_prefix, B), "forged".into())
        .await;
    assert!(match published {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    });
    violation(&errors, "kubemail.queue.b.example").await;
    assert_eq!(
        subject_counts(&admin, "KUBEMAIL")
            .await
            .get("kubemail.queue.b.example"),
        None,
        "nothing reached the other domain's queue"
    );
    // Denied: the other domain's consumer (info, next, delete) and bucket.
    assert!(
        js.get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            consumer_name(B),
            "KUBEMAIL"
        )
        .await
        .is_err()
    );
    violation(&errors, "CONSUMER.INFO.KUBEMAIL.kubemail-b_example").await;
    let next = client
        .request(
            "$JS.API.CONSUMER.MSG.NEXT.KUBEMAIL.kubemail-b_example",
            "1".into(),
        )
        .await;
    assert!(next.is_err());
    violation(&errors, "CONSUMER.MSG.NEXT.KUBEMAIL.kubemail-b_example").await;
    assert!(
        js.get_object_store(body_bucket(&config.body_bucket, B))
            .await
            .is_err()
    );
    violation(&errors, "OBJ_KUBEMAIL_BODIES-b_example").await;
    // Denied: the other domain's failure subjects (no lock-outs for its users).
    let other_failure = format!(
        "{}.0123456789abcdef0123456789abcdef",
        kubemail_queue::auth_failure_subject_prefix(&config.subject_prefix, B)
    );
    let _ = js.publish(other_failure.clone(), "".into()).await;
    violation(&errors, &other_failure).await;
    // Denied: stream and consumer management, purges.
    assert!(
        js.create_stream(jetstream::stream::Config {
            name: "EVIL".to_owned(),
            subjects: vec!["evil.>".to_owned()],
            ..Default::default()
        })
        .await
        .is_err()
    );
    violation(&errors, "STREAM.CREATE.EVIL").await;
    assert!(js.delete_stream("KUBEMAIL").await.is_err());
    violation(&errors, "STREAM.DELETE.KUBEMAIL").await;
    for purge in [
        "$JS.API.STREAM.PURGE.KUBEMAIL",
        "$JS.API.STREAM.PURGE.KUBEMAIL_AUTH_FAILURES",
        "$JS.API.CONSUMER.DELETE.KUBEMAIL.kubemail-a_example",
        "$JS.API.STREAM.MSG.GET.KUBEMAIL",
    ] {
        assert!(client.request(purge, "{}".into()).await.is_err(), "{purge}");
        violation(&errors, purge.trim_start_matches('$')).await;
    }
    // Denied: reading queue traffic or another client's replies.
    let mut snoop = client.subscribe("kubemail.queue.>").await.unwrap();
    violation(&errors, "Subscription to \"kubemail.queue.>\"").await;
    let _inbox = client.subscribe("_INBOX.>").await.unwrap();
    violation(&errors, "Subscription to \"_INBOX.>\"").await;
    let other_inbox = format!("{}.>", inbox_prefix(&[B]));
    let _ = client.subscribe(other_inbox.clone()).await.unwrap();
    violation(&errors, &other_inbox).await;
    // Another domain's node (here: a user with every permission) queues mail for B.
    let everything = credentials::mint_user(
        &nats.keys,
        "test-admin",
        &kubemail_queue::Permissions {
            publish: vec![">".to_owned()],
            subscribe: vec![">".to_owned()],
        },
        kubemail_operator::timestamps::now(),
        3600,
    )
    .unwrap();
    let (other, _) = nats.node(&everything.creds, &[B]).await.unwrap();
    jetstream::new(other)
        .publish(subject(&config.subject_prefix, B), "mail of b".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), snoop.next())
            .await
            .is_err(),
        "another domain's mail is never delivered to these credentials"
    );
    // The other domain's queue and the shared streams are intact.
    let counts = subject_counts(&admin, "KUBEMAIL").await;
    assert_eq!(counts.get("kubemail.queue.b.example"), Some(&1));
    assert!(admin.get_stream("KUBEMAIL_AUTH_FAILURES").await.is_ok());
}

/// A MailPool's nodes run on one credential for all their domains, with the pool's fixed
/// reply inbox: with 500 domains (the pool size the operator is benchmarked with) the server
/// still takes the user, the first and the last domain's entries are acknowledged, and a
/// domain the pool does not serve stays out of reach.
#[tokio::test]
async fn a_pools_one_credential_for_500_domains_reaches_each_of_them() {
    let nats = SecureNats::start(1, "");
    let config = NatsConfig::default();
    let domains: Vec<String> = (0..500).map(|i| format!("d{i}.pool.example")).collect();
    let (first, last) = (domains[0].clone(), domains[499].clone());
    nats.operator()
        .ensure(
            &config,
            &AuthConfig::default(),
            &ConsumerConfig::default(),
            &[first.clone(), last.clone(), B.to_owned()],
        )
        .await
        .expect("the operator creates the stream, consumers and buckets");
    let inbox = kubemail_queue::pool_inbox_prefix("platform", "shared");
    let permissions =
        kubemail_queue::node_permissions_with_inbox(&QueueNames::default(), &domains, &inbox);
    let minted = credentials::mint_user(
        &nats.keys,
        "kubemail-pool:platform/shared",
        &permissions,
        kubemail_operator::timestamps::now(),
        3600,
    )
    .unwrap();
    eprintln!(
        "credentials for {} domains: {} bytes",
        domains.len(),
        minted.creds.len()
    );
    let (client, errors) = nats
        .node_with_inbox(&minted.creds, &inbox)
        .await
        .expect("the pool's credential connects");
    let mut js = jetstream::new(client);
    js.set_timeout(DENIED_WAIT);
    for domain in [&first, &last] {
        js.publish(subject(&config.subject_prefix, domain), "entry".into())
            .await
            .unwrap()
            .await
            .unwrap_or_else(|e| panic!("{domain}'s entry is acknowledged: {e}"));
        js.get_object_store(body_bucket(&config.body_bucket, domain))
            .await
            .unwrap_or_else(|e| panic!("{domain}'s body bucket: {e}"));
    }
    let denied = js
        .publish(subject(&config.subject_prefix, B), "entry".into())
        .await
        .unwrap()
        .await;
    assert!(denied.is_err(), "a domain outside the pool: {denied:?}");
    violation(&errors, &subject(&config.subject_prefix, B)).await;
}

#[tokio::test]
async fn clients_without_valid_credentials_or_tls_are_refused() {
    let nats = SecureNats::start(1, "");
    // No credentials.
    let anonymous = async_nats::ConnectOptions::new()
        .tls_client_config(client_tls(&nats.ca_pem).unwrap())
        .require_tls(true)
        .connection_timeout(Duration::from_secs(5))
        .connect(nats.url())
        .await;
    assert!(anonymous.is_err(), "a client without credentials connects");
    // Expired credentials (valid for a minute, issued an hour ago).
    let expired = credentials::node_credentials(
        &nats.keys,
        &QueueNames::default(),
        &[A],
        kubemail_operator::timestamps::now() - 3600,
        60,
    )
    .unwrap();
    assert!(nats.node(&expired.creds, &[A]).await.is_err());
    // Credentials of another account's signing key.
    let stranger = Trust::generate().account_keys().unwrap();
    assert!(
        nats.node(&node_creds(&stranger, &[A], 3600), &[A])
            .await
            .is_err()
    );
    // A plaintext client: the server demands TLS and never answers PING.
    let port = nats.cluster.servers[0].port;
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut info = String::new();
    reader.read_line(&mut info).unwrap();
    assert!(info.contains("\"tls_required\":true"), "{info}");
    let mut writer = stream;
    let _ = writer.write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n");
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
    assert!(
        !rest.contains("PONG"),
        "a plaintext client was served: {rest}"
    );
    // The right credentials work.
    assert!(
        nats.node(&node_creds(&nats.keys, &[A], 3600), &[A])
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_the_stream_from_r1_to_r3_keeps_every_queued_entry() {
    let mut nats = SecureNats::start(3, "sync_interval: always");
    let operator = nats.operator();
    let r1 = NatsConfig::default();
    let domains = [A.to_owned()];
    // The cluster elects its meta leader shortly after start: retry the first creation.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while let Err(e) = operator
        .ensure(
            &r1,
            &AuthConfig::default(),
            &ConsumerConfig::default(),
            &domains,
        )
        .await
    {
        assert!(std::time::Instant::now() < deadline, "{e}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (client, _) = nats
        .node(&node_creds(&nats.keys, &[A], 3600), &[A])
        .await
        .unwrap();
    let js = jetstream::new(client);
    for i in 0..50 {
        js.publish(subject(&r1.subject_prefix, A), format!("entry {i}").into())
            .await
            .unwrap()
            .await
            .expect("queued on the R1 stream");
    }

    let r3 = NatsConfig {
        replicas: 3,
        ..NatsConfig::default()
    };
    operator
        .ensure(
            &r3,
            &AuthConfig::default(),
            &ConsumerConfig::default(),
            &domains,
        )
        .await
        .expect("the operator updates the stream to three replicas");
    let admin = jetstream::new(operator.connect().await.unwrap());
    // Wait until every replica has caught up, then lose the leader: the entries must be on
    // the other servers too.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut caught_up = 0;
    let leader = loop {
        let mut stream = admin.get_stream("KUBEMAIL").await.unwrap();
        let info = stream.info().await.unwrap();
        assert_eq!(info.config.num_replicas, 3);
        assert_eq!(info.state.messages, 50, "nothing lost by the update");
        let cluster = info.cluster.clone().unwrap_or_default();
        let current = cluster
            .replicas
            .iter()
            .filter(|r| r.current && r.lag.unwrap_or(0) == 0)
            .count();
        if cluster.leader.is_some() && current == 2 {
            caught_up += 1;
        } else {
            caught_up = 0;
        }
        // Caught up in several polls in a row: the snapshot the new replicas start from is
        // applied, not merely requested.
        if caught_up >= 10 {
            break cluster.leader.unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replicas never caught up: {cluster:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // "Current" is the replicas' Raft log; the entries themselves arrive by a catch-up from
    // the leader's snapshot just after, which the stream info does not show.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let index = nats
        .cluster
        .servers
        .iter()
        .position(|s| s.name == leader)
        .unwrap();
    nats.cluster.kill(index);

    let (client, _) = nats
        .node(&node_creds(&nats.keys, &[A], 3600), &[A])
        .await
        .unwrap();
    let js = jetstream::new(client);
    // The remaining two servers elect a new leader first.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let consumer: PullConsumer = loop {
        match js
            .get_consumer_from_stream(consumer_name(A), "KUBEMAIL")
            .await
        {
            Ok(c) => break c,
            Err(e) => {
                if std::time::Instant::now() > deadline {
                    let stream = admin
                        .get_stream("KUBEMAIL")
                        .await
                        .map(|s| s.cached_info().clone());
                    let consumer = admin
                        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                            consumer_name(A),
                            "KUBEMAIL",
                        )
                        .await
                        .map(|c| c.cached_info().clone());
                    let logs: Vec<String> = nats
                        .cluster
                        .servers
                        .iter()
                        .map(|s| {
                            let log = s.log();
                            let lines: Vec<&str> = log
                                .lines()
                                .filter(|l| !l.contains("Error trying to connect to route"))
                                .collect();
                            format!(
                                "== {}\n{}",
                                s.name,
                                lines[lines.len().saturating_sub(25)..].join("\n")
                            )
                        })
                        .collect();
                    panic!(
                        "{e}; stream: {stream:?}; consumer: {consumer:?}; logs:\n{}",
                        logs.join("\n")
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 50 && std::time::Instant::now() < deadline {
        let Ok(mut batch) = consumer
            .fetch()
            .max_messages(50)
            .expires(Duration::from_secs(2))
            .messages()
            .await
        else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        while let Some(Ok(m)) = batch.next().await {
            seen.insert(String::from_utf8_lossy(&m.payload).into_owned());
            let _ = m.double_ack().await;
        }
    }
    assert_eq!(
        seen.len(),
        50,
        "every entry queued before the upgrade is delivered after losing the old leader"
    );
}

#[tokio::test]
async fn node_credentials_watch_pauses_share_shaping_and_answer_only_their_own_marks() {
    let nats = SecureNats::start(1, "");
    let config = NatsConfig::default();
    nats.operator()
        .ensure(
            &config,
            &AuthConfig::default(),
            &ConsumerConfig::default(),
            &[A.to_owned(), B.to_owned()],
        )
        .await
        .expect("the operator creates every object, the delivery buckets included");
    // The operator writes a pause with its own connection.
    let operator = jetstream::new(nats.operator().connect().await.unwrap());
    let pauses = operator
        .get_key_value(kubemail_queue::PAUSES_BUCKET)
        .await
        .expect("the pause bucket exists");
    pauses
        .put(
            "mail.remote",
            r#"{"key":"mail.remote","recipientDomains":["remote.test"]}"#.into(),
        )
        .await
        .expect("the operator may write pauses");
    // Marks are written by whoever acts on the queue (`kubectl kubemail`), here a broad user.
    let admin_creds = credentials::mint_user(
        &nats.keys,
        "queue-admin",
        &kubemail_queue::Permissions {
            publish: vec![">".to_owned()],
            subscribe: vec![">".to_owned()],
        },
        kubemail_operator::timestamps::now(),
        3600,
    )
    .unwrap()
    .creds;
    let (admin, _) = nats.node(&admin_creds, &["admin.example"]).await.unwrap();
    let marks = jetstream::new(admin)
        .get_key_value(kubemail_queue::REPLACED_BUCKET)
        .await
        .expect("the marks bucket exists");

    let (js, errors) = nats.node_js(A).await;

    // Pauses: followed with a pull-based ordered consumer (as the nodes do), never written.
    let stream = js
        .get_stream(format!("KV_{}", kubemail_queue::PAUSES_BUCKET))
        .await
        .expect("a node opens the pause bucket's stream");
    let follow = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("$KV.{}.>", kubemail_queue::PAUSES_BUCKET),
            deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .expect("a node follows the pauses");
    let mut messages = follow.messages().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .unwrap_or_else(|_| panic!("the pauses arrive; errors: {:?}", errors.lock().unwrap()))
        .expect("a pause")
        .expect("no error");
    assert_eq!(first.subject.as_str(), "$KV.KUBEMAIL_PAUSES.mail.remote");
    js.publish("$KV.KUBEMAIL_PAUSES.mail.forged", "{}".into())
        .await
        .unwrap();
    violation(&errors, "$KV.KUBEMAIL_PAUSES.mail.forged").await;

    // Shaping: leases and rate state, create, update and delete.
    for bucket in [
        kubemail_queue::SHAPING_LEASES_BUCKET,
        kubemail_queue::SHAPING_BUCKET,
    ] {
        let kv = js.get_key_value(bucket).await.expect("a shaping bucket");
        let rev = kv
            .create("0.d.remote.test", "node".into())
            .await
            .expect("create");
        let rev = kv
            .update("0.d.remote.test", "node".into(), rev)
            .await
            .expect("update");
        assert!(kv.entry("0.d.remote.test").await.unwrap().is_some());
        kv.delete_expect_revision("0.d.remote.test", Some(rev))
            .await
            .expect("give back");
    }

    // Replaced-entry marks: its own domain's, not another's.
    marks
        .put(kubemail_queue::replaced_key(A, 7), "replaced".into())
        .await
        .unwrap();
    marks
        .put(kubemail_queue::replaced_key(B, 7), "replaced".into())
        .await
        .unwrap();
    let own = js
        .get_key_value(kubemail_queue::REPLACED_BUCKET)
        .await
        .expect("the marks bucket");
    let mark = own
        .entry(kubemail_queue::replaced_key(A, 7))
        .await
        .unwrap()
        .expect("its own domain's mark");
    own.update(
        kubemail_queue::replaced_key(A, 7),
        "yielded".into(),
        mark.revision,
    )
    .await
    .expect("answer its own mark");
    assert!(
        own.put(kubemail_queue::replaced_key(B, 7), "yielded".into())
            .await
            .is_err(),
        "another domain's mark is out of reach"
    );
    violation(&errors, "$KV.KUBEMAIL_REPLACED.b_example.7").await;
}

/// With authenticated NATS the nodes' credentials cannot read the queue stream by sequence,
/// so a node cannot tell an orphaned body from a queued one; the operator sweeps for them. It
/// deletes the body no entry refers to, keeps and marks the one an entry refers to, and
/// touches no other domain's bucket.
#[tokio::test]
async fn the_operator_sweeps_the_orphaned_bodies_a_nodes_credentials_cannot() {
    use async_nats::HeaderMap;
    use kubemail_queue::sweep::{MARK, sweep};
    let nats = SecureNats::start(1, "");
    let config = NatsConfig::default();
    let domains = [A.to_owned(), B.to_owned()];
    nats.operator()
        .ensure(
            &config,
            &AuthConfig::default(),
            &ConsumerConfig::default(),
            &domains,
        )
        .await
        .expect("the operator creates the stream, consumers and buckets");
    // Node A stores two bodies and queues an entry that refers to one of them.
    let (js, errors) = nats.node_js(A).await;
    let bucket_a = body_bucket(&config.body_bucket, A);
    let store = js.get_object_store(&bucket_a).await.unwrap();
    for name in ["kept.a.example", "orphan.a.example"] {
        let mut body: &[u8] = b"Subject: big\r\n\r\nbody\r\n";
        store.put(name, &mut body).await.unwrap();
    }
    let mut headers = HeaderMap::new();
    headers.insert(
        kubemail_queue::headers::BODY_REF,
        kubemail_queue::body_ref(&bucket_a, "kept.a.example").as_str(),
    );
    js.publish_with_headers(subject(&config.subject_prefix, A), headers, "".into())
        .await
        .unwrap()
        .await
        .expect("the entry is stored");
    // Node B has an unreferenced body of the same name: A's sweep must not touch it.
    let (client_b, _) = nats
        .node(&node_creds(&nats.keys, &[B], 3600), &[B])
        .await
        .unwrap();
    let store_b = jetstream::new(client_b)
        .get_object_store(body_bucket(&config.body_bucket, B))
        .await
        .unwrap();
    let mut body: &[u8] = b"b";
    store_b.put("orphan.a.example", &mut body).await.unwrap();

    // The node cannot sweep: reading the stream is refused, and nothing is deleted.
    let refused = sweep(&js, &config, A, &store, Duration::ZERO).await;
    assert!(
        refused.is_err(),
        "a node's credentials read the queue stream: {refused:?}"
    );
    assert!(!store.info("orphan.a.example").await.unwrap().deleted);
    errors.lock().unwrap().clear();

    // Younger than the grace period: the operator leaves everything alone.
    let outcomes = kubemail_operator::nats::sweep::sweep_domains(
        &nats.operator(),
        &config,
        &[A.to_owned()],
        Duration::from_secs(3600),
    )
    .await
    .expect("the operator connects");
    assert!(
        matches!(outcomes.as_slice(), [(d, Ok(0))] if d == A),
        "{outcomes:?}"
    );
    let outcomes = kubemail_operator::nats::sweep::sweep_domains(
        &nats.operator(),
        &config,
        &[A.to_owned()],
        Duration::ZERO,
    )
    .await
    .expect("the operator connects");
    assert!(
        matches!(outcomes.as_slice(), [(d, Ok(1))] if d == A),
        "one orphan deleted: {outcomes:?}"
    );
    assert!(store.info("orphan.a.example").await.unwrap().deleted);
    let kept = store.info("kept.a.example").await.unwrap();
    assert_eq!(kept.description.as_deref(), Some(MARK));
    let mut read = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(
        &mut store.get("kept.a.example").await.unwrap(),
        &mut read,
    )
    .await
    .unwrap();
    assert_eq!(
        read, b"Subject: big\r\n\r\nbody\r\n",
        "the queued body is intact"
    );
    assert!(
        !store_b.info("orphan.a.example").await.unwrap().deleted,
        "another domain's bucket is not swept with A"
    );
    // The operator's loop, as it runs beside the controllers: it finds a new orphan by
    // itself, and keeps sweeping past a domain whose bucket is missing.
    let mut body: &[u8] = b"later";
    store.put("later.a.example", &mut body).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let total = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = total.clone();
    let access = nats.operator();
    let sweeper = {
        let stop = stop.clone();
        let config = config.clone();
        tokio::spawn(async move {
            kubemail_operator::nats::sweep::run_with(
                || async { Ok::<_, String>(access.clone()) },
                &config,
                || vec!["new.example".to_owned(), A.to_owned()],
                kubemail_operator::nats::sweep::Schedule {
                    interval: Duration::from_millis(200),
                    grace: Duration::ZERO,
                },
                &stop,
                |n| {
                    counted.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                },
            )
            .await;
        })
    };
    for _ in 0..100 {
        if store.info("later.a.example").await.unwrap().deleted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    sweeper.await.unwrap();
    assert!(
        store.info("later.a.example").await.unwrap().deleted,
        "the loop swept"
    );
    assert_eq!(total.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(!store.info("kept.a.example").await.unwrap().deleted);
    // A bucket that does not exist (a MailDomain not reconciled yet) is reported, not fatal.
    let outcomes = kubemail_operator::nats::sweep::sweep_domains(
        &nats.operator(),
        &config,
        &["new.example".to_owned(), A.to_owned()],
        Duration::ZERO,
    )
    .await
    .unwrap();
    assert!(
        matches!(outcomes.as_slice(), [(_, Err(_)), (_, Ok(0))]),
        "{outcomes:?}"
    );
}
