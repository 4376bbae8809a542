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
//! - The gap is at least twice as long as passes spend writing ([`Pacer::on_pass`], a
//!   moving average): when writing is expensive (a thousand recipients, a slow machine) the
//!   passes space out so that writes take at most about half of the shard's time, and each
//!   write carries more. This bounds the CPU spent per delivery under load, at a latency
//!   of about two passes.
//! - A recipient with [`FLUSH_BYTES`] queued makes the next pass start at once: a write
//!   that large is efficient anyway, and a heavy stream should not wait for the window.
//! - A window of 0 turns pacing off: passes run back to back whenever there is something
//!   to write (lowest latency, one write per recipient per pass at any load).
//!
//! Busy senders are read once per pass (read turns, `fanout::reads`), each read taking all
//! that arrived since; while passes keep writing, occasional senders wait in the shard's
//! ready set and are read by the next pass too, so that a steady flow of lines from many
//! clients wakes the shard once per pass, not once per line.
//!
//! This file is the pass clock ([`Pacer`]); [`Schedule`] holds which recipients the next
//! pass writes.

mod schedule;

pub use schedule::{Entry, NextRun, Schedule, Scheduled};

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Queued bytes that make the next pass start at once.
pub const FLUSH_BYTES: usize = 16 << 10;

/// When the next pass may start, from how the last ones went.
#[derive(Debug)]
pub struct Pacer {
    window: Duration,
    /// When the last pass started (`None`: there was none).
    last_start: Cell<Option<Instant>>,
    /// How long the writes of recent passes took: a moving average that gives the last
    /// pass a quarter of the weight, so that one pass stretched by something else (the
    /// thread preempted, a page fault) does not hold back the next by as much. Only the
    /// writes count: they are what passes amortise; reading and framing cost the same
    /// however the lines are grouped.
    writing: Cell<Duration>,
}

impl Pacer {
    /// `None` for a zero window: then every pass runs as soon as there is something to do.
    pub fn new(window: Duration) -> Option<Pacer> {
        (!window.is_zero()).then_some(Pacer {
            window,
            last_start: Cell::new(None),
            writing: Cell::new(Duration::ZERO),
        })
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// The earliest the next pass may start: a window after the last one started, or
    /// twice as long as passes spend writing, whichever is later (`None`: no pass yet, so
    /// now).
    pub fn earliest(&self) -> Option<Instant> {
        let start = self.last_start.get()?;
        Some(start + self.window.max(self.writing.get() * 2))
    }

    /// Records a pass that started at `start` and spent `writing` on its writes.
    pub fn on_pass(&self, start: Instant, writing: Duration) {
        self.last_start.set(Some(start));
        self.writing.set((self.writing.get() * 3 + writing) / 4);
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
        p.on_pass(t, Duration::from_micros(40));
        assert_eq!(p.earliest(), Some(t + WINDOW));
        assert!(Pacer::new(Duration::ZERO).is_none());
    }

    #[test]
    fn passes_that_write_long_are_followed_by_gaps_twice_their_writing_time() {
        let p = Pacer::new(WINDOW).unwrap();
        let mut t = Instant::now();
        let took = Duration::from_millis(4);
        for _ in 0..30 {
            p.on_pass(t, took);
            t += took * 2;
        }
        let gap = p.earliest().unwrap() - (t - took * 2);
        assert!(gap > took * 2 * 99 / 100 && gap <= took * 2, "{gap:?}");
        // Cheap passes after them bring the window back, a few passes later.
        for _ in 0..30 {
            p.on_pass(t, Duration::from_micros(10));
            t += WINDOW;
        }
        assert_eq!(p.earliest(), Some(t - WINDOW + WINDOW));
    }

    #[test]
    fn one_long_pass_stretches_the_next_gap_by_half_its_writing_time() {
        let p = Pacer::new(WINDOW).unwrap();
        let t = Instant::now();
        p.on_pass(t, Duration::from_millis(8));
        assert_eq!(p.earliest(), Some(t + Duration::from_millis(4)));
    }
}
