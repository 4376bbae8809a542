//! The quarantine table (SPEC §2.3), one for the whole process, shared by every shard.
//!
//! Reads happen on every accept and must not take a lock: readers load an immutable
//! snapshot through `ArcSwap` (one atomic load). Writes are rare (a slow consumer was
//! disconnected, or the periodic purge): they copy the table, change the copy and publish
//! it, serialised by a mutex that no reader touches. The table is bounded; when full, the
//! oldest entry goes first. Time is passed in, so tests use a fake clock.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config::QuarantineBy;

/// What an entry matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    Ip(IpAddr),
    Addr(SocketAddr),
}

#[derive(Debug, Clone, Default)]
struct Table {
    /// Key → (when it was entered, when it stops matching).
    entries: HashMap<Key, (Instant, Instant)>,
    /// Keys in the order they were entered; an item whose time no longer matches
    /// `entries` is stale (the key was entered again later) and skipped.
    order: VecDeque<(Instant, Key)>,
}

/// The shared table.
pub struct Quarantine {
    by: QuarantineBy,
    cooldown: Duration,
    max_entries: usize,
    snapshot: ArcSwap<Table>,
    /// Serialises writers; readers never take it.
    write: Mutex<()>,
}

impl Quarantine {
    pub fn new(by: QuarantineBy, cooldown: Duration, max_entries: usize) -> Self {
        Quarantine {
            by,
            cooldown,
            max_entries: max_entries.max(1),
            snapshot: ArcSwap::from_pointee(Table::default()),
            write: Mutex::new(()),
        }
    }

    /// The key a peer at `addr` is quarantined under.
    pub fn key(&self, addr: SocketAddr) -> Key {
        match self.by {
            QuarantineBy::Ip => Key::Ip(addr.ip()),
            QuarantineBy::Addr => Key::Addr(addr),
        }
    }

    /// Whether a new connection from `addr` must be refused. Lock-free.
    pub fn contains(&self, addr: SocketAddr, now: Instant) -> bool {
        let table = self.snapshot.load();
        !table.entries.is_empty()
            && table
                .entries
                .get(&self.key(addr))
                .is_some_and(|&(_, until)| now < until)
    }

    /// Enters `addr`'s key for the cooldown, evicting the oldest entries past the bound.
    pub fn insert(&self, addr: SocketAddr, now: Instant) {
        if self.cooldown.is_zero() {
            return;
        }
        let key = self.key(addr);
        self.update(|t| {
            t.entries.insert(key, (now, now + self.cooldown));
            t.order.push_back((now, key));
            while t.entries.len() > self.max_entries {
                let Some((entered, k)) = t.order.pop_front() else { break };
                if t.entries.get(&k).is_some_and(|&(e, _)| e == entered) {
                    t.entries.remove(&k);
                }
            }
        });
    }

    /// Drops expired entries; returns how many remain.
    pub fn purge(&self, now: Instant) -> usize {
        let current = self.snapshot.load();
        if current.entries.values().all(|&(_, until)| now < until) && current.order.len() == current.entries.len() {
            return current.entries.len();
        }
        self.update(|t| {
            t.entries.retain(|_, &mut (_, until)| now < until);
            let entries = &t.entries;
            t.order
                .retain(|(entered, k)| entries.get(k).is_some_and(|&(e, _)| e == *entered));
        })
    }

    pub fn len(&self) -> usize {
        self.snapshot.load().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn update(&self, change: impl FnOnce(&mut Table)) -> usize {
        // A poisoned lock only means another writer panicked mid-copy; the published
        // snapshot is still whole, so carry on.
        let _guard = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let mut table = Table::clone(&self.snapshot.load());
        change(&mut table);
        let len = table.entries.len();
        self.snapshot.store(Arc::new(table));
        len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn by_ip_matches_every_port_of_the_host() {
        let q = Quarantine::new(QuarantineBy::Ip, Duration::from_secs(10), 100);
        let t0 = Instant::now();
        q.insert(addr("127.0.0.2:4000"), t0);
        assert!(q.contains(addr("127.0.0.2:5000"), t0));
        assert!(!q.contains(addr("127.0.0.3:4000"), t0));
    }

    #[test]
    fn by_addr_matches_only_the_same_port() {
        let q = Quarantine::new(QuarantineBy::Addr, Duration::from_secs(10), 100);
        let t0 = Instant::now();
        q.insert(addr("[::1]:4000"), t0);
        assert!(q.contains(addr("[::1]:4000"), t0));
        assert!(!q.contains(addr("[::1]:4001"), t0));
    }

    #[test]
    fn entries_stop_matching_at_expiry_and_are_purged() {
        let q = Quarantine::new(QuarantineBy::Ip, Duration::from_secs(10), 100);
        let t0 = Instant::now();
        q.insert(addr("10.0.0.1:1"), t0);
        q.insert(addr("10.0.0.2:1"), t0 + Duration::from_secs(5));
        assert!(q.contains(addr("10.0.0.1:9"), t0 + Duration::from_millis(9999)));
        assert!(!q.contains(addr("10.0.0.1:9"), t0 + Duration::from_secs(10)));
        assert_eq!(q.purge(t0 + Duration::from_secs(10)), 1);
        assert_eq!(q.purge(t0 + Duration::from_secs(15)), 0);
    }

    #[test]
    fn a_full_table_evicts_the_oldest_entry() {
        let q = Quarantine::new(QuarantineBy::Ip, Duration::from_secs(100), 3);
        let t0 = Instant::now();
        for i in 1..=4u8 {
            q.insert(SocketAddr::from(([10, 0, 0, i], 1)), t0 + Duration::from_secs(i as u64));
        }
        assert_eq!(q.len(), 3);
        assert!(!q.contains(addr("10.0.0.1:1"), t0));
        assert!(q.contains(addr("10.0.0.4:1"), t0 + Duration::from_secs(5)));
    }

    #[test]
    fn re_entering_a_key_refreshes_it_without_losing_others() {
        let q = Quarantine::new(QuarantineBy::Ip, Duration::from_secs(10), 2);
        let t0 = Instant::now();
        q.insert(addr("10.0.0.1:1"), t0);
        q.insert(addr("10.0.0.2:1"), t0 + Duration::from_secs(1));
        q.insert(addr("10.0.0.1:1"), t0 + Duration::from_secs(2));
        assert_eq!(q.len(), 2);
        assert!(q.contains(addr("10.0.0.1:1"), t0 + Duration::from_secs(11)));
        assert_eq!(q.purge(t0 + Duration::from_secs(11)), 1);
    }

    #[test]
    fn zero_cooldown_quarantines_nothing() {
        let q = Quarantine::new(QuarantineBy::Ip, Duration::ZERO, 2);
        q.insert(addr("10.0.0.1:1"), Instant::now());
        assert!(q.is_empty());
    }
}
