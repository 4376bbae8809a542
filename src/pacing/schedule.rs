//! A shard's write schedule: which recipients the flush task writes at its next run, and
//! when that run is. It owns the schedule's whole state: the current tick, the clients due
//! at the next tick, the clients waiting for their slot's next period, how many clients
//! each slot has, and each client's [`Entry`] (its slot, the last period it was written in
//! and which list it is on). The rules are those of `pacing`'s module docs.
//!
//! Generic over what it lists (`fanout` lists `Rc<Client>`), so that the unit tests below
//! drive it with plain items and a fake clock: the time is always passed in.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::{pick_slot, Pacer, FLUSH_BYTES, SLOTS};

/// What the flush task does next (see [`Schedule::next_run`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextRun {
    /// Nothing to do until something new arrives.
    Idle,
    /// Run as soon as possible.
    Now,
    /// Run at this time (or as soon as possible if it has passed).
    At(Instant),
}

/// Where a client stands in the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listed {
    /// Not in any list.
    Idle,
    /// In its slot's list, waiting for its next period.
    Waiting,
    /// In the list written at the next tick.
    Due,
}

/// One client's place in the schedule. Only this file reads or changes it; the client
/// merely carries it.
#[derive(Debug)]
pub struct Entry {
    slot: u64,
    /// The last period in which the flush task wrote to this client (0: never).
    written_period: Cell<u64>,
    listed: Cell<Listed>,
}

impl Entry {
    /// An entry in `slot` that no [`Schedule`] counts: for benches and tests. A shard's
    /// clients get theirs from [`Schedule::join`].
    pub fn new(slot: u64) -> Entry {
        Entry {
            slot: slot % SLOTS,
            written_period: Cell::new(0),
            listed: Cell::new(Listed::Idle),
        }
    }

    pub fn slot(&self) -> u64 {
        self.slot
    }
}

/// Something the schedule can list: it carries an [`Entry`].
pub trait Scheduled {
    fn entry(&self) -> &Entry;
}

impl<T: Scheduled> Scheduled for Rc<T> {
    fn entry(&self) -> &Entry {
        (**self).entry()
    }
}

/// The write schedule of one shard.
pub struct Schedule<T> {
    /// The tick clock; `None` when the flush window is 0 (every write is due at once).
    pacer: Option<Pacer>,
    /// The latest tick the shard has seen.
    tick: Cell<u64>,
    /// Clients to write at the next tick.
    due: RefCell<Vec<T>>,
    /// Clients waiting for their next period, by slot.
    waiting: RefCell<Vec<Vec<T>>>,
    /// Clients per slot.
    slot_load: RefCell<Vec<usize>>,
}

impl<T: Scheduled + Clone> Schedule<T> {
    /// A schedule with periods of `window` (0: no pacing), counting ticks from `epoch`.
    pub fn new(window: Duration, epoch: Instant) -> Self {
        Schedule {
            pacer: Pacer::new(window, epoch),
            tick: Cell::new(SLOTS),
            due: RefCell::default(),
            waiting: RefCell::new((0..SLOTS).map(|_| Vec::new()).collect()),
            slot_load: RefCell::new(vec![0; SLOTS as usize]),
        }
    }

    /// A place for a new client, in the slot [`pick_slot`] chooses.
    pub fn join(&self) -> Entry {
        let mut load = self.slot_load.borrow_mut();
        let slot = pick_slot(&load);
        load[slot] += 1;
        Entry::new(slot as u64)
    }

    /// Gives back a client's place (it has closed). A list may still hold the client; it
    /// is dropped from there at its next tick.
    pub fn leave(&self, entry: &Entry) {
        let mut load = self.slot_load.borrow_mut();
        load[entry.slot as usize] = load[entry.slot as usize].saturating_sub(1);
    }

    pub fn pacer(&self) -> Option<&Pacer> {
        self.pacer.as_ref()
    }

    /// The latest tick seen (see [`Schedule::refresh`]).
    pub fn tick(&self) -> u64 {
        self.tick.get()
    }

    /// Reads the clock into the current tick; returns it.
    pub fn refresh(&self, now: Instant) -> u64 {
        if let Some(pacer) = &self.pacer {
            self.tick.set(pacer.tick_at(now));
        }
        self.tick.get()
    }

    /// Time between read rounds (zero without a flush window).
    pub fn read_round_interval(&self) -> Duration {
        self.pacer.map_or(Duration::ZERO, |p| p.read_round_interval())
    }

    /// Whether a read round falls after the run at tick `last` (`None`: there was none)
    /// and up to tick `now`. Without a flush window every run is one.
    pub fn read_round_since(&self, last: Option<u64>, now: u64) -> bool {
        match (self.pacer, last) {
            (Some(_), Some(last)) => Pacer::read_round_between(last, now),
            _ => true,
        }
    }

    /// Lists `item`, which has `queued_bytes` queued and a writer free to take them, for
    /// the write its entry calls for: due at the next tick if there is no flush window,
    /// if it has [`FLUSH_BYTES`] queued or if it was not yet written in its current
    /// period; else waiting for its next period. True when it was newly listed (the flush
    /// task should look again).
    pub fn offer(&self, item: &T, queued_bytes: usize) -> bool {
        let entry = item.entry();
        let listed = entry.listed.get();
        let due = self.pacer.is_none()
            || queued_bytes >= FLUSH_BYTES
            || (listed == Listed::Idle && Pacer::period(entry.slot, self.tick.get()) > entry.written_period.get());
        match (due, listed) {
            (_, Listed::Due) | (false, Listed::Waiting) => false,
            (true, _) => {
                entry.listed.set(Listed::Due);
                self.due.borrow_mut().push(item.clone());
                true
            }
            (false, Listed::Idle) => {
                entry.listed.set(Listed::Waiting);
                self.waiting.borrow_mut()[entry.slot as usize].push(item.clone());
                true
            }
        }
    }

    /// When the flush task runs next, given the tick of its last run (`None`: it has not
    /// run yet), whether lines wait to be flushed and whether readers wait for a read
    /// round: at the next tick when lines or due clients wait, else at the first tick that
    /// starts a waiting client's period or (for waiting readers) a read round.
    pub fn next_run(&self, last: Option<u64>, lines: bool, readers: bool) -> NextRun {
        let work_now = lines || !self.due.borrow().is_empty();
        let Some(pacer) = &self.pacer else {
            return if work_now || readers {
                NextRun::Now
            } else {
                NextRun::Idle
            };
        };
        let from = last.map_or(self.tick.get(), |l| l + 1);
        let tick = if work_now {
            Some(from)
        } else {
            let waiting = self.waiting.borrow();
            let slots = (0..SLOTS).filter(|&s| !waiting[s as usize].is_empty());
            let read_round = readers.then(|| Pacer::next_read_round(from));
            slots.map(|s| Pacer::next_tick_of(s, from)).chain(read_round).min()
        };
        match tick {
            None => NextRun::Idle,
            Some(t) => NextRun::At(pacer.start_of(t)),
        }
    }

    /// Takes every due client and every waiting client whose period started after tick
    /// `last` and up to the current tick, each once, and takes them off the schedule. The
    /// caller writes those it can and marks each with [`Schedule::on_written`], then gives
    /// the list back with [`Schedule::recycle`].
    pub fn take_due(&self, last: u64) -> Vec<T> {
        let mut items = std::mem::take(&mut *self.due.borrow_mut());
        {
            let mut waiting = self.waiting.borrow_mut();
            for slot in Pacer::slots_starting(last, self.tick.get()) {
                items.append(&mut waiting[slot as usize]);
            }
        }
        // A client can be listed twice (waiting, then due on size): keep its first place.
        items.retain(|item| item.entry().listed.replace(Listed::Idle) != Listed::Idle);
        items
    }

    /// Records that the flush task wrote to this entry's client in the current period.
    pub fn on_written(&self, entry: &Entry) {
        entry.written_period.set(Pacer::period(entry.slot, self.tick.get()));
    }

    /// Keeps the allocation of a list from [`Schedule::take_due`] for the next tick.
    pub fn recycle(&self, mut items: Vec<T>) {
        items.clear();
        let mut due = self.due.borrow_mut();
        if due.is_empty() {
            *due = items;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recipient as the schedule sees it.
    struct Item {
        name: &'static str,
        entry: Entry,
    }

    impl Scheduled for Item {
        fn entry(&self) -> &Entry {
            &self.entry
        }
    }

    const WINDOW: Duration = Duration::from_micros(800);
    const TICK: Duration = Duration::from_micros(100);

    fn schedule() -> (Schedule<Rc<Item>>, Instant) {
        let epoch = Instant::now();
        (Schedule::new(WINDOW, epoch), epoch)
    }

    fn item(s: &Schedule<Rc<Item>>, name: &'static str) -> Rc<Item> {
        Rc::new(Item { name, entry: s.join() })
    }

    fn names(items: &[Rc<Item>]) -> Vec<&'static str> {
        items.iter().map(|i| i.name).collect()
    }

    /// Takes what is due after `last` and marks it written, as the flush task does.
    fn write(s: &Schedule<Rc<Item>>, last: u64) -> Vec<&'static str> {
        let items = s.take_due(last);
        for i in &items {
            s.on_written(&i.entry);
        }
        let out = names(&items);
        s.recycle(items);
        out
    }

    #[test]
    fn a_client_not_yet_written_in_its_period_is_due_at_once_and_then_waits_for_the_next() {
        let (s, epoch) = schedule();
        let a = item(&s, "a");
        assert_eq!(a.entry.slot(), 0);
        let t = s.refresh(epoch + TICK * 3);
        assert!(s.offer(&a, 10));
        assert_eq!(s.next_run(Some(t - 1), false, false), NextRun::At(epoch + TICK * 3));
        assert_eq!(write(&s, t - 1), ["a"]);
        // Written in this period: more bytes wait for the slot's next tick, 8 ticks on.
        assert!(s.offer(&a, 10));
        assert!(!s.offer(&a, 10), "listed once");
        assert_eq!(s.next_run(Some(t), false, false), NextRun::At(epoch + TICK * 8));
        assert!(write(&s, t).is_empty(), "not before its period starts");
        let t2 = s.refresh(epoch + TICK * 8);
        assert_eq!(write(&s, t), ["a"]);
        assert_eq!(s.next_run(Some(t2), false, false), NextRun::Idle);
    }

    #[test]
    fn a_full_outbox_is_due_at_the_next_tick_whatever_its_period() {
        let (s, epoch) = schedule();
        let a = item(&s, "a");
        let t = s.refresh(epoch + TICK);
        assert!(s.offer(&a, 1));
        assert_eq!(write(&s, t - 1), ["a"]);
        assert!(s.offer(&a, 1), "waits for its period");
        assert!(s.offer(&a, FLUSH_BYTES), "and is due on size too");
        assert_eq!(s.next_run(Some(t), false, false), NextRun::At(epoch + TICK * 2));
        s.refresh(epoch + TICK * 2);
        assert_eq!(write(&s, t), ["a"], "written once though listed twice");
        // Its old place in the waiting list is gone with it.
        s.refresh(epoch + TICK * 8);
        assert!(write(&s, t + 1).is_empty());
    }

    #[test]
    fn waiting_clients_are_written_at_their_own_slots_ticks() {
        let (s, epoch) = schedule();
        // Slot groups fill first: make a slot-4 client by filling slot 0.
        let first = item(&s, "first");
        for _ in 1..crate::pacing::SLOT_GROUP {
            s.join();
        }
        let b = item(&s, "b");
        assert_eq!((first.entry.slot(), b.entry.slot()), (0, 4));
        let t = s.refresh(epoch + TICK);
        for i in [&first, &b] {
            assert!(s.offer(i, 1));
        }
        assert_eq!(write(&s, t - 1), ["first", "b"]);
        for i in [&first, &b] {
            assert!(s.offer(i, 1));
        }
        // Slot 4's period starts at tick 12, slot 0's at tick 16 (ticks count from 8).
        assert_eq!(s.next_run(Some(t), false, false), NextRun::At(epoch + TICK * 4));
        s.refresh(epoch + TICK * 4);
        assert_eq!(write(&s, t), ["b"]);
        s.refresh(epoch + TICK * 8);
        assert_eq!(write(&s, t + 3), ["first"]);
    }

    #[test]
    fn lines_or_readers_set_the_next_run() {
        let (s, epoch) = schedule();
        let t = s.refresh(epoch + TICK * 5);
        assert_eq!(s.next_run(Some(t), false, false), NextRun::Idle);
        assert_eq!(s.next_run(Some(t), true, false), NextRun::At(epoch + TICK * 6));
        assert_eq!(s.next_run(None, true, false), NextRun::At(epoch + TICK * 5));
        // Read rounds fall on ticks divisible by 3: tick 15 is epoch + 7 ticks.
        assert_eq!(s.next_run(Some(t), false, true), NextRun::At(epoch + TICK * 7));
        assert!(s.read_round_since(Some(t), t + 2));
        assert!(!s.read_round_since(Some(t + 2), t + 4));
    }

    #[test]
    fn without_a_window_everything_is_due_now() {
        let s: Schedule<Rc<Item>> = Schedule::new(Duration::ZERO, Instant::now());
        let a = item(&s, "a");
        assert_eq!(s.next_run(None, false, false), NextRun::Idle);
        assert!(s.offer(&a, 1));
        assert_eq!(s.next_run(None, false, false), NextRun::Now);
        assert_eq!(write(&s, 0), ["a"]);
        assert!(s.offer(&a, 1), "due again at once");
        assert_eq!(s.next_run(Some(0), false, true), NextRun::Now);
        assert!(s.read_round_since(Some(5), 5));
        assert_eq!(s.read_round_interval(), Duration::ZERO);
    }

    #[test]
    fn leaving_frees_the_slot_for_the_next_client() {
        let (s, _) = schedule();
        let a = s.join();
        s.leave(&a);
        assert_eq!(s.join().slot(), 0);
        assert_eq!(s.slot_load.borrow()[0], 1);
    }
}
