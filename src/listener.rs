//! The per-shard accept loop and admission.
//!
//! Each shard accepts on its own SO_REUSEPORT socket (bound by the main thread, see
//! `startup::bind_listeners`) and spawns one connection task per admitted client. Accept
//! errors such as EMFILE return at once, so the loop backs off instead of spinning.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::net::TcpListener;

use crate::connection::{self, Admission, ReadScratch};
use crate::metrics::{CloseReason, DropReason};
use crate::shard::Shard;

/// Ceiling of the accept-error back-off (docs/protocol.md#admission-and-accept-errors).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Admission (docs/protocol.md#quarantine, #admission-and-accept-errors): a quarantined peer
/// is closed at once with no bytes; over `max_connections` the client gets N6 while the
/// shard has a refusal slot; everyone else gets a connection task, which holds its
/// connection slot and a pass of the shard's drain until it ends.
fn admit(shard: &Rc<Shard>, scratch: &Rc<ReadScratch>, stream: glommio::net::TcpStream, addr: SocketAddr) {
    if shard.shared.quarantine.contains(addr, Instant::now()) {
        shard.stats.on_drop(DropReason::Quarantined, 1);
        shard.stats.on_close(CloseReason::Quarantined, false);
        tracing::debug!(peer = %addr, shard = shard.id, reason = %CloseReason::Quarantined, "refused quarantined peer {addr}");
        return; // dropping the stream closes it
    }
    let Some(slot) = shard.shared.connections.try_take() else {
        shard.stats.on_drop(DropReason::ServerFull, 1);
        tracing::debug!(peer = %addr, shard = shard.id, reason = %CloseReason::ServerFull, "refused {addr}: server full");
        match shard.refusals.try_take() {
            Some(refusal) => {
                glommio::spawn_local(connection::refuse_full(shard.clone(), stream, refusal)).detach();
            }
            None => shard.stats.on_close(CloseReason::ServerFull, false),
        }
        return;
    };
    let _ = stream.set_nodelay(true);
    let admission = Admission {
        slot,
        pass: shard.drain.enter(),
    };
    glommio::spawn_local(connection::serve(
        shard.clone(),
        scratch.clone(),
        stream,
        addr,
        admission,
    ))
    .detach();
}

/// Accepts until the shard stops it; every client gets its own task.
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    let first_backoff = Duration::from_millis(shard.config().accept_error_backoff_ms);
    let mut backoff = first_backoff;
    let mut errors_since_log = 0u64;
    let mut last_log: Option<Instant> = None;
    let scratch = ReadScratch::new();
    loop {
        match listener.accept().await {
            Ok(stream) => {
                backoff = first_backoff;
                shard.stats.on_accept();
                let Ok(addr) = stream.peer_addr() else {
                    // Reset by the peer while it waited in the accept queue: there is no
                    // peer address to admit or log, but it was accepted, so it is closed
                    // under a reason of its own (dropping the stream closes it).
                    shard.stats.on_close(CloseReason::ResetBeforeServed, false);
                    tracing::debug!(
                        "closed a connection reset before it was served ({})",
                        CloseReason::ResetBeforeServed
                    );
                    continue;
                };
                admit(&shard, &scratch, stream, addr);
            }
            Err(e) => {
                errors_since_log += 1;
                if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(
                        shard = shard.id,
                        count = errors_since_log,
                        error = %e,
                        "accept failed on shard {} ({errors_since_log} times since last report): {e}; backing off {} ms",
                        shard.id,
                        backoff.as_millis()
                    );
                    errors_since_log = 0;
                    last_log = Some(Instant::now());
                }
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
}
