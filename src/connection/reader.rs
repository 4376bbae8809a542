//! A connection's reader half: reads into the shard's [`ReadScratch`], frames lines,
//! applies the token bucket and hands lines to the shard's fan-out; holds the sender back
//! when backpressure or the process-wide bound on queued memory says so.
//!
//! When it reads is up to the shard's read scheduling (`fanout::reads`): readiness, its
//! turn at the start of a write pass, or a wake-up from the ready set. It keeps only an
//! unfinished line (in its framer), so an idle connection holds no buffer.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_lite::future::poll_fn;

use crate::backpressure::Stage;
use crate::client::Client;
use crate::fanout::stalls::LAG_SWEEP_INTERVAL;
use crate::limiter::{Decision, TokenBucket};
use crate::metrics::{CloseReason, DropReason};
use crate::protocol::{FrameError, Framer};
use crate::shard::Shard;
use crate::socket::Socket;

/// Read turns in a row that may find nothing before a reader waits for readiness again: a
/// sender that writes in bursts a little further apart than write passes stays on turns.
const EMPTY_TURNS: u32 = 2;
/// How often a sender held back by flow control or the process-wide bound looks again.
const PAUSE_POLL: Duration = Duration::from_millis(10);
/// One read's worth of input.
const READ_SCRATCH_BYTES: usize = 64 << 10;
/// While partial lines are over `max_total_partial_bytes`, a connection may still hold this
/// much of a partial line (it reads at most up to it); one holding more is not read until
/// there is room again (docs/protocol.md#memory-bounds).
const SMALL_PARTIAL_BYTES: usize = 4 << 10;
const _: () = assert!(READ_SCRATCH_BYTES >= crate::socket::MIN_READ_BUF);

/// The buffer every reader on a shard reads into (the accept loop makes one and hands it
/// to each connection). A reader borrows it only inside one poll or `recv` and consumes
/// what it holds before its next `.await`, so no other reader can overwrite its bytes.
pub struct ReadScratch(RefCell<Box<[u8]>>);

impl ReadScratch {
    pub fn new() -> Rc<ReadScratch> {
        Rc::new(ReadScratch(RefCell::new(
            vec![0; READ_SCRATCH_BYTES].into_boxed_slice(),
        )))
    }
}

/// How a reader's next read happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NextRead {
    /// Wait for readiness (glommio's io_uring poll).
    Readiness,
    /// A plain `recv` at the start of a pass (the flush task gave the turn).
    Turn,
    /// A plain `recv`: the flush task found the socket readable in the shard's ready set,
    /// or sent the reader back to readiness.
    Woken,
}

/// Reads into the shard's scratch buffer, frames lines, applies the token bucket and hands
/// lines to the shard; pauses when backpressure says so.
///
/// A read waits for readiness, except in two cases where it is a plain non-blocking `recv`
/// at the flush task's write pass, so that the lines join that pass and no readiness poll
/// (whose completion would wake the shard) is armed:
/// - a sender that keeps sending is read at every pass (see `fanout::reads`); after
///   [`EMPTY_TURNS`] turns in a row that find nothing it goes back to readiness;
/// - an occasional sender on a busy shard waits in the shard's ready set and is read at the
///   first pass that finds its socket readable (see `Reads::read_at_runs`); when the shard
///   goes idle, it goes back to readiness.
pub async fn read_half(shard: &Shard, scratch: &ReadScratch, client: &Rc<Client>, socket: &Socket) -> CloseReason {
    let config = shard.config();
    let fanout = &shard.fanout;
    let reads = fanout.reads();
    let mut framer = Framer::new(config.max_line_bytes);
    // The rate this bucket was made for; a reload that changes the shard's rate gives the
    // connection a bucket at the new rate (see `TokenBucket::with_rate`).
    let mut rate = fanout.tunables().rate_limit_msgs_per_minute;
    let mut limiter = rate.map(|per_minute| TokenBucket::per_minute(per_minute, Instant::now()));
    let (mut next, mut empty_turns) = (NextRead::Readiness, 0);
    // What the framer holds, as counted in the shard's partial lines; given back when this
    // future ends, however it ends.
    let held = HeldPartial {
        shard,
        bytes: Cell::new(0),
    };
    loop {
        fanout.wait_for_outgoing_room().await;
        wait_for_pending_room(shard).await;
        let partial = framer.partial_len();
        if read_limit(shard, partial).is_none() {
            shard.partial.wait_for_room(shard).await;
            if shard.is_shutting_down() {
                // The drain reads nothing more (and the wait no longer waits).
                return CloseReason::Shutdown;
            }
            continue;
        }
        // The scratch buffer is borrowed only inside this poll (or recv); its bytes are
        // consumed below before the next `.await`, so no other reader can overwrite them.
        let read = match std::mem::replace(&mut next, NextRead::Readiness) {
            NextRead::Readiness => {
                // The limit is taken when the socket is ready, not before the wait: thousands
                // of readers waiting at once would otherwise each read a full buffer.
                let read = poll_fn(|cx| {
                    let Some(limit) = read_limit(shard, partial) else {
                        return Poll::Ready(None);
                    };
                    let mut scratch = scratch.0.borrow_mut();
                    let limit = socket.read_len(limit);
                    socket.poll_read(cx, &mut scratch[..limit]).map(Some)
                })
                .await;
                match read {
                    Some(read) => read,
                    None => continue,
                }
            }
            how => {
                let Some(limit) = read_limit(shard, partial) else {
                    continue;
                };
                // A statement of its own: the borrows must end before any `.await` below.
                let read = socket.try_read(&mut scratch.0.borrow_mut()[..socket.read_len(limit)]);
                match read {
                    Some(read) => {
                        shard.stats.on_read_at_run();
                        read
                    }
                    None if how == NextRead::Turn => {
                        empty_turns += 1;
                        if empty_turns < EMPTY_TURNS {
                            reads.next_turn().await;
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
        let current = fanout.tunables().rate_limit_msgs_per_minute;
        if current != rate {
            rate = current;
            limiter = current.map(|per_minute| match limiter.take() {
                Some(bucket) => bucket.with_rate(per_minute, now),
                None => TokenBucket::per_minute(per_minute, now),
            });
        }
        let previous_read = client.on_inbound(now);
        shard.stats.on_read(n);
        client.conn.bytes_in.add(n as u64);
        let (mut relayed, mut notify) = (0u64, false);
        let mut on_line = |line: &str| match limiter.as_mut().map_or(Decision::Allow, |b| b.check(now)) {
            Decision::Allow => {
                relayed += 1;
                fanout.relay(client, line);
            }
            Decision::Drop { notify: n } => {
                shard.stats.on_drop(DropReason::RateLimited, 1);
                notify |= n;
            }
        };
        let result = if n == 0 {
            framer.finish(&mut on_line)
        } else {
            let scratch = scratch.0.borrow();
            framer.feed(&scratch[..n], &mut on_line)
        };
        held.set(framer.held());
        if notify {
            fanout.send_rate_limit_notice(client);
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
            pause_sender(shard).await;
        } else if relayed >= 2 || now.saturating_duration_since(previous_read) < fanout.flush_window() {
            // A sender that keeps sending: read it again at the next pass, with all that
            // arrived by then.
            reads.leave_ready_set(client);
            reads.next_turn().await;
            (next, empty_turns) = (NextRead::Turn, 0);
        } else if reads.read_at_runs(client) {
            // An occasional single line on a busy shard: read the next one at the pass that
            // finds it. (Otherwise it waits for readiness: a read turn would only delay it.)
            // What the flush task reported before this read is stale now.
            client.reader_woken().await;
            next = NextRead::Woken;
        }
    }
}

/// How many bytes a reader holding `partial` bytes of a line may read now, or `None` while
/// it must wait for room under `max_total_partial_bytes` (docs/protocol.md#memory-bounds).
fn read_limit(shard: &Shard, partial: usize) -> Option<usize> {
    if !shard.shared.over_partial_bound() {
        Some(READ_SCRATCH_BYTES)
    } else if partial < SMALL_PARTIAL_BYTES {
        Some(SMALL_PARTIAL_BYTES - partial)
    } else {
        None
    }
}

/// A reader's partial line as counted in its shard's [`PartialLines`](crate::shard::PartialLines).
struct HeldPartial<'a> {
    shard: &'a Shard,
    bytes: Cell<usize>,
}

impl HeldPartial<'_> {
    fn set(&self, bytes: usize) {
        self.shard.partial.adjust(self.shard, self.bytes.replace(bytes), bytes);
    }
}

impl Drop for HeldPartial<'_> {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// Holds back a sender whose read just relayed lines while a recipient anywhere is
/// behind (docs/protocol.md#backpressure): throttle sleeps `throttle_delay_ms`; flow
/// control waits until no recipient is at that stage (each recipient's allowance bounds
/// it). Returns after no wait when nobody is behind.
async fn pause_sender(shard: &Shard) {
    let policy = shard.fanout.tunables().policy;
    let start = Instant::now();
    match shard.shared.stage() {
        Stage::None => return,
        Stage::Throttle => glommio::timer::sleep(policy.throttle_delay).await,
        Stage::FlowControl => {
            // One allowance and one sweep late at most, even if the stage were stale.
            let limit = start + policy.flow_control_delay + LAG_SWEEP_INTERVAL;
            while shard.shared.stage() == Stage::FlowControl && !shard.is_shutting_down() && Instant::now() < limit {
                glommio::timer::sleep(PAUSE_POLL).await;
            }
        }
    }
    shard.stats.on_sender_pause(start.elapsed());
}

/// Waits before a read while the process-wide bound on queued bytes is exceeded: TCP
/// then pushes back on every sender until stalled recipients drain or are closed.
async fn wait_for_pending_room(shard: &Shard) {
    let over = || shard.shared.over_total_pending(&shard.fanout.tunables().policy);
    if !over() {
        return;
    }
    let start = Instant::now();
    while over() && !shard.is_shutting_down() {
        glommio::timer::sleep(PAUSE_POLL).await;
    }
    shard.stats.on_sender_pause(start.elapsed());
}
