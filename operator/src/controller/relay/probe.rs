//! The Relay reachability probe: connect, read the greeting, `EHLO`, look for `STARTTLS`, and
//! (when TLS is required) check that `STARTTLS` is accepted with `220`; then `QUIT`. Every
//! step has the probe's deadline. The TLS handshake itself is not performed (the operator
//! holds no trust store for arbitrary relays), and for `Implicit` TLS only the TCP connect is
//! checked; the node's delivery client verifies certificates when it sends.
//!
//! The wire syntax is the node's own, from `kubemail-smtp-protocol`: the same reply parser
//! (bounded in line length, line count and size, so a hostile relay cannot make the operator
//! buffer without end) and the same EHLO capability parser as the delivery client, so the probe
//! and the node never disagree on whether a relay offers STARTTLS.

use std::time::Duration;

use kubemail_smtp_protocol::Reply;
use kubemail_smtp_protocol::client::{Capabilities, ClientCommand, parse_reply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::crd::relay::RelayTls;

/// Size of one read from the socket.
const READ_CHUNK: usize = 4096;

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    pub reachable: bool,
    pub starttls: bool,
    pub message: String,
}

/// Probes `host:port` within `timeout`.
pub async fn probe(
    host: &str,
    port: u16,
    tls: RelayTls,
    ehlo_name: &str,
    timeout: Duration,
) -> ProbeOutcome {
    match tokio::time::timeout(timeout, probe_inner(host, port, tls, ehlo_name)).await {
        Ok(outcome) => outcome,
        Err(_) => ProbeOutcome {
            reachable: false,
            starttls: false,
            message: format!("{host}:{port} did not answer within {}s", timeout.as_secs()),
        },
    }
}

async fn probe_inner(host: &str, port: u16, tls: RelayTls, ehlo_name: &str) -> ProbeOutcome {
    let fail = |message: String| ProbeOutcome {
        reachable: false,
        starttls: false,
        message,
    };
    let stream = match TcpStream::connect((host, port)).await {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot connect to {host}:{port}: {e}")),
    };
    if tls == RelayTls::Implicit {
        return ProbeOutcome {
            reachable: true,
            starttls: false,
            message: format!(
                "TCP connection to {host}:{port} succeeded (implicit TLS; the handshake is not checked)"
            ),
        };
    }
    let (mut read, mut write) = stream.into_split();
    let mut buf = Vec::new();
    match read_reply(&mut read, &mut buf).await {
        Ok(reply) if reply.code == 220 => {}
        Ok(reply) => return fail(format!("{host}:{port} greeted with {reply}")),
        Err(e) => return fail(format!("no SMTP greeting from {host}:{port}: {e}")),
    }
    let ehlo = match ClientCommand::Ehlo(ehlo_name).to_bytes() {
        Ok(line) => line,
        Err(e) => return fail(format!("cannot send EHLO to {host}:{port}: {e}")),
    };
    if let Err(e) = write.write_all(&ehlo).await {
        return fail(format!("cannot send EHLO to {host}:{port}: {e}"));
    }
    let capabilities = match read_reply(&mut read, &mut buf).await {
        Ok(reply) if reply.code == 250 => Capabilities::parse(&reply),
        Ok(reply) => return fail(format!("{host}:{port} answered EHLO with {reply}")),
        Err(e) => return fail(format!("no EHLO reply from {host}:{port}: {e}")),
    };
    let starttls = capabilities.starttls;
    let outcome = if tls == RelayTls::StartTlsRequired {
        if !starttls {
            ProbeOutcome {
                reachable: false,
                starttls,
                message: format!(
                    "{host}:{port} does not offer STARTTLS, which tls: StartTlsRequired needs"
                ),
            }
        } else {
            let _ = write.write_all(&command(&ClientCommand::StartTls)).await;
            match read_reply(&mut read, &mut buf).await {
                Ok(reply) if reply.code == 220 => ProbeOutcome {
                    reachable: true,
                    starttls,
                    message: format!("{host}:{port} answered EHLO and accepted STARTTLS"),
                },
                Ok(reply) => ProbeOutcome {
                    reachable: false,
                    starttls,
                    message: format!("{host}:{port} refused STARTTLS: {reply}"),
                },
                Err(e) => fail(format!("no STARTTLS reply from {host}:{port}: {e}")),
            }
        }
    } else {
        ProbeOutcome {
            reachable: true,
            starttls,
            message: format!(
                "{host}:{port} answered EHLO ({})",
                if starttls {
                    "STARTTLS offered"
                } else {
                    "no STARTTLS"
                }
            ),
        }
    };
    // After an accepted STARTTLS the server waits for a TLS ClientHello; closing is fine.
    if !(outcome.reachable && tls == RelayTls::StartTlsRequired) {
        let _ = write.write_all(&command(&ClientCommand::Quit)).await;
    }
    outcome
}

/// Reads one (possibly multi-line) reply. `buf` holds bytes read but not yet used, and keeps
/// whatever follows the reply. The parser bounds the buffer, and the caller the time.
/// `smoke-send` (crate::smoke) reads its replies with it too.
pub(crate) async fn read_reply<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Reply, String> {
    loop {
        match parse_reply(buf) {
            Ok(Some((reply, used))) => {
                buf.drain(..used);
                return Ok(reply);
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        let mut chunk = [0u8; READ_CHUNK];
        let n = reader.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".to_owned());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A command without arguments as a line; these cannot fail to encode.
fn command(command: &ClientCommand<'_>) -> Vec<u8> {
    command.to_bytes().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    async fn fake_server(script: &'static [&'static str], offer_starttls: bool) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"220 relay.test ESMTP\r\n").await.unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).await.unwrap();
            let ehlo: &[u8] = if offer_starttls {
                b"250-relay.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
            } else {
                b"250-relay.test\r\n250 PIPELINING\r\n"
            };
            s.write_all(ehlo).await.unwrap();
            for reply in script {
                let _ = s.read(&mut buf).await.unwrap();
                s.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        port
    }

    #[tokio::test]
    async fn starttls_required_and_offered_is_reachable() {
        let port = fake_server(&["220 go ahead\r\n"], true).await;
        let o = probe(
            "127.0.0.1",
            port,
            RelayTls::StartTlsRequired,
            "op.test",
            Duration::from_secs(5),
        )
        .await;
        assert!(o.reachable && o.starttls, "{o:?}");
    }

    #[tokio::test]
    async fn starttls_required_but_missing_is_unreachable() {
        let port = fake_server(&["221 bye\r\n"], false).await;
        let o = probe(
            "127.0.0.1",
            port,
            RelayTls::StartTlsRequired,
            "op.test",
            Duration::from_secs(5),
        )
        .await;
        assert!(!o.reachable && !o.starttls, "{o:?}");
        assert!(o.message.contains("does not offer STARTTLS"), "{o:?}");
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        // Below the ephemeral range: no outgoing connection (not even this one, as a TCP
        // self-connect) can be using it.
        let port = kubemail_test_support::ports::free_port();
        let o = probe(
            "127.0.0.1",
            port,
            RelayTls::Opportunistic,
            "op.test",
            Duration::from_secs(5),
        )
        .await;
        assert!(!o.reachable, "{o:?}");
        assert!(o.message.contains("cannot connect"), "{o:?}");
    }

    /// A relay that greets with `greeting` and then holds the connection open.
    async fn greeting_server(greeting: Vec<u8>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = s.write_all(&greeting).await;
            let mut buf = [0u8; 512];
            // Hold the connection until the probe closes it.
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        port
    }

    #[tokio::test]
    async fn hostile_greetings_fail_fast_instead_of_waiting_for_the_deadline() {
        let endless_line = [&b"220 "[..], &[b'x'; 8192]].concat();
        let mixed = b"220-relay.test\r\n554 no\r\n".to_vec();
        let refused = b"554 5.7.1 go away\r\n".to_vec();
        for (greeting, want) in [
            (endless_line, "reply line longer than"),
            (mixed, "different codes"),
            (refused, "greeted with 554 5.7.1 go away"),
        ] {
            let port = greeting_server(greeting).await;
            let started = std::time::Instant::now();
            let o = probe(
                "127.0.0.1",
                port,
                RelayTls::Opportunistic,
                "op.test",
                Duration::from_secs(30),
            )
            .await;
            assert!(!o.reachable, "{o:?}");
            assert!(o.message.contains(want), "{want}: {o:?}");
            assert!(started.elapsed() < Duration::from_secs(10), "{o:?}");
        }
    }

    #[tokio::test]
    async fn starttls_is_found_the_way_the_delivery_client_finds_it() {
        // Lower case and a multi-line reply split across reads: still offered.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"220 relay.test ESMTP\r\n").await.unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"250-relay.test\r\n250-start").await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.write_all(b"tls\r\n250 SIZE 100\r\n").await.unwrap();
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        let o = probe(
            "127.0.0.1",
            port,
            RelayTls::Opportunistic,
            "op.test",
            Duration::from_secs(5),
        )
        .await;
        assert!(o.reachable && o.starttls, "{o:?}");
        assert!(o.message.contains("STARTTLS offered"), "{o:?}");
    }
}
