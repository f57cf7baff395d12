//! The end-of-data and enqueue path: what the node does between the client's `<CRLF>.<CRLF>`
//! and the hand-over to the queue, and what the queue does before the publish.
//!
//! * `end_of_data/*`: one whole transaction (MAIL, RCPT, DATA, a 5 KiB message, the `250`)
//!   through a real [`serve`] session over an in-memory pipe, into a queue that drops what it
//!   gets: receiving and unstuffing the message, the `Received` header, the entry with its
//!   envelope, and on submission a `Message-ID` and the DKIM Ed25519 signature.
//! * `enqueue/*`: the NATS headers of one queue entry ([`QueueEntry::to_headers`]), the
//!   content digest that becomes its `Nats-Msg-Id` ([`ContentId`]), and a group of 100
//!   entries made ready as one atomic batch.
//!
//! Besides time, the benchmark counts heap allocations with a counting global allocator and
//! prints allocations and allocated bytes per message for each `end_of_data` case before
//! criterion's own runs (`allocations per message: ...`).
//!
//! Run: `cargo bench -p kubemail-smtp-node --bench enqueue` (a filter such as `end_of_data/`
//! runs a part).

use std::alloc::System;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::future::BoxFuture;
use kubemail_smtp_node::auth::Authenticator;
use kubemail_smtp_node::config::NodeConfig;
use kubemail_smtp_node::connection::ConnectionInfo;
use kubemail_smtp_node::connection::prefixed::PrefixedStream;
use kubemail_smtp_node::context::{MessageChecks, ServerContext};
use kubemail_smtp_node::dkim::DkimSigner;
use kubemail_smtp_node::metrics::Metrics;
use kubemail_smtp_node::queue::commit::{BATCH_ID, BATCH_SEQUENCE, Outgoing};
use kubemail_smtp_node::queue::{
    ContentId, Direction, EnqueueError, Queue, QueueEntry, QueueId, QueuedMessage,
};
use kubemail_smtp_node::session::serve;
use kubemail_smtp_node::shutdown::Shutdown;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

/// Counts every allocation of the process.
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Message size of the accept-and-queue benchmark.
const MESSAGE_SIZE: usize = 5 * 1024;

/// A queue that takes everything and keeps nothing.
struct NullQueue;

impl Queue for NullQueue {
    fn enqueue(&self, entries: Vec<QueuedMessage>) -> BoxFuture<'_, Result<(), EnqueueError>> {
        Box::pin(async move {
            black_box(entries);
            Ok(())
        })
    }

    fn is_ready(&self) -> bool {
        true
    }
}

/// A message of about `size` octets, dot-stuffed and terminated as it travels after DATA.
fn wire_message(size: usize) -> Vec<u8> {
    let mut m = b"From: alice@example.test\r\nTo: bob@example.test\r\nSubject: bench\r\nMessage-ID: <bench@example.test>\r\n\r\n".to_vec();
    while m.len() < size {
        m.extend_from_slice(
            b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod t\r\n",
        );
    }
    m.extend_from_slice(b".\r\n");
    m
}

/// One client session against a fresh node context.
struct Bench {
    io: DuplexStream,
    buf: Vec<u8>,
    transaction: Vec<u8>,
    _users: tempfile::TempDir,
}

impl Bench {
    async fn start(submission: bool) -> Self {
        let users = tempfile::tempdir().expect("tempdir");
        let users_file = users.path().join("users");
        let hash = bcrypt::hash("secret", 4).expect("bcrypt");
        std::fs::write(&users_file, format!("alice:{hash}\n")).expect("users file");
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let yaml = format!(
            r#"
hostname: mx.example.test
listeners:
  - {{ name: mx, kind: mx, address: "127.0.0.1:25" }}
  - {{ name: sub, kind: submission, address: "127.0.0.1:587", requireTls: false }}
domains:
  - name: example.test
    recipients: [bob]
    inbound: {{ host: 127.0.0.1, port: 24 }}
    usersFile: {users}
    limits: {{ messagesPerMinutePerUser: 100000000 }}
    dkim:
      keys:
        - {{ selector: ed, keyFile: {key} }}
inboundAuth: {{ enabled: false }}
"#,
            users = users_file.display(),
            key = examples.join("dev-dkim-ed25519.pem").display(),
        );
        let config = NodeConfig::from_yaml(&yaml).expect("config");
        config.validate().expect("valid config");
        let auth = Arc::new(Authenticator::load(&config).expect("users"));
        let dkim = DkimSigner::load(config.domains.iter().map(|d| (d.name.as_str(), &d.dkim)))
            .expect("dkim key");
        let listener = Arc::new(config.listeners[usize::from(submission)].clone());
        let ctx = ServerContext::with_checks(
            Arc::new(config),
            None,
            auth,
            Arc::new(NullQueue),
            Shutdown::new(),
            MessageChecks {
                dkim: Some(Arc::new(dkim)),
                inbound_auth: None,
                suppression: None,
                recipients: None,
            },
            Metrics::new(),
        );
        let (client, server) = tokio::io::duplex(1 << 16);
        let conn = ConnectionInfo {
            session_id: 1,
            remote: SocketAddr::from(([192, 0, 2, 7], 40000)),
            local: SocketAddr::from(([127, 0, 0, 1], 25)),
            listener,
        };
        tokio::spawn(serve(PrefixedStream::new(server), conn, ctx));
        let mut transaction =
            b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n".to_vec();
        transaction.extend_from_slice(&wire_message(MESSAGE_SIZE));
        let mut b = Self {
            io: client,
            buf: Vec::with_capacity(4096),
            transaction,
            _users: users,
        };
        b.until(b"220 ").await;
        b.io.write_all(b"EHLO client.test\r\n")
            .await
            .expect("write");
        b.until(b"250 ").await;
        if submission {
            // "\0alice@example.test\0secret"
            b.io.write_all(b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=\r\n")
                .await
                .expect("write");
            b.until(b"235 ").await;
        }
        b
    }

    /// Reads until a line starting with `prefix` has arrived.
    async fn until(&mut self, prefix: &[u8]) {
        loop {
            if let Some(at) = self
                .buf
                .windows(prefix.len())
                .position(|w| w == prefix)
                .filter(|&at| at == 0 || self.buf[at - 1] == b'\n')
                && let Some(end) = self.buf[at..].windows(2).position(|w| w == b"\r\n")
            {
                self.buf.drain(..at + end + 2);
                return;
            }
            let mut chunk = [0u8; 1024];
            let n = self.io.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&self.buf));
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// One pipelined transaction, up to its `250` after the end of data.
    async fn transaction(&mut self) {
        self.io.write_all(&self.transaction).await.expect("write");
        self.until(b"250 2.0.0 Ok: queued").await;
    }
}

fn end_of_data(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("end_of_data");
    group.throughput(Throughput::Elements(1));
    for (name, submission) in [("mx_5k", false), ("submission_dkim_5k", true)] {
        let mut bench = runtime.block_on(Bench::start(submission));
        // Warm up buffers and caches, then count.
        runtime.block_on(async {
            for _ in 0..100 {
                bench.transaction().await;
            }
        });
        const COUNTED: usize = 1000;
        let region = Region::new(GLOBAL);
        runtime.block_on(async {
            for _ in 0..COUNTED {
                bench.transaction().await;
            }
        });
        let stats = region.change();
        eprintln!(
            "end_of_data/{name}: allocations per message: {:.1}, allocated bytes per message: {:.0}",
            (stats.allocations + stats.reallocations) as f64 / COUNTED as f64,
            stats.bytes_allocated as f64 / COUNTED as f64,
        );
        group.bench_function(name, |b| {
            b.iter(|| runtime.block_on(bench.transaction()));
        });
    }
    group.finish();
}

fn entry(domain: &str) -> QueueEntry {
    QueueEntry {
        message_id: Some("<bench@remote.test>".to_owned()),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned()),
        client_ip: Some("192.0.2.7".parse().expect("ip")),
        helo: Some("client.remote.test".to_owned()),
        body_size: Some(MESSAGE_SIZE as u64),
        ..QueueEntry::new(
            QueueId::new(),
            "sender@remote.test".to_owned(),
            vec!["bob@example.test".to_owned()],
            Direction::Inbound,
            domain.to_owned(),
            SystemTime::now(),
        )
    }
}

fn enqueue(c: &mut Criterion) {
    let body = Bytes::from(wire_message(MESSAGE_SIZE));
    let mut group = c.benchmark_group("enqueue");
    let e = entry("example.test");
    group.bench_function("headers", |b| {
        b.iter(|| black_box(e.to_headers(black_box("c0123456789abcdef.example.test"))));
    });
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("content_id_5k", |b| {
        b.iter(|| {
            let id = ContentId::new(None, "sender@remote.test", &[], black_box(&body));
            black_box(id.msg_id("example.test", &e.recipients, 0))
        });
    });
    group.throughput(Throughput::Elements(100));
    let entries: Vec<QueueEntry> = (0..100).map(|_| entry("example.test")).collect();
    group.bench_function("batch_of_100", |b| {
        b.iter(|| {
            let batch: Vec<Outgoing> = entries
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let subject = kubemail_queue::subject("kubemail.queue", &e.domain);
                    let mut m = Outgoing::new(subject, e.clone(), e.entry_id(), body.clone());
                    m.headers
                        .insert(BATCH_ID, "0190a1b2c3d4e5f60718293a4b5c6d7e");
                    m.headers.insert(BATCH_SEQUENCE, (i + 1).to_string());
                    m
                })
                .collect();
            black_box(batch)
        });
    });
    group.finish();
}

criterion_group!(benches, end_of_data, enqueue);
criterion_main!(benches);
