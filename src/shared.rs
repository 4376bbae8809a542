//! What every shard shares on purpose: the config and policies, the quarantine table, the
//! process-wide connection count, each shard's published backpressure stage and queued
//! memory, its counters and start-up step, the shutdown signal and, in a cluster, the
//! uplink's identity and counters. It crosses threads,
//! so it is all atomics, locks taken rarely, or read-only after start-up. Built once by
//! [`crate::run`]; every shard and the admin thread hold an `Arc` of it.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backpressure::{Policy, Stage};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::host_limit::HostSlots;
use crate::metrics::ShardStats;
use crate::quarantine::Quarantine;
use crate::shutdown::ShutdownSignal;
use crate::supervisor::ThreadWatch;

/// Where a shard is in its start-up: each shard records its step, and the main thread
/// names it if the shard has not started in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StartupStep {
    /// Its thread exists and is creating its glommio executor (io_uring rings, buffers).
    CreatingExecutor = 0,
    /// Its executor exists and has not yet run the shard's first task (see [`kick`](crate::executor::kick)).
    FirstRun = 1,
    /// Building its per-shard context (its epoll set, buffers).
    SettingUp = 2,
    /// Starting one receiver task per peer shard and its flush task.
    AttachingMesh = 3,
    /// Starting its timers and taking over its listener.
    StartingListener = 4,
    /// Accepting.
    Started = 5,
}

impl StartupStep {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => StartupStep::FirstRun,
            2 => StartupStep::SettingUp,
            3 => StartupStep::AttachingMesh,
            4 => StartupStep::StartingListener,
            5 => StartupStep::Started,
            _ => StartupStep::CreatingExecutor,
        }
    }

    /// The step as the start-up error names it.
    pub fn describe(self) -> &'static str {
        match self {
            StartupStep::CreatingExecutor => "creating its executor",
            StartupStep::FirstRun => "waiting for its executor's first run",
            StartupStep::SettingUp => "setting up its state",
            StartupStep::AttachingMesh => "attaching the mesh",
            StartupStep::StartingListener => "starting its listener",
            StartupStep::Started => "started",
        }
    }
}

/// State shared by every shard. It crosses threads on purpose, and none of it is touched
/// per message except one relaxed load per shard when a sender's read relayed lines.
pub struct Shared {
    pub config: Config,
    pub policy: Policy,
    /// Read on every accept (lock-free), written on slow-consumer disconnects and purges.
    pub quarantine: Quarantine,
    /// A connection whose socket took more bytes than this has read, and its slow-consumer
    /// close is no strike (see [`crate::quarantine::unread_bytes_bound`]).
    pub unread_bytes_bound: u64,
    /// Each shard's backpressure [`Stage`] (the largest among its stalled recipients),
    /// written only by that shard, read by every sender's reader after it relayed lines.
    stage: Box<[AtomicU8]>,
    /// Each shard's queued memory (its [`Ledger`](crate::batch::Ledger)), written only by
    /// that shard, summed by every reader against `max_total_pending_bytes`.
    pending_bytes: Box<[Arc<AtomicU64>]>,
    /// Each shard's memory held by partial lines, written only by that shard, summed by
    /// every reader against `max_total_partial_bytes`.
    partial_bytes: Box<[AtomicU64]>,
    /// Each shard's count of stalled recipients, written only by that shard, read by the
    /// backpressure policy (is the crowd behind, or one laggard?).
    stalled: Box<[AtomicUsize]>,
    /// Open connections in the process, against `max_connections`.
    pub connections: ConnectionSlots,
    /// Open connections per client IP, against `max_connections_per_ip` (`None` when unset).
    pub hosts: Option<HostSlots>,
    pub shutdown: ShutdownSignal,
    /// Each shard's counters: written only by that shard, read by the admin thread.
    pub stats: Box<[Arc<ShardStats>]>,
    /// Start of the process's clock for shard heartbeats.
    pub epoch: Instant,
    /// Each shard's [`StartupStep`], written only by that shard, read by the main thread.
    startup_steps: Box<[AtomicU8]>,
    /// The cluster uplink's identity and counters, when `hyper_parameters.cluster` is set.
    pub cluster: Option<Arc<Cluster>>,
    /// The admin endpoint's thread: its restarts and whether it is down (see `supervisor`).
    pub admin_thread: ThreadWatch,
}

impl Shared {
    pub fn new(config: Config) -> Self {
        Shared {
            policy: Policy::from_config(&config),
            quarantine: Quarantine::new(
                config.quarantine_by,
                Duration::from_secs(config.quarantine_cooldown_secs),
                config.quarantine_strikes,
                Duration::from_millis(config.write_deadline_ms),
                config.quarantine_max_entries,
            ),
            unread_bytes_bound: crate::quarantine::unread_bytes_bound(),
            stage: (0..config.shards).map(|_| AtomicU8::new(0)).collect(),
            pending_bytes: (0..config.shards).map(|_| Arc::default()).collect(),
            stalled: (0..config.shards).map(|_| AtomicUsize::new(0)).collect(),
            partial_bytes: (0..config.shards).map(|_| AtomicU64::new(0)).collect(),
            connections: ConnectionSlots::new(config.max_connections),
            hosts: config.max_connections_per_ip.map(HostSlots::new),
            shutdown: ShutdownSignal::default(),
            stats: (0..config.shards).map(|_| Arc::default()).collect(),
            epoch: Instant::now(),
            startup_steps: (0..config.shards).map(|_| AtomicU8::new(0)).collect(),
            cluster: config.cluster.clone().map(|c| Arc::new(Cluster::new(c))),
            admin_thread: ThreadWatch::default(),
            config,
        }
    }

    /// Shard `id`'s start-up step as it last reported it.
    pub fn startup_step(&self, id: usize) -> StartupStep {
        StartupStep::from_u8(self.startup_steps.get(id).map_or(0, |s| s.load(Ordering::Acquire)))
    }

    pub fn set_startup_step(&self, id: usize, step: StartupStep) {
        if let Some(s) = self.startup_steps.get(id) {
            s.store(step as u8, Ordering::Release);
        }
    }

    /// Milliseconds since [`Shared::epoch`].
    pub fn clock_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Shard `id`'s backpressure stage now.
    pub fn shard_stage(&self, id: usize) -> Stage {
        Stage::from_u8(self.stage.get(id).map_or(0, |s| s.load(Ordering::Relaxed)))
    }

    /// Publishes shard `id`'s backpressure stage (only that shard calls this).
    pub fn publish_stage(&self, id: usize, stage: Stage) {
        if let Some(s) = self.stage.get(id) {
            s.store(stage as u8, Ordering::Relaxed);
        }
    }

    /// Publishes the memory shard `id`'s partial lines hold (only that shard calls this).
    pub fn publish_partial_bytes(&self, id: usize, bytes: u64) {
        if let Some(b) = self.partial_bytes.get(id) {
            b.store(bytes, Ordering::Relaxed);
        }
    }

    /// True while partial lines, process-wide, hold `max_total_partial_bytes` or more.
    pub fn over_partial_bound(&self) -> bool {
        let held: u64 = self.partial_bytes.iter().map(|b| b.load(Ordering::Relaxed)).sum();
        held >= self.config.max_total_partial_bytes as u64
    }

    /// Publishes how many of shard `id`'s recipients are stalled (only that shard calls this).
    pub fn publish_stalled(&self, id: usize, n: usize) {
        if let Some(s) = self.stalled.get(id) {
            s.store(n, Ordering::Relaxed);
        }
    }

    /// True while at least half of the process's clients are stalled: the relay as a whole
    /// is behind its readers, not one laggard (see `backpressure`).
    pub fn crowd_behind(&self) -> bool {
        let stalled: usize = self.stalled.iter().map(|s| s.load(Ordering::Relaxed)).sum();
        let open: u64 = self.stats.iter().map(|s| s.open.get()).sum();
        stalled > 0 && 2 * stalled as u64 >= open
    }

    /// Shard `id`'s entry in the table of queued memory, for its [`Ledger`](crate::batch::Ledger).
    pub fn pending_bytes_entry(&self, id: usize) -> Arc<AtomicU64> {
        self.pending_bytes.get(id).cloned().unwrap_or_default()
    }

    /// Shard `id`'s queued memory now (see [`Ledger`](crate::batch::Ledger)).
    pub fn shard_pending_bytes(&self, id: usize) -> u64 {
        self.pending_bytes.get(id).map_or(0, |b| b.load(Ordering::Relaxed))
    }

    /// The largest backpressure stage on any shard: what senders obey.
    pub fn stage(&self) -> Stage {
        Stage::from_u8(self.stage.iter().map(|s| s.load(Ordering::Relaxed)).max().unwrap_or(0))
    }

    /// True while the memory queued for recipients, process-wide, is past
    /// `max_total_pending_bytes`.
    pub fn over_total_pending(&self) -> bool {
        self.policy
            .over_total(self.pending_bytes.iter().map(|b| b.load(Ordering::Relaxed)).sum())
    }
}

/// The process-wide count of open connections, against `max_connections`.
pub struct ConnectionSlots {
    open: Arc<AtomicUsize>,
    max: usize,
}

impl ConnectionSlots {
    pub fn new(max: usize) -> Self {
        ConnectionSlots {
            open: Arc::default(),
            max,
        }
    }

    /// Takes a slot, or `None` when `max_connections` are open. The slot is given back
    /// when the returned guard is dropped, however the connection ends.
    pub fn try_take(&self) -> Option<ConnectionSlot> {
        let before = self.open.fetch_add(1, Ordering::Relaxed);
        if before >= self.max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ConnectionSlot {
            open: self.open.clone(),
        })
    }

    /// Slots taken now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// One open connection's slot (see [`ConnectionSlots::try_take`]).
pub struct ConnectionSlot {
    open: Arc<AtomicUsize>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_slots_stop_at_the_limit_and_come_back_when_dropped() {
        let slots = ConnectionSlots::new(2);
        let a = slots.try_take().unwrap();
        let b = slots.try_take().unwrap();
        assert!(slots.try_take().is_none());
        assert_eq!(slots.open(), 2);
        drop(a);
        let c = slots.try_take().unwrap();
        drop((b, c));
        assert_eq!(slots.open(), 0);
    }
}
