//! CHUNKING (RFC 3030): reading exactly the announced number of octets of a BDAT chunk, and
//! checking the assembled message's line endings so that BDAT cannot bypass the rules DATA
//! enforces.
//!
//! BDAT data is length-delimited: no dot-stuffing, and `\r\n.\r\n` inside a chunk is plain
//! content (EXT-14). The receiver never allocates from the announced size (EXT-15): it moves
//! what arrives, so a huge `BDAT n` costs nothing until the octets are really sent, and the
//! session compares `n` with its size limit before storing anything. When the session refuses
//! a BDAT command it must still consume the chunk ([`BdatReceiver::feed_discard`]), or the
//! chunk's octets would be read as commands (EXT-13).
//!
//! Line endings are checked on the whole assembled message, not per chunk, because a CRLF may
//! be split across two chunks. RFC 3030 §3 requires canonical CRLF text for 7BIT/8BITMIME
//! bodies; only `BODY=BINARYMIME` may carry bare CR/LF, and the session must not call
//! [`check_bdat_message`] for it (we do not advertise BINARYMIME).

use bytes::{Buf, Bytes, BytesMut};

use super::data::{BareEolPolicy, DataError, DataProgress};

/// Reads the `size` octets of one BDAT chunk from the input buffer.
#[derive(Debug, Clone)]
pub struct BdatReceiver {
    remaining: u64,
}

impl BdatReceiver {
    /// A receiver for a chunk of `size` octets (the argument of `BDAT <size>`).
    pub fn new(size: u64) -> Self {
        Self { remaining: size }
    }

    /// Moves up to the remaining chunk octets from `buf` to the end of `out`; bytes after the
    /// chunk stay in `buf` (the next command). `Done` once the whole chunk has been read.
    pub fn feed(&mut self, buf: &mut BytesMut, out: &mut BytesMut) -> DataProgress {
        let n = self.take(buf.len());
        out.extend_from_slice(&buf[..n]);
        buf.advance(n);
        self.progress()
    }

    /// Consumes up to the remaining chunk octets from `buf` without storing them: for a chunk
    /// the session refused (BDAT before MAIL, over the size limit, after an error).
    pub fn feed_discard(&mut self, buf: &mut BytesMut) -> DataProgress {
        let n = self.take(buf.len());
        buf.advance(n);
        self.progress()
    }

    /// Octets of the chunk not read yet.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    fn take(&mut self, available: usize) -> usize {
        // `n <= available`, so it fits in usize.
        let n = self.remaining.min(available as u64);
        self.remaining -= n;
        n as usize
    }

    fn progress(&self) -> DataProgress {
        if self.remaining == 0 {
            DataProgress::Done
        } else {
            DataProgress::NeedMore
        }
    }
}

/// Checks a message assembled from BDAT chunks for bare CR and bare LF, and for text lines
/// longer than `max_line` octets including CRLF (RFC 5321 §4.5.3.1.6; pass `usize::MAX` to
/// skip that check).
///
/// * [`BareEolPolicy::Reject`]: any bare CR or LF gives [`DataError::BareLineEnding`]
///   (Postfix's `smtpd_forbid_bare_newline = reject` also rejects BDAT, EXT-17).
/// * [`BareEolPolicy::Normalize`]: each bare CR or LF is rewritten to CRLF.
///
/// A message whose last line has no CRLF is returned as is (RFC 3030 allows it); whoever
/// sends it on with DATA appends the CRLF before the terminator. A CR at
/// the very end is bare. The message is returned unchanged (no copy) when it needs no rewrite.
pub fn check_bdat_message(
    message: Bytes,
    policy: BareEolPolicy,
    max_line: usize,
) -> Result<Bytes, DataError> {
    let max_content = max_line.saturating_sub(2);
    let mut rewritten: Option<BytesMut> = None;
    let mut copied = 0; // message[..copied] is already in `rewritten`
    let mut line_start = 0;
    let mut pos = 0;
    while let Some(k) = memchr::memchr2(b'\r', b'\n', &message[pos..]) {
        let at = pos + k;
        if at - line_start > max_content {
            return Err(DataError::LineTooLong);
        }
        let (is_crlf, next) = match message[at] {
            b'\r' if message.get(at + 1) == Some(&b'\n') => (true, at + 2),
            _ => (false, at + 1),
        };
        if !is_crlf {
            if policy == BareEolPolicy::Reject {
                return Err(DataError::BareLineEnding);
            }
            let out = rewritten.get_or_insert_with(|| BytesMut::with_capacity(message.len() + 16));
            out.extend_from_slice(&message[copied..at]);
            out.extend_from_slice(b"\r\n");
            copied = next;
        }
        line_start = next;
        pos = next;
    }
    if message.len() - line_start > max_content {
        return Err(DataError::LineTooLong);
    }
    match rewritten {
        None => Ok(message),
        Some(mut out) => {
            out.extend_from_slice(&message[copied..]);
            Ok(out.freeze())
        }
    }
}

/// [`check_bdat_message`] in pieces, for a message that is passed on while it arrives: each
/// piece is checked and appended to `out` with its line endings normalized as the whole
/// message would be. A CR at the end of a piece waits for the next one (it may be the first
/// half of a CRLF); [`Self::finish`] decides about a CR at the very end.
#[derive(Debug, Clone)]
pub struct BdatLineCheck {
    policy: BareEolPolicy,
    max_content: usize,
    /// Octets of the current line so far (its content, without a line ending).
    line_len: usize,
    pending_cr: bool,
}

impl BdatLineCheck {
    pub fn new(policy: BareEolPolicy, max_line: usize) -> Self {
        Self {
            policy,
            max_content: max_line.saturating_sub(2),
            line_len: 0,
            pending_cr: false,
        }
    }

    /// Checks the next octets of the message and appends them to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut BytesMut) -> Result<(), DataError> {
        let mut pos = 0;
        if self.pending_cr && !input.is_empty() {
            self.pending_cr = false;
            if input[0] == b'\n' {
                pos = 1;
            } else if self.policy == BareEolPolicy::Reject {
                return Err(DataError::BareLineEnding);
            }
            out.extend_from_slice(b"\r\n");
        }
        let mut carried = self.line_len;
        let mut line_start = pos;
        let mut copied = pos;
        while let Some(k) = memchr::memchr2(b'\r', b'\n', &input[pos..]) {
            let at = pos + k;
            if carried + (at - line_start) > self.max_content {
                return Err(DataError::LineTooLong);
            }
            if input[at] == b'\r' && at + 1 == input.len() {
                out.extend_from_slice(&input[copied..at]);
                self.pending_cr = true;
                self.line_len = 0;
                return Ok(());
            }
            let (is_crlf, next) = match input[at] {
                b'\r' if input[at + 1] == b'\n' => (true, at + 2),
                _ => (false, at + 1),
            };
            if !is_crlf {
                if self.policy == BareEolPolicy::Reject {
                    return Err(DataError::BareLineEnding);
                }
                out.extend_from_slice(&input[copied..at]);
                out.extend_from_slice(b"\r\n");
                copied = next;
            }
            carried = 0;
            line_start = next;
            pos = next;
        }
        self.line_len = carried + (input.len() - line_start);
        if self.line_len > self.max_content {
            return Err(DataError::LineTooLong);
        }
        out.extend_from_slice(&input[copied..]);
        Ok(())
    }

    /// Ends the message: a CR at its very end is bare.
    pub fn finish(&mut self, out: &mut BytesMut) -> Result<(), DataError> {
        if std::mem::take(&mut self.pending_cr) {
            if self.policy == BareEolPolicy::Reject {
                return Err(DataError::BareLineEnding);
            }
            out.extend_from_slice(b"\r\n");
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use BareEolPolicy::{Normalize, Reject};

    #[test]
    fn reads_exactly_the_chunk_size() {
        // EXT-12 / EXT-14 / FUZZ-03: exactly `size` octets, whatever they contain, however split.
        let stream = b"Subject: x\r\n\r\nA\r\n.\r\nRSET\r\nQUIT\r\n";
        let size = 20u64;
        assert_eq!(&stream[..20], b"Subject: x\r\n\r\nA\r\n.\r\n");
        for split in 0..=stream.len() {
            let mut rx = BdatReceiver::new(size);
            let mut out = BytesMut::new();
            let mut buf = BytesMut::from(&stream[..split]);
            let first = rx.feed(&mut buf, &mut out);
            buf.extend_from_slice(&stream[split..]);
            let second = rx.feed(&mut buf, &mut out);
            assert_eq!(first == DataProgress::Done, split >= 20, "split {split}");
            assert_eq!(second, DataProgress::Done);
            assert_eq!(&out[..], &stream[..20]);
            assert_eq!(&buf[..], b"RSET\r\nQUIT\r\n");
            assert_eq!(rx.remaining(), 0);
        }
    }

    #[test]
    fn zero_size_chunk_is_done_at_once() {
        let mut rx = BdatReceiver::new(0);
        let mut buf = BytesMut::from(&b"QUIT\r\n"[..]);
        let mut out = BytesMut::new();
        assert_eq!(rx.feed(&mut buf, &mut out), DataProgress::Done);
        assert!(out.is_empty());
        assert_eq!(&buf[..], b"QUIT\r\n");
    }

    #[test]
    fn discarding_still_consumes_the_chunk() {
        // EXT-13: a refused "BDAT 10" must not let "RSET\r\n" inside it run as a command.
        let mut rx = BdatReceiver::new(10);
        let mut buf = BytesMut::from(&b"RSET\r\nabcdNOOP\r\n"[..]);
        assert_eq!(rx.feed_discard(&mut buf), DataProgress::Done);
        assert_eq!(&buf[..], b"NOOP\r\n");
    }

    #[test]
    fn huge_announced_size_allocates_nothing() {
        // EXT-15: BDAT 18446744073709551615 only consumes what arrives.
        let mut rx = BdatReceiver::new(u64::MAX);
        let mut buf = BytesMut::from(&b"abc"[..]);
        let mut out = BytesMut::new();
        assert_eq!(rx.feed(&mut buf, &mut out), DataProgress::NeedMore);
        assert_eq!(rx.remaining(), u64::MAX - 3);
        assert_eq!(out.len(), 3);
        assert!(buf.is_empty());
    }

    #[test]
    fn line_ending_vectors() {
        let long = [vec![b'a'; 998], b"\r\n".to_vec()].concat();
        let too_long = [vec![b'a'; 999], b"\r\n".to_vec()].concat();
        type Case<'a> = (&'a [u8], BareEolPolicy, Result<&'a [u8], DataError>);
        let cases: Vec<Case> = vec![
            (b"", Reject, Ok(b"")),
            (b"a\r\nb\r\n", Reject, Ok(b"a\r\nb\r\n")),
            (b"no final crlf", Reject, Ok(b"no final crlf")),
            // EXT-14: a dot line is content.
            (
                b"a\r\n.\r\nMAIL FROM:<x@y>\r\n",
                Reject,
                Ok(b"a\r\n.\r\nMAIL FROM:<x@y>\r\n"),
            ),
            // EXT-17
            (b"a\nb\r\n", Reject, Err(DataError::BareLineEnding)),
            (b"a\rb\r\n", Reject, Err(DataError::BareLineEnding)),
            (b"a\r\r\n", Reject, Err(DataError::BareLineEnding)),
            (b"a\r", Reject, Err(DataError::BareLineEnding)),
            (b"\n.\n", Reject, Err(DataError::BareLineEnding)),
            (b"a\nb\r\n", Normalize, Ok(b"a\r\nb\r\n")),
            (b"a\rb\r\n", Normalize, Ok(b"a\r\nb\r\n")),
            (b"a\r\r\n", Normalize, Ok(b"a\r\n\r\n")),
            (b"a\r", Normalize, Ok(b"a\r\n")),
            (b"\n.\n", Normalize, Ok(b"\r\n.\r\n")),
            (b"\n\r", Normalize, Ok(b"\r\n\r\n")),
            (b"x\n\r\ny", Normalize, Ok(b"x\r\n\r\ny")),
            (&long, Reject, Ok(&long)),
            (&too_long, Reject, Err(DataError::LineTooLong)),
            (&too_long[..999], Reject, Err(DataError::LineTooLong)),
        ];
        for (input, policy, want) in cases {
            let got = check_bdat_message(Bytes::copy_from_slice(input), policy, 1000);
            let show = String::from_utf8_lossy(input);
            assert_eq!(
                got.clone().map(|b| b.to_vec()),
                want.map(<[u8]>::to_vec),
                "{policy:?} {show:?}"
            );
            // A normalised message never contains a bare CR or LF.
            if let Ok(out) = got {
                assert_eq!(
                    check_bdat_message(out, Reject, usize::MAX).map(|_| ()),
                    Ok(())
                );
            }
        }
    }

    #[test]
    fn unchanged_messages_are_not_copied() {
        let message = Bytes::from_static(b"a\r\nb\r\n");
        let checked = check_bdat_message(message.clone(), Normalize, 1000).unwrap();
        assert_eq!(checked.as_ptr(), message.as_ptr());
    }

    #[test]
    fn the_check_in_pieces_agrees_with_the_whole_message_check() {
        // Messages of text, CR, LF and CRLF, every way of cutting them in two or three.
        let alphabet: &[&[u8]] = &[b"ab", b"\r", b"\n", b"\r\n", b"xyz", b"\r\r"];
        let mut messages: Vec<Vec<u8>> = vec![Vec::new()];
        for _ in 0..4 {
            let mut next = Vec::new();
            for m in &messages {
                for a in alphabet {
                    let mut n = m.clone();
                    n.extend_from_slice(a);
                    next.push(n);
                }
            }
            messages.extend(next);
            messages.sort();
            messages.dedup();
        }
        for policy in [Normalize, Reject] {
            for max_line in [5, 7, usize::MAX] {
                for m in &messages {
                    let whole = check_bdat_message(Bytes::from(m.clone()), policy, max_line);
                    for i in 0..=m.len() {
                        for j in i..=m.len() {
                            let mut check = BdatLineCheck::new(policy, max_line);
                            let mut out = BytesMut::new();
                            let result = check
                                .feed(&m[..i], &mut out)
                                .and_then(|()| check.feed(&m[i..j], &mut out))
                                .and_then(|()| check.feed(&m[j..], &mut out))
                                .and_then(|()| check.finish(&mut out));
                            match (&whole, result) {
                                (Ok(w), Ok(())) => assert_eq!(&w[..], &out[..], "{m:?} at {i},{j}"),
                                (Err(a), Err(b)) => assert_eq!(*a, b, "{m:?} at {i},{j}"),
                                (w, r) => panic!("{m:?} at {i},{j}: whole {w:?}, pieces {r:?}"),
                            }
                        }
                    }
                }
            }
        }
    }
}
