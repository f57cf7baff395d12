//! The retry schedule: when a deferred message is tried again, and when it expires.
//!
//! With `retry.intervals` (node-wide, or a domain's `retryIntervals`) the waits are that list
//! in order, its last value repeating. Without, like Postfix's queue manager, the wait before
//! the next attempt is the message's age,
//! clamped to `[minBackoff, maxBackoff]`: with the defaults that is 5, 5, 10, 20, 40 minutes,
//! then every ~67 minutes, a doubling schedule that needs no attempt counter (RFC 5321
//! 4.5.4.1 asks for at least 30 minutes between retries to one destination but explicitly
//! allows smarter strategies; the first retries come sooner because most temporary failures
//! are greylisting, which clears in minutes). Up to 10 % jitter spreads retries of messages
//! that failed together. The last attempt is placed exactly at the end of the lifetime, so a
//! message is not returned without a try at the very end.
//!
//! Pure functions of the clock value passed in; no I/O.

use std::time::{Duration, SystemTime};

use crate::config::RetryConfig;

/// Share of the wait added at random (0.1 = up to 10 %).
const JITTER: f64 = 0.1;

/// What to do with recipients that failed temporarily.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again at this time.
    RetryAt(SystemTime),
    /// The lifetime is over: return the message to the sender (or drop a bounce).
    Expired,
}

/// The queue lifetime that applies to a message: bounces (null sender) have their own.
pub fn lifetime(config: &RetryConfig, null_sender: bool) -> Duration {
    if null_sender {
        config.bounce_lifetime.0
    } else {
        config.lifetime.0
    }
}

/// The next attempt for a message accepted at `accepted_at` (moved by the time it spent held
/// or paused), after its attempt number `attempts` (1 = the first) failed at `now`. `jitter`
/// is a random number in `[0, 1)`.
pub fn next_attempt(
    config: &RetryConfig,
    lifetime: Duration,
    accepted_at: SystemTime,
    now: SystemTime,
    attempts: u32,
    jitter: f64,
) -> RetryDecision {
    let age = now.duration_since(accepted_at).unwrap_or(Duration::ZERO);
    if age >= lifetime {
        return RetryDecision::Expired;
    }
    let base = config.base_wait(attempts, age);
    let wait = base.mul_f64(1.0 + JITTER * jitter.clamp(0.0, 1.0));
    let expiry = accepted_at + lifetime;
    RetryDecision::RetryAt((now + wait).min(expiry))
}

/// Whether a "delayed" notice is due now: the sender is not null, a warning time is
/// configured, the message is older than it, and no notice was sent yet.
pub fn delay_warning_due(
    config: &RetryConfig,
    accepted_at: SystemTime,
    now: SystemTime,
    null_sender: bool,
    already_warned: bool,
) -> bool {
    let Some(after) = config.delay_warning else {
        return false;
    };
    !null_sender
        && !already_warned
        && now.duration_since(accepted_at).unwrap_or(Duration::ZERO) >= after.0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    const MIN: Duration = Duration::from_secs(60);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn wait_after(config: &RetryConfig, age: u64) -> u64 {
        let lifetime = config.lifetime.0;
        match next_attempt(config, lifetime, at(0), at(age), 1, 0.0) {
            RetryDecision::RetryAt(t) => t.duration_since(at(age)).unwrap().as_secs(),
            RetryDecision::Expired => u64::MAX,
        }
    }

    #[test]
    fn schedule_grows_from_minutes_to_hours_then_expires() {
        let config = RetryConfig::default();
        // Simulate a message that keeps failing: each attempt happens when the last wait
        // ended.
        let mut now = 0u64;
        let mut waits = Vec::new();
        loop {
            let w = wait_after(&config, now);
            if w == u64::MAX {
                break;
            }
            waits.push(w);
            now += w;
            assert!(waits.len() < 1000, "schedule must end");
        }
        assert_eq!(&waits[..5], &[300, 300, 600, 1200, 2400]);
        assert!(
            waits[5..waits.len() - 1].iter().all(|w| *w == 4000),
            "{waits:?}"
        );
        assert_eq!(
            now,
            5 * 24 * 3600,
            "the last attempt lands on the end of the lifetime"
        );
        // About 5 days of ~67-minute retries.
        assert!((100..120).contains(&waits.len()), "{}", waits.len());
    }

    #[test]
    fn jitter_adds_at_most_ten_percent_and_never_passes_expiry() {
        let config = RetryConfig::default();
        let lifetime = config.lifetime.0;
        let RetryDecision::RetryAt(t) = next_attempt(&config, lifetime, at(0), at(0), 1, 0.999)
        else {
            panic!()
        };
        let w = t.duration_since(at(0)).unwrap().as_secs();
        assert!((300..=330).contains(&w), "{w}");
        let near_end = lifetime.as_secs() - 10;
        assert_eq!(
            next_attempt(&config, lifetime, at(0), at(near_end), 9, 0.5),
            RetryDecision::RetryAt(at(lifetime.as_secs()))
        );
        assert_eq!(
            next_attempt(&config, lifetime, at(0), at(lifetime.as_secs()), 9, 0.5),
            RetryDecision::Expired
        );
    }

    #[test]
    fn a_list_of_intervals_is_followed_in_order() {
        let config = RetryConfig {
            intervals: vec![
                HumanDuration::from_secs(60),
                HumanDuration::from_secs(300),
                HumanDuration::from_secs(3600),
            ],
            ..RetryConfig::default()
        };
        let lifetime = config.lifetime.0;
        let mut now = 0u64;
        let mut waits = Vec::new();
        for attempt in 1..=5 {
            let RetryDecision::RetryAt(t) =
                next_attempt(&config, lifetime, at(0), at(now), attempt, 0.0)
            else {
                panic!("expired early")
            };
            let w = t.duration_since(at(now)).unwrap().as_secs();
            waits.push(w);
            now += w;
        }
        assert_eq!(waits, [60, 300, 3600, 3600, 3600]);
    }

    #[test]
    fn clock_skew_counts_as_a_new_message() {
        let config = RetryConfig::default();
        // "accepted" in the future (another node's clock is ahead): wait the minimum.
        assert_eq!(wait_after_with(&config, at(100), at(50)), 300);
    }

    fn wait_after_with(config: &RetryConfig, accepted: SystemTime, now: SystemTime) -> u64 {
        match next_attempt(config, config.lifetime.0, accepted, now, 1, 0.0) {
            RetryDecision::RetryAt(t) => t.duration_since(now).unwrap().as_secs(),
            RetryDecision::Expired => u64::MAX,
        }
    }

    #[test]
    fn bounces_have_their_own_lifetime() {
        let config = RetryConfig {
            bounce_lifetime: HumanDuration(MIN),
            ..RetryConfig::default()
        };
        assert_eq!(lifetime(&config, true), MIN);
        assert_eq!(lifetime(&config, false), config.lifetime.0);
    }

    #[test]
    fn delay_warning_once_after_the_threshold() {
        let config = RetryConfig {
            delay_warning: Some(HumanDuration::from_secs(4 * 3600)),
            ..RetryConfig::default()
        };
        assert!(!delay_warning_due(&config, at(0), at(3600), false, false));
        assert!(delay_warning_due(
            &config,
            at(0),
            at(5 * 3600),
            false,
            false
        ));
        assert!(
            !delay_warning_due(&config, at(0), at(5 * 3600), false, true),
            "sent already"
        );
        assert!(
            !delay_warning_due(&config, at(0), at(5 * 3600), true, false),
            "null sender"
        );
        assert!(!delay_warning_due(
            &RetryConfig::default(),
            at(0),
            at(9 * 86400),
            false,
            false
        ));
    }
}
