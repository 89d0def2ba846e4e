//! A millisecond clock from a zero of its own: what tether keeps per connection or
//! per socket as a `u64` in an atomic (an idle-since, a deadline) instead of a
//! 16-byte `Instant` behind a lock.

use std::time::Duration;

use tokio::time::Instant;

/// Milliseconds since the clock's zero.
#[derive(Debug, Clone, Copy)]
pub struct MsClock {
    zero: Instant,
}

impl MsClock {
    /// A clock whose zero is now.
    pub fn new() -> MsClock {
        MsClock {
            zero: Instant::now(),
        }
    }

    /// `at` in whole milliseconds, rounded down (0 before the zero).
    pub fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.zero).as_millis() as u64
    }

    /// `at` in milliseconds, rounded up: a deadline kept this way is never early.
    pub fn ms_ceil(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.zero);
        since.as_millis() as u64 + u64::from(since.subsec_nanos() % 1_000_000 != 0)
    }

    /// Now, in milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.ms(Instant::now())
    }

    /// The instant `ms` milliseconds after the zero.
    pub fn at(&self, ms: u64) -> Instant {
        self.zero + Duration::from_millis(ms)
    }
}

impl Default for MsClock {
    fn default() -> MsClock {
        MsClock::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn milliseconds_round_down_or_up_and_map_back() {
        let clock = MsClock::new();
        let zero = clock.at(0);
        let t = zero + Duration::from_micros(2_300);
        assert_eq!((clock.ms(t), clock.ms_ceil(t)), (2, 3));
        let whole = zero + Duration::from_millis(7);
        assert_eq!((clock.ms(whole), clock.ms_ceil(whole)), (7, 7));
        assert_eq!(clock.at(7), whole);
        assert_eq!(clock.ms(zero - Duration::from_millis(5)), 0);
    }
}
