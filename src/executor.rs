//! Executors: one glommio executor per shard, each pinned to its CPU and on a thread of its
//! own, and the tasks that make up a running shard. [`spawn_all`] starts them from the main
//! thread, each with its listener and its ends of the mesh; `shard_main` builds the
//! shard's context and starts its receivers, its flush task, its timers and its accept
//! loop, then drains it at shutdown.
//!
//! A shard's start-up waits for nothing from its peers (the mesh ends work as soon as they
//! exist); it records each [`StartupStep`] so that the main thread can name a shard that
//! does not start, and the main thread [`kick`]s an executor that glommio parked before it
//! ran the shard's first task.

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use futures_lite::future::or;
use glommio::{LocalExecutorBuilder, Placement};

use crate::fanout::{self, Fanout, MeshEnds, Peers};
use crate::machine::{usable_cpus, IO_MEMORY_BYTES, RING_DEPTHS};
use crate::metrics::{Counter, DropReason, ShardState, ShardStats};
use crate::shard::Shard;
use crate::shared::{Shared, StartupStep};

/// How long a busy shard may run tasks before it polls for I/O, timers and channel wake-ups
/// (glommio's default, 100 ms, would delay all of them that long under load).
const PREEMPT_TIMER: Duration = Duration::from_millis(2);
/// Period of the summary log lines for repeated events (drops, refusals).
const SUMMARY_INTERVAL: Duration = Duration::from_secs(1);
/// How often a shard's timer task proves that its thread is still running tasks (the
/// admin endpoint's `/healthz` reads it; see `admin::HEARTBEAT_STALE`).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);

/// What a shard tells the main thread (crossbeam, `try_send`: never blocks a shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardEvent {
    /// The shard is connected to its peers and accepting.
    Started(usize),
    /// The shard's thread ended (or never started).
    Stopped(usize),
}

/// Sends `Stopped` (and marks the shard stopped for `/healthz`) when a shard's future ends,
/// unwinds, or is dropped without ever running.
struct StopGuard {
    id: usize,
    events: Sender<ShardEvent>,
    stats: Arc<ShardStats>,
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.stats.set_state(ShardState::Stopped);
        let _ = self.events.try_send(ShardEvent::Stopped(self.id));
    }
}

/// A shard's thread as the main thread holds it: it ends with why its executor could not
/// be created, or `Ok` once the shard's future has returned.
pub type ShardThread = std::thread::JoinHandle<Result<(), String>>;

/// The signal [`kick`] sends. Its default action is to ignore it, so nothing else in the
/// process expects it; corecast uses no out-of-band TCP data (its other meaning).
const KICK_SIGNAL: libc::c_int = libc::SIGURG;

/// Starts one pinned executor per listener, each on its own thread, with rings of
/// `ring_depth` entries (see `machine::plan_rings`). Shard `i` runs on the `i`-th usable
/// CPU (wrapping around when there are more shards than CPUs).
pub fn spawn_all(
    shared: Arc<Shared>,
    listeners: Vec<OwnedFd>,
    tls: Option<TlsListeners>,
    events: Sender<ShardEvent>,
    ring_depth: usize,
) -> std::io::Result<Vec<ShardThread>> {
    let (mut tls_fds, tls_server) = match tls {
        Some(TlsListeners { fds, server }) => (fds.into_iter().map(Some).collect(), Some(server)),
        None => (Vec::new(), None),
    };
    install_kick_handler()?;
    let cpus = usable_cpus();
    let mut mesh = fanout::build_mesh(listeners.len());
    // With a cluster, the uplink is one more peer of every shard (see `cluster`).
    if let Some(cluster) = &shared.cluster {
        crate::cluster::attach(cluster.clone(), &mut mesh, fanout::MESH_CAPACITY)?;
    }
    let mut handles = Vec::with_capacity(listeners.len());
    for (id, (listener, ends)) in listeners.into_iter().zip(mesh).enumerate() {
        let placement = match cpus.get(id % cpus.len().max(1)) {
            Some(&cpu) => Placement::Fixed(cpu),
            None => Placement::Unbound,
        };
        let shared = shared.clone();
        let tls = tls_fds.get_mut(id).and_then(Option::take).zip(tls_server.clone());
        let guard = StopGuard {
            id,
            events: events.clone(),
            stats: shared.stats[id].clone(),
        };
        // `make` + `run` on our own thread instead of `LocalExecutorBuilder::spawn`, so
        // that the shard can report that its executor exists before its first run.
        let handle = std::thread::Builder::new()
            .name(format!("corecast-shard{id}"))
            .spawn(move || {
                let executor = make_executor(id, placement, ring_depth)?;
                shared.set_startup_step(id, StartupStep::FirstRun);
                executor.run(shard_main(id, shared, listener, tls, ends, guard));
                Ok(())
            })?;
        handles.push(handle);
    }
    Ok(handles)
}

/// Executors are created one at a time (see [`make_executor`]).
static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Creates shard `id`'s executor with rings of `ring_depth` entries, then takes back the
/// locked memory glommio's DMA arena holds ([`release_registered_buffers`]). One at a time,
/// so that the arena's moment of 192 KiB never takes the room another shard's rings were
/// planned in. If the kernel refuses the rings for lack of locked memory (another process
/// of the same user holds some: the kernel counts per user), it tries the next smaller
/// depth before giving up.
fn make_executor(id: usize, placement: Placement, ring_depth: usize) -> Result<glommio::LocalExecutor, String> {
    // A shard that panicked while holding it poisoned nothing: the lock guards no data.
    let _one_at_a_time = CREATING.lock().unwrap_or_else(|p| p.into_inner());
    let mut depths = RING_DEPTHS.into_iter().filter(|&d| d <= ring_depth).peekable();
    loop {
        let depth = depths.next().unwrap_or(ring_depth);
        let made = LocalExecutorBuilder::new(placement.clone())
            .io_memory(IO_MEMORY_BYTES)
            .preempt_timer(PREEMPT_TIMER)
            .ring_depth(depth)
            .make();
        match made {
            Ok(executor) => {
                release_registered_buffers();
                if depth < ring_depth {
                    tracing::warn!(
                        "shard {id}: rings of {depth} entries instead of {ring_depth}: the locked-memory limit is shared with other processes of this user"
                    );
                }
                return Ok(executor);
            }
            Err(e) if is_out_of_memory(&e) && depths.peek().is_some() => continue,
            Err(e) => return Err(format!("cannot create its executor: {e}")),
        }
    }
}

fn is_out_of_memory(e: &glommio::GlommioError<()>) -> bool {
    match e {
        glommio::GlommioError::IoError(io) => io.raw_os_error() == Some(libc::ENOMEM),
        _ => false,
    }
}

/// Unregisters the buffers registered with every io_uring ring of the process. glommio
/// registers its DMA arena with each of an executor's three rings, pinning it and charging
/// it to RLIMIT_MEMLOCK; only DMA file I/O uses it, and corecast does none (were it ever
/// to, this would have to go). Rings already without buffers answer ENXIO, harmlessly;
/// the rings are glommio's, since nothing else in corecast keeps one open.
fn release_registered_buffers() {
    const IORING_UNREGISTER_BUFFERS: libc::c_long = 1;
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in fds.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<libc::c_int>().ok()) else {
            continue;
        };
        // Only anonymous inodes (no file type bits: io_uring, eventfd, epoll) are worth the
        // readlink; sockets, which are most descriptors, are skipped with one fstat.
        // SAFETY: fstat writes into the struct we own; a closed fd only fails.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != 0 {
            continue;
        }
        if std::fs::read_link(entry.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:[io_uring]") {
            // SAFETY: io_uring_register with no argument array; on anything but an io_uring
            // fd (one closed and reused meanwhile) it fails without effect.
            unsafe {
                libc::syscall(
                    libc::SYS_io_uring_register,
                    fd as libc::c_long,
                    IORING_UNREGISTER_BUFFERS,
                    std::ptr::null::<libc::c_void>(),
                    0,
                );
            }
        }
    }
}

/// Interrupts a shard thread's sleep in `io_uring_enter` with a no-op signal.
///
/// Why: glommio 0.9's run loop can park with a task queued and not run. Each turn arms a
/// 2 ms preempt timer, then `run_task_queues` returns at once, running nothing, if that
/// timer has already fired (the thread was descheduled in between, as happens when
/// several shards share a CPU); the park that follows counts only wakers woken in that
/// pass and sleeps. A new executor has nothing armed, so its first task, the shard
/// itself, can wait forever: 22 starts of 8 to 32 shards on 2 CPUs hung about once in ten
/// series without this. A running shard can be caught the same way once the task queued
/// is its heartbeat's (no timer is armed until that task runs): one such hang was seen in
/// a test, so the control loop also kicks any shard whose heartbeat has gone stale. The
/// signal makes the sleep return `EINTR`, which glommio treats as a wake-up, and the next
/// turn runs the queued task.
pub fn kick(thread: &ShardThread) {
    // SAFETY: the pthread_t belongs to a thread we have not joined, so it is valid; the
    // signal's handler does nothing.
    unsafe {
        libc::pthread_kill(thread.as_pthread_t(), KICK_SIGNAL);
    }
}

/// A handler that does nothing for [`KICK_SIGNAL`], without `SA_RESTART` so that the sleep
/// it interrupts returns instead of resuming.
fn install_kick_handler() -> std::io::Result<()> {
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: a zeroed sigaction with an empty mask and a handler that touches nothing is
    // valid; sigaction only reads it.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ignore as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(KICK_SIGNAL, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The TLS listener's sockets, one per shard, and the configuration its handshakes use.
pub struct TlsListeners {
    pub fds: Vec<OwnedFd>,
    pub server: Arc<rustls::ServerConfig>,
}

async fn shard_main(
    id: usize,
    shared: Arc<Shared>,
    listener: OwnedFd,
    tls: Option<(OwnedFd, Arc<rustls::ServerConfig>)>,
    ends: MeshEnds,
    guard: StopGuard,
) {
    // Nothing below waits for another shard: the mesh ends work as they are, so a shard's
    // start-up depends only on its own thread getting CPU time.
    shared.set_startup_step(id, StartupStep::SettingUp);
    let shard = Rc::new(Shard::new(id, shared.clone()));
    let fanout = shard.fanout.clone();
    shared.set_startup_step(id, StartupStep::AttachingMesh);
    #[cfg(debug_assertions)]
    test_startup_stall(id);
    let MeshEnds { to_peers, from_peers } = ends;
    for from_peer in from_peers {
        fanout::spawn_receiver(&fanout, from_peer);
    }
    glommio::spawn_local(fanout::flush_loop(fanout.clone(), Peers::new(to_peers))).detach();
    shared.set_startup_step(id, StartupStep::StartingListener);
    if let Some(timeout) = shard.config().client_timeout_secs {
        glommio::spawn_local(idle_sweep_loop(shard.clone(), Duration::from_secs(timeout))).detach();
    }
    glommio::spawn_local(summary_loop(shard.clone())).detach();
    glommio::spawn_local(lag_sweep_loop(fanout.clone())).detach();
    glommio::spawn_local(heartbeat_loop(shard.clone())).detach();
    // SAFETY: the fd is a listening TCP socket we own; from here glommio owns it.
    let listener = unsafe { glommio::net::TcpListener::from_raw_fd(listener.into_raw_fd()) };
    // SAFETY: as above, the TLS listener's socket.
    let tls = tls.map(|(fd, server)| {
        (
            unsafe { glommio::net::TcpListener::from_raw_fd(fd.into_raw_fd()) },
            server,
        )
    });
    shard.stats.on_heartbeat(shared.clock_ms());
    shard.stats.set_state(ShardState::Running);
    shared.set_startup_step(id, StartupStep::Started);
    let _ = guard.events.try_send(ShardEvent::Started(id));

    // Dropping the accept loop drops (closes) the listener.
    let tls_accept = async {
        match tls {
            Some((listener, server)) => crate::listener::accept_loop(shard.clone(), listener, Some(server)).await,
            None => std::future::pending().await,
        }
    };
    or(
        or(crate::listener::accept_loop(shard.clone(), listener, None), tls_accept),
        shared.shutdown.wait(),
    )
    .await;
    shard.stats.set_state(ShardState::Draining);
    fanout.begin_shutdown();
    let grace = Duration::from_millis(shared.live().shutdown_grace_ms);
    // Done when every connection task has ended and this shard's own flush and peer
    // receivers have finished (so its senders are closed and its peers can finish their
    // drains too).
    let drained = async {
        shard.drain.connections_closed().await;
        shard.drain.deliveries_finished().await;
        true
    };
    let complete = or(drained, async {
        glommio::timer::sleep(grace).await;
        false
    })
    .await;
    if !complete {
        tracing::warn!(
            shard = id,
            count = fanout.open_clients(),
            "shard {id}: shutdown grace of {} ms ran out with {} connections open; closing them",
            grace.as_millis(),
            fanout.open_clients()
        );
    }
    let s = shard.stats.snapshot();
    tracing::info!(
        shard = id,
        accepted = s.accepted,
        lines_in = s.lines_in,
        envelopes_out = s.envelopes_out,
        bytes_in = s.bytes_in,
        bytes_out = s.bytes_out,
        "shard {id} stopped: {}",
        s.summary()
    );
    drop(guard);
}

/// Closes idle clients, one sweep per `timeout_check_interval_secs`.
async fn idle_sweep_loop(shard: Rc<Shard>, timeout: Duration) {
    let every = Duration::from_secs(shard.config().timeout_check_interval_secs);
    while !shard.is_shutting_down() {
        glommio::timer::sleep(every).await;
        shard.fanout.sweep_idle(timeout, Instant::now());
    }
}

/// Re-examines stalled clients while there are any (see `fanout::stalls`).
async fn lag_sweep_loop(fanout: Rc<Fanout>) {
    fanout.stalls().sweep_loop(|| fanout.is_shutting_down()).await;
}

/// Proves the shard's thread still runs tasks, for `/healthz`, and takes up the limits of
/// a SIGHUP reload (so they apply within one interval). Runs until the executor ends (it
/// is detached, so it does not hold the shard's future open).
async fn heartbeat_loop(shard: Rc<Shard>) {
    loop {
        shard.stats.on_heartbeat(shard.shared.clock_ms());
        if shard.fanout.refresh_tunables() {
            tracing::debug!("shard {}: reloaded limits applied", shard.id);
        }
        glommio::timer::sleep(HEARTBEAT_INTERVAL).await;
    }
}

/// Logs repeated events once per interval as counts instead of one line each.
async fn summary_loop(shard: Rc<Shard>) {
    let stats = &shard.stats;
    let counters: [(&Counter, &str); 4] = [
        (
            stats.drop_counter(DropReason::RateLimited),
            "lines dropped by the rate limiter",
        ),
        (
            stats.drop_counter(DropReason::Quarantined),
            "connections refused from quarantined peers",
        ),
        (
            stats.drop_counter(DropReason::ServerFull),
            "connections refused because the server is full",
        ),
        (&stats.sender_pauses, "sender read pauses for backpressure"),
    ];
    let mut reported = counters.map(|(c, _)| c.get());
    while !shard.is_shutting_down() {
        glommio::timer::sleep(SUMMARY_INTERVAL).await;
        for ((counter, what), last) in counters.iter().zip(reported.iter_mut()) {
            let now = counter.get();
            if now > *last {
                tracing::warn!(
                    shard = shard.id,
                    count = now - *last,
                    "shard {}: {} {what} in the last {} s",
                    shard.id,
                    now - *last,
                    SUMMARY_INTERVAL.as_secs()
                );
                *last = now;
            }
        }
    }
}

/// Debug builds only: blocks shard `N`'s thread for `MS` milliseconds while it attaches the
/// mesh when `CORECAST_TEST_STARTUP_STALL=N:MS`, so the tests can show what a shard that
/// does not start, and a signal during start-up, do.
#[cfg(debug_assertions)]
fn test_startup_stall(id: usize) {
    let stall = std::env::var("CORECAST_TEST_STARTUP_STALL").ok().and_then(|v| {
        let (shard, ms) = v.split_once(':')?;
        Some((shard.parse::<usize>().ok()?, ms.parse::<u64>().ok()?))
    });
    if let Some((_, ms)) = stall.filter(|&(shard, _)| shard == id) {
        std::thread::sleep(Duration::from_millis(ms));
    }
}
