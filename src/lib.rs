//! corecast: a thread-per-core TCP broadcast relay on glommio (io_uring), wire-compatible
//! with the Summoner relay server.
//!
//! Architecture map (see README "How it works"):
//! - [`config`]: CLI flags and `server_config.json` → one validated [`config::Config`].
//! - [`startup`]: checks run before anything starts (io_uring, memlock, port in use).
//! - [`shard`]: one pinned glommio executor per CPU and the per-shard context.
//! - [`listener`]: per-shard SO_REUSEPORT listeners and accept loops.
//! - [`connection`]: one client's reader and writer halves and its outbox.
//! - [`fanout`]: batches of envelopes, local delivery and the cross-shard SPSC mesh.
//! - [`protocol`]: line framing and envelope encoding (pure, no I/O).
//! - [`metrics`]: per-shard counters and the close-reason enum.
//!
//! Data flow: reader → shard batch → flush task → local outboxes + one SPSC send per peer
//! shard → peer receiver → its local outboxes → writer (one socket write per drain).

pub mod config;
pub mod connection;
pub mod fanout;
pub mod listener;
pub mod log;
pub mod metrics;
pub mod notify;
pub mod protocol;
pub mod shard;
pub mod startup;

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use config::Config;
use shard::ShardEvent;
use startup::StartupError;

/// Why `run` returned with an error.
#[derive(Debug)]
pub enum Error {
    Startup(StartupError),
    /// A shard failed to start or stopped unexpectedly.
    Shard(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Startup(e) => e.fmt(f),
            Error::Shard(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for Error {}

impl From<StartupError> for Error {
    fn from(e: StartupError) -> Self {
        Error::Startup(e)
    }
}

/// How long the main thread waits for every shard to report that it is accepting.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Resolves the listen address; a hostname takes its first address.
fn resolve(host: &str, port: u16) -> Result<SocketAddr, StartupError> {
    let unresolved = |reason: String| StartupError::Listen {
        addr: format!("{host}:{port}"),
        reason,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port)
        .to_socket_addrs()
        .map_err(|e| unresolved(format!("cannot resolve host: {e}")))?
        .next()
        .ok_or_else(|| unresolved("host resolves to no address".into()))
}

/// Runs the relay until a shard stops. Start-up failures return before anything listens.
pub fn run(config: Config) -> Result<(), Error> {
    startup::check_io_uring()?;
    startup::check_memlock(config.shards)?;
    let nofile = startup::raise_nofile_limit();
    let addr = resolve(&config.host, config.port)?;
    startup::check_port_free(addr)?;
    let (bound, listeners) = listener::bind_listeners(addr, config.shards)?;

    let shards = config.shards;
    let (events_tx, events) = crossbeam_channel::bounded(4 * shards + 16);
    let handles = shard::spawn_all(Arc::new(config), listeners, events_tx)
        .map_err(|e| Error::Shard(format!("cannot start shards: {e}")))?;

    let mut started = 0;
    while started < shards {
        match events.recv_timeout(STARTUP_TIMEOUT) {
            Ok(ShardEvent::Started(_)) => started += 1,
            Ok(ShardEvent::Stopped(id)) => return Err(shard_failure(id, handles)),
            Err(_) => return Err(Error::Shard("shards did not start within 30 s".into())),
        }
    }
    tracing::info!("listening on {bound} with {shards} shards (open-file limit {nofile})");

    match events.recv() {
        Ok(ShardEvent::Stopped(id)) => Err(shard_failure(id, handles)),
        Ok(ShardEvent::Started(id)) => Err(Error::Shard(format!("shard {id} started twice"))),
        Err(_) => Err(Error::Shard("all shards exited".into())),
    }
}

/// Collects the reason a shard ended, from its thread's join result.
fn shard_failure(id: usize, handles: Vec<glommio::ExecutorJoinHandle<()>>) -> Error {
    let detail = handles
        .into_iter()
        .nth(id)
        .map(|h| match h.join() {
            Ok(()) => "its accept loop ended".to_string(),
            Err(e) => e.to_string(),
        })
        .unwrap_or_default();
    Error::Shard(format!("shard {id} stopped: {detail}"))
}
