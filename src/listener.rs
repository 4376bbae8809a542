//! Listening sockets and the per-shard accept loop.
//!
//! The main thread builds one SO_REUSEPORT socket per shard with socket2 (glommio's own
//! `bind` panics on a bad address and hard-codes its backlog); each shard accepts on its own
//! and spawns one connection task per client. Accept errors such as EMFILE return at once,
//! so the loop backs off instead of spinning.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::net::TcpListener;
use socket2::{Domain, Socket, Type};

use crate::connection::{self, Admission};
use crate::metrics::{CloseReason, DropReason};
use crate::shard::Shard;
use crate::startup::{listen_error, StartupError};

/// Ceiling of the accept-error back-off (docs/protocol.md#admission-and-accept-errors).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// The kernel's listen backlog ceiling, used as our backlog.
fn backlog() -> i32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096)
}

/// Binds `count` listeners sharing `addr` through SO_REUSEPORT. With port 0 the first
/// one picks the port and the rest join it. Returns the bound address.
pub fn bind_listeners(addr: SocketAddr, count: usize) -> Result<(SocketAddr, Vec<OwnedFd>), StartupError> {
    let mut bound = addr;
    let mut fds = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(bound), Type::STREAM, None).map_err(|e| listen_error(addr, e))?;
        socket.set_reuse_address(true).map_err(|e| listen_error(addr, e))?;
        socket.set_reuse_port(true).map_err(|e| listen_error(addr, e))?;
        socket.bind(&bound.into()).map_err(|e| listen_error(addr, e))?;
        socket.listen(backlog()).map_err(|e| listen_error(addr, e))?;
        if bound.port() == 0 {
            bound = socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or_else(|| listen_error(addr, std::io::Error::other("no local address")))?;
        }
        fds.push(OwnedFd::from(socket));
    }
    Ok((bound, fds))
}

/// Admission (docs/protocol.md#quarantine, #admission-and-accept-errors): a quarantined peer
/// is closed at once with no bytes; over `max_connections` the client gets N6 while the
/// shard has a refusal slot; everyone else gets a connection task, which holds its
/// connection slot and a pass of the shard's drain until it ends.
fn admit(shard: &Rc<Shard>, stream: glommio::net::TcpStream, addr: SocketAddr) {
    if shard.shared.quarantine.contains(addr, Instant::now()) {
        shard.stats.on_drop(DropReason::Quarantined, 1);
        shard.stats.on_close(CloseReason::Quarantined, false);
        tracing::debug!("refused quarantined peer {addr}");
        return; // dropping the stream closes it
    }
    let Some(slot) = shard.shared.connections.try_take() else {
        shard.stats.on_drop(DropReason::ServerFull, 1);
        tracing::debug!("refused {addr}: server full");
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
    glommio::spawn_local(connection::serve(shard.clone(), stream, addr, admission)).detach();
}

/// Accepts until the shard stops it; every client gets its own task.
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    let first_backoff = Duration::from_millis(shard.config().accept_error_backoff_ms);
    let mut backoff = first_backoff;
    let mut errors_since_log = 0u64;
    let mut last_log: Option<Instant> = None;
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
                admit(&shard, stream, addr);
            }
            Err(e) => {
                errors_since_log += 1;
                if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(
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
