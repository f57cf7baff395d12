//! SMTP smuggling: only `<CRLF>.<CRLF>` ends DATA, however the bytes are split
//! across TCP reads. For every malformed end-of-data followed by a complete second
//! transaction from `smuggled@`, at most the one legitimate message may reach the stream, and
//! never one from `smuggled@`.

mod common;

use std::time::Duration;

use common::*;

/// The end-of-data variants of hannob/smtpsmug and the SEC Consult scanner.
const VECTORS: [&[u8]; 11] = [
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

fn attack(ending: &[u8]) -> Vec<u8> {
    let mut input = b"MAIL FROM:<legit@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nSubject: legit\r\n\r\nbody".to_vec();
    input.extend_from_slice(ending);
    input.extend_from_slice(
        b"MAIL FROM:<smuggled@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\nQUIT\r\n",
    );
    input
}

/// Sends `input` in pieces split at `splits`, reading all replies until the server closes.
async fn converse(addr: std::net::SocketAddr, input: &[u8], splits: &[usize]) -> Vec<String> {
    let mut c = RawTcp::connect(addr).await;
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    let mut from = 0;
    for &at in splits.iter().chain(std::iter::once(&input.len())) {
        c.send(&input[from..at]).await;
        // Give the server a chance to read this piece on its own.
        tokio::time::sleep(Duration::from_millis(2)).await;
        from = at;
    }
    let mut replies = Vec::new();
    while let Some(r) = c.try_reply(Duration::from_secs(20)).await {
        let done = r.starts_with("221");
        replies.push(r);
        if done {
            break;
        }
    }
    replies
}

fn queued(replies: &[String]) -> usize {
    replies.iter().filter(|r| r.contains("queued as")).count()
}

#[tokio::test]
async fn malformed_end_of_data_never_smuggles_a_second_message() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    for ending in VECTORS {
        let input = attack(ending);
        // One write, then split into two writes at every offset of the interesting region
        // (the malformed ending and the start of the second transaction).
        let body_at = input.windows(4).position(|w| w == b"body").unwrap() + 4;
        let mut splits: Vec<Vec<usize>> = vec![vec![]];
        for at in body_at.saturating_sub(2)..(body_at + ending.len() + 12).min(input.len()) {
            splits.push(vec![at]);
        }
        for split in splits {
            for addr in [node.ports.mx, node.ports.mx_normalize] {
                let replies = converse(addr, &input, &split).await;
                assert!(
                    queued(&replies) <= 1,
                    "{ending:?} split {split:?}: {replies:?}"
                );
                if addr == node.ports.mx && !ending.contains(&0) {
                    assert_eq!(
                        queued(&replies),
                        0,
                        "reject mode refuses {ending:?}: {replies:?}"
                    );
                    assert!(
                        replies.iter().any(|r| r.starts_with("550 5.6.0")),
                        "{ending:?}: {replies:?}"
                    );
                }
            }
        }
    }
    let entries = node.messages().await;
    for e in &entries {
        assert_eq!(e.header("Kubemail-Mail-From"), Some("<legit@remote.test>"));
    }
    // Reject mode queued only the NUL case (NUL is content); normalize mode queued each
    // vector once as one message whose body contains the "smuggled" text.
    assert!(!entries.is_empty());
}

#[tokio::test]
async fn byte_at_a_time_input_is_one_message() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    let input = b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nSubject: bytes\r\n\r\n..dotted\r\n.\r\nQUIT\r\n";
    let mut c = RawTcp::connect(node.ports.mx).await;
    c.expect("220").await;
    for b in input {
        c.send(&[*b]).await;
    }
    c.expect("250-mx.example.test").await;
    c.expect("250 2.1.0").await;
    c.expect("250 2.1.5").await;
    c.expect("354").await;
    c.expect("250 2.0.0").await;
    c.expect("221").await;
    let entries = node.messages().await;
    assert_eq!(entries.len(), 1);
    assert!(
        entries[0]
            .body_str()
            .ends_with("\r\nSubject: bytes\r\n\r\n.dotted\r\n")
    );
}

#[tokio::test]
async fn bare_lf_in_data_is_refused_with_5xx_and_nothing_queued() {
    let nats = Nats::shared();
    let node = Node::start(&nats.url());
    // swaks --no-data-fixup sends the DATA bytes exactly as given.
    let out = swaks(&[
        "--server",
        &node.ports.mx.to_string(),
        "--from",
        "a@remote.test",
        "--to",
        "bob@example.test",
        "--no-data-fixup",
        "--data",
        "Subject: bare\nline with bare LF\n\r\n.\r\n",
    ]);
    let replies = swaks_replies(&out);
    assert!(replies.iter().any(|r| r.starts_with("550 5.6.0")), "{out}");
    assert!(node.messages().await.is_empty());
}
