//! The tasks that drive a shard's [`Fanout`]: the flush task, which in each write pass
//! turns the lines accepted since the last into one batch, delivers it locally, hands it to
//! every peer and writes to the recipients, and one receive loop per peer, which delivers
//! that peer's batches here.
//!
//! A peer is anything that takes this shard's batches through a [`mesh::Sender`] and sends
//! its own through a [`mesh::Receiver`]: today the other shards, over the full mesh of
//! SPSC rings that [`build_mesh`] makes on the main thread (usable as soon as a shard holds
//! its ends: there is no connect step). The flush task holds [`Peers`]; anything that
//! delivers batches like a peer shard runs [`receive_loop`] (see [`spawn_receiver`]).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use futures_lite::future::or;

use super::Fanout;
use crate::batch::Batch;
use crate::mesh::{self, Depth, Receiver, Sender};
use crate::metrics::DropReason;
use crate::pacing::NextRun;

/// Batches in flight per ordered pair of shards. A full ring means the peer shard is
/// behind: the flush task waits for room, the outgoing builder grows, and readers on this
/// shard pause once it passes [`super::MAX_OUTGOING_BYTES`] (pushing back on senders
/// through TCP).
pub const MESH_CAPACITY: usize = 1024;

/// One shard's ends of the mesh: a sender to and a receiver from each other shard.
pub type MeshEnds = mesh::MeshEnds<Arc<Batch>>;

/// Builds a full mesh of SPSC rings of [`MESH_CAPACITY`], one per ordered pair of shards;
/// element `i` is shard `i`'s ends.
pub fn build_mesh(shards: usize) -> Vec<MeshEnds> {
    mesh::full_mesh(shards, MESH_CAPACITY)
}

/// The senders the flush task hands each locally built batch to, one per peer.
#[derive(Default)]
pub struct Peers {
    senders: Vec<Sender<Arc<Batch>>>,
    /// Whether a gone peer was logged (once per shard).
    warned: bool,
    /// What the rings to them hold, in bytes, for the readers' pause (see [`InFlight`]).
    in_flight: Rc<InFlight>,
}

impl Peers {
    pub fn new(senders: Vec<Sender<Arc<Batch>>>) -> Self {
        let in_flight = Rc::new(InFlight::default());
        for s in &senders {
            in_flight.add_ring(s.depth());
        }
        Peers {
            senders,
            warned: false,
            in_flight,
        }
    }

    /// Adds one more peer.
    pub fn push(&mut self, sender: Sender<Arc<Batch>>) {
        self.in_flight.add_ring(sender.depth());
        self.senders.push(sender);
    }

    /// Hands `batch` to every peer in turn, waiting while a peer's ring is full (readers
    /// on this shard pause meanwhile). A send error means that peer's end is gone: at
    /// shutdown, or a thread that died beyond the supervisor's reach (the uplink keeps its
    /// rings across restarts). Its envelopes are counted as `peer_gone`, never lost
    /// silently, and the first such loss outside shutdown is logged.
    async fn send(&mut self, batch: &Arc<Batch>, fanout: &Fanout) {
        for (i, peer) in self.senders.iter_mut().enumerate() {
            if peer.send(batch.clone()).await.is_ok() {
                self.in_flight.on_pushed(i, batch.data.len() as u64);
            } else {
                let envelopes = batch.runs.iter().map(|r| r.count as u64).sum();
                fanout.stats.on_drop(DropReason::PeerGone, envelopes);
                if !self.warned && !fanout.is_shutting_down() {
                    self.warned = true;
                    tracing::error!(
                        "shard {}: peer {i} of the mesh is gone; what it should get is dropped (counted as peer_gone)",
                        fanout.shard_id
                    );
                }
            }
        }
    }
}

/// The bytes of the batches this shard pushed that its peers have not taken yet, ring by
/// ring. A peer delivers a batch to its recipients (and their `b`, which the pauses
/// watch) only when it takes it, so until then those bytes are outside every backlog:
/// this shard's readers pause while any ring holds more than
/// [`MAX_OUTGOING_BYTES`](super::MAX_OUTGOING_BYTES), so that a sender cannot run ahead of
/// a busy peer by a ring of megabyte lines. Only the producer's shard touches it; the
/// ring's depth tells which of the recent pushes are still in it (FIFO).
#[derive(Default)]
pub struct InFlight {
    rings: RefCell<Vec<RingBytes>>,
    /// Sum of every ring's `pushed`: an upper bound, so that the rings are only looked at
    /// when it is past the limit.
    upper: Cell<u64>,
}

struct RingBytes {
    depth: Depth<Arc<Batch>>,
    /// Sizes of the latest pushes, oldest first; those past the ring's depth were taken.
    pushed: VecDeque<u64>,
    bytes: u64,
}

impl InFlight {
    fn add_ring(&self, depth: Depth<Arc<Batch>>) {
        self.rings.borrow_mut().push(RingBytes {
            depth,
            pushed: VecDeque::new(),
            bytes: 0,
        });
    }

    fn on_pushed(&self, ring: usize, bytes: u64) {
        if let Some(r) = self.rings.borrow_mut().get_mut(ring) {
            r.pushed.push_back(bytes);
            r.bytes += bytes;
            self.upper.set(self.upper.get() + bytes);
        }
    }

    /// True while some ring holds more than `limit` bytes.
    pub fn is_over(&self, limit: u64) -> bool {
        if self.upper.get() <= limit {
            return false;
        }
        let mut rings = self.rings.borrow_mut();
        let mut total = 0;
        let mut over = false;
        for r in rings.iter_mut() {
            let depth = r.depth.get();
            while r.pushed.len() > depth {
                r.bytes -= r.pushed.pop_front().unwrap_or(0);
            }
            total += r.bytes;
            over |= r.bytes > limit;
        }
        self.upper.set(total);
        over
    }
}

/// The shard's flush task. It runs write passes, only when there is something to do and
/// no sooner than the pass clock allows (see `pacing`): it lets waiting readers read (those
/// waiting for their turn, and those in the ready set whose socket is readable), turns the
/// lines accepted since the last pass into one batch, hands it to every local recipient's
/// outbox and once to every peer, then writes to every recipient with something queued.
/// At shutdown it sends what is left and returns, which drops (closes) its senders: peer
/// receivers then drain their ring and end.
pub async fn flush_loop(fanout: Rc<Fanout>, mut peers: Peers) {
    fanout.watch_in_flight(peers.in_flight.clone());
    loop {
        // Everything a notification announces (lines, listed recipients, readers, the
        // shutdown) is read below, so an earlier one, such as those the last pass raised
        // itself, need not wake this loop again.
        fanout.flush_wanted().clear();
        let stopping = fanout.is_shutting_down();
        if !stopping {
            match fanout.next_run() {
                NextRun::Idle => {
                    fanout.flush_wanted().wait().await;
                    continue;
                }
                NextRun::At(when) if when > Instant::now() => {
                    // Something new may want an earlier pass (a full outbox, the shutdown):
                    // wake for it too.
                    let wait = when.saturating_duration_since(Instant::now());
                    or(glommio::timer::sleep(wait), fanout.flush_wanted().wait()).await;
                    continue;
                }
                NextRun::At(_) | NextRun::Now => {}
            }
        }
        let start = Instant::now();
        // Readers read what arrived since their last turn, and readers in the ready set
        // whose socket is readable; their lines join this pass. Readers woken by readiness
        // in the same wake-up of the shard are queued ahead of this task and read too.
        if fanout.release_readers() {
            futures_lite::future::yield_now().await;
        }
        while let Some(batch) = fanout.take_outgoing() {
            let batch = Arc::new(batch);
            fanout.deliver(batch.clone());
            peers.send(&batch, &fanout).await;
        }
        let writes = Instant::now();
        let wrote = fanout.write_due();
        fanout.on_pass(start, writes.elapsed(), wrote);
        if stopping {
            fanout.drain().on_flush_done();
            return;
        }
    }
}

/// Receives one peer's batches and delivers them to this shard's recipients, until the
/// peer closes its sender.
pub async fn receive_loop(fanout: Rc<Fanout>, mut receiver: Receiver<Arc<Batch>>) {
    while let Some(batch) = receiver.recv().await {
        fanout.deliver(batch);
    }
    fanout.drain().on_receiver_done();
}

/// Starts a [`receive_loop`] for `receiver`, which the shard's drain waits for.
pub fn spawn_receiver(fanout: &Rc<Fanout>, receiver: Receiver<Arc<Batch>>) {
    fanout.drain().add_receiver();
    glommio::spawn_local(receive_loop(fanout.clone(), receiver)).detach();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_counts_only_the_batches_still_in_the_ring() {
        let (tx, rx) = mesh::channel::<Arc<Batch>>(8);
        let in_flight = InFlight::default();
        in_flight.add_ring(tx.depth());
        for len in [3_000_000u64, 2_000_000] {
            tx.try_send(Arc::new(Batch::default())).unwrap();
            in_flight.on_pushed(0, len);
        }
        assert!(in_flight.is_over(4 << 20), "5 MB in the ring");
        rx.try_recv().unwrap();
        assert!(!in_flight.is_over(4 << 20), "the peer took the first 3 MB");
        assert!(in_flight.is_over(1 << 20), "2 MB still in the ring");
        rx.try_recv().unwrap();
        assert!(!in_flight.is_over(0));
    }
}
