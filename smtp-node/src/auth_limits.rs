//! The per-user limit on failed logins: at most `auth.failuresPerUser`
//! failed AUTH attempts for one user name in any `auth.failuresPerUserWindow`, counted over
//! every client address and every node of the cluster, so that guessing spread over many
//! addresses (which the per-IP limit in [`crate::auth`] cannot see) is stopped too.
//!
//! The nodes are stateless, so the cluster-wide count lives in NATS JetStream, in a stream of
//! its own (`<nats.stream>_AUTH_FAILURES`) with one subject per domain and user name
//! (`<prefix>-auth-failures.<domain>.<tag>`, so a domain's NATS credentials can add failures
//! for its own users only) and one empty message per failure. Whoever manages the JetStream
//! objects creates the stream (`nats.manageStreams`: the node, else the operator). A stream
//! rather than a KV counter because:
//! * a failure is one append (publish, wait for the ack), never a read-modify-write, so failures
//!   arriving on several nodes at once never conflict, retry or get lost;
//! * `max_age` = the window makes NATS expire each failure on its own: an exact sliding window
//!   with no clean-up job; `max_messages_per_subject` = the limit bounds what one user name
//!   holds. There is no stream-wide cap, which would let a flood evict real users' failures
//!   and shorten their lockout; instead only failures of user names that exist are written
//!   (made-up names are limited by this node alone), so the stream holds at most the limit
//!   times the number of users;
//! * the count is the subject's message count in one `STREAM.INFO` request with a subject
//!   filter: a successful login costs one read and no write.
//!
//! The subject is not the user name but a keyed hash of it (HMAC-SHA256 truncated to 128
//! bits, key from `auth.usernameKeyFile`); passwords never come here.
//!
//! Failure modes: while NATS is unreachable, slow or the stream is missing, logins are not
//! refused for that reason (fail open). Each node then still applies the limit to the failures
//! it saw itself, in a bounded in-memory log ([`LocalFailures`]) that is filled whether NATS
//! answers or not, so it also answers without a round trip for users it already saw locked.
//! After an error
//! the shared counter is left alone for [`SHARED_RETRY_AFTER`], so an unhealthy NATS costs a
//! login at most one `auth.sharedCounterTimeout` (1 s by default; NATS answers in about a
//! millisecond when healthy) now and then, not on every attempt.
//!
//! The check and the record are not atomic: attempts for one user that are in flight on
//! several nodes at the same moment may each pass the check, so the limit can be overshot by
//! the number of such concurrent attempts.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::response::Response;
use async_nats::jetstream::stream;
use async_nats::jetstream::{self, ErrorCode};
use futures::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use ring::hmac;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::{AuthConfig, NatsConfig};
use crate::queue::setup::StreamSetup;

/// After the shared counter failed, how long logins use only the local one before trying it
/// again.
pub const SHARED_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Failure times the local log holds over all user names: 16 bytes each plus about as much
/// map overhead per name, so a few MB at most. Beyond it, the names whose last failure is
/// oldest are forgotten first.
pub const LOCAL_MAX_FAILURES: usize = 50_000;
/// Shortest secret accepted in `auth.usernameKeyFile` (128 bits).
pub const MIN_KEY_LEN: usize = 16;
/// The HMAC key when no key file is configured. Not secret: it keeps user names out of plain
/// sight in the stream, nothing more.
const BUILTIN_KEY: &[u8] = b"kubemail auth failure counter v1";

/// Why the key that hides user names could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum UsernameKeyError {
    #[error("cannot read username key file {path}")]
    ReadKeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("username key file {path} holds {len} bytes; at least {MIN_KEY_LEN} are needed")]
    KeyTooShort { path: PathBuf, len: usize },
}

/// Why the shared counter could not answer (the login goes on with the local one).
#[derive(Debug, thiserror::Error)]
pub enum SharedCounterError {
    #[error("not connected to NATS")]
    NotConnected,
    #[error("the failure stream is not set up yet")]
    NotSetUp,
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("cannot read the failure count: {0}")]
    ReadCount(#[source] async_nats::jetstream::context::RequestError),
    #[error("NATS refused to read the failure count: {0}")]
    ReadCountRefused(#[source] async_nats::jetstream::Error),
    #[error("cannot record the failure: {0}")]
    RecordFailure(#[source] async_nats::jetstream::context::PublishError),
}

/// A user name as the limiter knows it: a keyed hash, never the name itself.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct UserTag([u8; 16]);

impl fmt::Display for UserTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for UserTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserTag({self})")
    }
}

/// Turns user names into [`UserTag`]s with HMAC-SHA256 (ring).
pub struct UserTagger {
    key: hmac::Key,
}

impl UserTagger {
    /// A tagger keyed with `secret`.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// The key from `path` (its bytes as they are), or the built-in key when `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, UsernameKeyError> {
        let Some(path) = path else {
            return Ok(Self::new(BUILTIN_KEY));
        };
        let secret = std::fs::read(path).map_err(|source| UsernameKeyError::ReadKeyFile {
            path: path.to_owned(),
            source,
        })?;
        if secret.len() < MIN_KEY_LEN {
            return Err(UsernameKeyError::KeyTooShort {
                path: path.to_owned(),
                len: secret.len(),
            });
        }
        Ok(Self::new(&secret))
    }

    /// The tag of a login name, compared as the users table does (trimmed, ASCII lower case).
    pub fn tag(&self, username: &str) -> UserTag {
        let name = username.trim().to_ascii_lowercase();
        let mac = hmac::sign(&self.key, name.as_bytes());
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&mac.as_ref()[..16]);
        UserTag(tag)
    }
}

/// The cluster-wide failure log: the real one is [`JetStreamFailures`]; tests use doubles.
pub trait SharedFailures: Send + Sync {
    /// Failures recorded for `user` of `domain` within the window.
    fn count<'a>(
        &'a self,
        domain: &'a str,
        user: UserTag,
    ) -> BoxFuture<'a, Result<u64, SharedCounterError>>;
    /// Records one failure for `user` of `domain`.
    fn record<'a>(
        &'a self,
        domain: &'a str,
        user: UserTag,
    ) -> BoxFuture<'a, Result<(), SharedCounterError>>;
}

/// This node's own failure log: per user name the times of its last failures, at most
/// `limit` of them and none older than the window, and at most `capacity` over all names.
pub struct LocalFailures {
    limit: usize,
    window: Duration,
    capacity: usize,
    state: Mutex<LocalState>,
}

#[derive(Default)]
struct LocalState {
    users: HashMap<UserTag, VecDeque<Instant>>,
    held: usize,
}

impl LocalFailures {
    pub fn new(limit: usize, window: Duration, capacity: usize) -> Self {
        Self {
            limit: limit.max(1),
            window,
            capacity: capacity.max(1),
            state: Mutex::new(LocalState::default()),
        }
    }

    /// Failures of `user` within the window before `now`.
    pub fn count(&self, user: UserTag, now: Instant) -> usize {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(times) = state.users.get_mut(&user) else {
            return 0;
        };
        let expired = drop_expired(times, now, self.window);
        let left = times.len();
        if left == 0 {
            state.users.remove(&user);
        }
        state.held = state.held.saturating_sub(expired);
        left
    }

    /// Records a failure of `user` at `now`.
    pub fn record(&self, user: UserTag, now: Instant) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let times = state.users.entry(user).or_default();
        let mut dropped = drop_expired(times, now, self.window);
        times.push_back(now);
        // Only whether `limit` failures are in the window matters, and until when: the
        // newest `limit` times tell both.
        while times.len() > self.limit {
            times.pop_front();
            dropped += 1;
        }
        state.held = (state.held + 1).saturating_sub(dropped);
        if state.held > self.capacity {
            self.prune_locked(state, now);
        }
    }

    /// Drops expired times; if more than `capacity` are still held, forgets the names whose
    /// last failure is oldest until a quarter of the room is free again (so that the sort is
    /// paid once per many inserts).
    pub fn prune(&self, now: Instant) {
        let mut state = self.lock();
        self.prune_locked(&mut state, now);
    }

    /// Failure times held over all names.
    pub fn held(&self) -> usize {
        self.lock().held
    }

    fn prune_locked(&self, state: &mut LocalState, now: Instant) {
        let window = self.window;
        state.users.retain(|_, times| {
            drop_expired(times, now, window);
            !times.is_empty()
        });
        state.held = state.users.values().map(VecDeque::len).sum();
        if state.held <= self.capacity {
            return;
        }
        let target = self.capacity - self.capacity / 4;
        let mut by_age: Vec<(Instant, UserTag)> = state
            .users
            .iter()
            .filter_map(|(tag, times)| times.back().map(|t| (*t, *tag)))
            .collect();
        by_age.sort_unstable_by_key(|(t, _)| *t);
        for (_, tag) in by_age {
            if state.held <= target {
                break;
            }
            if let Some(times) = state.users.remove(&tag) {
                state.held -= times.len();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LocalState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Removes the times at the front that are `window` or more before `now`; returns how many.
fn drop_expired(times: &mut VecDeque<Instant>, now: Instant, window: Duration) -> usize {
    let mut n = 0;
    while times
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= window)
    {
        times.pop_front();
        n += 1;
    }
    n
}

/// The per-user limit: the local log always, the shared one when attached and healthy.
pub struct UserFailureLimit {
    tagger: UserTagger,
    limit: u64,
    local: LocalFailures,
    shared: OnceLock<Arc<dyn SharedFailures>>,
    /// Failed calls to `shared` (`auth_shared_counter_errors`).
    shared_errors: OnceLock<Counter>,
    shared_timeout: Duration,
    shared_health: Mutex<SharedHealth>,
}

#[derive(Default)]
struct SharedHealth {
    skip_until: Option<Instant>,
    degraded: bool,
}

impl UserFailureLimit {
    /// The limit of `auth`, with its username key loaded; local only until
    /// [`UserFailureLimit::attach_shared`].
    pub fn new(auth: &AuthConfig) -> Result<Self, UsernameKeyError> {
        Ok(Self::with_tagger(
            auth,
            UserTagger::load(auth.username_key_file.as_deref())?,
        ))
    }

    fn with_tagger(auth: &AuthConfig, tagger: UserTagger) -> Self {
        let limit = auth.failures_per_user.max(1);
        Self {
            tagger,
            limit: u64::from(limit),
            local: LocalFailures::new(
                limit as usize,
                auth.failures_per_user_window.0,
                LOCAL_MAX_FAILURES,
            ),
            shared: OnceLock::new(),
            shared_errors: OnceLock::new(),
            shared_timeout: auth.shared_counter_timeout.0,
            shared_health: Mutex::new(SharedHealth::default()),
        }
    }

    /// Uses `shared` as the cluster-wide log from now on (once; later calls are ignored).
    /// Its failed calls are counted in `errors`.
    pub fn attach_shared(&self, shared: Arc<dyn SharedFailures>, errors: Counter) {
        let _ = self.shared.set(shared);
        let _ = self.shared_errors.set(errors);
    }

    /// The tag of a login name.
    pub fn tag(&self, username: &str) -> UserTag {
        self.tagger.tag(username)
    }

    /// Whether `user` has used up its failures: AUTH for it is refused without checking the
    /// password. `domain` is where the shared log counts it (one of the node's domains).
    pub async fn is_locked(&self, domain: &str, user: UserTag) -> bool {
        if self.local.count(user, Instant::now()) as u64 >= self.limit {
            return true;
        }
        let Some(shared) = self.usable_shared() else {
            return false;
        };
        match tokio::time::timeout(self.shared_timeout, shared.count(domain, user)).await {
            Ok(Ok(n)) => {
                self.shared_ok();
                n >= self.limit
            }
            Ok(Err(error)) => {
                self.shared_failed(&error);
                false
            }
            Err(_) => {
                self.shared_failed(&SharedCounterError::TimedOut(self.shared_timeout));
                false
            }
        }
    }

    /// Records a failed login of `user`, locally and, for a user name that exists (`known`),
    /// in `domain`'s part of the shared log when it is usable. Unknown names stay local:
    /// written, a flood of made-up names would grow the shared stream without bound.
    pub async fn record_failure(&self, domain: &str, user: UserTag, known: bool) {
        self.local.record(user, Instant::now());
        if !known {
            return;
        }
        let Some(shared) = self.usable_shared() else {
            return;
        };
        match tokio::time::timeout(self.shared_timeout, shared.record(domain, user)).await {
            Ok(Ok(())) => self.shared_ok(),
            Ok(Err(error)) => self.shared_failed(&error),
            Err(_) => self.shared_failed(&SharedCounterError::TimedOut(self.shared_timeout)),
        }
    }

    /// Forgets expired local failures (called periodically).
    pub fn prune(&self) {
        self.local.prune(Instant::now());
    }

    fn usable_shared(&self) -> Option<&Arc<dyn SharedFailures>> {
        let shared = self.shared.get()?;
        let health = self.health();
        match health.skip_until {
            Some(until) if until > Instant::now() => None,
            _ => Some(shared),
        }
    }

    fn shared_ok(&self) {
        let mut health = self.health();
        health.skip_until = None;
        if health.degraded {
            health.degraded = false;
            tracing::info!("shared AUTH failure counter answers again");
        }
    }

    fn shared_failed(&self, error: &SharedCounterError) {
        if let Some(errors) = self.shared_errors.get() {
            errors.inc();
        }
        let mut health = self.health();
        health.skip_until = Some(Instant::now() + SHARED_RETRY_AFTER);
        if !health.degraded {
            health.degraded = true;
            tracing::warn!(%error, retry_after = ?SHARED_RETRY_AFTER, "shared AUTH failure counter unavailable; limiting failed logins per user on this node only");
        } else {
            tracing::debug!(%error, "shared AUTH failure counter still unavailable");
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, SharedHealth> {
        self.shared_health.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The shared failure log in JetStream (see the module documentation).
pub struct JetStreamFailures {
    client: async_nats::Client,
    js: jetstream::Context,
    config: stream::Config,
    /// The queue's subject prefix; failure subjects derive from it per domain.
    subject_prefix: String,
    /// Create the stream (`nats.manageStreams`), or only wait for it.
    manage: bool,
    setup: StreamSetup,
}

impl JetStreamFailures {
    /// Uses `client` (the node's NATS connection). Call [`JetStreamFailures::run_setup`] to
    /// create the stream; until it exists, every call answers [`SharedCounterError::NotSetUp`].
    pub fn new(client: async_nats::Client, nats: &NatsConfig, auth: &AuthConfig) -> Arc<Self> {
        let mut js = jetstream::new(client.clone());
        js.set_timeout(auth.shared_counter_timeout.0);
        Arc::new(Self {
            client,
            js,
            config: failure_stream_config(nats, auth),
            subject_prefix: nats.subject_prefix.clone(),
            manage: nats.manage_streams,
            setup: StreamSetup::new(),
        })
    }

    /// Creates the stream or brings it to this node's settings, retrying while NATS is away,
    /// and again whenever a request finds the stream gone. Runs until `cancel`.
    pub async fn run_setup(self: Arc<Self>, cancel: CancellationToken) {
        self.setup
            .run(
                &self.client,
                &cancel,
                || async {
                    if self.manage {
                        self.js
                            .create_or_update_stream(self.config.clone())
                            .await
                            .map(drop)
                            .map_err(|e| e.to_string())
                    } else {
                        self.js
                            .get_stream(&self.config.name)
                            .await
                            .map(drop)
                            .map_err(|e| format!("waiting for the operator to create it: {e}"))
                    }
                },
                || tracing::info!(stream = %self.config.name, "AUTH failure stream ready"),
                |error| tracing::error!(stream = %self.config.name, %error, "AUTH failure stream setup failed; retrying (failed logins are limited per node until then)"),
            )
            .await;
    }

    fn subject(&self, domain: &str, user: UserTag) -> String {
        format!(
            "{}.{user}",
            kubemail_queue::auth_failure_subject_prefix(&self.subject_prefix, domain)
        )
    }

    fn ready(&self) -> Result<(), SharedCounterError> {
        if self.client.connection_state() != State::Connected {
            return Err(SharedCounterError::NotConnected);
        }
        if !self.setup.is_done() {
            return Err(SharedCounterError::NotSetUp);
        }
        Ok(())
    }

    fn stream_lost(&self) {
        tracing::error!(stream = %self.config.name, "AUTH failure stream missing; setting it up again");
        self.setup.lost();
    }
}

/// What `STREAM.INFO` with a subject filter answers, as far as the count goes.
#[derive(Deserialize)]
struct SubjectCounts {
    state: SubjectCountState,
}

#[derive(Deserialize)]
struct SubjectCountState {
    #[serde(default)]
    subjects: Option<HashMap<String, u64>>,
}

impl SharedFailures for JetStreamFailures {
    fn count<'a>(
        &'a self,
        domain: &'a str,
        user: UserTag,
    ) -> BoxFuture<'a, Result<u64, SharedCounterError>> {
        Box::pin(async move {
            self.ready()?;
            let subject = self.subject(domain, user);
            let reply: Response<SubjectCounts> = self
                .js
                .request(
                    format!("STREAM.INFO.{}", self.config.name),
                    &serde_json::json!({ "subjects_filter": subject }),
                )
                .await
                .map_err(SharedCounterError::ReadCount)?;
            match reply {
                Response::Ok(info) => Ok(info
                    .state
                    .subjects
                    .and_then(|s| s.get(&subject).copied())
                    .unwrap_or(0)),
                Response::Err { error } => {
                    if error.error_code() == ErrorCode::STREAM_NOT_FOUND {
                        self.stream_lost();
                    }
                    Err(SharedCounterError::ReadCountRefused(error))
                }
            }
        })
    }

    fn record<'a>(
        &'a self,
        domain: &'a str,
        user: UserTag,
    ) -> BoxFuture<'a, Result<(), SharedCounterError>> {
        Box::pin(async move {
            self.ready()?;
            let ack = self
                .js
                .publish(self.subject(domain, user), bytes::Bytes::new())
                .await
                .map_err(SharedCounterError::RecordFailure)?;
            ack.await.map_err(|e| {
                if e.kind() == PublishErrorKind::StreamNotFound {
                    self.stream_lost();
                }
                SharedCounterError::RecordFailure(e)
            })?;
            Ok(())
        })
    }
}

pub use kubemail_queue::streams::failure_stream_config;

#[cfg(test)]
mod tests {
    use async_nats::jetstream::stream::{DiscardPolicy, RetentionPolicy};

    use super::*;
    use crate::config::HumanDuration;

    const HOUR: Duration = Duration::from_secs(3600);
    const D: &str = "example.test";

    fn auth_config(limit: u32, window: Duration) -> AuthConfig {
        AuthConfig {
            failures_per_user: limit,
            failures_per_user_window: HumanDuration(window),
            ..AuthConfig::default()
        }
    }

    fn tag(name: &str) -> UserTag {
        UserTagger::new(b"0123456789abcdef").tag(name)
    }

    /// A shared log that always fails, as NATS does when it is away.
    struct Down;

    impl SharedFailures for Down {
        fn count<'a>(
            &'a self,
            _: &'a str,
            _: UserTag,
        ) -> BoxFuture<'a, Result<u64, SharedCounterError>> {
            Box::pin(async { Err(SharedCounterError::NotConnected) })
        }
        fn record<'a>(
            &'a self,
            _: &'a str,
            _: UserTag,
        ) -> BoxFuture<'a, Result<(), SharedCounterError>> {
            Box::pin(async { Err(SharedCounterError::NotConnected) })
        }
    }

    /// A shared log that never answers.
    struct Hung;

    impl SharedFailures for Hung {
        fn count<'a>(
            &'a self,
            _: &'a str,
            _: UserTag,
        ) -> BoxFuture<'a, Result<u64, SharedCounterError>> {
            Box::pin(std::future::pending())
        }
        fn record<'a>(
            &'a self,
            _: &'a str,
            _: UserTag,
        ) -> BoxFuture<'a, Result<(), SharedCounterError>> {
            Box::pin(std::future::pending())
        }
    }

    /// A shared log standing for another node's failures too: a [`LocalFailures`] that two
    /// limiters share.
    struct Shared(LocalFailures);

    impl SharedFailures for Shared {
        fn count<'a>(
            &'a self,
            _: &'a str,
            user: UserTag,
        ) -> BoxFuture<'a, Result<u64, SharedCounterError>> {
            let n = self.0.count(user, Instant::now()) as u64;
            Box::pin(async move { Ok(n) })
        }
        fn record<'a>(
            &'a self,
            _: &'a str,
            user: UserTag,
        ) -> BoxFuture<'a, Result<(), SharedCounterError>> {
            self.0.record(user, Instant::now());
            Box::pin(async { Ok(()) })
        }
    }

    #[test]
    fn tags_are_keyed_and_ignore_case_and_spaces() {
        let a = UserTagger::new(b"0123456789abcdef");
        let b = UserTagger::new(b"fedcba9876543210");
        assert_eq!(
            a.tag("Alice@Example.test "),
            a.tag("alice@example.test"),
            "same user as the users table sees it"
        );
        assert_ne!(a.tag("alice@example.test"), a.tag("bob@example.test"));
        assert_ne!(
            a.tag("alice@example.test"),
            b.tag("alice@example.test"),
            "another key, another tag"
        );
        let shown = a.tag("alice@example.test").to_string();
        assert_eq!(shown.len(), 32);
        assert!(shown.bytes().all(|c| c.is_ascii_hexdigit()), "{shown}");
        assert!(!format!("{:?}", a.tag("alice@example.test")).contains("alice"));
    }

    #[test]
    fn key_file_must_hold_enough_secret() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, b"too short").unwrap();
        assert!(matches!(
            UserTagger::load(Some(&short)),
            Err(UsernameKeyError::KeyTooShort { len: 9, .. })
        ));
        let good = dir.path().join("good");
        std::fs::write(&good, [7u8; 32]).unwrap();
        let from_file = UserTagger::load(Some(&good)).unwrap();
        assert_eq!(
            from_file.tag("alice@example.test"),
            UserTagger::new(&[7u8; 32]).tag("alice@example.test")
        );
        assert!(matches!(
            UserTagger::load(Some(&dir.path().join("missing"))),
            Err(UsernameKeyError::ReadKeyFile { .. })
        ));
        assert_ne!(
            UserTagger::load(None).unwrap().tag("alice@example.test"),
            from_file.tag("alice@example.test")
        );
    }

    #[test]
    fn local_log_is_a_sliding_window() {
        let log = LocalFailures::new(3, HOUR, 100);
        let alice = tag("alice@example.test");
        let t0 = Instant::now();
        log.record(alice, t0);
        log.record(alice, t0 + Duration::from_secs(600));
        log.record(alice, t0 + Duration::from_secs(1200));
        assert_eq!(log.count(alice, t0 + Duration::from_secs(1201)), 3);
        assert_eq!(log.count(tag("bob@example.test"), t0), 0);
        // The first failure leaves the window an hour after it happened, the others later.
        assert_eq!(log.count(alice, t0 + HOUR), 2);
        assert_eq!(log.count(alice, t0 + HOUR + Duration::from_secs(600)), 1);
        assert_eq!(log.count(alice, t0 + 2 * HOUR), 0);
        assert_eq!(log.held(), 0, "expired times are dropped");
    }

    #[test]
    fn local_log_keeps_at_most_limit_times_per_user() {
        let log = LocalFailures::new(3, HOUR, 100);
        let alice = tag("alice@example.test");
        let t0 = Instant::now();
        for i in 0..10 {
            log.record(alice, t0 + Duration::from_secs(i));
        }
        assert_eq!(log.held(), 3);
        assert_eq!(log.count(alice, t0 + Duration::from_secs(10)), 3);
        // Locked until the oldest kept time (t0 + 7 s) is an hour old.
        assert_eq!(log.count(alice, t0 + HOUR + Duration::from_secs(7)), 2);
    }

    #[test]
    fn local_log_memory_is_bounded() {
        let capacity = 1000;
        let log = LocalFailures::new(5, HOUR, capacity);
        let t0 = Instant::now();
        let target = tag("target@example.test");
        for i in 0..5u64 {
            log.record(target, t0 + Duration::from_millis(100_000 + i));
        }
        // A flood of made-up names, older than the target's failures.
        for i in 0..10_000u64 {
            log.record(tag(&format!("junk{i}@example.test")), t0);
            assert!(log.held() <= capacity, "held {} at {i}", log.held());
        }
        // The names whose last failure is oldest went first; the target is still locked.
        assert_eq!(log.count(target, t0 + Duration::from_secs(200)), 5);
        log.prune(t0 + 2 * HOUR);
        assert_eq!(log.held(), 0);
    }

    #[tokio::test]
    async fn user_is_locked_after_the_limit_until_the_window_passes() {
        let limit = UserFailureLimit::with_tagger(
            &auth_config(3, Duration::from_millis(300)),
            UserTagger::new(BUILTIN_KEY),
        );
        let alice = limit.tag("alice@example.test");
        for _ in 0..3 {
            assert!(!limit.is_locked(D, alice).await);
            limit.record_failure(D, alice, true).await;
        }
        assert!(limit.is_locked(D, alice).await);
        assert!(
            !limit.is_locked(D, limit.tag("bob@example.test")).await,
            "other users are not affected"
        );
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(!limit.is_locked(D, alice).await, "the window passed");
    }

    #[tokio::test]
    async fn failures_seen_by_another_node_count() {
        let config = auth_config(4, HOUR);
        let shared: Arc<dyn SharedFailures> = Arc::new(Shared(LocalFailures::new(4, HOUR, 100)));
        let nodes: Vec<UserFailureLimit> = (0..2)
            .map(|_| {
                let l = UserFailureLimit::with_tagger(&config, UserTagger::new(BUILTIN_KEY));
                l.attach_shared(shared.clone(), Counter::default());
                l
            })
            .collect();
        let alice = nodes[0].tag("alice@example.test");
        for i in 0..4 {
            assert!(!nodes[i % 2].is_locked(D, alice).await, "attempt {i}");
            nodes[i % 2].record_failure(D, alice, true).await;
        }
        // Each node saw only two failures itself; together they reached the limit.
        assert_eq!(nodes[0].local.count(alice, Instant::now()), 2);
        assert!(nodes[0].is_locked(D, alice).await);
        assert!(nodes[1].is_locked(D, alice).await);
    }

    #[tokio::test]
    async fn unknown_names_are_limited_locally_but_never_written_to_the_shared_log() {
        let config = auth_config(2, HOUR);
        let shared = Arc::new(Shared(LocalFailures::new(2, HOUR, 100)));
        let limit = UserFailureLimit::with_tagger(&config, UserTagger::new(BUILTIN_KEY));
        limit.attach_shared(shared.clone(), Counter::default());
        let nobody = limit.tag("nobody@example.test");
        limit.record_failure(D, nobody, false).await;
        limit.record_failure(D, nobody, false).await;
        assert!(
            limit.is_locked(D, nobody).await,
            "this node still limits it"
        );
        assert_eq!(shared.0.held(), 0, "nothing written for a made-up name");
        let alice = limit.tag("alice@example.test");
        limit.record_failure(D, alice, true).await;
        assert_eq!(shared.0.held(), 1, "a real user's failure is shared");
    }

    #[tokio::test]
    async fn shared_counter_down_fails_open_but_local_limit_holds() {
        let limit =
            UserFailureLimit::with_tagger(&auth_config(2, HOUR), UserTagger::new(BUILTIN_KEY));
        limit.attach_shared(Arc::new(Down), Counter::default());
        let alice = limit.tag("alice@example.test");
        assert!(
            !limit.is_locked(D, alice).await,
            "an unreachable counter locks nobody out"
        );
        limit.record_failure(D, alice, true).await;
        assert!(!limit.is_locked(D, alice).await);
        limit.record_failure(D, alice, true).await;
        assert!(
            limit.is_locked(D, alice).await,
            "this node's own failures still count"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn hung_shared_counter_costs_one_timeout_then_is_skipped() {
        let config = AuthConfig {
            shared_counter_timeout: HumanDuration(Duration::from_millis(2500)),
            ..auth_config(5, HOUR)
        };
        let limit = UserFailureLimit::with_tagger(&config, UserTagger::new(BUILTIN_KEY));
        limit.attach_shared(Arc::new(Hung), Counter::default());
        let alice = limit.tag("alice@example.test");
        let t = tokio::time::Instant::now();
        assert!(!limit.is_locked(D, alice).await);
        assert_eq!(t.elapsed(), Duration::from_millis(2500));
        // Within the retry pause nothing waits for it.
        let t = tokio::time::Instant::now();
        limit.record_failure(D, alice, true).await;
        assert!(!limit.is_locked(D, alice).await);
        assert_eq!(t.elapsed(), Duration::ZERO);
    }

    #[test]
    fn stream_expires_failures_after_the_window_and_stays_bounded() {
        let nats = NatsConfig::default();
        let config = failure_stream_config(&nats, &auth_config(20, HOUR));
        assert_eq!(config.name, "KUBEMAIL_AUTH_FAILURES");
        assert_eq!(config.subjects, ["kubemail.queue-auth-failures.>"]);
        assert_eq!(config.max_age, HOUR);
        assert_eq!(config.max_messages_per_subject, 20);
        // No stream-wide cap that could evict another user's failures.
        assert_eq!(config.max_messages, -1);
        assert_eq!(config.max_bytes, -1);
        assert_eq!(config.discard, DiscardPolicy::Old);
        assert_eq!(config.retention, RetentionPolicy::Limits);
        assert!(config.duplicate_window <= config.max_age);
        // Not under the queue's subjects, which its work-queue stream owns.
        assert!(!config.subjects[0].starts_with(&format!("{}.", nats.subject_prefix)));
    }
}
