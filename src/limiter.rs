//! Per-connection token bucket (docs/protocol.md#rate-limit). Plain shard-local state owned
//! by the connection's reader, refilled lazily from the `now` it is given, so tests drive
//! it with a fake clock and the relay pays one `Instant` per read, not a timer per
//! connection.

use std::time::{Duration, Instant};

/// Shortest gap between two rate-limit notices (N1) to one connection.
pub const NOTICE_INTERVAL: Duration = Duration::from_secs(1);

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Relay it.
    Allow,
    /// Drop it; `notify` is true when the sender should get N1 now.
    Drop { notify: bool },
}

/// A bucket of `capacity` tokens refilled at `capacity / 60` per second: a fresh
/// connection may burst a full minute's quota, as the reference's "N per minute" implies.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    last_refill: Instant,
    last_notice: Option<Instant>,
}

impl TokenBucket {
    pub fn per_minute(msgs_per_minute: u64, now: Instant) -> Self {
        let capacity = msgs_per_minute as f64;
        TokenBucket {
            capacity,
            per_sec: capacity / 60.0,
            tokens: capacity,
            last_refill: now,
            last_notice: None,
        }
    }

    /// The same bucket at a new rate from `now` (a reload): the tokens earned so far are
    /// kept up to the new capacity, so a lowered limit binds at once and a raised one
    /// grants no burst beyond what the old one had saved.
    pub fn with_rate(mut self, msgs_per_minute: u64, now: Instant) -> Self {
        self.refill(now);
        let capacity = msgs_per_minute as f64;
        TokenBucket {
            capacity,
            per_sec: capacity / 60.0,
            tokens: self.tokens.min(capacity),
            ..self
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_refill).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
        self.last_refill = now;
    }

    /// Takes one token for a line arriving at `now`.
    pub fn check(&mut self, now: Instant) -> Decision {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Decision::Allow;
        }
        let notify = self
            .last_notice
            .is_none_or(|t| now.saturating_duration_since(t) >= NOTICE_INTERVAL);
        if notify {
            self.last_notice = Some(now);
        }
        Decision::Drop { notify }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(bucket: &mut TokenBucket, now: Instant, n: usize) -> usize {
        (0..n).filter(|_| bucket.check(now) == Decision::Allow).count()
    }

    #[test]
    fn a_fresh_connection_may_burst_a_minutes_quota() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_minute(300, t0);
        assert_eq!(allowed(&mut b, t0, 1000), 300);
    }

    #[test]
    fn a_new_rate_keeps_the_saved_tokens_up_to_its_capacity() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_minute(300, t0).with_rate(5, t0);
        assert_eq!(allowed(&mut b, t0, 300), 5, "lowered: the new capacity binds at once");
        // 5 per minute: one token every 12 s.
        assert_eq!(allowed(&mut b, t0 + Duration::from_secs(12), 10), 1);
        let t1 = t0 + Duration::from_secs(12);
        let mut b = b.with_rate(600, t1);
        assert_eq!(allowed(&mut b, t1, 10), 0, "raised: no burst beyond what was saved");
        assert_eq!(
            allowed(&mut b, t1 + Duration::from_secs(1), 20),
            10,
            "refills at the new rate"
        );
    }

    #[test]
    fn tokens_refill_at_the_per_minute_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_minute(60, t0);
        assert_eq!(allowed(&mut b, t0, 60), 60);
        assert_eq!(allowed(&mut b, t0 + Duration::from_millis(500), 5), 0);
        assert_eq!(allowed(&mut b, t0 + Duration::from_secs(10), 100), 10);
        // Never more than the capacity, however long the pause.
        assert_eq!(allowed(&mut b, t0 + Duration::from_secs(3600), 1000), 60);
    }

    #[test]
    fn the_notice_goes_out_at_most_once_per_second() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_minute(1, t0);
        assert_eq!(b.check(t0), Decision::Allow);
        assert_eq!(b.check(t0), Decision::Drop { notify: true });
        assert_eq!(
            b.check(t0 + Duration::from_millis(400)),
            Decision::Drop { notify: false }
        );
        assert_eq!(
            b.check(t0 + Duration::from_millis(999)),
            Decision::Drop { notify: false }
        );
        assert_eq!(
            b.check(t0 + Duration::from_millis(1000)),
            Decision::Drop { notify: true }
        );
    }

    #[test]
    fn zero_drops_everything() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_minute(0, t0);
        assert_eq!(allowed(&mut b, t0 + Duration::from_secs(100), 10), 0);
    }
}
