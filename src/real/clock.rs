//! The real runtime's clock: Unix nanoseconds that never go backwards.
//!
//! **Invariant:** `now()` is monotonic (the core's deadlines assume time only
//! moves forward) and stays close to Unix time (subscribers send `ExpireTime`
//! in Unix nanoseconds), because it is the Unix time read once at start plus a
//! monotonic `Instant` offset.

use crate::types::Time;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: Instant,
    start_unix: Time,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Clock {
        let start_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| Time(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)))
            .unwrap_or(Time::ZERO);
        Clock {
            start: Instant::now(),
            start_unix,
        }
    }

    /// This clock as if the wall clock had been stepped by `secs` before it
    /// was read (tests of a clock stepped across a restart).
    #[cfg(test)]
    pub(crate) fn stepped(self, secs: i64) -> Clock {
        let ns = secs.unsigned_abs() * 1_000_000_000;
        let start_unix = if secs >= 0 {
            Time(self.start_unix.0.saturating_add(ns))
        } else {
            Time(self.start_unix.0.saturating_sub(ns))
        };
        Clock { start_unix, ..self }
    }

    pub fn now(&self) -> Time {
        self.start_unix.plus(self.start.elapsed())
    }

    /// The `Instant` at which [`Clock::now`] reaches `t` (now, if `t` has passed).
    pub fn instant_of(&self, t: Time) -> Instant {
        self.start + t.since(self.start_unix)
    }

    /// How long until `t` (zero if it has passed).
    pub fn until(&self, t: Time) -> Duration {
        t.since(self.now())
    }
}

/// Unix nanoseconds from the system clock, for values a client would send
/// (`CreateTime`, `ExpireTime`).
pub fn unix_nanos_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_monotonic_and_near_unix_time() {
        let c = Clock::new();
        let a = c.now();
        let b = c.now();
        assert!(b >= a);
        let unix = unix_nanos_now();
        assert!(
            unix.abs_diff(b.as_nanos()) < 5_000_000_000,
            "clock drifted from Unix time"
        );
        assert!(c.instant_of(Time::ZERO) <= Instant::now());
    }
}
