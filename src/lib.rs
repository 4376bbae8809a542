//! corecast: a thread-per-core TCP broadcast relay on glommio (io_uring), wire-compatible
//! with the Summoner relay server.
//!
//! Architecture map, one room per behaviour. Modules are listed top to bottom and each
//! uses only modules listed below it (the unit test in `src/layering.rs` checks
//! it), so a line can be followed from its read to its writes going down only. See README
//! "How it works" and docs/design.md.
//!
//! The process ([`run`] drives it):
//! - [`executor`]: one pinned glommio executor per shard, each on its own thread; a
//!   shard's start-up steps, its tasks (receivers, flush task, timers, accept loop) and
//!   its drain.
//! - [`startup`]: checks run before anything starts (io_uring, memlock, port in use), the
//!   port guard held for the life of the process, and the listening sockets;
//!   [`preflight`] is what `check` runs too.
//! - [`admin`]: the optional HTTP endpoint (`/metrics`, `/healthz`, `/stats`, `/connections`), hyper on its
//!   own thread. [`sd_notify`]: systemd readiness (`READY=1`, `STOPPING=1`).
//!
//! One shard, from an accepted socket to the writes it causes:
//! - [`listener`]: the accept loop and admission (allow/deny lists, quarantine, connection
//!   slots, per-host slots and refusal slots, all RAII guards); with the PROXY protocol on,
//!   `listener/proxy_header.rs` reads each connection's header first.
//! - [`connection`]: one client's task: `connection/reader.rs` (framing, rate limit, sender
//!   pauses), `connection/writer.rs` (drains a stalled outbox), the close path and notices.
//! - [`shard`]: the per-shard context those tasks share: its fan-out, its drain, its
//!   refusal slots.
//! - [`fanout`]: the component that owns the fan-out state (clients, outgoing batch, write
//!   schedule) and the tasks that drive it: the flush task and a receive loop per peer
//!   (`fanout/flush.rs`); stall tracking and the slow-consumer close (`fanout/stalls.rs`);
//!   read scheduling, read turns and the ready set (`fanout/reads.rs`).
//! - [`client`]: one recipient's outbox and the socket writes that drain it; a write
//!   returns what happened ([`client::WriteOutcome`], [`client::Written`]).
//! - [`pacing`]: the write-pass clock and the write schedule ([`pacing::Schedule`]).
//!
//! Shared between shards:
//! - [`shared`]: what all shards share on purpose (config, policies, quarantine, published
//!   stages and queued memory, connection slots, counters, start-up steps, the cluster).
//! - [`shutdown`]: the signal that starts every shard's drain, and a shard's drain state.
//!
//! Policies and facilities (pure, or one system facility each):
//! - [`ready_set`]: the epoll set a busy shard reads occasional senders from at its runs.
//! - [`socket`]: the one owner of a client's stream and descriptor, plain TCP or TLS
//!   (rustls): every read, write, farewell and epoll registration goes through it.
//! - [`limiter`], [`quarantine`], [`metrics`], [`backpressure`]: the policies (clock passed
//!   in) and the per-shard counters with the close-reason and drop-reason enums;
//!   [`host_limit`]: the process-wide count of connections per client IP.
//! - [`log`]: console, file and JSON log sinks in the Summoner format.
//! - [`notify`]: the shard-local wake-ups tasks wait on.
//! - [`config`]: CLI flags and `server_config.json` → one validated [`config::Config`],
//!   every key declared once in the table of `config/keys.rs` (parsing, errors, defaults,
//!   `check`'s JSON, what a reload applies, the docs table); its defaults come from a
//!   [`machine::Machine`]; [`tls`] checks the TLS section's files and builds the rustls
//!   configuration.
//!
//! What the configuration and the fan-out stand on:
//! - [`cluster`]: optional: several nodes as one broadcast domain over NATS. The uplink,
//!   on its own thread, is one more mesh peer of every shard ([`cluster::attach`], called
//!   by [`executor`]); it moves batches and knows nothing of clients.
//! - [`batch`]: envelopes encoded once and shared by every recipient; the ledger of queued
//!   memory.
//! - [`mesh`]: the bounded lock-free SPSC channel between shards and the full mesh of them.
//! - [`protocol`]: line framing and envelope encoding (no I/O).
//! - [`supervisor`]: restarts the admin and uplink threads after a panic, with backoff,
//!   and counts it.
//! - [`proxy_protocol`]: the PROXY protocol v1/v2 header decoder (no I/O); [`netlist`]:
//!   sets of CIDR networks for `allow`, `deny` and `proxy_trusted`.
//! - [`machine`]: facts about the machine (usable CPUs, open-file and locked-memory
//!   limits), read once by `main` and handed to [`config::Config::load`]; [`startup`] and
//!   [`executor`] read them too.
//! - `glibc_compat` (Linux with glibc only): the libc functions newer than glibc 2.17 that
//!   dependencies call, defined here as raw system calls so the release binary links
//!   against glibc 2.17 (manylinux2014).
//!
//! A line's path: `connection/reader.rs` frames it → [`fanout::Fanout::relay`] appends its
//! envelope to the shard's outgoing batch → the flush task (`fanout/flush.rs`) takes the
//! batch at its next run → [`fanout::Fanout::deliver`] queues it in every local
//! [`client::Client`]'s outbox, and [`fanout::Peers`] hands it to every peer shard (and,
//! in a cluster, to the uplink, which publishes it; other nodes' batches come back through
//! the uplink like a peer's), whose [`fanout::receive_loop`] delivers it the same way →
//! the write schedule says who is due
//! → [`client::Client::write_now`] writes each with one `sendmsg`. A socket that refuses
//! data returns [`client::WriteOutcome::Stalled`]: `fanout/stalls.rs` applies the
//! backpressure policy, and `connection/writer.rs` drains the rest when there is room.
//!
//! Reload: SIGHUP makes [`run_reloadable`]'s control loop read the config again through
//! `main`'s source; [`config::Config::reloaded`] keeps the restart-only keys, and
//! [`shared::Shared::reload`] publishes the rest, which each shard's heartbeat copies into
//! its `Cell`-held tunables (no atomic per line).
//!
//! Start-up: [`run`] spawns the shards and waits up to 10 s for each to report that it is
//! accepting; a shard that does not is named with the step it is stuck at, and a signal
//! meanwhile drains what has started and exits 0.

pub mod admin;
pub mod backpressure;
pub mod batch;
pub mod client;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod executor;
pub mod fanout;
pub mod host_limit;
pub mod limiter;
pub mod listener;
pub mod log;
pub mod machine;
pub mod mesh;
pub mod metrics;
pub mod netlist;
pub mod notify;
pub mod pacing;
pub mod protocol;
pub mod proxy_protocol;
pub mod quarantine;
pub mod ready_set;
pub mod sd_notify;
pub mod shard;
pub mod shared;
pub mod shutdown;
pub mod socket;
pub mod startup;
pub mod supervisor;
pub mod tls;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc_compat;

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use config::Config;
use executor::ShardEvent;
use metrics::ShardState;
use shared::Shared;
use signal_hook::consts::SIGHUP;
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

/// How long the main thread waits for every shard to report that it is accepting. A shard
/// waits for nothing but its own thread (the mesh has no connect step), so this is only
/// reached when a thread gets no CPU time or an executor cannot be created.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a new executor may take to run its first task before the main thread wakes it
/// (it takes microseconds unless glommio parked it; see `executor::kick`).
const FIRST_RUN_PATIENCE: Duration = Duration::from_millis(100);
/// A running shard whose heartbeat (every `executor::HEARTBEAT_INTERVAL`) is older than this
/// is woken with [`executor::kick`]: glommio 0.9 can park a running executor with its tasks
/// queued, the heartbeat's among them, and then nothing is armed to wake it (see
/// `executor::kick`). A shard that is merely busy loses nothing by the signal.
const HEARTBEAT_PATIENCE: Duration = Duration::from_millis(750);

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

/// Everything `serve` refuses before it listens, and what `corecast check` runs too (after
/// the config itself and the log file, see [`log::check_file`]): io_uring and locked
/// memory for `config.shards`, the listen host (it must resolve, and its address must be
/// one this machine can bind, on a port this process may use), and the admin address
/// (the same, and not overlapping the listen port). Returns the resolved listen address.
///
/// Nothing listens: each address is bound once and closed at once. A port that something
/// already uses is not an error here (`check` may well run beside the relay it is about to
/// replace); `run` checks that next, under its [`startup::PortGuard`].
pub fn preflight(config: &Config) -> Result<SocketAddr, Error> {
    startup::check_io_uring()?;
    startup::check_memlock()?;
    let addr = resolve(&config.host, config.port)?;
    let in_use = |e: &std::io::Error| e.raw_os_error() == Some(libc::EADDRINUSE);
    match startup::probe_bind(addr) {
        Err(e) if !in_use(&e) => return Err(startup::listen_error(addr, e).into()),
        _ => {}
    }
    if let Some(admin) = config.admin_addr {
        let admin_error = |e: std::io::Error| Error::Admin {
            addr: admin,
            reason: e.to_string(),
        };
        if overlaps(admin, addr) {
            return Err(admin_error(std::io::Error::from_raw_os_error(libc::EADDRINUSE)));
        }
        match startup::probe_bind(admin) {
            Err(e) if !in_use(&e) => return Err(admin_error(e)),
            _ => {}
        }
    }
    if let Some(tls) = &config.tls {
        let tls_error = |e: std::io::Error| startup::listen_error(tls.listen, e);
        let taken = overlaps(tls.listen, addr) || config.admin_addr.is_some_and(|a| overlaps(tls.listen, a));
        if taken {
            return Err(tls_error(std::io::Error::from_raw_os_error(libc::EADDRINUSE)).into());
        }
        match startup::probe_bind(tls.listen) {
            Err(e) if !in_use(&e) => return Err(tls_error(e).into()),
            _ => {}
        }
    }
    Ok(addr)
}

/// Whether a plain listener on `a` would collide with the relay's SO_REUSEPORT listeners on
/// `b`: same fixed port, and the same IP or a wildcard on either side.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    let wildcard_covers =
        |w: SocketAddr, other: SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || other.is_ipv4());
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || wildcard_covers(a, b) || wildcard_covers(b, a))
}

/// Where a SIGHUP reload reads the config from: the file and flags `main` loaded it from,
/// giving the new config and its warnings, or why it is invalid.
pub type ConfigSource = Box<dyn FnMut() -> Result<(Config, Vec<String>), config::ConfigError> + Send>;

/// Runs the relay until SIGINT/SIGTERM has drained it (`Ok`) or a shard fails (`Err`), with
/// no file to reload: SIGHUP re-applies `config` (a no-op). See [`run_reloadable`].
pub fn run(config: Config) -> Result<(), Error> {
    let same = config.clone();
    run_reloadable(config, Box::new(move || Ok((same.clone(), Vec::new()))))
}

/// Runs the relay until SIGINT/SIGTERM has drained it (`Ok`) or a shard fails (`Err`);
/// SIGHUP reloads the config from `source` (docs/protocol.md#reload). Start-up failures
/// return before anything listens.
pub fn run_reloadable(mut config: Config, source: ConfigSource) -> Result<(), Error> {
    let mut reloader = Reloader {
        source,
        loaded: config.clone(),
    };
    let addr = preflight(&config)?;
    let nofile = machine::raise_nofile_limit();
    let rings = plan_rings(&mut config);
    // Held until `run` returns (or the kernel drops it when the process exits).
    let _port_guard = startup::PortGuard::acquire(addr)?;
    startup::check_port_free(addr)?;
    #[cfg(debug_assertions)]
    test_listen_delay();
    let (bound, listeners) = startup::bind_listeners(addr, config.shards)?;
    // The TLS listener, one socket per shard as for plain TCP, and its rustls configuration
    // (built again from the files `Config::load` checked).
    let mut _tls_port_guard = None;
    let tls = match &config.tls {
        None => None,
        Some(tls) => {
            _tls_port_guard = Some(startup::PortGuard::acquire(tls.listen)?);
            startup::check_port_free(tls.listen)?;
            let server = tls::server_config(tls, "hyper_parameters.tls")
                .map_err(|e| Error::Shard(format!("cannot set up TLS: {e}")))?;
            let (bound, fds) = startup::bind_listeners(tls.listen, config.shards)?;
            Some((bound, executor::TlsListeners { fds, server }))
        }
    };
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
    let purge_every = Duration::from_secs(config.quarantine_cleanup_interval_secs);
    let shared = Arc::new(Shared::new(config));
    if let Some((_, listeners)) = &tls {
        shared.tls_server.store(Some(listeners.server.clone()));
    }
    let (events_tx, events) = crossbeam_channel::bounded(4 * shards + 16);
    let cpus = machine::usable_cpus().len().max(1);
    tracing::info!(
        shards,
        cpus,
        "starting {}{}",
        counted(shards, "shard", "shards") + " on " + &counted(cpus, "CPU", "CPUs"),
        if shards > cpus {
            " (several shards share a CPU)"
        } else {
            ""
        }
    );
    let tls_bound = tls.as_ref().map(|(bound, _)| *bound);
    let handles = executor::spawn_all(
        shared.clone(),
        listeners,
        tls.map(|(_, l)| l),
        events_tx,
        rings.ring_depth,
    )
    .map_err(|e| Error::Shard(format!("cannot start shards: {e}")))?;

    // Start-up: every shard reports `Started` by the deadline, or the one that did not is
    // named with its step. A signal meanwhile drains whatever has started, and exits 0 as
    // a signal after start-up does.
    let timeout = startup_timeout();
    let startup_deadline = Instant::now() + timeout;
    let mut started = 0;
    // Shards whose executor had not run its first task at the last look (see `executor::kick`).
    let mut waiting_first_run = vec![false; shards];
    let mut next_look = Instant::now() + FIRST_RUN_PATIENCE;
    while started < shards {
        crossbeam_channel::select! {
            recv(signals) -> sig => {
                if sig == Ok(SIGHUP) {
                    reloader.reload(&shared);
                    continue;
                }
                let why = format!("{} received during start-up", signal_name(sig.ok()));
                let drain = Draining::start(&shared, &why);
                return control_loop(&shared, &signals, &events, handles, Some(drain), purge_every, reloader);
            }
            recv(events) -> event => match event {
                Ok(ShardEvent::Started(_)) => started += 1,
                Ok(ShardEvent::Stopped(id)) => return Err(shard_failure(id, handles)),
                Err(_) => return Err(Error::Shard("all shards exited".into())),
            },
            recv(crossbeam_channel::at(startup_deadline.min(next_look))) -> _ => {
                if Instant::now() >= startup_deadline {
                    return Err(startup_failure(&shared, timeout));
                }
                for (id, waited) in waiting_first_run.iter_mut().enumerate() {
                    let waiting = shared.startup_step(id) == shared::StartupStep::FirstRun;
                    if waiting && *waited {
                        tracing::debug!("shard {id}: its executor sleeps before its first run; waking it");
                        executor::kick(&handles[id]);
                    }
                    *waited = waiting;
                }
                next_look = Instant::now() + FIRST_RUN_PATIENCE;
            }
        }
    }
    tracing::info!(
        shards,
        "listening on {bound} with {} (open-file limit {nofile})",
        counted(shards, "shard", "shards")
    );
    if let Some(at) = tls_bound {
        // After the line above, which the harness and scripts look for first.
        tracing::info!("listening for TLS on {at}");
    }
    if let Some(listener) = admin {
        let at = listener.local_addr().map_err(|e| Error::Admin {
            addr: shared.config.admin_addr.unwrap_or(bound),
            reason: e.to_string(),
        })?;
        let limits = admin::Limits::for_open_files(nofile);
        admin::spawn(listener, shared.clone(), limits).map_err(|e| Error::Admin {
            addr: at,
            reason: e.to_string(),
        })?;
        tracing::info!(
            "admin listening on {at} (/metrics, /healthz, /stats, /connections; at most {} connections)",
            limits.max_connections
        );
    }
    systemd_notify(&format!(
        "READY=1\nSTATUS=listening on {bound} with {}",
        counted(shards, "shard", "shards")
    ));
    control_loop(&shared, &signals, &events, handles, None, purge_every, reloader)
}

/// What SIGHUP reloads from, and what the file and flags said the last time they were
/// read: a key that needs a restart is reported when the file changes it, not because the
/// relay runs with another value (`run` may start fewer shards than asked for).
struct Reloader {
    source: ConfigSource,
    loaded: Config,
}

impl Reloader {
    /// SIGHUP: reads the config again and applies it, or keeps the running one whole if it
    /// is invalid. Keys that need a restart keep their running values and are named in the
    /// log.
    fn reload(&mut self, shared: &Shared) {
        let (new, warnings) = match (self.source)() {
            Ok(loaded) => loaded,
            Err(e) => {
                metrics::CONFIG_RELOADS.on_reload(false);
                tracing::error!("SIGHUP: config reload refused, the running config is kept: {e}");
                return;
            }
        };
        for w in &warnings {
            tracing::warn!("SIGHUP: {w}");
        }
        let outcome = shared.live().reloaded(new.clone(), &self.loaded);
        // The certificate files are read again (rotation); if they no longer load, the
        // whole reload is refused like an invalid file.
        let tls_server = match &outcome.config.tls {
            None => None,
            Some(tls) => match tls::server_config(tls, "hyper_parameters.tls") {
                Ok(server) => Some(server),
                Err(e) => {
                    metrics::CONFIG_RELOADS.on_reload(false);
                    tracing::error!("SIGHUP: config reload refused, the running config is kept: {e}");
                    return;
                }
            },
        };
        self.loaded = new;
        if tls_server.is_some() {
            shared.tls_server.store(tls_server);
        }
        for key in &outcome.kept {
            tracing::warn!("SIGHUP: {key} changed but needs a restart; the running value is kept");
        }
        log::set_level(outcome.config.log.level);
        shared.reload(outcome.config);
        metrics::CONFIG_RELOADS.on_reload(true);
        if outcome.applied.is_empty() {
            tracing::info!("SIGHUP: config reloaded; no key that applies live changed");
        } else {
            tracing::info!("SIGHUP: config reloaded; applied {}", outcome.applied.join(", "));
        }
    }
}

/// Sizes the shards' io_uring rings by the locked-memory limit (raised to its hard limit
/// first) and, if even the smallest rings of every shard do not fit, lowers
/// `config.shards` to what fits: one warning line says so. Never refuses: glommio's own
/// floor was checked by [`preflight`].
fn plan_rings(config: &mut Config) -> machine::RingPlan {
    machine::raise_memlock_limit();
    let plan = machine::plan_rings(config.shards, machine::charged_memlock_limit());
    let kib = |b: u64| b >> 10;
    if let Some(short) = fewer_shards_warning(config, &plan) {
        tracing::warn!("{short}");
        config.shards = plan.shards;
    } else if let Some(limit) = plan.limit {
        tracing::info!(
            "io_uring rings of {} entries: {} KiB of locked memory per shard, {} KiB for {} shards (limit {} KiB)",
            plan.ring_depth,
            kib(plan.locked_per_shard),
            kib(plan.locked_per_shard * plan.shards as u64),
            plan.shards,
            kib(limit)
        );
    }
    plan
}

/// The one line that says `plan` starts fewer shards than `config` asks for, if it does.
fn fewer_shards_warning(config: &Config, plan: &machine::RingPlan) -> Option<String> {
    let kib = |b: u64| b >> 10;
    (plan.shards < config.shards).then(|| {
        format!(
            "locked-memory limit (RLIMIT_MEMLOCK) of {} KiB holds the io_uring rings of {} shards, not {}: starting {} ({} KiB each at {} entries per ring; raise it with `ulimit -l` or LimitMEMLOCK= to run them all)",
            kib(plan.limit.unwrap_or(0)),
            plan.shards,
            config.shards,
            plan.shards,
            kib(plan.locked_per_shard),
            plan.ring_depth
        )
    })
}

/// What `corecast check` warns about the locked-memory limit: the line `serve` would log if
/// it would start fewer shards than asked for. It reads the hard limit, to which `serve`
/// raises the soft one, and raises nothing itself.
pub fn check_rings(config: &Config) -> Option<String> {
    let plan = machine::plan_rings(config.shards, machine::charged_memlock_limit_after_raise());
    fewer_shards_warning(config, &plan)
}

/// `1 shard`, `2 shards`: log lines count in words.
fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A drain in progress: when it must be over.
struct Draining {
    deadline: Instant,
}

impl Draining {
    /// Starts every shard's drain, bounded by the shutdown grace (as last reloaded); `why`
    /// opens the log line.
    fn start(shared: &Shared, why: &str) -> Draining {
        let grace = Duration::from_millis(shared.live().shutdown_grace_ms);
        tracing::info!("{why}; draining (grace {} ms)", grace.as_millis());
        systemd_notify("STOPPING=1\nSTATUS=draining");
        shared.shutdown.trigger();
        // Margin past the grace: the shards bound their own drain by it.
        Draining {
            deadline: Instant::now() + grace + Duration::from_millis(500),
        }
    }
}

/// The control loop: signals (SIGHUP reloads, the others drain), shard exits, and the
/// quarantine purge, until every shard has drained (`Ok`) or one stops on its own (`Err`).
/// `drain` is set when a signal came during start-up; shards still starting then start and
/// drain at once.
fn control_loop(
    shared: &Shared,
    signals: &crossbeam_channel::Receiver<i32>,
    events: &crossbeam_channel::Receiver<ShardEvent>,
    handles: Vec<executor::ShardThread>,
    mut drain: Option<Draining>,
    purge_every: Duration,
    mut reloader: Reloader,
) -> Result<(), Error> {
    let shards = shared.config.shards;
    let mut stopped = 0;
    let mut next_purge = Instant::now() + purge_every;
    let mut next_watch = Instant::now() + executor::HEARTBEAT_INTERVAL;
    loop {
        let next = next_purge.min(next_watch);
        let wake_at = drain.as_ref().map_or(next, |d| d.deadline.min(next));
        crossbeam_channel::select! {
            recv(signals) -> sig => {
                if sig == Ok(SIGHUP) {
                    if drain.is_some() {
                        tracing::info!("SIGHUP during the drain; not reloading");
                    } else {
                        reloader.reload(shared);
                    }
                    continue;
                }
                let name = signal_name(sig.ok());
                if drain.is_some() {
                    tracing::warn!("second signal ({name}) during the drain; exiting now");
                    std::process::exit(shutdown::EXIT_SECOND_SIGNAL);
                }
                drain = Some(Draining::start(shared, &format!("{name} received")));
            }
            recv(events) -> event => match event {
                Ok(ShardEvent::Stopped(id)) if drain.is_none() => return Err(shard_failure(id, handles)),
                Ok(ShardEvent::Stopped(_)) => {
                    stopped += 1;
                    if stopped == shards {
                        tracing::info!("all shards drained; exiting");
                        return Ok(());
                    }
                }
                // A shard that was still starting when the drain began.
                Ok(ShardEvent::Started(_)) if drain.is_some() => {}
                Ok(ShardEvent::Started(id)) => return Err(Error::Shard(format!("shard {id} started twice"))),
                Err(_) => return Err(Error::Shard("all shards exited".into())),
            },
            recv(crossbeam_channel::at(wake_at)) -> _ => {
                let now = Instant::now();
                if drain.as_ref().is_some_and(|d| now >= d.deadline) {
                    tracing::warn!("shutdown grace exceeded; exiting with connections still open");
                    return Ok(());
                }
                if now >= next_purge {
                    shared.quarantine.purge(now);
                    next_purge = now + purge_every;
                }
                if now >= next_watch {
                    wake_parked_shards(shared, &handles);
                    next_watch = now + executor::HEARTBEAT_INTERVAL;
                }
            }
        }
    }
}

/// Debug builds only: sleeps `CORECAST_TEST_LISTEN_DELAY_MS` between the port checks and
/// the listeners' bind, widening the window in which two relays started together could
/// both pass the probe, so the tests can show that the port guard closes it.
#[cfg(debug_assertions)]
fn test_listen_delay() {
    if let Some(ms) = std::env::var("CORECAST_TEST_LISTEN_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// Kicks every running shard whose heartbeat is older than [`HEARTBEAT_PATIENCE`].
fn wake_parked_shards(shared: &Shared, handles: &[executor::ShardThread]) {
    let now_ms = shared.clock_ms();
    for (id, handle) in handles.iter().enumerate() {
        let stats = &shared.stats[id];
        let age = now_ms.saturating_sub(stats.last_heartbeat_ms());
        let running = matches!(stats.state(), ShardState::Running | ShardState::Draining);
        if running && age > HEARTBEAT_PATIENCE.as_millis() as u64 {
            tracing::debug!("shard {id}: no heartbeat for {age} ms; waking it");
            stats.on_kick();
            executor::kick(handle);
        }
    }
}

fn signal_name(sig: Option<i32>) -> &'static str {
    if sig == Some(signal_hook::consts::SIGINT) {
        "SIGINT"
    } else {
        "SIGTERM"
    }
}

/// How long the shards have to start. Debug builds take `CORECAST_TEST_STARTUP_TIMEOUT_MS`
/// so the tests can show the failure without waiting the full time.
fn startup_timeout() -> Duration {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("CORECAST_TEST_STARTUP_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Duration::from_millis(ms);
    }
    STARTUP_TIMEOUT
}

/// The error for shards that did not start in time: the first one, and its step.
fn startup_failure(shared: &Shared, timeout: Duration) -> Error {
    let late: Vec<(usize, shared::StartupStep)> = (0..shared.config.shards)
        .map(|id| (id, shared.startup_step(id)))
        .filter(|&(_, step)| step != shared::StartupStep::Started)
        .collect();
    let within = format_duration(timeout);
    match late.as_slice() {
        [] => Error::Shard(format!("shards did not report their start within {within}")),
        [(id, step), rest @ ..] => {
            let others = match rest.len() {
                0 => String::new(),
                1 => "; 1 other shard had not started either".into(),
                n => format!("; {n} other shards had not started either"),
            };
            Error::Shard(format!(
                "shard {id} did not start within {within} (stuck at: {}){others}",
                step.describe()
            ))
        }
    }
}

/// `10 s`, or `1500 ms` when not a whole number of seconds.
fn format_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
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

/// SIGINT, SIGTERM and SIGHUP, delivered by a small thread into a channel the control loop
/// selects on.
fn signal_channel() -> std::io::Result<crossbeam_channel::Receiver<i32>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
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
fn shard_failure(id: usize, handles: Vec<executor::ShardThread>) -> Error {
    let detail = handles
        .into_iter()
        .nth(id)
        .map(|h| match h.join() {
            Ok(Ok(())) => "its accept loop ended".to_string(),
            Ok(Err(reason)) => reason,
            Err(panic) => match panic.downcast_ref::<&str>() {
                Some(msg) => format!("its thread panicked: {msg}"),
                None => match panic.downcast_ref::<String>() {
                    Some(msg) => format!("its thread panicked: {msg}"),
                    None => "its thread panicked".to_string(),
                },
            },
        })
        .unwrap_or_default();
    Error::Shard(format!("shard {id} stopped: {detail}"))
}

#[cfg(test)]
mod layering;
