//! The message as DATA sends it (RFC 5321 §4.1.1.4, §4.5.2): the transparency rule that keeps
//! anything in a message from ending the data early at the next hop (the outbound half of the
//! SMTP smuggling defence, catalogue SMUG-OUT-01/02).
//!
//! Stored messages have CRLF line endings only (the [`crate::data`] invariant), and for them
//! [`encode_data`] is plain dot-stuffing. It still turns a stray bare CR or LF into CRLF, so
//! that a message from any other source cannot put a `<LF>.<LF>` or `<CR>.<CR>` on the wire
//! that a lenient server downstream would take for the end of the data.

/// The message as DATA sends it: CRLF line endings only (a bare CR or LF becomes CRLF), every
/// line starting with `.` stuffed with another `.`, a final CRLF if missing, and the
/// terminating `.<CRLF>`.
pub fn encode_data(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 5);
    let mut at_line_start = true;
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        match b {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                // A CRLF pair is one line ending; a bare CR is one too.
                if body.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                at_line_start = true;
            }
            b'\n' => {
                out.extend_from_slice(b"\r\n");
                at_line_start = true;
            }
            _ => {
                if at_line_start && b == b'.' {
                    out.push(b'.');
                }
                out.push(b);
                at_line_start = false;
            }
        }
        i += 1;
    }
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::{BareEolPolicy, DataProgress, DataReceiver};

    #[test]
    fn dot_stuffing() {
        let cases: [(&[u8], &[u8]); 8] = [
            (b"", b".\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b".\r\n..x\r\n", b"..\r\n...x\r\n.\r\n"),
            (b"a", b"a\r\n.\r\n"),
            (b".a", b"..a\r\n.\r\n"),
            (
                b"Subject: x\r\n\r\n.\r\n..\r\n.x\r\nend",
                b"Subject: x\r\n\r\n..\r\n...\r\n..x\r\nend\r\n.\r\n",
            ),
            // A dot inside a line is text.
            (b"a.b\r\n.", b"a.b\r\n..\r\n.\r\n"),
            (b"\r\n", b"\r\n.\r\n"),
        ];
        for (msg, want) in cases {
            assert_eq!(encode_data(msg), want, "{:?}", String::from_utf8_lossy(msg));
        }
    }

    #[test]
    fn normalises_bare_line_endings_so_nothing_ends_the_data_early() {
        // Every smuggling sequence of the catalogue (2.1) must come out as one message
        // whose only end-of-data is the final one.
        let cases: [&[u8]; 6] = [
            b"a\n.\nb\r\n",
            b"a\r.\rb\r\n",
            b"a\r\n.\nb\r\n",
            b"a\n.\r\nb\r\n",
            b"a\r\n.\r\r\nb\r\n",
            b"a\r\n.\rMAIL FROM:<x@y>\r\n",
        ];
        for body in cases {
            let wire = encode_data(body);
            let text = String::from_utf8_lossy(&wire);
            assert_eq!(text.matches("\r\n.\r\n").count(), 1, "{text:?}");
            assert!(wire.ends_with(b"\r\n.\r\n"), "{text:?}");
            // No bare CR or LF remains.
            for (i, &b) in wire.iter().enumerate() {
                if b == b'\n' {
                    assert_eq!(wire[i - 1], b'\r', "{text:?}");
                }
                if b == b'\r' {
                    assert_eq!(wire.get(i + 1), Some(&b'\n'), "{text:?}");
                }
            }
        }
        assert_eq!(encode_data(b"a\n.\nb"), b"a\r\n..\r\nb\r\n.\r\n");
    }

    #[test]
    fn the_server_side_receiver_reads_back_what_we_send() {
        for msg in [
            &b""[..],
            b"a\r\n",
            b"Subject: x\r\n\r\n.\r\n..\r\n.x\r\nend\r\n",
            b".\r\n",
        ] {
            let wire = encode_data(msg);
            let mut rx = DataReceiver::new(BareEolPolicy::Reject, u64::MAX, usize::MAX);
            let mut buf = BytesMut::from(&wire[..]);
            assert_eq!(rx.feed(&mut buf), DataProgress::Done);
            assert!(buf.is_empty(), "the data ended early: {wire:?}");
            assert_eq!(rx.finish().unwrap(), msg, "{wire:?}");
        }
    }
}
