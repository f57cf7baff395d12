//! A large message body stored in the object store while it arrives, so a session holds a
//! bounded part of it in memory, not all of it (see `session::spill`).
//!
//! The session writes the body after the header section in chunks of [`CHUNK`] octets; a
//! task stores them as one object of the domain's body bucket (async-nats `put`, each chunk
//! acknowledged before the next). [`BodyUpload::finish`] ends the object and tells its size;
//! the entry that refers to it is published afterwards, as for a body stored whole. An upload
//! dropped without `finish` (the message was refused, the client went away) deletes its
//! object once the put has ended; an object that outlives a crash is the sweeper's
//! ([`super::sweeper`]), which removes unmarked objects past their grace time.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use async_nats::jetstream::object_store::ObjectStore;
use bytes::Bytes;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::EnqueueError;

/// Octets per stored chunk (async-nats' default object chunk size): the session hands over
/// its body in pieces of about this size, each one NATS message and one acknowledgement.
pub const CHUNK: usize = 128 * 1024;

/// Chunks handed over but not yet read by the put task. With the put's own chunk buffer,
/// an upload holds at most `(DEPTH + 1) * CHUNK` octets of body beyond the session's buffer.
pub const DEPTH: usize = 2;

/// Memory one upload holds besides the chunks it shares with the session's other uploads:
/// the put's chunk buffer.
pub const OWN_MEMORY: usize = CHUNK;

/// A body object being written. Dropped without [`Self::finish`], it removes its object.
pub struct BodyUpload {
    domain: String,
    reference: String,
    sender: Option<mpsc::Sender<Bytes>>,
    finished: Arc<AtomicBool>,
    task: Option<JoinHandle<Result<u64, EnqueueError>>>,
    written: u64,
}

/// A body object completely stored: the entry of `domain` refers to it with `reference`
/// (`<bucket>/<object>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBody {
    pub domain: String,
    pub reference: String,
    pub size: u64,
}

impl BodyUpload {
    /// Starts storing object `object` in `store`, the body bucket of `domain`; `reference`
    /// is what the entry will carry. `abandoned` counts objects removed because their message
    /// was not queued.
    pub fn start(
        store: ObjectStore,
        domain: &str,
        object: String,
        reference: String,
        abandoned: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        let (sender, receiver) = mpsc::channel::<Bytes>(DEPTH);
        let finished = Arc::new(AtomicBool::new(false));
        let done = finished.clone();
        let task = tokio::spawn(async move {
            let mut reader = ChannelReader {
                receiver,
                current: Bytes::new(),
            };
            let result = store.put(object.as_str(), &mut reader).await;
            match result {
                // The channel closed without `finish`: the object holds a message that was not
                // queued.
                Ok(_) if !done.load(Ordering::SeqCst) => {
                    if super::sweeper::delete_orphan(&store, &object).await {
                        abandoned.inc();
                    }
                    Err(EnqueueError::Unavailable(
                        "body upload abandoned".to_owned(),
                    ))
                }
                Ok(info) => Ok(info.size as u64),
                Err(error) => Err(super::jetstream::classify(&error, "store body")),
            }
        });
        Self {
            domain: domain.to_owned(),
            reference,
            sender: Some(sender),
            finished,
            task: Some(task),
            written: 0,
        }
    }

    /// The domain whose bucket the object is in.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Hands `chunk` to the put, waiting while [`DEPTH`] chunks are ahead of it. `Err` when
    /// the put failed; the upload is of no further use then.
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), EnqueueError> {
        let len = chunk.len() as u64;
        let sent = match &self.sender {
            Some(sender) => sender.send(chunk).await.is_ok(),
            None => false,
        };
        if sent {
            self.written += len;
            return Ok(());
        }
        // The task stopped reading: its put failed.
        self.sender = None;
        match self.task.take() {
            Some(task) => match task.await {
                Ok(Err(error)) => Err(error),
                Ok(Ok(_)) | Err(_) => Err(EnqueueError::Unavailable(
                    "body upload ended early".to_owned(),
                )),
            },
            None => Err(EnqueueError::Unavailable("body upload failed".to_owned())),
        }
    }

    /// Ends the object and waits until it is stored.
    pub async fn finish(mut self) -> Result<StoredBody, EnqueueError> {
        self.finished.store(true, Ordering::SeqCst);
        self.sender = None;
        let Some(task) = self.task.take() else {
            return Err(EnqueueError::Unavailable("body upload failed".to_owned()));
        };
        let size = match task.await {
            Ok(result) => result?,
            Err(error) => {
                return Err(EnqueueError::Unavailable(format!(
                    "body upload task: {error}"
                )));
            }
        };
        if size != self.written {
            return Err(EnqueueError::Unavailable(format!(
                "body object holds {size} octets of {}",
                self.written
            )));
        }
        Ok(StoredBody {
            domain: std::mem::take(&mut self.domain),
            reference: std::mem::take(&mut self.reference),
            size,
        })
    }
}

impl Drop for BodyUpload {
    fn drop(&mut self) {
        // Closing the channel ends the put; unless `finish` said otherwise, the task then
        // deletes the object. The task runs on without this handle.
        self.sender = None;
    }
}

/// The put's reader: the chunks the session hands over, in order; end of file once the
/// session closes the channel.
struct ChannelReader {
    receiver: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl AsyncRead for ChannelReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.current.is_empty() {
            match self.receiver.poll_recv(cx) {
                Poll::Ready(Some(chunk)) => self.current = chunk,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = self.current.len().min(buf.remaining());
        let piece = self.current.split_to(n);
        buf.put_slice(&piece);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::ChannelReader;
    use bytes::Bytes;
    use tokio::io::AsyncReadExt as _;

    #[tokio::test]
    async fn the_reader_yields_the_chunks_in_order_then_the_end() {
        let (sender, receiver) = tokio::sync::mpsc::channel(2);
        let mut reader = ChannelReader {
            receiver,
            current: Bytes::new(),
        };
        let writer = tokio::spawn(async move {
            for part in [&b"first "[..], b"", b"second ", b"third"] {
                sender.send(Bytes::from_static(part)).await.expect("send");
            }
        });
        let mut out = Vec::new();
        let mut small = [0u8; 4];
        // Reads smaller than a chunk take it in pieces.
        let n = reader.read(&mut small).await.expect("read");
        out.extend_from_slice(&small[..n]);
        reader.read_to_end(&mut out).await.expect("read to end");
        writer.await.expect("writer");
        assert_eq!(out, b"first second third");
    }
}
