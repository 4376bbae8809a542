//! One client as fan-out and its own connection task share it: its outbox, the socket
//! writes that drain it, its standing with the backpressure policy, its place in the write
//! schedule, and its close request.
//!
//! Below `fanout` and `connection`, and calling neither: a write returns what happened
//! ([`WriteOutcome`], [`Written`]) and the caller (the flush task, or the connection's
//! writer half) tells the shard's stall tracking. Every field is private to this file;
//! the outbox itself is in `client/outbox.rs`.

mod outbox;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use crate::backpressure::{Lag, Policy, Verdict};
use crate::batch::LocalBatch;
use crate::metrics::{CloseReason, ConnStats, ShardStats};
use crate::notify::Notify;
use crate::pacing::{Entry, Scheduled};
use crate::socket::Socket;
use outbox::{InFlight, Outbox, Segment, WriteJob, MAX_WRITE_BYTES};

pub use outbox::SEGMENT_COST;

/// Most queued stretches one direct write hands the kernel.
const MAX_IOVECS: usize = 64;

/// What a direct write from the flush task ([`Client::write_now`]) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Everything queued is on the socket.
    Done,
    /// The socket refused data: the client is now stalled and its writer half, woken,
    /// waits for room and drains the rest.
    Stalled,
    /// The socket failed; the client should close (`write_error`).
    Failed,
}

/// What one write of the job in progress did (see [`Client::on_written`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Part of the job is still to be written.
    Partial,
    /// The job is written (more may be queued).
    Job,
    /// The job is written, nothing else is queued, and the client was stalled: it has
    /// caught up.
    CaughtUp,
}

/// The state fan-out and policies share with one connection's task.
pub struct Client {
    /// Unique per process: the shard id in the top bits, never 0.
    pub id: u64,
    pub addr: SocketAddr,
    /// `addr` as the envelope's `remote_addr` shows it.
    pub remote_addr: Box<str>,
    /// The socket, for direct writes from the shard's flush task. The connection task owns
    /// it: once that has closed it, nothing here can reach it (or a reused descriptor).
    socket: Weak<Socket>,
    /// Its place in the shard's write schedule (owned by `pacing::Schedule`).
    entry: Entry,
    outbox: RefCell<Outbox>,
    /// The socket refused data and has not taken everything since
    /// (docs/protocol.md#backpressure).
    stalled: Cell<bool>,
    /// Where it stands with the backpressure policy while stalled; its shard observes it.
    lag: Cell<Lag>,
    /// When the last inbound bytes arrived (idle timeout).
    last_inbound: Cell<Instant>,
    /// Wakes the writer half, which drains the outbox while the socket is stalled.
    writer_wake: Notify,
    /// Wakes the reader half while it waits in the shard's ready set.
    reader_wake: Notify,
    /// Set by a policy to end the connection; `close_wake` tells the connection task.
    close_request: Cell<Option<CloseReason>>,
    close_wake: Notify,
    /// Its figures for `/connections`; its shard's `ShardStats::connections` holds the
    /// other reference while it is open.
    pub conn: Arc<ConnStats>,
}

impl Scheduled for Client {
    fn entry(&self) -> &Entry {
        &self.entry
    }
}

impl Client {
    pub fn new(id: u64, addr: SocketAddr, socket: Weak<Socket>, entry: Entry) -> Self {
        Client {
            id,
            addr,
            remote_addr: addr.to_string().into_boxed_str(),
            socket,
            entry,
            outbox: RefCell::default(),
            stalled: Cell::new(false),
            lag: Cell::new(Lag::new(Instant::now())),
            last_inbound: Cell::new(Instant::now()),
            writer_wake: Notify::default(),
            reader_wake: Notify::default(),
            close_request: Cell::new(None),
            close_wake: Notify::default(),
            // The shard id is the top bits of `id`.
            conn: Arc::new(ConnStats::new(addr, (id >> 48) as usize)),
        }
    }

    /// Queues every envelope of `batch` this client did not send itself. A stalled client
    /// may hold its segments for long: a stretch much smaller than its batch is copied out,
    /// so that what the client pins is what `queued_bytes` counts.
    pub fn enqueue(&self, batch: &LocalBatch) {
        let mut outbox = self.outbox.borrow_mut();
        let stalled = self.stalled.get();
        batch.for_each_stretch_except(self.id, |start, end, count| {
            let segment = if stalled && (end - start) * 2 < batch.data.len() {
                Segment::copied(batch, start, end, count)
            } else {
                Segment::new(batch.clone(), start, end, count)
            };
            outbox.push(segment);
        });
        self.conn.queued_bytes.set(outbox.bytes() as u64);
    }

    /// True when the writer half owns the socket's output: a write is in progress or the
    /// socket refused data. The flush task then leaves this client to it.
    pub fn writer_busy(&self) -> bool {
        self.stalled.get() || self.outbox.borrow().in_flight().is_some()
    }

    pub fn wake_writer(&self) {
        self.writer_wake.notify();
    }

    /// Waits until the flush task (or a direct write that stalled) wakes the writer half.
    pub async fn writer_woken(&self) {
        self.writer_wake.wait().await;
    }

    pub fn wake_reader(&self) {
        self.reader_wake.notify();
    }

    /// Waits until the flush task wakes this reader (from the ready set). A wake-up given
    /// before this call is stale and not counted.
    pub async fn reader_woken(&self) {
        self.reader_wake.clear();
        self.reader_wake.wait().await;
    }

    /// The socket, while its connection task has it open.
    pub fn socket(&self) -> Option<Rc<Socket>> {
        self.socket.upgrade()
    }

    /// Writes what is queued with as few `sendmsg` calls as the socket allows, without
    /// waiting. What the socket refuses goes to the writer half, which waits for room.
    /// Only for a client that is not closing and whose writer is not busy.
    pub fn write_now(&self, stats: &ShardStats) -> WriteOutcome {
        debug_assert!(!self.is_closing() && !self.writer_busy());
        let Some(socket) = self.socket.upgrade() else {
            return WriteOutcome::Failed;
        };
        let mut outbox = self.outbox.borrow_mut();
        while !outbox.is_empty() {
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_IOVECS];
            let (mut parts, mut total) = (0, 0);
            for segment in outbox.segments().take(MAX_IOVECS) {
                let bytes = segment.bytes();
                if total > 0 && total + bytes.len() > MAX_WRITE_BYTES {
                    break;
                }
                iov[parts] = libc::iovec {
                    iov_base: bytes.as_ptr() as *mut libc::c_void,
                    iov_len: bytes.len(),
                };
                parts += 1;
                total += bytes.len();
            }
            // Every iovec points into a segment the outbox keeps alive during the call.
            let sent = match socket.try_write_gathered(&iov[..parts]) {
                Ok(sent) => sent,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return WriteOutcome::Failed,
            };
            let mut left = sent;
            stats.on_write(left);
            self.conn.bytes_out.add(left as u64);
            while let Some(len) = outbox.front_len() {
                if len > left {
                    break;
                }
                left -= len;
                let done = outbox.pop().expect("front_len() was Some");
                stats.on_delivered(done.count() as u64);
                self.conn.envelopes_out.add(done.count() as u64);
            }
            if left > 0 {
                let partial = outbox.pop().expect("a partly written segment is queued");
                outbox.set_in_flight(InFlight::new(WriteJob::Single(partial), left));
            }
            if sent < total {
                break;
            }
        }
        self.conn.queued_bytes.set(outbox.bytes() as u64);
        if outbox.is_empty() && outbox.in_flight().is_none() {
            return WriteOutcome::Done;
        }
        // The socket is full: the writer half waits for room and drains the rest.
        self.stalled.set(true);
        self.writer_wake.notify();
        WriteOutcome::Stalled
    }

    /// Polls one write of the job in progress to `stream`; `Ready(None)` when there is no
    /// job. The outbox is borrowed only inside this call.
    pub fn poll_write_in_flight(&self, cx: &mut Context<'_>, socket: &Socket) -> Poll<Option<std::io::Result<usize>>> {
        let outbox = self.outbox.borrow();
        let Some(f) = outbox.in_flight() else {
            return Poll::Ready(None);
        };
        socket.poll_write(cx, f.rest()).map(Some)
    }

    /// Marks the socket as refusing data; true if it was not already (the shard's stall
    /// tracking should then hear of it).
    pub fn mark_stalled(&self) -> bool {
        !self.stalled.replace(true)
    }

    /// Records `n` bytes of the job in progress written at `now`.
    pub fn on_written(&self, n: usize, stats: &ShardStats, now: Instant) -> Written {
        stats.on_write(n);
        self.conn.bytes_out.add(n as u64);
        if self.stalled.get() {
            self.update_lag(|lag| lag.on_progress(now));
        }
        let mut outbox = self.outbox.borrow_mut();
        let f = outbox.in_flight_mut().expect("a write is in progress");
        f.advance(n);
        if !f.is_done() {
            self.conn.queued_bytes.set(outbox.bytes() as u64);
            return Written::Partial;
        }
        let count = f.count();
        outbox.take_in_flight();
        stats.on_delivered(count);
        self.conn.envelopes_out.add(count);
        self.conn.queued_bytes.set(outbox.bytes() as u64);
        // Caught up only once the socket has taken everything queued, not one job of it.
        if outbox.is_empty() && self.stalled.replace(false) {
            Written::CaughtUp
        } else {
            Written::Job
        }
    }

    /// Moves the next queued job into the write in progress; false when nothing is queued.
    pub fn start_next_job(&self) -> bool {
        self.outbox.borrow_mut().start_next_job()
    }

    pub fn is_stalled(&self) -> bool {
        self.stalled.get()
    }

    pub fn lag_on_stall(&self, now: Instant) {
        self.update_lag(|lag| lag.on_stall(now));
    }

    pub fn lag_on_caught_up(&self, now: Instant) {
        self.update_lag(|lag| lag.on_caught_up(now));
        self.conn.set_stage(crate::backpressure::Stage::None);
    }

    /// Applies `policy` to this client's standing, as its shard measured it.
    pub fn observe_lag(&self, policy: &Policy, depth: u64, bytes: usize, crowd_behind: bool, now: Instant) -> Verdict {
        let mut lag = self.lag.get();
        let verdict = policy.observe(&mut lag, depth, bytes, crowd_behind, now);
        self.lag.set(lag);
        self.conn.set_stage(verdict.stage);
        verdict
    }

    fn update_lag(&self, f: impl FnOnce(&mut Lag)) {
        let mut lag = self.lag.get();
        f(&mut lag);
        self.lag.set(lag);
    }

    /// `d`: messages queued while the socket refuses data; 0 while it keeps up.
    pub fn stalled_depth(&self) -> u64 {
        if self.stalled.get() {
            self.outbox.borrow().msgs()
        } else {
            0
        }
    }

    /// Bytes the socket has taken since the connection opened (`/connections`'
    /// `bytes_out`): proof that it reads once past what the kernel can hold for a peer that
    /// does not (quarantine strikes).
    pub fn accepted_bytes(&self) -> u64 {
        self.conn.bytes_out.get()
    }

    /// `b`: bytes queued and not yet accepted by the socket.
    pub fn queued_bytes(&self) -> usize {
        self.outbox.borrow().bytes()
    }

    /// At close: envelopes that will never be written. Those of a half-written job that
    /// did go out completely are counted as delivered.
    pub fn settle(&self, stats: &ShardStats) -> u64 {
        let mut outbox = self.outbox.borrow_mut();
        let in_flight = outbox.take_in_flight();
        let lost_in_flight = in_flight.as_ref().map_or(0, InFlight::unwritten_envelopes);
        if let Some(f) = &in_flight {
            stats.on_delivered(f.count() - lost_in_flight);
            self.conn.envelopes_out.add(f.count() - lost_in_flight);
        }
        outbox.queued_msgs() + lost_in_flight
    }

    /// True once any close has been requested.
    pub fn is_closing(&self) -> bool {
        self.close_request.get().is_some()
    }

    pub fn last_inbound(&self) -> Instant {
        self.last_inbound.get()
    }

    /// Records inbound bytes at `now`; returns when the previous ones came.
    pub fn on_inbound(&self, now: Instant) -> Instant {
        self.last_inbound.replace(now)
    }

    /// Asks the connection task to close with `reason` (the first request wins).
    pub fn request_close(&self, reason: CloseReason) {
        if self.close_request.get().is_none() {
            self.close_request.set(Some(reason));
            self.close_wake.notify();
        }
    }

    /// Resolves with the close reason once a close has been requested.
    pub async fn close_requested(&self) -> CloseReason {
        loop {
            if let Some(reason) = self.close_request.get() {
                return reason;
            }
            self.close_wake.wait().await;
        }
    }

    /// The close reason if this client takes no more envelopes. A client closing for
    /// shutdown still takes them: they are flushed before N3.
    pub fn refusing_envelopes(&self) -> Option<CloseReason> {
        self.close_request.get().filter(|r| *r != CloseReason::Shutdown)
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::*;
    use crate::batch::{Batch, Ledger};

    fn batch_from(lines: &[(u64, &str)]) -> LocalBatch {
        Ledger::detached().pin(std::sync::Arc::new(Batch::of(lines, "127.0.0.1:1")))
    }

    fn client(id: u64) -> Client {
        Client::new(id, "127.0.0.1:2".parse().unwrap(), Weak::new(), Entry::new())
    }

    #[test]
    fn a_stalled_client_does_not_pin_big_batches_for_small_stretches() {
        let client = client(7);
        let own = "o".repeat(100_000);
        let batch = batch_from(&[(7, own.as_str()), (8, "small")]);
        client.enqueue(&batch);
        assert!(
            Rc::ptr_eq(client.outbox.borrow().segments().next().unwrap().batch(), &batch),
            "healthy: shared, no copy"
        );
        client.stalled.set(true);
        client.enqueue(&batch);
        let outbox = client.outbox.borrow();
        let copied = outbox.segments().nth(1).unwrap();
        assert!(!Rc::ptr_eq(copied.batch(), &batch), "stalled: copied out");
        assert_eq!(copied.batch().data.len(), copied.bytes().len());
        assert_eq!(outbox.msgs(), 2);
    }

    #[test]
    fn the_ledger_counts_each_batch_once_and_every_entry_until_written() {
        let batch = batch_from(&[(1, "aaaa"), (2, "bbbb")]);
        let ledger = batch.ledger().clone();
        let len = batch.data.len() as u64;
        assert_eq!(ledger.bytes(), len);
        let clients: Vec<Client> = (10..13).map(client).collect();
        for c in &clients {
            c.enqueue(&batch);
        }
        assert_eq!(
            ledger.bytes(),
            len + 3 * SEGMENT_COST,
            "shared bytes once, entries each"
        );
        drop(batch);
        assert_eq!(ledger.bytes(), len + 3 * SEGMENT_COST, "still queued");
        clients[0].outbox.borrow_mut().pop();
        assert_eq!(ledger.bytes(), len + 2 * SEGMENT_COST);
        drop(clients);
        assert_eq!(ledger.bytes(), 0, "everything released");
    }

    #[test]
    fn a_stalled_clients_depth_does_not_count_an_envelope_already_written() {
        let batch = batch_from(&[(1, "aaaa"), (2, "bbbb"), (3, "cccc")]);
        let client = client(9);
        let job = WriteJob::Single(Segment::new(batch.clone(), 0, batch.data.len(), 3));
        let first_end = memchr::memchr(b'\n', job.bytes()).unwrap() + 1;
        client.outbox.borrow_mut().set_in_flight(InFlight::new(job, first_end));
        assert_eq!(client.stalled_depth(), 0, "keeping up: d is 0");
        client.stalled.set(true);
        assert_eq!(client.stalled_depth(), 2);
        let stats = ShardStats::default();
        let rest = client.queued_bytes();
        assert_eq!(client.on_written(rest, &stats, Instant::now()), Written::CaughtUp);
        assert!(!client.is_stalled());
        assert_eq!(client.stalled_depth(), 0);
    }
}
