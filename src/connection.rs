//! One client connection: a reader half that frames lines into the shard's outgoing batch
//! (through the token bucket), a writer half that drains the client's outbox with as few
//! socket writes as possible, and the close path (final flush at shutdown, notice,
//! lingering close, counters, log line).
//!
//! Both halves run in one task, sharing the stream through a `RefCell` that is borrowed
//! only inside a single `poll_*` call, never across an `.await`. The reader reads into the
//! shard's scratch buffer and keeps only an unfinished line, so an idle connection holds no
//! buffer. A panic anywhere in the connection closes this connection only.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_lite::future::{or, poll_fn};
use futures_lite::{AsyncRead, AsyncWrite, FutureExt};
use glommio::net::TcpStream;
use tracing::info;

use crate::backpressure::{Lag, Policy, Stage, Verdict};
use crate::fanout::LocalBatch;
use crate::limiter::{Decision, TokenBucket};
use crate::metrics::{CloseReason, DropReason};
use crate::notify::Notify;
use crate::protocol::{self, FrameError, Framer};
use crate::shard::{undelivered_reason, Shard};

/// Most bytes gathered into one socket write when several batches are queued.
const MAX_WRITE_BYTES: usize = 256 << 10;
/// Most queued stretches one direct write hands the kernel.
const MAX_IOVECS: usize = 64;
/// Read turns in a row that may find nothing before a reader waits for readiness again: a
/// sender that writes in bursts a little further apart than read rounds stays on turns.
const EMPTY_TURNS: u32 = 2;
/// Bound on sending a closing notice and draining unread input before the final close.
const FAREWELL_TIMEOUT: Duration = Duration::from_millis(500);
/// Unread input discarded after a notice, so that closing does not turn into a reset
/// that destroys the notice in flight.
const LINGER_READ_BYTES: usize = 256 << 10;

/// What one outbox entry costs beyond its bytes (the entry and its queue slot), charged
/// to the shard's ledger so that many recipients with many small entries are bounded too.
const SEGMENT_COST: u64 = std::mem::size_of::<Segment>() as u64 + 16;

/// A stretch of one batch queued for this client, counted in its shard's ledger.
struct Segment {
    batch: LocalBatch,
    start: usize,
    end: usize,
    /// Envelopes in the stretch (0 for a notice).
    count: u32,
}

impl Segment {
    fn new(batch: LocalBatch, start: usize, end: usize, count: u32) -> Self {
        batch.ledger().add(SEGMENT_COST);
        Segment {
            batch,
            start,
            end,
            count,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.batch.data[self.start..self.end]
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.batch.ledger().sub(SEGMENT_COST);
    }
}

/// A write job some of whose bytes may already be on the socket. It lives on the
/// [`Client`], not in the writer future, so a close that cancels the writer can still
/// finish it (shutdown flush, closing notice) and count it exactly.
struct InFlight {
    job: WriteJob,
    /// Bytes already written.
    done: usize,
    /// Envelopes (and notices) not yet completely written.
    unwritten: u64,
}

impl InFlight {
    fn new(job: WriteJob, done: usize) -> Self {
        let unwritten = job.count();
        let mut f = InFlight {
            job,
            done: 0,
            unwritten,
        };
        f.advance(done);
        f
    }

    /// Records `n` more bytes written. Every envelope (and notice) ends with the only raw
    /// `\n` it contains, so each `\n` written completes one.
    fn advance(&mut self, n: usize) {
        let written = &self.job.bytes()[self.done..self.done + n];
        let completed = memchr::memchr_iter(b'\n', written).count() as u64;
        self.unwritten = self.unwritten.saturating_sub(completed);
        self.done += n;
    }

    fn unwritten_envelopes(&self) -> u64 {
        self.unwritten
    }
}

/// Envelopes queued for one client and not yet handed to the writer.
#[derive(Default)]
struct Outbox {
    segments: VecDeque<Segment>,
    /// Bytes in `segments`.
    bytes: usize,
    /// Envelopes in `segments`.
    msgs: u64,
}

/// What the writer sends next: one queued stretch as it is, or several copied together.
enum WriteJob {
    Single(Segment),
    Gathered { bytes: Vec<u8>, count: u64 },
}

impl WriteJob {
    fn bytes(&self) -> &[u8] {
        match self {
            WriteJob::Single(s) => s.bytes(),
            WriteJob::Gathered { bytes, .. } => bytes,
        }
    }

    fn count(&self) -> u64 {
        match self {
            WriteJob::Single(s) => s.count as u64,
            WriteJob::Gathered { count, .. } => *count,
        }
    }
}

impl Outbox {
    fn pop(&mut self) -> Option<Segment> {
        let s = self.segments.pop_front()?;
        self.bytes -= s.bytes().len();
        self.msgs -= s.count as u64;
        Some(s)
    }

    fn take_job(&mut self) -> Option<WriteJob> {
        let first = self.pop()?;
        if self.segments.is_empty() || first.bytes().len() >= MAX_WRITE_BYTES {
            return Some(WriteJob::Single(first));
        }
        let mut bytes = Vec::with_capacity(self.bytes.min(MAX_WRITE_BYTES) + first.bytes().len());
        bytes.extend_from_slice(first.bytes());
        let mut count = first.count as u64;
        while self
            .segments
            .front()
            .is_some_and(|next| bytes.len() + next.bytes().len() <= MAX_WRITE_BYTES)
        {
            let next = self.pop().expect("front() was Some");
            bytes.extend_from_slice(next.bytes());
            count += next.count as u64;
        }
        Some(WriteJob::Gathered { bytes, count })
    }
}

/// Where a client stands in its shard's write schedule (see `pacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sched {
    /// Not in any list.
    Idle,
    /// In its slot's list, waiting for its next period.
    Waiting,
    /// In the list written at the next tick.
    Due,
}

/// The state fan-out and policies share with one connection's task.
pub struct Client {
    /// Unique per process: the shard id in the top bits, never 0.
    pub id: u64,
    pub addr: SocketAddr,
    /// The socket, for direct writes from the shard's flush task. Valid while the client
    /// is not closing: the connection task marks it closing before it closes the socket.
    fd: RawFd,
    /// This client's slot in the staggered write schedule.
    pub slot: u64,
    /// The last period in which the flush task wrote to this client (0: never).
    pub written_period: Cell<u64>,
    pub sched: Cell<Sched>,
    /// `addr` as the envelope's `remote_addr` shows it.
    pub remote_addr: Box<str>,
    outbox: RefCell<Outbox>,
    /// The write in progress, taken from the outbox.
    in_flight: RefCell<Option<InFlight>>,
    /// The socket refused data and has not taken everything since (docs/protocol.md,
    /// "Backpressure").
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
}

impl Client {
    pub fn new(id: u64, addr: SocketAddr, fd: RawFd, slot: u64) -> Self {
        Client {
            id,
            addr,
            fd,
            slot,
            written_period: Cell::new(0),
            sched: Cell::new(Sched::Idle),
            remote_addr: addr.to_string().into_boxed_str(),
            outbox: RefCell::default(),
            in_flight: RefCell::new(None),
            stalled: Cell::new(false),
            lag: Cell::new(Lag::new(Instant::now())),
            last_inbound: Cell::new(Instant::now()),
            writer_wake: Notify::default(),
            reader_wake: Notify::default(),
            close_request: Cell::new(None),
            close_wake: Notify::default(),
        }
    }

    /// Queues every envelope of `batch` this client did not send itself. A stalled client
    /// may hold its segments for long: a stretch much smaller than its batch is copied out,
    /// so that what the client pins is what `queued_bytes` counts.
    pub fn enqueue(&self, batch: &LocalBatch) {
        let mut outbox = self.outbox.borrow_mut();
        let stalled = self.stalled.get();
        batch.for_each_stretch_except(self.id, |start, end, count| {
            let len = end - start;
            let segment = if stalled && len * 2 < batch.data.len() {
                let data = batch.data[start..end].to_vec();
                let runs = vec![crate::fanout::Run {
                    origin: 0,
                    end: len,
                    count,
                }];
                let own = batch
                    .ledger()
                    .pin(std::sync::Arc::new(crate::fanout::Batch { data, runs }));
                Segment::new(own, 0, len, count)
            } else {
                Segment::new(batch.clone(), start, end, count)
            };
            outbox.bytes += len;
            outbox.msgs += count as u64;
            outbox.segments.push_back(segment);
        });
    }

    /// True when the writer half owns the socket's output: a write is in progress or the
    /// socket refused data. The flush task then leaves this client to it.
    pub fn writer_busy(&self) -> bool {
        self.stalled.get() || self.in_flight.borrow().is_some()
    }

    pub fn wake_writer(&self) {
        self.writer_wake.notify();
    }

    pub fn wake_reader(&self) {
        self.reader_wake.notify();
    }

    /// The socket, while the client is not closing (see `fd`).
    pub fn raw_fd(&self) -> RawFd {
        self.fd
    }

    /// Writes what is queued with as few `sendmsg` calls as the socket allows, without
    /// waiting. What the socket refuses goes to the writer half, which waits for room.
    /// Only for a client that is not closing and whose writer is not busy.
    pub fn write_now(&self, shard: &Shard) {
        debug_assert!(!self.is_closing() && !self.writer_busy());
        let mut outbox = self.outbox.borrow_mut();
        while !outbox.segments.is_empty() {
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_IOVECS];
            let (mut parts, mut total) = (0, 0);
            for segment in outbox.segments.iter().take(MAX_IOVECS) {
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
            // SAFETY: an all-zero msghdr is valid; it points at `iov`, which outlives the call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = parts as _;
            // SAFETY: `fd` is this client's open socket (it is not closing), and every iovec
            // points into a segment the outbox keeps alive during the call.
            let sent = unsafe { sendmsg(self.fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
            if sent < 0 {
                match std::io::Error::last_os_error().kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    std::io::ErrorKind::WouldBlock => break,
                    _ => {
                        drop(outbox);
                        self.request_close(CloseReason::WriteError);
                        return;
                    }
                }
            }
            let mut left = sent as usize;
            shard.stats.on_write(left);
            while let Some(front) = outbox.segments.front() {
                let len = front.bytes().len();
                if len > left {
                    break;
                }
                left -= len;
                let done = outbox.pop().expect("front() was Some");
                shard.stats.on_delivered(done.count as u64);
            }
            if left > 0 {
                let partial = outbox.pop().expect("a partly written segment is queued");
                *self.in_flight.borrow_mut() = Some(InFlight::new(WriteJob::Single(partial), left));
            }
            if (sent as usize) < total {
                break;
            }
        }
        if outbox.segments.is_empty() && self.in_flight.borrow().is_none() {
            return;
        }
        drop(outbox);
        // The socket is full: the writer half waits for room and drains the rest.
        self.stalled.set(true);
        shard.on_stall(self);
        self.writer_wake.notify();
    }

    pub fn is_stalled(&self) -> bool {
        self.stalled.get()
    }

    pub fn lag_on_stall(&self, now: Instant) {
        self.update_lag(|lag| lag.on_stall(now));
    }

    pub fn lag_on_caught_up(&self, now: Instant) {
        self.update_lag(|lag| lag.on_caught_up(now));
    }

    /// Applies `policy` to this client's standing, as its shard measured it.
    pub fn observe_lag(&self, policy: &Policy, depth: u64, bytes: usize, now: Instant) -> Verdict {
        let mut lag = self.lag.get();
        let verdict = policy.observe(&mut lag, depth, bytes, now);
        self.lag.set(lag);
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
            self.queued_msgs()
        } else {
            0
        }
    }

    /// `b`: bytes queued and not yet accepted by the socket.
    pub fn queued_bytes(&self) -> usize {
        let in_flight = self
            .in_flight
            .borrow()
            .as_ref()
            .map_or(0, |f| f.job.bytes().len() - f.done);
        self.outbox.borrow().bytes + in_flight
    }

    fn queued_msgs(&self) -> u64 {
        self.outbox.borrow().msgs
            + self
                .in_flight
                .borrow()
                .as_ref()
                .map_or(0, InFlight::unwritten_envelopes)
    }

    /// At close: envelopes that will never be written. Those of a half-written job that
    /// did go out completely are counted as delivered.
    fn settle(&self, shard: &Shard) -> u64 {
        let in_flight = self.in_flight.borrow_mut().take();
        let lost_in_flight = in_flight.as_ref().map_or(0, InFlight::unwritten_envelopes);
        if let Some(f) = &in_flight {
            shard.stats.on_delivered(f.job.count() - lost_in_flight);
        }
        self.outbox.borrow().msgs + lost_in_flight
    }

    /// True once any close has been requested.
    pub fn is_closing(&self) -> bool {
        self.close_request.get().is_some()
    }

    pub fn last_inbound(&self) -> Instant {
        self.last_inbound.get()
    }

    /// Asks the connection task to close with `reason` (the first request wins).
    pub fn request_close(&self, reason: CloseReason) {
        if self.close_request.get().is_none() {
            self.close_request.set(Some(reason));
            self.close_wake.notify();
        }
    }

    /// The close reason if this client takes no more envelopes. A client closing for
    /// shutdown still takes them: they are flushed before N3.
    pub fn refusing_envelopes(&self) -> Option<CloseReason> {
        self.close_request.get().filter(|r| *r != CloseReason::Shutdown)
    }
}

/// Runs one admitted connection to its end. The connection slot taken at admission is
/// given back when this returns.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream, addr: SocketAddr) {
    let client = shard.register(addr, stream.as_raw_fd());
    let registration = Registration {
        shard: &shard,
        client: &client,
    };
    info!("client connected: {addr} (shard {})", shard.id);
    if shard.is_shutting_down() {
        client.request_close(CloseReason::Shutdown);
    }
    let stream = RefCell::new(stream);
    let halves = or(
        wait_for_close_request(&client),
        or(
            read_half(&shard, &client, &stream),
            write_half(&shard, &client, &stream),
        ),
    );
    let mut reason = match AssertUnwindSafe(halves).catch_unwind().await {
        Ok(reason) => reason,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!("panic while handling {addr}: {what}; closing this connection only");
            CloseReason::InternalError
        }
    };
    // From here the flush task no longer writes to the socket directly.
    client.request_close(reason);
    if reason == CloseReason::Shutdown {
        // Everything already relayed reaches this client before N3.
        shard.deliveries_finished().await;
        if let Err(e) = flush_outbox(&shard, &client, &stream).await {
            reason = e;
        }
    }
    let mut closing_notice = notice(reason, shard.config().max_line_bytes);
    if closing_notice.is_some() {
        // A notice must start on a line of its own: finish a half-written envelope first,
        // or send no notice at all.
        let finished = or(
            async { write_in_flight(&shard, &client, &stream).await.is_ok() },
            async {
                glommio::timer::sleep(FAREWELL_TIMEOUT).await;
                false
            },
        )
        .await;
        if !finished {
            closing_notice = None;
        }
    }
    let lost = client.settle(&shard);
    if lost > 0 {
        shard.stats.on_drop(undelivered_reason(reason), lost);
    }
    drop(registration);
    farewell(&stream, closing_notice).await;
    drop(stream);
    shard.stats.on_close(reason, true);
    shard.shared.release();
    shard.on_connection_closed();
    info!("client disconnected: {addr} ({reason})");
}

/// Turns away a connection over `max_connections` with N6 (docs/protocol.md#admission-and-accept-errors).
pub async fn refuse_full(shard: Rc<Shard>, stream: TcpStream) {
    let stream = RefCell::new(stream);
    farewell(&stream, notice(CloseReason::ServerFull, 0)).await;
    shard.stats.on_close(CloseReason::ServerFull, false);
    shard.on_refusal_done();
}

/// Removes the client from fan-out when the connection ends, however it ends.
struct Registration<'a> {
    shard: &'a Shard,
    client: &'a Client,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.shard.unregister(self.client);
    }
}

async fn wait_for_close_request(client: &Client) -> CloseReason {
    loop {
        if let Some(reason) = client.close_request.get() {
            return reason;
        }
        client.close_wake.wait().await;
    }
}

/// How a reader's next read happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NextRead {
    /// Wait for readiness (glommio's io_uring poll).
    Readiness,
    /// A plain `recv` at a read round (the flush task released the read turn).
    Turn,
    /// A plain `recv`: the flush task found the socket readable in the shard's ready set,
    /// or sent the reader back to readiness.
    Woken,
}

/// Reads into the shard's scratch buffer, frames lines, applies the token bucket and hands
/// lines to the shard; pauses when backpressure says so.
///
/// A read waits for readiness, except in two cases where it is a plain non-blocking `recv`
/// at the flush task's run, so that the lines join that run and no readiness poll (whose
/// completion would wake the shard) is armed:
/// - a sender that keeps sending is read at read rounds (see `Shard::read_turn`); after
///   [`EMPTY_TURNS`] turns in a row that find nothing it goes back to readiness;
/// - an occasional sender on a busy shard waits in the shard's ready set and is read at the
///   first run that finds its socket readable (see `Shard::read_at_runs`); when the shard
///   stops running often, it goes back to readiness.
async fn read_half(shard: &Shard, client: &Rc<Client>, stream: &RefCell<TcpStream>) -> CloseReason {
    let config = shard.config();
    let mut framer = Framer::new(config.max_line_bytes);
    let mut limiter = config
        .rate_limit_msgs_per_minute
        .map(|per_minute| TokenBucket::per_minute(per_minute, Instant::now()));
    let (mut next, mut empty_turns) = (NextRead::Readiness, 0);
    loop {
        while shard.outgoing_full() {
            shard.outgoing_drained.wait().await;
        }
        shard.wait_for_pending_room().await;
        // The scratch buffer is borrowed only inside this poll (or recv); its bytes are
        // consumed below before the next `.await`, so no other reader can overwrite them.
        let read = match std::mem::replace(&mut next, NextRead::Readiness) {
            NextRead::Readiness => {
                poll_fn(|cx| {
                    let mut scratch = shard.read_scratch.borrow_mut();
                    Pin::new(&mut *stream.borrow_mut()).poll_read(cx, &mut scratch)
                })
                .await
            }
            how => {
                // A statement of its own: the borrows must end before any `.await` below.
                let read = recv_now(stream.borrow().as_raw_fd(), &mut shard.read_scratch.borrow_mut());
                match read {
                    Some(read) => {
                        shard.stats.on_read_at_run();
                        read
                    }
                    None if how == NextRead::Turn => {
                        empty_turns += 1;
                        if empty_turns < EMPTY_TURNS {
                            shard.read_turn.wait().await;
                            next = NextRead::Turn;
                        }
                        continue;
                    }
                    // Sent back from the ready set with nothing to read.
                    None => continue,
                }
            }
        };
        let n = match read {
            Ok(n) => n,
            Err(_) => return CloseReason::ReadError,
        };
        let now = Instant::now();
        let previous_read = client.last_inbound.replace(now);
        shard.stats.on_read(n);
        let (mut relayed, mut notify) = (0u64, false);
        let mut on_line = |line: &str| match limiter.as_mut().map_or(Decision::Allow, |b| b.check(now)) {
            Decision::Allow => {
                relayed += 1;
                shard.relay(client, line);
            }
            Decision::Drop { notify: n } => {
                shard.stats.on_drop(DropReason::RateLimited, 1);
                notify |= n;
            }
        };
        let result = if n == 0 {
            framer.finish(&mut on_line)
        } else {
            let scratch = shard.read_scratch.borrow();
            framer.feed(&scratch[..n], &mut on_line)
        };
        if notify {
            shard.send_rate_limit_notice(client);
        }
        match result {
            Err(FrameError::LineTooLong) => {
                shard.stats.on_drop(DropReason::LineTooLong, 1);
                return CloseReason::LineTooLong;
            }
            Err(FrameError::InvalidUtf8) => {
                shard.stats.on_drop(DropReason::InvalidUtf8, 1);
                return CloseReason::InvalidUtf8;
            }
            Ok(()) if n == 0 => return CloseReason::PeerClosed,
            Ok(()) => {}
        }
        if relayed == 0 {
            // A socket with a backlog is readable every time: let timers and other tasks
            // run once the preempt period is up.
            glommio::executor().yield_if_needed().await;
        } else if shard.shared.stage() != Stage::None {
            shard.pause_sender().await;
        } else if relayed >= 2 || now.saturating_duration_since(previous_read) < shard.read_round_interval() {
            // A sender that keeps sending: read it again at the next read round, with all
            // that arrived by then.
            shard.leave_ready_set(client);
            shard.read_turn.wait().await;
            (next, empty_turns) = (NextRead::Turn, 0);
        } else if shard.read_at_runs(client) {
            // An occasional single line on a busy shard: read the next one at the run that
            // finds it. (Otherwise it waits for readiness: a read turn would only delay it.)
            // What the flush task reported before this read is stale now.
            client.reader_wake.clear();
            client.reader_wake.wait().await;
            next = NextRead::Woken;
        }
    }
}

/// `sendmsg(2)` through `syscall(2)`, as is the `recv` below: glibc's own wrappers are
/// thread-cancellation points and bracket every call with cancellation bookkeeping that a
/// shard thread, never cancelled, does not need (about 1 % of the relay's CPU at `T100x30`).
///
/// # Safety
/// As for `sendmsg(2)`: `fd` is open and `msg` points at valid iovecs.
unsafe fn sendmsg(fd: RawFd, msg: &libc::msghdr, flags: libc::c_int) -> isize {
    libc::syscall(libc::SYS_sendmsg, fd, msg as *const libc::msghdr, flags) as isize
}

/// One non-blocking `recv` into `buf`; `None` when the socket has nothing to read.
fn recv_now(fd: RawFd, buf: &mut [u8]) -> Option<std::io::Result<usize>> {
    loop {
        // SAFETY: `fd` is the connection's open socket and `buf` is writable for its length.
        let n = unsafe {
            libc::syscall(
                libc::SYS_recvfrom,
                fd,
                buf.as_mut_ptr(),
                buf.len(),
                libc::MSG_DONTWAIT,
                std::ptr::null_mut::<libc::sockaddr>(),
                std::ptr::null_mut::<libc::socklen_t>(),
            )
        };
        if n >= 0 {
            return Some(Ok(n as usize));
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock => return None,
            _ => return Some(Err(e)),
        }
    }
}

/// Drains the outbox whenever the flush task found the socket full, waiting for room.
async fn write_half(shard: &Shard, client: &Client, stream: &RefCell<TcpStream>) -> CloseReason {
    loop {
        client.writer_wake.wait().await;
        if let Err(reason) = flush_outbox(shard, client, stream).await {
            return reason;
        }
    }
}

/// Writes everything queued: one write per queued stretch, or several gathered into one.
async fn flush_outbox(shard: &Shard, client: &Client, stream: &RefCell<TcpStream>) -> Result<(), CloseReason> {
    loop {
        write_in_flight(shard, client, stream).await?;
        let Some(job) = client.outbox.borrow_mut().take_job() else {
            return Ok(());
        };
        *client.in_flight.borrow_mut() = Some(InFlight::new(job, 0));
    }
}

/// Finishes the client's in-flight job, if any, tracking whether its socket is stalled.
async fn write_in_flight(shard: &Shard, client: &Client, stream: &RefCell<TcpStream>) -> Result<(), CloseReason> {
    loop {
        // The job is borrowed only inside this poll, never across the await.
        let written = poll_fn(|cx| {
            let in_flight = client.in_flight.borrow();
            let Some(f) = in_flight.as_ref() else {
                return Poll::Ready(None);
            };
            let poll = Pin::new(&mut *stream.borrow_mut()).poll_write(cx, &f.job.bytes()[f.done..]);
            drop(in_flight);
            if poll.is_pending() && !client.stalled.replace(true) {
                shard.on_stall(client);
            }
            poll.map(Some)
        })
        .await;
        let n = match written {
            None => return Ok(()),
            Some(Ok(n)) if n > 0 => n,
            Some(_) => return Err(CloseReason::WriteError),
        };
        shard.stats.on_write(n);
        if client.stalled.get() {
            client.update_lag(|lag| lag.on_progress(Instant::now()));
        }
        let mut slot = client.in_flight.borrow_mut();
        let f = slot.as_mut().expect("the job is only taken here and at close");
        f.advance(n);
        if f.done < f.job.bytes().len() {
            drop(slot);
            if !client.stalled.replace(true) {
                shard.on_stall(client);
            }
            continue;
        }
        let count = f.job.count();
        *slot = None;
        drop(slot);
        shard.stats.on_delivered(count);
        // Caught up only once the socket has taken everything queued, not one job of it.
        if client.outbox.borrow().segments.is_empty() && client.stalled.replace(false) {
            shard.on_unstall(client);
        }
        return Ok(());
    }
}

/// The notice a client gets before the relay closes it, if any (docs/protocol.md#notices).
fn notice(reason: CloseReason, max_line_bytes: usize) -> Option<String> {
    Some(match reason {
        CloseReason::InvalidUtf8 => protocol::NOTICE_INVALID_UTF8.to_string(),
        CloseReason::LineTooLong => protocol::notice_line_too_long(max_line_bytes),
        CloseReason::IdleTimeout => protocol::NOTICE_IDLE.to_string(),
        CloseReason::Shutdown => protocol::NOTICE_SHUTDOWN.to_string(),
        CloseReason::ServerFull => protocol::NOTICE_SERVER_FULL.to_string(),
        _ => return None,
    })
}

/// Sends the closing notice, then half-closes and discards unread input for a moment so
/// that the kernel sends FIN rather than a reset that would destroy the notice in flight.
async fn farewell(stream: &RefCell<TcpStream>, notice: Option<String>) {
    let Some(text) = notice else {
        return;
    };
    let linger = async {
        let mut done = 0;
        while done < text.len() {
            match poll_fn(|cx| Pin::new(&mut *stream.borrow_mut()).poll_write(cx, &text.as_bytes()[done..])).await {
                Ok(n) if n > 0 => done += n,
                _ => return,
            }
        }
        // SAFETY: the fd is open for as long as `stream` lives; shutdown(2) does not block.
        unsafe { libc::shutdown(stream.borrow().as_raw_fd(), libc::SHUT_WR) };
        // On the heap: a buffer here would sit in every connection task's state.
        let mut sink = vec![0u8; 4096];
        let mut drained = 0;
        while drained < LINGER_READ_BYTES {
            match poll_fn(|cx| Pin::new(&mut *stream.borrow_mut()).poll_read(cx, &mut sink)).await {
                Ok(n) if n > 0 => drained += n,
                _ => return,
            }
        }
    };
    or(linger, glommio::timer::sleep(FAREWELL_TIMEOUT)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::BatchBuilder;

    fn batch_from(lines: &[(u64, &str)]) -> LocalBatch {
        let mut b = BatchBuilder::default();
        for (origin, line) in lines {
            b.push(*origin, line, "127.0.0.1:1");
        }
        crate::fanout::Ledger::detached().pin(std::sync::Arc::new(b.take()))
    }

    #[test]
    fn a_stalled_client_does_not_pin_big_batches_for_small_stretches() {
        let client = Client::new(7, "127.0.0.1:2".parse().unwrap(), -1, 0);
        let own = "o".repeat(100_000);
        let batch = batch_from(&[(7, own.as_str()), (8, "small")]);
        client.enqueue(&batch);
        assert!(
            Rc::ptr_eq(&client.outbox.borrow().segments[0].batch, &batch),
            "healthy: shared, no copy"
        );
        client.stalled.set(true);
        client.enqueue(&batch);
        let outbox = client.outbox.borrow();
        assert!(!Rc::ptr_eq(&outbox.segments[1].batch, &batch), "stalled: copied out");
        assert_eq!(outbox.segments[1].batch.data.len(), outbox.segments[1].bytes().len());
        assert_eq!(outbox.msgs, 2);
    }

    #[test]
    fn the_ledger_counts_each_batch_once_and_every_entry_until_written() {
        let batch = batch_from(&[(1, "aaaa"), (2, "bbbb")]);
        let ledger = batch.ledger().clone();
        let len = batch.data.len() as u64;
        assert_eq!(ledger.bytes(), len);
        let clients: Vec<Client> = (10..13)
            .map(|id| Client::new(id, "127.0.0.1:4".parse().unwrap(), -1, 0))
            .collect();
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
    fn a_half_written_job_counts_only_its_unwritten_envelopes_as_lost() {
        let batch = batch_from(&[(1, "aaaa"), (2, "bbbb"), (3, "cccc")]);
        let job = WriteJob::Single(Segment {
            batch: batch.clone(),
            start: 0,
            end: batch.data.len(),
            count: 3,
        });
        let first_end = memchr::memchr(b'\n', job.bytes()).unwrap() + 1;
        let mut f = InFlight::new(job, first_end + 3);
        // What a stalled client's depth `d` counts: not the envelope already written.
        let client = Client::new(9, "127.0.0.1:3".parse().unwrap(), -1, 0);
        *client.in_flight.borrow_mut() = Some(InFlight::new(
            WriteJob::Single(Segment {
                batch: batch.clone(),
                start: 0,
                end: batch.data.len(),
                count: 3,
            }),
            first_end,
        ));
        client.stalled.set(true);
        assert_eq!(client.stalled_depth(), 2);
        assert_eq!(f.unwritten_envelopes(), 2);
        let rest = f.job.bytes().len() - f.done;
        f.advance(rest);
        assert_eq!(f.unwritten_envelopes(), 0);
    }
}
