//! The queue as the SMTP session sees it: the [`Queue`] seam the session calls before it may
//! answer `250`, its JetStream implementation ([`jetstream`], [`stream`], [`setup`]; the
//! group commit of many sessions' entries in [`commit`]; orphaned body objects in
//! [`sweeper`]), an in-memory double ([`memory`]) and the depth sampler ([`sampler`]).
//!
//! The contract itself (subjects, entry headers, large bodies, delivery state, message ids,
//! consumer names) is the crate `kubemail_queue`, whose crate doc is its one description;
//! its types are re-exported here.

pub mod commit;
pub mod connect;
pub mod jetstream;
pub mod memory;
pub mod sampler;
pub mod setup;
pub mod stream;
pub mod sweeper;
pub mod upload;

use bytes::Bytes;
use futures::future::BoxFuture;
pub use kubemail_queue::{
    Direction, EntryError, Notice, QueueEntry, QueueId, headers, parse_rfc3339, rfc3339,
};
use sha2::{Digest as _, Sha256};

/// One entry handed to the queue: envelope and message bytes. The publisher fills in what
/// only it knows: `body_size`, and `body_ref` when the body goes to the object store. An entry
/// whose body was stored while it arrived ([`Queue::upload`]) comes with `body_ref` and
/// `body_size` set: `body` is then the part in front of the stored object (the header
/// section), which the entry carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub entry: QueueEntry,
    pub body: Bytes,
    /// The `Nats-Msg-Id` to publish the entry with ([`ContentId::msg_id`]).
    pub msg_id: String,
}

/// What a client's retry of a transaction has in common with the attempt before it, as a
/// digest: who sent it (the authenticated user, or nobody), the reverse path, the parameters
/// of MAIL FROM that reach the entry, and the message exactly as the client sent it (before
/// the header fields this node adds, which differ per attempt). Each entry adds its domain
/// and recipients, and the *generation*: how often this node has accepted (answered `250`)
/// the same content within the duplicate window ([`ContentHistory`]).
///
/// An entry published with the same id a second time within the stream's duplicate window
/// (`nats.duplicateWindow`) is dropped by JetStream. So a client that retries a transaction
/// it was told failed (`451`) although the stream had stored it (an acknowledgement lost to
/// a timeout, a transaction half published) does not queue it twice: no `250` was given, the
/// generation is the same, so is the id. A message sent again on purpose after its `250` gets
/// the next generation and is queued again. What remains: the same content accepted by
/// another node, or twice at the same moment, within the window, is queued once.
#[derive(Clone)]
pub struct ContentId(Sha256);

impl ContentId {
    pub fn new(auth_user: Option<&str>, mail_from: &str, params: &[&str], message: &[u8]) -> Self {
        // RustCrypto's SHA-256 uses the CPU's SHA extensions where there are some (about twice
        // ring's speed here): this digest runs over every accepted message.
        let mut digest = Sha256::new();
        // Length-prefixed fields: no two envelopes hash the same bytes.
        field(&mut digest, auth_user.unwrap_or("").as_bytes());
        field(&mut digest, mail_from.as_bytes());
        for p in params {
            field(&mut digest, p.as_bytes());
        }
        field(&mut digest, message);
        Self(digest)
    }

    /// The content of a message whose body was stored while it arrived: `new` took its header
    /// section as the message; this adds the body's size and SHA-256 digest. A retry of the
    /// same message is stored the same way, so it gets the same id.
    pub fn with_stored_body(mut self, size: u64, digest: &[u8; 32]) -> Self {
        field(&mut self.0, b"stored body");
        field(&mut self.0, &size.to_be_bytes());
        field(&mut self.0, digest);
        self
    }

    /// The transaction's key in [`ContentHistory`].
    pub fn key(&self) -> [u8; 16] {
        let sum = self.0.clone().finalize();
        let mut key = [0u8; 16];
        key.copy_from_slice(&sum[..16]);
        key
    }

    /// `c<128-bit digest in hex>.<domain>` (generation 0) or `c<digest>-<generation>.<domain>`:
    /// the `Nats-Msg-Id` of the new entry for `recipients` of `domain`.
    pub fn msg_id(&self, domain: &str, recipients: &[String], generation: u32) -> String {
        let mut digest = self.0.clone();
        field(&mut digest, domain.to_ascii_lowercase().as_bytes());
        for r in recipients {
            field(&mut digest, r.as_bytes());
        }
        let sum = digest.finalize();
        let mut id = String::with_capacity(40 + domain.len());
        id.push('c');
        for b in &sum[..16] {
            id.push(char::from(HEX[usize::from(b >> 4)]));
            id.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        if generation > 0 {
            id.push('-');
            id.push_str(&generation.to_string());
        }
        id.push('.');
        id.push_str(&domain.to_ascii_lowercase());
        id
    }
}

/// Most contents remembered; past it the oldest are forgotten first (a forgotten content
/// starts again at generation 0, which at worst drops a deliberate repeat as a duplicate).
const HISTORY_CAPACITY: usize = 100_000;

/// How often this node accepted each content lately ([`ContentId`]'s generation), for as long
/// as JetStream remembers message ids (the duplicate window).
pub struct ContentHistory {
    window: std::time::Duration,
    accepted: std::sync::Mutex<std::collections::HashMap<[u8; 16], (u32, std::time::Instant)>>,
}

impl ContentHistory {
    pub fn new(window: std::time::Duration) -> Self {
        Self {
            window,
            accepted: std::sync::Mutex::default(),
        }
    }

    /// The generation the next acceptance of `content` gets.
    pub fn generation(&self, content: &ContentId) -> u32 {
        let map = self.accepted.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&content.key())
            .filter(|(_, at)| at.elapsed() < self.window)
            .map_or(0, |(n, _)| *n)
    }

    /// Records that `content` was accepted (answered `250`).
    pub fn accepted(&self, content: &ContentId) {
        let now = std::time::Instant::now();
        let mut map = self.accepted.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= HISTORY_CAPACITY {
            let window = self.window;
            map.retain(|_, (_, at)| now.duration_since(*at) < window);
            if map.len() >= HISTORY_CAPACITY {
                // Still full within the window: forget the older half.
                let mut ages: Vec<std::time::Instant> = map.values().map(|(_, at)| *at).collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                map.retain(|_, (_, at)| *at > cut);
            }
        }
        let entry = map.entry(content.key()).or_insert((0, now));
        if now.duration_since(entry.1) >= self.window {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn field(digest: &mut Sha256, bytes: &[u8]) {
    digest.update((bytes.len() as u64).to_be_bytes());
    digest.update(bytes);
}

/// Why a message could not be queued. Each maps to the SMTP reply the client gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    /// Not connected, timed out, or any other transient failure: `451 4.3.0`.
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    /// The stream or object store is full: `452 4.3.1`.
    #[error("queue full: {0}")]
    Full(String),
}

/// The durable queue as the SMTP session sees it. Success means every entry is acknowledged
/// by the queue and may be confirmed to the client with `250`.
pub trait Queue: Send + Sync + 'static {
    /// Queues all entries of one transaction (one per destination domain).
    fn enqueue(&self, entries: Vec<QueuedMessage>) -> BoxFuture<'_, Result<(), EnqueueError>>;

    /// Whether the queue is reachable and set up (for `/readyz`).
    fn is_ready(&self) -> bool;

    /// Bodies larger than this many octets are stored while they arrive ([`Self::upload`]):
    /// the largest body an entry carries inline. `None`: this queue takes bodies only whole.
    fn streaming_threshold(&self) -> Option<usize> {
        None
    }

    /// Starts storing the body of the entry `entry_id` of `domain` in the object store, to
    /// be finished before that entry is enqueued with the reference it returns.
    fn upload(&self, domain: &str, entry_id: String) -> Result<upload::BodyUpload, EnqueueError> {
        let _ = (domain, entry_id);
        Err(EnqueueError::Unavailable(
            "this queue stores no bodies apart from their entries".to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::{ContentHistory, ContentId};
    use crate::config::NatsConfig;

    #[test]
    fn after_a_250_the_same_content_gets_the_next_generation() {
        let history = ContentHistory::new(std::time::Duration::from_secs(120));
        let rcpts = vec!["bob@example.com".to_owned()];
        let content = ContentId::new(None, "a@remote.test", &[], b"hi\r\n");
        let first = history.generation(&content);
        assert_eq!(first, 0);
        let id0 = content.msg_id("example.com", &rcpts, first);
        // Not accepted (a 451): the retry has the same generation, so the same id.
        assert_eq!(history.generation(&content), 0);
        history.accepted(&content);
        let again = history.generation(&content);
        assert_eq!(again, 1);
        let id1 = content.msg_id("example.com", &rcpts, again);
        assert_ne!(id0, id1);
        assert!(id1.contains("-1.example.com"), "{id1}");
        let other = ContentId::new(None, "a@remote.test", &[], b"other\r\n");
        assert_eq!(history.generation(&other), 0);
        // Past the window JetStream has forgotten the ids: back to generation 0.
        let short = ContentHistory::new(std::time::Duration::ZERO);
        short.accepted(&content);
        assert_eq!(short.generation(&content), 0);
    }

    #[test]
    fn a_retry_has_the_same_id_and_anything_else_another() {
        let rcpts = vec!["bob@example.com".to_owned()];
        let first = ContentId::new(None, "a@remote.test", &[], b"Subject: x\r\n\r\nhi\r\n");
        let retry = ContentId::new(None, "a@remote.test", &[], b"Subject: x\r\n\r\nhi\r\n");
        let id = first.msg_id("Example.COM", &rcpts, 0);
        assert_eq!(id, retry.msg_id("example.com", &rcpts, 0));
        assert!(id.starts_with('c') && id.ends_with(".example.com"), "{id}");
        assert_eq!(id.len(), 1 + 32 + 1 + "example.com".len());
        let others = [
            ContentId::new(None, "a@remote.test", &[], b"Subject: x\r\n\r\nhi!\r\n"),
            ContentId::new(None, "b@remote.test", &[], b"Subject: x\r\n\r\nhi\r\n"),
            ContentId::new(
                Some("alice"),
                "a@remote.test",
                &[],
                b"Subject: x\r\n\r\nhi\r\n",
            ),
            ContentId::new(
                None,
                "a@remote.test",
                &["8BITMIME"],
                b"Subject: x\r\n\r\nhi\r\n",
            ),
            // Field boundaries count: moving octets from one field to the next changes the id.
            ContentId::new(None, "a@remote.tes", &[], b"tSubject: x\r\n\r\nhi\r\n"),
        ];
        for other in &others {
            assert_ne!(other.msg_id("example.com", &rcpts, 0), id);
        }
        assert_ne!(first.msg_id("example.net", &rcpts, 0), id);
        assert_ne!(
            first.msg_id("example.com", &["carol@example.com".to_owned()], 0),
            id
        );
    }

    #[test]
    fn configuration_defaults_are_the_contract_names() {
        // The operator and other tools find the queue under these names when nothing is set.
        let nats = NatsConfig::default();
        assert_eq!(nats.stream, kubemail_queue::DEFAULT_STREAM);
        assert_eq!(nats.subject_prefix, kubemail_queue::DEFAULT_SUBJECT_PREFIX);
        assert_eq!(nats.body_bucket, kubemail_queue::DEFAULT_BODY_BUCKET);
    }
}
