//! Session behaviour over an in-memory pipe with the in-memory queue: reply codes a client
//! sees for each policy. The same behaviours are checked end to end (real binary, real
//! nats-server, real clients) under `tests/`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::auth::Authenticator;
use crate::config::NodeConfig;
use crate::connection::ConnectionInfo;
use crate::connection::prefixed::PrefixedStream;
use crate::context::ServerContext;
use crate::metrics::Metrics;
use crate::queue::memory::MemoryQueue;
use crate::queue::{Direction, EnqueueError};
use crate::shutdown::Shutdown;

const CONFIG: &str = r#"
hostname: mx.example.test
listeners:
  - { name: mx, kind: mx, address: "127.0.0.1:25" }
  - { name: sub, kind: submission, address: "127.0.0.1:587", requireTls: false }
  - { name: norm, kind: mx, address: "127.0.0.1:26", bareLineEndings: normalize }
  - { name: strip, kind: mx, address: "127.0.0.1:27", nulBytes: strip }
domains:
  - name: example.test
    recipients: [bob, postmaster]
    usersFile: USERS
    limits: { maxMessageSize: 2048, maxRecipients: 3, messagesPerMinutePerUser: 100 }
    inbound: { host: 127.0.0.1, port: 24 }
    allowedSenders: { carol: [carol@example.test, "*@lists.example.test"] }
  - name: other.test
    catchAll: true
    inbound: { host: 127.0.0.1, port: 24 }
  - name: outbound-only.test
    recipients: [postmaster]
maxErrorsPerSession: 10
maxJunkCommands: 5
timeouts: { command: 30s, dataBlock: 20s, dataInit: 20s }
"#;

struct Client {
    io: DuplexStream,
    buf: Vec<u8>,
    queue: Arc<MemoryQueue>,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn connect(listener: usize) -> Client {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    // bcrypt cost 4 keeps the unit tests fast; the format is what matters here.
    let hash = bcrypt::hash("secret", 4).unwrap();
    std::fs::write(&users, format!("alice:{hash}\ncarol:{hash}\n")).unwrap();
    let yaml = CONFIG.replace("USERS", &users.display().to_string());
    let config = NodeConfig::from_yaml(&yaml).unwrap();
    config.validate().unwrap();
    let auth = Arc::new(Authenticator::load(&config).unwrap());
    let queue = Arc::new(MemoryQueue::new());
    let shutdown = Shutdown::new();
    let listener_config = Arc::new(config.listeners[listener].clone());
    let metrics = Metrics::new();
    let ctx = ServerContext::new(
        Arc::new(config),
        None,
        auth,
        queue.clone(),
        shutdown.clone(),
        metrics.clone(),
    );
    let (client, server) = tokio::io::duplex(1 << 16);
    let conn = ConnectionInfo {
        session_id: 1,
        remote: SocketAddr::from(([192, 0, 2, 7], 40000)),
        local: SocketAddr::from(([127, 0, 0, 1], 25)),
        listener: listener_config,
    };
    let task = tokio::spawn(super::serve(PrefixedStream::new(server), conn, ctx));
    let mut c = Client {
        io: client,
        buf: Vec::new(),
        queue,
        shutdown,
        metrics,
        task,
        _dir: dir,
    };
    c.expect("220 mx.example.test").await;
    c
}

impl Client {
    async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    /// Reads one complete (possibly multi-line) reply.
    async fn reply(&mut self) -> String {
        loop {
            if let Some(end) = find_reply_end(&self.buf) {
                let reply: Vec<u8> = self.buf.drain(..end).collect();
                return String::from_utf8(reply).unwrap();
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), self.io.read(&mut chunk))
                .await
                .expect("reply within 10 s")
                .unwrap();
            assert!(
                n > 0,
                "connection closed; have {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn expect(&mut self, prefix: &str) -> String {
        let r = self.reply().await;
        assert!(r.starts_with(prefix), "expected {prefix:?}, got {r:?}");
        r
    }

    async fn cmd(&mut self, line: &str, prefix: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.expect(prefix).await
    }

    async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.io.read(&mut chunk)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// End of the last line of the first complete reply in `buf`.
fn find_reply_end(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(pos) = buf[start..].windows(2).position(|w| w == b"\r\n") {
        let line = &buf[start..start + pos];
        let end = start + pos + 2;
        if line.len() < 4 || line[3] == b' ' {
            return Some(end);
        }
        start = end;
    }
    None
}

#[tokio::test]
async fn mx_accepts_local_mail_and_queues_it() {
    let mut c = connect(0).await;
    let ehlo = c.cmd("EHLO client.test", "250-mx.example.test").await;
    assert!(
        ehlo.contains("PIPELINING") && ehlo.contains("SIZE 26214400") && ehlo.contains("CHUNKING")
    );
    assert!(!ehlo.contains("AUTH"), "no AUTH on MX: {ehlo}");
    assert!(
        !ehlo.contains("STARTTLS"),
        "no certificate, no STARTTLS: {ehlo}"
    );
    c.cmd("MAIL FROM:<a@remote.test>", "250 2.1.0").await;
    c.cmd("RCPT TO:<Bob@Example.TEST>", "250 2.1.5").await;
    c.cmd("RCPT TO:<anyone@other.test>", "250 2.1.5").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n").await;
    let r = c.expect("250 2.0.0 Ok: queued as ").await;
    let entries = c.queue.entries();
    assert_eq!(entries.len(), 2, "one entry per local domain");
    assert!(r.contains(entries[0].entry.queue_id.as_str()));
    assert_eq!(entries[0].entry.domain, "example.test");
    assert_eq!(entries[0].entry.recipients, ["Bob@example.test"]);
    assert_eq!(entries[1].entry.domain, "other.test");
    assert_eq!(entries[0].entry.direction, Direction::Inbound);
    let body = String::from_utf8(entries[0].body.to_vec()).unwrap();
    assert!(
        body.starts_with("Received: from client.test ([192.0.2.7])"),
        "{body}"
    );
    assert!(
        body.ends_with("\r\nSubject: hi\r\n\r\n.dot\r\nbody\r\n"),
        "{body}"
    );
    assert!(!body.contains("Message-ID"), "no Message-ID added on MX");
    c.cmd("QUIT", "221 2.0.0").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn a_session_counts_into_the_metrics_of_its_context() {
    // Every test builds its own metrics: exact counts, whatever runs beside it.
    let mut c = connect(0).await;
    c.cmd("EHLO client.test", "250-mx.example.test").await;
    c.cmd("MAIL FROM:<a@remote.test>", "250 2.1.0").await;
    c.cmd("RCPT TO:<nobody@example.test>", "550").await;
    c.cmd("RCPT TO:<bob@example.test>", "250 2.1.5").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n").await;
    c.expect("250 2.0.0 Ok: queued as ").await;
    c.cmd("QUIT", "221 2.0.0").await;
    assert!(c.closed().await);
    let text = c.metrics.encode();
    for line in [
        "kubemail_smtp_messages_accepted_total{listener=\"mx\"} 1\n",
        // Greeting, EHLO, MAIL, RCPT, 354 (3xx), queued, QUIT.
        "kubemail_smtp_replies_total{listener=\"mx\",class=\"2xx\"} 6\n",
        "kubemail_smtp_replies_total{listener=\"mx\",class=\"5xx\"} 1\n",
    ] {
        assert!(text.contains(line), "{line:?} in {text}");
    }
    assert!(
        !Metrics::new().encode().contains("messages_accepted_total{"),
        "a new context's metrics start empty"
    );
}

#[tokio::test]
async fn sequence_syntax_and_unknown_commands() {
    let mut c = connect(0).await;
    c.cmd("MAIL FROM:<a@remote.test>", "503 ").await;
    c.cmd("EHLO", "501 ").await;
    c.cmd("HELO client.test", "250 mx.example.test").await;
    c.cmd("RCPT TO:<bob@example.test>", "503 ").await;
    c.cmd("EHLO client.test", "250-").await;
    c.cmd("RCPT TO:<bob@example.test>", "503 5.5.1").await;
    c.cmd("DATA", "503 5.5.1").await;
    c.cmd("FOO", "500 5.5.1").await;
    c.cmd("VRFY bob", "252 2.5.0").await;
    c.cmd("NOOP", "250 2.0.0").await;
    c.cmd("HELP", "214 2.0.0").await;
    c.cmd("RSET", "250 2.0.0").await;
    c.cmd("MAIL FROM:<a@remote.test> BODY=8BITMIME", "250 2.1.0")
        .await;
    c.cmd("MAIL FROM:<a@remote.test>", "503 5.5.1").await;
    c.cmd("MAIL FROM:<a@remote.test> FOO=BAR", "555 5.5.4")
        .await;
}

#[tokio::test]
async fn too_many_errors_closes_with_421() {
    let mut c = connect(0).await;
    c.cmd("EHLO client.test", "250-").await;
    for _ in 0..9 {
        c.cmd("FOO", "500 5.5.1").await;
    }
    c.send(b"FOO\r\n").await;
    c.expect("500 5.5.1").await;
    c.expect("421 4.7.0").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn relay_attempts_are_refused_on_mx() {
    let mut c = connect(0).await;
    c.cmd("EHLO client.test", "250-").await;
    c.cmd("MAIL FROM:<>", "250 2.1.0").await;
    for rcpt in [
        "<relaytest@remote.test>",
        "<relaytest%remote.test@example.test>",
        "<remote.test!relaytest@example.test>",
        "<\"relaytest@remote.test\"@example.test>",
        "<@example.test:relaytest@remote.test>",
        "<relaytest@[192.0.2.1]>",
        "<relaytest%remote.test@other.test>",
    ] {
        let r = c.cmd(&format!("RCPT TO:{rcpt}"), "5").await;
        assert!(
            r.starts_with("554 5.7.1") || r.starts_with("501"),
            "{rcpt}: {r}"
        );
    }
    c.cmd("RCPT TO:<nobody@example.test>", "550 5.1.1").await;
    c.cmd("RCPT TO:<Postmaster>", "250 2.1.5").await;
    c.cmd("RCPT TO:<bob@example.test.>", "250 2.1.5").await;
}

#[tokio::test]
async fn limits_on_size_recipients_and_lines() {
    let mut c = connect(0).await;
    c.cmd("EHLO client.test", "250-").await;
    // Over every domain's limit at MAIL; over the recipient domain's limit at RCPT.
    c.cmd("MAIL FROM:<a@remote.test> SIZE=99999999", "552 5.3.4")
        .await;
    c.cmd("MAIL FROM:<a@remote.test> SIZE=4096", "250").await;
    c.cmd("RCPT TO:<bob@example.test>", "552 5.3.4").await;
    c.cmd("RSET", "250").await;
    c.cmd("MAIL FROM:<a@remote.test> SIZE=100", "250").await;
    c.cmd("RCPT TO:<bob@example.test>", "250").await;
    c.cmd("RCPT TO:<postmaster@example.test>", "250").await;
    c.cmd("RCPT TO:<x@other.test>", "250").await;
    c.cmd("RCPT TO:<y@other.test>", "452 4.5.3").await;
    c.cmd("DATA", "354").await;
    // The client lied about SIZE: 3000 octets against a 2048 limit.
    let big = format!("{}\r\n.\r\n", "x\r\n".repeat(1000));
    c.send(big.as_bytes()).await;
    c.expect("552 5.3.4").await;
    assert!(c.queue.entries().is_empty());
    c.cmd(&format!("NOOP {}", "a".repeat(600)), "500 5.5.2")
        .await;
    c.send(format!("{}\r\n", "A".repeat(20000)).as_bytes())
        .await;
    c.expect("500 5.5.2").await;
    c.cmd("NOOP", "250").await;
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    c.cmd("RCPT TO:<bob@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(format!("{}\r\n.\r\n", "l".repeat(999)).as_bytes())
        .await;
    c.expect("554 5.6.0").await;
}

#[tokio::test]
async fn bare_line_endings_are_refused_and_nothing_is_smuggled() {
    let vectors: [&[u8]; 11] = [
        b"\n.\n",
        b"\r.\r",
        b"\r.\n",
        b"\n.\r",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r.\r\n",
        b"\r\n.\r",
        b"\r\n\x00.\r\n",
        b"\r\n.\r\r\n",
        b"\r\r\n.\r\r\n",
    ];
    for ending in vectors {
        let mut c = connect(0).await;
        c.cmd("EHLO client.test", "250-").await;
        let mut input = b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nSubject: one\r\n\r\nbody".to_vec();
        input.extend_from_slice(ending);
        input.extend_from_slice(b"MAIL FROM:<smuggled@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n");
        c.send(&input).await;
        c.expect("250 2.1.0").await;
        c.expect("250 2.1.5").await;
        c.expect("354").await;
        let r = c.reply().await;
        let entries = c.queue.entries();
        if ending.contains(&0) {
            // NUL is no line ending: one message, with the "smuggled" text as body, refused
            // as a whole for its NUL (a NUL-dropping downstream would end it early).
            assert!(r.starts_with("554 5.6.0"), "{ending:?}: {r}");
            assert!(entries.is_empty(), "{ending:?}: nothing queued");
        } else {
            assert!(r.starts_with("550 5.6.0"), "{ending:?}: {r}");
            assert!(
                entries.is_empty(),
                "{ending:?}: nothing queued, got {}",
                entries.len()
            );
        }
        c.expect("221").await;
    }
}

#[tokio::test]
async fn normalize_listener_rewrites_bare_line_endings() {
    let mut c = connect(2).await;
    c.cmd("EHLO client.test", "250-").await;
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    c.cmd("RCPT TO:<bob@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b"a\nb\rc\n.\nd\r\n.\r\n").await;
    c.expect("250 2.0.0").await;
    let body = c.queue.entries()[0].body.clone();
    assert!(body.ends_with(b"\r\na\r\nb\r\nc\r\n.\r\nd\r\n"), "{body:?}");
}

#[tokio::test]
async fn bare_lf_in_a_command_is_refused() {
    let mut c = connect(0).await;
    c.send(b"EHLO client.test\n").await;
    // Before EHLO replies carry no enhanced status code.
    c.expect("500 Bare CR or LF").await;
    c.cmd("EHLO client.test", "250-").await;
}

#[tokio::test]
async fn pipelined_batch_and_byte_at_a_time_input() {
    let mut c = connect(0).await;
    c.send(b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\n").await;
    c.expect("250-").await;
    c.expect("250 2.1.0").await;
    c.expect("250 2.1.5").await;
    c.expect("550 5.1.1").await;
    c.expect("354").await;
    for b in b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n" {
        c.send(&[*b]).await;
    }
    c.expect("250 2.0.0").await;
    c.expect("221").await;
    assert_eq!(c.queue.entries().len(), 1);
}

#[tokio::test]
async fn bdat_chunks_are_consumed_even_when_refused() {
    let mut c = connect(0).await;
    c.cmd("EHLO client.test", "250-").await;
    c.send(b"BDAT 6\r\nRSET\r\n").await;
    c.expect("503 5.5.1").await;
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    c.cmd("RCPT TO:<bob@example.test>", "250").await;
    c.send(b"BDAT 10\r\nSubject: x").await;
    c.expect("250 2.0.0 10 octets").await;
    c.send(b"BDAT 13 LAST\r\n\r\n\r\n.\r\nbody\r\n").await;
    c.expect("250 2.0.0 Ok: queued").await;
    let body = c.queue.entries()[0].body.clone();
    assert!(
        body.ends_with(b"Subject: x\r\n\r\n.\r\nbody\r\n"),
        "{body:?}"
    );
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    c.cmd("RCPT TO:<bob@example.test>", "250").await;
    c.send(b"BDAT 6 LAST\r\nbare\nx").await;
    c.expect("550 5.6.0").await;
    c.cmd("BDAT 18446744073709551615 LAST", "552 5.3.4").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn queue_failures_map_to_4xx_never_250() {
    let mut c = connect(0).await;
    c.cmd("EHLO client.test", "250-").await;
    for (error, code) in [
        (EnqueueError::Unavailable("down".into()), "451 4.3.0"),
        (EnqueueError::Full("full".into()), "452 4.3.1"),
    ] {
        c.queue.fail_with(Some(error));
        c.cmd("MAIL FROM:<a@remote.test>", "250").await;
        c.cmd("RCPT TO:<bob@example.test>", "250").await;
        c.cmd("DATA", "354").await;
        c.send(b"hi\r\n.\r\n").await;
        c.expect(code).await;
    }
    c.queue.fail_with(None);
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
}

#[tokio::test]
async fn submission_requires_auth_and_own_sender_domain() {
    let mut c = connect(1).await;
    let ehlo = c.cmd("EHLO client.test", "250-").await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    c.cmd("MAIL FROM:<alice@example.test>", "530 5.7.0").await;
    // "\0alice@example.test\0wrong"
    c.cmd(
        "AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB3cm9uZw==",
        "535 5.7.8",
    )
    .await;
    c.cmd("AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    c.cmd("YWxpY2VAZXhhbXBsZS50ZXN0", "334 UGFzc3dvcmQ6").await;
    c.cmd("c2VjcmV0", "235 2.7.0").await;
    c.cmd(
        "AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ=",
        "503 5.5.1",
    )
    .await;
    c.cmd("MAIL FROM:<mallory@other.test>", "553 5.7.1").await;
    c.cmd("MAIL FROM:<alice@example.test>", "250 2.1.0").await;
    c.cmd("RCPT TO:<someone@far.away.test>", "250 2.1.5").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: out\r\n\r\nhi\r\n.\r\n").await;
    c.expect("250 2.0.0").await;
    let e = &c.queue.entries()[0];
    assert_eq!(e.entry.direction, Direction::Outbound);
    assert_eq!(e.entry.domain, "example.test");
    assert_eq!(e.entry.auth_user.as_deref(), Some("alice@example.test"));
    let body = String::from_utf8(e.body.to_vec()).unwrap();
    assert!(
        body.contains("\r\nMessage-ID: <"),
        "Message-ID added on submission: {body}"
    );
    assert!(body.contains("with ESMTPA"), "{body}");
}

#[tokio::test]
async fn repeated_auth_failures_disconnect() {
    let mut c = connect(1).await;
    c.cmd("EHLO client.test", "250-").await;
    c.cmd("AUTH PLAIN AGFsaWNlAHdyb25n", "535 5.7.8").await;
    c.cmd("AUTH PLAIN *", "501").await;
    c.cmd("AUTH PLAIN AGFsaWNlAHdyb25n", "535 5.7.8").await;
    c.send(b"AUTH PLAIN AGFsaWNlAHdyb25n\r\n").await;
    c.expect("535 5.7.8").await;
    c.expect("421 4.7.0").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn shutdown_answers_idle_sessions_with_421() {
    let mut c = connect(0).await;
    c.cmd("EHLO client.test", "250-").await;
    c.shutdown.stop();
    c.expect("421 4.3.0").await;
    assert!(c.closed().await);
    c.task.await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_an_open_transaction_finish() {
    let mut c = connect(0).await;
    c.cmd("EHLO client.test", "250-").await;
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    c.cmd("RCPT TO:<bob@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: x\r\n").await;
    c.shutdown.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.send(b"\r\nbody\r\n.\r\n").await;
    c.expect("250 2.0.0").await;
    c.expect("421 4.3.0").await;
    assert_eq!(c.queue.entries().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn idle_clients_time_out() {
    let mut c = connect(0).await;
    c.cmd("EHLO client.test", "250-").await;
    tokio::time::sleep(Duration::from_secs(31)).await;
    c.expect("421 4.4.2").await;
}

#[tokio::test]
async fn domains_without_an_inbound_target_refuse_recipients_at_rcpt() {
    let mut c = connect(0).await;
    c.cmd("EHLO client.test", "250-").await;
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    let r = c
        .cmd("RCPT TO:<postmaster@outbound-only.test>", "550 5.1.1")
        .await;
    assert!(r.contains("no inbound target"), "{r}");
    c.cmd("RCPT TO:<bob@example.test>", "250 2.1.5").await;
}

#[tokio::test]
async fn nul_bytes_are_refused_or_stripped_before_queueing() {
    for (listener, want) in [(0, "554 5.6.0"), (3, "250 2.0.0")] {
        let mut c = connect(listener).await;
        c.cmd("EHLO client.test", "250-").await;
        c.cmd("MAIL FROM:<a@remote.test>", "250").await;
        c.cmd("RCPT TO:<bob@example.test>", "250").await;
        c.cmd("DATA", "354").await;
        c.send(b"Subject: nul\r\n\r\nbefore\r\n\x00.\r\nafter\x00\r\n.\r\n")
            .await;
        c.expect(want).await;
        let entries = c.queue.entries();
        if listener == 0 {
            assert!(entries.is_empty());
        } else {
            let body = &entries[0].body;
            assert!(!body.contains(&0), "{body:?}");
            assert!(body.ends_with(b"\r\nbefore\r\n.\r\nafter\r\n"), "{body:?}");
        }
        // BDAT gets the same treatment.
        c.cmd("MAIL FROM:<a@remote.test>", "250").await;
        c.cmd("RCPT TO:<bob@example.test>", "250").await;
        c.send(b"BDAT 10 LAST\r\nx\r\n\x00.\r\ny\r\n").await;
        c.expect(want).await;
    }
}

#[tokio::test]
async fn junk_commands_end_the_session_until_a_message_goes_through() {
    let mut c = connect(0).await;
    c.cmd("EHLO client.test", "250-").await;
    // maxJunkCommands 5: NOOP, RSET, VRFY, HELP and a second EHLO are junk...
    c.cmd("NOOP", "250").await;
    c.cmd("RSET", "250").await;
    c.cmd("VRFY bob", "252").await;
    c.cmd("HELP", "214").await;
    c.cmd("EHLO client.test", "250-").await;
    // ...and a message resets the count.
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    c.cmd("RCPT TO:<bob@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n").await;
    c.expect("250 2.0.0").await;
    c.cmd("MAIL FROM:<a@remote.test>", "250").await;
    c.cmd("RCPT TO:<bob@example.test>", "250").await;
    // Duplicate recipients and recipients over the limit are junk too.
    c.cmd("RCPT TO:<bob@example.test>", "250 2.1.5").await;
    c.cmd("RCPT TO:<postmaster@example.test>", "250").await;
    c.cmd("RCPT TO:<x@other.test>", "250").await;
    c.cmd("RCPT TO:<y@other.test>", "452 4.5.3").await;
    c.cmd("NOOP", "250").await;
    c.cmd("NOOP", "250").await;
    c.cmd("NOOP", "250").await;
    c.cmd("NOOP", "421 4.7.0").await;
    assert!(c.closed().await);
}

/// Logs in as `user` (password `secret`) on the submission listener.
async fn submit_as(user: &str) -> Client {
    use base64::Engine as _;
    let mut c = connect(1).await;
    c.cmd("EHLO client.test", "250-").await;
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0secret"));
    c.cmd(&format!("AUTH PLAIN {plain}"), "235").await;
    c
}

#[tokio::test]
async fn submitted_from_headers_must_be_addresses_the_user_may_send_as() {
    let mut c = submit_as("alice@example.test").await;
    for (from, want) in [
        ("From: Alice <alice@example.test>", "250 2.0.0"),
        ("From: CEO <ceo@other.test>", "550 5.7.1"),
        ("From: a@example.test, b@other.test", "550 5.7.1"),
        ("From: Evil <a@other.test> <a@example.test>", "550 5.7.1"),
        ("Subject: no From at all", "250 2.0.0"),
    ] {
        c.cmd("MAIL FROM:<alice@example.test>", "250").await;
        c.cmd("RCPT TO:<far@away.test>", "250").await;
        c.cmd("DATA", "354").await;
        c.send(format!("{from}\r\nTo: far@away.test\r\n\r\nhi\r\n.\r\n").as_bytes())
            .await;
        let r = c.expect(want).await;
        if want.starts_with("550") {
            assert!(r.contains("From: header"), "{r}");
        }
    }
    assert_eq!(c.queue.entries().len(), 2);
    // carol has a list: her own address and a list domain, nothing else of example.test.
    let mut c = submit_as("carol@example.test").await;
    c.cmd("MAIL FROM:<alice@example.test>", "553 5.7.1").await;
    c.cmd("MAIL FROM:<news@lists.example.test>", "250").await;
    c.cmd("RCPT TO:<far@away.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b"From: news@lists.example.test\r\n\r\nhi\r\n.\r\n")
        .await;
    c.expect("250 2.0.0").await;
    c.cmd("MAIL FROM:<carol@example.test>", "250").await;
    c.cmd("RCPT TO:<far@away.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b"From: alice@example.test\r\n\r\nhi\r\n.\r\n").await;
    c.expect("550 5.7.1").await;
}

#[tokio::test]
async fn forged_authentication_results_are_removed_from_submissions_too() {
    let mut c = submit_as("alice@example.test").await;
    c.cmd("MAIL FROM:<alice@example.test>", "250").await;
    // A local recipient: the message never passes the MX checks.
    c.cmd("RCPT TO:<bob@example.test>", "250").await;
    c.cmd("DATA", "354").await;
    c.send(b"Authentication-Results: (x) mx.example.test; dmarc=pass\r\nAuthentication-Results:\r\n mx.example.test; spf=pass\r\nAuthentication-Results: other.test; spf=fail\r\nFrom: alice@example.test\r\n\r\nhi\r\n.\r\n").await;
    c.expect("250 2.0.0").await;
    let body = String::from_utf8(c.queue.entries()[0].body.to_vec()).unwrap();
    assert!(!body.contains("mx.example.test; "), "{body}");
    assert!(
        body.contains("Authentication-Results: other.test; spf=fail\r\n"),
        "{body}"
    );
}

/// Two sessions of one node with a 2 MiB message memory budget (1 MiB messages).
async fn two_clients_sharing_a_small_memory_budget() -> (Client, Client) {
    let yaml = r#"
hostname: mx.example.test
listeners:
  - { name: mx, kind: mx, address: "127.0.0.1:25" }
domains:
  - name: example.test
    recipients: [bob]
    limits: { maxMessageSize: 1Mi }
    inbound: { host: 127.0.0.1, port: 24 }
limits: { messageBytesInMemory: 2Mi, memoryWait: 300ms }
timeouts: { dataBlock: 20s, dataInit: 20s }
"#;
    let config = NodeConfig::from_yaml(yaml).unwrap();
    config.validate().unwrap();
    let auth = Arc::new(Authenticator::load(&config).unwrap());
    let queue = Arc::new(MemoryQueue::new());
    let shutdown = Shutdown::new();
    let listener = Arc::new(config.listeners[0].clone());
    let ctx = ServerContext::new(
        Arc::new(config),
        None,
        auth,
        queue.clone(),
        shutdown.clone(),
        Metrics::new(),
    );
    let mut clients = Vec::new();
    for id in 1..=2 {
        let (client, server) = tokio::io::duplex(1 << 16);
        let conn = ConnectionInfo {
            session_id: id,
            remote: SocketAddr::from(([192, 0, 2, 7], 40000 + id as u16)),
            local: SocketAddr::from(([127, 0, 0, 1], 25)),
            listener: listener.clone(),
        };
        let task = tokio::spawn(super::serve(PrefixedStream::new(server), conn, ctx.clone()));
        let mut c = Client {
            io: client,
            buf: Vec::new(),
            queue: queue.clone(),
            shutdown: shutdown.clone(),
            metrics: ctx.metrics.clone(),
            task,
            _dir: tempfile::tempdir().unwrap(),
        };
        c.expect("220").await;
        c.cmd("EHLO client.test", "250-").await;
        c.cmd("MAIL FROM:<a@remote.test>", "250").await;
        c.cmd("RCPT TO:<bob@example.test>", "250").await;
        clients.push(c);
    }
    let b = clients.pop().unwrap();
    let a = clients.pop().unwrap();
    (a, b)
}

/// `n` octets of message text in 100-octet lines.
fn lines(n: usize) -> Vec<u8> {
    let line = format!("{}\r\n", "m".repeat(98));
    line.repeat(n / 100).into_bytes()
}

#[tokio::test]
async fn past_the_memory_budget_a_message_waits_then_gets_452_and_the_session_stays_in_step() {
    let (mut a, mut b) = two_clients_sharing_a_small_memory_budget().await;
    a.cmd("DATA", "354").await;
    a.send(b"Subject: a\r\n\r\n").await;
    a.send(&lines(900_000)).await;
    // A holds about 1 MiB of the 2 (its buffer grew while the pipe drained); B's message
    // needs more than the rest while it grows.
    b.cmd("DATA", "354").await;
    b.send(b"Subject: b\r\n\r\n").await;
    b.send(&lines(900_000)).await;
    b.send(b".\r\n").await;
    b.expect("452 4.3.1").await;
    a.send(b".\r\n").await;
    a.expect("250 2.0.0").await;
    // A's memory is back: B's retry (in the same session, which stayed in step) goes through.
    b.cmd("MAIL FROM:<a@remote.test>", "250").await;
    b.cmd("RCPT TO:<bob@example.test>", "250").await;
    b.cmd("DATA", "354").await;
    b.send(b"Subject: b\r\n\r\n").await;
    b.send(&lines(900_000)).await;
    b.send(b".\r\n").await;
    b.expect("250 2.0.0").await;
    let entries = a.queue.entries();
    assert_eq!(entries.len(), 2);
    assert!(entries.iter().all(|e| e.body.len() > 900_000));
}

#[tokio::test]
async fn a_bdat_chunk_without_room_is_refused_with_452() {
    let (mut a, mut b) = two_clients_sharing_a_small_memory_budget().await;
    let big = lines(1_040_000);
    a.send(format!("BDAT {}\r\n", big.len()).as_bytes()).await;
    a.send(&big).await;
    a.expect("250 2.0.0").await;
    // The node's gauge shows what A's chunk holds of the budget.
    let held = a.metrics.message_memory_bytes.get();
    assert!(held >= big.len() as i64, "{held} bytes held");
    let first = lines(600_000);
    b.send(format!("BDAT {}\r\n", first.len()).as_bytes()).await;
    b.send(&first).await;
    b.expect("250 2.0.0").await;
    // B's message grows past what A leaves free: the chunk is read and refused.
    let second = lines(400_000);
    b.send(format!("BDAT {} LAST\r\n", second.len()).as_bytes())
        .await;
    b.send(&second).await;
    b.expect("452 4.3.1").await;
    b.cmd("NOOP", "250").await;
    a.cmd("BDAT 0 LAST", "250 2.0.0 Ok: queued").await;
    assert_eq!(a.queue.entries().len(), 1);
}

/// Every idle connection holds the future that serves it, sized by the largest state of
/// everything it awaits inline; a wait added without a box (a NATS lookup, the TLS
/// handshake) made it 10 KiB and the idle-connection row of `make bench` 14 KiB per
/// connection. The bound leaves room for the session itself, not for another inline wait.
#[tokio::test]
async fn the_future_of_a_plaintext_session_stays_small() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    std::fs::write(&users, "").unwrap();
    let yaml = CONFIG.replace("USERS", &users.display().to_string());
    let config = NodeConfig::from_yaml(&yaml).unwrap();
    let auth = Arc::new(Authenticator::load(&config).unwrap());
    let listener = Arc::new(config.listeners[0].clone());
    let ctx = ServerContext::new(
        Arc::new(config),
        None,
        auth,
        Arc::new(MemoryQueue::new()),
        Shutdown::new(),
        Metrics::new(),
    );
    let (_client, server) = tokio::io::duplex(16);
    let conn = ConnectionInfo {
        session_id: 1,
        remote: SocketAddr::from(([192, 0, 2, 7], 40000)),
        local: SocketAddr::from(([127, 0, 0, 1], 25)),
        listener,
    };
    let serving = super::serve(PrefixedStream::new(server), conn, ctx);
    let size = std::mem::size_of_val(&serving);
    assert!(
        size <= 3 * 1024,
        "the future that serves a plaintext connection is {size} octets"
    );
}
