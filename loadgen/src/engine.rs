//! The generator's worker threads. Each owns a share of the connections and runs one mio
//! event loop: publishers append lines at their scheduled times, in bursts `--burst-us`
//! apart (open loop: a late send keeps its scheduled time, so latency includes any
//! queueing the server caused), receivers decode what arrives, account for every
//! (receiver, publisher) sequence and record latency in an HDR histogram. The main thread moves the shared [`Control`]
//! through the phases: sync (wait until every receiver is subscribed), run, stop.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::accounting::{Arrival, SeqTracker};
use crate::proto::{self, Event, Header, Protocol, SYNC_PREFIX};

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

/// Read-only description of the workload, shared by all threads.
pub struct Plan {
    pub protocol: Protocol,
    pub clients: usize,
    pub publishers: usize,
    /// Lines per second per publisher; 0 = as fast as the socket takes them.
    pub rate: f64,
    /// Time between one publisher's bursts (see `--burst-us`); 0 = a line at a time.
    pub burst_ns: u64,
    pub size: usize,
    /// Clients `[clients - slow, clients)` never read (slow-consumer scenario).
    pub slow: usize,
    /// Time zero for every timestamp in a payload.
    pub epoch: Instant,
    /// Targets the clients are spread over (client i on target i mod n): a delivery from
    /// publisher p to client c crossed nodes when p and c are on different targets.
    pub targets: usize,
}

impl Plan {
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub fn counted_receivers(&self) -> usize {
        self.clients - self.slow
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
    /// Unique deliveries so far (all phases).
    pub delivered: AtomicU64,
    /// Lines sent so far, per publisher.
    pub sent: Box<[AtomicU64]>,
    pub errors: Mutex<Vec<String>>,
}

impl Control {
    pub fn new(publishers: usize) -> Self {
        Control {
            phase: AtomicU8::new(PHASE_SYNC),
            start_ns: AtomicU64::new(u64::MAX),
            warmup_end_ns: AtomicU64::new(u64::MAX),
            send_end_ns: AtomicU64::new(u64::MAX),
            subscribed: AtomicUsize::new(0),
            delivered: AtomicU64::new(0),
            sent: (0..publishers).map(|_| AtomicU64::new(0)).collect(),
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
    pub stream: TcpStream,
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
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    subscribed: bool,
    closed: bool,
    trackers: Vec<SeqTracker>,
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

/// What a worker hands back.
pub struct Report {
    pub latency: Histogram<u64>,
    /// Deliveries in the window that crossed nodes (several targets only), and their latency.
    pub cross_latency: Histogram<u64>,
    /// Per second since the start: deliveries and their latency.
    pub timeline: Vec<(u64, Histogram<u64>)>,
    /// Per counted receiver: its client index and its trackers, indexed by publisher.
    pub trackers: Vec<(usize, Vec<SeqTracker>)>,
    /// Deliveries of lines scheduled inside the measured window.
    pub delivered_in_window: u64,
    pub notices: u64,
    /// Connections the server closed during the run.
    pub closed_by_server: u64,
}

fn histogram() -> Histogram<u64> {
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
        let slow = conn.receives && conn.client >= plan.counted_receivers();
        let interest = if slow {
            Interest::WRITABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        };
        if let Err(e) = poll.registry().register(&mut conn.stream, Token(i), interest) {
            control.error(format!("cannot register a connection: {e}"));
        }
        if slow || (conn.receives && plan.protocol == Protocol::Summoner && plan.publishers == 0) {
            // Nothing will confirm these: slow ones never read, and with no publishers
            // there are no SYNC probes. Count them as subscribed.
            control.subscribed.fetch_add(1, Ordering::Relaxed);
        }
        let trackers = if conn.receives && !slow {
            vec![SeqTracker::default(); plan.publishers]
        } else {
            Vec::new()
        };
        let wbuf = std::mem::take(&mut conn.hello);
        live.push(Live {
            conn,
            rbuf: Vec::new(),
            wbuf,
            wpos: 0,
            subscribed: slow,
            closed: false,
            trackers,
        });
    }
    let timer = Timer::new()
        .and_then(|t| {
            let fd = t.fd.as_raw_fd();
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
    let mut last_probe = 0u64;
    let mut events = Events::with_capacity(1024);
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut payload = Vec::with_capacity(plan.size + 64);
    let mut delivered_reported = 0u64;
    let mut delivered = 0u64;

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
            }
            for p in pubs.iter_mut() {
                let l = &mut live[p.conn];
                let before = p.seq;
                if interval_ns > 0 {
                    let at = |p: &Publisher| send_time(p.next_due, p.burst_phase, plan.burst_ns);
                    while at(p) <= now && p.next_due < send_end {
                        if l.wbuf.len() - l.wpos < MAX_PENDING_BYTES {
                            p.append(&plan, &mut l.wbuf, &mut payload, at(p));
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
        for (i, l) in live.iter_mut().enumerate() {
            if l.wpos < l.wbuf.len() && !l.closed {
                flush(l, &control, i);
            }
        }
        // epoll's own timeout has millisecond resolution: a timer descriptor wakes the loop
        // when the next line is due (the epoll timeout is only a backstop).
        if let Some(timer) = &timer {
            timer.arm(timeout);
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
            if event.is_readable() && !l.closed {
                delivered += read(l, &mut chunk, &plan, &control, &mut report);
            }
            if event.is_writable() && l.wpos < l.wbuf.len() && !l.closed {
                flush(l, &control, i);
            }
        }
        if delivered != delivered_reported {
            control
                .delivered
                .fetch_add(delivered - delivered_reported, Ordering::Relaxed);
            delivered_reported = delivered;
        }
    }
    report.trackers = live
        .into_iter()
        .filter(|l| !l.trackers.is_empty())
        .map(|l| (l.conn.client, l.trackers))
        .collect();
    report
}

/// The poll loop's token for its [`Timer`] (connections use their index).
const TIMER_TOKEN: Token = Token(usize::MAX);

/// A `timerfd`: wakes the poll loop with nanosecond resolution.
struct Timer {
    fd: OwnedFd,
}

impl Timer {
    fn new() -> std::io::Result<Timer> {
        // SAFETY: plain syscall; on success we own the returned descriptor.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(Timer {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Fires once, `after` from now (at once for zero).
    fn arm(&self, after: Duration) {
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `spec` is a valid itimerspec and the descriptor is ours.
        unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    }

    /// Consumes an expiry so the descriptor can signal the next one.
    fn clear(&self) {
        let mut expirations = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a buffer of 8; a failed read changes nothing.
        unsafe { libc::read(self.fd.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
    }
}

fn empty_report() -> Report {
    Report {
        latency: histogram(),
        cross_latency: histogram(),
        timeline: Vec::new(),
        trackers: Vec::new(),
        delivered_in_window: 0,
        notices: 0,
        closed_by_server: 0,
    }
}

/// Writes as much pending output as the socket takes.
fn flush(l: &mut Live, control: &Control, i: usize) {
    while l.wpos < l.wbuf.len() {
        match l.conn.stream.write(&l.wbuf[l.wpos..]) {
            Ok(0) => break,
            Ok(n) => l.wpos += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                control.error(format!("connection {i} write failed: {e}"));
                l.closed = true;
                break;
            }
        }
    }
    if l.wpos == l.wbuf.len() {
        l.wbuf.clear();
        l.wpos = 0;
    } else if l.wpos > (1 << 20) {
        l.wbuf.drain(..l.wpos);
        l.wpos = 0;
    }
}

/// Bytes read from a socket per `read` call, into the worker's one scratch buffer.
const READ_CHUNK: usize = 64 << 10;

/// Reads everything available and accounts for it; returns unique deliveries. Each read
/// lands in `chunk` (the worker's, allocated once) and is decoded from there; only an
/// incomplete last message is kept in the connection's own buffer.
fn read(l: &mut Live, chunk: &mut [u8], plan: &Plan, control: &Control, report: &mut Report) -> u64 {
    let mut delivered = 0;
    loop {
        let n = match l.conn.stream.read(chunk) {
            Ok(0) => {
                l.closed = true;
                if control.phase.load(Ordering::Relaxed) != PHASE_STOP {
                    report.closed_by_server += 1;
                }
                return delivered;
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return delivered,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                l.closed = true;
                report.closed_by_server += 1;
                return delivered;
            }
        };
        if l.rbuf.is_empty() {
            let used = decode(l, &chunk[..n], plan, control, report, &mut delivered);
            l.rbuf.extend_from_slice(&chunk[used..n]);
        } else {
            l.rbuf.extend_from_slice(&chunk[..n]);
            let rbuf = std::mem::take(&mut l.rbuf);
            let used = decode(l, &rbuf, plan, control, report, &mut delivered);
            l.rbuf = rbuf;
            l.rbuf.drain(..used);
        }
        if l.closed {
            return delivered;
        }
    }
}

/// Accounts for the complete messages in `buf`; returns the bytes they took.
fn decode(l: &mut Live, buf: &[u8], plan: &Plan, control: &Control, report: &mut Report, delivered: &mut u64) -> usize {
    let now = plan.now_ns();
    let start = control.start_ns.load(Ordering::Relaxed);
    let warmup_end = control.warmup_end_ns.load(Ordering::Relaxed);
    let send_end = control.send_end_ns.load(Ordering::Relaxed);
    let (mut pong, mut subscribed) = (false, false);
    let own = l.conn.client as u32;
    let trackers = &mut l.trackers;
    let decoded = plan.protocol.decode(buf, |event| match event {
        Event::Message(p) if p.starts_with(SYNC_PREFIX) => subscribed = true,
        Event::Message(p) => {
            let Some(h) = proto::parse_header(p) else { return };
            // Redis delivers a publisher's own messages back: drop them here.
            if h.publisher == own && plan.protocol == Protocol::Redis {
                return;
            }
            let Some(tracker) = trackers.get_mut(h.publisher as usize) else {
                return;
            };
            if tracker.on_arrival(h.seq) == Arrival::Duplicate {
                return;
            }
            *delivered += 1;
            if h.sched_ns >= warmup_end && h.sched_ns < send_end {
                report.delivered_in_window += 1;
                let us = (now.saturating_sub(h.sched_ns) / 1000).clamp(1, HIST_MAX_US);
                let _ = report.latency.record(us);
                if plan.targets > 1 && h.publisher as usize % plan.targets != own as usize % plan.targets {
                    let _ = report.cross_latency.record(us);
                }
                let second = (now.saturating_sub(start) / 1_000_000_000) as usize;
                while report.timeline.len() <= second {
                    report.timeline.push((0, histogram()));
                }
                report.timeline[second].0 += 1;
                let _ = report.timeline[second].1.record(us);
            }
        }
        Event::Subscribed => subscribed = true,
        Event::Ping => pong = true,
        Event::Notice(_) => report.notices += 1,
    });
    let used = decoded.unwrap_or_else(|e| {
        control.error(format!("client {}: {e}", l.conn.client));
        l.closed = true;
        buf.len()
    });
    if subscribed && !l.subscribed {
        l.subscribed = true;
        control.subscribed.fetch_add(1, Ordering::Relaxed);
    }
    if pong {
        l.wbuf.extend_from_slice(b"PONG\r\n");
    }
    used
}

#[cfg(test)]
mod tests {
    use super::send_time;

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
