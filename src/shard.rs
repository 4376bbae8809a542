//! One shard's context: what every task on the shard (its accept loop, connection tasks,
//! flush task, receivers and timers) shares through an `Rc`. It is a handful of handles,
//! each owning its own state: the shard's [`Fanout`], its [`Drain`] and its refusal slots,
//! plus the process-wide [`Shared`] and this shard's counters. `executor` builds it;
//! `listener` and `connection` use it.
//!
//! Also, for now, two machine facts ([`IO_MEMORY_BYTES`], [`usable_cpus`]) that `config`,
//! `startup` and `executor` read; they belong in a leaf module of their own.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use crate::config::Config;
use crate::fanout::Fanout;
use crate::metrics::ShardStats;
use crate::shared::Shared;
use crate::shutdown::Drain;

/// glommio's DMA buffer arena per executor. TCP never uses it, and glommio registers it
/// with three rings against RLIMIT_MEMLOCK, so it is kept at glommio's minimum.
pub const IO_MEMORY_BYTES: usize = 64 << 10;
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

    pub fn config(&self) -> &Config {
        &self.shared.config
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

/// CPUs this process may run on: its affinity mask, restricted to online CPUs.
pub fn usable_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills the one we own.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } == 0;
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .map(|s| parse_cpu_list(s.trim()));
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| !ok || unsafe { libc::CPU_ISSET(cpu, &set) })
        .filter(|cpu| online.as_ref().is_none_or(|o| o.contains(cpu)))
        .take(if ok { usize::MAX } else { 1 })
        .collect()
}

/// Parses a kernel CPU list such as `0-3,6,8-9`.
fn parse_cpu_list(s: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let mut ends = part.splitn(2, '-').map(|x| x.trim().parse::<usize>());
        match (ends.next(), ends.next()) {
            (Some(Ok(a)), None) => cpus.push(a),
            (Some(Ok(a)), Some(Ok(b))) if a <= b => cpus.extend(a..=b),
            _ => {}
        }
    }
    cpus
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_like_the_kernel_prints_them() {
        assert_eq!(parse_cpu_list("0-1"), vec![0, 1]);
        assert_eq!(parse_cpu_list("0,2-3,7"), vec![0, 2, 3, 7]);
        assert_eq!(parse_cpu_list(""), Vec::<usize>::new());
    }

    #[test]
    fn refusal_slots_stop_at_the_limit_and_come_back_when_dropped() {
        let slots = RefusalSlots::default();
        let taken: Vec<RefusalSlot> = (0..MAX_REFUSALS_IN_PROGRESS).filter_map(|_| slots.try_take()).collect();
        assert_eq!(taken.len(), MAX_REFUSALS_IN_PROGRESS);
        assert!(slots.try_take().is_none());
        drop(taken);
        assert!(slots.try_take().is_some());
    }

    #[test]
    fn this_process_has_at_least_one_usable_cpu() {
        assert!(!usable_cpus().is_empty());
    }
}
