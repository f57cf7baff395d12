//! The wall clock as a seam: the system clock in production; a clock started at another
//! moment (`smtp-node --clock-start`) for drills and tests that must see a day end, such as
//! the daily TLS-RPT reports. Only the parts that date things by calendar day use it; timers
//! and timeouts keep tokio's monotonic time.

use std::time::{Instant, SystemTime};

/// The time, injectable.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that reads `start` when it is made and then advances at the pace of the system's
/// monotonic clock.
pub struct StartedClock {
    start: SystemTime,
    origin: Instant,
}

impl StartedClock {
    pub fn new(start: SystemTime) -> Self {
        Self {
            start,
            origin: Instant::now(),
        }
    }
}

impl Clock for StartedClock {
    fn now(&self) -> SystemTime {
        self.start + self.origin.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_started_clock_begins_at_its_start_and_moves_on() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_823_941);
        let clock = StartedClock::new(start);
        let first = clock.now();
        assert!(first >= start && first < start + Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(20));
        assert!(clock.now() >= first + Duration::from_millis(20));
    }
}
