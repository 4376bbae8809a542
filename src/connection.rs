//! One client connection: a reader half that frames lines into the shard's outgoing batch,
//! a writer half that drains the client's outbox with as few socket writes as possible,
//! and the close path (notice, lingering close, counters, log line).
//!
//! Both halves run in one task, sharing the stream through a `RefCell` that is borrowed
//! only inside a single `poll_*` call, never across an `.await`. The reader reads into the
//! shard's scratch buffer and keeps only an unfinished line, so an idle connection holds no
//! buffer. A panic anywhere in the connection closes this connection only.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::future::{or, poll_fn};
use futures_lite::{AsyncRead, AsyncWrite, FutureExt};
use glommio::net::TcpStream;
use tracing::info;

use crate::fanout::LocalBatch;
use crate::metrics::CloseReason;
use crate::notify::Notify;
use crate::protocol::{self, FrameError, Framer};
use crate::shard::Shard;

/// Most bytes gathered into one socket write when several batches are queued.
const MAX_WRITE_BYTES: usize = 256 << 10;
/// Bound on sending a closing notice and draining unread input before the final close.
const FAREWELL_TIMEOUT: Duration = Duration::from_millis(500);
/// Unread input discarded after a notice, so that closing does not turn into a reset
/// that destroys the notice in flight.
const LINGER_READ_BYTES: usize = 256 << 10;

/// A stretch of one batch queued for this client.
struct Segment {
    batch: LocalBatch,
    start: u32,
    end: u32,
    /// Envelopes in the stretch.
    count: u32,
}

impl Segment {
    fn bytes(&self) -> &[u8] {
        &self.batch.data[self.start as usize..self.end as usize]
    }
}

/// Envelopes queued for one client and not yet written to its socket.
#[derive(Default)]
struct Outbox {
    segments: VecDeque<Segment>,
    /// Bytes in `segments`.
    bytes: usize,
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
    fn take_job(&mut self) -> Option<WriteJob> {
        let first = self.segments.pop_front()?;
        self.bytes -= first.bytes().len();
        if self.segments.is_empty() || first.bytes().len() >= MAX_WRITE_BYTES {
            return Some(WriteJob::Single(first));
        }
        let mut bytes = Vec::with_capacity(self.bytes.min(MAX_WRITE_BYTES) + first.bytes().len());
        bytes.extend_from_slice(first.bytes());
        let mut count = first.count as u64;
        while let Some(next) = self.segments.front() {
            if bytes.len() + next.bytes().len() > MAX_WRITE_BYTES {
                break;
            }
            bytes.extend_from_slice(next.bytes());
            count += next.count as u64;
            self.bytes -= next.bytes().len();
            self.segments.pop_front();
        }
        Some(WriteJob::Gathered { bytes, count })
    }
}

/// The state fan-out and policies share with one connection's task.
pub struct Client {
    /// Unique per process: the shard id in the top bits.
    pub id: u64,
    pub addr: SocketAddr,
    /// `addr` as the envelope's `remote_addr` shows it.
    pub remote_addr: Box<str>,
    outbox: RefCell<Outbox>,
    /// Wakes the writer half when the outbox goes from empty to non-empty.
    writer_wake: Notify,
    /// Set by a policy to end the connection; `close_wake` tells the connection task.
    close_request: Cell<Option<CloseReason>>,
    close_wake: Notify,
}

impl Client {
    pub fn new(id: u64, addr: SocketAddr) -> Self {
        Client {
            id,
            addr,
            remote_addr: addr.to_string().into_boxed_str(),
            outbox: RefCell::default(),
            writer_wake: Notify::default(),
            close_request: Cell::new(None),
            close_wake: Notify::default(),
        }
    }

    /// Queues every envelope of `batch` this client did not send itself.
    pub fn enqueue(&self, batch: &LocalBatch) {
        let mut outbox = self.outbox.borrow_mut();
        let was_empty = outbox.segments.is_empty();
        batch.for_each_stretch_except(self.id, |start, end, count| {
            outbox.bytes += (end - start) as usize;
            outbox.segments.push_back(Segment {
                batch: batch.clone(),
                start,
                end,
                count,
            });
        });
        if was_empty && !outbox.segments.is_empty() {
            drop(outbox);
            self.writer_wake.notify();
        }
    }

    /// Bytes queued and not yet written.
    pub fn outbox_bytes(&self) -> usize {
        self.outbox.borrow().bytes
    }

    /// Asks the connection task to close with `reason` (the first request wins).
    pub fn request_close(&self, reason: CloseReason) {
        if self.close_request.get().is_none() {
            self.close_request.set(Some(reason));
            self.close_wake.notify();
        }
    }
}

/// Runs one accepted connection to its end.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream, addr: SocketAddr) {
    let client = shard.register(addr);
    let registration = Registration {
        shard: &shard,
        client: &client,
    };
    info!("client connected: {addr} (shard {})", shard.id);
    let stream = RefCell::new(stream);
    let halves = or(
        wait_for_close_request(&client),
        or(
            read_half(&shard, &client, &stream),
            write_half(&shard, &client, &stream),
        ),
    );
    let reason = match AssertUnwindSafe(halves).catch_unwind().await {
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
    drop(registration);
    farewell(&stream, reason, shard.config.max_line_bytes).await;
    shard.stats.on_close(reason, true);
    info!("client disconnected: {addr} ({reason})");
}

/// Removes the client from fan-out when the connection ends, however it ends.
struct Registration<'a> {
    shard: &'a Shard,
    client: &'a Client,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.shard.unregister(self.client.id);
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

/// Reads into the shard's scratch buffer, frames lines and hands them to the shard.
async fn read_half(shard: &Shard, client: &Client, stream: &RefCell<TcpStream>) -> CloseReason {
    let mut framer = Framer::new(shard.config.max_line_bytes);
    loop {
        while shard.outgoing_full() {
            shard.outgoing_drained.wait().await;
        }
        // The scratch buffer is borrowed only inside this poll; its bytes are consumed
        // below before the next `.await`, so no other reader can overwrite them first.
        let read = poll_fn(|cx| {
            let mut scratch = shard.read_scratch.borrow_mut();
            Pin::new(&mut *stream.borrow_mut()).poll_read(cx, &mut scratch)
        })
        .await;
        let n = match read {
            Ok(n) => n,
            Err(_) => return CloseReason::ReadError,
        };
        shard.stats.on_read(n);
        let result = if n == 0 {
            framer.finish(|line| shard.relay(client, line))
        } else {
            let scratch = shard.read_scratch.borrow();
            framer.feed(&scratch[..n], |line| shard.relay(client, line))
        };
        match result {
            Err(FrameError::LineTooLong) => return CloseReason::LineTooLong,
            Err(FrameError::InvalidUtf8) => return CloseReason::InvalidUtf8,
            Ok(()) if n == 0 => return CloseReason::PeerClosed,
            Ok(()) => {}
        }
    }
}

/// Drains the outbox: one write per queued stretch, or several gathered into one.
async fn write_half(shard: &Shard, client: &Client, stream: &RefCell<TcpStream>) -> CloseReason {
    loop {
        let job = loop {
            if let Some(job) = client.outbox.borrow_mut().take_job() {
                break job;
            }
            client.writer_wake.wait().await;
        };
        if let Err(reason) = write_all(shard, stream, job.bytes()).await {
            return reason;
        }
        shard.stats.on_delivered(job.count());
    }
}

async fn write_all(shard: &Shard, stream: &RefCell<TcpStream>, bytes: &[u8]) -> Result<(), CloseReason> {
    let mut done = 0;
    while done < bytes.len() {
        let written = poll_fn(|cx| Pin::new(&mut *stream.borrow_mut()).poll_write(cx, &bytes[done..])).await;
        match written {
            Ok(n) if n > 0 => {
                done += n;
                shard.stats.on_write(n);
            }
            _ => return Err(CloseReason::WriteError),
        }
    }
    Ok(())
}

/// The notice a client gets before the relay closes it, if any (SPEC §1.3).
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
async fn farewell(stream: &RefCell<TcpStream>, reason: CloseReason, max_line_bytes: usize) {
    let Some(text) = notice(reason, max_line_bytes) else {
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
        let mut sink = [0u8; 4096];
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
