//! Submission users and the limits around them: who may log in (users files of
//! `user:password-hash`, argon2 PHC or bcrypt, in the format of
//! [`users_file`](crate::config::users_file)), the per-IP brake on failed logins that survives
//! reconnects, the per-user one ([`crate::auth_limits`]) that stops guessing spread over many
//! addresses, which sender addresses a user may use (its own domain), and each user's message
//! rate (the domain's `messagesPerMinutePerUser`).
//!
//! Passwords are checked by [`users_file::verify_password`] on a blocking thread (they are
//! deliberately slow, argon2 about 19 MiB each), at most `auth.maxConcurrentVerifications` at
//! once; an AUTH that finds no free slot within `auth.verificationWait` gets `454 4.7.0`
//! without a check, so a flood of AUTH commands queues instead of exhausting memory and the
//! blocking pool. An unknown user is checked against a dummy hash, so unknown user and wrong
//! password cost the same time and get the same reply. Nothing here logs a password.
//!
//! The per-IP limits key on the client ([`client_key`]: an IPv6 prefix, not each address of
//! it). Failures of unknown user names are counted by this node only, never written to the
//! shared per-user counter, so made-up names cannot fill it; the writes a client can cause
//! for real names are bounded by its own failure limit.
//!
//! The per-user failure limit is cluster-wide (JetStream). The per-IP and message-rate
//! counters are per node: several replicas each apply them, so their cluster-wide rate is at
//! most `replicas` times the configured one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::auth_limits::{SharedFailures, UserFailureLimit, UsernameKeyError};
use crate::config::NodeConfig;
use crate::config::users_file::{self, verify_password};
use crate::connection::limits::client_key;

/// Hashes a password for a users file (`smtp-node hash-password`); the format is
/// [`users_file`]'s, shared with the operator.
pub use crate::config::users_file::hash_password;

/// How often users files are checked for changes and idle rate-limit entries dropped.
pub const USERS_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// Why a users file (or the key that hides user names in the shared failure counter) could
/// not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum UsersFileError {
    #[error("cannot load auth.usernameKeyFile")]
    LoadUsernameKey(#[from] UsernameKeyError),
    #[error("cannot read users file {path}")]
    ReadUsersFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("users file {path} line {line}: {reason}")]
    ParseUsersLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// A logged-in user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticatedUser {
    /// Full address, lower case, e.g. `alice@example.test`.
    pub name: String,
    /// The domain the user belongs to (a configured domain).
    pub domain: String,
}

impl AuthenticatedUser {
    /// Whether this user may use `domain` as the sender domain (`553 5.7.1` otherwise).
    pub fn may_send_as(&self, domain: &str) -> bool {
        domain.eq_ignore_ascii_case(&self.domain)
    }
}

/// Result of a login attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    Success(AuthenticatedUser),
    /// Wrong user or password: `535 5.7.8`.
    Failure,
    /// Too many recent failures: `454 4.7.0`, credentials not checked.
    RateLimited(LimitedBy),
    /// No password check could start within `auth.verificationWait`: `454 4.7.0`,
    /// credentials not checked, nothing counted.
    Busy,
}

/// Which failure limit refused a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitedBy {
    /// `auth.failuresPerIpPerMinute`: this client address failed too often.
    ClientIp,
    /// `auth.failuresPerUser`: this user name failed too often, from anywhere.
    User,
}

struct UsersSource {
    domain: String,
    path: PathBuf,
    stamp: Option<(SystemTime, u64)>,
}

/// Users, login throttling and per-user message rates.
pub struct Authenticator {
    sources: Mutex<Vec<UsersSource>>,
    users: RwLock<HashMap<String, UserEntry>>,
    failures: DefaultKeyedRateLimiter<IpAddr>,
    blocked: Mutex<HashMap<IpAddr, Instant>>,
    per_user: UserFailureLimit,
    message_rates: HashMap<String, DefaultKeyedRateLimiter<String>>,
    /// IPv6 clients are keyed by this many leading bits.
    ipv6_prefix: u8,
    /// Password checks that may run at once.
    verifications: Arc<Semaphore>,
    verification_wait: Duration,
    /// Our domains (lower case), in config order: where failed logins are counted.
    domains: Vec<String>,
}

#[derive(Clone)]
struct UserEntry {
    domain: String,
    hash: Arc<str>,
}

impl std::fmt::Debug for UserEntry {
    // The hash stays out of debug output (and so out of logs).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserEntry")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Loads every domain's users file. A missing or malformed file is an error here, at
    /// start-up; later reloads keep the old users when a new file is broken.
    pub fn load(config: &NodeConfig) -> Result<Self, UsersFileError> {
        let mut sources = Vec::new();
        let mut users = HashMap::new();
        for domain in &config.domains {
            if let Some(path) = &domain.users_file {
                let stamp = stamp(path);
                users.extend(read_users_file(path, &domain.name)?);
                sources.push(UsersSource {
                    domain: domain.name.clone(),
                    path: path.clone(),
                    stamp,
                });
            }
        }
        let per_ip =
            NonZeroU32::new(config.auth.failures_per_ip_per_minute).unwrap_or(NonZeroU32::MIN);
        let message_rates = config
            .domains
            .iter()
            .map(|d| {
                let n = NonZeroU32::new(d.limits.messages_per_minute_per_user)
                    .unwrap_or(NonZeroU32::MIN);
                (
                    d.name.clone(),
                    DefaultKeyedRateLimiter::keyed(Quota::per_minute(n)),
                )
            })
            .collect();
        Ok(Self {
            sources: Mutex::new(sources),
            users: RwLock::new(users),
            failures: DefaultKeyedRateLimiter::keyed(Quota::per_minute(per_ip)),
            blocked: Mutex::new(HashMap::new()),
            per_user: UserFailureLimit::new(&config.auth)?,
            message_rates,
            ipv6_prefix: config.client_ipv6_prefix,
            verifications: Arc::new(Semaphore::new(config.auth.verification_slots())),
            verification_wait: config.auth.verification_wait.0,
            domains: config
                .domains
                .iter()
                .map(|d| d.name.to_ascii_lowercase())
                .collect(),
        })
    }

    /// Number of users known.
    pub fn user_count(&self) -> usize {
        self.users.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Counts failed logins per user name in `shared` (all nodes) from now on, besides this
    /// node's own count.
    pub fn attach_shared_failures(
        &self,
        shared: Arc<dyn SharedFailures>,
        errors: prometheus_client::metrics::counter::Counter,
    ) {
        self.per_user.attach_shared(shared, errors);
    }

    /// Checks a login. Records failures against `ip`'s client and against the user name.
    pub async fn authenticate(&self, ip: IpAddr, username: &str, password: &str) -> AuthOutcome {
        let client = client_key(ip, self.ipv6_prefix);
        if self.is_blocked(client) {
            return AuthOutcome::RateLimited(LimitedBy::ClientIp);
        }
        let key = username.trim().to_ascii_lowercase();
        // Known or not, every name is limited alike: the replies tell nothing about which
        // names exist.
        let tag = self.per_user.tag(&key);
        let entry = self
            .users
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        let counted_in = self.failure_domain(&key, entry.as_ref());
        if self.per_user.is_locked(&counted_in, tag).await {
            tracing::debug!(user_tag = %tag, "user name over its failure limit");
            return AuthOutcome::RateLimited(LimitedBy::User);
        }
        let hash = entry
            .as_ref()
            .map(|e| e.hash.clone())
            .unwrap_or_else(|| dummy_hash().clone());
        let slot = tokio::time::timeout(
            self.verification_wait,
            self.verifications.clone().acquire_owned(),
        )
        .await;
        let Ok(Ok(slot)) = slot else {
            tracing::debug!(wait = ?self.verification_wait, "no free password check slot");
            return AuthOutcome::Busy;
        };
        let password = password.to_owned();
        // The slot goes with the check: a session that is dropped meanwhile does not free it
        // before the blocking thread is done.
        let valid = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            verify_password(&password, &hash)
        })
        .await
        .unwrap_or(false);
        match entry {
            Some(entry) if valid => AuthOutcome::Success(AuthenticatedUser {
                name: key,
                domain: entry.domain,
            }),
            known => {
                self.record_failure(client);
                self.per_user
                    .record_failure(&counted_in, tag, known.is_some())
                    .await;
                AuthOutcome::Failure
            }
        }
    }

    /// Takes one message from the user's per-minute budget; false when it is used up
    /// (`451 4.7.1`).
    pub fn allow_message(&self, user: &AuthenticatedUser) -> bool {
        match self.message_rates.get(&user.domain) {
            Some(limiter) => limiter.check_key(&user.name).is_ok(),
            None => true,
        }
    }

    /// The domain whose part of the shared failure log counts a login name: the user's
    /// domain, else the domain after its `@` when we serve it, else our first domain (a name
    /// no domain of ours knows can never log in; it is limited all the same, so the replies
    /// do not tell names apart, though only this node records its failures).
    fn failure_domain(&self, key: &str, entry: Option<&UserEntry>) -> String {
        if let Some(entry) = entry {
            return entry.domain.clone();
        }
        if let Some((_, domain)) = key.rsplit_once('@')
            && self.domains.iter().any(|d| d == domain)
        {
            return domain.to_owned();
        }
        self.domains.first().cloned().unwrap_or_default()
    }

    fn is_blocked(&self, ip: IpAddr) -> bool {
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        match blocked.get(&ip) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                blocked.remove(&ip);
                false
            }
            None => false,
        }
    }

    fn record_failure(&self, ip: IpAddr) {
        if let Err(not_until) = self.failures.check_key(&ip) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            self.blocked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(ip, Instant::now() + wait);
        }
    }

    /// Re-reads users files that changed. A broken file keeps that domain's previous users.
    pub fn reload_if_changed(&self) -> Vec<UsersFileError> {
        let mut errors = Vec::new();
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        for source in sources.iter_mut() {
            let now = stamp(&source.path);
            if now.is_none() || now == source.stamp {
                continue;
            }
            source.stamp = now;
            match read_users_file(&source.path, &source.domain) {
                Ok(fresh) => {
                    let mut users = self.users.write().unwrap_or_else(|e| e.into_inner());
                    users.retain(|_, u| u.domain != source.domain);
                    users.extend(fresh);
                    tracing::info!(domain = %source.domain, "reloaded users file");
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    /// Reloads users files and prunes rate-limit state until `cancel` fires.
    pub async fn watch(self: Arc<Self>, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(USERS_RELOAD_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            for error in self.reload_if_changed() {
                tracing::error!(%error, "users file changed but cannot be loaded; keeping the previous users");
            }
            self.failures.retain_recent();
            self.per_user.prune();
            for limiter in self.message_rates.values() {
                limiter.retain_recent();
            }
        }
    }
}

/// A valid argon2 hash of a random password: checked for unknown users so that they take as
/// long as known ones.
fn dummy_hash() -> &'static Arc<str> {
    static DUMMY: OnceLock<Arc<str>> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let password: [u8; 16] = rand::random();
        let password: String = password.iter().map(|b| format!("{b:02x}")).collect();
        Arc::from(hash_password(&password).unwrap_or_default())
    })
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn read_users_file(
    path: &Path,
    domain: &str,
) -> Result<HashMap<String, UserEntry>, UsersFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| UsersFileError::ReadUsersFile {
        path: path.to_owned(),
        source,
    })?;
    parse_users(&text, domain).map_err(|(line, reason)| UsersFileError::ParseUsersLine {
        path: path.to_owned(),
        line,
        reason,
    })
}

/// Parses a users file ([`users_file::parse`]) into the users of `domain`; an error is the
/// line number and what is wrong with it (never the hash).
fn parse_users(text: &str, domain: &str) -> Result<HashMap<String, UserEntry>, (usize, String)> {
    let users = users_file::parse(text, domain).map_err(|e| (e.line, e.problem.to_string()))?;
    Ok(users
        .into_iter()
        .map(|user| {
            let entry = UserEntry {
                domain: domain.to_owned(),
                hash: Arc::from(user.hash),
            };
            (user.name, entry)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const USER_ALICE: &str = "alice@example.test";

    fn authenticator(users: &str, failures_per_minute: u32) -> (Authenticator, tempfile::TempDir) {
        authenticator_with(
            users,
            &format!("{{ failuresPerIpPerMinute: {failures_per_minute} }}"),
        )
    }

    /// An authenticator for `users` (a users file of example.test) with `auth` as the YAML
    /// of the config's `auth` section.
    fn authenticator_with(users: &str, auth: &str) -> (Authenticator, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        std::fs::write(&path, users).unwrap();
        let yaml = format!(
            r#"
hostname: mx.example.test
listeners: [ {{ name: mx, kind: mx, address: "127.0.0.1:2525" }} ]
domains:
  - {{ name: example.test, usersFile: {:?}, limits: {{ messagesPerMinutePerUser: 2 }} }}
auth: {auth}
"#,
            path
        );
        let config = NodeConfig::from_yaml(&yaml).unwrap();
        (Authenticator::load(&config).unwrap(), dir)
    }

    #[tokio::test]
    async fn argon2_and_bcrypt_users_log_in() {
        let argon = hash_password("wonderland").unwrap();
        let bcrypt = bcrypt::hash("looking-glass", 4).unwrap();
        let (auth, _dir) = authenticator(
            &format!("# users\nalice@example.test:{argon}\n\ncarol:{bcrypt}\n"),
            10,
        );
        assert_eq!(auth.user_count(), 2);
        let ok = auth
            .authenticate(LOCAL, "Alice@Example.test", "wonderland")
            .await;
        assert_eq!(
            ok,
            AuthOutcome::Success(AuthenticatedUser {
                name: "alice@example.test".into(),
                domain: "example.test".into()
            })
        );
        assert!(matches!(
            auth.authenticate(LOCAL, "carol@example.test", "looking-glass")
                .await,
            AuthOutcome::Success(_)
        ));
        assert_eq!(
            auth.authenticate(LOCAL, "alice@example.test", "wrong")
                .await,
            AuthOutcome::Failure
        );
        assert_eq!(
            auth.authenticate(LOCAL, "nobody@example.test", "wonderland")
                .await,
            AuthOutcome::Failure
        );
    }

    #[tokio::test]
    async fn failures_per_ip_are_throttled() {
        let argon = hash_password("pw").unwrap();
        let (auth, _dir) = authenticator(&format!("alice:{argon}\n"), 2);
        for _ in 0..3 {
            assert_eq!(
                auth.authenticate(LOCAL, "alice", "bad").await,
                AuthOutcome::Failure
            );
        }
        // Budget of 2 used up: even the right password is not checked now.
        assert_eq!(
            auth.authenticate(LOCAL, "alice@example.test", "pw").await,
            AuthOutcome::RateLimited(LimitedBy::ClientIp)
        );
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(matches!(
            auth.authenticate(other, "alice@example.test", "pw").await,
            AuthOutcome::Success(_)
        ));
    }

    #[tokio::test]
    async fn failures_per_client_count_a_whole_ipv6_prefix() {
        let argon = hash_password("pw").unwrap();
        let (auth, _dir) = authenticator(&format!("alice:{argon}\n"), 2);
        for last in 1..=3u16 {
            let ip = IpAddr::from([0x2001, 0xdb8, 0, 7, 0, 0, 0, last]);
            assert_eq!(
                auth.authenticate(ip, "alice", "bad").await,
                AuthOutcome::Failure
            );
        }
        // A fourth address of the same /64 is the same client: over its budget.
        let same = IpAddr::from([0x2001, 0xdb8, 0, 7, 0xffff, 0, 0, 1]);
        assert_eq!(
            auth.authenticate(same, "alice@example.test", "pw").await,
            AuthOutcome::RateLimited(LimitedBy::ClientIp)
        );
        let next = IpAddr::from([0x2001, 0xdb8, 0, 8, 0, 0, 0, 1]);
        assert!(matches!(
            auth.authenticate(next, "alice@example.test", "pw").await,
            AuthOutcome::Success(_)
        ));
    }

    #[tokio::test]
    async fn password_checks_beyond_the_slots_wait_then_get_busy() {
        let argon = hash_password("pw").unwrap();
        let (auth, _dir) = authenticator_with(
            &format!("alice:{argon}\n"),
            "{ failuresPerIpPerMinute: 100, maxConcurrentVerifications: 1, verificationWait: 10ms }",
        );
        let auth = Arc::new(auth);
        // An argon2 check takes far longer than 10 ms: of several at once, one runs and the
        // others find no slot in time.
        let tries: Vec<_> = (0..4u8)
            .map(|i| {
                let auth = auth.clone();
                tokio::spawn(async move {
                    auth.authenticate(IpAddr::from([127, 0, 0, i]), USER_ALICE, "pw")
                        .await
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for t in tries {
            outcomes.push(t.await.unwrap());
        }
        let busy = outcomes.iter().filter(|o| **o == AuthOutcome::Busy).count();
        let ok = outcomes
            .iter()
            .filter(|o| matches!(o, AuthOutcome::Success(_)))
            .count();
        assert!(busy >= 1 && ok >= 1, "{outcomes:?}");
        assert_eq!(busy + ok, 4, "{outcomes:?}");
        // A busy refusal counted nothing: the slot is free again and the login works.
        assert!(matches!(
            auth.authenticate(LOCAL, USER_ALICE, "pw").await,
            AuthOutcome::Success(_)
        ));
    }

    #[tokio::test]
    async fn failures_per_user_are_throttled_from_any_address() {
        let argon = hash_password("pw").unwrap();
        let (auth, _dir) = authenticator_with(
            &format!("alice:{argon}\nbob:{argon}\n"),
            "{ failuresPerIpPerMinute: 100, failuresPerUser: 3, failuresPerUserWindow: 1h }",
        );
        for i in 1..=3u8 {
            let ip = IpAddr::from([127, 0, 0, i]);
            assert_eq!(
                auth.authenticate(ip, "alice@example.test", "bad").await,
                AuthOutcome::Failure,
                "guess from 127.0.0.{i}"
            );
        }
        // From a fourth address, with the right password and another spelling: refused
        // without a password check, while another user logs in.
        let fresh = IpAddr::from([127, 0, 0, 9]);
        assert_eq!(
            auth.authenticate(fresh, " ALICE@example.test", "pw").await,
            AuthOutcome::RateLimited(LimitedBy::User)
        );
        assert!(matches!(
            auth.authenticate(fresh, "bob@example.test", "pw").await,
            AuthOutcome::Success(_)
        ));
        // Unknown names reach the same limit, so the replies do not tell them apart.
        for _ in 0..3 {
            assert_eq!(
                auth.authenticate(fresh, "nobody@example.test", "x").await,
                AuthOutcome::Failure
            );
        }
        assert_eq!(
            auth.authenticate(fresh, "nobody@example.test", "x").await,
            AuthOutcome::RateLimited(LimitedBy::User)
        );
    }

    #[test]
    fn a_short_username_key_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "short").unwrap();
        let yaml = format!(
            r#"
hostname: mx.example.test
listeners: [ {{ name: mx, kind: mx, address: "127.0.0.1:2525" }} ]
auth: {{ usernameKeyFile: {key:?} }}
"#
        );
        let config = NodeConfig::from_yaml(&yaml).unwrap();
        let err = Authenticator::load(&config).err().unwrap();
        assert!(matches!(err, UsersFileError::LoadUsernameKey(_)), "{err:?}");
    }

    #[tokio::test]
    async fn message_rate_and_sender_domain() {
        let argon = hash_password("pw").unwrap();
        let (auth, _dir) = authenticator(&format!("alice:{argon}\n"), 5);
        let AuthOutcome::Success(user) = auth.authenticate(LOCAL, "alice@example.test", "pw").await
        else {
            panic!("login failed");
        };
        assert!(user.may_send_as("EXAMPLE.test"));
        assert!(!user.may_send_as("example.test.evil"));
        assert!(auth.allow_message(&user));
        assert!(auth.allow_message(&user));
        assert!(
            !auth.allow_message(&user),
            "third message in a minute over a limit of 2"
        );
    }

    #[test]
    fn malformed_lines_are_reported_without_the_hash() {
        let err = parse_users("alice:plaintext-password\n", "example.test").unwrap_err();
        assert_eq!(err.0, 1);
        assert!(!err.1.contains("plaintext-password"), "{}", err.1);
        let err = parse_users("bob@other.test:$2b$04$x\n", "example.test").unwrap_err();
        assert!(err.1.contains("not in domain"), "{}", err.1);
        assert!(parse_users("no-colon\n", "example.test").is_err());
    }

    #[test]
    fn reload_picks_up_changes() {
        let argon = hash_password("pw").unwrap();
        let (auth, dir) = authenticator(&format!("alice:{argon}\n"), 5);
        std::fs::write(
            dir.path().join("users"),
            format!("alice:{argon}\nbob@example.test:{argon}\n"),
        )
        .unwrap();
        assert!(auth.reload_if_changed().is_empty());
        assert_eq!(auth.user_count(), 2);
    }
}
