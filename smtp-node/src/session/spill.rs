//! Large messages stored while they arrive (DATA): once a message is larger than what an
//! entry carries inline ([`crate::queue::Queue::streaming_threshold`]) and its header section
//! is complete, its body goes chunk by chunk to the object store of each destination domain
//! ([`crate::queue::upload`]); the session keeps only the header section, so a 24 MiB message
//! holds about a megabyte of the node's memory budget instead of 24.
//!
//! What the end of data needs from the body is computed on the way: the digest for the
//! content id, the DKIM body hashes the message's signatures ask for (inbound checks), the
//! body hash of our own signature (submission), and whether it has NUL octets. The header
//! section gets the same checks and added fields as a message held whole; the entries carry
//! it, and their object holds the body after it. A message refused after its body was stored
//! (or whose client went away) drops its uploads, which delete their objects.

use bytes::{Bytes, BytesMut};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::Session;
use super::body::HEADROOM;
use crate::config::{ListenerKind, NulBytes};
use crate::dkim::{BodyHash, BodyHashValue};
use crate::memory::Reservation;
use crate::queue::EnqueueError;
use crate::queue::upload::{self, BodyUpload, StoredBody};

/// Body octets the session gathers before handing them to the uploads as one chunk.
pub(super) const CHUNK: usize = upload::CHUNK;

/// The offset of the body in `message` (after the empty line that ends the header section),
/// or `None` while the header section is not complete. `message` has CRLF line endings;
/// `message[..scanned]` was looked at before and has no end of the header section.
pub(super) fn body_offset(message: &[u8], scanned: usize) -> Option<usize> {
    if message.starts_with(b"\r\n") {
        return Some(2);
    }
    let from = scanned.saturating_sub(3).min(message.len());
    memchr::memmem::find(&message[from..], b"\r\n\r\n").map(|at| from + at + 4)
}

/// Memory a spilling session holds besides its header section: the chunk being gathered
/// (with room for one more read, `spare`), the chunks on their way to the uploads, and each
/// upload's own buffer.
pub(super) fn memory(uploads: usize, spare: usize) -> usize {
    (upload::DEPTH + 2) * (CHUNK + spare) + uploads * upload::OWN_MEMORY
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// Opens the uploads of the current transaction's message (one per destination domain),
    /// whose header section is `header_section` and which holds `whole` octets of buffers
    /// until its body is handed on, and takes the room a spilling session needs from the
    /// budget. Returns the spill and that room (what `held` may shrink to once the body so
    /// far was handed on). `None` (the message stays whole) when the budget has no room or
    /// the object store cannot be written.
    pub(super) async fn open_spill(
        &self,
        header_section: &[u8],
        whole: usize,
        held: &mut Reservation,
    ) -> Option<(Spill, u64)> {
        let tx = self.tx.as_ref()?;
        let mut domains: Vec<String> = match &self.user {
            Some(user) => vec![user.domain.clone()],
            None => tx
                .recipients
                .iter()
                .map(|r| r.domain().to_owned())
                .collect(),
        };
        domains.sort();
        domains.dedup();
        let spare = 2 * self.rbuf.len();
        let needed = (HEADROOM + header_section.len() + memory(domains.len(), spare)) as u64;
        let budget = self.ctx.memory.clone();
        // The message so far stays until its body is handed on.
        let before = held.bytes();
        let now = before.max(needed + whole as u64);
        if held
            .grow_to(now, Instant::now() + budget.wait())
            .await
            .is_err()
        {
            return None;
        }
        let mut uploads = Vec::with_capacity(domains.len());
        for domain in &domains {
            let entry_id = kubemail_queue::entry_id(&tx.queue_id, domain);
            match self.ctx.queue.upload(domain, entry_id) {
                Ok(upload) => uploads.push(upload),
                Err(error) => {
                    tracing::info!(%error, "cannot store the body while it arrives; keeping it whole");
                    held.shrink_to(before);
                    return None;
                }
            }
        }
        let inbound_checks = self.user.is_none()
            && self.conn.listener.kind == ListenerKind::Mx
            && self
                .ctx
                .checks
                .inbound_auth
                .as_ref()
                .is_some_and(|v| v.enabled());
        let verify = if inbound_checks {
            BodyHash::requested_by(header_section)
        } else {
            Vec::new()
        };
        let sign = self.user.is_some() && self.ctx.checks.dkim.is_some();
        let strip = self.conn.listener.nul_bytes == NulBytes::Strip;
        self.ctx.metrics.message_bodies_streamed.inc();
        tracing::debug!(
            header_section = header_section.len(),
            uploads = uploads.len(),
            "storing the message body while it arrives"
        );
        Some((Spill::new(uploads, strip, verify, sign), needed))
    }
}

/// The body of one message on its way to the object store.
pub(super) struct Spill {
    uploads: Vec<BodyUpload>,
    /// The body as stored (after NUL octets were removed, where they are).
    digest: Sha256,
    size: u64,
    /// Whether the body has NUL octets (it is not stored further once it has, unless they
    /// are removed).
    nul: bool,
    strip_nul: bool,
    verify: Vec<BodyHash>,
    sign: Option<BodyHash>,
    failed: Option<EnqueueError>,
}

/// What the content id of a stored body adds for it ([`crate::queue::ContentId::new`] takes
/// the header section as the message).
pub(super) struct Tail {
    pub size: u64,
    pub digest: [u8; 32],
}

impl Spill {
    /// A body to store with `uploads` (one per destination domain). `verify` are the body
    /// hashes the message's signatures ask for; `sign` whether our signature needs one.
    pub(super) fn new(
        uploads: Vec<BodyUpload>,
        strip_nul: bool,
        verify: Vec<BodyHash>,
        sign: bool,
    ) -> Self {
        Self {
            uploads,
            digest: Sha256::new(),
            size: 0,
            nul: false,
            strip_nul,
            verify,
            sign: sign.then(BodyHash::ours),
            failed: None,
        }
    }

    /// Hands the next part of the body on. A failed upload is remembered (the message is
    /// then refused at its end) and nothing more is stored.
    pub(super) async fn write(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        let chunk = if memchr::memchr(0, &chunk).is_some() {
            self.nul = true;
            if !self.strip_nul {
                // Refused at the end of data: no use storing more.
                return;
            }
            let mut kept = BytesMut::with_capacity(chunk.len());
            for part in chunk.split(|&b| b == 0) {
                kept.extend_from_slice(part);
            }
            kept.freeze()
        } else {
            chunk
        };
        if self.nul && !self.strip_nul {
            return;
        }
        self.digest.update(&chunk);
        self.size += chunk.len() as u64;
        for hash in self.verify.iter_mut().chain(self.sign.as_mut()) {
            hash.update(&chunk);
        }
        if self.failed.is_some() {
            return;
        }
        for upload in &mut self.uploads {
            if let Err(error) = upload.write(chunk.clone()).await {
                tracing::warn!(%error, domain = upload.domain(), "storing the message body failed");
                self.failed = Some(error);
                return;
            }
        }
    }

    /// Whether the body has NUL octets that are not removed: the message is refused.
    pub(super) fn refuses_nul(&self) -> bool {
        self.nul && !self.strip_nul
    }

    /// Octets of the body stored so far.
    pub(super) fn size(&self) -> u64 {
        self.size
    }

    /// Size and digest of the body as stored.
    pub(super) fn tail(&self) -> Tail {
        Tail {
            size: self.size,
            digest: self.digest.clone().finalize().into(),
        }
    }

    /// The body hashes the message's signatures asked for.
    pub(super) fn take_verify_hashes(&mut self) -> Vec<BodyHashValue> {
        std::mem::take(&mut self.verify)
            .into_iter()
            .map(BodyHash::finish)
            .collect()
    }

    /// The body hash of our signature.
    pub(super) fn take_sign_hash(&mut self) -> Option<BodyHashValue> {
        self.sign.take().map(BodyHash::finish)
    }

    /// Ends every object; `Ok` once all are stored.
    pub(super) async fn store(mut self) -> Result<Vec<StoredBody>, EnqueueError> {
        if let Some(error) = self.failed.take() {
            return Err(error);
        }
        let mut stored = Vec::with_capacity(self.uploads.len());
        for upload in std::mem::take(&mut self.uploads) {
            // A failure drops the uploads not yet finished, which delete their objects; those
            // finished before it are not referred to by any entry and not marked, so the
            // sweeper removes them after its grace time.
            stored.push(upload.finish().await?);
        }
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::body_offset;

    #[test]
    fn the_body_starts_after_the_first_empty_line() {
        assert_eq!(body_offset(b"\r\nbody", 0), Some(2));
        assert_eq!(body_offset(b"A: b\r\n\r\nbody\r\n\r\n", 0), Some(8));
        assert_eq!(body_offset(b"A: b\r\nC: d\r\n", 0), None);
        assert_eq!(body_offset(b"", 0), None);
        // An end that straddles what was scanned before and what came since.
        assert_eq!(body_offset(b"A: b\r\n\r\nbody", 7), Some(8));
        assert_eq!(body_offset(b"A: b\r\n", 99), None);
    }
}
