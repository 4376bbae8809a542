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
//! - [`ready_set`]: the epoll set a busy shard reads occasional senders from at its runs.
//! - [`protocol`]: line framing and envelope encoding (pure, no I/O).
//! - [`limiter`], [`backpressure`], [`quarantine`]: the policies (pure, clock passed in).
//! - [`shutdown`]: the signal that starts every shard's drain.
//! - [`metrics`]: per-shard counters, the close-reason and drop-reason enums.
//! - [`admin`]: the optional HTTP endpoint (`/metrics`, `/healthz`, `/stats`) on its own thread.
//! - [`sd_notify`]: systemd readiness (`READY=1`, `STOPPING=1`) for `Type=notify` units.
//! - [`log`]: console, file and JSON log sinks in the Summoner format.
//!
//! Data flow: reader → shard batch → flush task → local outboxes + one SPSC send per peer
//! shard → peer receiver → its local outboxes → writer (one socket write per drain).

pub mod admin;
pub mod backpressure;
pub mod config;
pub mod connection;
pub mod fanout;
pub mod limiter;
pub mod listener;
pub mod log;
pub mod mesh;
pub mod metrics;
pub mod notify;
pub mod pacing;
pub mod protocol;
pub mod quarantine;
pub mod ready_set;
pub mod sd_notify;
pub mod shard;
pub mod shutdown;
pub mod startup;

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use config::Config;
use shard::{ShardEvent, Shared};
use startup::StartupError;

/// Why `run` returned with an error.
#[derive(Debug)]
pub enum Error {
    Startup(StartupError),
    /// A shard failed to start or stopped unexpectedly.
    Shard(String),
    /// The admin endpoint could not listen or start.
    Admin {
        addr: SocketAddr,
        reason: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Startup(e) => e.fmt(f),
            Error::Shard(e) => f.write_str(e),
            Error::Admin { addr, reason } => write!(f, "cannot serve the admin endpoint on {addr}: {reason}"),
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

/// Runs the relay until SIGINT/SIGTERM has drained it (`Ok`) or a shard fails (`Err`).
/// Start-up failures return before anything listens.
pub fn run(config: Config) -> Result<(), Error> {
    startup::check_io_uring()?;
    startup::check_memlock(config.shards)?;
    let nofile = startup::raise_nofile_limit();
    let addr = resolve(&config.host, config.port)?;
    startup::check_port_free(addr)?;
    let (bound, listeners) = listener::bind_listeners(addr, config.shards)?;
    // Bound now so that a bad admin address stops start-up before any shard runs.
    let admin = match config.admin_addr {
        Some(addr) => Some(admin::bind(addr).map_err(|e| Error::Admin {
            addr,
            reason: e.to_string(),
        })?),
        None => None,
    };
    let signals = signal_channel().map_err(|e| Error::Shard(format!("cannot install signal handlers: {e}")))?;

    let shards = config.shards;
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let purge_every = Duration::from_secs(config.quarantine_cleanup_interval_secs);
    let shared = Arc::new(Shared::new(config));
    let (events_tx, events) = crossbeam_channel::bounded(4 * shards + 16);
    let handles = shard::spawn_all(shared.clone(), listeners, events_tx)
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
    if let Some(listener) = admin {
        let at = listener.local_addr().map_err(|e| Error::Admin {
            addr: shared.config.admin_addr.unwrap_or(bound),
            reason: e.to_string(),
        })?;
        admin::spawn(listener, shared.clone()).map_err(|e| Error::Admin {
            addr: at,
            reason: e.to_string(),
        })?;
        tracing::info!("admin listening on {at} (/metrics, /healthz, /stats)");
    }
    systemd_notify(&format!("READY=1\nSTATUS=listening on {bound} with {shards} shards"));

    // The control loop: signals, shard exits, and the quarantine purge.
    let mut drain_deadline: Option<Instant> = None;
    let mut stopped = 0;
    let mut next_purge = Instant::now() + purge_every;
    loop {
        let wake_at = drain_deadline.map_or(next_purge, |d| d.min(next_purge));
        crossbeam_channel::select! {
            recv(signals) -> sig => {
                let name = if sig == Ok(signal_hook::consts::SIGINT) { "SIGINT" } else { "SIGTERM" };
                if drain_deadline.is_some() {
                    tracing::warn!("second signal ({name}) during the drain; exiting now");
                    std::process::exit(shutdown::EXIT_SECOND_SIGNAL);
                }
                tracing::info!("{name} received; draining (grace {} ms)", grace.as_millis());
                systemd_notify("STOPPING=1\nSTATUS=draining");
                // Margin past the grace: the shards bound their own drain by it.
                drain_deadline = Some(Instant::now() + grace + Duration::from_millis(500));
                shared.shutdown.trigger();
            }
            recv(events) -> event => match event {
                Ok(ShardEvent::Stopped(id)) if drain_deadline.is_none() => return Err(shard_failure(id, handles)),
                Ok(ShardEvent::Stopped(_)) => {
                    stopped += 1;
                    if stopped == shards {
                        tracing::info!("all shards drained; exiting");
                        return Ok(());
                    }
                }
                Ok(ShardEvent::Started(id)) => return Err(Error::Shard(format!("shard {id} started twice"))),
                Err(_) => return Err(Error::Shard("all shards exited".into())),
            },
            recv(crossbeam_channel::at(wake_at)) -> _ => {
                let now = Instant::now();
                if drain_deadline.is_some_and(|d| now >= d) {
                    tracing::warn!("shutdown grace exceeded; exiting with connections still open");
                    return Ok(());
                }
                if now >= next_purge {
                    shared.quarantine.purge(now);
                    next_purge = now + purge_every;
                }
            }
        }
    }
}

/// Tells systemd about a state change when it started us with `Type=notify`; a failure is
/// logged, never fatal (the relay works the same without a supervisor).
fn systemd_notify(state: &str) {
    match sd_notify::notify(state) {
        Ok(true) => tracing::debug!("told systemd: {}", state.replace('\n', ", ")),
        Ok(false) => {}
        Err(e) => tracing::warn!("cannot notify systemd through NOTIFY_SOCKET: {e}"),
    }
}

/// SIGINT and SIGTERM, delivered by a small thread into a channel the control loop selects on.
fn signal_channel() -> std::io::Result<crossbeam_channel::Receiver<i32>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let (tx, rx) = crossbeam_channel::bounded(4);
    std::thread::Builder::new()
        .name("corecast-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if tx.send(sig).is_err() {
                    break;
                }
            }
        })?;
    Ok(rx)
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
