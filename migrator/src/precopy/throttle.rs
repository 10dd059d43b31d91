//! Write throttling and link-rate estimation. Time is a parameter.
//!
//! The guest may dirty new blocks at most `ratio` × the measured drain rate of the
//! link; beyond that each write is delayed (at most `max_delay`) until its share of
//! the budget has accrued. Rewrites of blocks that are already dirty cost nothing:
//! they add no work to the migration.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThrottleConfig {
    /// Fraction of the link's drain rate the guest may spend on newly dirtied bytes.
    /// 0.5 halves the dirty set every round at worst.
    pub ratio: f64,
    /// Upper bound on the delay added to any single write.
    pub max_delay: Duration,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            ratio: 0.5,
            max_delay: Duration::from_millis(100),
        }
    }
}

/// Exponentially weighted rate over fixed windows.
#[derive(Debug, Clone)]
pub struct RateMeter {
    window: Duration,
    start: Option<Instant>,
    bytes: u64,
    rate: Option<f64>,
}

impl RateMeter {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            start: None,
            bytes: 0,
            rate: None,
        }
    }

    pub fn record(&mut self, bytes: u64, now: Instant) {
        let start = *self.start.get_or_insert(now);
        self.bytes += bytes;
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= self.window {
            let sample = self.bytes as f64 / elapsed.as_secs_f64();
            self.rate = Some(match self.rate {
                None => sample,
                Some(r) => 0.7 * r + 0.3 * sample,
            });
            self.start = Some(now);
            self.bytes = 0;
        }
    }

    /// Bytes per second, once one window has passed.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }
}

#[derive(Debug, Clone)]
pub struct Throttle {
    cfg: ThrottleConfig,
    tokens: f64,
    last: Option<Instant>,
}

impl Throttle {
    pub fn new(cfg: ThrottleConfig) -> Self {
        Self {
            cfg,
            tokens: 0.0,
            last: None,
        }
    }

    /// Charge `new_dirty` bytes against a budget refilled at `ratio × drain`;
    /// returns how long the write must wait.
    pub fn charge(&mut self, new_dirty: u64, drain: Option<f64>, now: Instant) -> Duration {
        let Some(drain) = drain else {
            return Duration::ZERO; // no estimate of the link yet
        };
        let allowed = (self.cfg.ratio * drain).max(1.0);
        let last = self.last.replace(now).unwrap_or(now);
        let elapsed = now.saturating_duration_since(last).as_secs_f64();
        // Allow a burst of at most 50 ms worth of budget.
        self.tokens = (self.tokens + elapsed * allowed).min(allowed * 0.05);
        self.tokens -= new_dirty as f64;
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        let wait = Duration::from_secs_f64(-self.tokens / allowed);
        wait.min(self.cfg.max_delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meter_converges_to_the_true_rate() {
        let t0 = Instant::now();
        let mut m = RateMeter::new(Duration::from_millis(100));
        for i in 1..=100u64 {
            m.record(1000, t0 + Duration::from_millis(10 * i));
        }
        let r = m.rate().expect("rate after windows");
        assert!((r - 100_000.0).abs() < 5_000.0, "rate {r}");
    }

    #[test]
    fn throttle_delays_only_beyond_budget_and_caps_delay() {
        let t0 = Instant::now();
        let mut t = Throttle::new(ThrottleConfig {
            ratio: 0.5,
            max_delay: Duration::from_millis(50),
        });
        assert_eq!(t.charge(1 << 20, None, t0), Duration::ZERO);
        // Budget 500 KB/s: 1 MB at once must wait, capped at 50 ms.
        let d = t.charge(1_000_000, Some(1_000_000.0), t0);
        assert_eq!(d, Duration::from_millis(50));
        // A rewrite of already-dirty blocks costs nothing... but the debt remains.
        let d2 = t.charge(0, Some(1_000_000.0), t0 + Duration::from_secs(3));
        assert_eq!(d2, Duration::ZERO);
    }
}
