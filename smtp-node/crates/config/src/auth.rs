//! `auth`: the limits on failed logins (per session, per client IP, and per user name over
//! every node of a domain) and the key that hides user names in the shared failure counter.

use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::units::HumanDuration;

/// Ceiling for `auth.failuresPerUser`: each user name keeps up to that many failure times
/// (in memory and in the shared stream), so the limit bounds their size.
pub const MAX_AUTH_FAILURES_PER_USER: u32 = 1000;
/// Shortest `auth.failuresPerUserWindow`; NATS refuses a stream `max_age` under 100 ms.
const MIN_AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(1);
/// Longest `auth.failuresPerUserWindow`: a lockout measured in weeks is a typo, not a policy.
const MAX_AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
/// Range of `auth.sharedCounterTimeout`: every AUTH may wait that long for NATS.
const MIN_SHARED_COUNTER_TIMEOUT: Duration = Duration::from_millis(100);
const MAX_SHARED_COUNTER_TIMEOUT: Duration = Duration::from_secs(30);
/// Range of `auth.verificationWait`: the session holds its connection slot while it waits.
const MIN_VERIFICATION_WAIT: Duration = Duration::from_millis(10);
const MAX_VERIFICATION_WAIT: Duration = Duration::from_secs(60);

/// Authentication limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthConfig {
    /// Failed AUTH attempts in one session before `421 4.7.0` and disconnect.
    #[serde(default = "default_auth_failures_per_session")]
    pub max_failures_per_session: u32,
    /// Failed AUTH attempts per client per minute, over all sessions; above it AUTH gets
    /// `454 4.7.0` until the rate falls. A client is an IPv4 address or an IPv6 prefix of
    /// `clientIpv6Prefix` bits. Counted by each node on its own.
    #[serde(default = "default_auth_failures_per_ip")]
    pub failures_per_ip_per_minute: u32,
    /// Failed AUTH attempts for one user name within `failuresPerUserWindow`, from any client
    /// address, counted over every node with the same NATS server, `nats.stream` and
    /// `nats.subjectPrefix` (all replicas of a MailDomain). Once that many failed, every AUTH for the user name gets
    /// `454 4.7.0` from any address, even with the right password, until the oldest of those
    /// failures is older than the window. This stops guessing spread over many addresses,
    /// which the per-IP limit cannot see. The price: someone who guesses often enough keeps
    /// that user from logging in, so keep it well above what a client with a stale password
    /// causes. A successful login does not clear earlier failures. 1 to 1000.
    ///
    /// Unknown user names are limited alike by each node (so one node's replies do not tell
    /// them apart) but are never written to the shared counter: a flood of made-up names can
    /// neither grow it nor push real users' failures out of it.
    ///
    /// The shared counter is the JetStream stream `<nats.stream>_AUTH_FAILURES` (subjects
    /// `<nats.subjectPrefix>-auth-failures.<keyed hash of the user name>`, no password, no
    /// plain user name, at most `failuresPerUser` messages per subject and no stream-wide cap
    /// that could evict another user's), created by the node; nodes sharing it should use the
    /// same window and limit, as the stream keeps those of the node that set it up last. While
    /// NATS cannot answer, logins are not refused for that reason: each node then counts only
    /// its own failures.
    #[serde(default = "default_auth_failures_per_user")]
    pub failures_per_user: u32,
    /// The sliding window of `failuresPerUser`, 1 s to 7 days.
    #[serde(default = "default_auth_failures_per_user_window")]
    pub failures_per_user_window: HumanDuration,
    /// Longest an AUTH waits for the shared counter (one look-up, and one write after a
    /// failure) before going on with this node's own count; NATS then gets 5 s of rest
    /// before it is asked again. 100 ms to 30 s; raise it when NATS is far away or its
    /// store fsyncs every write on slow disks.
    #[serde(default = "default_auth_shared_counter_timeout")]
    pub shared_counter_timeout: HumanDuration,
    /// Password checks running at once on this node. Each argon2 check takes about 19 MiB and
    /// a CPU core for a moment, so a flood of AUTH commands must queue rather than run all at
    /// once. Unset: the number of CPUs the node may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_verifications: Option<u32>,
    /// Longest an AUTH waits for a free password check; then it gets `454 4.7.0 Temporary
    /// authentication failure` (the password not checked, no failure counted). 10 ms to 60 s.
    #[serde(default = "default_verification_wait")]
    pub verification_wait: HumanDuration,
    /// A file of at least 16 secret bytes (the same on every node) that keys the hash of user
    /// names in the shared counter, so that whoever can read the NATS stream cannot test
    /// guessed names against it. Unset: a built-in key, which keeps names out of plain sight
    /// only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_key_file: Option<PathBuf>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            max_failures_per_session: default_auth_failures_per_session(),
            failures_per_ip_per_minute: default_auth_failures_per_ip(),
            failures_per_user: default_auth_failures_per_user(),
            failures_per_user_window: default_auth_failures_per_user_window(),
            shared_counter_timeout: default_auth_shared_counter_timeout(),
            max_concurrent_verifications: None,
            verification_wait: default_verification_wait(),
            username_key_file: None,
        }
    }
}

impl AuthConfig {
    pub(crate) fn validate(&self, errors: &mut Vec<String>) {
        if self.max_failures_per_session == 0 {
            errors.push("auth.maxFailuresPerSession: must be at least 1".to_owned());
        }
        if self.failures_per_ip_per_minute == 0 {
            errors.push("auth.failuresPerIpPerMinute: must be at least 1".to_owned());
        }
        if !(1..=MAX_AUTH_FAILURES_PER_USER).contains(&self.failures_per_user) {
            errors.push(format!(
                "auth.failuresPerUser: {} must be between 1 and {MAX_AUTH_FAILURES_PER_USER}",
                self.failures_per_user
            ));
        }
        let window = self.failures_per_user_window.0;
        if !(MIN_AUTH_FAILURE_WINDOW..=MAX_AUTH_FAILURE_WINDOW).contains(&window) {
            errors.push(format!(
                "auth.failuresPerUserWindow: {} must be between 1s and 7days",
                humantime::format_duration(window)
            ));
        }
        let timeout = self.shared_counter_timeout.0;
        if !(MIN_SHARED_COUNTER_TIMEOUT..=MAX_SHARED_COUNTER_TIMEOUT).contains(&timeout) {
            errors.push(format!(
                "auth.sharedCounterTimeout: {} must be between 100ms and 30s",
                humantime::format_duration(timeout)
            ));
        }
        if self.max_concurrent_verifications == Some(0) {
            errors.push(
                "auth.maxConcurrentVerifications: must be at least 1 (or unset for the number of CPUs)"
                    .to_owned(),
            );
        }
        let wait = self.verification_wait.0;
        if !(MIN_VERIFICATION_WAIT..=MAX_VERIFICATION_WAIT).contains(&wait) {
            errors.push(format!(
                "auth.verificationWait: {} must be between 10ms and 60s",
                humantime::format_duration(wait)
            ));
        }
    }

    /// The number of password checks that may run at once: `maxConcurrentVerifications`, or
    /// the CPUs this process may use.
    pub fn verification_slots(&self) -> usize {
        match self.max_concurrent_verifications {
            Some(n) => n.max(1) as usize,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

fn default_auth_failures_per_session() -> u32 {
    3
}
fn default_auth_failures_per_ip() -> u32 {
    10
}
// Twenty guesses an hour per user (480 a day) from the whole internet, while a phone retrying
// a stale password every few minutes stays under it.
fn default_auth_failures_per_user() -> u32 {
    20
}
fn default_auth_failures_per_user_window() -> HumanDuration {
    HumanDuration::from_secs(3600)
}
fn default_auth_shared_counter_timeout() -> HumanDuration {
    HumanDuration::from_secs(1)
}
// A check takes well under a second on a healthy node; five seconds of queue is a flood.
fn default_verification_wait() -> HumanDuration {
    HumanDuration::from_secs(5)
}
