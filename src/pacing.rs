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
//!
//! New clients fill one slot up to [`SLOT_GROUP`] before the next slot is used, so a shard
//! with few clients wakes at few ticks. Senders that keep sending are read in *read rounds*,
//! every [`READ_ROUND_TICKS`] ticks, each read taking all that arrived since.
//!
//! This file is the pure clock arithmetic ([`Pacer`], [`pick_slot`]); [`Schedule`] holds a
//! shard's schedule state and applies these rules to its clients.

mod schedule;

pub use schedule::{Entry, NextRun, Schedule, Scheduled};

use std::time::{Duration, Instant};

/// Staggered slots per window.
pub const SLOTS: u64 = 8;

/// Queued bytes that make a recipient due at the next tick even within its period.
pub const FLUSH_BYTES: usize = 16 << 10;

/// Clients a slot takes before the next slot is used (while any slot has room): about a
/// tick's worth of writes at the default window, so a shard with a hundred busy clients
/// wakes at 4 ticks per window instead of 7. Each wake costs a shard some 25 µs of CPU
/// apart from its writes (bench `shard_wakeup_cpu`).
pub const SLOT_GROUP: usize = 32;

/// The order in which slots are opened: bit-reversed, so the first 2, 4 or 8 slots in use
/// are evenly spaced over the window.
const SLOT_ORDER: [usize; SLOTS as usize] = [0, 4, 2, 6, 1, 5, 3, 7];

/// Ticks between read rounds (3/8 of a window). A busy sender's lines wait up to this long
/// to be read; more often costs a `recv` per sender per round for little gain.
pub const READ_ROUND_TICKS: u64 = 3;

/// The slot for a new client, given how many clients each slot has: the first slot in
/// `SLOT_ORDER` with room in its group, else the emptiest.
pub fn pick_slot(load: &[usize]) -> usize {
    SLOT_ORDER
        .into_iter()
        .find(|&s| load.get(s).is_some_and(|&n| n < SLOT_GROUP))
        .unwrap_or_else(|| (0..load.len()).min_by_key(|&s| load[s]).unwrap_or(0))
}

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

    /// The length of a tick.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// Time between read rounds.
    pub fn read_round_interval(&self) -> Duration {
        self.tick * READ_ROUND_TICKS as u32
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

    /// The first tick at or after `from` that belongs to `slot`.
    pub fn next_tick_of(slot: u64, from: u64) -> u64 {
        from + (slot + SLOTS - from % SLOTS) % SLOTS
    }

    /// The first read-round tick at or after `from`.
    pub fn next_read_round(from: u64) -> u64 {
        from.div_ceil(READ_ROUND_TICKS) * READ_ROUND_TICKS
    }

    /// True when a read round falls in `(last, now]`.
    pub fn read_round_between(last: u64, now: u64) -> bool {
        now / READ_ROUND_TICKS > last / READ_ROUND_TICKS
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
    fn next_ticks_land_on_their_slot_and_read_rounds() {
        for from in SLOTS..SLOTS * 3 {
            for slot in 0..SLOTS {
                let t = Pacer::next_tick_of(slot, from);
                assert!(
                    t >= from && t < from + SLOTS && t % SLOTS == slot,
                    "{slot} from {from}: {t}"
                );
            }
            let r = Pacer::next_read_round(from);
            assert!(r >= from && r < from + READ_ROUND_TICKS && r % READ_ROUND_TICKS == 0);
            assert_eq!(Pacer::read_round_between(from - 1, from), from % READ_ROUND_TICKS == 0);
        }
        let r = READ_ROUND_TICKS * 5;
        assert!(Pacer::read_round_between(r - 1, r));
        assert!(!Pacer::read_round_between(r, r + READ_ROUND_TICKS - 1));
        assert!(Pacer::read_round_between(r, r + 100));
    }

    #[test]
    fn slots_fill_in_groups_evenly_spaced_then_balance() {
        let mut load = vec![0usize; SLOTS as usize];
        let mut opened = Vec::new();
        for _ in 0..SLOT_GROUP * SLOTS as usize {
            let slot = pick_slot(&load);
            if load[slot] == 0 {
                assert!(
                    opened.iter().all(|&s| load[s] == SLOT_GROUP),
                    "{slot} opened early: {load:?}"
                );
                opened.push(slot);
            }
            load[slot] += 1;
            assert!(load[slot] <= SLOT_GROUP);
        }
        // Two slots in use are half a window apart, four a quarter.
        assert_eq!(opened[..2], [0, 4]);
        let mut four = opened[..4].to_vec();
        four.sort();
        assert_eq!(four, [0, 2, 4, 6]);
        assert_eq!(opened.len(), SLOTS as usize);
        load.iter_mut().for_each(|n| *n = SLOT_GROUP + 3);
        load[5] = SLOT_GROUP + 1;
        assert_eq!(pick_slot(&load), 5);
        load[2] = 4;
        assert_eq!(pick_slot(&load), 2);
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
