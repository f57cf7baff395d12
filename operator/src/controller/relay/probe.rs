//! The Relay reachability probe: connect, read the greeting, `EHLO`, look for `STARTTLS`, and
//! (when TLS is required) check that `STARTTLS` is accepted with `220`; then `QUIT`. Every
//! step has the probe's deadline. The TLS handshake itself is not performed (the operator
//! holds no trust store for arbitrary relays), and for `Implicit` TLS only the TCP connect is
//! checked; the node's delivery client verifies certificates when it sends.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::crd::relay::RelayTls;

/// RFC 5321 4.5.3.1.5: a reply line is at most 512 octets; allow slack for odd servers.
const MAX_REPLY_LINE: usize = 2048;
/// More continuation lines than any real EHLO reply has.
const MAX_REPLY_LINES: usize = 64;

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
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    match read_reply(&mut reader).await {
        Ok((220, _)) => {}
        Ok((code, text)) => return fail(format!("{host}:{port} greeted with {code} {text}")),
        Err(e) => return fail(format!("no SMTP greeting from {host}:{port}: {e}")),
    }
    if let Err(e) = write
        .write_all(format!("EHLO {ehlo_name}\r\n").as_bytes())
        .await
    {
        return fail(format!("cannot send EHLO to {host}:{port}: {e}"));
    }
    let capabilities = match read_reply(&mut reader).await {
        Ok((250, lines)) => lines,
        Ok((code, text)) => return fail(format!("{host}:{port} answered EHLO with {code} {text}")),
        Err(e) => return fail(format!("no EHLO reply from {host}:{port}: {e}")),
    };
    let starttls = capabilities
        .split('\n')
        .any(|l| l.trim().eq_ignore_ascii_case("STARTTLS"));
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
            let _ = write.write_all(b"STARTTLS\r\n").await;
            match read_reply(&mut reader).await {
                Ok((220, _)) => ProbeOutcome {
                    reachable: true,
                    starttls,
                    message: format!("{host}:{port} answered EHLO and accepted STARTTLS"),
                },
                Ok((code, text)) => ProbeOutcome {
                    reachable: false,
                    starttls,
                    message: format!("{host}:{port} refused STARTTLS: {code} {text}"),
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
        let _ = write.write_all(b"QUIT\r\n").await;
    }
    outcome
}

/// Reads one (possibly multi-line) reply: its code and its text lines joined by `\n`.
async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
) -> Result<(u16, String), String> {
    let mut text = Vec::new();
    for _ in 0..MAX_REPLY_LINES {
        let mut line = Vec::new();
        let n = (&mut *reader)
            .take(MAX_REPLY_LINE as u64)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".to_owned());
        }
        let line = String::from_utf8_lossy(&line);
        let line = line.trim_end_matches(['\r', '\n']);
        if line.len() < 3 {
            return Err(format!("malformed reply line {line:?}"));
        }
        let code: u16 = line[..3]
            .parse()
            .map_err(|_| format!("malformed reply line {line:?}"))?;
        let rest = line.get(4..).unwrap_or_default();
        text.push(rest.to_owned());
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok((code, text.join("\n")));
        }
    }
    Err("reply too long".to_owned())
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
}
