//! A shard's write schedule: which recipients the next write pass writes, and when that
//! pass is. It owns the schedule's whole state: the pass clock ([`Pacer`]), the recipients
//! with something queued since their last write, whether one of them has
//! [`FLUSH_BYTES`] queued, and each recipient's [`Entry`] (whether it is listed). The
//! rules are those of `pacing`'s module docs.
//!
//! Generic over what it lists (`fanout` lists `Rc<Client>`), so that the unit tests below
//! drive it with plain items; the time is always passed in.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::{Pacer, FLUSH_BYTES};

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

/// One recipient's place in the schedule. Only this file reads or changes it; the client
/// merely carries it.
#[derive(Debug, Default)]
pub struct Entry {
    /// On the list of the next pass.
    listed: Cell<bool>,
}

impl Entry {
    pub fn new() -> Entry {
        Entry::default()
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
    /// The pass clock; `None` when the flush window is 0 (every pass runs at once).
    pacer: Option<Pacer>,
    /// Recipients to write at the next pass.
    due: RefCell<Vec<T>>,
    /// One of them has [`FLUSH_BYTES`] queued: the next pass starts at once.
    urgent: Cell<bool>,
    /// The last pass wrote to someone: traffic is flowing.
    last_wrote: Cell<bool>,
}

impl<T: Scheduled + Clone> Schedule<T> {
    /// A schedule whose passes are at least `window` apart (0: no pacing).
    pub fn new(window: Duration) -> Self {
        Schedule {
            pacer: Pacer::new(window),
            due: RefCell::default(),
            urgent: Cell::new(false),
            last_wrote: Cell::new(false),
        }
    }

    /// The flush window (zero without pacing): passes are at least this far apart.
    pub fn window(&self) -> Duration {
        self.pacer.as_ref().map_or(Duration::ZERO, Pacer::window)
    }

    /// Lists `item`, which has `queued_bytes` queued and a writer free to take them, for
    /// the next pass. True when that changed anything (the flush task should look again):
    /// it was newly listed, or it made the next pass urgent.
    pub fn offer(&self, item: &T, queued_bytes: usize) -> bool {
        let urgent = queued_bytes >= FLUSH_BYTES && !self.urgent.replace(true);
        let entry = item.entry();
        if entry.listed.replace(true) {
            return urgent;
        }
        self.due.borrow_mut().push(item.clone());
        true
    }

    /// When the flush task runs next, given whether lines wait to be flushed, whether
    /// readers wait for their turn and whether readers wait in the ready set: when lines,
    /// turns or a listed recipient wait, at the earliest time the pass clock allows (at
    /// once if a recipient is urgent or there is no flush window); the same while readers
    /// wait in the ready set and the last pass wrote (traffic is flowing: one pass then
    /// reads them all, instead of a wake-up of the shard per line); otherwise idle.
    pub fn next_run(&self, lines: bool, readers: bool, ready_set: bool) -> NextRun {
        let flowing = ready_set && self.last_wrote.get();
        if !lines && !readers && !flowing && self.due.borrow().is_empty() {
            return NextRun::Idle;
        }
        match self.pacer.as_ref().and_then(Pacer::earliest) {
            Some(at) if !self.urgent.get() => NextRun::At(at),
            _ => NextRun::Now,
        }
    }

    /// Takes every listed recipient off the schedule, for the pass that starts now. The
    /// caller writes those it can, records the pass with [`Schedule::on_pass`], and gives
    /// the list back with [`Schedule::recycle`].
    pub fn take_due(&self) -> Vec<T> {
        self.urgent.set(false);
        let items = std::mem::take(&mut *self.due.borrow_mut());
        for item in &items {
            item.entry().listed.set(false);
        }
        items
    }

    /// Records a pass that started at `start` and spent `writing` on its writes; `wrote`:
    /// it wrote to at least one recipient.
    pub fn on_pass(&self, start: Instant, writing: Duration, wrote: bool) {
        self.last_wrote.set(wrote);
        if let Some(pacer) = &self.pacer {
            pacer.on_pass(start, writing);
        }
    }

    /// Keeps the allocation of a list from [`Schedule::take_due`] for the next pass.
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

    const WINDOW: Duration = Duration::from_micros(500);

    fn item(name: &'static str) -> Rc<Item> {
        Rc::new(Item {
            name,
            entry: Entry::new(),
        })
    }

    /// Takes what is due, as a pass that started at `start` and took `took` does.
    fn pass(s: &Schedule<Rc<Item>>, start: Instant, took: Duration) -> Vec<&'static str> {
        let items = s.take_due();
        let out = items.iter().map(|i| i.name).collect();
        s.on_pass(start, took, !items.is_empty());
        s.recycle(items);
        out
    }

    #[test]
    fn a_quiet_shard_writes_at_once_and_a_busy_one_a_window_after_its_last_pass() {
        let s = Schedule::new(WINDOW);
        let (a, b) = (item("a"), item("b"));
        assert_eq!(s.next_run(false, false, false), NextRun::Idle);
        assert!(s.offer(&a, 10));
        assert_eq!(s.next_run(false, false, false), NextRun::Now, "no pass yet: at once");
        let t = Instant::now();
        assert_eq!(pass(&s, t, Duration::from_micros(20)), ["a"]);
        assert_eq!(s.next_run(false, false, false), NextRun::Idle);
        assert!(s.offer(&b, 10));
        assert!(s.offer(&a, 10));
        assert!(!s.offer(&a, 20), "listed once");
        assert_eq!(s.next_run(false, false, false), NextRun::At(t + WINDOW));
        assert_eq!(pass(&s, t + WINDOW, Duration::from_micros(20)), ["b", "a"]);
        // Lines waiting to be flushed, or readers waiting for a turn, also call for a pass.
        assert_eq!(s.next_run(true, false, false), NextRun::At(t + WINDOW * 2));
        assert_eq!(s.next_run(false, true, false), NextRun::At(t + WINDOW * 2));
    }

    #[test]
    fn readers_in_the_ready_set_keep_passes_coming_only_while_the_passes_write() {
        let s = Schedule::new(WINDOW);
        let a = item("a");
        let t = Instant::now();
        assert_eq!(s.next_run(false, false, true), NextRun::Idle, "no pass yet");
        assert!(s.offer(&a, 1));
        assert_eq!(pass(&s, t, Duration::ZERO), ["a"]);
        assert_eq!(s.next_run(false, false, true), NextRun::At(t + WINDOW));
        assert_eq!(s.next_run(false, false, false), NextRun::Idle, "nobody in the set");
        // A pass that wrote nothing: the traffic stopped, readers go back to readiness.
        assert!(pass(&s, t + WINDOW, Duration::ZERO).is_empty());
        assert_eq!(s.next_run(false, false, true), NextRun::Idle);
    }

    #[test]
    fn a_full_outbox_makes_the_next_pass_start_at_once() {
        let s = Schedule::new(WINDOW);
        let a = item("a");
        let t = Instant::now();
        s.on_pass(t, Duration::ZERO, false);
        assert!(s.offer(&a, 1));
        assert_eq!(s.next_run(false, false, false), NextRun::At(t + WINDOW));
        assert!(s.offer(&a, FLUSH_BYTES), "already listed, but now urgent");
        assert!(!s.offer(&a, FLUSH_BYTES + 1));
        assert_eq!(s.next_run(false, false, false), NextRun::Now);
        assert_eq!(pass(&s, t, Duration::ZERO), ["a"]);
        assert!(s.offer(&a, 1));
        assert_eq!(
            s.next_run(false, false, false),
            NextRun::At(t + WINDOW),
            "urgency ends with the pass"
        );
    }

    #[test]
    fn an_expensive_pass_spaces_out_the_next() {
        let s = Schedule::new(WINDOW);
        let a = item("a");
        let t = Instant::now();
        // A first pass of 12 ms counts a quarter in the average: the next is 6 ms later.
        let took = Duration::from_millis(12);
        s.on_pass(t, took, false);
        assert!(s.offer(&a, 1));
        assert_eq!(s.next_run(false, false, false), NextRun::At(t + took / 2));
    }

    #[test]
    fn without_a_window_everything_runs_at_once() {
        let s: Schedule<Rc<Item>> = Schedule::new(Duration::ZERO);
        let a = item("a");
        assert_eq!(s.next_run(false, false, false), NextRun::Idle);
        assert!(s.offer(&a, 1));
        assert_eq!(s.next_run(false, false, false), NextRun::Now);
        let t = Instant::now();
        assert_eq!(pass(&s, t, Duration::from_millis(5)), ["a"]);
        assert!(s.offer(&a, 1), "listed again at once");
        assert_eq!(s.next_run(false, false, false), NextRun::Now);
        assert_eq!(s.window(), Duration::ZERO);
    }
}
