//! The per-shard accept loop and admission.
//!
//! Each shard accepts on its own SO_REUSEPORT socket (bound by the main thread, see
//! `startup::bind_listeners`) and spawns one connection task per admitted client. Accept
//! errors such as EMFILE return at once, so the loop backs off instead of spinning.
//!
//! With `proxy_protocol` on, a connection from a trusted proxy first waits for its PROXY
//! header in a task of its own (`listener/proxy_header.rs`), holding a connection slot and
//! a drain pass; the client's address from the header then goes through the same admission
//! as a direct client's, so every rule and log sees the client, never the proxy.

mod proxy_header;

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::net::{TcpListener, TcpStream};

use crate::connection::{self, Admission, ReadScratch};
use crate::metrics::{CloseReason, DropReason};
use crate::proxy_protocol::Header;
use crate::shard::Shard;
use crate::shared::ConnectionSlot;
use crate::shutdown::ConnectionPass;

/// Ceiling of the accept-error back-off (docs/protocol.md#admission-and-accept-errors).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// An accepted connection from `peer`: admitted at once, or, with the PROXY protocol on,
/// once its header names the client (docs/protocol.md#proxy-protocol). `tls`: it came to
/// the TLS listener, whose clients handshake with this configuration; the PROXY protocol
/// applies to the plain listener only.
fn on_accept(
    shard: &Rc<Shard>,
    scratch: &Rc<ReadScratch>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<&Arc<rustls::ServerConfig>>,
) {
    let config = shard.config();
    if !config.proxy_protocol || tls.is_some() {
        admit(shard, scratch, stream, peer, None, tls);
        return;
    }
    if !config.proxy_trusted.contains(peer.ip()) {
        close_unserved(shard, CloseReason::ProxyUntrusted, peer);
        return;
    }
    let Some(slot) = shard.shared.connections.try_take() else {
        refuse_full(shard, stream, peer, false);
        return;
    };
    let held = Some((slot, shard.drain.enter()));
    let timeout = Duration::from_millis(config.proxy_header_timeout_ms);
    let (shard, scratch) = (shard.clone(), scratch.clone());
    glommio::spawn_local(async move {
        let mut stream = stream;
        match proxy_header::read(&mut stream, timeout).await {
            Ok(Header::Proxied { source, .. }) => {
                tracing::debug!("PROXY header from {peer}: client {source}");
                admit(&shard, &scratch, stream, source, held, None);
            }
            // A health check or a client without an IP address: nothing to relay for it.
            Ok(Header::Local) => close_unserved(&shard, CloseReason::ProxyLocal, peer),
            Err(reason) => close_unserved(&shard, reason, peer),
        }
    })
    .detach();
}

/// Admission of a client at `addr` (docs/protocol.md#admission-by-network, #quarantine,
/// #admission-and-accept-errors): a denied or quarantined client is closed at once with no
/// bytes; over `max_connections` the client gets N6 and over `max_connections_per_ip` N7
/// while the shard has a refusal slot; everyone else gets a connection task, which holds its
/// slots and a pass of the shard's drain until it ends. `held` is the slot and pass a
/// connection already took while its PROXY header was read.
///
/// On the TLS listener (`tls` set) the connection task starts with the handshake, and a
/// client over either cap is closed without N6 or N7: a notice in clear is not TLS, and a
/// handshake to send it would be work for a server that is already full.
fn admit(
    shard: &Rc<Shard>,
    scratch: &Rc<ReadScratch>,
    stream: TcpStream,
    addr: SocketAddr,
    held: Option<(ConnectionSlot, ConnectionPass)>,
    tls: Option<&Arc<rustls::ServerConfig>>,
) {
    let config = shard.config();
    let ip = addr.ip();
    if !config.admits(ip) {
        close_unserved(shard, CloseReason::Denied, addr);
        return; // dropping the stream closes it
    }
    if shard.shared.quarantine.contains(addr, Instant::now()) {
        shard.stats.on_drop(DropReason::Quarantined, 1);
        close_unserved(shard, CloseReason::Quarantined, addr);
        return;
    }
    let (slot, pass) = match held {
        Some(held) => held,
        None => {
            let Some(slot) = shard.shared.connections.try_take() else {
                refuse_full(shard, stream, addr, tls.is_some());
                return;
            };
            (slot, shard.drain.enter())
        }
    };
    let host = match &shard.shared.hosts {
        None => None,
        Some(hosts) => match hosts.try_take(ip) {
            Some(host) => Some(host),
            None => {
                tracing::debug!("refused {addr}: max_connections_per_ip open from its address");
                refuse(shard, stream, CloseReason::HostFull, tls.is_some());
                return;
            }
        },
    };
    let _ = stream.set_nodelay(true);
    let admission = Admission { slot, host, pass };
    glommio::spawn_local(connection::serve(
        shard.clone(),
        scratch.clone(),
        stream,
        addr,
        admission,
        tls.cloned(),
    ))
    .detach();
}

/// Turns away a client over `max_connections` (N6).
fn refuse_full(shard: &Rc<Shard>, stream: TcpStream, addr: SocketAddr, tls: bool) {
    shard.stats.on_drop(DropReason::ServerFull, 1);
    tracing::debug!("refused {addr}: server full");
    refuse(shard, stream, CloseReason::ServerFull, tls);
}

/// Sends the notice for `reason` (N6 or N7) and closes, while the shard has a refusal slot
/// and the client speaks plain TCP; otherwise closes at once.
fn refuse(shard: &Rc<Shard>, stream: TcpStream, reason: CloseReason, tls: bool) {
    match shard.refusals.try_take().filter(|_| !tls) {
        Some(refusal) => {
            glommio::spawn_local(connection::refuse(shard.clone(), stream, reason, refusal)).detach();
        }
        None => shard.stats.on_close(reason, false),
    }
}

/// Counts a connection closed before it was served, with no bytes sent (the caller drops
/// the stream).
fn close_unserved(shard: &Shard, reason: CloseReason, addr: SocketAddr) {
    shard.stats.on_close(reason, false);
    tracing::debug!("refused {addr} ({reason})");
}

/// Accepts until the shard stops it; every client gets its own task. `tls`: this is the
/// TLS listener, and its clients handshake with this configuration.
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) {
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
                // The newest TLS configuration (a reload may have read new certificates).
                let server = tls
                    .as_ref()
                    .map(|first| shard.shared.tls_server.load_full().unwrap_or_else(|| first.clone()));
                on_accept(&shard, &scratch, stream, addr, server.as_ref());
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
