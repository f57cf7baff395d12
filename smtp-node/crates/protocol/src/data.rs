//! DATA phase: finds the end of the message, dot-unstuffs it, and enforces line-ending, line
//! length and size rules while the bytes stream in. This is the SMTP smuggling defence
//! (CVE-2023-51764/51765/51766), so the rules are strict and exact:
//!
//! * **Only `<CRLF>.<CRLF>` ends the data** (RFC 5321 §4.1.1.4). The CRLF of the DATA command
//!   counts, so the data may start with `.<CRLF>` (an empty message). `\n.\n`, `\r.\r`,
//!   `\r\n.\n`, `\n.\r\n`, `\r\n.\r`, `\r\n.\r\r\n`, `\r\n\0.\r\n`, ... never end it. A "line
//!   start" for this purpose exists only at the beginning and right after a real CRLF.
//! * **Dot-unstuffing** (RFC 5321 §4.5.2): at a line start, a `.` followed by other text is
//!   removed (`..x` → `.x`). A `.` alone on a line that ends in a bare CR or LF is kept: it is
//!   not the terminator, and there is no second character to unstuff.
//! * **Bare CR / bare LF** (a CR not followed by LF, a LF not preceded by CR) under
//!   [`BareEolPolicy::Reject`] make the result [`DataError::BareLineEnding`]. Under
//!   [`BareEolPolicy::Normalize`] each is stored as CRLF, but it does **not** create a line
//!   start: the bytes after it are plain text (no terminator, no unstuffing), because the
//!   client never sent a CRLF there.
//!
//! **Invariant for the stored message** (tested): it contains only CRLF line endings, and it is
//! *unstuffed*, so it may contain a line that is exactly `.` (e.g. from `\n.\n` under
//! Normalize). That is safe only because every writer of the message to an SMTP peer (our
//! delivery client, through [`crate::client::encode_data`]) dot-stuffs every line that starts
//! with `.`; re-stuffing the stored message and appending `.<CRLF>` reproduces exactly one
//! message with the same content. Nothing that the client sent can therefore become an
//! end-of-data downstream.
//!
//! * **Line length**: a stored line longer than `max_line - 2` octets (RFC 5321 §4.5.3.1.6:
//!   1000 octets including CRLF, not counting the stuffing dot) gives
//!   [`DataError::LineTooLong`]; lines are never silently cut.
//! * **Size**: when the message (as stored: CRLF pairs counted, stuffing dots and the
//!   terminator not, as RFC 1870 §3 counts it) exceeds `max_size`, [`DataError::TooLarge`].
//!
//! After the first violation the receiver keeps scanning to the real terminator, so the
//! stream stays in sync, but stores nothing more (its buffer is released), so memory stays
//! flat for a gigabyte of junk. The result does not depend on how the input is split across
//! [`DataReceiver::feed`] calls. Bytes after the terminator stay in the caller's buffer: they
//! are the next pipelined commands.

use bytes::{Buf, Bytes, BytesMut};

use super::{EnhancedCode, Reply};

/// What to do with a bare CR or bare LF inside the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BareEolPolicy {
    /// Refuse the message (`550 5.6.0`). Recommended on port 25.
    Reject,
    /// Store each bare CR / LF as CRLF (Postfix `smtpd_forbid_bare_newline = normalize`).
    Normalize,
}

/// Why a received message is refused. The data was still consumed to its real end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    /// A bare CR or LF under [`BareEolPolicy::Reject`].
    #[error("message contains a bare CR or LF")]
    BareLineEnding,
    /// A text line over the limit (RFC 5321 §4.5.3.1.6).
    #[error("message contains a line that is too long")]
    LineTooLong,
    /// The message is larger than the size limit (RFC 1870).
    #[error("message exceeds the size limit")]
    TooLarge,
    /// [`DataReceiver::finish`] was called before the end of data was seen (a caller bug, or
    /// a connection that closed mid-DATA: the transaction must be discarded).
    #[error("message is incomplete")]
    Incomplete,
}

impl DataError {
    /// The reply to the end of DATA (or of the last BDAT chunk) for this error:
    /// * `BareLineEnding`: `550 5.6.0` (X.6.0 "other media error"
    ///   because the content, not the protocol, is at fault),
    /// * `LineTooLong`: `554 5.6.0` (RFC 5321 §4.5.3.1.10 allows a permanent failure; the line
    ///   is content, so X.6.0 as well),
    /// * `TooLarge`: `552 5.3.4` (RFC 1870 §6, RFC 3463 X.3.4 "message too big for system"),
    /// * `Incomplete`: `451 4.3.0` (a local problem; the client may retry).
    pub fn reply(&self) -> Reply {
        match self {
            Self::BareLineEnding => Reply::new(
                550,
                EnhancedCode(5, 6, 0),
                "Message contains bare CR or LF; only CRLF line endings are allowed",
            ),
            Self::LineTooLong => Reply::new(
                554,
                EnhancedCode(5, 6, 0),
                "Message contains a line longer than 1000 octets",
            ),
            Self::TooLarge => Reply::message_too_large(),
            Self::Incomplete => Reply::local_error("Incomplete message"),
        }
    }
}

/// Result of one [`DataReceiver::feed`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataProgress {
    /// The terminator has not been seen; all of the buffer was consumed.
    NeedMore,
    /// The terminator was consumed; call [`DataReceiver::finish`].
    Done,
}

/// Where the scanner is, relative to the wire lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a wire line (start of data, or just after a real CRLF).
    LineStart,
    /// At a line start, a `.` was read.
    Dot,
    /// At a line start, `.` CR was read: LF next means end of data.
    DotCr,
    /// Inside a line (or after a normalised bare line ending).
    Text,
    /// A CR was read inside a line; LF next makes a real CRLF.
    Cr,
    /// The terminator was consumed.
    Done,
}

/// Incremental receiver for one DATA phase.
#[derive(Debug)]
pub struct DataReceiver {
    policy: BareEolPolicy,
    max_size: u64,
    max_line: usize,
    state: State,
    /// The stored (unstuffed, CRLF-normalised) message; emptied and frozen after an error.
    out: BytesMut,
    /// Octets of the current stored line, without its ending.
    line_len: usize,
    /// Size of the message as stored, counted even when no longer storing.
    size: u64,
    /// Wire octets consumed, including stuffing dots and the terminator.
    received: u64,
    error: Option<DataError>,
}

/// Initial buffer reservation: messages are usually small, and `max_size` can be tens of MiB.
const INITIAL_CAPACITY: u64 = 64 * 1024;

impl DataReceiver {
    /// A receiver positioned right after the `354` reply.
    ///
    /// `max_size` is the message size limit in octets; `max_line` the maximum text line length
    /// including CRLF (normally [`MAX_TEXT_LINE`](super::MAX_TEXT_LINE)).
    pub fn new(policy: BareEolPolicy, max_size: u64, max_line: usize) -> Self {
        let capacity = usize::try_from(max_size.min(INITIAL_CAPACITY)).unwrap_or(0);
        Self::with_buffer(
            policy,
            max_size,
            max_line,
            BytesMut::with_capacity(capacity),
        )
    }

    /// A receiver that appends the message to `out`, after what `out` holds already: a caller
    /// can reserve room in front of the message (to prepend header fields without copying
    /// it) and size the buffer itself (to account for its memory). What `out` holds is never
    /// examined nor counted against `max_size`.
    pub fn with_buffer(
        policy: BareEolPolicy,
        max_size: u64,
        max_line: usize,
        out: BytesMut,
    ) -> Self {
        Self {
            policy,
            max_size,
            max_line,
            state: State::LineStart,
            out,
            line_len: 0,
            size: 0,
            received: 0,
            error: None,
        }
    }

    /// The buffer the message is stored in. One [`DataReceiver::feed`] appends at most twice
    /// the octets it consumes (a normalised bare CR or LF becomes CRLF), so a caller that
    /// reserves that much spare capacity before feeding knows the buffer will not reallocate.
    /// The caller may also take bytes from it (to stream them elsewhere) or replace it; the
    /// receiver only ever appends. After a violation it is empty and stays so.
    pub fn stored_mut(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// As [`DataReceiver::finish`], but the whole buffer: what it held before the message (see
    /// [`DataReceiver::with_buffer`]), then the message.
    pub fn finish_buffer(self) -> Result<BytesMut, DataError> {
        if self.state != State::Done {
            return Err(DataError::Incomplete);
        }
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.out),
        }
    }

    /// Consumes as much of `buf` as belongs to this DATA phase, advancing it. Bytes after the
    /// terminating CRLF.CRLF stay in `buf` for the command reader (PIPELINING after DATA).
    /// After `Done` further calls consume nothing and return `Done`.
    pub fn feed(&mut self, buf: &mut BytesMut) -> DataProgress {
        let data: &[u8] = buf;
        let mut i = 0;
        while i < data.len() && self.state != State::Done {
            match self.state {
                State::Text => {
                    let rest = &data[i..];
                    match memchr::memchr2(b'\r', b'\n', rest) {
                        None => {
                            self.content(rest);
                            i = data.len();
                        }
                        Some(k) => {
                            self.content(&rest[..k]);
                            if rest[k] == b'\r' {
                                self.state = State::Cr;
                            } else {
                                self.bare_ending();
                            }
                            i += k + 1;
                        }
                    }
                }
                State::Cr => {
                    if data[i] == b'\n' {
                        self.crlf();
                        self.state = State::LineStart;
                        i += 1;
                    } else {
                        // The CR was bare; re-examine this byte as text.
                        self.bare_ending();
                        self.state = State::Text;
                    }
                }
                State::LineStart => {
                    if data[i] == b'.' {
                        self.state = State::Dot;
                        i += 1;
                    } else {
                        self.state = State::Text;
                    }
                }
                State::Dot => match data[i] {
                    b'\r' => {
                        self.state = State::DotCr;
                        i += 1;
                    }
                    b'\n' => {
                        // "." ended by a bare LF: not the terminator; keep the dot.
                        self.content(b".");
                        self.bare_ending();
                        self.state = State::Text;
                        i += 1;
                    }
                    // Dot-stuffing: drop the dot, the rest of the line is text.
                    _ => self.state = State::Text,
                },
                State::DotCr => {
                    if data[i] == b'\n' {
                        self.state = State::Done;
                        i += 1;
                    } else {
                        // "." ended by a bare CR: not the terminator; keep the dot and
                        // re-examine this byte as text.
                        self.content(b".");
                        self.bare_ending();
                        self.state = State::Text;
                    }
                }
                State::Done => {}
            }
        }
        self.received += i as u64;
        buf.advance(i);
        if self.state == State::Done {
            DataProgress::Done
        } else {
            DataProgress::NeedMore
        }
    }

    /// After [`DataProgress::Done`]: the message (dot-unstuffed, CRLF line endings, without the
    /// final `.<CRLF>`), or the first violation. Before `Done`: [`DataError::Incomplete`].
    pub fn finish(self) -> Result<Bytes, DataError> {
        self.finish_buffer().map(BytesMut::freeze)
    }

    /// Wire octets consumed so far, including stuffing dots and the terminator.
    pub fn bytes_received(&self) -> u64 {
        self.received
    }

    /// Whether the terminator has been consumed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The first violation seen so far, if any (the data must still be read to its end).
    pub fn error(&self) -> Option<DataError> {
        self.error
    }

    /// Records message text of the current line, checking the line and size limits. When one
    /// run of text crosses both limits, the one crossed at the earlier octet wins (size on a
    /// tie), so the reported error does not depend on how the input was split.
    fn content(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let n = bytes.len();
        if self.error.is_none() {
            let line_room = self
                .max_line
                .saturating_sub(2)
                .saturating_sub(self.line_len);
            let size_room = self.max_size.saturating_sub(self.size);
            let line_break = (n > line_room).then_some(line_room as u64);
            let size_break = (n as u64 > size_room).then_some(size_room);
            match (line_break, size_break) {
                (Some(l), Some(s)) if l < s => self.fail(DataError::LineTooLong),
                (_, Some(_)) => self.fail(DataError::TooLarge),
                (Some(_), None) => self.fail(DataError::LineTooLong),
                (None, None) => self.out.extend_from_slice(bytes),
            }
        }
        self.line_len = self.line_len.saturating_add(n);
        self.size = self.size.saturating_add(n as u64);
    }

    /// Records a line ending (a real CRLF, or a normalised bare one).
    fn crlf(&mut self) {
        if self.error.is_none() {
            if self.size.saturating_add(2) > self.max_size {
                self.fail(DataError::TooLarge);
            } else {
                self.out.extend_from_slice(b"\r\n");
            }
        }
        self.size = self.size.saturating_add(2);
        self.line_len = 0;
    }

    /// A bare CR or LF ended the current line.
    fn bare_ending(&mut self) {
        if self.policy == BareEolPolicy::Reject {
            self.fail(DataError::BareLineEnding);
        }
        self.crlf();
    }

    fn fail(&mut self, error: DataError) {
        if self.error.is_none() {
            self.error = Some(error);
            // Release the stored bytes: nothing more is stored, memory stays flat.
            self.out = BytesMut::new();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    const BIG: u64 = 1 << 30;
    const LINE: usize = 1000;

    /// The message or the error of a whole DATA phase; None if incomplete.
    type Expected = Option<Result<Vec<u8>, DataError>>;

    /// Result of a whole DATA phase: expected value, leftover bytes, and bytes_received.
    type Outcome = (Expected, Vec<u8>, u64);

    /// (input, policy, expected result, expected leftover)
    type Vector = (Vec<u8>, BareEolPolicy, Expected, Vec<u8>);

    fn run(chunks: &[&[u8]], policy: BareEolPolicy, max_size: u64, max_line: usize) -> Outcome {
        let mut rx = DataReceiver::new(policy, max_size, max_line);
        let mut buf = BytesMut::new();
        let mut done = false;
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            if rx.feed(&mut buf) == DataProgress::Done {
                done = true;
            } else {
                assert!(buf.is_empty(), "NeedMore must consume everything");
            }
        }
        let received = rx.bytes_received();
        let result = done.then(|| rx.finish().map(|b| b.to_vec()));
        (result, buf.to_vec(), received)
    }

    fn whole(input: &[u8], policy: BareEolPolicy) -> Outcome {
        run(&[input], policy, BIG, LINE)
    }

    /// The straightforward model the fast scanner must agree with: find
    /// the first CRLF.CRLF on the wire (with the DATA command's CRLF in front), then process
    /// the message one wire line and one octet at a time. Returns the result (None when
    /// incomplete) and the number of octets that belong to the DATA phase.
    fn reference(
        input: &[u8],
        policy: BareEolPolicy,
        max_size: u64,
        max_line: usize,
    ) -> (Expected, usize) {
        fn fail(error: &mut Option<DataError>, e: DataError) {
            error.get_or_insert(e);
        }
        let mut s = b"\r\n".to_vec();
        s.extend_from_slice(input);
        let Some(k) = s.windows(5).position(|w| w == b"\r\n.\r\n") else {
            return (None, input.len());
        };
        let mut rest = &input[..k];
        let mut wire_lines: Vec<&[u8]> = Vec::new();
        while let Some(p) = rest.windows(2).position(|w| w == b"\r\n") {
            wire_lines.push(&rest[..p]);
            rest = &rest[p + 2..];
        }
        assert!(rest.is_empty());
        let (mut out, mut error) = (Vec::new(), None);
        let (mut size, mut line_len) = (0u64, 0usize);
        for line in wire_lines {
            // Unstuff a leading dot unless the dot is alone before a bare CR/LF.
            let line = match line {
                [b'.', second, ..] if *second != b'\r' && *second != b'\n' => &line[1..],
                _ => line,
            };
            // Octets, then bare endings (None) inside the wire line, then the real CRLF.
            let mut events: Vec<(Option<u8>, bool)> = line
                .iter()
                .map(|&b| ((b != b'\r' && b != b'\n').then_some(b), true))
                .collect();
            events.push((None, false));
            for (octet, bare) in events {
                match octet {
                    Some(b) => {
                        size += 1;
                        line_len += 1;
                        if size > max_size {
                            fail(&mut error, DataError::TooLarge);
                        }
                        if line_len + 2 > max_line {
                            fail(&mut error, DataError::LineTooLong);
                        }
                        out.push(b);
                    }
                    None => {
                        if bare && policy == BareEolPolicy::Reject {
                            fail(&mut error, DataError::BareLineEnding);
                        }
                        size += 2;
                        line_len = 0;
                        if size > max_size {
                            fail(&mut error, DataError::TooLarge);
                        }
                        out.extend_from_slice(b"\r\n");
                    }
                }
            }
        }
        (Some(error.map_or(Ok(out), Err)), k + 3)
    }

    fn ok(s: &[u8]) -> Expected {
        Some(Ok(s.to_vec()))
    }

    fn err(e: DataError) -> Expected {
        Some(Err(e))
    }

    use BareEolPolicy::{Normalize, Reject};

    fn vectors() -> Vec<Vector> {
        let smuggled = b"MAIL FROM:<smuggled@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n";
        let mut v = vec![
            (b".\r\n".to_vec(), Reject, ok(b""), vec![]),
            (
                b".\r\nQUIT\r\n".to_vec(),
                Reject,
                ok(b""),
                b"QUIT\r\n".to_vec(),
            ),
            (b"a\r\n.\r\n".to_vec(), Reject, ok(b"a\r\n"), vec![]),
            (b"a\r\n\r\n.\r\n".to_vec(), Reject, ok(b"a\r\n\r\n"), vec![]),
            (
                b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<a@b>\r\n".to_vec(),
                Reject,
                ok(b"Subject: x\r\n\r\nbody\r\n"),
                b"MAIL FROM:<a@b>\r\n".to_vec(),
            ),
            // Incomplete.
            (b"a\r\n.".to_vec(), Reject, None, vec![]),
            (b"a\r\n.\r".to_vec(), Reject, None, vec![]),
            (b"".to_vec(), Reject, None, vec![]),
            // DOT-01: unstuffing.
            (
                b"..x\r\n.. \r\n..\t\r\nx.\r\n .\r\n..\r\n.\r\n".to_vec(),
                Reject,
                ok(b".x\r\n. \r\n.\t\r\nx.\r\n .\r\n.\r\n"),
                vec![],
            ),
            (b".x\r\n.\r\n".to_vec(), Reject, ok(b"x\r\n"), vec![]),
            (b"...\r\n.\r\n".to_vec(), Reject, ok(b"..\r\n"), vec![]),
            // 8-bit and NUL are content (SMUG-09: NUL before the dot is not a terminator).
            (
                b"\xff\xfe\x00\r\n.\r\n".to_vec(),
                Reject,
                ok(b"\xff\xfe\x00\r\n"),
                vec![],
            ),
            (
                b"a\r\n\x00.\r\nb\r\n.\r\n".to_vec(),
                Reject,
                ok(b"a\r\n\x00.\r\nb\r\n"),
                vec![],
            ),
            // Bare endings under Reject: consumed to the real end, then refused.
            (
                b"a\nb\r\n.\r\nQUIT\r\n".to_vec(),
                Reject,
                err(DataError::BareLineEnding),
                b"QUIT\r\n".to_vec(),
            ),
            (
                b"a\rb\r\n.\r\n".to_vec(),
                Reject,
                err(DataError::BareLineEnding),
                vec![],
            ),
            (
                b"a\r\r\n.\r\n".to_vec(),
                Reject,
                err(DataError::BareLineEnding),
                vec![],
            ),
            (
                b"a\r\n.\r\r\n.\r\n".to_vec(),
                Reject,
                err(DataError::BareLineEnding),
                vec![],
            ),
            // Normalize: bare endings become CRLF and create no line start.
            (
                b"a\nb\r\n.\r\n".to_vec(),
                Normalize,
                ok(b"a\r\nb\r\n"),
                vec![],
            ),
            (
                b"a\rb\r\n.\r\n".to_vec(),
                Normalize,
                ok(b"a\r\nb\r\n"),
                vec![],
            ),
            (
                b"a\n.\nb\r\n.\r\n".to_vec(),
                Normalize,
                ok(b"a\r\n.\r\nb\r\n"),
                vec![],
            ),
            (
                b"a\n..\r\n.\r\n".to_vec(),
                Normalize,
                ok(b"a\r\n..\r\n"),
                vec![],
            ),
            (
                b"a\n.\r\nb\r\n.\r\n".to_vec(),
                Normalize,
                ok(b"a\r\n.\r\nb\r\n"),
                vec![],
            ),
            (
                b"a\r\n.\nb\r\n.\r\n".to_vec(),
                Normalize,
                ok(b"a\r\n.\r\nb\r\n"),
                vec![],
            ),
            (
                b"a\r\n.\rb\r\n.\r\n".to_vec(),
                Normalize,
                ok(b"a\r\n.\r\nb\r\n"),
                vec![],
            ),
            (
                b"a\r\n.\r\r\n.\r\n".to_vec(),
                Normalize,
                ok(b"a\r\n.\r\n\r\n"),
                vec![],
            ),
            (
                b"\n.\r\n.\r\n".to_vec(),
                Normalize,
                ok(b"\r\n.\r\n"),
                vec![],
            ),
            (b"\r\r\n.\r\n".to_vec(), Normalize, ok(b"\r\n\r\n"), vec![]),
            // LIM-03: a 1000-octet line is accepted; the stuffing dot is not counted.
            (
                [vec![b'a'; 998], b"\r\n.\r\n".to_vec()].concat(),
                Reject,
                ok(&[vec![b'a'; 998], b"\r\n".to_vec()].concat()),
                vec![],
            ),
            (
                [b"..".to_vec(), vec![b'a'; 997], b"\r\n.\r\n".to_vec()].concat(),
                Reject,
                ok(&[b".".to_vec(), vec![b'a'; 997], b"\r\n".to_vec()].concat()),
                vec![],
            ),
            (
                [vec![b'a'; 999], b"\r\n.\r\nNOOP\r\n".to_vec()].concat(),
                Reject,
                err(DataError::LineTooLong),
                b"NOOP\r\n".to_vec(),
            ),
            // LIM-04: a 100 KB line without CRLF: refused at the end, stream in sync.
            (
                [vec![b'x'; 100_000], b"\r\n.\r\nNOOP\r\n".to_vec()].concat(),
                Reject,
                err(DataError::LineTooLong),
                b"NOOP\r\n".to_vec(),
            ),
        ];
        // LIM-05: the chopped-line dot trap: "A" x N + ".\r\n" is never an end of data.
        for n in [1usize, 997, 998, 999, 1000, 1023, 1024, 4096, 8192] {
            let mut input = vec![b'A'; n];
            input.extend_from_slice(b".\r\nrest\r\n.\r\nNOOP\r\n");
            let expected = if n + 1 + 2 > LINE {
                err(DataError::LineTooLong)
            } else {
                ok(&[vec![b'A'; n], b".\r\nrest\r\n".to_vec()].concat())
            };
            v.push((input, Reject, expected, b"NOOP\r\n".to_vec()));
        }
        // §2.1 SMUG-01..11: a bad ending followed by a whole second transaction. Under Reject
        // the message is refused; under Normalize it is one message; in every case the
        // transaction's real end is the CRLF.CRLF of the smuggled part and only QUIT is left.
        let endings: &[&[u8]] = &[
            b"\n.\n",
            b"\r.\r",
            b"\r.\n",
            b"\n.\r",
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r.\r\n",
            b"\r\n.\r",
            b"\r\n.\r\r\n",
            b"\r\r\n.\r\r\n",
        ];
        for ending in endings {
            let input = [b"Subject: hi\r\n\r\nbody".as_slice(), ending, smuggled].concat();
            v.push((
                input.clone(),
                Reject,
                err(DataError::BareLineEnding),
                b"QUIT\r\n".to_vec(),
            ));
            let (want, _) = reference(&input, Normalize, BIG, LINE);
            assert!(matches!(want, Some(Ok(_))), "{ending:?}");
            v.push((input, Normalize, want, b"QUIT\r\n".to_vec()));
        }
        // SMUG-09: NUL before the dot: plain content under both policies.
        let input = [b"body\r\n\x00.\r\n".as_slice(), smuggled].concat();
        let want = [b"body\r\n\x00.\r\nMAIL FROM:<smuggled@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nsmuggled\r\n".as_slice()].concat();
        v.push((input.clone(), Reject, ok(&want), b"QUIT\r\n".to_vec()));
        v.push((input, Normalize, ok(&want), b"QUIT\r\n".to_vec()));
        v
    }

    #[test]
    fn data_vectors() {
        for (input, policy, want, rest) in vectors() {
            let (got, left, received) = whole(&input, policy);
            let show = String::from_utf8_lossy(&input);
            assert_eq!(got, want, "{policy:?} {show:?}");
            assert_eq!(left, rest, "{policy:?} {show:?}");
            assert_eq!(received as usize, input.len() - rest.len(), "{show:?}");
            let (ref_result, ref_consumed) = reference(&input, policy, BIG, LINE);
            assert_eq!(ref_result, want, "reference disagrees: {policy:?} {show:?}");
            assert_eq!(ref_consumed, input.len() - rest.len(), "{show:?}");
        }
    }

    /// A caller's prefix stays in front and is not counted; twice the input as spare room is
    /// enough for one feed, even when every octet is a bare LF normalised to CRLF.
    #[test]
    fn a_callers_buffer_keeps_its_prefix_and_never_reallocates_with_room_reserved() {
        let mut out = BytesMut::with_capacity(16);
        out.extend_from_slice(b"HEADROOM");
        let mut rx = DataReceiver::with_buffer(Normalize, 8, LINE, out);
        let mut input = BytesMut::from(&b"\n\n\n\r\n"[..]);
        let spare = 2 * input.len();
        rx.stored_mut().reserve(spare);
        let (ptr, capacity) = (rx.stored_mut().as_ptr(), rx.stored_mut().capacity());
        assert_eq!(rx.feed(&mut input), DataProgress::NeedMore);
        assert_eq!(rx.stored_mut().as_ptr(), ptr, "no reallocation");
        assert_eq!(rx.stored_mut().capacity(), capacity);
        let mut end = BytesMut::from(&b".\r\n"[..]);
        assert_eq!(rx.feed(&mut end), DataProgress::Done);
        let stored = rx.finish_buffer().unwrap();
        assert_eq!(
            &stored[..],
            b"HEADROOM\r\n\r\n\r\n\r\n",
            "8 octets: not too large"
        );
    }

    /// FUZZ-02 / SMUG-12 / PIPE-02: identical results however the input is split.
    #[test]
    fn results_do_not_depend_on_read_boundaries() {
        for (input, policy, want, rest) in vectors() {
            let show = String::from_utf8_lossy(&input);
            let expected = whole(&input, policy);
            assert_eq!((&expected.0, &expected.1), (&want, &rest));
            if input.len() <= 2000 {
                let bytes: Vec<&[u8]> = input.chunks(1).collect();
                assert_eq!(
                    run(&bytes, policy, BIG, LINE),
                    expected,
                    "byte-at-a-time {show:?}"
                );
                for split in 0..=input.len() {
                    let (a, b) = input.split_at(split);
                    assert_eq!(
                        run(&[a, b], policy, BIG, LINE),
                        expected,
                        "split {split} {show:?}"
                    );
                }
            } else {
                for size in [1, 7, 512, 4096] {
                    let chunks: Vec<&[u8]> = input.chunks(size).collect();
                    assert_eq!(
                        run(&chunks, policy, BIG, LINE),
                        expected,
                        "chunks of {size}"
                    );
                }
            }
        }
    }

    #[test]
    fn size_limit() {
        // Exactly at the limit: "abc\r\n" is 5 octets.
        assert_eq!(run(&[b"abc\r\n.\r\n"], Reject, 5, LINE).0, ok(b"abc\r\n"));
        assert_eq!(
            run(&[b"abcd\r\n.\r\n"], Reject, 5, LINE).0,
            err(DataError::TooLarge)
        );
        // Stuffing dots do not count.
        assert_eq!(run(&[b"..c\r\n.\r\n"], Reject, 4, LINE).0, ok(b".c\r\n"));
        // Empty message with a zero limit.
        assert_eq!(run(&[b".\r\n"], Reject, 0, LINE).0, ok(b""));
        // The first violation wins: size before a later bare LF, line length before size.
        assert_eq!(
            run(&[b"abcdef\r\nx\ny\r\n.\r\n"], Reject, 5, LINE).0,
            err(DataError::TooLarge)
        );
        assert_eq!(
            run(&[b"x\nabcdef\r\n.\r\n"], Reject, 5, LINE).0,
            err(DataError::BareLineEnding)
        );
        assert_eq!(
            run(&[b"abcdefghij\r\n.\r\n"], Reject, 8, 6).0,
            err(DataError::LineTooLong)
        );
        assert_eq!(
            run(&[b"abcdefghij\r\n.\r\n"], Reject, 3, 6).0,
            err(DataError::TooLarge)
        );
        // On a tie (same octet breaks both), TooLarge.
        assert_eq!(
            run(&[b"abcdefghij\r\n.\r\n"], Reject, 4, 6).0,
            err(DataError::TooLarge)
        );
    }

    /// SIZE-05/SIZE-06, LIM-04: after a violation nothing more is stored.
    #[test]
    fn memory_stays_flat_after_a_violation() {
        let mut rx = DataReceiver::new(Reject, 10_000, LINE);
        let mut buf = BytesMut::new();
        let line = [vec![b'x'; 78], b"\r\n".to_vec()].concat();
        for _ in 0..20_000 {
            buf.extend_from_slice(&line);
            assert_eq!(rx.feed(&mut buf), DataProgress::NeedMore);
            assert!(
                rx.out.capacity() <= 64 * 1024,
                "stored {} bytes",
                rx.out.capacity()
            );
        }
        assert_eq!(rx.error(), Some(DataError::TooLarge));
        buf.extend_from_slice(b".\r\nQUIT\r\n");
        assert_eq!(rx.feed(&mut buf), DataProgress::Done);
        assert_eq!(&buf[..], b"QUIT\r\n");
        assert_eq!(rx.bytes_received(), 20_000 * 80 + 3);
        assert_eq!(rx.finish(), Err(DataError::TooLarge));

        // A single endless line: also flat.
        let mut rx = DataReceiver::new(Normalize, BIG, LINE);
        for _ in 0..1000 {
            let mut chunk = BytesMut::from(&[b'y'; 10_000][..]);
            rx.feed(&mut chunk);
            assert!(rx.out.capacity() <= 64 * 1024);
        }
        assert_eq!(rx.error(), Some(DataError::LineTooLong));
    }

    #[test]
    fn finish_before_done_is_incomplete() {
        let mut rx = DataReceiver::new(Reject, BIG, LINE);
        let mut buf = BytesMut::from(&b"abc\r\n"[..]);
        assert_eq!(rx.feed(&mut buf), DataProgress::NeedMore);
        assert!(!rx.is_done());
        assert_eq!(rx.finish(), Err(DataError::Incomplete));
    }

    #[test]
    fn feeding_after_done_consumes_nothing() {
        let mut rx = DataReceiver::new(Reject, BIG, LINE);
        let mut buf = BytesMut::from(&b"a\r\n.\r\nb\r\n.\r\n"[..]);
        assert_eq!(rx.feed(&mut buf), DataProgress::Done);
        assert_eq!(rx.feed(&mut buf), DataProgress::Done);
        assert_eq!(&buf[..], b"b\r\n.\r\n");
        assert_eq!(rx.finish(), Ok(Bytes::from_static(b"a\r\n")));
    }

    #[test]
    fn error_replies() {
        let cases = [
            (DataError::BareLineEnding, 550, EnhancedCode(5, 6, 0)),
            (DataError::LineTooLong, 554, EnhancedCode(5, 6, 0)),
            (DataError::TooLarge, 552, EnhancedCode(5, 3, 4)),
            (DataError::Incomplete, 451, EnhancedCode(4, 3, 0)),
        ];
        for (e, code, enhanced) in cases {
            let r = e.reply();
            assert_eq!((r.code, r.enhanced), (code, Some(enhanced)), "{e:?}");
        }
    }

    /// FUZZ-04: the fast scanner agrees with the reference model on random streams drawn from
    /// the characters that matter (CR, LF, dot, NUL, text), under both policies and small
    /// limits, whatever the split. Also checks the stored-message invariant: only CRLF endings,
    /// and re-stuffing it yields exactly one message with the same content.
    #[test]
    fn agrees_with_reference_model_on_random_streams() {
        let alphabet = b"\r\n.\r\n.a\0b";
        let mut rng = crate::robustness_tests::XorShift(0x9e37_79b9_7f4a_7c15);
        for round in 0..4000 {
            let len = rng.below(40);
            let mut input: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            if round % 2 == 0 {
                input.extend_from_slice(b"\r\n.\r\nNEXT");
            }
            let policy = if round % 3 == 0 { Reject } else { Normalize };
            let (max_size, max_line) = if round % 5 == 0 {
                (rng.below(30) as u64, 2 + rng.below(8))
            } else {
                (BIG, LINE)
            };
            let (want, consumed) = reference(&input, policy, max_size, max_line);
            let split = rng.below(input.len() + 1);
            let (a, b) = input.split_at(split);
            let (got, left, received) = run(&[a, b], policy, max_size, max_line);
            let show = String::from_utf8_lossy(&input);
            assert_eq!(
                got, want,
                "{policy:?} size {max_size} line {max_line} split {split} {show:?}"
            );
            if want.is_some() {
                assert_eq!(left.len(), input.len() - consumed, "{show:?}");
                assert_eq!(received as usize, consumed, "{show:?}");
            }
            if let Some(Ok(message)) = &want {
                assert_stored_invariant(message);
            }
        }
    }

    fn assert_stored_invariant(message: &[u8]) {
        for (i, &b) in message.iter().enumerate() {
            if b == b'\r' {
                assert_eq!(
                    message.get(i + 1),
                    Some(&b'\n'),
                    "bare CR stored in {message:?}"
                );
            }
            if b == b'\n' {
                assert!(
                    i > 0 && message[i - 1] == b'\r',
                    "bare LF stored in {message:?}"
                );
            }
        }
        assert!(message.is_empty() || message.ends_with(b"\r\n"));
        let wire = crate::client::encode_data(message);
        let (again, left, _) = run(&[&wire], Reject, BIG, usize::MAX);
        assert_eq!(again, ok(message), "re-stuffed message does not round-trip");
        assert!(left.is_empty(), "re-stuffed message ends early: {wire:?}");
    }

    #[test]
    fn normalised_smuggling_vectors_keep_the_invariant() {
        for (_, policy, want, _) in vectors() {
            if let (Normalize, Some(Ok(message))) = (policy, want) {
                assert_stored_invariant(&message);
            }
        }
    }
}
