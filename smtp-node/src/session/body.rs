//! The message of a transaction in memory: the buffer DATA and BDAT store it in, grown only
//! with room from the node's memory budget ([`crate::memory`]), and [`Assembled`], the
//! received message with free room in front of it, where the header fields added at the end
//! of data (`Authentication-Results`, `Message-ID`, `Received`, `DKIM-Signature`) are written
//! one after the other without copying the message.
//!
//! A buffer grows exactly (a new allocation of the size asked for, then one copy), never by a
//! reallocation that may double it behind the budget's back; while it grows, the old and the
//! new allocation are both counted.

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use crate::memory::{NoRoom, Reservation};

/// Room in front of the message for the header fields this node adds: a `Received` field (up
/// to about 700 octets with a long HELO name and TLS details), an `Authentication-Results`
/// field, a `Message-ID`, and one `DKIM-Signature` per key (about 700 octets for RSA-2048).
/// More than this still works, at the price of one copy of the message.
pub(super) const HEADROOM: usize = 4 * 1024;

/// Message capacity allocated when a transfer starts: one read's worth (the session reads
/// message data 16 KiB at a time). Larger messages double it as they grow; smaller ones do not
/// pay (in memory, and against the budget) for room they never use.
const FIRST_CAPACITY: usize = 16 * 1024;

/// The capacity to start a transfer with, for a message of at most `size_limit` octets.
pub(super) fn first_capacity(size_limit: u64) -> usize {
    HEADROOM + usize::try_from(size_limit).map_or(FIRST_CAPACITY, |l| l.min(FIRST_CAPACITY))
}

/// An empty message buffer of `capacity` octets, the headroom already in place.
pub(super) fn buffer(capacity: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(capacity.max(HEADROOM));
    buf.resize(HEADROOM, 0);
    buf
}

/// The largest buffer a message of at most `size_limit` octets needs, plus `spare`.
pub(super) fn ceiling(size_limit: u64, spare: usize) -> usize {
    HEADROOM
        .saturating_add(usize::try_from(size_limit).unwrap_or(usize::MAX))
        .saturating_add(spare)
}

/// Makes room for `spare` more octets in `buf` without a hidden reallocation: a new buffer of
/// twice the capacity (at most `ceiling`, at least what is needed), counted in `held` before
/// it is allocated. Waits until `deadline` for the budget.
pub(super) async fn ensure_spare(
    buf: &mut BytesMut,
    spare: usize,
    ceiling: usize,
    held: &mut Reservation,
    deadline: Instant,
) -> Result<(), NoRoom> {
    let needed = buf.len().saturating_add(spare);
    if needed <= buf.capacity() {
        return Ok(());
    }
    let wanted = buf.capacity().saturating_mul(2).min(ceiling).max(needed);
    // The old buffer lives until its bytes are copied into the new one.
    held.grow_to((buf.capacity() + wanted) as u64, deadline)
        .await?;
    let mut grown = BytesMut::with_capacity(wanted);
    grown.extend_from_slice(buf);
    *buf = grown;
    held.shrink_to(buf.capacity() as u64);
    Ok(())
}

/// A received message, with free room in front for header fields.
#[derive(Debug)]
pub(super) struct Assembled {
    buf: BytesMut,
    /// `buf[start..]` is the message; `buf[..start]` is free.
    start: usize,
}

impl Assembled {
    /// `buf[start..]` is the message.
    pub(super) fn new(buf: BytesMut, start: usize) -> Self {
        debug_assert!(start <= buf.len());
        Self { buf, start }
    }

    /// A copy of `message`, with the usual headroom.
    pub(super) fn copy_of(message: &[u8]) -> Self {
        let mut buf = buffer(HEADROOM + message.len());
        buf.extend_from_slice(message);
        Self::new(buf, HEADROOM)
    }

    /// A copy of `message` without its NUL octets, with the usual headroom.
    pub(super) fn copy_without_nul(message: &[u8]) -> Self {
        let mut buf = buffer(HEADROOM + message.len());
        for part in message.split(|&b| b == 0) {
            buf.extend_from_slice(part);
        }
        Self::new(buf, HEADROOM)
    }

    /// A message checked after it was frozen: `whole[HEADROOM..]` was handed to a check that
    /// returned `checked`. When the check changed nothing, the buffer is taken back without a
    /// copy (the check's view is dropped, so the buffer has one owner again).
    pub(super) fn from_checked(whole: Bytes, checked: Bytes) -> Self {
        let unchanged = whole.len() >= HEADROOM
            && checked.len() == whole.len() - HEADROOM
            && checked.as_ptr() == whole[HEADROOM..].as_ptr();
        if !unchanged {
            return Self::copy_of(&checked);
        }
        drop(checked);
        match whole.try_into_mut() {
            Ok(buf) => Self::new(buf, HEADROOM),
            Err(whole) => Self::copy_of(&whole[HEADROOM..]),
        }
    }

    /// The message with everything prepended so far.
    pub(super) fn message(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Puts `field` (complete, CRLF-terminated header lines) in front of the message.
    pub(super) fn prepend(&mut self, field: &[u8]) {
        if field.len() <= self.start {
            let at = self.start - field.len();
            self.buf[at..self.start].copy_from_slice(field);
            self.start = at;
            return;
        }
        let mut grown = buffer(HEADROOM + field.len() + self.message().len());
        grown.extend_from_slice(field);
        grown.extend_from_slice(self.message());
        *self = Self::new(grown, HEADROOM);
    }

    /// The message as shared bytes (entries of several domains share one copy).
    pub(super) fn freeze(self) -> Bytes {
        self.buf.freeze().slice(self.start..)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::memory::MessageMemory;

    #[test]
    fn headers_go_in_front_without_moving_the_message() {
        let mut buf = buffer(HEADROOM + 64);
        buf.extend_from_slice(b"Subject: x\r\n\r\nbody\r\n");
        let mut m = Assembled::new(buf, HEADROOM);
        let body_at = m.message().as_ptr();
        m.prepend(b"Authentication-Results: mx; none\r\n");
        m.prepend(b"Received: from a by b\r\n");
        assert_eq!(
            m.message(),
            b"Received: from a by b\r\nAuthentication-Results: mx; none\r\nSubject: x\r\n\r\nbody\r\n"
        );
        let frozen = m.freeze();
        assert_eq!(
            frozen[frozen.len() - 20..].as_ptr(),
            body_at,
            "the message was not copied"
        );
    }

    #[test]
    fn more_than_the_headroom_costs_one_copy() {
        let mut m = Assembled::copy_of(b"body\r\n");
        let big = vec![b'x'; HEADROOM + 1];
        m.prepend(&big);
        m.prepend(b"Received: y\r\n");
        assert_eq!(m.message().len(), 13 + HEADROOM + 1 + 6);
        assert!(m.message().starts_with(b"Received: y\r\nxxx"));
        assert!(m.message().ends_with(b"xbody\r\n"));
    }

    #[test]
    fn nul_octets_are_left_out_of_the_copy() {
        let m = Assembled::copy_of(b"a\0b\r\n\0.\r\n\0");
        let mut copy = Assembled::copy_without_nul(m.message());
        assert_eq!(copy.message(), b"ab\r\n.\r\n");
        copy.prepend(b"Received: x\r\n");
        assert_eq!(copy.message(), b"Received: x\r\nab\r\n.\r\n");
    }

    #[test]
    fn a_checked_message_is_taken_back_without_a_copy() {
        let mut buf = buffer(HEADROOM + 16);
        buf.extend_from_slice(b"hello\r\n");
        let whole = buf.freeze();
        let at = whole[HEADROOM..].as_ptr();
        let view = whole.slice(HEADROOM..);
        let m = Assembled::from_checked(whole, view);
        assert_eq!(m.message(), b"hello\r\n");
        assert_eq!(m.message().as_ptr(), at);
        let whole = Bytes::from(vec![0u8; HEADROOM + 3]);
        let m = Assembled::from_checked(whole, Bytes::from_static(b"rewritten\r\n"));
        assert_eq!(m.message(), b"rewritten\r\n");
    }

    #[tokio::test]
    async fn growth_is_exact_and_counted() {
        let memory = MessageMemory::new(1 << 20, Duration::from_millis(20));
        let mut held = memory.reservation();
        let deadline = Instant::now() + Duration::from_millis(20);
        held.grow_to(first_capacity(1 << 20) as u64, deadline)
            .await
            .unwrap();
        let mut buf = buffer(first_capacity(1 << 20));
        buf.resize(buf.capacity(), b'a');
        ensure_spare(&mut buf, 10, ceiling(1 << 20, 10), &mut held, deadline)
            .await
            .unwrap();
        assert_eq!(buf.capacity(), 2 * first_capacity(1 << 20));
        assert_eq!(
            held.bytes(),
            buf.capacity() as u64,
            "only the new buffer stays counted"
        );
        // The ceiling caps the doubling; what is needed is always granted.
        let mut other = memory.reservation();
        let mut small = buffer(HEADROOM + 10);
        small.resize(small.capacity(), b'a');
        ensure_spare(&mut small, 5, HEADROOM + 12, &mut other, deadline)
            .await
            .unwrap();
        assert_eq!(small.capacity(), HEADROOM + 15);
        // No room: the buffer stays as it was.
        let mut huge = buffer(HEADROOM);
        assert_eq!(
            ensure_spare(&mut huge, 2 << 20, usize::MAX, &mut other, deadline).await,
            Err(NoRoom)
        );
        assert_eq!(huge.capacity(), HEADROOM);
    }
}
