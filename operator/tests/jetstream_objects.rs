//! The operator's shared JetStream objects against a real nats-server: an events stream made
//! by an earlier release (no atomic batches) is turned to take them, keeping what it stores,
//! so the nodes can write the events of concurrent sessions and deliveries as one batch.

use kubemail_operator::nats::jetstream::ensure_event_objects;
use kubemail_queue::events::EVENTS_STREAM;
use kubemail_queue::streams;
use kubemail_test_support::nats::NatsCluster;

#[tokio::test]
async fn an_events_stream_without_atomic_batches_is_turned_to_take_them() {
    let nats = NatsCluster::start(1, "", "");
    let client = async_nats::connect(nats.urls("nats"))
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut earlier = streams::events_stream_config(
        1,
        streams::EVENTS_DEFAULT_MAX_AGE,
        streams::EVENTS_DEFAULT_MAX_BYTES,
    );
    earlier.allow_atomic_publish = false;
    js.create_stream(earlier)
        .await
        .expect("an earlier release's stream");
    js.publish("kubemail.events.example_test.received", "kept".into())
        .await
        .expect("publish")
        .await
        .expect("stored");

    ensure_event_objects(&js, &kubemail_config::NatsConfig::default())
        .await
        .expect("the operator ensures the event objects");

    let mut stream = js.get_stream(EVENTS_STREAM).await.expect("events stream");
    let info = stream.info().await.expect("info");
    assert!(info.config.allow_atomic_publish, "{:?}", info.config);
    assert_eq!(info.state.messages, 1, "what the stream held is kept");
    // And again: an up-to-date stream is left alone.
    ensure_event_objects(&js, &kubemail_config::NatsConfig::default())
        .await
        .expect("a second pass");
}
