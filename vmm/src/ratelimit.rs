//! Rate limiting for diagnostics a guest can trigger: at most `burst` messages per second per
//! limiter, then silence (and a count of what was dropped at the next allowed message).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A per-site log limiter.
#[derive(Debug)]
pub struct LogLimiter {
    burst: u32,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    window: Option<Instant>,
    used: u32,
    dropped: u64,
}

impl LogLimiter {
    /// A limiter allowing `burst` messages a second.
    pub const fn new(burst: u32) -> Self {
        Self {
            burst,
            state: Mutex::new(State {
                window: None,
                used: 0,
                dropped: 0,
            }),
        }
    }

    /// Whether a message may be logged now; `Some(n)` with the number dropped since the last.
    pub fn allow(&self) -> Option<u64> {
        let Ok(mut s) = self.state.lock() else {
            return None;
        };
        let now = Instant::now();
        let fresh = s
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1));
        if fresh {
            s.window = Some(now);
            s.used = 0;
        }
        if s.used < self.burst {
            s.used += 1;
            Some(std::mem::take(&mut s.dropped))
        } else {
            s.dropped += 1;
            None
        }
    }
}

/// Logs a guest-triggerable warning through a per-call-site limiter.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)*) => {{
        static LIMITER: $crate::ratelimit::LogLimiter = $crate::ratelimit::LogLimiter::new(10);
        if let Some(dropped) = LIMITER.allow() {
            tracing::warn!(dropped, $($arg)*);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_stops_after_burst() {
        let l = LogLimiter::new(3);
        let allowed = (0..10).filter(|_| l.allow().is_some()).count();
        assert_eq!(allowed, 3);
    }
}
