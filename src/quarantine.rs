//! The quarantine table (docs/protocol.md#quarantine), one for the whole process, shared by
//! every shard.
//!
//! A consumer closed as `slow_consumer` is a strike against its key (the peer IP, or its
//! ip:port); `strikes` strikes within [`STRIKE_WINDOW`] quarantine the key for the
//! cooldown, so one close never locks out a host's other agents nor the same agent's
//! reconnect. Quarantine is for abuse, not for a host of agents that block on long calls
//! (docs/protocol.md#quarantine), so two closes are no strike at all:
//! - *one episode is one offence*: closes of a key within `episode` (the write deadline)
//!   of its last counted strike are part of that strike (agents of one host blocking at
//!   once, or one burst that several of them could not take);
//! - *a client that has read is no abuser*: its caller passes no strike for a connection
//!   whose socket took more bytes than the kernel can hold for a peer that reads nothing
//!   ([`unread_bytes_bound`]); only connections that never proved they read can strike.
//!
//! Reads happen on every accept and must not take a lock: readers load an immutable
//! snapshot of the quarantined keys through `ArcSwap` (one atomic load). Writes are rare (a
//! strike, or the periodic purge): they copy the table, change the copy and publish it,
//! serialised by a mutex that no reader touches. Strikes are only read by writers, so they
//! live behind that mutex and never in the snapshot. Both are bounded by `max_entries`;
//! when full, the oldest entry (or strike) goes first. Time is passed in, so tests use a
//! fake clock.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config::QuarantineBy;

/// How long a strike counts toward quarantining its key: ten minutes.
pub const STRIKE_WINDOW: Duration = Duration::from_secs(600);

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

/// Strikes not yet expired, quarantined or evicted. Each strike has a sequence number, so
/// `order` (all strikes, oldest first) and each key's list (its strikes, oldest first)
/// agree on which strike is which even when a fake clock gives two the same time.
#[derive(Debug, Default)]
struct Strikes {
    by_key: HashMap<Key, VecDeque<(u64, Instant)>>,
    /// Every strike recorded, oldest first; an item no longer in its key's list is stale
    /// (expired or cleared by a quarantine) and skipped. Compacted when mostly stale.
    order: VecDeque<(u64, Key)>,
    /// Strikes in `by_key`, against the bound.
    live: usize,
    next_seq: u64,
}

impl Strikes {
    /// Drops `key`'s strikes older than the window; returns how many are left.
    fn expire_key(&mut self, key: Key, now: Instant) -> usize {
        let Some(list) = self.by_key.get_mut(&key) else {
            return 0;
        };
        while list
            .front()
            .is_some_and(|&(_, at)| now.saturating_duration_since(at) >= STRIKE_WINDOW)
        {
            list.pop_front();
            self.live -= 1;
        }
        let left = list.len();
        if left == 0 {
            self.by_key.remove(&key);
        }
        left
    }

    fn clear_key(&mut self, key: Key) {
        if let Some(list) = self.by_key.remove(&key) {
            self.live -= list.len();
        }
    }

    fn push(&mut self, key: Key, now: Instant, max: usize) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_key.entry(key).or_default().push_back((seq, now));
        self.order.push_back((seq, key));
        self.live += 1;
        while self.live > max {
            let Some((seq, key)) = self.order.pop_front() else {
                break;
            };
            // The oldest live strike overall is the oldest of its key's.
            let list = self.by_key.get_mut(&key);
            if let Some(list) = list.filter(|l| l.front().is_some_and(|&(s, _)| s == seq)) {
                list.pop_front();
                self.live -= 1;
                if list.is_empty() {
                    self.by_key.remove(&key);
                }
            }
        }
        self.compact_if_stale();
    }

    /// Drops every expired strike.
    fn purge(&mut self, now: Instant) {
        let keys: Vec<Key> = self.by_key.keys().copied().collect();
        for key in keys {
            self.expire_key(key, now);
        }
        self.compact_if_stale();
    }

    /// Keeps `order` within twice the live strikes (plus slack), so stale items cannot
    /// grow it without bound; amortised O(1) per strike.
    fn compact_if_stale(&mut self) {
        if self.order.len() <= 2 * self.live + 64 {
            return;
        }
        let by_key = &self.by_key;
        // Each key's list is in sequence order.
        self.order.retain(|(seq, key)| {
            by_key
                .get(key)
                .is_some_and(|l| l.binary_search_by_key(seq, |&(s, _)| s).is_ok())
        });
    }
}

/// What one strike did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strike {
    /// Counted: the key has `count` strikes in the window, fewer than `limit`.
    Counted { count: u32, limit: u32 },
    /// A strike of this key was counted less than an episode ago: this close is part of
    /// it and adds nothing (`count` strikes stand).
    SameEpisode { count: u32, limit: u32 },
    /// The key reached `limit` strikes and is quarantined for `cooldown`; its strikes are
    /// cleared, so after the cooldown it starts again from none.
    Quarantined { limit: u32, cooldown: Duration },
    /// Quarantine is off (`quarantine_cooldown_secs` 0): nothing was recorded.
    Off,
    /// Not submitted: the connection had read `read` bytes, more than a peer that reads
    /// nothing could take (decided by the caller, recorded nowhere).
    Served { read: u64 },
}

/// The shared table.
pub struct Quarantine {
    by: QuarantineBy,
    /// `quarantine_cooldown_secs` in milliseconds; a reload may change it ([`Quarantine::set_rules`]).
    cooldown_ms: AtomicU64,
    /// Strikes within [`STRIKE_WINDOW`] that quarantine a key; 1 quarantines at once. A
    /// reload may change it.
    strikes_to_quarantine: AtomicU32,
    /// Closes of a key within this time after its last counted strike add nothing
    /// (`write_deadline_ms`, in milliseconds; a reload may change it).
    episode_ms: AtomicU64,
    max_entries: usize,
    snapshot: ArcSwap<Table>,
    /// Serialises writers (and holds the strikes, which only writers use); readers never
    /// take it.
    write: Mutex<Strikes>,
}

impl Quarantine {
    pub fn new(by: QuarantineBy, cooldown: Duration, strikes: u32, episode: Duration, max_entries: usize) -> Self {
        Quarantine {
            by,
            cooldown_ms: AtomicU64::new(cooldown.as_millis() as u64),
            strikes_to_quarantine: AtomicU32::new(strikes.max(1)),
            episode_ms: AtomicU64::new(episode.as_millis() as u64),
            max_entries: max_entries.max(1),
            snapshot: ArcSwap::from_pointee(Table::default()),
            write: Mutex::new(Strikes::default()),
        }
    }

    /// Sets the cooldown, the strikes that quarantine and the episode (a reload): entries
    /// already in the table keep their end time; strikes already counted count against
    /// the new limit.
    pub fn set_rules(&self, cooldown: Duration, strikes: u32, episode: Duration) {
        self.cooldown_ms.store(cooldown.as_millis() as u64, Ordering::Relaxed);
        self.strikes_to_quarantine.store(strikes.max(1), Ordering::Relaxed);
        self.episode_ms.store(episode.as_millis() as u64, Ordering::Relaxed);
    }

    fn cooldown(&self) -> Duration {
        Duration::from_millis(self.cooldown_ms.load(Ordering::Relaxed))
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

    /// Records a strike against `addr`'s key (a slow-consumer close); quarantines the key
    /// when this is its `strikes`-th within the window.
    pub fn strike(&self, addr: SocketAddr, now: Instant) -> Strike {
        let cooldown = self.cooldown();
        if cooldown.is_zero() {
            return Strike::Off;
        }
        let key = self.key(addr);
        let limit = self.strikes_to_quarantine.load(Ordering::Relaxed);
        let mut strikes = self.lock();
        let held = strikes.expire_key(key, now);
        let last = strikes.by_key.get(&key).and_then(|l| l.back()).map(|&(_, at)| at);
        if last.is_some_and(|at| {
            now.saturating_duration_since(at) < Duration::from_millis(self.episode_ms.load(Ordering::Relaxed))
        }) {
            return Strike::SameEpisode {
                count: held as u32,
                limit,
            };
        }
        let count = held as u64 + 1;
        if count >= u64::from(limit) {
            strikes.clear_key(key);
            strikes.compact_if_stale();
            self.publish(&mut strikes, |t| self.enter(t, key, now));
            return Strike::Quarantined { limit, cooldown };
        }
        strikes.push(key, now, self.max_entries);
        Strike::Counted {
            count: count as u32,
            limit,
        }
    }

    /// Quarantines `addr`'s key for the cooldown at once, whatever its strikes.
    pub fn insert(&self, addr: SocketAddr, now: Instant) {
        if self.cooldown().is_zero() {
            return;
        }
        let key = self.key(addr);
        let mut strikes = self.lock();
        strikes.clear_key(key);
        self.publish(&mut strikes, |t| self.enter(t, key, now));
    }

    /// Enters `key` for the cooldown, evicting the oldest entries past the bound.
    fn enter(&self, t: &mut Table, key: Key, now: Instant) {
        t.entries.insert(key, (now, now + self.cooldown()));
        t.order.push_back((now, key));
        while t.entries.len() > self.max_entries {
            let Some((entered, k)) = t.order.pop_front() else { break };
            if t.entries.get(&k).is_some_and(|&(e, _)| e == entered) {
                t.entries.remove(&k);
            }
        }
        // A key entered again (several of its connections closed) leaves a stale item.
        if t.order.len() > 2 * t.entries.len() + 64 {
            let entries = &t.entries;
            t.order
                .retain(|(entered, k)| entries.get(k).is_some_and(|&(e, _)| e == *entered));
        }
    }

    /// Drops expired entries and strikes; returns how many entries remain.
    pub fn purge(&self, now: Instant) -> usize {
        let mut strikes = self.lock();
        strikes.purge(now);
        let current = self.snapshot.load();
        if current.entries.values().all(|&(_, until)| now < until) && current.order.len() == current.entries.len() {
            return current.entries.len();
        }
        drop(current);
        self.publish(&mut strikes, |t| {
            t.entries.retain(|_, &mut (_, until)| now < until);
            let entries = &t.entries;
            t.order
                .retain(|(entered, k)| entries.get(k).is_some_and(|&(e, _)| e == *entered));
        })
    }

    /// Quarantined keys (some perhaps expired but not yet purged).
    pub fn len(&self) -> usize {
        self.snapshot.load().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Strikes held (in the window, not yet turned into a quarantine).
    pub fn strikes_held(&self) -> usize {
        self.lock().live
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Strikes> {
        // A poisoned lock only means another writer panicked mid-change; the published
        // snapshot is still whole and the strikes at worst miss that one, so carry on.
        self.write.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a changed copy of the table; `_writer` proves the write lock is held.
    fn publish(&self, _writer: &mut Strikes, change: impl FnOnce(&mut Table)) -> usize {
        let mut table = Table::clone(&self.snapshot.load());
        change(&mut table);
        let len = table.entries.len();
        self.snapshot.store(Arc::new(table));
        len
    }
}

/// Bytes a peer that reads nothing can still take from the relay: the relay's socket send
/// buffer at its largest (`tcp_wmem` max) plus the peer's receive buffer, which grows past
/// its initial size (`tcp_rmem` default) only when the peer reads, or is set by the peer to
/// at most twice `net.core.rmem_max`. A connection whose socket took more than this has
/// read. Read once at start; 16 MiB if the kernel's figures cannot be read.
pub fn unread_bytes_bound() -> u64 {
    fn field(path: &str, i: usize) -> Option<u64> {
        std::fs::read_to_string(path)
            .ok()?
            .split_whitespace()
            .nth(i)?
            .parse()
            .ok()
    }
    let send = field("/proc/sys/net/ipv4/tcp_wmem", 2);
    let initial = field("/proc/sys/net/ipv4/tcp_rmem", 1);
    let set = field("/proc/sys/net/core/rmem_max", 0).map(|m| 2 * m);
    match (send, initial, set) {
        (Some(s), Some(i), Some(m)) => s + i.max(m),
        _ => 16 << 20,
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
        let q = Quarantine::new(QuarantineBy::Ip, Duration::from_secs(10), 1, Duration::ZERO, 100);
        let t0 = Instant::now();
        q.insert(addr("127.0.0.2:4000"), t0);
        assert!(q.contains(addr("127.0.0.2:5000"), t0));
        assert!(!q.contains(addr("127.0.0.3:4000"), t0));
    }

    #[test]
    fn by_addr_matches_only_the_same_port() {
        let q = Quarantine::new(QuarantineBy::Addr, Duration::from_secs(10), 1, Duration::ZERO, 100);
        let t0 = Instant::now();
        q.insert(addr("[::1]:4000"), t0);
        assert!(q.contains(addr("[::1]:4000"), t0));
        assert!(!q.contains(addr("[::1]:4001"), t0));
    }

    #[test]
    fn entries_stop_matching_at_expiry_and_are_purged() {
        let q = Quarantine::new(QuarantineBy::Ip, Duration::from_secs(10), 1, Duration::ZERO, 100);
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
        let q = Quarantine::new(QuarantineBy::Ip, Duration::from_secs(100), 1, Duration::ZERO, 3);
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
        let q = Quarantine::new(QuarantineBy::Ip, Duration::from_secs(10), 1, Duration::ZERO, 2);
        let t0 = Instant::now();
        q.insert(addr("10.0.0.1:1"), t0);
        q.insert(addr("10.0.0.2:1"), t0 + Duration::from_secs(1));
        q.insert(addr("10.0.0.1:1"), t0 + Duration::from_secs(2));
        assert_eq!(q.len(), 2);
        assert!(q.contains(addr("10.0.0.1:1"), t0 + Duration::from_secs(11)));
        assert_eq!(q.purge(t0 + Duration::from_secs(11)), 1);
    }

    const MIN: Duration = Duration::from_secs(60);

    fn strikes(limit: u32, max_entries: usize) -> Quarantine {
        Quarantine::new(
            QuarantineBy::Ip,
            Duration::from_secs(300),
            limit,
            Duration::ZERO,
            max_entries,
        )
    }

    #[test]
    fn new_rules_apply_to_the_next_strike_and_keep_the_counted_ones_and_the_entries() {
        let q = strikes(3, 100);
        let (t0, peer, other) = (Instant::now(), addr("10.0.0.1:1"), addr("10.0.0.2:1"));
        q.insert(other, t0);
        assert_eq!(q.strike(peer, t0), Strike::Counted { count: 1, limit: 3 });
        q.set_rules(Duration::from_secs(5), 2, Duration::ZERO);
        assert_eq!(
            q.strike(peer, t0 + MIN),
            Strike::Quarantined {
                limit: 2,
                cooldown: Duration::from_secs(5)
            }
        );
        assert!(!q.contains(peer, t0 + MIN + Duration::from_secs(5)), "the new cooldown");
        assert!(q.contains(other, t0 + MIN), "an entry keeps its end time");
        q.set_rules(Duration::ZERO, 2, Duration::ZERO);
        assert_eq!(q.strike(peer, t0 + 2 * MIN), Strike::Off);
    }

    #[test]
    fn the_third_strike_within_the_window_quarantines_and_the_first_two_do_not() {
        let q = strikes(3, 100);
        let (t0, peer) = (Instant::now(), addr("10.0.0.1:1"));
        assert_eq!(q.strike(peer, t0), Strike::Counted { count: 1, limit: 3 });
        assert!(!q.contains(peer, t0), "one close never locks the host out");
        assert_eq!(q.strike(peer, t0 + MIN), Strike::Counted { count: 2, limit: 3 });
        assert!(!q.contains(peer, t0 + MIN));
        assert_eq!(
            q.strike(peer, t0 + 2 * MIN),
            Strike::Quarantined {
                limit: 3,
                cooldown: Duration::from_secs(300)
            }
        );
        assert!(q.contains(peer, t0 + 2 * MIN));
        assert!(!q.contains(peer, t0 + 7 * MIN), "the cooldown ends");
        // The quarantine used the strikes up: afterwards the count starts again.
        assert_eq!(q.strikes_held(), 0);
        assert_eq!(q.strike(peer, t0 + 8 * MIN), Strike::Counted { count: 1, limit: 3 });
    }

    #[test]
    fn one_strike_quarantines_at_once_as_the_reference_does() {
        let q = strikes(1, 100);
        let t0 = Instant::now();
        assert!(matches!(
            q.strike(addr("10.0.0.1:1"), t0),
            Strike::Quarantined { limit: 1, .. }
        ));
        assert!(q.contains(addr("10.0.0.1:2"), t0));
        assert_eq!(q.strikes_held(), 0);
    }

    #[test]
    fn the_window_slides_strikes_older_than_ten_minutes_no_longer_count() {
        let q = strikes(3, 100);
        let (t0, peer) = (Instant::now(), addr("10.0.0.1:1"));
        q.strike(peer, t0);
        q.strike(peer, t0 + 9 * MIN);
        // The first strike is exactly ten minutes old: it no longer counts.
        assert_eq!(q.strike(peer, t0 + 10 * MIN), Strike::Counted { count: 2, limit: 3 });
        assert!(!q.contains(peer, t0 + 10 * MIN));
        // 9, 10 and 12 minutes: three within ten minutes.
        assert!(matches!(q.strike(peer, t0 + 12 * MIN), Strike::Quarantined { .. }));
    }

    #[test]
    fn strikes_add_up_per_ip_or_per_address_as_the_key_says() {
        let t0 = Instant::now();
        let by_ip = strikes(2, 100);
        by_ip.strike(addr("10.0.0.1:1"), t0);
        assert!(matches!(
            by_ip.strike(addr("10.0.0.1:2"), t0),
            Strike::Quarantined { .. }
        ));
        let by_addr = Quarantine::new(QuarantineBy::Addr, Duration::from_secs(300), 2, Duration::ZERO, 100);
        by_addr.strike(addr("10.0.0.1:1"), t0);
        assert_eq!(
            by_addr.strike(addr("10.0.0.1:2"), t0),
            Strike::Counted { count: 1, limit: 2 }
        );
        assert!(!by_addr.contains(addr("10.0.0.1:1"), t0));
    }

    #[test]
    fn strikes_are_bounded_and_the_oldest_goes_first() {
        let q = strikes(2, 3);
        let t0 = Instant::now();
        for i in 1..=4u8 {
            q.strike(SocketAddr::from(([10, 0, 0, i], 1)), t0 + Duration::from_secs(i as u64));
        }
        assert_eq!(q.strikes_held(), 3);
        // 10.0.0.1's strike was evicted: its next one is its first again.
        assert_eq!(
            q.strike(addr("10.0.0.1:1"), t0 + Duration::from_secs(5)),
            Strike::Counted { count: 1, limit: 2 }
        );
        // 10.0.0.4's was kept.
        assert!(matches!(
            q.strike(addr("10.0.0.4:1"), t0 + Duration::from_secs(6)),
            Strike::Quarantined { .. }
        ));
        // One key's strikes count against the bound too, however high the limit.
        let q = strikes(1000, 5);
        for i in 0..50u64 {
            q.strike(addr("10.0.0.9:1"), t0 + Duration::from_millis(i));
        }
        assert_eq!(q.strikes_held(), 5);
        assert_eq!(
            q.strike(addr("10.0.0.9:1"), t0 + MIN),
            Strike::Counted { count: 6, limit: 1000 }
        );
    }

    #[test]
    fn purge_drops_expired_strikes_and_stale_bookkeeping_stays_bounded() {
        let q = strikes(2, 1000);
        let t0 = Instant::now();
        for i in 0..10u8 {
            q.strike(SocketAddr::from(([10, 0, 1, i], 1)), t0);
        }
        assert_eq!(q.strikes_held(), 10);
        q.purge(t0 + 9 * MIN);
        assert_eq!(q.strikes_held(), 10);
        q.purge(t0 + 10 * MIN);
        assert_eq!(q.strikes_held(), 0);
        // Many strike-then-quarantine cycles leave nothing behind that grows.
        for i in 0..10_000u64 {
            q.strike(addr("10.0.0.2:1"), t0 + Duration::from_millis(i));
        }
        let strikes = q.lock();
        assert!(strikes.order.len() <= 2 * strikes.live + 64, "{}", strikes.order.len());
        let table = q.snapshot.load();
        assert_eq!(table.entries.len(), 1);
        assert!(
            table.order.len() <= 2 * table.entries.len() + 64,
            "{}",
            table.order.len()
        );
    }

    #[test]
    fn closes_within_an_episode_of_the_last_counted_strike_are_one_strike() {
        let q = Quarantine::new(
            QuarantineBy::Ip,
            Duration::from_secs(300),
            3,
            Duration::from_secs(10),
            100,
        );
        let t0 = Instant::now();
        // Three agents of one host closed within seconds of each other: one strike.
        assert_eq!(q.strike(addr("10.0.0.1:1"), t0), Strike::Counted { count: 1, limit: 3 });
        for (i, port) in [2u16, 3].iter().enumerate() {
            let at = t0 + Duration::from_secs(3 + i as u64);
            assert_eq!(
                q.strike(SocketAddr::from(([10, 0, 0, 1], *port)), at),
                Strike::SameEpisode { count: 1, limit: 3 }
            );
            assert!(!q.contains(addr("10.0.0.1:9"), at));
        }
        // The episode is counted from its first close and does not stretch: a client that
        // keeps coming back to stall strikes once per episode and is refused at the third.
        let mut t = t0;
        for _ in 0..2 {
            t += Duration::from_secs(10);
            q.strike(addr("10.0.0.1:4"), t);
        }
        assert!(q.contains(addr("10.0.0.1:9"), t));
    }

    #[test]
    fn zero_cooldown_quarantines_nothing() {
        let q = Quarantine::new(QuarantineBy::Ip, Duration::ZERO, 1, Duration::ZERO, 2);
        q.insert(addr("10.0.0.1:1"), Instant::now());
        assert!(q.is_empty());
        assert_eq!(q.strike(addr("10.0.0.1:1"), Instant::now()), Strike::Off);
        assert_eq!(q.strikes_held(), 0);
    }
}
