//! STARTTLS and implicit TLS: no command injection across STARTTLS, state reset after it,
//! AUTH only inside TLS on submission, TLS 1.2+ only, certificates reloaded from disk.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;

const TLS_ANY: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

#[tokio::test]
async fn starttls_injection_gets_no_reply() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    for (port, injected) in [
        (node.ports.mx, "RSET\r\n"),
        (node.ports.submission, "MAIL FROM:<x@remote.test>\r\n"),
    ] {
        let mut c = RawTcp::connect(port).await;
        c.expect("220").await;
        let ehlo = c.cmd("EHLO client.test", "250-").await;
        assert!(ehlo.contains("STARTTLS"), "{ehlo}");
        // The command and the injected one in one TCP write.
        c.send(format!("STARTTLS\r\n{injected}").as_bytes()).await;
        c.expect("220 2.0.0").await;
        let (tcp, buffered) = c.into_inner();
        assert!(buffered.is_empty(), "nothing after the 220: {buffered:?}");
        let tls = tls_connect(tcp, TLS_ANY).await.expect("handshake");
        let mut c = Raw::new(tls);
        // A fresh session: MAIL needs a new EHLO; the first reply is to our command, not to
        // the injected one.
        c.cmd("MAIL FROM:<a@remote.test>", "503").await;
        let ehlo = c.cmd("EHLO client.test", "250-mx.example.test").await;
        assert!(!ehlo.contains("STARTTLS"), "no STARTTLS inside TLS: {ehlo}");
        c.cmd("STARTTLS", "503 5.5.1").await;
        c.cmd("QUIT", "221").await;
    }
}

#[tokio::test]
async fn tls_handshake_bytes_sent_with_starttls_still_work() {
    // A client that sends its ClientHello in the same write as STARTTLS, without waiting for
    // the 220 (TLS-INJ-02): the ClientHello must reach TLS, not be dropped as injected text.
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    let mut c = RawTcp::connect(node.ports.mx).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    let (tcp, _) = c.into_inner();
    let eager = EagerStartTls {
        inner: tcp,
        prefix: Some(b"STARTTLS\r\n".to_vec()),
        skipping_reply: true,
    };
    let tls = tls_connect(eager, TLS_ANY).await.expect("handshake");
    let mut c = Raw::new(tls);
    c.cmd("EHLO client.test", "250-").await;
    let reply = send_message(
        &mut c,
        "a@remote.test",
        "bob@example.test",
        b"Subject: tls\r\n\r\nx",
    )
    .await;
    assert!(reply.starts_with("250 2.0.0"), "{reply}");
    let body = node.messages().await[0].body_str();
    assert!(body.contains("with ESMTPS id"), "{body}");
    assert!(body.contains("(using TLSv1.3 with cipher TLS13_"), "{body}");
}

/// Writes `STARTTLS\r\n` in front of the first TLS write (the ClientHello) and hides the
/// server's `220` line from the TLS reader.
struct EagerStartTls {
    inner: tokio::net::TcpStream,
    prefix: Option<Vec<u8>>,
    skipping_reply: bool,
}

impl tokio::io::AsyncWrite for EagerStartTls {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Some(prefix) = self.prefix.take() {
            let mut all = prefix;
            all.extend_from_slice(buf);
            // Loopback takes a small write whole; the test asserts that below.
            let n = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_write(cx, &all))?;
            assert_eq!(n, all.len(), "one write");
            return std::task::Poll::Ready(Ok(buf.len()));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tokio::io::AsyncRead for EagerStartTls {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        while self.skipping_reply {
            // Read the 220 line one byte at a time so no TLS byte is swallowed.
            let mut byte = [0u8; 1];
            let mut one = tokio::io::ReadBuf::new(&mut byte);
            std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_read(cx, &mut one))?;
            match one.filled() {
                [] => return std::task::Poll::Ready(Ok(())),
                [b'\n'] => self.skipping_reply = false,
                _ => {}
            }
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

#[tokio::test]
async fn submission_needs_tls_before_auth_and_mail() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    let steps = smtplib(
        node.ports.submission,
        "plain",
        json!([
            ["ehlo", "client.test"],
            ["cmd", "AUTH PLAIN AGFsaWNlQGV4YW1wbGUudGVzdAB3b25kZXJsYW5k"],
            ["mail", "alice@example.test"],
            ["quit"],
        ]),
    );
    assert_codes(&steps, &["250", "530 5.7.0", "530 5.7.0", "221"]);
    assert!(
        !steps[0].msg.contains("AUTH"),
        "no AUTH before TLS: {}",
        steps[0].msg
    );

    let steps = smtplib(
        node.ports.submission,
        "starttls",
        json!([
            ["ehlo", "client.test"],
            ["mail", "alice@example.test"],
            ["login", USER, PASSWORD],
            ["mail", "alice@example.test"],
            ["rcpt", "carol@far.away.test"],
            ["data", "Subject: submitted\r\n\r\nhello\r\n"],
            ["quit"],
        ]),
    );
    assert_codes(
        &steps,
        &[
            "250",
            "530 5.7.0",
            "235 2.7.0",
            "250 2.1.0",
            "250 2.1.5",
            "250 2.0.0",
            "221",
        ],
    );
    assert!(
        steps[0].msg.contains("AUTH PLAIN LOGIN"),
        "{}",
        steps[0].msg
    );
    let entries = node.messages().await;
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(e.header("Kubemail-Direction"), Some("outbound"));
    assert_eq!(e.header("Kubemail-Auth-User"), Some(USER));
    assert_eq!(e.subject, format!("{}.example.test", node.subject_prefix));
    let body = e.body_str();
    assert!(body.contains("with ESMTPSA id"), "{body}");
    assert!(
        body.contains("\r\nMessage-ID: <"),
        "Message-ID added: {body}"
    );
    assert!(
        e.header("Kubemail-Message-Id")
            .is_some_and(|id| id.ends_with("@mx.example.test>"))
    );
}

#[tokio::test]
async fn implicit_tls_with_swaks_and_smtplib() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    let out = swaks(&[
        "--server",
        &node.ports.implicit_tls.to_string(),
        "--tls-on-connect",
        "--auth",
        "LOGIN",
        "--auth-user",
        USER,
        "--auth-password",
        PASSWORD,
        "--from",
        USER,
        "--to",
        "someone@remote.test",
    ]);
    let replies = swaks_replies(&out);
    assert!(replies.iter().any(|r| r.starts_with("235 2.7.0")), "{out}");
    assert!(
        replies
            .iter()
            .any(|r| r.starts_with("250 2.0.0 Ok: queued")),
        "{out}"
    );

    let steps = smtplib(
        node.ports.implicit_tls,
        "ssl",
        json!([
            ["ehlo", "client.test"],
            ["auth", "PLAIN", USER, PASSWORD],
            [
                "send",
                USER,
                ["x@remote.test", "y@remote.test"],
                "Subject: 465\r\n\r\nhi\r\n"
            ],
            ["quit"],
        ]),
    );
    assert_codes(&steps, &["250", "235 2.7.0", "250", "221"]);
    assert_eq!(node.messages().await.len(), 2);

    // Plaintext SMTP on the implicit-TLS port gets no greeting in clear (RFC 8314 3.3).
    let mut c = RawTcp::connect(node.ports.implicit_tls).await;
    c.send(b"EHLO client.test\r\n").await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut c.io, &mut buf),
    )
    .await
    .expect("closed quickly")
    .unwrap_or(0);
    assert!(!buf[..n].starts_with(b"220"), "{:?}", &buf[..n]);
}

#[tokio::test]
async fn swaks_starttls_submission_with_pipelining() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    let out = swaks(&[
        "--server",
        &node.ports.submission.to_string(),
        "--tls",
        "--pipeline",
        "--auth",
        "PLAIN",
        "--auth-user",
        USER,
        "--auth-password",
        PASSWORD,
        "--from",
        USER,
        "--to",
        "someone@remote.test",
    ]);
    let replies = swaks_replies(&out);
    assert!(replies.iter().any(|r| r.starts_with("220 2.0.0")), "{out}");
    assert!(replies.iter().any(|r| r.starts_with("235 2.7.0")), "{out}");
    assert!(
        replies
            .iter()
            .any(|r| r.starts_with("250 2.0.0 Ok: queued")),
        "{out}"
    );
}

#[tokio::test]
async fn only_tls_1_2_and_newer() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    // TLS 1.2 works.
    let tcp = tokio::net::TcpStream::connect(node.ports.implicit_tls)
        .await
        .unwrap();
    let tls = tls_connect(tcp, &[&rustls::version::TLS12])
        .await
        .expect("TLS 1.2");
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    // TLS 1.1 and 1.0 are refused (checked with OpenSSL through Python, which can still offer them).
    let python = require_tool("python3");
    let script = r#"
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
ctx.minimum_version = ssl.TLSVersion.TLSv1
ctx.maximum_version = ssl.TLSVersion.TLSv1_1
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10) as s:
        with ctx.wrap_socket(s) as t:
            print("NEGOTIATED", t.version())
except (ssl.SSLError, ConnectionResetError, OSError) as e:
    print("REFUSED", e)
"#;
    let out = std::process::Command::new(python)
        .args(["-c", script, &node.ports.implicit_tls.port().to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("REFUSED"), "{text}");
}

#[tokio::test]
async fn certificate_files_are_reloaded_without_restart() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    let fresh = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let fresh_pem = fresh.cert.pem();
    let trust_fresh = {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls_pki_types::CertificateDer::from_pem_slice(fresh_pem.as_bytes()).unwrap())
            .unwrap();
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    };
    let handshake = |config: Arc<rustls::ClientConfig>| async move {
        let tcp = tokio::net::TcpStream::connect(node.ports.implicit_tls)
            .await
            .unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .is_ok()
    };
    assert!(
        !handshake(trust_fresh.clone()).await,
        "new cert not in use yet"
    );
    // Write the key first, then the certificate, as a Secret update would (atomically each).
    let dir = node.dir.path();
    std::fs::write(
        dir.join("dev-key.pem.tmp"),
        fresh.signing_key.serialize_pem(),
    )
    .unwrap();
    std::fs::write(dir.join("dev-cert.pem.tmp"), &fresh_pem).unwrap();
    std::fs::rename(dir.join("dev-key.pem.tmp"), dir.join("dev-key.pem")).unwrap();
    std::fs::rename(dir.join("dev-cert.pem.tmp"), dir.join("dev-cert.pem")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !handshake(trust_fresh.clone()).await {
        assert!(
            std::time::Instant::now() < deadline,
            "certificate not reloaded:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
