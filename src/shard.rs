//! Shards: one glommio executor per usable CPU, each pinned to its CPU, each with its own
//! listener, clients, outgoing batch and counters. [`spawn_all`] starts them from the main
//! thread, each on its own thread with its ends of the mesh; [`Shard`] is the per-shard
//! context every task on that shard shares through an `Rc`, and [`Shared`] is the little
//! that all shards share on purpose.
//!
//! A shard's start-up waits for nothing from its peers (the mesh ends work as soon as they
//! exist); it records each [`StartupStep`] so that the main thread can name a shard that
//! does not start, and the main thread [`kick`]s an executor that glommio parked before it
//! ran the shard's first task.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use futures_lite::future::or;
use glommio::{LocalExecutorBuilder, Placement};

use crate::backpressure::{Policy, Rule, Stage};
use crate::config::Config;
use crate::connection::{Client, Sched};
use crate::fanout::{self, Batch, BatchBuilder, Ledger, LocalBatch, MeshEnds, Run, MAX_OUTGOING_BYTES};
use crate::machine::{usable_cpus, IO_MEMORY_BYTES};
use crate::metrics::{CloseReason, Counter, DropReason, ShardState, ShardStats};
use crate::notify::{Notify, NotifyAll};
use crate::pacing::{self, Pacer, FLUSH_BYTES, SLOTS};
use crate::protocol;
use crate::quarantine::{Quarantine, Strike};
use crate::ready_set::ReadySet;
use crate::shutdown::ShutdownSignal;

/// How long a busy shard may run tasks before it polls for I/O, timers and channel wake-ups
/// (glommio's default, 100 ms, would delay all of them that long under load).
const PREEMPT_TIMER: Duration = Duration::from_millis(2);
/// Submission-queue depth per ring; connection bursts arm one poll each.
const RING_DEPTH: usize = 1024;
/// One read's worth of input, shared by all readers on the shard.
const READ_SCRATCH_BYTES: usize = 64 << 10;
/// Occasional senders are read at the flush task's runs (from the ready set) only while
/// its next run is at most this many ticks away: a line from such a sender then waits no
/// longer to be read than a busy sender's does (a read round). At a hundred busy clients
/// the slots in use are two ticks apart, so the shard runs that often anyway.
const READY_SET_TICKS: u32 = pacing::READ_ROUND_TICKS as u32;
/// N6 refusals a shard sends at once; past this a refused connection is just closed.
const MAX_REFUSALS_IN_PROGRESS: usize = 32;
/// Period of the summary log lines for repeated events (drops, refusals).
const SUMMARY_INTERVAL: Duration = Duration::from_secs(1);
/// How often a shard re-examines its stalled recipients while it has any: the write
/// deadline, the messages rule and the end of pause allowances are seen this late at most.
const LAG_SWEEP_INTERVAL: Duration = Duration::from_millis(20);
/// How often a sender held back by flow control or the process-wide bound looks again.
const PAUSE_POLL: Duration = Duration::from_millis(10);
/// How often a shard's timer task proves that its thread is still running tasks (the
/// admin endpoint's `/healthz` reads it; see `admin::HEARTBEAT_STALE`).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);

/// What the flush task does next (see [`Shard::next_run`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextRun {
    /// Nothing to do until something new arrives.
    Idle,
    /// Run as soon as possible.
    Now,
    /// Run at this time (or as soon as possible if it has passed).
    At(Instant),
}

/// What a shard tells the main thread (crossbeam, `try_send`: never blocks a shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardEvent {
    /// The shard is connected to its peers and accepting.
    Started(usize),
    /// The shard's thread ended (or never started).
    Stopped(usize),
}

/// Where a shard is in its start-up: each shard records its step, and the main thread
/// names it if the shard has not started in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StartupStep {
    /// Its thread exists and is creating its glommio executor (io_uring rings, buffers).
    CreatingExecutor = 0,
    /// Its executor exists and has not yet run the shard's first task (see [`kick`]).
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
    /// Each shard's backpressure [`Stage`] (the largest among its stalled recipients),
    /// written only by that shard, read by every sender's reader after it relayed lines.
    stage: Box<[AtomicU8]>,
    /// Each shard's queued memory (its [`Ledger`]), written only by that shard, summed by
    /// every reader against `max_total_pending_bytes`.
    pending_bytes: Box<[Arc<AtomicU64>]>,
    /// Open connections in the process, against `max_connections`.
    connections: AtomicUsize,
    pub shutdown: ShutdownSignal,
    /// Each shard's counters: written only by that shard, read by the admin thread.
    pub stats: Box<[Arc<ShardStats>]>,
    /// Start of the process's clock for shard heartbeats.
    pub epoch: Instant,
    /// Each shard's [`StartupStep`], written only by that shard, read by the main thread.
    startup_steps: Box<[AtomicU8]>,
    /// The cluster uplink's identity and counters, when `hyper_parameters.cluster` is set.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl Shared {
    pub fn new(config: Config) -> Self {
        Shared {
            policy: Policy::from_config(&config),
            quarantine: Quarantine::new(
                config.quarantine_by,
                Duration::from_secs(config.quarantine_cooldown_secs),
                config.quarantine_strikes,
                config.quarantine_max_entries,
            ),
            stage: (0..config.shards).map(|_| AtomicU8::new(0)).collect(),
            pending_bytes: (0..config.shards).map(|_| Arc::default()).collect(),
            connections: AtomicUsize::new(0),
            shutdown: ShutdownSignal::default(),
            stats: (0..config.shards).map(|_| Arc::default()).collect(),
            epoch: Instant::now(),
            startup_steps: (0..config.shards).map(|_| AtomicU8::new(0)).collect(),
            cluster: config
                .cluster
                .clone()
                .map(|c| Arc::new(crate::cluster::Cluster::new(c))),
            config,
        }
    }

    /// Takes a connection slot, or returns false when `max_connections` are open.
    pub fn try_admit(&self) -> bool {
        let before = self.connections.fetch_add(1, Ordering::Relaxed);
        if before >= self.config.max_connections {
            self.connections.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub fn release(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Shard `id`'s start-up step as it last reported it.
    pub fn startup_step(&self, id: usize) -> StartupStep {
        StartupStep::from_u8(self.startup_steps.get(id).map_or(0, |s| s.load(Ordering::Acquire)))
    }

    fn set_startup_step(&self, id: usize, step: StartupStep) {
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

    /// Shard `id`'s queued memory now (see [`Ledger`]).
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

/// The per-shard context.
pub struct Shard {
    pub id: usize,
    pub shared: Arc<Shared>,
    /// This shard's entry in [`Shared::stats`].
    pub stats: Arc<ShardStats>,
    /// Connected clients on this shard, by client id.
    clients: RefCell<HashMap<u64, Rc<Client>>>,
    /// Clients whose socket refused data and has not taken everything since (usually none
    /// or a few).
    stalled: RefCell<HashSet<u64>>,
    /// This shard's entry in [`Shared::stage`], as last published.
    stage: Cell<Stage>,
    /// The memory this shard's queued envelopes hold, published in [`Shared::pending_bytes`].
    pub ledger: Rc<Ledger>,
    /// Wakes the lag sweep when the first client stalls.
    lag_wake: Notify,
    /// Envelopes accepted on this shard and not yet flushed.
    outgoing: RefCell<BatchBuilder>,
    /// Wakes the flush task when `outgoing` becomes non-empty, when a client becomes due,
    /// and at shutdown.
    pub flush_wanted: Notify,
    /// The write schedule's clock; `None` when the flush window is 0.
    pacer: Option<Pacer>,
    /// The latest tick the shard has seen.
    tick: Cell<u64>,
    /// Clients to write at the next tick.
    due: RefCell<Vec<Rc<Client>>>,
    /// Clients waiting for their next period, by slot.
    waiting: RefCell<Vec<Vec<Rc<Client>>>>,
    /// Connected clients per slot.
    slot_load: RefCell<Vec<usize>>,
    /// Releases readers paused because `outgoing` passed [`MAX_OUTGOING_BYTES`].
    pub outgoing_drained: NotifyAll,
    /// Readers that just relayed lines wait here for the next read round (see `pacing`)
    /// and then read at the start of the flush task's run, so their lines join its batch.
    /// A sender that keeps sending is then read a few times per window, each read taking
    /// all that arrived since, instead of at every readiness wake-up.
    pub read_turn: NotifyAll,
    /// Every reader's read lands here; see `connection::read_half`.
    pub read_scratch: RefCell<Box<[u8]>>,
    /// Occasional senders read at the flush task's runs (`None` if the kernel refused an
    /// epoll set: then every reader uses readiness).
    ready_set: Option<ReadySet>,
    /// The flush task's next run is within [`READY_SET_TICKS`]: readers may join the set.
    runs_soon: Cell<bool>,
    next_client: Cell<u64>,
    /// N6 refusals in progress (each holds a descriptor for up to the farewell timeout).
    refusals: Cell<usize>,
    /// N1, shared by every rate-limited client on the shard.
    rate_limit_notice: LocalBatch,
    /// Set when the drain starts: no more accepts or reads.
    shutting_down: Cell<bool>,
    /// Drain progress: the flush task has sent its last batch, and how many peer
    /// receivers have not yet seen their sender close. `drain_progress` signals both.
    flush_done: Cell<bool>,
    open_receivers: Cell<usize>,
    drain_progress: NotifyAll,
}

impl Shard {
    pub fn new(id: usize, shared: Arc<Shared>) -> Self {
        let pacer = Pacer::new(Duration::from_micros(shared.config.flush_window_us), Instant::now());
        let notice = protocol::NOTICE_RATE_LIMITED.as_bytes().to_vec();
        let end = notice.len();
        let ledger = Ledger::new(shared.pending_bytes[id].clone());
        Shard {
            id,
            stats: shared.stats[id].clone(),
            shared,
            clients: RefCell::default(),
            stalled: RefCell::default(),
            stage: Cell::new(Stage::None),
            ledger,
            lag_wake: Notify::default(),
            outgoing: RefCell::default(),
            flush_wanted: Notify::default(),
            pacer,
            tick: Cell::new(SLOTS),
            due: RefCell::default(),
            waiting: RefCell::new(vec![Vec::new(); SLOTS as usize]),
            slot_load: RefCell::new(vec![0; SLOTS as usize]),
            outgoing_drained: NotifyAll::default(),
            read_turn: NotifyAll::default(),
            read_scratch: RefCell::new(vec![0; READ_SCRATCH_BYTES].into_boxed_slice()),
            ready_set: ReadySet::new()
                .inspect_err(|e| tracing::warn!("shard {id}: no epoll set ({e}); every reader waits for readiness"))
                .ok(),
            runs_soon: Cell::new(false),
            next_client: Cell::new(1),
            refusals: Cell::new(0),
            // Origin 0 is never a client id, so every client gets it; count 0: not an envelope.
            rate_limit_notice: Ledger::detached().pin(Arc::new(Batch {
                data: notice,
                runs: vec![Run {
                    origin: 0,
                    end,
                    count: 0,
                }],
            })),
            shutting_down: Cell::new(false),
            flush_done: Cell::new(false),
            open_receivers: Cell::new(0),
            drain_progress: NotifyAll::default(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Adds a client to this shard's fan-out.
    pub fn register(&self, addr: SocketAddr, fd: std::os::fd::RawFd) -> Rc<Client> {
        let n = self.next_client.get();
        self.next_client.set(n + 1);
        let slot = {
            let mut load = self.slot_load.borrow_mut();
            let slot = pacing::pick_slot(&load);
            load[slot] += 1;
            slot as u64
        };
        let client = Rc::new(Client::new(((self.id as u64) << 48) | n, addr, fd, slot));
        self.clients.borrow_mut().insert(client.id, client.clone());
        self.stats.on_open();
        client
    }

    pub fn unregister(&self, client: &Client) {
        self.clients.borrow_mut().remove(&client.id);
        self.leave_ready_set(client);
        self.slot_load.borrow_mut()[client.slot as usize] -= 1;
        if self.stalled.borrow_mut().remove(&client.id) {
            self.review_stalled(Instant::now());
        }
    }

    /// Takes a slot for sending N6 to a refused client; false when too many are in
    /// progress, and the connection is then closed without the notice.
    pub fn try_start_refusal(&self) -> bool {
        if self.refusals.get() >= MAX_REFUSALS_IN_PROGRESS {
            return false;
        }
        self.refusals.set(self.refusals.get() + 1);
        true
    }

    pub fn on_refusal_done(&self) {
        self.refusals.set(self.refusals.get().saturating_sub(1));
    }

    pub fn open_clients(&self) -> usize {
        self.clients.borrow().len()
    }

    /// Accepts one line from `client` for relaying to everyone else.
    pub fn relay(&self, client: &Client, line: &str) {
        self.stats.on_line();
        if tracing::enabled!(target: crate::log::RELAY_TARGET, tracing::Level::DEBUG) {
            crate::log::relayed(&client.remote_addr, line, self.config().log.log_keys.as_deref());
        }
        #[cfg(debug_assertions)]
        test_triggers(line);
        let mut outgoing = self.outgoing.borrow_mut();
        if outgoing.is_empty() {
            self.flush_wanted.notify();
        }
        outgoing.push(client.id, line, &client.remote_addr);
    }

    /// Queues N1 for a rate-limited client, in order with its envelopes.
    pub fn send_rate_limit_notice(&self, client: &Rc<Client>) {
        client.enqueue(&self.rate_limit_notice);
        self.schedule(client);
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

    /// Queues `batch` for every client on this shard except each envelope's sender, and
    /// applies the slow-consumer policy to recipients that are stalled.
    pub fn deliver_local(&self, batch: &LocalBatch) {
        let mut now = None;
        for client in self.clients.borrow().values() {
            // Closing clients take no more, except for shutdown, which flushes them within
            // the usual per-connection byte bound.
            let refuse = client.refusing_envelopes().or_else(|| {
                (client.is_closing() && client.queued_bytes() > self.shared.policy.max_pending_bytes)
                    .then_some(CloseReason::SlowConsumer)
            });
            if let Some(reason) = refuse {
                let lost: u32 = batch
                    .runs
                    .iter()
                    .filter(|r| r.origin != client.id)
                    .map(|r| r.count)
                    .sum();
                self.stats.on_drop(undelivered_reason(reason), lost as u64);
                continue;
            }
            client.enqueue(batch);
            if client.is_stalled() {
                let now = *now.get_or_insert_with(Instant::now);
                let stage = self.check_stalled(client, now);
                if stage > self.stage.get() {
                    self.publish_stage(stage);
                }
            }
            self.schedule(client);
        }
    }

    /// Decides when `client`'s newly queued envelopes are written (see `pacing`).
    fn schedule(&self, client: &Rc<Client>) {
        if client.is_closing() {
            // Its connection task flushes it (shutdown) or it takes nothing more.
            return;
        }
        if client.writer_busy() {
            client.wake_writer();
            return;
        }
        let state = client.sched.get();
        let due = self.pacer.is_none()
            || client.queued_bytes() >= FLUSH_BYTES
            || (state == Sched::Idle && Pacer::period(client.slot, self.tick.get()) > client.written_period.get());
        match (due, state) {
            (_, Sched::Due) | (false, Sched::Waiting) => return,
            (true, _) => {
                client.sched.set(Sched::Due);
                self.due.borrow_mut().push(client.clone());
            }
            (false, Sched::Idle) => {
                client.sched.set(Sched::Waiting);
                self.waiting.borrow_mut()[client.slot as usize].push(client.clone());
            }
        }
        // The flush task may be parked with nothing to do (a peer's batch).
        self.flush_wanted.notify();
    }

    /// Puts an occasional sender's socket in the ready set, to be read at the flush task's
    /// runs instead of through a readiness wake-up of its own (each costs the shard an
    /// io_uring completion, a task wake-up and often a wake-up of its thread). Only while
    /// the next run is near (see [`READY_SET_TICKS`]). False if the reader should wait for
    /// readiness instead.
    pub fn read_at_runs(&self, client: &Client) -> bool {
        let Some(set) = &self.ready_set else {
            return false;
        };
        if set.contains(client.id) {
            return true;
        }
        self.runs_soon.get() && !client.is_closing() && set.insert(client.id, client.raw_fd())
    }

    /// Takes a reader out of the ready set (it is closing, or it keeps sending and reads
    /// at read rounds instead).
    pub fn leave_ready_set(&self, client: &Client) {
        if let Some(set) = &self.ready_set {
            set.remove(client.id);
        }
    }

    /// Wakes every reader in the ready set whose socket is readable; true if any.
    pub fn wake_ready_readers(&self) -> bool {
        let Some(set) = &self.ready_set else {
            return false;
        };
        let mut woke = false;
        set.for_each_ready(|id| woke |= self.wake_reader(id));
        woke
    }

    /// Wakes client `id`'s reader, if it is still connected.
    fn wake_reader(&self, id: u64) -> bool {
        self.clients.borrow().get(&id).map(|c| c.wake_reader()).is_some()
    }

    /// Records when the flush task runs next. If that is not near, the readers in the
    /// ready set go back to readiness: nothing would read them in time.
    pub fn set_next_run(&self, next: NextRun) {
        let soon = match (next, &self.pacer) {
            (NextRun::At(when), Some(pacer)) => when <= Instant::now() + pacer.tick() * READY_SET_TICKS,
            // No flush window: runs follow the lines, with no ticks to ride on.
            _ => false,
        };
        self.runs_soon.set(soon);
        if !soon {
            if let Some(set) = &self.ready_set {
                set.drain(|id| {
                    self.wake_reader(id);
                });
            }
        }
    }

    /// Reads the clock into the shard's current tick.
    pub fn refresh_tick(&self) -> u64 {
        if let Some(pacer) = &self.pacer {
            self.tick.set(pacer.tick_at(Instant::now()));
        }
        self.tick.get()
    }

    pub fn pacer(&self) -> Option<&Pacer> {
        self.pacer.as_ref()
    }

    /// Time between read rounds (zero without a flush window).
    pub fn read_round_interval(&self) -> Duration {
        self.pacer.map_or(Duration::ZERO, |p| p.read_round_interval())
    }

    /// When the flush task runs next, given the tick of its last run (`None`: it has not
    /// run yet): at the next tick when lines or due clients wait, else at the first tick
    /// that starts a waiting client's period or (for waiting readers) a read round.
    pub fn next_run(&self, last: Option<u64>) -> NextRun {
        let work_now = !self.outgoing.borrow().is_empty() || !self.due.borrow().is_empty();
        let readers = self.read_turn.has_waiters();
        let Some(pacer) = &self.pacer else {
            return if work_now || readers {
                NextRun::Now
            } else {
                NextRun::Idle
            };
        };
        let from = last.map_or(self.tick.get(), |l| l + 1);
        let tick = if work_now {
            Some(from)
        } else {
            let waiting = self.waiting.borrow();
            let slots = (0..SLOTS).filter(|&s| !waiting[s as usize].is_empty());
            let read_round = readers.then(|| Pacer::next_read_round(from));
            slots.map(|s| Pacer::next_tick_of(s, from)).chain(read_round).min()
        };
        match tick {
            None => NextRun::Idle,
            Some(t) => NextRun::At(pacer.start_of(t)),
        }
    }

    /// Writes every due client and every waiting client whose period started after tick
    /// `last` and up to the current tick.
    pub fn write_due(&self, last: u64) {
        let tick = self.tick.get();
        let mut clients = std::mem::take(&mut *self.due.borrow_mut());
        {
            let mut waiting = self.waiting.borrow_mut();
            for slot in Pacer::slots_starting(last, tick) {
                clients.append(&mut waiting[slot as usize]);
            }
        }
        for client in &clients {
            // A client can be listed twice (waiting, then due on size); write it once.
            if client.sched.replace(Sched::Idle) == Sched::Idle {
                continue;
            }
            if client.is_closing() || client.writer_busy() {
                continue;
            }
            client.written_period.set(Pacer::period(client.slot, tick));
            client.write_now(self);
        }
        // Keep the allocation for the next tick.
        clients.clear();
        let mut due = self.due.borrow_mut();
        if due.is_empty() {
            *due = clients;
        }
    }

    /// A recipient's socket refused data: it now counts toward `d` and the lag sweep
    /// watches it until it has taken everything.
    pub fn on_stall(&self, client: &Client) {
        let now = Instant::now();
        client.lag_on_stall(now);
        if self.stalled.borrow_mut().insert(client.id) {
            self.lag_wake.notify();
        }
        let stage = self.check_stalled(client, now);
        if stage > self.stage.get() {
            self.publish_stage(stage);
        }
    }

    /// A stalled recipient's socket took everything queued: it no longer counts.
    pub fn on_unstall(&self, client: &Client) {
        let now = Instant::now();
        client.lag_on_caught_up(now);
        if self.stalled.borrow_mut().remove(&client.id) {
            self.review_stalled(now);
        }
    }

    /// Applies the backpressure policy to a stalled client: closes it if a rule says so,
    /// and returns how much it holds the senders back.
    fn check_stalled(&self, client: &Client, now: Instant) -> Stage {
        let depth = client.stalled_depth();
        let bytes = client.queued_bytes();
        self.stats.on_stalled_depth(depth);
        let verdict = client.observe_lag(&self.shared.policy, depth, bytes, now);
        if let Some(rule) = verdict.close {
            self.close_slow_consumer(client, rule, &format!("{depth} messages / {bytes} bytes queued"));
        }
        verdict.stage
    }

    fn rule_text(&self, rule: Rule) -> String {
        let c = self.config();
        match rule {
            Rule::Deadline => format!("accepted nothing for {} ms", c.write_deadline_ms),
            Rule::Bytes => format!("over max_pending_bytes ({})", c.max_pending_bytes),
            Rule::Messages => format!(
                "over disconnect_threshold ({}) for {} ms",
                c.backpressure.disconnect_threshold, c.write_deadline_ms
            ),
        }
    }

    /// Closes `client` as a slow consumer by `rule` (`queued` says how far behind it is),
    /// recording the strike against its key that may quarantine it. Every `slow_consumer`
    /// close goes through here; a client already closing is left alone (one close, one
    /// strike).
    fn close_slow_consumer(&self, client: &Client, rule: Rule, queued: &str) {
        if client.is_closing() {
            return;
        }
        self.stats.on_slow_consumer(rule);
        let why = format!("{queued}, {}", self.rule_text(rule));
        let strike = self.shared.quarantine.strike(client.addr, Instant::now());
        let action = match strike {
            Strike::Counted { count, limit } => format!("closing it (strike {count} of {limit})"),
            Strike::Quarantined { limit, cooldown } => format!(
                "closing it (strike {limit} of {limit}) and quarantining it for {} s",
                cooldown.as_secs()
            ),
            Strike::Off => "closing it".to_string(),
        };
        if strike != Strike::Off {
            self.stats.on_strike(matches!(strike, Strike::Quarantined { .. }));
        }
        tracing::warn!("slow consumer {}: {why}; {action}", client.addr);
        client.request_close(CloseReason::SlowConsumer);
    }

    /// Re-examines every stalled client: applies the time-based rules, and publishes this
    /// shard's stage afresh (a stage falls only here).
    fn review_stalled(&self, now: Instant) {
        let clients = self.clients.borrow();
        let ids: Vec<u64> = self.stalled.borrow().iter().copied().collect();
        let mut stage = Stage::None;
        for id in ids {
            let Some(client) = clients.get(&id) else { continue };
            stage = stage.max(self.check_stalled(client, now));
        }
        self.publish_stage(stage);
    }

    fn publish_stage(&self, stage: Stage) {
        self.stage.set(stage);
        self.shared.stage[self.id].store(stage as u8, Ordering::Relaxed);
    }

    /// Holds back a sender whose read just relayed lines while a recipient anywhere is
    /// behind (docs/protocol.md, "Backpressure"): throttle sleeps `throttle_delay_ms`; flow
    /// control waits until no recipient is at that stage (each recipient's allowance bounds
    /// it). Returns after no wait when nobody is behind.
    pub async fn pause_sender(&self) {
        let policy = &self.shared.policy;
        let start = Instant::now();
        match self.shared.stage() {
            Stage::None => return,
            Stage::Throttle => glommio::timer::sleep(policy.throttle_delay).await,
            Stage::FlowControl => {
                // One allowance and one sweep late at most, even if the stage were stale.
                let limit = start + policy.flow_control_delay + LAG_SWEEP_INTERVAL;
                while self.shared.stage() == Stage::FlowControl && !self.is_shutting_down() && Instant::now() < limit {
                    glommio::timer::sleep(PAUSE_POLL).await;
                }
            }
        }
        self.stats.on_sender_pause(start.elapsed());
    }

    /// Waits before a read while the process-wide bound on queued bytes is exceeded: TCP
    /// then pushes back on every sender until stalled recipients drain or are closed.
    pub async fn wait_for_pending_room(&self) {
        if !self.shared.over_total_pending() {
            return;
        }
        let start = Instant::now();
        while self.shared.over_total_pending() && !self.is_shutting_down() {
            glommio::timer::sleep(PAUSE_POLL).await;
        }
        self.stats.on_sender_pause(start.elapsed());
    }

    /// Asks every idle client to close (docs/protocol.md#idle-timeout); one sweep per shard.
    fn sweep_idle(&self, timeout: Duration, now: Instant) {
        for client in self.clients.borrow().values() {
            if now.saturating_duration_since(client.last_inbound()) >= timeout {
                client.request_close(CloseReason::IdleTimeout);
            }
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.get()
    }

    /// Starts this shard's drain: every client stops reading (its task sees the close
    /// request before it reads again) and the flush task sends what is left, then stops.
    fn begin_shutdown(&self) {
        self.shutting_down.set(true);
        for client in self.clients.borrow().values() {
            client.request_close(CloseReason::Shutdown);
        }
        self.flush_wanted.notify();
    }

    pub fn on_flush_done(&self) {
        self.flush_done.set(true);
        self.drain_progress.notify_all();
    }

    pub fn on_receiver_done(&self) {
        self.open_receivers.set(self.open_receivers.get().saturating_sub(1));
        self.drain_progress.notify_all();
    }

    /// Resolves once no more batches can arrive for this shard's clients: its own flush
    /// task has finished and every peer shard has closed its sender.
    pub async fn deliveries_finished(&self) {
        while !(self.flush_done.get() && self.open_receivers.get() == 0) {
            self.drain_progress.wait().await;
        }
    }

    /// Called by a connection task when it has closed; wakes the drain.
    pub fn on_connection_closed(&self) {
        self.drain_progress.notify_all();
    }

    async fn all_connections_closed(&self) {
        while self.stats.open.get() > 0 {
            self.drain_progress.wait().await;
        }
    }
}

/// What envelopes that a closing recipient will never get are counted as.
pub fn undelivered_reason(close: CloseReason) -> DropReason {
    if close == CloseReason::SlowConsumer {
        DropReason::SlowConsumer
    } else {
        DropReason::RecipientGone
    }
}

/// Debug builds only: panics on the line named by `CORECAST_TEST_PANIC_LINE`, so the tests
/// can show that a panic closes one connection and nothing else; blocks the shard's thread
/// for `CORECAST_TEST_STALL_MS` on the line named by `CORECAST_TEST_STALL_LINE`, so they
/// can show that `/healthz` notices a stuck shard.
#[cfg(debug_assertions)]
fn test_triggers(line: &str) {
    static PANIC: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    static STALL: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    if PANIC
        .get_or_init(|| std::env::var("CORECAST_TEST_PANIC_LINE").ok())
        .as_deref()
        == Some(line)
    {
        panic!("test-only panic trigger");
    }
    let stall = STALL.get_or_init(|| {
        let line = std::env::var("CORECAST_TEST_STALL_LINE").ok()?;
        let ms = std::env::var("CORECAST_TEST_STALL_MS").ok()?.parse().ok()?;
        Some((line, ms))
    });
    if let Some((_, ms)) = stall.as_ref().filter(|(l, _)| l == line) {
        std::thread::sleep(Duration::from_millis(*ms));
    }
}

/// Debug builds only: blocks shard `N`'s thread for `MS` milliseconds while it attaches the
/// mesh when `CORECAST_TEST_STARTUP_STALL=N:MS`, so the tests can show what a shard that
/// does not start, and a signal during start-up, do.
#[cfg(debug_assertions)]
fn test_startup_stall(id: usize) {
    let stall = std::env::var("CORECAST_TEST_STARTUP_STALL").ok().and_then(|v| {
        let (shard, ms) = v.split_once(':')?;
        Some((shard.parse::<usize>().ok()?, ms.parse::<u64>().ok()?))
    });
    if let Some((_, ms)) = stall.filter(|&(shard, _)| shard == id) {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// Sends `Stopped` (and marks the shard stopped for `/healthz`) when a shard's future ends,
/// unwinds, or is dropped without ever running.
struct StopGuard {
    id: usize,
    events: Sender<ShardEvent>,
    stats: Arc<ShardStats>,
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.stats.set_state(ShardState::Stopped);
        let _ = self.events.try_send(ShardEvent::Stopped(self.id));
    }
}

/// A shard's thread as the main thread holds it: it ends with why its executor could not
/// be created, or `Ok` once the shard's future has returned.
pub type ShardThread = std::thread::JoinHandle<Result<(), String>>;

/// The signal [`kick`] sends. Its default action is to ignore it, so nothing else in the
/// process expects it; corecast uses no out-of-band TCP data (its other meaning).
const KICK_SIGNAL: libc::c_int = libc::SIGURG;

/// Starts one pinned executor per listener, each on its own thread. Shard `i` runs on the
/// `i`-th usable CPU (wrapping around when there are more shards than CPUs).
pub fn spawn_all(
    shared: Arc<Shared>,
    listeners: Vec<OwnedFd>,
    events: Sender<ShardEvent>,
) -> std::io::Result<Vec<ShardThread>> {
    install_kick_handler()?;
    let cpus = usable_cpus();
    let mut mesh = fanout::build_mesh(listeners.len());
    // With a cluster, the uplink is one more peer of every shard (see `cluster`).
    if let Some(cluster) = &shared.cluster {
        crate::cluster::attach(cluster.clone(), &mut mesh)?;
    }
    let mut handles = Vec::with_capacity(listeners.len());
    for (id, (listener, ends)) in listeners.into_iter().zip(mesh).enumerate() {
        let placement = match cpus.get(id % cpus.len().max(1)) {
            Some(&cpu) => Placement::Fixed(cpu),
            None => Placement::Unbound,
        };
        let shared = shared.clone();
        let guard = StopGuard {
            id,
            events: events.clone(),
            stats: shared.stats[id].clone(),
        };
        // `make` + `run` on our own thread instead of `LocalExecutorBuilder::spawn`, so
        // that the shard can report that its executor exists before its first run.
        let handle = std::thread::Builder::new()
            .name(format!("corecast-shard{id}"))
            .spawn(move || {
                let executor = LocalExecutorBuilder::new(placement)
                    .io_memory(IO_MEMORY_BYTES)
                    .preempt_timer(PREEMPT_TIMER)
                    .ring_depth(RING_DEPTH)
                    .make()
                    .map_err(|e| format!("cannot create its executor: {e}"))?;
                shared.set_startup_step(id, StartupStep::FirstRun);
                executor.run(shard_main(id, shared, listener, ends, guard));
                Ok(())
            })?;
        handles.push(handle);
    }
    Ok(handles)
}

/// Interrupts a shard thread's sleep in `io_uring_enter` with a no-op signal.
///
/// Why: glommio 0.9's run loop can park with a task queued and not run. Each turn arms a
/// 2 ms preempt timer, then `run_task_queues` returns at once, running nothing, if that
/// timer has already fired (the thread was descheduled in between, as happens when
/// several shards share a CPU); the park that follows counts only wakers woken in that
/// pass and sleeps. A new executor has nothing armed, so its first task, the shard
/// itself, can wait forever: 22 starts of 8 to 32 shards on 2 CPUs hung about once in ten
/// series without this. A running shard can be caught the same way once the task queued
/// is its heartbeat's (no timer is armed until that task runs): one such hang was seen in
/// a test, so the control loop also kicks any shard whose heartbeat has gone stale. The signal makes the sleep return `EINTR`,
/// which glommio treats as a wake-up, and the next turn runs the queued task.
pub fn kick(thread: &ShardThread) {
    // SAFETY: the pthread_t belongs to a thread we have not joined, so it is valid; the
    // signal's handler does nothing.
    unsafe {
        libc::pthread_kill(thread.as_pthread_t(), KICK_SIGNAL);
    }
}

/// A handler that does nothing for [`KICK_SIGNAL`], without `SA_RESTART` so that the sleep
/// it interrupts returns instead of resuming.
fn install_kick_handler() -> std::io::Result<()> {
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: a zeroed sigaction with an empty mask and a handler that touches nothing is
    // valid; sigaction only reads it.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ignore as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(KICK_SIGNAL, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

async fn shard_main(id: usize, shared: Arc<Shared>, listener: OwnedFd, ends: MeshEnds, guard: StopGuard) {
    // Nothing below waits for another shard: the mesh ends work as they are, so a shard's
    // start-up depends only on its own thread getting CPU time.
    shared.set_startup_step(id, StartupStep::SettingUp);
    let shard = Rc::new(Shard::new(id, shared.clone()));
    shared.set_startup_step(id, StartupStep::AttachingMesh);
    #[cfg(debug_assertions)]
    test_startup_stall(id);
    let MeshEnds { to_peers, from_peers } = ends;
    shard.open_receivers.set(from_peers.len());
    for from_peer in from_peers {
        glommio::spawn_local(fanout::receive_loop(shard.clone(), from_peer)).detach();
    }
    glommio::spawn_local(fanout::flush_loop(shard.clone(), to_peers)).detach();
    shared.set_startup_step(id, StartupStep::StartingListener);
    if let Some(timeout) = shard.config().client_timeout_secs {
        glommio::spawn_local(idle_sweep_loop(shard.clone(), Duration::from_secs(timeout))).detach();
    }
    glommio::spawn_local(summary_loop(shard.clone())).detach();
    glommio::spawn_local(lag_sweep_loop(shard.clone())).detach();
    glommio::spawn_local(heartbeat_loop(shared.clone(), shard.stats.clone())).detach();
    // SAFETY: the fd is a listening TCP socket we own; from here glommio owns it.
    let listener = unsafe { glommio::net::TcpListener::from_raw_fd(listener.into_raw_fd()) };
    shard.stats.on_heartbeat(shared.clock_ms());
    shard.stats.set_state(ShardState::Running);
    shared.set_startup_step(id, StartupStep::Started);
    let _ = guard.events.try_send(ShardEvent::Started(id));

    // Dropping the accept loop drops (closes) the listener.
    or(
        crate::listener::accept_loop(shard.clone(), listener),
        shared.shutdown.wait(),
    )
    .await;
    shard.stats.set_state(ShardState::Draining);
    shard.begin_shutdown();
    let grace = Duration::from_millis(shard.config().shutdown_grace_ms);
    // Done when every client is closed and this shard's own flush and peer receivers have
    // finished (so its senders are closed and its peers can finish their drains too).
    let drained = async {
        shard.all_connections_closed().await;
        shard.deliveries_finished().await;
        true
    };
    let complete = or(drained, async {
        glommio::timer::sleep(grace).await;
        false
    })
    .await;
    if !complete {
        tracing::warn!(
            "shard {id}: shutdown grace of {} ms ran out with {} connections open; closing them",
            grace.as_millis(),
            shard.open_clients()
        );
    }
    tracing::info!("shard {id} stopped: {}", shard.stats.summary());
    drop(guard);
}

/// Closes idle clients, one sweep per `timeout_check_interval_secs`.
async fn idle_sweep_loop(shard: Rc<Shard>, timeout: Duration) {
    let every = Duration::from_secs(shard.config().timeout_check_interval_secs);
    while !shard.is_shutting_down() {
        glommio::timer::sleep(every).await;
        shard.sweep_idle(timeout, Instant::now());
    }
}

/// Re-examines stalled clients every [`LAG_SWEEP_INTERVAL`] while there are any, so that
/// time-based rules act even when no new batch arrives for them; parked otherwise.
async fn lag_sweep_loop(shard: Rc<Shard>) {
    while !shard.is_shutting_down() {
        if shard.stalled.borrow().is_empty() {
            shard.lag_wake.wait().await;
            continue;
        }
        glommio::timer::sleep(LAG_SWEEP_INTERVAL).await;
        shard.review_stalled(Instant::now());
    }
}

/// Proves the shard's thread still runs tasks, for `/healthz`. Runs until the executor
/// ends (it is detached, so it does not hold the shard's future open).
async fn heartbeat_loop(shared: Arc<Shared>, stats: Arc<ShardStats>) {
    loop {
        stats.on_heartbeat(shared.clock_ms());
        glommio::timer::sleep(HEARTBEAT_INTERVAL).await;
    }
}

/// Logs repeated events once per interval as counts instead of one line each.
async fn summary_loop(shard: Rc<Shard>) {
    let stats = &shard.stats;
    let counters: [(&Counter, &str); 4] = [
        (
            stats.drop_counter(DropReason::RateLimited),
            "lines dropped by the rate limiter",
        ),
        (
            stats.drop_counter(DropReason::Quarantined),
            "connections refused from quarantined peers",
        ),
        (
            stats.drop_counter(DropReason::ServerFull),
            "connections refused because the server is full",
        ),
        (&stats.sender_pauses, "sender read pauses for backpressure"),
    ];
    let mut reported = counters.map(|(c, _)| c.get());
    while !shard.is_shutting_down() {
        glommio::timer::sleep(SUMMARY_INTERVAL).await;
        for ((counter, what), last) in counters.iter().zip(reported.iter_mut()) {
            let now = counter.get();
            if now > *last {
                tracing::warn!(
                    "shard {}: {} {what} in the last {} s",
                    shard.id,
                    now - *last,
                    SUMMARY_INTERVAL.as_secs()
                );
                *last = now;
            }
        }
    }
}
