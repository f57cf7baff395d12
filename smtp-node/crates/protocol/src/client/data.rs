//! The message as DATA sends it (RFC 5321 §4.1.1.4, §4.5.2): the transparency rule that keeps
//! anything in a message from ending the data early at the next hop (the outbound half of the
//! SMTP smuggling defence).
//!
//! Stored messages have CRLF line endings only (the [`crate::data`] invariant), and for them
//! [`encode_data`] is plain dot-stuffing. It still turns a stray bare CR or LF into CRLF, so
//! that a message from any other source cannot put a `<LF>.<LF>` or `<CR>.<CR>` on the wire
//! that a lenient server downstream would take for the end of the data. A line whose first
//! byte other than NUL is `.` is stuffed too: a server that drops NUL bytes would otherwise
//! read `<NUL>.` as a lone dot, the end of the data, and the rest of the message as commands.

/// The message as DATA sends it: CRLF line endings only (a bare CR or LF becomes CRLF), every
/// line starting with `.` (after any NUL bytes) stuffed with another `.`, a final CRLF if
/// missing, and the terminating `.<CRLF>`.
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
                if at_line_start && starts_with_dot_after_nuls(&body[i..]) {
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

/// Whether `rest` (the rest of a line and what follows) starts with `.` once leading NUL bytes
/// are dropped.
fn starts_with_dot_after_nuls(rest: &[u8]) -> bool {
    rest.iter().find(|&&b| b != 0) == Some(&b'.')
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
        // Every known smuggling sequence must come out as one message
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
    fn a_dot_behind_nul_bytes_is_stuffed() {
        assert_eq!(
            encode_data(b"a\r\n\0.\r\nb\r\n"),
            b"a\r\n.\0.\r\nb\r\n.\r\n"
        );
        assert_eq!(encode_data(b"\0\0.\0"), b".\0\0.\0\r\n.\r\n");
        // NUL bytes elsewhere, or a dot that is not first, change nothing.
        assert_eq!(encode_data(b"\0a.\r\n"), b"\0a.\r\n.\r\n");
        assert_eq!(encode_data(b"\0\r\n"), b"\0\r\n.\r\n");
    }

    /// What a lenient server makes of our DATA: NUL bytes dropped, a bare CR or LF taken for
    /// a line end. The lines it reads.
    fn lenient_lines(wire: &[u8]) -> Vec<Vec<u8>> {
        let without_nul: Vec<u8> = wire.iter().copied().filter(|&b| b != 0).collect();
        let mut lines = Vec::new();
        let mut line = Vec::new();
        let mut i = 0;
        while i < without_nul.len() {
            match without_nul[i] {
                b'\r' | b'\n' => {
                    if without_nul[i] == b'\r' && without_nul.get(i + 1) == Some(&b'\n') {
                        i += 1;
                    }
                    lines.push(std::mem::take(&mut line));
                }
                b => line.push(b),
            }
            i += 1;
        }
        if !line.is_empty() {
            lines.push(line);
        }
        lines
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// For any body, the only line a NUL-dropping, bare-CR/LF-tolerant downstream reads
        /// as `.` is our terminator, the last line.
        #[test]
        fn no_body_puts_an_early_end_of_data_on_the_wire(
            body in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just(0u8),
                    proptest::strategy::Just(b'.'),
                    proptest::strategy::Just(b'\r'),
                    proptest::strategy::Just(b'\n'),
                    proptest::strategy::Just(b'a'),
                    proptest::prelude::any::<u8>(),
                ],
                0..200,
            )
        ) {
            let wire = encode_data(&body);
            let lines = lenient_lines(&wire);
            let dots: Vec<usize> = lines
                .iter()
                .enumerate()
                .filter(|(_, l)| l.as_slice() == b".")
                .map(|(i, _)| i)
                .collect();
            proptest::prop_assert_eq!(dots, vec![lines.len() - 1], "{:?}", String::from_utf8_lossy(&wire));
            proptest::prop_assert!(wire.ends_with(b"\r\n.\r\n") || wire == b".\r\n");
        }
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
