//! When a recipient's queued envelopes go to its socket.
//!
//! A socket write costs several microseconds in the kernel whatever it carries, so under
//! load each recipient gets at most one write per *period* (`flush_window_us`), and its
//! queued envelopes ride together. Periods are staggered: every client has one of
//! [`SLOTS`] slots, and its periods start at the ticks of its slot (a tick is a window
//! divided by [`SLOTS`]). A shard therefore writes to one slot's clients per tick instead
//! of to all of them at once, which spreads the writes over the window, and a queued
//! envelope waits at most one window for its recipient's next period, with no queue of
//! other recipients' writes in front of it.
//!
//! A recipient not yet written in its current period is written at once, so a line after a
//! quiet spell is not delayed. One that has [`FLUSH_BYTES`] queued is written at the next
//! tick whatever its period, which bounds latency when traffic is heavy.

use std::time::{Duration, Instant};

/// Staggered slots per window.
pub const SLOTS: u64 = 8;

/// Queued bytes that make a recipient due at the next tick even within its period.
pub const FLUSH_BYTES: usize = 16 << 10;

/// The tick clock of one shard.
#[derive(Debug, Clone, Copy)]
pub struct Pacer {
    epoch: Instant,
    tick: Duration,
}

impl Pacer {
    /// `None` for a zero window: then every recipient is written as soon as it has data.
    pub fn new(window: Duration, epoch: Instant) -> Option<Pacer> {
        let tick = window / SLOTS as u32;
        (!tick.is_zero()).then_some(Pacer { epoch, tick })
    }

    /// The tick `now` falls in. Counting starts at [`SLOTS`] so that every period index
    /// is at least 1 and 0 can mean "never written".
    pub fn tick_at(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.epoch).as_nanos();
        (elapsed / self.tick.as_nanos()) as u64 + SLOTS
    }

    /// When tick `tick` begins.
    pub fn start_of(&self, tick: u64) -> Instant {
        let n = tick.saturating_sub(SLOTS);
        self.epoch + Duration::from_nanos((self.tick.as_nanos() as u64).saturating_mul(n))
    }

    /// The period of a client in `slot` during `tick`; it grows by one at each tick of
    /// that slot.
    pub fn period(slot: u64, tick: u64) -> u64 {
        (tick + SLOTS - slot) / SLOTS
    }

    /// The slots whose period starts at a tick in `(last, now]`, each once.
    pub fn slots_starting(last: u64, now: u64) -> impl Iterator<Item = u64> {
        let from = last.saturating_add(1);
        let ticks = now.saturating_sub(last).min(SLOTS);
        (from..from + ticks).map(|t| t % SLOTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_period_starts_at_each_tick_of_the_slot_and_lasts_a_window() {
        for slot in 0..SLOTS {
            let mut starts = Vec::new();
            for tick in SLOTS..SLOTS * 4 {
                if Pacer::period(slot, tick) != Pacer::period(slot, tick - 1) {
                    starts.push(tick);
                }
            }
            assert!(starts.iter().all(|t| t % SLOTS == slot), "slot {slot}: {starts:?}");
            assert_eq!(starts.len(), 3);
            assert!(Pacer::period(slot, SLOTS) >= 1);
        }
    }

    #[test]
    fn slots_starting_covers_each_elapsed_tick_once() {
        assert_eq!(Pacer::slots_starting(9, 9).count(), 0);
        assert_eq!(Pacer::slots_starting(9, 10).collect::<Vec<_>>(), vec![2]);
        assert_eq!(Pacer::slots_starting(14, 17).collect::<Vec<_>>(), vec![7, 0, 1]);
        let mut all: Vec<u64> = Pacer::slots_starting(3, 1000).collect();
        all.sort();
        assert_eq!(all, (0..SLOTS).collect::<Vec<_>>());
    }

    #[test]
    fn ticks_follow_the_clock() {
        let epoch = Instant::now();
        let p = Pacer::new(Duration::from_micros(800), epoch).unwrap();
        assert_eq!(p.tick_at(epoch), SLOTS);
        assert_eq!(p.tick_at(epoch + Duration::from_micros(99)), SLOTS);
        assert_eq!(p.tick_at(epoch + Duration::from_micros(100)), SLOTS + 1);
        assert_eq!(p.start_of(SLOTS + 3), epoch + Duration::from_micros(300));
        assert!(Pacer::new(Duration::ZERO, epoch).is_none());
        assert!(Pacer::new(Duration::from_nanos(7), epoch).is_none());
    }
}
