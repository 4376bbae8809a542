//! One client connection's task: [`serve`] runs its reader half (`connection/reader.rs`)
//! and writer half (`connection/writer.rs`) until one ends or a close is requested, then
//! the close path: final flush at shutdown, closing notice, lingering close, counters, log
//! line. [`refuse`] turns away a client over `max_connections` or `max_connections_per_ip`.
//!
//! A connection from the TLS listener first completes its handshake ([`handshake`]),
//! bounded in time and in number per shard; after that nothing here differs from plain
//! TCP. The task owns the connection's [`Socket`] (`socket.rs`), through which both halves
//! and the farewell read and write; it is closed when the task ends. The client's state (its
//! outbox, its close request) is a [`Client`](crate::client::Client) that the shard's
//! fan-out shares. A panic anywhere in the connection closes this connection only.

mod reader;
mod writer;

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::future::or;
use futures_lite::FutureExt;
use glommio::net::TcpStream;
use tracing::info;

use crate::fanout::undelivered_reason;
use crate::host_limit::HostSlot;
use crate::metrics::CloseReason;
use crate::protocol;
use crate::shard::{Shard, Slot};
use crate::shared::ConnectionSlot;
use crate::shutdown::ConnectionPass;
use crate::socket::Socket;
use reader::read_half;
pub use reader::ReadScratch;
use writer::{flush_outbox, write_half, write_in_flight};

/// Bound on finishing a half-written envelope before a closing notice.
const FAREWELL_TIMEOUT: Duration = Duration::from_millis(500);

/// What an admitted connection holds until its task ends: its place among
/// `max_connections` and among its host's `max_connections_per_ip` (when set), and the
/// pass its shard's drain waits for.
pub struct Admission {
    pub slot: ConnectionSlot,
    pub host: Option<HostSlot>,
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
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let socket = match tls {
        None => Socket::plain(stream),
        Some(config) => match handshake(&shard, stream, addr, config).await {
            Some(socket) => socket,
            None => return,
        },
    };
    // Admitted under the lists of the accept; a reload may have changed them since (during
    // the handshake, most likely), and the fan-out closes only the clients it already has.
    if !shard.config().admits(addr.ip()) {
        shard.stats.on_close(CloseReason::Denied, false);
        tracing::debug!("refused {addr} ({})", CloseReason::Denied);
        return;
    }
    // The connection's one owner of its socket: dropped (closed) when this task ends, by
    // which time the client, which holds it weakly, can no longer reach it.
    let socket = Rc::new(socket);
    let membership = shard.fanout.join(addr, Rc::downgrade(&socket));
    let client = membership.client().clone();
    info!(
        peer = %addr,
        shard = shard.id,
        "client connected: {addr} (shard {}{})",
        shard.id,
        if socket.is_tls() { ", tls" } else { "" }
    );
    if shard.is_shutting_down() {
        client.request_close(CloseReason::Shutdown);
    }
    let halves = or(
        client.close_requested(),
        or(
            read_half(&shard, &scratch, &client, &socket),
            write_half(&shard, &client, &socket),
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
        if let Err(e) = flush_outbox(&shard, &client, &socket).await {
            reason = e;
        }
    }
    let mut closing_notice = notice(reason, shard.config().max_line_bytes);
    if closing_notice.is_some() {
        // A notice must start on a line of its own: finish a half-written envelope first,
        // or send no notice at all.
        let finished = or(
            async { write_in_flight(&shard, &client, &socket).await.is_ok() },
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
    if let Some(text) = closing_notice {
        socket.farewell(&text).await;
    }
    drop(socket);
    shard.stats.on_close(reason, true);
    drop(admission);
    info!(peer = %addr, shard = shard.id, reason = %reason, "client disconnected: {addr} ({reason})");
}

/// The TLS handshake of a connection on the TLS listener, within one of the shard's
/// handshake slots and `tls.handshake_timeout_ms`; `None` (counted and logged) when it
/// failed, timed out, found every slot taken, or the relay began to shut down meanwhile.
async fn handshake(
    shard: &Rc<Shard>,
    stream: TcpStream,
    addr: SocketAddr,
    config: Arc<rustls::ServerConfig>,
) -> Option<Socket> {
    let Some(_slot) = shard.handshakes.try_take() else {
        // A flood of handshakes costs the relay CPU; past the bound it costs an accept.
        shard.stats.on_close(CloseReason::TlsBusy, false);
        tracing::debug!("refused {addr}: too many TLS handshakes in progress");
        return None;
    };
    let timeout = Duration::from_millis(shard.config().tls.as_ref().map_or(0, |t| t.handshake_timeout_ms));
    // In the shard's handshake queue, so that relaying keeps most of the CPU meanwhile.
    let handshake = Socket::tls_handshake(stream, config);
    let handshake = match shard.handshake_queue {
        Some(queue) => glommio::spawn_local_into(handshake, queue),
        None => Ok(glommio::spawn_local(handshake)),
    };
    let handshake = match handshake {
        Ok(task) => task,
        Err(e) => {
            shard.stats.on_close(CloseReason::TlsHandshakeFailed, false);
            tracing::warn!("cannot start the TLS handshake with {addr}: {e}");
            return None;
        }
    };
    // Dropping the task (timeout, shutdown) cancels the handshake and closes its stream.
    let outcome = or(
        async { Some(handshake.await) },
        or(
            async {
                glommio::timer::sleep(timeout).await;
                None
            },
            async {
                shard.shared.shutdown.wait().await;
                None
            },
        ),
    )
    .await;
    match outcome {
        Some(Ok(socket)) => Some(socket),
        Some(Err(e)) => {
            shard.stats.on_close(CloseReason::TlsHandshakeFailed, false);
            tracing::info!("TLS handshake with {addr} failed: {e}");
            None
        }
        None => {
            shard.stats.on_close(CloseReason::TlsHandshakeFailed, false);
            tracing::info!("TLS handshake with {addr} did not finish in time");
            None
        }
    }
}

/// Turns away a connection over `max_connections` with N6 or over
/// `max_connections_per_ip` with N7 (docs/protocol.md#admission-and-accept-errors), as
/// `reason` says; `slot` is given back when this returns.
pub async fn refuse(shard: Rc<Shard>, stream: TcpStream, reason: CloseReason, slot: Slot) {
    // Counted before the farewell: a refusal holds no drain pass, so a shard that stops
    // while the refused client still lingers (up to the farewell timeout) must not lose it
    // from its final counts.
    shard.stats.on_close(reason, false);
    if let Some(text) = notice(reason, 0) {
        Socket::plain(stream).farewell(&text).await;
    }
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
        CloseReason::HostFull => protocol::NOTICE_HOST_FULL.to_string(),
        _ => return None,
    })
}
