//! When a shard writes to its recipients: in *write passes*.
//!
//! A pass writes every recipient that has something queued, one socket write each, back to
//! back, right after the readers that were ready have read. Writes in a burst share the
//! wake-ups on both sides (the shard's and each receiving thread's), which is most of what
//! a small loopback send costs beyond the copy, and a pass that follows the reads carries
//! every line those reads framed.
//!
//! When passes happen ([`Pacer`]):
//! - A pass may start `flush_window_us` after the previous one started (the *window*), and
//!   at once when that much time has passed: a shard that was quiet writes a new line
//!   without waiting. Under a steady stream the window is what coalesces: whatever arrives
//!   within it rides in one write per recipient.
//! - The gap is at least as long as the previous pass took ([`Pacer::on_pass`]): when
//!   writing is expensive (a thousand recipients, a slow machine) the passes space out so
//!   that they take at most about half of the shard's time, and each write carries more.
//!   This bounds the CPU spent per delivery under load, at a latency of about two passes.
//! - A recipient with [`FLUSH_BYTES`] queued makes the next pass start at once: a write
//!   that large is efficient anyway, and a heavy stream should not wait for the window.
//!
//! Busy senders are read once per pass (read turns, `fanout::reads`), each read taking all
//! that arrived since.
//!
//! This file is the pass clock ([`Pacer`]); [`Schedule`] holds which recipients the next
//! pass writes.

mod schedule;

pub use schedule::{Entry, NextRun, Schedule, Scheduled};

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Queued bytes that make the next pass start at once.
pub const FLUSH_BYTES: usize = 16 << 10;

/// When the next pass may start, from how the last one went.
#[derive(Debug)]
pub struct Pacer {
    window: Duration,
    /// When the last pass started (`None`: there was none).
    last_start: Cell<Option<Instant>>,
    /// How long the last pass took, from its start to its last write.
    last_took: Cell<Duration>,
}

impl Pacer {
    /// `None` for a zero window: then every pass runs as soon as there is something to do.
    pub fn new(window: Duration) -> Option<Pacer> {
        (!window.is_zero()).then_some(Pacer {
            window,
            last_start: Cell::new(None),
            last_took: Cell::new(Duration::ZERO),
        })
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// The earliest the next pass may start: a window after the last one started, or as
    /// long after it ended as it took, whichever is later (`None`: no pass yet, so now).
    pub fn earliest(&self) -> Option<Instant> {
        let start = self.last_start.get()?;
        let took = self.last_took.get();
        Some((start + self.window).max(start + took + took))
    }

    /// Records a pass that started at `start` and did its last write at `end`.
    pub fn on_pass(&self, start: Instant, end: Instant) {
        self.last_start.set(Some(start));
        self.last_took.set(end.saturating_duration_since(start));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_micros(500);

    #[test]
    fn the_first_pass_runs_at_once_and_the_next_a_window_after_the_last_began() {
        let p = Pacer::new(WINDOW).unwrap();
        assert_eq!(p.earliest(), None);
        let t = Instant::now();
        p.on_pass(t, t + Duration::from_micros(40));
        assert_eq!(p.earliest(), Some(t + WINDOW));
        assert!(Pacer::new(Duration::ZERO).is_none());
    }

    #[test]
    fn a_long_pass_is_followed_by_a_gap_as_long_as_itself() {
        let p = Pacer::new(WINDOW).unwrap();
        let t = Instant::now();
        let took = Duration::from_millis(4);
        p.on_pass(t, t + took);
        assert_eq!(p.earliest(), Some(t + took * 2));
        // A cheap pass after it brings the window back.
        let t2 = t + took * 2;
        p.on_pass(t2, t2 + Duration::from_micros(10));
        assert_eq!(p.earliest(), Some(t2 + WINDOW));
    }
}
