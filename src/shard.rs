//! Shards: one glommio executor per usable CPU, each pinned to its CPU, each with its own
//! listener, clients, outgoing batch and counters. [`spawn_all`] starts them from the main
//! thread; [`Shard`] is the per-shard context every task on that shard shares through an
//! `Rc`. Nothing in a `Shard` is touched by another thread.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

use crate::config::Config;
use crate::connection::Client;
use crate::fanout::{self, Batch, BatchBuilder, LocalBatch, MeshEnds, MAX_OUTGOING_BYTES};
use crate::metrics::ShardStats;
use crate::notify::{Notify, NotifyAll};

/// glommio's DMA buffer arena per executor. TCP never uses it, and glommio registers it
/// with three rings against RLIMIT_MEMLOCK, so it is kept at glommio's minimum.
pub const IO_MEMORY_BYTES: usize = 64 << 10;
/// How long a busy shard may run tasks before it polls for I/O, timers and channel wake-ups
/// (glommio's default, 100 ms, would delay all of them that long under load).
const PREEMPT_TIMER: Duration = Duration::from_millis(2);
/// Submission-queue depth per ring; connection bursts arm one poll each.
const RING_DEPTH: usize = 1024;
/// One read's worth of input, shared by all readers on the shard.
const READ_SCRATCH_BYTES: usize = 64 << 10;

/// What a shard tells the main thread (crossbeam, `try_send`: never blocks a shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardEvent {
    /// The shard is connected to its peers and accepting.
    Started(usize),
    /// The shard's thread ended (or never started); the process must stop.
    Stopped(usize),
}

/// The per-shard context.
pub struct Shard {
    pub id: usize,
    pub config: Arc<Config>,
    pub stats: ShardStats,
    /// Connected clients on this shard, by client id.
    clients: RefCell<HashMap<u64, Rc<Client>>>,
    /// Envelopes accepted on this shard and not yet flushed.
    outgoing: RefCell<BatchBuilder>,
    /// Wakes the flush task when `outgoing` becomes non-empty.
    pub flush_wanted: Notify,
    /// Releases readers paused because `outgoing` passed [`MAX_OUTGOING_BYTES`].
    pub outgoing_drained: NotifyAll,
    /// Every reader's read lands here; see `connection::read_half`.
    pub read_scratch: RefCell<Box<[u8]>>,
    next_client: Cell<u64>,
}

impl Shard {
    pub fn new(id: usize, config: Arc<Config>) -> Self {
        Shard {
            id,
            config,
            stats: ShardStats::default(),
            clients: RefCell::default(),
            outgoing: RefCell::default(),
            flush_wanted: Notify::default(),
            outgoing_drained: NotifyAll::default(),
            read_scratch: RefCell::new(vec![0; READ_SCRATCH_BYTES].into_boxed_slice()),
            next_client: Cell::new(1),
        }
    }

    /// Adds a client to this shard's fan-out.
    pub fn register(&self, addr: SocketAddr) -> Rc<Client> {
        let n = self.next_client.get();
        self.next_client.set(n + 1);
        let client = Rc::new(Client::new(((self.id as u64) << 48) | n, addr));
        self.clients.borrow_mut().insert(client.id, client.clone());
        self.stats.on_open();
        client
    }

    pub fn unregister(&self, client_id: u64) {
        self.clients.borrow_mut().remove(&client_id);
    }

    /// Accepts one line from `client` for relaying to everyone else.
    pub fn relay(&self, client: &Client, line: &str) {
        self.stats.on_line();
        tracing::debug!("relay from {}: {line}", client.remote_addr);
        let mut outgoing = self.outgoing.borrow_mut();
        if outgoing.is_empty() {
            self.flush_wanted.notify();
        }
        outgoing.push(client.id, line, &client.remote_addr);
    }

    /// True while readers should pause: the flush task is behind (a peer ring is full).
    pub fn outgoing_full(&self) -> bool {
        self.outgoing.borrow().len_bytes() >= MAX_OUTGOING_BYTES
    }

    /// Takes the batch built so far, if any, and releases paused readers.
    pub fn take_outgoing(&self) -> Option<Batch> {
        let batch = {
            let mut outgoing = self.outgoing.borrow_mut();
            if outgoing.is_empty() {
                return None;
            }
            outgoing.take()
        };
        self.outgoing_drained.notify_all();
        Some(batch)
    }

    /// Queues `batch` for every client on this shard except each envelope's sender.
    pub fn deliver_local(&self, batch: &LocalBatch) {
        for client in self.clients.borrow().values() {
            client.enqueue(batch);
        }
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

/// Sends `Stopped` when a shard's future ends or is dropped without ever running.
struct StopGuard {
    id: usize,
    events: Sender<ShardEvent>,
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        let _ = self.events.try_send(ShardEvent::Stopped(self.id));
    }
}

/// Starts one pinned executor per listener. Shard `i` runs on the `i`-th usable CPU
/// (wrapping around when there are more shards than CPUs).
pub fn spawn_all(
    config: Arc<Config>,
    listeners: Vec<OwnedFd>,
    events: Sender<ShardEvent>,
) -> std::io::Result<Vec<ExecutorJoinHandle<()>>> {
    let cpus = usable_cpus();
    let mesh = fanout::build_mesh(listeners.len());
    let mut handles = Vec::with_capacity(listeners.len());
    for (id, (listener, ends)) in listeners.into_iter().zip(mesh).enumerate() {
        let placement = match cpus.get(id % cpus.len().max(1)) {
            Some(&cpu) => Placement::Fixed(cpu),
            None => Placement::Unbound,
        };
        let config = config.clone();
        let guard = StopGuard {
            id,
            events: events.clone(),
        };
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("corecast-shard{id}"))
            .io_memory(IO_MEMORY_BYTES)
            .preempt_timer(PREEMPT_TIMER)
            .ring_depth(RING_DEPTH)
            .spawn(move || shard_main(id, config, listener, ends, guard))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        handles.push(handle);
    }
    Ok(handles)
}

async fn shard_main(id: usize, config: Arc<Config>, listener: OwnedFd, ends: MeshEnds, guard: StopGuard) {
    let shard = Rc::new(Shard::new(id, config));
    let (to_peers, from_peers) = fanout::connect_mesh(ends).await;
    for from_peer in from_peers {
        glommio::spawn_local(fanout::receive_loop(shard.clone(), from_peer)).detach();
    }
    glommio::spawn_local(fanout::flush_loop(shard.clone(), to_peers)).detach();
    // SAFETY: the fd is a listening TCP socket we own; from here glommio owns it.
    let listener = unsafe { glommio::net::TcpListener::from_raw_fd(listener.into_raw_fd()) };
    let _ = guard.events.try_send(ShardEvent::Started(id));
    crate::listener::accept_loop(shard, listener).await;
    drop(guard);
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
    fn this_process_has_at_least_one_usable_cpu() {
        assert!(!usable_cpus().is_empty());
    }
}
