//! When a session's entitlement is checked again, and why one went unconfirmed: pure
//! arithmetic on instants, kept with the sessions it schedules. The checks themselves (asking the
//! identity provider) are `entitlement`'s.

use std::time::{Duration, Instant};

/// The longest a check may take, and so how long before a session's confirmation runs out its
/// check starts (less for short intervals: half the interval).
pub const MAX_CHECK_TIME: Duration = Duration::from_secs(5);
/// How often the task looks for due checks and for sessions whose confirmation ran out.
pub const TICK: Duration = Duration::from_millis(250);

/// When sessions are checked: pure arithmetic on instants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    interval: Duration,
}

impl Schedule {
    /// Sessions confirmed for `interval` at a time.
    pub fn new(interval: Duration) -> Self {
        Schedule { interval }
    }

    /// The interval: how long a confirmation lasts.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// How long a check may take, and how long before the confirmation runs out it starts:
    /// half the interval, at most [`MAX_CHECK_TIME`].
    pub fn lead(&self) -> Duration {
        (self.interval / 2).min(MAX_CHECK_TIME)
    }

    /// For a confirmation at `at` (the sign-in, or the start of a check the provider answered):
    /// until when the session is confirmed, and when its next check is due.
    pub fn confirmed(&self, at: Instant) -> (Instant, Instant) {
        let until = at + self.interval;
        (until, until - self.lead())
    }

    /// After a check without a usable answer at `now`: when to try again.
    pub fn retry(&self, now: Instant) -> Instant {
        now + (self.lead() / 4).max(TICK)
    }
}

/// Why a session went unconfirmed for a whole interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unconfirmed {
    /// Its checks got no usable answer in time (provider unreachable, failing or garbled).
    NoAnswer,
    /// Its sign-in brought no refresh token, so it could not be checked.
    NoRefreshToken,
}

impl Unconfirmed {
    /// The audit record's `status_detail`.
    pub fn reason(self) -> &'static str {
        match self {
            Unconfirmed::NoAnswer => {
                "entitlement unconfirmed: the identity provider could not confirm it in time"
            }
            Unconfirmed::NoRefreshToken => {
                "entitlement unconfirmed: the identity provider issued no refresh token"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_starts_early_enough_to_finish_before_the_confirmation_runs_out() {
        let now = Instant::now();
        let minute = Schedule::new(Duration::from_secs(60));
        assert_eq!(minute.lead(), MAX_CHECK_TIME);
        let (until, next) = minute.confirmed(now);
        assert_eq!(until, now + Duration::from_secs(60));
        assert_eq!(next, now + Duration::from_secs(55));

        let short = Schedule::new(Duration::from_secs(4));
        assert_eq!(short.lead(), Duration::from_secs(2));
        let (until, next) = short.confirmed(now);
        assert_eq!(until - next, Duration::from_secs(2));
        // Retries come well inside the lead, never faster than the task's tick.
        assert_eq!(short.retry(now), now + Duration::from_millis(500));
        assert_eq!(Schedule::new(Duration::from_secs(2)).retry(now), now + TICK);
    }

    #[test]
    fn reasons_say_what_happened() {
        assert!(Unconfirmed::NoAnswer.reason().contains("could not confirm"));
        assert!(
            Unconfirmed::NoRefreshToken
                .reason()
                .contains("no refresh token")
        );
    }
}
