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

/// Authentication limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthConfig {
    /// Failed AUTH attempts in one session before `421 4.7.0` and disconnect.
    #[serde(default = "default_auth_failures_per_session")]
    pub max_failures_per_session: u32,
    /// Failed AUTH attempts per client IP per minute, over all sessions; above it AUTH gets
    /// `454 4.7.0` until the rate falls. Counted by each node on its own.
    #[serde(default = "default_auth_failures_per_ip")]
    pub failures_per_ip_per_minute: u32,
    /// Failed AUTH attempts for one user name within `failuresPerUserWindow`, from any client
    /// address, counted over every node with the same NATS server, `nats.stream` and
    /// `nats.subjectPrefix` (all replicas of a MailDomain). Once that many failed, every AUTH for the user name gets
    /// `454 4.7.0` from any address, even with the right password, until the oldest of those
    /// failures is older than the window. This stops guessing spread over many addresses,
    /// which the per-IP limit cannot see. The price: someone who guesses often enough keeps
    /// that user from logging in, so keep it well above what a client with a stale password
    /// causes. Unknown user names are counted like real ones, so the replies do not tell them
    /// apart; a successful login does not clear earlier failures. 1 to 1000.
    ///
    /// The shared counter is the JetStream stream `<nats.stream>_AUTH_FAILURES` (subjects
    /// `<nats.subjectPrefix>-auth-failures.<keyed hash of the user name>`, no password, no
    /// plain user name), created by the node; nodes sharing it should use the same window and
    /// limit, as the stream keeps those of the node that set it up last. While NATS cannot
    /// answer, logins are not refused for that reason: each node then counts only its own
    /// failures.
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
