//! The operator's shared JetStream objects against a real nats-server: the events stream it
//! creates is written asynchronously at one replica (events cost no fsync of their own) and
//! takes atomic batches at three (where the server refuses asynchronous writes); an events
//! stream made by an earlier release (synchronous, no atomic batches) is turned to take them,
//! keeping what it stores, so the nodes can write the events of concurrent sessions and
//! deliveries as one batch.

use kubemail_operator::nats::jetstream::ensure_event_objects;
use kubemail_queue::events::EVENTS_STREAM;
use kubemail_queue::streams;
use kubemail_test_support::nats::NatsCluster;

async fn jetstream(nats: &NatsCluster) -> async_nats::jetstream::Context {
    let urls: Vec<String> = nats.urls("nats").split(',').map(str::to_owned).collect();
    let client = async_nats::connect(urls).await.expect("connect");
    async_nats::jetstream::new(client)
}

async fn publish_one(js: &async_nats::jetstream::Context) {
    js.publish("kubemail.events.example_test.received", "kept".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
}

#[tokio::test]
async fn an_earlier_synchronous_events_stream_is_turned_to_take_atomic_batches() {
    let nats = NatsCluster::start(1, "", "");
    let js = jetstream(&nats).await;
    let mut earlier = streams::events_stream_config(
        1,
        streams::EVENTS_DEFAULT_MAX_AGE,
        streams::EVENTS_DEFAULT_MAX_BYTES,
    );
    earlier.persist_mode = None;
    earlier.allow_atomic_publish = false;
    js.create_stream(earlier)
        .await
        .expect("an earlier release's stream");
    publish_one(&js).await;

    ensure_event_objects(&js, &kubemail_config::NatsConfig::default())
        .await
        .expect("the operator ensures the event objects");

    let mut stream = js.get_stream(EVENTS_STREAM).await.expect("events stream");
    let info = stream.info().await.expect("info");
    assert!(info.config.allow_atomic_publish, "{:?}", info.config);
    assert!(
        !streams::is_asynchronous(&info.config),
        "the server keeps a stream's persistence: {:?}",
        info.config
    );
    assert_eq!(info.state.messages, 1, "what the stream held is kept");
    // And again: an up-to-date stream is left alone.
    ensure_event_objects(&js, &kubemail_config::NatsConfig::default())
        .await
        .expect("a second pass");
}

#[tokio::test]
async fn a_new_events_stream_of_one_replica_is_written_asynchronously() {
    let nats = NatsCluster::start(1, "", "");
    let js = jetstream(&nats).await;
    let config = kubemail_config::NatsConfig::default();
    assert_eq!(config.replicas, 1);
    ensure_event_objects(&js, &config)
        .await
        .expect("the operator creates the event objects");
    let mut stream = js.get_stream(EVENTS_STREAM).await.expect("events stream");
    let info = stream.info().await.expect("info").clone();
    assert!(
        streams::is_asynchronous(&info.config),
        "the server reports {:?}",
        info.config.persist_mode
    );
    assert!(!info.config.allow_atomic_publish);
    publish_one(&js).await;
    // A second pass does not try to turn on batches the server would refuse.
    ensure_event_objects(&js, &config)
        .await
        .expect("a second pass leaves the asynchronous stream alone");
    let info = stream.info().await.expect("info");
    assert!(streams::is_asynchronous(&info.config));
    assert_eq!(info.state.messages, 1);
}

#[tokio::test]
async fn a_new_events_stream_of_three_replicas_is_synchronous_and_takes_atomic_batches() {
    let nats = NatsCluster::start(3, "", "");
    let js = jetstream(&nats).await;
    let config = kubemail_config::NatsConfig {
        replicas: 3,
        ..Default::default()
    };
    // The cluster elects its meta leader first; creating a stream waits for it.
    let mut created = None;
    for _ in 0..100 {
        match ensure_event_objects(&js, &config).await {
            Ok(()) => {
                created = Some(());
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    }
    created.expect("the operator creates the event objects on three servers");
    let mut stream = js.get_stream(EVENTS_STREAM).await.expect("events stream");
    let info = stream.info().await.expect("info");
    assert_eq!(info.config.num_replicas, 3);
    assert!(!streams::is_asynchronous(&info.config), "{:?}", info.config);
    assert!(info.config.allow_atomic_publish);
    publish_one(&js).await;
}
