//! Queue security as the installed chart makes it, on the local cluster's authenticated,
//! TLS-only NATS: the credentials the operator minted into a MailDomain's NATS Secret reach
//! that domain's queue and no other's; a client without credentials, or without TLS, is refused.

use std::io::{BufRead as _, BufReader, Write as _};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kubemail_e2e::local_env::LocalEnv;

/// Checks everything above for the MailDomain `md` (domain `domain`) of namespace `ns`, whose
/// queue is `stream` with subjects under `prefix`.
pub async fn check(
    env: &LocalEnv,
    client: &kube::Client,
    ns: &str,
    md: &str,
    domain: &str,
    stream: &str,
    prefix: &str,
) {
    let urls: Vec<String> = env.nats_url.split(',').map(str::to_owned).collect();
    let ca = env
        .var("NATS_CA")
        .expect("NATS_CA in the env file")
        .to_owned();

    // A client without credentials cannot connect.
    let anonymous = async_nats::ConnectOptions::new()
        .add_root_certificates(ca.clone().into())
        .require_tls(true)
        .connection_timeout(Duration::from_secs(5))
        .connect(urls.clone())
        .await;
    assert!(
        anonymous.is_err(),
        "a client without credentials connected to NATS"
    );

    // NATS demands TLS: a plaintext client is never served.
    let first = urls[0].rsplit("//").next().unwrap().to_owned();
    let stream_tcp = std::net::TcpStream::connect(&first).unwrap();
    stream_tcp
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream_tcp.try_clone().unwrap());
    let mut info = String::new();
    reader.read_line(&mut info).unwrap();
    assert!(info.contains("\"tls_required\":true"), "{info}");
    let mut writer = stream_tcp;
    let _ = writer.write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n");
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
    assert!(
        !rest.contains("PONG"),
        "NATS served a plaintext client: {rest}"
    );

    // The domain's own credentials, from the Secret the operator owns in the domain's namespace.
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(&format!("{md}-nats"))
        .await
        .expect("the MailDomain's NATS Secret");
    let data = secret.data.unwrap_or_default();
    let creds = String::from_utf8(data["nats.creds"].0.clone()).unwrap();
    let secret_ca = String::from_utf8(data["ca.crt"].0.clone()).unwrap();
    assert_eq!(
        secret_ca.trim(),
        std::fs::read_to_string(&ca).unwrap().trim(),
        "the nodes verify NATS with its CA"
    );
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = errors.clone();
    let nats = async_nats::ConnectOptions::with_credentials(&creds)
        .unwrap()
        .custom_inbox_prefix(kubemail_queue::inbox_prefix(&[domain]))
        .add_root_certificates(ca.clone().into())
        .require_tls(true)
        .event_callback(move |event| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    seen.lock().unwrap().push(e.to_string());
                }
            }
        })
        .connect(urls.clone())
        .await
        .expect("the domain's credentials connect");
    let mut js = async_nats::jetstream::new(nats.clone());
    js.set_timeout(Duration::from_secs(2));
    // Its own consumer is readable.
    assert!(
        js.get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            kubemail_queue::consumer_name(domain),
            stream
        )
        .await
        .is_ok(),
        "the domain's own consumer"
    );
    // Another domain's subject, consumer, bucket: permission violations, nothing delivered.
    let other = "other.test";
    let forged = js
        .publish(kubemail_queue::subject(prefix, other), "forged".into())
        .await;
    assert!(
        match forged {
            Ok(ack) => ack.await.is_err(),
            Err(_) => true,
        },
        "publishing to another domain's queue"
    );
    assert!(
        js.get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            kubemail_queue::consumer_name(other),
            stream
        )
        .await
        .is_err()
    );
    assert!(
        js.get_object_store(kubemail_queue::body_bucket("KUBEMAIL_BODIES", other))
            .await
            .is_err()
    );
    let mut snoop = nats.subscribe(format!("{prefix}.>")).await.unwrap();
    assert!(
        js.delete_stream(stream).await.is_err(),
        "deleting the queue stream"
    );
    let purge = nats
        .request(format!("$JS.API.STREAM.PURGE.{stream}"), "{}".into())
        .await;
    assert!(purge.is_err(), "purging the queue stream");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let wanted = [
        format!("Publish to \"{}\"", kubemail_queue::subject(prefix, other)),
        format!(
            "CONSUMER.INFO.{stream}.{}",
            kubemail_queue::consumer_name(other)
        ),
        format!("Subscription to \"{prefix}.>\""),
        format!("STREAM.DELETE.{stream}"),
        format!("STREAM.PURGE.{stream}"),
    ];
    loop {
        let got = errors.lock().unwrap().clone();
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|w| {
                !got.iter()
                    .any(|e| e.contains("Permissions Violation") && e.contains(w.as_str()))
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no permission violation for {missing:?}; got {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        tokio::time::timeout(
            Duration::from_millis(500),
            futures::StreamExt::next(&mut snoop)
        )
        .await
        .is_err(),
        "queue traffic reached a subscription these credentials may not have"
    );
    eprintln!("[queue security] own credentials only; no credentials and plaintext refused");
}
