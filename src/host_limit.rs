//! The per-host connection cap, `max_connections_per_ip` (docs/protocol.md#admission-by-network):
//! one count per client IP for the whole process, shared by every shard, since SO_REUSEPORT
//! spreads one host's connections over all of them.
//!
//! Built by [`crate::shared::Shared`] only when the cap is set; the accept path takes a
//! [`HostSlot`] per admitted connection, which gives its place back when dropped, however
//! the connection ends. The table holds only hosts with a connection open (at most
//! `max_connections` entries). Taking and giving back lock a mutex once: an accept and a
//! close each cost one uncontended lock, never a message.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Open connections per client IP, against the cap.
pub struct HostSlots {
    /// IP → connections open from it; an IP with none has no entry.
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
    max_per_host: u32,
}

impl HostSlots {
    pub fn new(max_per_host: u32) -> Self {
        HostSlots {
            open: Arc::default(),
            max_per_host,
        }
    }

    /// Takes a place for one more connection from `ip` (IPv4-mapped IPv6 counts as the
    /// IPv4 address), or `None` when the host already has the cap.
    pub fn try_take(&self, ip: IpAddr) -> Option<HostSlot> {
        let ip = ip.to_canonical();
        let mut open = lock(&self.open);
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max_per_host {
            return None;
        }
        *count += 1;
        Some(HostSlot {
            open: self.open.clone(),
            ip,
        })
    }

    /// Connections open from `ip` now.
    pub fn open_from(&self, ip: IpAddr) -> u32 {
        lock(&self.open).get(&ip.to_canonical()).copied().unwrap_or(0)
    }

    /// Hosts with at least one connection open.
    pub fn hosts(&self) -> usize {
        lock(&self.open).len()
    }
}

/// A poisoned lock only means another thread panicked mid-update of a plain count; the
/// counts are still the best we have, so keep using them rather than spread the panic.
fn lock(m: &Mutex<HashMap<IpAddr, u32>>) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One connection's place among its host's (see [`HostSlots::try_take`]).
pub struct HostSlot {
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
    ip: IpAddr,
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.open);
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_host_stops_at_the_cap_and_its_places_come_back() {
        let slots = HostSlots::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let first = slots.try_take(a).unwrap();
        let second = slots.try_take(mapped).unwrap();
        assert!(slots.try_take(a).is_none());
        let other = slots.try_take(b).unwrap();
        assert_eq!((slots.open_from(a), slots.hosts()), (2, 2));
        drop(first);
        let third = slots.try_take(a).unwrap();
        drop((second, third, other));
        assert_eq!(slots.hosts(), 0);
    }
}
