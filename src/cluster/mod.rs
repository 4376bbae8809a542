//! Cluster: several corecast nodes as one broadcast domain over a NATS cluster
//! (docs/cluster.md). Off unless `hyper_parameters.cluster` or `--cluster-nats` is given;
//! off, nothing here runs or costs anything.
//!
//! On, each node has one uplink: a thread, `corecast-cluster`, with a small current-thread
//! tokio runtime running the official `async-nats` client over one NATS connection
//! ([`uplink`]). To the shards the uplink is one more peer of the mesh ([`attach`]): each
//! shard's flush task sends every batch accepted on that shard into the uplink's ring as it
//! does to a peer shard (batches received from peers or from the uplink are never sent
//! on), and drains the uplink's ring to it with the same receiver task it runs per peer
//! shard. The rings are the mesh's bounded SPSC channels, so the uplink is bounded like
//! any consumer: when NATS cannot take the traffic the rings fill, the flush tasks wait as
//! for a full peer ring and readers pause (TCP pushes back on senders).
//!
//! Invariants: a node publishes on one connection, so its messages reach every node in
//! publish order, and each node hands them to each shard in that order: per-sender FIFO
//! holds across nodes. A message carries its node's id and sequence number ([`wire`]); a
//! number not above the last one seen is dropped (no duplicates, no reordering), and a
//! jump is a gap, counted with the lines it lost (core NATS is at-most-once across a
//! server failure). While the uplink is disconnected, what the shards hand it is counted
//! and discarded at once, so that local relaying never waits for NATS.

pub mod config;
mod report;
mod uplink;
pub mod wire;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use config::ClusterConfig;
pub use report::ClusterCollector;

use crate::batch::Batch;
use crate::mesh::{self, MeshEnds};
use crate::supervisor::ThreadWatch;

/// The `origin` of every run in a batch received from another node: no local client has
/// it (client ids are `shard << 48 | n` with far fewer than 65535 shards, and 0 marks
/// notices), so every local client receives the batch, and its envelope count is the
/// number of envelopes in it.
pub const REMOTE_ORIGIN: u64 = u64::MAX;

/// A node's cluster state: its configuration, its identity and the uplink's counters.
/// Shared (in `Shared`) between the uplink thread, which writes it, and the admin endpoint,
/// which reads it at request time. Everything is a relaxed atomic: nothing here orders
/// anything else.
pub struct Cluster {
    pub config: ClusterConfig,
    /// Random at each start, so a restarted node is a new sender to the others' sequence
    /// checks.
    pub node_id: u64,
    pub stats: ClusterStats,
    /// The uplink thread's restarts and whether it is down (see `supervisor`).
    pub uplink_thread: ThreadWatch,
    epoch: Instant,
}

/// What the uplink counts; `/metrics` exports each as `corecast_cluster_<name>`.
#[derive(Default)]
pub struct ClusterStats {
    /// True while the NATS connection is up.
    pub connected: AtomicBool,
    /// Milliseconds (since the node started) when the connection last went down; 0 if it
    /// never went down.
    pub disconnected_at_ms: AtomicU64,
    /// Successful connections after the first (`connects` counts them all), and times
    /// the connection went down.
    pub reconnects: AtomicU64,
    /// Times the server stopped answering with the connection open (then the uplink
    /// reconnected, to the next URL).
    pub unresponsive: AtomicU64,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    /// NATS messages published, with the envelopes and bytes (headers included) in them.
    pub messages_out: AtomicU64,
    pub envelopes_out: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Batches the shards handed the uplink (several may share one message; one large
    /// batch may take several).
    pub batches_out: AtomicU64,
    /// NATS messages received from other nodes and delivered, with their envelopes and
    /// bytes; each becomes one batch per shard.
    pub messages_in: AtomicU64,
    pub envelopes_in: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Envelopes discarded because the uplink was disconnected when a shard handed them over
    /// (local clients got them; other nodes did not).
    pub dropped_disconnected: AtomicU64,
    /// Envelopes the shards handed over while the uplink thread was down after a panic
    /// (local clients got them; other nodes did not), and those it had packed when it died.
    pub dropped_uplink_down: AtomicU64,
    /// Envelopes that alone exceed the server's `max_payload`: never published.
    pub dropped_oversize: AtomicU64,
    /// True while NATS takes nothing though the connection is up (a hung server), and the
    /// times that began; meanwhile the envelopes the shards hand over are dropped.
    pub stalled: AtomicBool,
    pub stalls: AtomicU64,
    pub dropped_stalled: AtomicU64,
    /// Envelopes in messages whose publish failed.
    pub dropped_publish_error: AtomicU64,
    /// Gaps in another node's sequence numbers, and the envelopes they lost.
    pub gaps: AtomicU64,
    pub lines_lost: AtomicU64,
    /// Messages with a sequence number already passed (duplicates or late copies): dropped.
    pub stale: AtomicU64,
    /// Messages on the subject that are not corecast's, or whose header disagrees with
    /// their body: dropped.
    pub invalid: AtomicU64,
    /// Other nodes heard from since start.
    pub nodes_heard: AtomicU64,
    /// Publish-to-receive age of the last message received, and the largest seen, in
    /// microseconds (wall clocks of both nodes: meaningful when they are synchronised).
    pub lag_us: AtomicU64,
    pub lag_max_us: AtomicU64,
}

impl Cluster {
    pub fn new(config: ClusterConfig) -> Self {
        Cluster {
            config,
            node_id: random_node_id(),
            stats: ClusterStats::default(),
            uplink_thread: ThreadWatch::default(),
            epoch: Instant::now(),
        }
    }

    fn clock_ms(&self) -> u64 {
        // 0 means "never", so the first millisecond counts as 1.
        (self.epoch.elapsed().as_millis() as u64).max(1)
    }

    pub fn is_connected(&self) -> bool {
        self.stats.connected.load(Ordering::Relaxed)
    }
}

/// Makes the uplink one more peer of every shard: appends to each shard's ends a sender
/// into the uplink (its flush task sends it every local batch) and a receiver from it (a
/// receiver task delivers other nodes' batches), then starts the uplink thread with the
/// other ends. Called once, before the shards start. Each ring holds `capacity` batches,
/// as between two shards (the caller passes `fanout::MESH_CAPACITY`).
pub fn attach(cluster: Arc<Cluster>, shards: &mut [MeshEnds<Arc<Batch>>], capacity: usize) -> std::io::Result<()> {
    let mut from_shards = Vec::with_capacity(shards.len());
    let mut to_shards = Vec::with_capacity(shards.len());
    for ends in shards.iter_mut() {
        let (tx, rx) = mesh::channel::<Arc<Batch>>(capacity);
        ends.to_peers.push(tx);
        from_shards.push(rx);
        let (tx, rx) = mesh::channel::<Arc<Batch>>(capacity);
        ends.from_peers.push(rx);
        to_shards.push(tx);
    }
    uplink::spawn(cluster, from_shards, to_shards)
}

/// A node id that differs between processes and starts: std's per-process random hash
/// keys, mixed with the time and the pid. Never 0.
fn random_node_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attaching_adds_one_peer_to_every_shard() {
        let mut mesh = crate::fanout::build_mesh(3);
        let cluster = Arc::new(Cluster::new(ClusterConfig {
            // Nothing listens on port 1 of loopback: the uplink keeps retrying, harmlessly.
            nats: vec!["nats://127.0.0.1:1".into()],
            subject: "corecast.test".into(),
        }));
        attach(cluster.clone(), &mut mesh, crate::fanout::MESH_CAPACITY).unwrap();
        for ends in &mesh {
            assert_eq!((ends.to_peers.len(), ends.from_peers.len()), (3, 3));
        }
        // Disconnected, the uplink takes a batch at once and counts it as dropped.
        let batch = crate::batch::Batch::of(&[(1, "x")], "h:1");
        mesh[0].to_peers[2].try_send(Arc::new(batch)).unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while cluster.stats.dropped_disconnected.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "the uplink did not drain its ring");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!cluster.is_connected());
        assert_ne!(cluster.node_id, Cluster::new(cluster.config.clone()).node_id);
    }
}
