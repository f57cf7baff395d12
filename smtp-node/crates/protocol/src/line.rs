//! Command line framing: splits the client's byte stream into CRLF-terminated lines.
//!
//! SMTP lines end in CRLF and nothing else (RFC 5321 §2.3.8: "bare" CR or LF must not be
//! treated as line endings). A line with a bare LF ending, or with a bare CR inside, is
//! reported as an event instead of a line, so the session can refuse it rather than guess. An
//! over-long line is reported once and then skipped up to its end, so its tail is never run as
//! a command (the classic "line too long" resynchronisation), and the reader
//! never holds more than `max` bytes of one line.
//!
//! Lines are delimited by LF: the bytes up to and including the next LF form one line, and the
//! line is only valid if that LF is preceded by CR and no other CR occurs in it. This makes
//! the outcome independent of how the input is split across reads.

use bytes::{Buf, Bytes, BytesMut};

/// What [`LineReader::next_line`] found at the front of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineEvent {
    /// A complete line, without its CRLF.
    Line(Bytes),
    /// The line is longer than the limit (including CRLF). Reported once; the reader then
    /// discards everything up to and including the line's LF.
    TooLong,
    /// The line ended in a LF that was not preceded by CR. The line has been discarded.
    BareLf,
    /// The line (ended by CRLF) contains a CR that is not followed by LF. The line has been
    /// discarded.
    BareCr,
}

/// Incremental CRLF line splitter with a per-call length limit.
///
/// The reader keeps only one bit of state (whether it is skipping the rest of an over-long
/// line); the bytes themselves stay in the caller's buffer until a whole line is there.
#[derive(Debug, Default)]
pub struct LineReader {
    /// Skipping the tail of a line already reported as [`LineEvent::TooLong`].
    discarding: bool,
}

impl LineReader {
    /// A reader positioned at the start of a line.
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes bytes from `buf` (advancing it) and returns the next event, or `None` if more
    /// input is needed.
    ///
    /// `max` is the maximum line length including the CRLF (see
    /// [`MAX_COMMAND_LINE`](super::MAX_COMMAND_LINE) and
    /// [`MAX_AUTH_LINE`](super::MAX_AUTH_LINE)); it may differ from call to call. A line longer
    /// than `max` yields [`LineEvent::TooLong`] once, as soon as `max` bytes without a LF are
    /// buffered, and the reader then discards bytes up to and including the next LF. A line
    /// ending in a bare LF yields [`LineEvent::BareLf`]; a CRLF line containing a CR not
    /// followed by LF yields [`LineEvent::BareCr`]. In both cases the line is consumed.
    ///
    /// When `None` is returned, all of `buf` is either an incomplete line kept for the next
    /// call, or has been discarded as the tail of an over-long line.
    pub fn next_line(&mut self, buf: &mut BytesMut, max: usize) -> Option<LineEvent> {
        if self.discarding {
            match memchr::memchr(b'\n', buf) {
                Some(lf) => {
                    buf.advance(lf + 1);
                    self.discarding = false;
                }
                None => {
                    buf.clear();
                    return None;
                }
            }
        }
        if buf.is_empty() {
            return None;
        }
        let window = buf.len().min(max);
        match memchr::memchr(b'\n', &buf[..window]) {
            Some(lf) => {
                let line = buf.split_to(lf + 1).freeze();
                if lf == 0 || line[lf - 1] != b'\r' {
                    return Some(LineEvent::BareLf);
                }
                let content = line.slice(..lf - 1);
                if memchr::memchr(b'\r', &content).is_some() {
                    return Some(LineEvent::BareCr);
                }
                Some(LineEvent::Line(content))
            }
            None if buf.len() >= max => {
                // No LF within `max` bytes: the line cannot be valid. Drop what we hold so that
                // memory stays bounded, and skip the rest of the line (possibly already here).
                match memchr::memchr(b'\n', &buf[window..]) {
                    Some(lf) => buf.advance(window + lf + 1),
                    None => {
                        buf.clear();
                        self.discarding = true;
                    }
                }
                Some(LineEvent::TooLong)
            }
            None => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    /// Feeds `chunks` one after the other, draining events after each, and returns the events
    /// and what is left in the buffer.
    fn run(chunks: &[&[u8]], max: usize) -> (Vec<LineEvent>, Vec<u8>) {
        let mut reader = LineReader::new();
        let mut buf = BytesMut::new();
        let mut events = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            while let Some(event) = reader.next_line(&mut buf, max) {
                events.push(event);
            }
        }
        (events, buf.to_vec())
    }

    fn line(s: &str) -> LineEvent {
        LineEvent::Line(Bytes::copy_from_slice(s.as_bytes()))
    }

    /// (input, max, expected events, expected leftover)
    type Vector = (Vec<u8>, usize, Vec<LineEvent>, Vec<u8>);

    fn vectors() -> Vec<Vector> {
        let mut v = vec![
            (b"EHLO a\r\n".to_vec(), 512, vec![line("EHLO a")], vec![]),
            (
                b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n".to_vec(),
                512,
                vec![line("MAIL FROM:<a@b>"), line("RCPT TO:<c@d>"), line("DATA")],
                vec![],
            ),
            (b"\r\n".to_vec(), 512, vec![line("")], vec![]),
            (b"NOOP".to_vec(), 512, vec![], b"NOOP".to_vec()),
            (b"NOOP\r".to_vec(), 512, vec![], b"NOOP\r".to_vec()),
            (b"NOOP\n".to_vec(), 512, vec![LineEvent::BareLf], vec![]),
            (b"\n".to_vec(), 512, vec![LineEvent::BareLf], vec![]),
            (
                b"NOOP\nQUIT\r\n".to_vec(),
                512,
                vec![LineEvent::BareLf, line("QUIT")],
                vec![],
            ),
            (
                b"NO\rOP\r\nQUIT\r\n".to_vec(),
                512,
                vec![LineEvent::BareCr, line("QUIT")],
                vec![],
            ),
            // CR CR LF: the first CR is bare.
            (b"NOOP\r\r\n".to_vec(), 512, vec![LineEvent::BareCr], vec![]),
            // A bare CR followed by a bare LF ending: the ending decides.
            (
                b"NOOP\r\rX\n".to_vec(),
                512,
                vec![LineEvent::BareLf],
                vec![],
            ),
            // Exactly at the limit (6 + CRLF = 8) and one over.
            (
                b"ABCDEF\r\nX\r\n".to_vec(),
                8,
                vec![line("ABCDEF"), line("X")],
                vec![],
            ),
            (
                b"ABCDEFG\r\nX\r\n".to_vec(),
                8,
                vec![LineEvent::TooLong, line("X")],
                vec![],
            ),
            // An over-long line with a bare LF ending: skipped up to that LF.
            (
                b"ABCDEFGHIJ\nX\r\n".to_vec(),
                8,
                vec![LineEvent::TooLong, line("X")],
                vec![],
            ),
            // The tail of an over-long line must never become a command (LIM-02).
            (
                [vec![b'A'; 600], b"QUIT\r\nNOOP\r\n".to_vec()].concat(),
                512,
                vec![LineEvent::TooLong, line("NOOP")],
                vec![],
            ),
            (
                [vec![b'A'; 2049], b"\r\n".to_vec()].concat(),
                512,
                vec![LineEvent::TooLong],
                vec![],
            ),
            // Two over-long lines in a row are reported separately.
            (
                [
                    vec![b'A'; 20],
                    b"\r\n".to_vec(),
                    vec![b'B'; 20],
                    b"\r\nC\r\n".to_vec(),
                ]
                .concat(),
                8,
                vec![LineEvent::TooLong, LineEvent::TooLong, line("C")],
                vec![],
            ),
            // Bytes that are not UTF-8 are passed through untouched (the parser refuses them).
            (
                b"\xff\xfe\r\n".to_vec(),
                512,
                vec![line_bytes(b"\xff\xfe")],
                vec![],
            ),
            (b"A\0B\r\n".to_vec(), 512, vec![line_bytes(b"A\0B")], vec![]),
        ];
        // An over-long line without an end is reported once and memory stays bounded.
        v.push((vec![b'A'; 5000], 512, vec![LineEvent::TooLong], vec![]));
        v
    }

    fn line_bytes(b: &[u8]) -> LineEvent {
        LineEvent::Line(Bytes::copy_from_slice(b))
    }

    #[test]
    fn framing_vectors_whole() {
        for (input, max, events, rest) in vectors() {
            let (got, left) = run(&[&input], max);
            assert_eq!(got, events, "input {:?}", String::from_utf8_lossy(&input));
            assert_eq!(left, rest, "input {:?}", String::from_utf8_lossy(&input));
        }
    }

    #[test]
    fn framing_is_independent_of_read_boundaries() {
        for (input, max, events, _) in vectors() {
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            let (got, _) = run(&bytes, max);
            assert_eq!(
                got,
                events,
                "byte-at-a-time {:?}",
                String::from_utf8_lossy(&input)
            );
            for split in 0..=input.len() {
                let (a, b) = input.split_at(split);
                let (got, _) = run(&[a, b], max);
                assert_eq!(
                    got,
                    events,
                    "split at {split} of {:?}",
                    String::from_utf8_lossy(&input)
                );
            }
        }
    }

    #[test]
    fn buffer_stays_bounded_while_discarding() {
        let mut reader = LineReader::new();
        let mut buf = BytesMut::new();
        let mut too_long = 0;
        for _ in 0..1000 {
            buf.extend_from_slice(&[b'x'; 100]);
            while let Some(event) = reader.next_line(&mut buf, 512) {
                assert_eq!(event, LineEvent::TooLong);
                too_long += 1;
            }
            assert!(buf.len() < 512, "reader holds {} bytes", buf.len());
        }
        assert_eq!(too_long, 1);
        buf.extend_from_slice(b"\r\nQUIT\r\n");
        assert_eq!(reader.next_line(&mut buf, 512), Some(line("QUIT")));
    }

    #[test]
    fn limit_may_change_between_lines() {
        // An AUTH exchange line may be longer than a command line.
        let mut reader = LineReader::new();
        let long = "A".repeat(1000);
        let mut buf = BytesMut::from(format!("{long}\r\n{long}\r\n").as_bytes());
        assert_eq!(
            reader.next_line(&mut buf, crate::MAX_AUTH_LINE),
            Some(line(&long))
        );
        assert_eq!(
            reader.next_line(&mut buf, crate::MAX_COMMAND_LINE),
            Some(LineEvent::TooLong)
        );
        assert!(buf.is_empty());
    }
}
