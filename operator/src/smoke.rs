//! `kubemail-operator smoke-send`: sends one message to an SMTP server and succeeds only when
//! the server answers `250` after the data, which for a kubemail node means the message is in
//! the JetStream queue. It is what the chart's `helm test` pod runs (the operator image has no
//! shell and no SMTP client besides this).
//!
//! The wire syntax is the node's own, from `kubemail-smtp-protocol` (command encoder, DATA
//! dot-stuffing, bounded reply parser), read through the same reply reader as the Relay probe.
//! Plain SMTP only: the test talks to the MX port, where a sender needs no TLS and no AUTH for
//! a local recipient, exactly as the rest of the internet reaches the domain.

use std::time::Duration;

use kubemail_smtp_protocol::Reply;
use kubemail_smtp_protocol::client::{ClientCommand, encode_data};
use kubemail_smtp_protocol::command::{MailParams, RcptParams};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::controller::relay::probe::read_reply;

/// One test message.
#[derive(Debug, Clone)]
pub struct SmokeMessage {
    /// `host:port` of the SMTP server.
    pub server: String,
    /// Envelope sender and `From:`.
    pub from: String,
    /// Envelope recipient and `To:`.
    pub to: String,
    /// Our name in `EHLO`.
    pub ehlo_name: String,
    /// The `Subject:`, so that the message can be found in the mailbox.
    pub subject: String,
    /// The deadline for the whole transaction.
    pub timeout: Duration,
}

/// Why the message was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SmokeError {
    #[error("cannot connect to {server}")]
    Connect {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{server} did not finish the transaction within {}s", timeout.as_secs())]
    Timeout { server: String, timeout: Duration },
    #[error("cannot send {step} to {server}")]
    Write {
        server: String,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no reply to {step} from {server}: {reason}")]
    Read {
        server: String,
        step: &'static str,
        reason: String,
    },
    #[error("{server} refused {step}: {reply}")]
    Refused {
        server: String,
        step: &'static str,
        reply: String,
    },
    #[error("cannot encode {step}")]
    Encode {
        step: &'static str,
        #[source]
        source: kubemail_smtp_protocol::client::EncodeError,
    },
}

/// Sends the message; returns the server's final reply (`250 ...`, with its queue id).
pub async fn send(message: &SmokeMessage) -> Result<Reply, SmokeError> {
    tokio::time::timeout(message.timeout, transaction(message))
        .await
        .unwrap_or_else(|_| {
            Err(SmokeError::Timeout {
                server: message.server.clone(),
                timeout: message.timeout,
            })
        })
}

/// The message text: the headers RFC 5322 requires and a line saying what it is.
pub fn message_text(message: &SmokeMessage, date: time::OffsetDateTime) -> String {
    let id = format!(
        "<{}.smoke@{}>",
        date.unix_timestamp_nanos(),
        message.ehlo_name
    );
    let date = date
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default();
    format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nDate: {date}\r\nMessage-ID: {id}\r\n\
         \r\nThis message was sent by kubemail-operator smoke-send (helm test) to check that\r\n\
         the installation accepts and queues mail.\r\n",
        from = message.from,
        to = message.to,
        subject = message.subject,
    )
}

async fn transaction(message: &SmokeMessage) -> Result<Reply, SmokeError> {
    let server = message.server.as_str();
    let stream = TcpStream::connect(server)
        .await
        .map_err(|source| SmokeError::Connect {
            server: server.to_owned(),
            source,
        })?;
    let (mut read, mut write) = stream.into_split();
    let mut session = Session {
        server,
        buf: Vec::new(),
    };
    session.expect(&mut read, "the greeting", &[220]).await?;
    let mail_params = MailParams::default();
    let rcpt_params = RcptParams::default();
    let steps: [(&'static str, ClientCommand<'_>, &[u16]); 4] = [
        ("EHLO", ClientCommand::Ehlo(&message.ehlo_name), &[250]),
        (
            "MAIL FROM",
            ClientCommand::Mail {
                from: &message.from,
                params: &mail_params,
            },
            &[250],
        ),
        (
            "RCPT TO",
            ClientCommand::Rcpt {
                to: &message.to,
                params: &rcpt_params,
            },
            &[250, 251],
        ),
        ("DATA", ClientCommand::Data, &[354]),
    ];
    for (step, command, accepted) in steps {
        let line = command
            .to_bytes()
            .map_err(|source| SmokeError::Encode { step, source })?;
        session.write(&mut write, step, &line).await?;
        session.expect(&mut read, step, accepted).await?;
    }
    let body = encode_data(message_text(message, time::OffsetDateTime::now_utc()).as_bytes());
    session.write(&mut write, "the message", &body).await?;
    let queued = session.expect(&mut read, "the message", &[250]).await?;
    // The message is queued; a lost QUIT changes nothing.
    let _ = write
        .write_all(&ClientCommand::Quit.to_bytes().unwrap_or_default())
        .await;
    Ok(queued)
}

/// The connection's read buffer and the server name for the errors.
struct Session<'a> {
    server: &'a str,
    buf: Vec<u8>,
}

impl Session<'_> {
    async fn write<W: AsyncWrite + Unpin>(
        &self,
        write: &mut W,
        step: &'static str,
        bytes: &[u8],
    ) -> Result<(), SmokeError> {
        write
            .write_all(bytes)
            .await
            .map_err(|source| SmokeError::Write {
                server: self.server.to_owned(),
                step,
                source,
            })
    }

    async fn expect<R: AsyncRead + Unpin>(
        &mut self,
        read: &mut R,
        step: &'static str,
        accepted: &[u16],
    ) -> Result<Reply, SmokeError> {
        let reply = read_reply(read, &mut self.buf)
            .await
            .map_err(|reason| SmokeError::Read {
                server: self.server.to_owned(),
                step,
                reason,
            })?;
        if accepted.contains(&reply.code) {
            Ok(reply)
        } else {
            Err(SmokeError::Refused {
                server: self.server.to_owned(),
                step,
                reply: reply.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::TcpListener;

    use super::*;

    fn message(server: String) -> SmokeMessage {
        SmokeMessage {
            server,
            from: "helm-test@example.test".into(),
            to: "postmaster@example.test".into(),
            ehlo_name: "smoke.example.test".into(),
            subject: "kubemail helm test".into(),
            timeout: Duration::from_secs(10),
        }
    }

    /// A server answering each command with the next reply of `script` (after the greeting),
    /// and the message data with `after_data`; returns its address and what it received.
    async fn server(
        script: &'static [&'static str],
        after_data: &'static str,
    ) -> (String, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            let mut seen = String::new();
            w.write_all(b"220 mx.example.test ESMTP\r\n").await.unwrap();
            for reply in script {
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap() == 0 {
                    return seen;
                }
                seen.push_str(&line);
                w.write_all(reply.as_bytes()).await.unwrap();
                if reply.starts_with("354") {
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap() == 0 {
                            return seen;
                        }
                        seen.push_str(&line);
                        if line == ".\r\n" {
                            break;
                        }
                    }
                    w.write_all(after_data.as_bytes()).await.unwrap();
                }
            }
            let mut rest = String::new();
            let _ = r.read_line(&mut rest).await;
            seen.push_str(&rest);
            seen
        });
        (addr, task)
    }

    const ACCEPTING: &[&str] = &[
        "250-mx.example.test\r\n250 PIPELINING\r\n",
        "250 2.1.0 ok\r\n",
        "250 2.1.5 ok\r\n",
        "354 go ahead\r\n",
    ];

    #[tokio::test]
    async fn a_queued_message_returns_the_final_250() {
        let (addr, task) = server(ACCEPTING, "250 2.0.0 queued as 42\r\n").await;
        let reply = send(&message(addr)).await.expect("accepted");
        assert_eq!(reply.code, 250);
        assert!(reply.to_string().contains("queued as 42"), "{reply}");
        let seen = task.await.unwrap();
        for line in [
            "EHLO smoke.example.test\r\n",
            "MAIL FROM:<helm-test@example.test>\r\n",
            "RCPT TO:<postmaster@example.test>\r\n",
            "DATA\r\n",
            "Subject: kubemail helm test\r\n",
            "To: <postmaster@example.test>\r\n",
            "\r\n.\r\n",
            "QUIT\r\n",
        ] {
            assert!(seen.contains(line), "{line:?} not sent:\n{seen}");
        }
    }

    #[tokio::test]
    async fn a_refused_recipient_fails_naming_the_step_and_the_reply() {
        let (addr, _task) = server(
            &[
                "250 mx.example.test\r\n",
                "250 ok\r\n",
                "550 5.1.1 no such user\r\n",
            ],
            "",
        )
        .await;
        let e = send(&message(addr)).await.expect_err("refused");
        let text = e.to_string();
        assert!(
            text.contains("refused RCPT TO: 550 5.1.1 no such user"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_temporary_failure_after_the_data_is_a_failure() {
        // What a node answers when the queue is unreachable: the message is not accepted.
        let (addr, _task) = server(ACCEPTING, "451 4.3.0 queue unavailable\r\n").await;
        let e = send(&message(addr)).await.expect_err("not queued");
        assert!(
            e.to_string()
                .contains("refused the message: 451 4.3.0 queue unavailable"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let _hold = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let mut m = message(addr);
        m.timeout = Duration::from_millis(300);
        let e = send(&m).await.expect_err("timeout");
        assert!(matches!(e, SmokeError::Timeout { .. }), "{e}");
    }

    #[test]
    fn the_message_has_the_required_headers_and_crlf_lines() {
        let m = message("127.0.0.1:25".into());
        let text = message_text(&m, time::OffsetDateTime::UNIX_EPOCH);
        assert!(
            text.starts_with("From: <helm-test@example.test>\r\n"),
            "{text}"
        );
        assert!(
            text.contains("\r\nDate: Thu, 01 Jan 1970 00:00:00 +0000\r\n"),
            "{text}"
        );
        assert!(
            text.contains("\r\nMessage-ID: <0.smoke@smoke.example.test>\r\n"),
            "{text}"
        );
        assert!(
            !text.replace("\r\n", "").contains('\n'),
            "bare LF in {text:?}"
        );
    }
}
