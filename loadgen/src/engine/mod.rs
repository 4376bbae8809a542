//! The generator's worker threads. Each owns a share of the connections and runs one mio
//! event loop: publishers append lines at their scheduled times, in bursts `--burst-us`
//! apart or, with `--burst-us 0`, each line with its own write (open loop: a late send
//! keeps its scheduled time, so latency includes any queueing the server caused);
//! receivers read the way their [`ReaderClass`] says, decode what arrives, account for
//! every (receiver, publisher) sequence and record latency in HDR histograms, overall and
//! per class. The main thread moves the shared [`Control`] through the phases: sync (wait
//! until every receiver is subscribed), run, stop. After the stop, stuck receivers read
//! what was left for them once, to learn whether the server closed them. Reading and
//! accounting live in `receive.rs`, the loop's timer in `timer.rs`.

mod receive;
mod timer;

use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};

use crate::accounting::{GapTracker, SeqTracker};
use crate::proto::{self, Header, Protocol, SYNC_PREFIX};
use crate::reader::{ReaderClass, ReaderMix};
use receive::{drain_stuck, read, read_gated, READ_CHUNK};
use timer::{Timer, TIMER_TOKEN};

pub const PHASE_SYNC: u8 = 0;
pub const PHASE_RUN: u8 = 1;
pub const PHASE_STOP: u8 = 2;

/// Bytes a publisher may have queued unsent before it skips sends (bounds our memory when
/// the server stops reading; skipped lines are not counted as sent).
const MAX_PENDING_BYTES: usize = 64 << 20;
/// With `--rate 0`, lines appended per round while the socket keeps up.
const UNPACED_BURST: usize = 64;
const UNPACED_PENDING_BYTES: usize = 256 << 10;
/// Latency histogram range: 1 µs to 60 s, 3 significant digits.
const HIST_MAX_US: u64 = 60_000_000;
/// Distinct notice texts kept per receiver, and their length.
const NOTICES_KEPT: usize = 4;
const NOTICE_MAX_CHARS: usize = 200;

/// Read-only description of the workload, shared by all threads.
pub struct Plan {
    pub protocol: Protocol,
    pub publishers: usize,
    /// Lines per second per publisher; 0 = as fast as the socket takes them.
    pub rate: f64,
    /// Time between one publisher's bursts (see `--burst-us`); 0 = a line at a time.
    pub burst_ns: u64,
    pub size: usize,
    /// How each receiver reads.
    pub mix: ReaderMix,
    /// Time zero for every timestamp in a payload.
    pub epoch: Instant,
    /// Targets the clients are spread over (nodes of a cluster); see [`target_of`].
    pub targets: usize,
    /// Someone watches the live progress line: workers also record every delivery's
    /// latency into [`Control::recent`] (a second record per delivery, so only then).
    pub live: bool,
}

/// The target client `client` connects to, of `targets`: round-robin, so every node of a
/// cluster gets the same share of receivers and of publishers.
pub fn target_of(client: usize, targets: usize) -> usize {
    client % targets.max(1)
}

/// A delivery from `publisher` to `receiver` crossed nodes when they are on different
/// targets (with one target, nothing crosses).
pub fn crosses_nodes(publisher: usize, receiver: usize, targets: usize) -> bool {
    target_of(publisher, targets) != target_of(receiver, targets)
}

impl Plan {
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub fn counted_receivers(&self) -> usize {
        self.mix.counted()
    }
}

/// Shared progress, written by workers and read by the main thread.
pub struct Control {
    pub phase: AtomicU8,
    pub start_ns: AtomicU64,
    pub warmup_end_ns: AtomicU64,
    pub send_end_ns: AtomicU64,
    /// Receivers known to be subscribed.
    pub subscribed: AtomicUsize,
    /// Connections the server closed while receivers were still being subscribed (a
    /// server that is full or refuses this address): the run cannot start.
    pub closed_in_sync: AtomicUsize,
    /// Unique deliveries so far (all phases).
    pub delivered: AtomicU64,
    /// Lines sent so far, per publisher.
    pub sent: Box<[AtomicU64]>,
    /// Sequence numbers skipped so far (lines behind a later one that have not arrived):
    /// lost unless they still come. Workers add what each decoded buffer opened and
    /// subtract what it filled; the live line shows it.
    pub missing: AtomicI64,
    /// Deliveries that filled a gap, so far (the live line's reorders).
    pub reordered: AtomicU64,
    /// With [`Plan::live`]: latency of recent deliveries (all phases), merged in by the
    /// workers every [`LIVE_FLUSH_NS`] and taken by the main thread once a second.
    pub recent: Mutex<Histogram<u64>>,
    pub errors: Mutex<Vec<String>>,
}

/// With [`Plan::live`], how often a worker merges its recent latencies into [`Control::recent`].
const LIVE_FLUSH_NS: u64 = 100_000_000;

impl Control {
    pub fn new(publishers: usize) -> Self {
        Control {
            phase: AtomicU8::new(PHASE_SYNC),
            start_ns: AtomicU64::new(u64::MAX),
            warmup_end_ns: AtomicU64::new(u64::MAX),
            send_end_ns: AtomicU64::new(u64::MAX),
            subscribed: AtomicUsize::new(0),
            closed_in_sync: AtomicUsize::new(0),
            delivered: AtomicU64::new(0),
            sent: (0..publishers).map(|_| AtomicU64::new(0)).collect(),
            missing: AtomicI64::new(0),
            reordered: AtomicU64::new(0),
            recent: Mutex::new(histogram()),
            errors: Mutex::new(Vec::new()),
        }
    }

    fn error(&self, e: String) {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.len() < 20 {
            errors.push(e);
        }
    }
}

/// One connection as handed to a worker.
pub struct Conn {
    pub client: usize,
    pub stream: crate::tls::Stream,
    /// This connection receives (all but Redis publisher connections).
    pub receives: bool,
    /// This connection publishes as this publisher id.
    pub publishes: Option<u32>,
    /// Sends SYNC probes during the sync phase (Summoner only).
    pub probes: bool,
    /// Bytes to send first (subscription, CONNECT).
    pub hello: Vec<u8>,
}

struct Live {
    conn: Conn,
    /// How this connection reads (meaningful only when it receives).
    class: ReaderClass,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    /// The last write left bytes the socket would not take.
    refused: bool,
    subscribed: bool,
    closed: bool,
    /// Edge-triggered readiness: set by a readable event, cleared when a read would block,
    /// so a receiver that chose not to read yet knows there is something to read.
    readable: bool,
    /// Rate-limited receivers: no read before this time (ns since the epoch).
    read_not_before: u64,
    /// When the server's close reached this connection during the run.
    closed_at: Option<u64>,
    /// A stuck receiver found the close only when it read, after the stop.
    closed_seen_at_end: bool,
    notices: Vec<String>,
    gaps: GapTracker,
    /// Deliveries of lines scheduled in the measured window.
    in_window: u64,
    bytes_read: u64,
    trackers: Vec<SeqTracker>,
}

impl Live {
    /// The server closed this connection (EOF, reset, a failed write or a closing event).
    fn on_server_close(&mut self, now: u64, control: &Control, report: &mut Report) {
        self.closed = true;
        if self.closed_at.is_some() || self.closed_seen_at_end {
            return;
        }
        let phase = control.phase.load(Ordering::Relaxed);
        if phase == PHASE_SYNC {
            control.closed_in_sync.fetch_add(1, Ordering::Relaxed);
        }
        if phase != PHASE_STOP {
            self.closed_at = Some(now);
            report.closed_by_server += 1;
        } else if self.class == ReaderClass::Stuck {
            self.closed_seen_at_end = true;
        }
    }

    fn on_notice(&mut self, text: &[u8]) {
        let text: String = String::from_utf8_lossy(text).chars().take(NOTICE_MAX_CHARS).collect();
        if self.notices.len() < NOTICES_KEPT && !self.notices.contains(&text) {
            self.notices.push(text);
        }
    }
}

/// One publisher's schedule, on the connection `conn` (an index into the worker's list).
struct Publisher {
    conn: usize,
    id: u32,
    /// Next sequence number.
    seq: u64,
    /// When the next line is due on an even schedule, in ns since the epoch.
    next_due: u64,
    /// This publisher's bursts go out at `burst_phase + k * burst_ns`.
    burst_phase: u64,
}

/// When a line due at `due` on the even schedule goes out, and the time it carries: the
/// last burst at or before `due` (a burst takes the lines due before the next one), or
/// `due` itself without bursts.
fn send_time(due: u64, burst_phase: u64, burst_ns: u64) -> u64 {
    if burst_ns == 0 || due < burst_phase {
        due.max(burst_phase)
    } else {
        due - (due - burst_phase) % burst_ns
    }
}

impl Publisher {
    /// Appends the next line, stamped with its scheduled time.
    fn append(&mut self, plan: &Plan, out: &mut Vec<u8>, payload: &mut Vec<u8>, sched_ns: u64) {
        payload.clear();
        let header = Header {
            publisher: self.id,
            seq: self.seq,
            sched_ns,
        };
        proto::write_payload(payload, header, plan.size);
        plan.protocol.publish(out, payload);
        self.seq += 1;
    }
}

/// One receiver's outcome.
pub struct ReceiverReport {
    pub client: usize,
    pub class: ReaderClass,
    /// Indexed by publisher; empty for a stuck receiver.
    pub trackers: Vec<SeqTracker>,
    /// When the server's close reached it during the run, ns since the epoch.
    pub closed_at_ns: Option<u64>,
    /// A stuck receiver found the close only when it read, after the stop.
    pub closed_seen_at_end: bool,
    /// Distinct notice texts it received.
    pub notices: Vec<String>,
    /// The longest time it went without a delivery in the measured window.
    pub max_gap_ns: u64,
    pub in_window: u64,
    pub bytes_read: u64,
}

/// What a worker hands back.
pub struct Report {
    /// Latency per [`ReaderClass`], indexed by [`ReaderClass::index`]; the run's overall
    /// latency is their sum (one record per delivery, not two).
    pub class_latency: Vec<Histogram<u64>>,
    /// With several targets: the latency of the deliveries that crossed nodes (each also
    /// counts in its class).
    pub cross_latency: Histogram<u64>,
    /// Per second since the start: deliveries and their latency.
    pub timeline: Vec<(u64, Histogram<u64>)>,
    pub receivers: Vec<ReceiverReport>,
    /// Deliveries of lines scheduled inside the measured window.
    pub delivered_in_window: u64,
    pub notices: u64,
    /// Connections the server closed during the run.
    pub closed_by_server: u64,
    /// write(2) calls that sent a publisher's bytes (with `--burst-us 0`, one per line
    /// unless the socket refused data).
    pub publisher_writes: u64,
    /// With `--burst-us 0`: lines that could not go out alone because their socket still
    /// held refused bytes; they went out with them.
    pub queued_lines: u64,
    /// With [`Plan::live`]: latencies since the last merge into [`Control::recent`].
    pub recent: Histogram<u64>,
}

pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("static histogram bounds are valid")
}

/// Runs one worker until the main thread sets `PHASE_STOP`.
pub fn run_worker(plan: Arc<Plan>, control: Arc<Control>, conns: Vec<Conn>) -> Report {
    let mut poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => {
            control.error(format!("cannot create a poller: {e}"));
            return empty_report();
        }
    };
    let mut live: Vec<Live> = Vec::with_capacity(conns.len());
    for (i, mut conn) in conns.into_iter().enumerate() {
        // A stuck receiver is registered for reading too, only to see a reset or a FIN
        // the moment it arrives; it never reads during the run.
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = poll.registry().register(&mut conn.stream, Token(i), interest) {
            control.error(format!("cannot register a connection: {e}"));
        }
        let class = plan.mix.class_of(conn.client);
        let stuck = conn.receives && class == ReaderClass::Stuck;
        if stuck || (conn.receives && plan.protocol == Protocol::Summoner && plan.publishers == 0) {
            // Nothing will confirm these: stuck ones never read, and with no publishers
            // there are no SYNC probes. Count them as subscribed.
            control.subscribed.fetch_add(1, Ordering::Relaxed);
        }
        let trackers = if conn.receives && !stuck {
            vec![SeqTracker::default(); plan.publishers]
        } else {
            Vec::new()
        };
        let wbuf = std::mem::take(&mut conn.hello);
        live.push(Live {
            conn,
            class,
            rbuf: Vec::new(),
            wbuf,
            wpos: 0,
            refused: false,
            subscribed: stuck,
            closed: false,
            readable: false,
            read_not_before: 0,
            closed_at: None,
            closed_seen_at_end: false,
            notices: Vec::new(),
            gaps: GapTracker::default(),
            in_window: 0,
            bytes_read: 0,
            trackers,
        });
    }
    // Receivers that do not read on every event: rate-limited and pausing ones.
    let gated: Vec<usize> = (0..live.len())
        .filter(|&i| live[i].conn.receives && matches!(live[i].class, ReaderClass::RateLimited | ReaderClass::Pausing))
        .collect();
    let mut pause = (u64::MAX, u64::MAX);
    let timer = Timer::new()
        .and_then(|t| {
            let fd = t.as_raw_fd();
            poll.registry()
                .register(&mut mio::unix::SourceFd(&fd), TIMER_TOKEN, Interest::READABLE)
                .map(|_| t)
        })
        .map_err(|e| control.error(format!("cannot create a timer (sends may be up to 1 ms late): {e}")))
        .ok();
    let mut report = empty_report();
    let interval_ns = if plan.rate > 0.0 { (1e9 / plan.rate) as u64 } else { 0 };
    let mut pubs: Vec<Publisher> = live
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            l.conn.publishes.map(|id| Publisher {
                conn: i,
                id,
                seq: 0,
                next_due: 0,
                burst_phase: 0,
            })
        })
        .collect();
    let mut scheduled = false;
    let per_line = plan.burst_ns == 0;
    let mut last_probe = 0u64;
    let mut events = Events::with_capacity(1024);
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut payload = Vec::with_capacity(plan.size + 64);
    let mut delivered_reported = 0u64;
    let mut delivered = 0u64;
    let mut live_flushed = 0u64;
    // When the timer fires next, ns since the epoch (0: not armed).
    let mut armed = 0u64;

    loop {
        let phase = control.phase.load(Ordering::Acquire);
        if phase == PHASE_STOP {
            break;
        }
        let now = plan.now_ns();
        let mut timeout = Duration::from_millis(5);
        if phase == PHASE_SYNC && now.saturating_sub(last_probe) > 100_000_000 {
            last_probe = now;
            for l in live.iter_mut().filter(|l| l.conn.probes) {
                plan.protocol.publish(&mut l.wbuf, SYNC_PREFIX);
            }
        }
        if phase == PHASE_RUN {
            let start = control.start_ns.load(Ordering::Acquire);
            let send_end = control.send_end_ns.load(Ordering::Acquire);
            if !scheduled {
                scheduled = true;
                // Spread publishers across one interval so they do not all fire together.
                let n = plan.publishers.max(1) as u64;
                for p in pubs.iter_mut() {
                    p.next_due = start + interval_ns * p.id as u64 / n;
                    p.burst_phase = start + plan.burst_ns * p.id as u64 / n;
                }
                pause = plan.mix.pause_window(control.warmup_end_ns.load(Ordering::Acquire));
            }
            for p in pubs.iter_mut() {
                let l = &mut live[p.conn];
                let before = p.seq;
                if interval_ns > 0 {
                    let at = |p: &Publisher| send_time(p.next_due, p.burst_phase, plan.burst_ns);
                    while at(p) <= now && p.next_due < send_end {
                        if l.wbuf.len() - l.wpos < MAX_PENDING_BYTES {
                            p.append(&plan, &mut l.wbuf, &mut payload, at(p));
                            // Per-line writes: a line goes out with its own write(2).
                            // Behind a socket that refused data the lines queue up and go
                            // together, as TCP would merge them anyway.
                            if per_line && !l.closed {
                                if l.refused {
                                    report.queued_lines += 1;
                                } else {
                                    flush(l, &control, now, &mut report);
                                }
                            }
                        }
                        p.next_due += interval_ns;
                    }
                    if p.next_due < send_end {
                        timeout = timeout.min(Duration::from_nanos(at(p).saturating_sub(now)));
                    }
                } else if now >= start && now < send_end {
                    if l.wbuf.len() - l.wpos < UNPACED_PENDING_BYTES {
                        for _ in 0..UNPACED_BURST {
                            p.append(&plan, &mut l.wbuf, &mut payload, now);
                        }
                    }
                    timeout = Duration::from_micros(200);
                }
                if p.seq > before {
                    control.sent[p.id as usize].fetch_add(p.seq - before, Ordering::Relaxed);
                }
            }
        }
        for &i in &gated {
            let (n, wait) = read_gated(&mut live[i], pause, &mut chunk, &plan, &control, &mut report);
            delivered += n;
            if let Some(wait) = wait {
                timeout = timeout.min(wait);
            }
        }
        for l in live.iter_mut() {
            if l.wpos < l.wbuf.len() && !l.closed {
                flush(l, &control, now, &mut report);
            }
        }
        // epoll's own timeout has millisecond resolution: a timer descriptor wakes the loop
        // when the next line is due (the epoll timeout is only a backstop). Re-arming costs
        // a syscall that shows at 300k lines/s, so a pending earlier expiry is kept (it
        // only wakes the loop once too early).
        if let Some(timer) = &timer {
            let deadline = now + timeout.as_nanos() as u64;
            if deadline < armed || armed <= now {
                timer.arm(timeout);
                armed = deadline;
            }
        }
        if let Err(e) = poll.poll(&mut events, Some(timeout + Duration::from_millis(1))) {
            if e.kind() != ErrorKind::Interrupted {
                control.error(format!("poll failed: {e}"));
                break;
            }
        }
        for event in events.iter() {
            let i = event.token().0;
            if i == TIMER_TOKEN.0 {
                if let Some(timer) = &timer {
                    timer.clear();
                }
                continue;
            }
            let l = &mut live[i];
            let now = plan.now_ns();
            if l.conn.receives && l.class == ReaderClass::Stuck {
                if !l.closed && (event.is_read_closed() || event.is_error()) {
                    l.on_server_close(now, &control, &mut report);
                }
            } else if event.is_readable() && !l.closed {
                l.readable = true;
                // Gated receivers read at the top of the loop, when their gate allows.
                if !gated.contains(&i) {
                    delivered += read(l, &mut chunk, false, &plan, &control, &mut report);
                }
            }
            if event.is_writable() && l.wpos < l.wbuf.len() && !l.closed {
                flush(l, &control, now, &mut report);
            }
        }
        if delivered != delivered_reported {
            control
                .delivered
                .fetch_add(delivered - delivered_reported, Ordering::Relaxed);
            delivered_reported = delivered;
        }
        if plan.live && !report.recent.is_empty() && now.saturating_sub(live_flushed) > LIVE_FLUSH_NS {
            live_flushed = now;
            let mut recent = control.recent.lock().unwrap_or_else(|p| p.into_inner());
            let _ = recent.add(&report.recent);
            report.recent.reset();
        }
    }
    drain_stuck(&mut live, &mut poll, &mut chunk, &plan, &control, &mut report);
    let (window_start, window_end) = (
        control.warmup_end_ns.load(Ordering::Relaxed),
        control.send_end_ns.load(Ordering::Relaxed),
    );
    report.receivers = live
        .into_iter()
        .filter(|l| l.conn.receives)
        .map(|l| ReceiverReport {
            client: l.conn.client,
            class: l.class,
            trackers: l.trackers,
            closed_at_ns: l.closed_at,
            closed_seen_at_end: l.closed_seen_at_end,
            notices: l.notices,
            max_gap_ns: l.gaps.longest(window_start, window_end),
            in_window: l.in_window,
            bytes_read: l.bytes_read,
        })
        .collect();
    report
}

fn empty_report() -> Report {
    Report {
        class_latency: ReaderClass::ALL.iter().map(|_| histogram()).collect(),
        cross_latency: histogram(),
        timeline: Vec::new(),
        receivers: Vec::new(),
        delivered_in_window: 0,
        notices: 0,
        closed_by_server: 0,
        publisher_writes: 0,
        queued_lines: 0,
        recent: histogram(),
    }
}

/// Writes as much pending output as the socket takes. A failed write means the server
/// closed the connection.
fn flush(l: &mut Live, control: &Control, now: u64, report: &mut Report) {
    while l.wpos < l.wbuf.len() {
        match l.conn.stream.write(&l.wbuf[l.wpos..]) {
            Ok(0) => break,
            Ok(n) => {
                l.wpos += n;
                report.publisher_writes += u64::from(l.conn.publishes.is_some());
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                control.error(format!("client {} write failed: {e}", l.conn.client));
                l.on_server_close(now, control, report);
                break;
            }
        }
    }
    l.refused = l.wpos < l.wbuf.len();
    if l.wpos == l.wbuf.len() {
        l.wbuf.clear();
        l.wpos = 0;
    } else if l.wpos > (1 << 20) {
        l.wbuf.drain(..l.wpos);
        l.wpos = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::{crosses_nodes, send_time, target_of};

    #[test]
    fn clients_are_spread_round_robin_and_cross_only_between_targets() {
        // Three targets: clients 0, 3, 6 on the first, 1, 4 on the second, 2, 5 on the third.
        let on: Vec<usize> = (0..7).map(|c| target_of(c, 3)).collect();
        assert_eq!(on, vec![0, 1, 2, 0, 1, 2, 0]);
        assert!(!crosses_nodes(0, 3, 3));
        assert!(!crosses_nodes(4, 1, 3));
        assert!(crosses_nodes(0, 1, 3));
        assert!(crosses_nodes(5, 3, 3));
        // Of 4 publishers x 4 receivers on two targets, the 8 pairs on different ones cross.
        let crossing = (0..4)
            .flat_map(|p| (0..4).map(move |r| (p, r)))
            .filter(|&(p, r)| crosses_nodes(p, r, 2));
        assert_eq!(crossing.count(), 8);
        // One target: nothing crosses.
        assert!((0..10).all(|p| (0..10).all(|r| !crosses_nodes(p, r, 1))));
    }

    #[test]
    fn a_burst_takes_the_lines_due_before_the_next_one() {
        // Bursts every 1000 ns from 250: lines due in [250, 1250) go at 250, and so on.
        assert_eq!(send_time(250, 250, 1000), 250);
        assert_eq!(send_time(1249, 250, 1000), 250);
        assert_eq!(send_time(1250, 250, 1000), 1250);
        assert_eq!(send_time(5000, 250, 1000), 4250);
        // Lines due before the first burst wait for it.
        assert_eq!(send_time(100, 250, 1000), 250);
        // Without bursts a line goes at its own time.
        assert_eq!(send_time(777, 0, 0), 777);
        assert!((0..10_000).all(|d| send_time(d, 250, 1000) <= d.max(250)));
    }
}
