//! Retry delays of the node's reconnect and set-up loops: doubling from a first delay up to a
//! longest one, without end (backon's exponential backoff, one builder for every loop). A loop
//! that succeeds takes a fresh sequence.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};

/// `first`, `2 × first`, `4 × first`, ... up to `longest`, then `longest` forever.
pub fn delays(first: Duration, longest: Duration) -> Delays {
    Delays {
        inner: ExponentialBuilder::new()
            .with_min_delay(first)
            .with_max_delay(longest)
            .without_max_times()
            .build(),
        longest,
    }
}

/// An endless sequence of retry delays ([`delays`]).
#[derive(Debug)]
pub struct Delays {
    inner: ExponentialBackoff,
    longest: Duration,
}

impl Delays {
    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        self.inner.next().unwrap_or(self.longest)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_longest_and_stay_there() {
        let mut d = delays(Duration::from_millis(200), Duration::from_secs(1));
        let got: Vec<u128> = (0..6).map(|_| d.next_delay().as_millis()).collect();
        assert_eq!(got, [200, 400, 800, 1000, 1000, 1000]);
    }
}
