//! Fan-out: the component that owns a shard's fan-out state and the tasks that drive it.
//!
//! [`Fanout`] holds the shard's clients, its outgoing batch (lines accepted and not yet
//! flushed, `fanout/outgoing.rs`), its write schedule (`pacing::Schedule`), its stall tracking
//! ([`stalls::Stalls`]) and its read scheduling ([`reads::Reads`]). Readers hand it lines
//! ([`Fanout::relay`]); the flush task (`fanout/flush.rs`) turns them into one batch per
//! run, delivers it to every local outbox and to every peer over the mesh, and writes to
//! the recipients that are due; a receive loop per peer delivers that peer's batches here.
//! Below it, a [`Client`] only reports what a write did; above it, the connection task
//! reads and drains its own stalled writer.
//!
//! Ordering: a sender's lines enter one builder in order, batches leave a shard in order,
//! each SPSC ring is FIFO and outboxes are FIFO, so every recipient sees each sender's lines
//! in the order they were sent (docs/protocol.md#ordering-and-delivery).

mod flush;
mod outgoing;
pub mod reads;
pub mod stalls;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use flush::{build_mesh, flush_loop, receive_loop, spawn_receiver, InFlight, MeshEnds, Peers, MESH_CAPACITY};
pub use outgoing::MAX_OUTGOING_BYTES;

use crate::batch::{Batch, Ledger, LocalBatch};
use crate::client::{Client, WriteOutcome, Written};
use crate::metrics::{CloseReason, DropReason, ShardStats};
use crate::notify::Notify;
use crate::pacing::{Entry, NextRun, Schedule};
use crate::protocol;
use crate::shared::{LocalTunables, Shared, Tunables};
use crate::shutdown::Drain;
use crate::socket::Socket;
use outgoing::Outgoing;
use reads::Reads;
use stalls::Stalls;

/// How often readers paused because a peer has not taken this shard's batches look again.
const IN_FLIGHT_POLL: Duration = Duration::from_millis(1);

/// One shard's fan-out state.
pub struct Fanout {
    shard_id: usize,
    shared: Arc<Shared>,
    stats: Arc<ShardStats>,
    drain: Rc<Drain>,
    /// Connected clients on this shard, by client id.
    clients: RefCell<HashMap<u64, Rc<Client>>>,
    next_client: Cell<u64>,
    /// The memory this shard's queued envelopes hold, published in [`Shared`].
    ledger: Rc<Ledger>,
    /// Envelopes accepted on this shard and not yet flushed.
    outgoing: Outgoing,
    /// Bytes of flushed batches the peers have not taken yet (set by the flush task).
    in_flight: RefCell<Rc<InFlight>>,
    /// Wakes the flush task when `outgoing` becomes non-empty, when a client becomes due,
    /// and at shutdown.
    flush_wanted: Notify,
    schedule: Schedule<Rc<Client>>,
    stalls: Stalls,
    reads: Reads,
    /// N1, shared by every rate-limited client on the shard.
    rate_limit_notice: LocalBatch,
    /// The reloadable limits this shard obeys (shared with `stalls`); the heartbeat
    /// refreshes them after a SIGHUP reload.
    tunables: Rc<LocalTunables>,
    /// When the first line was read of each batch queued here since the last socket
    /// write of the flush task; the next write observes their relay delay. Bounded by
    /// [`MAX_AWAITING_WRITE`] (past it the oldest are not measured).
    awaiting_write: RefCell<Vec<Instant>>,
}

/// Batches whose delay waits for the next write, at most (a shard whose every recipient
/// is stalled writes only from writer halves, which do not observe).
const MAX_AWAITING_WRITE: usize = 256;

impl Fanout {
    pub fn new(shard_id: usize, shared: Arc<Shared>, stats: Arc<ShardStats>, drain: Rc<Drain>) -> Self {
        let ledger = Ledger::new(shared.pending_bytes_entry(shard_id));
        let window = Duration::from_micros(shared.config.flush_window_us);
        let tunables = Rc::new(LocalTunables::new(shared.clone()));
        Fanout {
            shard_id,
            stalls: Stalls::new(shard_id, shared.clone(), stats.clone(), tunables.clone()),
            tunables,
            shared,
            stats,
            drain,
            clients: RefCell::default(),
            next_client: Cell::new(1),
            rate_limit_notice: Ledger::detached().pin(Arc::new(Batch::notice(protocol::NOTICE_RATE_LIMITED))),
            ledger,
            outgoing: Outgoing::default(),
            in_flight: RefCell::default(),
            flush_wanted: Notify::default(),
            schedule: Schedule::new(window),
            reads: Reads::new(shard_id),
            awaiting_write: RefCell::default(),
        }
    }

    /// The reloadable limits as this shard last copied them.
    pub fn tunables(&self) -> Tunables {
        self.tunables.get()
    }

    /// The running config as this shard last copied it (see [`LocalTunables`]).
    pub fn config(&self) -> Arc<crate::config::Config> {
        self.tunables.config()
    }

    /// Copies the running config and its reloadable limits after a reload (the heartbeat
    /// calls this); true when there was one. When the reload changed the `allow` or `deny`
    /// lists, closes the clients they no longer admit (`denied`); nobody else is touched.
    pub fn refresh_tunables(&self) -> bool {
        let Some(before) = self.tunables.refresh() else {
            return false;
        };
        let now = self.tunables.config();
        if before.allow != now.allow || before.deny != now.deny {
            for client in self.clients.borrow().values() {
                if !client.is_closing() && !now.admits(client.addr.ip()) {
                    tracing::info!("closing {}: the reloaded allow/deny lists refuse it", client.addr);
                    client.request_close(CloseReason::Denied);
                }
            }
        }
        true
    }

    /// Adds a client to this shard's fan-out for as long as the returned membership lives.
    pub fn join(self: &Rc<Self>, addr: SocketAddr, socket: std::rc::Weak<Socket>) -> Membership {
        let n = self.next_client.get();
        self.next_client.set(n + 1);
        let id = ((self.shard_id as u64) << 48) | n;
        let client = Rc::new(Client::new(id, addr, socket, Entry::new()));
        self.clients.borrow_mut().insert(id, client.clone());
        self.stats.add_connection(id, client.conn.clone());
        self.stats.on_open();
        Membership {
            fanout: self.clone(),
            client,
        }
    }

    fn leave(&self, client: &Client) {
        self.clients.borrow_mut().remove(&client.id);
        self.stats.remove_connection(client.id);
        self.reads.leave_ready_set(client);
        self.stalls.forget(client);
    }

    pub fn open_clients(&self) -> usize {
        self.clients.borrow().len()
    }

    pub fn reads(&self) -> &Reads {
        &self.reads
    }

    pub fn stalls(&self) -> &Stalls {
        &self.stalls
    }

    /// Accepts one line from `client` for relaying to everyone else.
    pub fn relay(&self, client: &Client, line: &str) {
        self.stats.on_line();
        client.conn.lines_in.add(1);
        if tracing::enabled!(target: crate::log::RELAY_TARGET, tracing::Level::DEBUG) {
            crate::log::relayed(&client.remote_addr, line, self.shared.config.log.log_keys.as_deref());
        }
        #[cfg(debug_assertions)]
        test_triggers(line);
        if self.outgoing.push(client.id, line, &client.remote_addr) {
            self.flush_wanted.notify();
        }
    }

    /// Queues N1 for a rate-limited client, in order with its envelopes.
    pub fn send_rate_limit_notice(&self, client: &Rc<Client>) {
        client.enqueue(&self.rate_limit_notice);
        self.schedule(client);
    }

    /// Waits while the outgoing batch is over [`MAX_OUTGOING_BYTES`]: the flush task is
    /// behind (a peer ring is full), and readers pause until it catches up.
    /// Also waits while a peer has not yet taken more than that of this shard's batches
    /// (see [`InFlight`]), looking again every millisecond.
    pub async fn wait_for_outgoing_room(&self) {
        self.outgoing.wait_for_room().await;
        while !self.is_shutting_down() && self.in_flight.borrow().is_over(MAX_OUTGOING_BYTES as u64) {
            glommio::timer::sleep(IN_FLIGHT_POLL).await;
        }
    }

    /// Watches the flush task's rings to its peers for [`Fanout::wait_for_outgoing_room`].
    fn watch_in_flight(&self, in_flight: Rc<InFlight>) {
        *self.in_flight.borrow_mut() = in_flight;
    }

    /// Takes the batch built so far, if any, and releases paused readers.
    fn take_outgoing(&self) -> Option<Batch> {
        self.outgoing.take()
    }

    /// Queues `batch` for every client on this shard except each envelope's sender, and
    /// applies the slow-consumer policy to recipients that are stalled.
    pub fn deliver(&self, batch: Arc<Batch>) {
        let first_read = batch.first_read;
        let batch = self.ledger.pin(batch);
        let mut now = None;
        let mut queued = false;
        for client in self.clients.borrow().values() {
            // Closing clients take no more, except for shutdown, which flushes them within
            // the usual per-connection byte bound; what a shutdown flush has no room for is
            // counted as the shutdown close counts the rest (`recipient_gone`): no
            // slow-consumer close happened.
            let refuse = client.refusing_envelopes().or_else(|| {
                (client.is_closing() && client.queued_bytes() > self.tunables.get().policy.max_pending_bytes)
                    .then_some(CloseReason::Shutdown)
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
            client.enqueue(&batch);
            queued = true;
            if client.is_stalled() {
                self.stalls
                    .on_more_queued(client, *now.get_or_insert_with(Instant::now));
            }
            self.schedule(client);
        }
        if let (Some(t), true) = (first_read, queued) {
            let mut awaiting = self.awaiting_write.borrow_mut();
            if awaiting.len() < MAX_AWAITING_WRITE {
                awaiting.push(t);
            }
        }
    }

    /// The flush task wrote to a socket: every batch queued since the last such write has
    /// now reached its first one (docs/protocol.md#observability, `relay_delay`).
    fn on_first_write(&self) {
        let mut awaiting = self.awaiting_write.borrow_mut();
        if awaiting.is_empty() {
            return;
        }
        let now = Instant::now();
        for t in awaiting.drain(..) {
            self.stats.relay_delay.observe(now.saturating_duration_since(t));
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
        if self.schedule.offer(client, client.queued_bytes()) {
            // The flush task may be parked with nothing to do (a peer's batch).
            self.flush_wanted.notify();
        }
    }

    /// The write pass: writes every listed recipient that can take a write now. True if it
    /// wrote to any.
    fn write_due(&self) -> bool {
        let clients = self.schedule.take_due();
        let mut wrote = false;
        for client in &clients {
            if client.is_closing() || client.writer_busy() {
                continue;
            }
            wrote = true;
            match client.write_now(&self.stats) {
                WriteOutcome::Done => self.on_first_write(),
                WriteOutcome::Stalled => {
                    self.on_first_write();
                    self.stalls.on_stall(client);
                }
                WriteOutcome::Failed => client.request_close(CloseReason::WriteError),
            }
        }
        self.schedule.recycle(clients);
        wrote
    }

    /// Records a pass that started at `start` and spent `writing` on its writes (it sets
    /// when the next may start, see `pacing`); `wrote`: it wrote to someone.
    fn on_pass(&self, start: Instant, writing: Duration, wrote: bool) {
        self.schedule.on_pass(start, writing, wrote);
    }

    /// Tells stall tracking what the writer half's last write did.
    pub fn on_written(&self, client: &Rc<Client>, written: Written) {
        match written {
            Written::Partial => self.on_refused(client),
            Written::Job => {}
            Written::CaughtUp => self.stalls.on_caught_up(client),
        }
    }

    /// The writer half found the socket refusing data.
    pub fn on_refused(&self, client: &Rc<Client>) {
        if client.mark_stalled() {
            self.stalls.on_stall(client);
        }
    }

    /// When the flush task runs next; readers in the ready set go back to readiness if that
    /// is not soon.
    fn next_run(&self) -> NextRun {
        let lines = !self.outgoing.is_empty();
        let next = self
            .schedule
            .next_run(lines, self.reads.turn_waiting(), self.reads.ready_set_waiting());
        self.reads.set_next_run(next, !self.schedule.window().is_zero(), |id| {
            self.wake_reader(id);
        });
        next
    }

    /// At the start of a pass: wakes the readers in the ready set whose socket is readable
    /// and those waiting for their turn. True if any reader was let go.
    fn release_readers(&self) -> bool {
        let woken = self.reads.wake_ready(|id| self.wake_reader(id));
        let turns = self.reads.release_turn();
        woken || turns
    }

    fn flush_wanted(&self) -> &Notify {
        &self.flush_wanted
    }

    /// The flush window: write passes are at least this far apart, and a sender that
    /// sends again within it is read at the next pass (zero without a window).
    pub fn flush_window(&self) -> Duration {
        self.schedule.window()
    }

    /// Wakes client `id`'s reader, if it is still connected.
    fn wake_reader(&self, id: u64) -> bool {
        self.clients.borrow().get(&id).map(|c| c.wake_reader()).is_some()
    }

    /// Asks every client idle for `timeout` at `now` to close (docs/protocol.md#idle-timeout).
    pub fn sweep_idle(&self, timeout: Duration, now: Instant) {
        for client in self.clients.borrow().values() {
            if now.saturating_duration_since(client.last_inbound()) >= timeout {
                client.request_close(CloseReason::IdleTimeout);
            }
        }
    }

    /// Starts this shard's drain: every client stops reading (its task sees the close
    /// request before it reads again) and the flush task sends what is left, then stops.
    pub fn begin_shutdown(&self) {
        self.drain.begin();
        for client in self.clients.borrow().values() {
            client.request_close(CloseReason::Shutdown);
        }
        self.flush_wanted.notify();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.drain.is_started()
    }

    pub fn drain(&self) -> &Rc<Drain> {
        &self.drain
    }
}

/// A client's membership in its shard's fan-out: it leaves (registry, ready set, slot,
/// stall tracking) when this is dropped, however its connection ends.
pub struct Membership {
    fanout: Rc<Fanout>,
    client: Rc<Client>,
}

impl Membership {
    pub fn client(&self) -> &Rc<Client> {
        &self.client
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.fanout.leave(&self.client);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::machine::Machine;

    /// A client closing for shutdown takes envelopes up to `max_pending_bytes`; what comes
    /// after is dropped as `recipient_gone`, since no slow-consumer close happened.
    #[test]
    fn a_shutdown_flush_over_the_byte_bound_drops_as_recipient_gone_not_slow_consumer() {
        let config = Config {
            max_pending_bytes: 4096,
            ..Config::defaults_for(&Machine::detect())
        };
        let shared = Arc::new(Shared::new(config));
        let stats = shared.stats[0].clone();
        let fanout = Rc::new(Fanout::new(0, shared, stats.clone(), Drain::new()));
        let member = fanout.join("127.0.0.1:7".parse().unwrap(), std::rc::Weak::new());
        member.client().request_close(CloseReason::Shutdown);
        let line = "z".repeat(5000);
        fanout.deliver(Arc::new(Batch::of(&[(99, line.as_str())], "127.0.0.1:8")));
        assert!(
            member.client().queued_bytes() > 4096,
            "the first batch is taken for the flush"
        );
        fanout.deliver(Arc::new(Batch::of(&[(99, "a"), (99, "b")], "127.0.0.1:8")));
        assert_eq!(stats.dropped(DropReason::RecipientGone), 2);
        assert_eq!(stats.dropped(DropReason::SlowConsumer), 0);
    }
}
