//! One shard's context: what every task on the shard (its accept loop, connection tasks,
//! flush task, receivers and timers) shares through an `Rc`. It is a handful of handles,
//! each owning its own state: the shard's [`Fanout`], its [`Drain`] and its refusal slots,
//! plus the process-wide [`Shared`] and this shard's counters. `executor` builds it;
//! `listener` and `connection` use it.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use crate::config::Config;
use crate::fanout::Fanout;
use crate::metrics::ShardStats;
use crate::shared::Shared;
use crate::shutdown::Drain;

/// N6 refusals a shard sends at once; past this a refused connection is just closed.
const MAX_REFUSALS_IN_PROGRESS: usize = 32;

/// The per-shard context.
pub struct Shard {
    pub id: usize,
    pub shared: Arc<Shared>,
    /// This shard's entry in [`Shared::stats`].
    pub stats: Arc<ShardStats>,
    pub fanout: Rc<Fanout>,
    pub drain: Rc<Drain>,
    /// N6 refusals in progress.
    pub refusals: RefusalSlots,
}

impl Shard {
    pub fn new(id: usize, shared: Arc<Shared>) -> Self {
        let stats = shared.stats[id].clone();
        let drain = Drain::new();
        Shard {
            id,
            fanout: Rc::new(Fanout::new(id, shared.clone(), stats.clone(), drain.clone())),
            drain,
            stats,
            shared,
            refusals: RefusalSlots::default(),
        }
    }

    /// The running config as this shard last copied it: the start-up values of the keys
    /// that need a restart, the last reload's for the others (taken up at the shard's
    /// heartbeat). Read per connection or per accept; the per-line limits are in the
    /// fan-out's tunables.
    pub fn config(&self) -> Arc<Config> {
        self.fanout.config()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.drain.is_started()
    }
}

/// The shard's N6 refusals in progress (each holds a descriptor for up to the farewell
/// timeout), at most `MAX_REFUSALS_IN_PROGRESS`.
#[derive(Default)]
pub struct RefusalSlots {
    taken: Rc<Cell<usize>>,
}

impl RefusalSlots {
    /// Takes a slot for sending N6 to a refused client; `None` when too many are in
    /// progress, and the connection is then closed without the notice. The slot is given
    /// back when the guard is dropped.
    pub fn try_take(&self) -> Option<RefusalSlot> {
        if self.taken.get() >= MAX_REFUSALS_IN_PROGRESS {
            return None;
        }
        self.taken.set(self.taken.get() + 1);
        Some(RefusalSlot {
            taken: self.taken.clone(),
        })
    }
}

/// One refusal in progress (see [`RefusalSlots::try_take`]).
pub struct RefusalSlot {
    taken: Rc<Cell<usize>>,
}

impl Drop for RefusalSlot {
    fn drop(&mut self) {
        self.taken.set(self.taken.get().saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_slots_stop_at_the_limit_and_come_back_when_dropped() {
        let slots = RefusalSlots::default();
        let taken: Vec<RefusalSlot> = (0..MAX_REFUSALS_IN_PROGRESS).filter_map(|_| slots.try_take()).collect();
        assert_eq!(taken.len(), MAX_REFUSALS_IN_PROGRESS);
        assert!(slots.try_take().is_none());
        drop(taken);
        assert!(slots.try_take().is_some());
    }
}
