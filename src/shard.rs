//! One shard's context: what every task on the shard (its accept loop, connection tasks,
//! flush task, receivers and timers) shares through an `Rc`. It is a handful of handles,
//! each owning its own state: the shard's [`Fanout`], its [`Drain`] and its refusal slots,
//! plus the process-wide [`Shared`] and this shard's counters. `executor` builds it;
//! `listener` and `connection` use it.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::fanout::Fanout;
use crate::metrics::ShardStats;
use crate::notify::NotifyAll;
use crate::shared::Shared;
use crate::shutdown::Drain;

/// N6 and N7 refusals a shard sends at once; past this a refused connection is just closed.
const MAX_REFUSALS_IN_PROGRESS: usize = 32;
/// The handshake queue's shares; glommio's default queue, where everything else runs,
/// has 1000.
const HANDSHAKE_SHARES: usize = 100;

/// The per-shard context.
pub struct Shard {
    pub id: usize,
    pub shared: Arc<Shared>,
    /// This shard's entry in [`Shared::stats`].
    pub stats: Arc<ShardStats>,
    pub fanout: Rc<Fanout>,
    pub drain: Rc<Drain>,
    /// N6 and N7 refusals in progress.
    pub refusals: Slots,
    /// TLS handshakes in progress, at most `tls.max_handshakes` (a connection past it is
    /// closed at once, `tls_busy`).
    pub handshakes: Slots,
    /// The task queue handshakes run in (with TLS configured): a tenth of the default
    /// queue's shares, so that while relaying keeps the shard busy a handshake flood gets
    /// about a tenth of its CPU; an idle shard gives handshakes all of it.
    pub handshake_queue: Option<glommio::TaskQueueHandle>,
    /// The memory this shard's partial lines hold, against `max_total_partial_bytes`.
    pub partial: PartialLines,
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
            handshakes: Slots::new(shared.config.tls.as_ref().map_or(0, |t| t.max_handshakes)),
            handshake_queue: shared.config.tls.as_ref().map(|_| {
                glommio::executor().create_task_queue(
                    glommio::Shares::Static(HANDSHAKE_SHARES),
                    glommio::Latency::NotImportant,
                    "tls-handshakes",
                )
            }),
            shared,
            refusals: Slots::new(MAX_REFUSALS_IN_PROGRESS),
            partial: PartialLines::default(),
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

/// How often a shard looks whether partial lines dropped under `max_total_partial_bytes`
/// while readers wait for it (one timer per shard, not one per waiting connection).
const PARTIAL_ROOM_POLL: Duration = Duration::from_millis(50);

/// The memory held by this shard's partial lines (docs/protocol.md#memory-bounds): each
/// reader reports its framer's allocation as it changes, the total is published in
/// [`Shared`] for the process-wide bound, and readers that must wait for room park here.
#[derive(Default)]
pub struct PartialLines {
    held: Cell<u64>,
    /// Releases the readers waiting for room; one of them polls the bound meanwhile.
    room: NotifyAll,
    polling: Cell<bool>,
}

impl PartialLines {
    /// One reader's partial line went from holding `before` bytes to `after`.
    pub fn adjust(&self, shard: &Shard, before: usize, after: usize) {
        if before == after {
            return;
        }
        let held = (self.held.get() + after as u64).saturating_sub(before as u64);
        self.held.set(held);
        shard.shared.publish_partial_bytes(shard.id, held);
        if after < before && self.room.has_waiters() && !shard.shared.over_partial_bound() {
            self.room.notify_all();
        }
    }

    /// Waits until partial lines hold less than `max_total_partial_bytes` process-wide, or
    /// the shard drains. One waiter per shard polls every [`PARTIAL_ROOM_POLL`] (memory
    /// freed on other shards), the others park until it or a local release wakes them.
    pub async fn wait_for_room(&self, shard: &Shard) {
        let waiting = || shard.shared.over_partial_bound() && !shard.is_shutting_down();
        while waiting() {
            if self.polling.replace(true) {
                self.room.wait().await;
                continue;
            }
            // This reader polls until there is room; dropping the poller (room, or its
            // connection ended) wakes the others once, and one takes over if needed.
            let _poller = Poller(self);
            while waiting() {
                glommio::timer::sleep(PARTIAL_ROOM_POLL).await;
            }
        }
    }
}

/// The reader polling for partial-line room; when it stops (room, or its connection
/// ended), the others wake and one of them takes over if there is still none.
struct Poller<'a>(&'a PartialLines);

impl Drop for Poller<'_> {
    fn drop(&mut self) {
        self.0.polling.set(false);
        self.0.room.notify_all();
    }
}

/// A bounded number of things in progress on the shard: N6 and N7 refusals (each holds a
/// descriptor for up to the farewell timeout) or TLS handshakes.
pub struct Slots {
    taken: Rc<Cell<usize>>,
    limit: usize,
}

impl Slots {
    pub fn new(limit: usize) -> Self {
        Slots {
            taken: Rc::default(),
            limit,
        }
    }

    /// Takes a slot; `None` when `limit` are in progress (a refused client is then closed
    /// without the notice, a TLS client without a handshake). The slot is given back when
    /// the guard is dropped.
    pub fn try_take(&self) -> Option<Slot> {
        if self.taken.get() >= self.limit {
            return None;
        }
        self.taken.set(self.taken.get() + 1);
        Some(Slot {
            taken: self.taken.clone(),
        })
    }
}

/// One thing in progress (see [`Slots::try_take`]).
pub struct Slot {
    taken: Rc<Cell<usize>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.taken.set(self.taken.get().saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_slots_stop_at_the_limit_and_come_back_when_dropped() {
        let slots = Slots::new(MAX_REFUSALS_IN_PROGRESS);
        let taken: Vec<Slot> = (0..MAX_REFUSALS_IN_PROGRESS).filter_map(|_| slots.try_take()).collect();
        assert_eq!(taken.len(), MAX_REFUSALS_IN_PROGRESS);
        assert!(slots.try_take().is_none());
        drop(taken);
        assert!(slots.try_take().is_some());
    }
}
