//! One client connection's task: [`serve`] runs its reader half (`connection/reader.rs`)
//! and writer half (`connection/writer.rs`) until one ends or a close is requested, then
//! the close path: final flush at shutdown, closing notice, lingering close, counters, log
//! line. [`refuse_full`] turns away a client over `max_connections`.
//!
//! Both halves run in one task, sharing the stream through a `RefCell` that is borrowed
//! only inside a single `poll_*` call, never across an `.await`. The client's state (its
//! outbox, its close request) is a [`Client`](crate::client::Client) that the shard's
//! fan-out shares. A panic anywhere in the connection closes this connection only.

mod reader;
mod writer;

use std::cell::RefCell;
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

use crate::fanout::undelivered_reason;
use crate::metrics::CloseReason;
use crate::protocol;
use crate::shard::{RefusalSlot, Shard};
use crate::shared::ConnectionSlot;
use crate::shutdown::ConnectionPass;
use reader::read_half;
pub use reader::ReadScratch;
use writer::{flush_outbox, write_half, write_in_flight};

/// Bound on sending a closing notice and draining unread input before the final close.
const FAREWELL_TIMEOUT: Duration = Duration::from_millis(500);
/// Unread input discarded after a notice, so that closing does not turn into a reset
/// that destroys the notice in flight.
const LINGER_READ_BYTES: usize = 256 << 10;

/// What an admitted connection holds until its task ends: its place among
/// `max_connections`, and the pass its shard's drain waits for.
pub struct Admission {
    pub slot: ConnectionSlot,
    pub pass: ConnectionPass,
}

/// Runs one admitted connection to its end. What `admission` holds is given back when
/// this returns.
pub async fn serve(
    shard: Rc<Shard>,
    scratch: Rc<ReadScratch>,
    stream: TcpStream,
    addr: SocketAddr,
    admission: Admission,
) {
    let membership = shard.fanout.join(addr, stream.as_raw_fd());
    let client = membership.client().clone();
    info!(peer = %addr, shard = shard.id, "client connected: {addr} (shard {})", shard.id);
    if shard.is_shutting_down() {
        client.request_close(CloseReason::Shutdown);
    }
    let stream = RefCell::new(stream);
    let halves = or(
        client.close_requested(),
        or(
            read_half(&shard, &scratch, &client, &stream),
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
            tracing::error!(peer = %addr, shard = shard.id, reason = %CloseReason::InternalError, "panic while handling {addr}: {what}; closing this connection only");
            CloseReason::InternalError
        }
    };
    // From here the flush task no longer writes to the socket directly.
    client.request_close(reason);
    if reason == CloseReason::Shutdown {
        // Everything already relayed reaches this client before N3.
        shard.drain.deliveries_finished().await;
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
    let lost = client.settle(&shard.stats);
    if lost > 0 {
        shard.stats.on_drop(undelivered_reason(reason), lost);
    }
    drop(membership);
    farewell(&stream, closing_notice).await;
    drop(stream);
    shard.stats.on_close(reason, true);
    drop(admission);
    info!(peer = %addr, shard = shard.id, reason = %reason, "client disconnected: {addr} ({reason})");
}

/// Turns away a connection over `max_connections` with N6
/// (docs/protocol.md#admission-and-accept-errors); `slot` is given back when this returns.
pub async fn refuse_full(shard: Rc<Shard>, stream: TcpStream, slot: RefusalSlot) {
    let stream = RefCell::new(stream);
    farewell(&stream, notice(CloseReason::ServerFull, 0)).await;
    shard.stats.on_close(CloseReason::ServerFull, false);
    drop(slot);
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
