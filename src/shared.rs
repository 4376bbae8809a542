//! What every shard shares on purpose: the config and policies, the quarantine table, the
//! process-wide connection count, each shard's published backpressure stage and queued
//! memory, its counters and start-up step, the shutdown signal and, in a cluster, the
//! uplink's identity and counters. It crosses threads,
//! so it is all atomics, locks taken rarely, or read-only after start-up. Built once by
//! [`crate::run`]; every shard and the admin thread hold an `Arc` of it.
//!
//! A SIGHUP reload ([`Shared::reload`], on the main thread) swaps the running config in
//! [`Shared::live`] and bumps a generation; each shard's heartbeat then copies the
//! reloadable values it obeys into its [`LocalTunables`], a `Cell` the hot path reads
//! without an atomic. The quarantine rules and the connection limit are set in place.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

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
    /// The config the relay started with. The keys a reload applies (`reload` column of
    /// the key table) may since have changed: read those from [`Shared::live`], or on a
    /// shard from its [`LocalTunables`].
    pub config: Config,
    /// The running config: `config` with the reloadable keys as the last reload set them.
    /// Written only by [`Shared::reload`].
    live: ArcSwap<Config>,
    /// Bumped by every reload, so that a shard's heartbeat copies only after a change.
    generation: AtomicU64,
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
    /// The TLS listener's rustls configuration, set by `run` and replaced by a reload
    /// (which reads the certificate files again); each TLS accept loads it, so new
    /// handshakes use the newest and established sessions keep theirs.
    pub tls_server: arc_swap::ArcSwapOption<rustls::ServerConfig>,
    /// The admin endpoint's thread: its restarts and whether it is down (see `supervisor`).
    pub admin_thread: ThreadWatch,
}

impl Shared {
    pub fn new(config: Config) -> Self {
        Shared {
            live: ArcSwap::from_pointee(config.clone()),
            generation: AtomicU64::new(0),
            tls_server: arc_swap::ArcSwapOption::empty(),
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

    /// The running config (see [`Shared::live`]).
    pub fn live(&self) -> Arc<Config> {
        self.live.load_full()
    }

    /// Makes `config` the running config: the quarantine rules and the connection limit at
    /// once, each shard's tunables at its next heartbeat. `config` must keep the start-up
    /// values of the keys that need a restart (`Config::reloaded` does).
    pub fn reload(&self, config: Config) {
        self.quarantine.set_rules(
            Duration::from_secs(config.quarantine_cooldown_secs),
            config.quarantine_strikes,
            Duration::from_millis(config.write_deadline_ms),
        );
        self.connections.set_max(config.max_connections);
        self.live.store(Arc::new(config));
        self.generation.fetch_add(1, Ordering::Release);
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

    /// True while the memory queued for recipients, process-wide, is past `policy`'s
    /// `max_total_pending_bytes`.
    pub fn over_total_pending(&self, policy: &Policy) -> bool {
        policy.over_total(self.pending_bytes.iter().map(|b| b.load(Ordering::Relaxed)).sum())
    }
}

/// The reloadable values a shard's hot path obeys, copied out of the running config.
#[derive(Debug, Clone, Copy)]
pub struct Tunables {
    pub policy: Policy,
    /// `hyper_parameters.rate_limit_msgs_per_minute`; `None` disables.
    pub rate_limit_msgs_per_minute: Option<u64>,
}

impl Tunables {
    pub fn from_config(config: &Config) -> Self {
        Tunables {
            policy: Policy::from_config(config),
            rate_limit_msgs_per_minute: config.rate_limit_msgs_per_minute,
        }
    }
}

/// One shard's copy of the running config and of the [`Tunables`] its hot path reads (per
/// read and per stalled delivery, from a `Cell`, without an atomic), refreshed by the
/// shard's heartbeat ([`LocalTunables::refresh`]) after a reload. Owned by the shard's
/// fan-out, shared with its stall tracking.
pub struct LocalTunables {
    shared: Arc<Shared>,
    current: Cell<Tunables>,
    /// The running config as of the last refresh, for what is read per connection or per
    /// accept ([`crate::shard::Shard::config`]).
    config: RefCell<Arc<Config>>,
    /// The [`Shared`] generation `current` was copied at.
    generation: Cell<u64>,
}

impl LocalTunables {
    pub fn new(shared: Arc<Shared>) -> Self {
        let generation = shared.generation.load(Ordering::Acquire);
        let config = shared.live();
        LocalTunables {
            current: Cell::new(Tunables::from_config(&config)),
            config: RefCell::new(config),
            generation: Cell::new(generation),
            shared,
        }
    }

    pub fn get(&self) -> Tunables {
        self.current.get()
    }

    /// The running config as of the last refresh.
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    /// Copies the running config if a reload happened since the last copy; one atomic
    /// load otherwise. Returns the config it replaced when there was a reload.
    pub fn refresh(&self) -> Option<Arc<Config>> {
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation == self.generation.get() {
            return None;
        }
        let config = self.shared.live();
        self.current.set(Tunables::from_config(&config));
        self.generation.set(generation);
        Some(self.config.replace(config))
    }
}

/// The process-wide count of open connections, against `max_connections`.
pub struct ConnectionSlots {
    open: Arc<AtomicUsize>,
    /// `max_connections`; a reload may change it (lowering it closes nobody: only new
    /// connections are refused until enough have left).
    max: AtomicUsize,
}

impl ConnectionSlots {
    pub fn new(max: usize) -> Self {
        ConnectionSlots {
            open: Arc::default(),
            max: AtomicUsize::new(max),
        }
    }

    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Takes a slot, or `None` when `max_connections` are open. The slot is given back
    /// when the returned guard is dropped, however the connection ends.
    pub fn try_take(&self) -> Option<ConnectionSlot> {
        let before = self.open.fetch_add(1, Ordering::Relaxed);
        if before >= self.max.load(Ordering::Relaxed) {
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

    #[test]
    fn a_shard_takes_up_a_reload_at_its_next_refresh_only() {
        let config = Config::defaults_for(&crate::machine::Machine::detect());
        let shared = Arc::new(Shared::new(config.clone()));
        let local = LocalTunables::new(shared.clone());
        assert!(local.refresh().is_none(), "nothing reloaded yet");
        let mut next = config.clone();
        next.rate_limit_msgs_per_minute = Some(7);
        next.write_deadline_ms = 1234;
        next.quarantine_strikes = 1;
        shared.reload(next);
        assert_eq!(
            local.get().rate_limit_msgs_per_minute,
            Some(300),
            "a Cell, until the refresh"
        );
        let before = local.refresh().expect("a reload happened");
        assert_eq!(before.rate_limit_msgs_per_minute, Some(300));
        assert_eq!(local.get().rate_limit_msgs_per_minute, Some(7));
        assert_eq!(local.get().policy.write_deadline, Duration::from_millis(1234));
        assert_eq!(local.config().quarantine_strikes, 1);
        assert!(local.refresh().is_none());
    }

    #[test]
    fn a_lowered_connection_limit_keeps_the_open_slots_and_refuses_new_ones() {
        let slots = ConnectionSlots::new(3);
        let held: Vec<_> = (0..3).filter_map(|_| slots.try_take()).collect();
        slots.set_max(1);
        assert_eq!(slots.open(), 3, "nobody is closed");
        assert!(slots.try_take().is_none());
        drop(held);
        let one = slots.try_take().unwrap();
        assert!(slots.try_take().is_none());
        slots.set_max(2);
        assert!(slots.try_take().is_some());
        drop(one);
    }
}
